"""Delivery to a command (alias targets ``| command``, the local MDA): the message on stdin.

One command runs per message and recipient, so starting it is on the hot path of local
delivery. asyncio's subprocess support costs a watcher thread per child plus transports
and protocols for each pipe, and holds the GIL while the child starts; here the command
is started by ``spawn`` (which does not), its exit is awaited on a pidfd in the event
loop, and a message that is already in the spool is given to it as its stdin file
directly, so the parent copies no message bytes at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import shlex
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ..spawn import reap_in_background, spawn

EX_TEMPFAIL = 75  # sysexits.h: try again later
STDERR_KEPT = 4096  # bytes of the command's stderr kept for the reply (the tail counts)


@dataclass(frozen=True)
class SpooledMessage:
    """A message stored in a file from ``offset`` to the end (a queue file's body)."""

    path: Path
    offset: int = 0


async def run_pipe(
    command: str, data: bytes | SpooledMessage, *, sender: str, recipient: str,
    timeout: float = 60.0, inline_spawn: bool = False,
) -> tuple[bool | None, str]:
    """(True, reply) delivered; (None, reply) retry later; (False, reply) failed for good.

    ``inline_spawn``: start the command on the event loop's thread (``spawn``'s inline).
    """
    try:
        argv = list(_split(command))
    except ValueError as exc:
        return False, f"554 5.3.5 bad pipe command: {exc}"
    if not argv:
        return False, "554 5.3.5 empty pipe command"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SENDER": sender,
           "RECIPIENT": recipient, "HOME": "/"}
    try:
        child = await _Child.start(argv, env, data, inline_spawn)
    except OSError as exc:
        return None, f"451 4.3.0 cannot run {argv[0]}: {exc.strerror}"
    # A timer that kills the command: cheaper than asyncio.timeout around the wait.
    timer = asyncio.get_running_loop().call_later(timeout, child.time_out)
    try:
        status = await child.wait()
    except BaseException:  # cancelled (server stop): leave no command behind
        child.kill()
        child.reap_in_background()
        raise
    finally:
        timer.cancel()
        child.close()
    if child.timed_out:
        return None, f"451 4.4.7 {argv[0]} did not finish in {timeout:.0f}s"
    detail = " ".join(child.stderr.decode("utf-8", "replace").split())[-200:]
    if status == 0:
        return True, "250 2.0.0 delivered to command"
    if status == EX_TEMPFAIL:
        return None, f"451 4.3.0 {argv[0]} asked to retry (exit 75) {detail}".rstrip()
    if status is None:
        return None, f"451 4.3.0 {argv[0]}: exit status lost"
    if status < 0:
        return None, f"451 4.3.0 {argv[0]} killed by signal {-status} {detail}".rstrip()
    return False, f"554 5.3.0 {argv[0]} failed (exit {status}) {detail}".rstrip()


@functools.lru_cache(maxsize=1024)
def _split(command: str) -> tuple[str, ...]:
    """shlex.split, remembered: the MDA's command line is the same for each mailbox."""
    return tuple(shlex.split(command))


