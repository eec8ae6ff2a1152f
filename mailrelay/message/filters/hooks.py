"""chasquid's hooks: ``hooks/post-data`` and ``hooks/alias-resolve``, with its contract.

The contract is chasquid's (internal/smtpsrv/conn.go runPostDataHook,
internal/aliases/aliases.go runResolveHook, docs/hooks.md), so the hooks a chasquid
owner has, Debian's example ``/etc/chasquid/hooks/post-data`` among them, run unchanged.

post-data, after DATA and before the message is queued:
  - runs in the config directory, the message (as it will be queued, with our Received:)
    on stdin, and this environment only: ``USER``, ``SHELL``, ``PATH`` copied from ours,
    ``PWD`` (the config directory), ``REMOTE_ADDR`` (Go's host:port form, "192.0.2.1:4567"
    or "[2001:db8::1]:4567": the example hook cuts the port off itself), ``EHLO_DOMAIN``
    (only ``a-zA-Z0-9-.[]:`` kept), ``EHLO_DOMAIN_RAW``, ``MAIL_FROM``, ``RCPT_TO``
    (space-separated), ``AUTH_AS`` (user@domain; empty when not authenticated), ``ON_TLS``,
    ``FROM_LOCAL_DOMAIN``, ``SPF_PASS`` (``1``/``0``);
  - exit 0: accept; stdout holds header fields to add at the top. Output that is not
    header fields is ignored and the message accepted, as chasquid does;
  - exit 20: refused for good, ``554`` with the last line of stdout as the text;
  - any other exit, death by a signal: ``451`` with the last line of stdout as the text;
  - chasquid's time limit, one minute, is ``filters.hook_timeout`` here.

alias-resolve, for an address of ours:
  - runs in the config directory with the address as its only argument, our whole
    environment, stdin empty, within 5 seconds (``filters.alias_resolve_timeout``);
  - stdout is one right-hand side of an aliases line: ``a@x, b`` (a target without ``@``
    is in the address's domain) or ``| command``; nothing at all means no alias;
  - a failure (exit not 0, timeout, output that does not parse) fails the resolution.

Where chasquid falls short, mailrelay does better (each place is marked "chasquid:"):
both hooks are killed with their whole process group at the time limit, their output
is capped, a hook that is not executable is not run, and header lines are checked for
being header fields, not just for a ':'.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ...address import AddressError, normalize_domain, parse_ip
from .verdict import FilterInput, Verdict, smtp_reply

if TYPE_CHECKING:
    from ...config import Config, FilterSettings

log = logging.getLogger("mailrelay.filters")

POST_DATA = "post-data"
ALIAS_RESOLVE = "alias-resolve"
DEFAULT_POST_DATA_TIMEOUT = 60.0  # chasquid: 1 minute, fixed
DEFAULT_ALIAS_RESOLVE_TIMEOUT = 5.0  # chasquid: 5 seconds, fixed
# stdout and stderr together. chasquid keeps everything a hook prints in memory.
MAX_OUTPUT = 64 * 1024
EXIT_PERMANENT = 20  # chasquid: exit status 20 is a permanent refusal

REFUSED_CODE = 554  # chasquid's reply code for exit 20
TEMPFAIL_CODE = 451  # chasquid's reply code for every other failure
_STDIN_CHUNK = 256 * 1024
_REAP_WAIT = 5.0  # after SIGKILL, how long to wait for the kernel to finish the process
_MAX_LINE = 998  # RFC 5322 2.1.1


_FIELD = re.compile(rb"[!-9;-~]+:")  # field name (printable ASCII but ':') and colon
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HT
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_EHLO_SAFE = re.compile(r"[^a-zA-Z0-9\-.\[\]:]")


# --- running a hook -------------------------------------------------------------------------


@dataclass
class _Run:
    """How one run of a hook ended."""

    returncode: int | None = None  # negative: killed by that signal (asyncio's convention)
    stdout: bytes = b""
    stderr: bytes = b""
    # Set when it did not end by itself: absent | start | timeout | output-too-large.
    failure: str | None = None
    detail: str = ""


class _Output(asyncio.Protocol):
    """Collects a child's stdout and stderr under one cap; going over it kills the child."""

    def __init__(self, limit: int, on_overflow):
        self.limit = limit
        self.on_overflow = on_overflow
        self.chunks: dict[int, list[bytes]] = {1: [], 2: []}
        self.size = 0
        self.overflow = False
        self.transports: list[asyncio.BaseTransport] = []
        self.open = 0
        self.closed = asyncio.get_running_loop().create_future()

    def stream(self, fd: int) -> _Stream:
        self.open += 1
        return _Stream(self, fd)

    def received(self, fd: int, data: bytes) -> None:
        if self.overflow:
            return
        room = self.limit - self.size
        if len(data) > room:
            self.chunks[fd].append(data[:room])
            self.size = self.limit
            self.overflow = True
            self.on_overflow()
            self.close()
            return
        self.chunks[fd].append(data)
        self.size += len(data)

    def lost(self) -> None:
        self.open -= 1
        if self.open <= 0 and not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()

    def data(self, fd: int) -> bytes:
        return b"".join(self.chunks[fd])


