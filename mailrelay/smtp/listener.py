"""Listening sockets: accept connections, enforce connection limits, run sessions.

We accept ourselves rather than through ``asyncio.start_server``, so that:

- every connection counts against the limits from the moment it is accepted, before a
  PROXY header is read or a TLS handshake begins (asyncio's server with ``ssl=`` does
  the handshake before our code sees the connection, so silent connections to 465 went
  uncounted); one over the limits is refused and closed at once, without a handshake;
- the PROXY header (haproxy) is read from the raw socket, before the TLS handshake of
  implicit TLS, and its client address is the one limits, logs and policy see;
- running out of file descriptors pauses accepting for a moment with one log line per
  interval (asyncio logs a traceback for every failed accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import resource
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import format_hostport
from ..ops import memory
from .proxy import IPNetwork, ProxyError, is_trusted, read_proxy_header_from_socket
from .session import Backend, Port, Session, SessionInfo, describe_tls_error
from .stream import DataBudget
from .throttle import client_key, peer_address

log = logging.getLogger("mailrelay.smtp")

TLS_HANDSHAKE_TIMEOUT = 30.0
PROXY_HEADER_TIMEOUT = 5.0
# Connections taken from the kernel's queue per wake-up (asyncio's own figure).
ACCEPT_BATCH = 100
# After this many connections at once, the heap is trimmed when the last one closes
# (ops/memory.py).
CROWD = 100
# Out of file descriptors (or kernel memory): accepting stops this long, and one line
# per LOG_INTERVAL says so.
ACCEPT_PAUSE = 1.0
LOG_INTERVAL = 60.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
STREAM_LIMIT = 64 * 1024  # the StreamReader's buffer before it stops reading the socket


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


class _Pool:
    """One listener kind's connections: in all and per client key."""

    def __init__(self, max_total: int, max_per_client: int):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: Counter[str] = Counter()


class ConnectionLimits:
    """Open connections, counted per listener kind (port 25 cannot starve 587 and 465)
    in all and per client (an IPv4 address or an IPv6 /64, see ``client_key``).

    A connection takes its kind's slot when it is accepted, and its client's when the
    client is known: at once, or after the PROXY header that names it.
    """

    def __init__(self, max_total: int | dict[Port, int], max_per_ip: int | dict[Port, int]):
        def for_kind(value: int | dict[Port, int], port: Port) -> int:
            return value[port] if isinstance(value, dict) else value

        self.pools = {port: _Pool(for_kind(max_total, port), for_kind(max_per_ip, port))
                      for port in Port}

    @property
    def total(self) -> int:
        return sum(pool.total for pool in self.pools.values())

    @property
    def per_ip(self) -> Counter[str]:
        """Open connections per client key, all kinds together."""
        counts: Counter[str] = Counter()
        for pool in self.pools.values():
            counts.update(pool.per_client)
        return counts

    def take_slot(self, port: Port) -> bool:
        pool = self.pools[port]
        if pool.total >= pool.max_total:
            return False
        pool.total += 1
        return True

    def release_slot(self, port: Port) -> None:
        self.pools[port].total -= 1

    def take_client(self, port: Port, key: str) -> bool:
        pool = self.pools[port]
        if pool.per_client[key] >= pool.max_per_client:
            return False
        pool.per_client[key] += 1
        return True

    def release_client(self, port: Port, key: str) -> None:
        pool = self.pools[port]
        pool.per_client[key] -= 1
        if pool.per_client[key] <= 0:
            del pool.per_client[key]