class _Child:
    """A spawned command: its stdin feed, its stderr tail, and its exit status."""

    def __init__(self, pid: int, stderr_fd: int, stdin_fd: int | None, data: bytes):
        self.pid = pid
        self.stderr = b""
        self._loop = asyncio.get_running_loop()
        self._stderr_fd: int | None = stderr_fd
        self._stdin_fd: int | None = stdin_fd
        self._stdin = memoryview(data)
        self._status: int | None = None
        self._reaped = False
        self.timed_out = False
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._pidfd: int | None = None
        os.set_blocking(stderr_fd, False)
        self._loop.add_reader(stderr_fd, self._drain_stderr)
        if stdin_fd is not None:
            os.set_blocking(stdin_fd, False)
            self._write_stdin()
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (old kernel, seccomp): a thread waits
            threading.Thread(target=self._wait_blocking, daemon=True,
                             name=f"pipe-wait-{pid}").start()
        else:
            self._loop.add_reader(self._pidfd, self._on_pidfd)

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str],
                    data: bytes | SpooledMessage, inline_spawn: bool = False) -> _Child:
        fds: list[int] = []
        try:
            err_read, err_write = _pipe(fds)
            stdin_write = None
            if isinstance(data, SpooledMessage):
                stdin_read = _high_fd(os.open(data.path, os.O_RDONLY | os.O_CLOEXEC), fds)
                os.lseek(stdin_read, data.offset, os.SEEK_SET)
                data = b""
            else:
                stdin_read, stdin_write = _pipe(fds)
            pid = await spawn(argv, env, stdin_read, err_write, inline_spawn)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # The child has its copies; ours of its ends would hide EOF from both sides.
        for fd in (stdin_read, err_write):
            os.close(fd)
        return cls(pid, err_read, stdin_write, data)

    async def wait(self) -> int | None:
        """The exit status (negative: killed by that signal; None: reaped by someone else).
        Once a wait is cancelled, the child is only to be killed and reaped in the
        background: the cancellation ends ``_exited`` too."""
        await self._exited
        self._drain_stderr()
        return self._status

    def time_out(self) -> None:
        """Kill it for taking too long; ``wait`` then returns when it is gone."""
        if not self._reaped:  # else it finished in time; only our task had yet to run
            self.timed_out = True
            self.kill()

    def kill(self) -> None:
        if not self._reaped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def reap_in_background(self) -> None:
        # Without a pidfd a thread is waiting for it already.
        if not self._reaped and self._pidfd is not None:
            reap_in_background(self.pid)

    def close(self) -> None:
        if self._stdin_fd is not None:
            self._loop.remove_writer(self._stdin_fd)
            os.close(self._stdin_fd)
            self._stdin_fd = None
        if self._stderr_fd is not None:
            self._loop.remove_reader(self._stderr_fd)
            os.close(self._stderr_fd)
            self._stderr_fd = None
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    # -- event-loop callbacks --------------------------------------------------

    def _on_pidfd(self) -> None:
        self._loop.remove_reader(self._pidfd)  # type: ignore[arg-type]
        self._exit(self._waitpid())  # it has exited: this does not block

    def _wait_blocking(self) -> None:
        status = self._waitpid()
        if not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._exit, status)

    def _waitpid(self) -> int | None:
        try:
            _, raw = os.waitpid(self.pid, 0)
        except ChildProcessError:  # someone else reaped it
            return None
        return os.waitstatus_to_exitcode(raw)

    def _exit(self, status: int | None) -> None:
        self._reaped = True
        self._status = status
        if not self._exited.done():
            self._exited.set_result(None)

    def _write_stdin(self) -> None:
        fd = self._stdin_fd
        assert fd is not None
        try:
            while self._stdin:
                written = os.write(fd, self._stdin)
                self._stdin = self._stdin[written:]
        except BlockingIOError:
            self._loop.add_writer(fd, self._write_stdin)
            return
        except OSError:  # the command stopped reading (EPIPE): its exit status decides
            pass
        self._loop.remove_writer(fd)
        os.close(fd)  # EOF for the command
        self._stdin_fd = None

    def _drain_stderr(self) -> None:
        fd = self._stderr_fd
        if fd is None:
            return
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                self.stderr = (self.stderr + chunk)[-STDERR_KEPT:]
            # EOF: the command (and whatever inherited its stderr) closed it.
            self._loop.remove_reader(fd)


def _pipe(fds: list[int]) -> tuple[int, int]:
    read, write = os.pipe()
    return _high_fd(read, fds), _high_fd(write, fds)


def _high_fd(fd: int, fds: list[int]) -> int:
    """Keep our descriptors off 0-2: a dup2 onto itself would leave close-on-exec set
    (possible when the server runs with a standard stream closed)."""
    if fd < 3:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fd)
        fd = high
    fds.append(fd)
    return fd