class _Stream(asyncio.Protocol):
    def __init__(self, output: _Output, fd: int):
        self.output, self.fd = output, fd

    def data_received(self, data: bytes) -> None:
        self.output.received(self.fd, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.output.lost()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _abort(writer: asyncio.StreamWriter) -> None:
    if not writer.transport.is_closing():
        writer.transport.abort()


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data`` in slices (no second copy of a large message in the pipe's buffer)."""
    view = memoryview(data)
    try:
        for start in range(0, len(view), _STDIN_CHUNK):
            stdin.write(view[start:start + _STDIN_CHUNK])
            await stdin.drain()
        stdin.close()
    except OSError:
        # The hook did not read all of it (it may not need to): as Go's exec, not an error.
        _abort(stdin)


async def _run(argv: list[str], *, stdin: bytes | None, cwd: Path, env: dict[str, str],
               timeout: float, max_output: int) -> _Run:
    """Run a command in its own process group, bounded in time and output.

    At the time limit, or when stdout and stderr together exceed ``max_output``, the whole
    group is killed (chasquid kills only the hook, and then waits for whatever child it
    left holding the pipe). The child is always reaped: awaited here, or by asyncio's
    child watcher when the caller is cancelled.
    """
    loop = asyncio.get_running_loop()
    result = _Run()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    stdin_mode = asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin_mode, stdout=out_w, stderr=err_w, cwd=cwd, env=env,
            start_new_session=True)
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        absent = exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR)
        result.failure = "absent" if absent else "start"
        result.detail = exc.strerror or str(exc)
        return result
    finally:
        os.close(out_w)
        os.close(err_w)

    def overflow() -> None:
        _kill_group(process.pid)

    output = _Output(max_output, overflow)
    for fd, read_end in ((1, out_r), (2, err_r)):
        transport, _ = await loop.connect_read_pipe(
            # The transport owns the file and closes it.
            lambda fd=fd: output.stream(fd), open(read_end, "rb", buffering=0))  # noqa: SIM115
        output.transports.append(transport)
    feeder = (asyncio.ensure_future(_feed(process.stdin, stdin))
              if stdin is not None and process.stdin is not None else None)
    try:
        async with asyncio.timeout(timeout):
            await process.wait()
            # A child the hook left behind may hold stdout: that counts against the limit.
            await output.closed
    except TimeoutError:
        result.failure = "timeout"
    finally:
        if result.failure or process.returncode is None or output.overflow:
            _kill_group(process.pid)
        output.close()
        if feeder is not None:
            feeder.cancel()
            if process.stdin is not None:
                _abort(process.stdin)
    if process.returncode is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), _REAP_WAIT)
    if output.overflow and result.failure is None:
        result.failure = "output-too-large"
    result.returncode = process.returncode
    result.stdout, result.stderr = output.data(1), output.data(2)
    return result


# --- post-data ------------------------------------------------------------------------------


def go_tcp_addr(host: str, port: int) -> str:
    """``host:port`` as Go's net.TCPAddr.String() writes it (chasquid's REMOTE_ADDR)."""
    zone = host.partition("%")[2]
    ip = parse_ip(host)  # Go prints an IPv4-mapped address as plain IPv4, too
    if ip is None:
        return f"{host}:{port}"
    if isinstance(ip, ipaddress.IPv6Address):
        return f"[{ip}{'%' + zone if zone else ''}]:{port}"
    return f"{ip}:{port}"


