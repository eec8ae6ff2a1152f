"""Listening sockets: accept connections, enforce connection limits, run sessions."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass

from .session import Backend, Port, Session, SessionInfo

TLS_HANDSHAKE_TIMEOUT = 30.0


def bind(host: str, number: int) -> socket.socket:
    """A listening socket, set up as asyncio.start_server would (OSError if it cannot)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, number))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class ListeningSocket:
    port: Port  # the kind of listener
    sock: socket.socket


def bind_all(addresses: list[tuple[Port, str, int]]) -> list[ListeningSocket]:
    """Every address bound and listening, or none (OSError naming the address)."""
    bound: list[ListeningSocket] = []
    try:
        for port, host, number in addresses:
            try:
                bound.append(ListeningSocket(port, bind(host, number)))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {host}:{number}: "
                                         f"{exc.strerror}") from None
    except BaseException:
        for listening in bound:
            listening.sock.close()
        raise
    return bound


class ConnectionLimits:
    """Counts open connections in total and per client IP."""

    def __init__(self, max_total: int, max_per_ip: int):
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def try_acquire(self, ip: str) -> bool:
        if self.total >= self.max_total or self.per_ip[ip] >= self.max_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class Listeners:
    """All listening sockets of the server, sharing one set of connection limits."""

    def __init__(self, backend: Backend, limits: ConnectionLimits):
        self.backend = backend
        self.limits = limits
        self.servers: list[asyncio.Server] = []
        self.sessions: dict[asyncio.Task[None], Session | None] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._closed = False

    async def start(self, port: Port, sock: socket.socket) -> asyncio.Server:
        """Serve ``sock``, a listening socket from ``bind``."""
        ssl_context = self.backend.tls_context() if port is Port.SUBMISSION_TLS else None
        if port is Port.SUBMISSION_TLS and ssl_context is None:
            raise RuntimeError("submission_tls needs a certificate")
        server = await asyncio.start_server(
            lambda r, w: self._on_connect(port, r, w), sock=sock, ssl=ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if ssl_context else None,
        )
        self.servers.append(server)
        return server

    async def _on_connect(
        self, port: Port, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        ip = peer[0]
        session_id = f"{self._prefix}.{next(self._ids)}"
        info = SessionInfo(port=port, peer_ip=ip, peer_port=peer[1], session_id=session_id)
        if not self.limits.try_acquire(ip):
            reply = "421 4.7.0 Too many connections, try again later"
            self.backend.events.rejected(info, "CONNECT", reply)
            writer.write(f"{reply}\r\n".encode())
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.drain(), 5)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.sessions[task] = None
        self.backend.events.connected(info)
        started = time.monotonic()
        session = None
        try:
            session = Session(self.backend, port, reader, writer, session_id)
            self.sessions[task] = session
            if self._closed:
                session.shutdown()
            await session.run()
        except asyncio.CancelledError:
            # Cut off at shutdown. This task is the connection's top level: ending it
            # quietly keeps asyncio (3.11) from logging the cancellation as an error.
            writer.close()
        finally:
            self.sessions.pop(task, None)
            self.limits.release(ip)
            # The session's info knows the user it authenticated as, if any.
            self.backend.events.disconnected(session.info if session else info,
                                             time.monotonic() - started)

    def close(self) -> None:
        """Stop accepting new connections. Sessions between transactions are closed with
        421; those in a transaction go on (see drain)."""
        self._closed = True
        for server in self.servers:
            server.close()
        for session in self.sessions.values():
            if session is not None:
                session.shutdown()

    async def drain(self, timeout: float) -> None:
        """Wait for sessions in flight, then cut off the rest."""
        if self.sessions:
            _, pending = await asyncio.wait(list(self.sessions), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