class _OnceEvery:
    """Says whether to log now (once per ``interval``) and how many were left unsaid."""

    def __init__(self, interval: float):
        self.interval = interval
        self.last = -interval
        self.suppressed = 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class Listeners:
    """All listening sockets of the server: accepting, limits, PROXY headers, TLS of
    port 465, and a task per session."""

    def __init__(
        self, backend: Backend, limits: ConnectionLimits, *,
        proxy_networks: dict[Port, Iterable[IPNetwork]] | None = None,
        proxy_timeout: float = PROXY_HEADER_TIMEOUT,
        tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
        data_budget: DataBudget | None = None,
        max_open: int | None = None,
    ):
        """``max_open``: connections in all, over every kind (the open-files limit less
        what the rest of the server needs; see open_files_budget)."""
        self.backend = backend
        self.limits = limits
        self.proxy_networks = {port: tuple(networks)
                               for port, networks in (proxy_networks or {}).items() if networks}
        self.proxy_timeout = proxy_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.data_budget = data_budget
        self.max_open = max_open
        self.listening: list[tuple[Port, socket.socket]] = []
        # Every connection's task, from accept; its Session once it has one.
        self.sessions: dict[asyncio.Task[None], Session | None] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._closed = False
        self._resource_log = _OnceEvery(LOG_INTERVAL)
        self._accept_error_log = _OnceEvery(LOG_INTERVAL)
        self._proxy_log = _OnceEvery(1.0)
        self._files_log = _OnceEvery(LOG_INTERVAL)
        self._crowd = False  # CROWD connections or more since the last trim

    async def start(self, port: Port, sock: socket.socket) -> None:
        """Serve ``sock``, a listening socket from ``bind`` (or systemd)."""
        if port is Port.SUBMISSION_TLS and self.backend.tls_context() is None:
            raise RuntimeError("submission_tls needs a certificate")
        sock.setblocking(False)
        self.listening.append((port, sock))
        self._resume(port, sock)

    def _files_share(self, port: Port) -> int:
        """``port``'s part of ``max_open`` (FILES_WEIGHT among the kinds listening)."""
        assert self.max_open is not None
        kinds = {kind for kind, _ in self.listening}
        total = sum(FILES_WEIGHT[kind] for kind in kinds) or 1
        return max(1, self.max_open * FILES_WEIGHT[port] // total)

    # -- accepting ---------------------------------------------------------------------

    def _resume(self, port: Port, sock: socket.socket) -> None:
        if not self._closed and sock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, port, sock)

    def _accept(self, port: Port, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(port, sock, exc)
                    return
                # ECONNABORTED and the like: that client is gone; the others wait.
                if self._accept_error_log.due():
                    log.warning("accept on %s: %s", _where(sock), exc.strerror or exc)
                continue
            conn.setblocking(False)
            self._admit(port, conn, address)

    def _pause(self, port: Port, sock: socket.socket, exc: OSError) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.call_later(ACCEPT_PAUSE, self._resume, port, sock)
        if self._resource_log.due():
            missed = self._resource_log.take_suppressed()
            more = f" ({missed} more pauses since the last line)" if missed else ""
            log.error("out of %s accepting on %s (%s): not accepting for %gs; raise "
                      "LimitNOFILE or lower limits.max_connections%s",
                      "file descriptors" if exc.errno in (errno.EMFILE, errno.ENFILE)
                      else "kernel memory", _where(sock), errno.errorcode.get(exc.errno, "?"),
                      ACCEPT_PAUSE, more)

    def _admit(self, port: Port, conn: socket.socket, address: tuple) -> None:
        """Count a new connection, or refuse it at once."""
        ip, peer_port = peer_address(address[0]), address[1]
        info = SessionInfo(port=port, peer_ip=ip, peer_port=peer_port,
                           session_id=f"{self._prefix}.{next(self._ids)}")
        proxied = port in self.proxy_networks
        if proxied and not is_trusted(ip, self.proxy_networks[port]):
            # Anyone could claim any address in a PROXY header: only our proxies may.
            self._refuse(info, conn, "554 5.7.1 Connections only through the proxy")
            return
        if self.max_open is not None and (
                len(self.sessions) >= self.max_open
                or self.limits.pools[port].total >= self._files_share(port)):
            if self._files_log.due():
                whose = ("" if len(self.sessions) >= self.max_open else
                         f" ({self.limits.pools[port].total} on {port.value}, its share)")
                log.warning("%d connections open%s: at the open-files limit (less a reserve "
                            "for the queue, DNS and delivery); refusing more until some "
                            "close; raise LimitNOFILE", len(self.sessions), whose)
            self._refuse(info, conn, "421 4.7.0 Too many connections, try again later")
            return
        if not self.limits.take_slot(port):
            self._refuse(info, conn, "421 4.7.0 Too many connections, try again later")
            return
        key = None
        if not proxied:
            key = client_key(ip)
            if not self.limits.take_client(port, key):
                self.limits.release_slot(port)
                self._refuse(info, conn, "421 4.7.0 Too many connections from your "
                                         "address, try again later")
                return
        task = asyncio.get_running_loop().create_task(self._serve(info, conn, key, proxied))
        self.sessions[task] = None
        self._crowd = self._crowd or len(self.sessions) >= CROWD

    def _refuse(self, info: SessionInfo, conn: socket.socket, reply: str) -> None:
        """Say why (not on 465: that would take a TLS handshake, what a flood wants) and
        close. No task, no wait: the socket's send buffer is empty."""
        self.backend.events.rejected(info, "CONNECT", reply)
        with contextlib.suppress(OSError):
            if info.port is not Port.SUBMISSION_TLS:
                conn.send(f"{reply}\r\n".encode())
        conn.close()

    # -- one connection --------------------------------------------------------------------

    async def _serve(self, info: SessionInfo, conn: socket.socket, key: str | None,
                     proxied: bool) -> None:
        port = info.port
        task = asyncio.current_task()
        assert task is not None
        started = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        session: Session | None = None
        connected = False
        try:
            if proxied:
                if not await self._read_proxy_header(info, conn):
                    return
                key = client_key(info.peer_ip)
                if not self.limits.take_client(port, key):
                    key = None
                    self._refuse(info, conn, "421 4.7.0 Too many connections from your "
                                             "address, try again later")
                    return
            self.backend.events.connected(info)
            connected = True
            opened = await self._open(info, conn)
            if opened is None:
                return
            reader, writer = opened
            session = Session(self.backend, port, reader, writer, info.session_id,
                              peer=(info.peer_ip, info.peer_port),
                              data_budget=self.data_budget,
                              tls_handshake_timeout=self.tls_handshake_timeout)
            self.sessions[task] = session
            if self._closed:
                session.shutdown()
            await session.run()
        except asyncio.CancelledError:
            # Cut off at shutdown. This task is the connection's top level: ending it
            # quietly keeps asyncio (3.11) from logging the cancellation as an error.
            if writer is not None:
                writer.close()
        finally:
            if writer is None:
                conn.close()
            self.sessions.pop(task, None)
            self.limits.release_slot(port)
            if key is not None:
                self.limits.release_client(port, key)
            if connected:
                # The session's info knows the user it authenticated as, if any.
                self.backend.events.disconnected(session.info if session else info,
                                                 time.monotonic() - started)
            if self._crowd and not self.sessions:
                self._crowd = False
                memory.trim()

    async def _read_proxy_header(self, info: SessionInfo, conn: socket.socket) -> bool:
        """Take the client's address from the PROXY header; False (logged) if none."""
        try:
            header = await read_proxy_header_from_socket(conn, self.proxy_timeout)
        except ProxyError as exc:
            if self._proxy_log.due():
                missed = self._proxy_log.take_suppressed()
                log.warning("session %s: no valid PROXY header from %s (%s), closing%s",
                            info.session_id, info.peer_ip, exc,
                            f"; {missed} more since the last line" if missed else "")
            return False
        if header is not None:  # None: a health check, or UNKNOWN; the proxy itself
            info.peer_ip, info.peer_port = peer_address(header.source_ip), header.source_port
        return True

    async def _open(
        self, info: SessionInfo, conn: socket.socket
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Streams over the connection, after the TLS handshake on 465 (bounded by
        ``tls_handshake_timeout``); None (logged) when the handshake fails."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        writers: list[asyncio.StreamWriter] = []
        # With a callback the protocol is a server's (StreamWriter.start_tls asks), and
        # the callback hands us the writer it makes.
        protocol = asyncio.StreamReaderProtocol(reader, lambda _, w: writers.append(w),
                                                loop=loop)
        context = self.backend.tls_context() if info.port is Port.SUBMISSION_TLS else None
        try:
            await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=context,
                ssl_handshake_timeout=self.tls_handshake_timeout if context else None)
        except (OSError, ssl.SSLError, EOFError) as exc:
            if context is not None:
                log.info("session %s: TLS handshake failed from %s: %s", info.session_id,
                         info.peer_ip, describe_tls_error(exc, self.tls_handshake_timeout))
            return None
        return reader, writers[0]

    # -- stopping ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting new connections. Sessions between transactions are closed with
        421; those in a transaction go on (see drain)."""
        self._closed = True
        loop = asyncio.get_running_loop()
        for _, sock in self.listening:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()  # new clients are refused at once, as asyncio's close did
        for session in self.sessions.values():
            if session is not None:
                session.shutdown()

    async def drain(self, timeout: float) -> None:
        """Wait for sessions in flight, then cut off the rest (each is told 421)."""
        if self.sessions:
            _, pending = await asyncio.wait(list(self.sessions), timeout=timeout)
            if pending:
                log.warning("stopping: %d session(s) still open after %gs cut off",
                            len(pending), timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)


# How the open-files budget is shared by the listener kinds that listen: port 25 half,
# 587 and 465 a quarter each, so strangers' idle connections on one kind (25, or 465
# before its handshake) never take what the users' submissions need on another.
FILES_WEIGHT = {Port.SMTP: 2, Port.SUBMISSION: 1, Port.SUBMISSION_TLS: 1}


def open_files_budget(outbound: int) -> int | None:
    """Connections we may accept before the process runs out of descriptors: the soft
    open-files limit, less ``outbound`` (delivery's connections) and 64 for queue
    files, DNS, the control socket and the rest. None: no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - outbound - 64)


def _where(sock: socket.socket) -> str:
    try:
        host, number = sock.getsockname()[:2]
    except OSError:
        return "?"
    return format_hostport(host, number)