def sanitize_ehlo(helo: str) -> str:
    """chasquid's sanitizeEHLODomain: only ``a-zA-Z0-9-.[]:`` kept (shell-safe)."""
    return _EHLO_SAFE.sub("", helo)


def post_data_env(inp: FilterInput, cwd: Path) -> dict[str, str]:
    """The environment chasquid gives the post-data hook, in chasquid's order.

    chasquid copies USER, PWD, SHELL and PATH from its own environment (empty when
    unset). PWD is the config directory here: chasquid's docs and its test t-10-hooks say
    that is what the hook sees, and mailrelay does not chdir into it as chasquid does.
    """
    env = {
        "USER": os.environ.get("USER", ""),
        "PWD": str(cwd),
        "SHELL": os.environ.get("SHELL", ""),
        "PATH": os.environ.get("PATH", ""),
    }
    env.update({
        "REMOTE_ADDR": go_tcp_addr(inp.remote_addr, inp.remote_port),
        "EHLO_DOMAIN": sanitize_ehlo(inp.helo),
        "EHLO_DOMAIN_RAW": inp.helo,
        "MAIL_FROM": inp.mail_from,
        "RCPT_TO": " ".join(inp.rcpt_to),
        "AUTH_AS": inp.auth_as or "",
        "ON_TLS": "1" if inp.on_tls else "0",
        "FROM_LOCAL_DOMAIN": "1" if inp.from_local_domain else "0",
        "SPF_PASS": "1" if inp.spf_pass else "0",
    })
    # execve cannot pass a NUL; nothing the SMTP parser accepts has one, but never fail on it.
    return {name: value.replace("\0", "") for name, value in env.items()}


def header_fields(out: bytes) -> list[bytes] | None:
    """A hook's stdout as CRLF-terminated header fields, or None when it is not fields.

    chasquid's isHeader: empty output is fine; otherwise it must end with a newline, have
    no empty line, and each line must start with a space or tab (a continuation, not
    first) or contain ':'. Here a line must start with a field name and ':' (chasquid
    takes "not a header: really" as a field and breaks the message with it), LF or CRLF
    ends lines, and a line may not hold control characters or exceed 998 octets.
    """
    if not out:
        return []
    if not out.endswith(b"\n"):
        return None
    fields: list[list[bytes]] = []  # each field's lines, joined once at the end (linear)
    for line in out[:-1].split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip(b" \t") or len(line) > _MAX_LINE or _CONTROL.search(line):
            return None
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return None
            fields[-1].append(line)
        elif _FIELD.match(line):
            fields.append([line])
        else:
            return None
    return [b"\r\n".join(lines) + b"\r\n" for lines in fields]


def last_line(out: bytes) -> str:
    """The hook's last line of output, the text of its refusal.

    chasquid takes the last newline-terminated line (an unterminated last line is
    skipped, and "text\\n\\n" gives ""); here it is the last line with text in it.
    """
    text = out.rstrip()
    return text[text.rfind(b"\n") + 1:].decode("utf-8", "replace").strip()


def _stderr_tail(stderr: bytes) -> str:
    line = last_line(stderr)
    return f"; stderr: {_NOT_PRINTABLE.sub('?', line)[:200]}" if line else ""


