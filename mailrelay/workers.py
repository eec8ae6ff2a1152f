"""SMTP worker processes: the SMTP sessions on other CPU cores, one spool.

Python runs one thread of Python code at a time, so one process uses one core. With
``workers: N`` (``auto``: 1 when there are two or more CPUs) the main process keeps the
queue, delivery, DSNs, the control socket and /metrics, and N child processes serve the
SMTP sessions. The main process binds the listening sockets once and the workers inherit
them, so the kernel hands each new connection to one of them, and a worker that is
restarted finds its ports still open. A worker writes each accepted message into the one
queue directory exactly as the main process would (durably, before its 250), then sends
the queue id to the main process, which takes the item over and delivers it.

The channel is a SOCK_SEQPACKET socket pair (one message per send, in order):

    worker -> main   ready | queued <id> | metrics\\n<exposition>
    main -> worker   count <n> (queued items, for the max_queue_items check) | metrics

SIGHUP (reload) and SIGTERM (stop: finish sessions, then exit) are passed on as signals.
If a worker dies, the main process adopts whatever the worker had queued but not yet
reported (a spool scan) and starts a new one. If the main process dies, its workers are
killed by the kernel (PR_SET_PDEATHSIG), so no worker accepts mail nobody delivers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .errors import ConfigError
from .smtp.listener import bind
from .smtp.session import Port

log = logging.getLogger("mailrelay.workers")

READY_TIMEOUT = 60.0
MAX_MESSAGE = 4 * 1024 * 1024  # a metrics exposition is the largest message
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
BIND_RETRY_TIME = 5.0


@dataclass
class ListeningSocket:
    port: Port
    sock: socket.socket


def channel_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (ours, theirs):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
    ours.setblocking(False)
    return ours, theirs


class Channel:
    """One end of the socket pair, read by the event loop. Messages that do not fit in
    the socket's buffer wait in order until it drains (a report must never be lost)."""

    def __init__(self, sock: socket.socket, on_message: Callable[[bytes], None],
                 on_closed: Callable[[], None]):
        self.sock = sock
        self._on_message = on_message
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self.read_available)
        self._backlog: deque[bytes] = deque()
        self.closed = False

    def send(self, message: bytes) -> bool:
        """False when the other side is gone (the message is dropped)."""
        if self.closed:
            return False
        if not self._backlog:
            try:
                self.sock.send(message)
                return True
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._writable)
            except OSError as exc:
                log.error("worker channel: %s", exc)
                return False
        self._backlog.append(message)
        return True

    def _writable(self) -> None:
        while self._backlog and not self.closed:
            try:
                self.sock.send(self._backlog[0])
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("worker channel: %s", exc)
                self._backlog.clear()
                break
            self._backlog.popleft()
        if not self.closed:
            self._loop.remove_writer(self.sock.fileno())

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every waiting message is in the socket."""
        deadline = self._loop.time() + timeout
        while self._backlog and not self.closed and self._loop.time() < deadline:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
            self.sock.close()

    def read_available(self) -> None:
        """Handle every message waiting in the socket (the loop calls this when readable)."""
        while not self.closed:
            try:
                message = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self.close()
                self._on_closed()
                return
            try:
                self._on_message(message)
            except Exception:
                log.exception("worker channel: cannot handle %r", message[:60])


# -- the main process's side ---------------------------------------------------------------


class _Worker:
    def __init__(self, number: int):
        self.number = number
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready: asyncio.Future[None] | None = None
        self.metrics: asyncio.Future[bytes] | None = None


class WorkerPool:
    """Starts, watches and stops the SMTP worker processes of the main process."""

    def __init__(self, config_dir: Path, count: int, sockets: list[ListeningSocket],
                 on_queued: Callable[[str], None], on_lost: Callable[[int], None]):
        self.config_dir = config_dir
        self.sockets = sockets
        self.on_queued = on_queued
        self.on_lost = on_lost
        self.workers = [_Worker(n) for n in range(count)]
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._metrics_lock = asyncio.Lock()

    async def start(self) -> None:
        """All workers started and serving, or ConfigError (and none left running)."""
        try:
            for worker in self.workers:
                await self._spawn(worker)
            await asyncio.gather(*(self._wait_ready(w) for w in self.workers))
        except BaseException:
            await self.stop(grace=0)
            raise
        for worker in self.workers:
            self._watchers.append(asyncio.create_task(self._watch(worker),
                                                      name=f"smtp-worker-{worker.number}"))

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = channel_pair()
        loop = asyncio.get_running_loop()
        worker.ready = loop.create_future()
        worker.channel = Channel(ours, lambda m, w=worker: self._message(w, m),
                                 lambda: None)
        command = [sys.executable, "-m", "mailrelay.workers", "--config", str(self.config_dir),
                   "--channel", str(theirs.fileno()), "--parent", str(os.getpid()),
                   "--log-level", str(logging.getLogger().getEffectiveLevel())]
        for listening in self.sockets:
            command += ["--listen", f"{listening.port.value}:{listening.sock.fileno()}"]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, env=env,
                pass_fds=[theirs.fileno(), *(s.sock.fileno() for s in self.sockets)])
        finally:
            theirs.close()
        log.debug("smtp worker %d started (pid %d)", worker.number, worker.process.pid)

    async def _wait_ready(self, worker: _Worker) -> None:
        assert worker.process is not None and worker.ready is not None
        exited = asyncio.ensure_future(worker.process.wait())
        try:
            done, _ = await asyncio.wait([worker.ready, exited], timeout=READY_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if worker.ready not in done:
            code = worker.process.returncode
            raise ConfigError(f"SMTP worker {worker.number} did not start"
                              + (f" (exit status {code}; see its error above)"
                                 if code is not None else " in time"))

    def _message(self, worker: _Worker, message: bytes) -> None:
        kind, _, rest = message.partition(b" " if not message.startswith(b"metrics") else b"\n")
        if kind == b"queued":
            self.on_queued(rest.decode("ascii", "replace"))
        elif kind == b"ready":
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == b"metrics":
            if worker.metrics is not None and not worker.metrics.done():
                worker.metrics.set_result(rest)
        else:
            log.warning("smtp worker %d: unknown message %r", worker.number, message[:40])

    async def _watch(self, worker: _Worker) -> None:
        """Restart a worker that died (its queued mail is adopted first)."""
        restarts = 0
        while True:
            assert worker.process is not None
            pid = worker.process.pid
            started = time.monotonic()
            code = await worker.process.wait()
            if worker.channel is not None:
                # Reports still in the socket arrive before the spool scan.
                worker.channel.read_available()
                worker.channel.close()
            if self._stopping:
                return
            log.error("smtp worker %d (pid %d) exited with status %s; restarting it",
                      worker.number, pid, code)
            self.on_lost(pid)
            if time.monotonic() - started > 60:
                restarts = 0
            await asyncio.sleep(RESTART_DELAYS[min(restarts, len(RESTART_DELAYS) - 1)])
            restarts += 1
            if self._stopping:
                return
            try:
                await self._spawn(worker)
                await self._wait_ready(worker)
            except (ConfigError, OSError) as exc:
                log.error("smtp worker %d: %s", worker.number, exc)
                if worker.process is None or worker.process.returncode is None:
                    self._kill(worker)

    def send_all(self, message: bytes) -> None:
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(message)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _kill(self, worker: _Worker) -> None:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    async def metrics(self, timeout: float = 5.0) -> list[bytes]:
        """Every live worker's metrics exposition."""
        async with self._metrics_lock:
            loop = asyncio.get_running_loop()
            asked = []
            for worker in self.workers:
                if worker.channel is not None and not worker.channel.closed:
                    worker.metrics = loop.create_future()
                    if worker.channel.send(b"metrics"):
                        asked.append(worker.metrics)
            if not asked:
                return []
            done, pending = await asyncio.wait(asked, timeout=timeout)
            for future in pending:
                future.cancel()
            return [future.result() for future in done]

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers
                if w.process is not None and w.process.returncode is None]

    async def stop(self, grace: float) -> None:
        """Workers stop accepting, finish their sessions (up to ``grace``) and exit; the
        main process goes on taking their reports meanwhile."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        running = [w.process for w in self.workers
                   if w.process is not None and w.process.returncode is None]
        if running:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running], timeout=grace + 10)
            if pending:
                for worker in self.workers:
                    self._kill(worker)
                await asyncio.wait(pending, timeout=5)
        for task in self._watchers:
            task.cancel()
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.read_available()  # the last reports
                worker.channel.close()


async def bind_listeners(config: Config) -> list[ListeningSocket]:
    """Every configured address, bound and listening (ConfigError naming the one that
    cannot be). An address in use is tried again for a few seconds: after a crash of the
    main process, its workers may hold the sockets for a moment longer."""
    listen = config.listen
    addresses = [(port, host, number)
                 for port, pairs in ((Port.SMTP, listen.smtp), (Port.SUBMISSION, listen.submission),
                                     (Port.SUBMISSION_TLS, listen.submission_tls))
                 for host, number in pairs]
    bound: list[ListeningSocket] = []
    deadline = time.monotonic() + BIND_RETRY_TIME
    for port, host, number in addresses:
        while True:
            try:
                bound.append(ListeningSocket(port, bind(host, number)))
                break
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    continue
                for listening in bound:
                    listening.sock.close()
                raise ConfigError(f"cannot listen on {host}:{number}: {exc.strerror}") from None
    return bound


# -- the worker's side -------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request was in place
        os._exit(1)


async def run_worker(config_dir: Path, channel_fd: int,
                     listening: list[ListeningSocket]) -> int:
    from .config import load_config
    from .server import SHUTDOWN_GRACE, WorkerServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sock = socket.socket(fileno=channel_fd)
    sock.setblocking(False)
    server: WorkerServer | None = None

    def on_message(message: bytes) -> None:
        if message.startswith(b"count "):
            if server is not None:
                server.queue.reported_count = int(message[6:])
        elif message == b"metrics":
            if server is not None:
                channel.send(b"metrics\n" + server.metrics_exposition())
        else:
            log.warning("unknown message from the main process: %r", message[:40])

    def on_closed() -> None:
        log.error("the main process is gone; stopping")
        stop.set()

    channel = Channel(sock, on_message, on_closed)
    server = WorkerServer(load_config(config_dir), channel)
    await server.start_worker(listening)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    channel.send(b"ready")
    await stop.wait()
    await server.stop(grace=0 if channel.closed else SHUTDOWN_GRACE)
    await channel.drain()  # the last reports
    channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailrelay.workers",
                                     description="an SMTP worker of `mailrelay serve`")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--listen", action="append", default=[], metavar="PORT:FD")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    from .cli.serve import configure_logging

    configure_logging(args.log_level)
    listening = []
    for value in args.listen:
        kind, _, fd = value.partition(":")
        listening.append(ListeningSocket(Port(kind), socket.socket(fileno=int(fd))))
    try:
        return asyncio.run(run_worker(args.config, args.channel, listening))
    except ConfigError as exc:
        log.error("smtp worker: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