def _status(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


async def run_post_data(hook: Path, inp: FilterInput, message: bytes, *, cwd: Path,
                        timeout: float = DEFAULT_POST_DATA_TIMEOUT,
                        max_output: int = MAX_OUTPUT) -> Verdict:
    """Run the post-data hook on one message; a missing hook accepts it unchanged.

    Logs one line at most: INFO for a refusal by the hook, WARNING when the hook failed
    (timeout, too much output, a signal, output that is not header fields), DEBUG else.
    """
    run = await _run([os.fspath(hook)], stdin=message, cwd=cwd, env=post_data_env(inp, cwd),
                     timeout=timeout, max_output=max_output)
    where = f"post-data hook {hook}" + (f" ({inp.queue_id})" if inp.queue_id else "")
    if run.failure == "absent":
        # chasquid runs a hook that exists but cannot be executed, and answers 451 to
        # every message; here a hook that cannot be run is no hook.
        log.debug("%s: not run (%s)", where, run.detail)
        return Verdict("accept")
    if run.failure == "start":
        log.warning("%s: cannot start: %s", where, run.detail)
        return Verdict("tempfail", f"{TEMPFAIL_CODE} 4.3.0 Cannot check the message now, "
                       "try again later", error="start")
    if run.failure == "timeout":
        log.warning("%s: no answer within %gs: killed%s", where, timeout,
                    _stderr_tail(run.stderr))
        return Verdict("tempfail", f"{TEMPFAIL_CODE} 4.3.0 Checking the message took too long, "
                       "try again later", error="timeout")
    if run.failure == "output-too-large":
        log.warning("%s: printed more than %d bytes: killed", where, max_output)
        return Verdict("tempfail", f"{TEMPFAIL_CODE} 4.3.0 Cannot check the message now, "
                       "try again later", error="output-too-large")
    text = last_line(run.stdout)
    if run.returncode == 0:
        fields = header_fields(run.stdout)
        if fields is None:
            # chasquid: "Check that output looks like headers, to avoid breaking the email
            # contents. If it does not, just skip it."
            log.warning("%s: exit 0 but its output is not header fields: ignored "
                        "(first line: %r)", where, run.stdout.split(b"\n", 1)[0][:100])
            return Verdict("accept", error="bad-output")
        log.debug("%s: accepted, %d header fields added", where, len(fields))
        return Verdict("accept", headers=fields)
    if run.returncode == EXIT_PERMANENT:
        reply = smtp_reply(REFUSED_CODE, "5.7.1", text, "Message refused by a filter")
        log.info("%s: refused: %s", where, reply)
        return Verdict("reject", reply)
    reply = smtp_reply(TEMPFAIL_CODE, "4.3.0", text, "Cannot accept the message now, "
                       "try again later")
    if run.returncode is not None and run.returncode < 0:
        log.warning("%s: %s: %s%s", where, _status(run.returncode), reply,
                    _stderr_tail(run.stderr))
        return Verdict("tempfail", reply, error="signal")
    log.info("%s: %s, temporary failure: %s%s", where, _status(run.returncode), reply,
             _stderr_tail(run.stderr))
    return Verdict("tempfail", reply)


# --- alias-resolve --------------------------------------------------------------------------

_BAD_ADDRESS_CHARS = re.compile(r'[\s<>()\[\]",;:\\|\x00-\x1f\x7f]')


@dataclass(frozen=True)
class AliasTarget:
    """One target the alias-resolve hook gave: an address, or a command to pipe to.

    ``kind`` uses the values of mailrelay's aliases module ("email", "pipe").
    """

    kind: Literal["email", "pipe"]
    value: str


def parse_alias_output(out: str, address: str) -> list[AliasTarget]:
    """chasquid's parseRHS on the hook's trimmed output; ValueError when it does not parse.

    Forwarding through given servers (``addr via host``) is chasquid's; mailrelay has no
    such thing, so such output is an error rather than a silent misdelivery.
    """
    domain = address.rpartition("@")[2]
    raw = out.strip()
    if not raw:
        return []
    if raw.startswith("|"):
        command = raw[1:].strip()
        if not command:
            raise ValueError("the pipe alias is missing a command")
        if "\n" in command or "\0" in command:
            raise ValueError("a pipe command must be one line")
        return [AliasTarget("pipe", command)]
    targets: list[AliasTarget] = []
    for piece in raw.split(","):
        piece = piece.strip()
        if not piece:
            continue  # chasquid allows "a, b,"
        if " via " in piece:
            raise ValueError(f"{piece!r}: forwarding via servers is not supported")
        if _BAD_ADDRESS_CHARS.search(piece):
            raise ValueError(f"{piece!r} is not an address")
        if "@" not in piece:
            piece = f"{piece}@{domain}"
        local, _, target_domain = piece.rpartition("@")
        if not local or "@" in local or not target_domain:
            raise ValueError(f"{piece!r} is not an address")
        try:
            # Remote local parts keep their case: only the receiving host may fold them.
            piece = f"{local}@{normalize_domain(target_domain)}"
        except AddressError as exc:
            raise ValueError(f"{piece!r}: {exc}") from None
        targets.append(AliasTarget("email", piece))
    return targets


async def run_alias_resolve(hook: Path, address: str, *, cwd: Path,
                            timeout: float = DEFAULT_ALIAS_RESOLVE_TIMEOUT,
                            max_output: int = MAX_OUTPUT) -> list[AliasTarget] | None:
    """The targets the alias-resolve hook gives for ``address``.

    ``[]``: no alias (or no hook). ``None``: the hook failed (exit not 0, signal, timeout,
    too much output, output that does not parse): the caller must not take the address
    as unknown, but answer 451 4.3.0 and let the client retry. chasquid makes a failure
    fail the resolution too, but its RCPT check (Exists) ignores the error and then
    refuses the address as unknown, for good, because a hook had a bad moment.
    One log line at most (WARNING on failure).
    """
    env = dict(os.environ)  # chasquid: its whole environment
    env["PWD"] = str(cwd)
    run = await _run([os.fspath(hook), address.replace("\0", "")], stdin=None, cwd=cwd,
                     env=env, timeout=timeout, max_output=max_output)
    where = f"alias-resolve hook {hook} for {address!r}"
    if run.failure == "absent":
        log.debug("%s: not run (%s)", where, run.detail)
        return []
    if run.failure == "timeout":
        log.warning("%s: no answer within %gs: killed", where, timeout)
        return None
    if run.failure == "output-too-large":
        log.warning("%s: printed more than %d bytes: killed", where, max_output)
        return None
    if run.failure:
        log.warning("%s: cannot start: %s", where, run.detail)
        return None
    if run.returncode != 0:
        log.warning("%s: %s%s", where, _status(run.returncode), _stderr_tail(run.stderr))
        return None
    try:
        targets = parse_alias_output(run.stdout.decode("utf-8"), address)
    except UnicodeDecodeError:
        log.warning("%s: output is not UTF-8", where)
        return None
    except ValueError as exc:
        log.warning("%s: cannot use its output: %s", where, exc)
        return None
    log.debug("%s: %d targets", where, len(targets))
    return targets


# --- one configuration's hooks --------------------------------------------------------------


def find_hook(path: Path) -> Path | None:
    """``path`` if it is an executable file; None (with one log line) if it is not.

    chasquid runs any file that exists ("TODO: check if the file is executable"), so a
    hook without its x bit makes it answer 451 to every message.
    """
    try:
        is_file = path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        if path.exists():
            log.warning("%s is not a file: not run", path)
        return None
    if not os.access(path, os.X_OK):
        log.warning("%s is not executable: not run (chmod +x it to use it)", path)
        return None
    return path


@dataclass
class Hooks:
    """The hooks of one configuration, found once at load (and again at each reload)."""

    cwd: Path  # the config directory: where hooks run, as chasquid runs them
    post_data: Path | None = None
    alias_resolve: Path | None = None
    post_data_timeout: float = DEFAULT_POST_DATA_TIMEOUT
    alias_resolve_timeout: float = DEFAULT_ALIAS_RESOLVE_TIMEOUT
    max_output: int = MAX_OUTPUT
    found: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, config_dir: Path, settings: FilterSettings) -> Hooks:
        hooks_dir = settings.hooks_dir or config_dir / "hooks"
        post_data = find_hook(hooks_dir / POST_DATA)
        alias_resolve = find_hook(hooks_dir / ALIAS_RESOLVE)
        found = [p.name for p in (post_data, alias_resolve) if p is not None]
        if found:
            log.info("hooks: %s in %s", ", ".join(found), hooks_dir)
        return cls(cwd=config_dir, post_data=post_data, alias_resolve=alias_resolve,
                   post_data_timeout=settings.hook_timeout,
                   alias_resolve_timeout=settings.alias_resolve_timeout, found=found)

    @classmethod
    def from_config(cls, config: Config) -> Hooks:
        return cls.load(config.config_dir, config.filters)

    async def check(self, inp: FilterInput, message: bytes) -> Verdict:
        """The post-data hook's verdict (accept when there is none)."""
        if self.post_data is None:
            return Verdict("accept")
        return await run_post_data(self.post_data, inp, message, cwd=self.cwd,
                                   timeout=self.post_data_timeout, max_output=self.max_output)

    async def resolve(self, address: str) -> list[AliasTarget] | None:
        """The alias-resolve hook's targets for ``address`` ([] when there is no hook)."""
        if self.alias_resolve is None:
            return []
        return await run_alias_resolve(self.alias_resolve, address, cwd=self.cwd,
                                       timeout=self.alias_resolve_timeout,
                                       max_output=self.max_output)
