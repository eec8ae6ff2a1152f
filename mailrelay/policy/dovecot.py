"""Client for dovecot's auth service: does a user exist, is a password right.

chasquid's ``dovecot_auth`` (internal/dovecot/dovecot.go), spoken the same way so a
dovecot set up for chasquid serves mailrelay unchanged:

- **userdb socket** (``auth-userdb``, dovecot's master protocol): the server greets with
  ``VERSION 1 x`` and ``SPID pid``; we send ``VERSION 1 1`` and ``USER 1 <user>
  service=smtp``; the answer is ``USER 1 …`` (exists), ``NOTFOUND 1`` (does not) or
  ``FAIL 1 …`` (dovecot could not tell).
- **client socket** (``auth-client``, the auth client protocol): we send ``VERSION 1 1``
  and ``CPID <our pid>``, read the server's handshake up to ``DONE``, then ``AUTH 1 PLAIN
  service=smtp secured no-penalty nologin resp=<base64>``; the answer is ``OK 1 …``
  (right), ``FAIL 1 …`` (wrong; with ``temp`` or ``code=temp_fail``: dovecot could not
  tell). ``CONT`` cannot happen for PLAIN with an initial response and is an error.

Fields are separated by TAB and lines end with LF, so a user name with whitespace or
control characters could add fields: such a name is refused (chasquid refuses spaces
too), and so is a password with NUL, TAB, CR or LF (the password travels base64-encoded,
but NUL would split PLAIN's fields). ``secured`` is sent because mailrelay offers AUTH
only over TLS; ``no-penalty`` because mailrelay has its own login throttle.

Socket paths left unset are found like chasquid does: the first of
``DEFAULT_USERDB_PATHS`` / ``DEFAULT_CLIENT_PATHS`` that accepts a connection, then kept.

Every exchange is bounded: one timeout covers connect, handshake and answer; lines are
at most ``MAX_LINE`` bytes (dovecot's own limit) and at most ``MAX_LINES`` are read. Any
failure (no socket, refused, timeout, a broken answer) is one warning log line and the
result ``None``: the caller answers with a temporary error. Passwords are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from ..address import parse_ip

log = logging.getLogger("mailrelay.dovecot")

DEFAULT_TIMEOUT = 5.0
# dovecot's AUTH_CLIENT_MAX_LINE_LENGTH; no line it sends us is longer.
MAX_LINE = 16384
# The client handshake is VERSION, MECH (one per mechanism), SPID, CUID, COOKIE, DONE.
MAX_LINES = 64
MAX_USER_BYTES = 512
MAX_PASSWORD_BYTES = 1024

DEFAULT_USERDB_PATHS: tuple[str, ...] = (
    "/var/run/dovecot/auth-chasquid-userdb",
    "/var/run/dovecot/auth-userdb",
)
DEFAULT_CLIENT_PATHS: tuple[str, ...] = (
    "/var/run/dovecot/auth-chasquid-client",
    "/var/run/dovecot/auth-client",
)

_REQUEST_ID = "1"  # one request per connection


class DovecotError(Exception):
    """dovecot could not be asked or gave no usable answer (the message says why)."""


def safe_user(user: str) -> bool:
    """A user name that cannot add fields or lines to the protocol (and is not absurd)."""
    if not user or len(user.encode("utf-8", "surrogatepass")) > MAX_USER_BYTES:
        return False
    return not any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs") for ch in user)


def safe_password(password: str) -> bool:
    if not password or len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        return False
    if any(unicodedata.category(ch) == "Cs" for ch in password):
        return False
    return not any(ch in password for ch in "\0\t\r\n")


class _Connection:
    """One unix-socket exchange with a budget of lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.lines_left = MAX_LINES

    async def readline(self) -> list[str]:
        """The next line, split at TAB."""
        if self.lines_left <= 0:
            raise DovecotError(f"more than {MAX_LINES} lines without the expected answer")
        self.lines_left -= 1
        try:
            raw = await self.reader.readline()
        except ValueError:  # asyncio's limit: the line is longer than MAX_LINE
            raise DovecotError(f"a line longer than {MAX_LINE} bytes") from None
        if not raw.endswith(b"\n"):
            raise DovecotError("connection closed" if not raw else "connection closed mid-line")
        return raw[:-1].decode("utf-8", "replace").split("\t")

    async def send(self, text: str) -> None:
        self.writer.write(text.encode("utf-8"))
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def _describe(fields: list[str]) -> str:
    """A short, printable rendering of an unexpected line for the log."""
    text = "\\t".join(fields)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


def _reason(fields: list[str]) -> str:
    """``: <reason>`` from a FAIL line's ``reason=`` field, when it has one."""
    for field in fields[2:]:
        if field.startswith("reason="):
            return ": " + _describe([field[len("reason="):]])
    return ""


class DovecotAuth:
    """Asks dovecot's auth sockets whether a user exists and whether a password is right.

    ``userdb_path`` / ``client_path``: the ``auth-userdb`` and ``auth-client`` unix
    sockets; ``None`` finds them among ``userdb_candidates`` / ``client_candidates``.
    Each call opens its own connection and never blocks the event loop.
    """

    def __init__(
        self,
        userdb_path: str | os.PathLike[str] | None = None,
        client_path: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        userdb_candidates: Sequence[str] = DEFAULT_USERDB_PATHS,
        client_candidates: Sequence[str] = DEFAULT_CLIENT_PATHS,
    ):
        self.userdb_path = str(userdb_path) if userdb_path is not None else None
        self.client_path = str(client_path) if client_path is not None else None
        self.timeout = timeout
        self.userdb_candidates = tuple(userdb_candidates)
        self.client_candidates = tuple(client_candidates)

    def __repr__(self) -> str:
        return f"DovecotAuth(userdb={self.userdb_path!r}, client={self.client_path!r})"

    # -- the two questions ---------------------------------------------------------------

    async def exists(self, user: str) -> bool | None:
        """True: dovecot knows ``user``; False: it does not; None: dovecot unavailable."""
        if not safe_user(user):
            log.warning("dovecot: not asking about a user name with spaces or control "
                        "characters (%d characters)", len(user))
            return False
        return await self._ask("userdb", self._userdb, lambda conn: self._exists(conn, user))

    async def authenticate(
        self, user: str, password: str, *, remote_ip: str | None = None
    ) -> bool | None:
        """True: the password is right; False: it is not; None: dovecot unavailable.

        ``remote_ip``, when given, is passed as ``rip=`` so dovecot's log shows the client.
        """
        if not safe_user(user) or not safe_password(password):
            log.warning("dovecot: refusing a user name or password with spaces or control "
                        "characters, or too long (not sent to dovecot)")
            return False
        address = parse_ip(remote_ip) if remote_ip is not None else None
        rip = f"rip={address}\t" if address is not None else ""
        return await self._ask("auth-client", self._client,
                               lambda conn: self._authenticate(conn, user, password, rip))

    async def _ask(
        self,
        socket_name: str,
        find: Callable[[], Awaitable[str]],
        question: Callable[[_Connection], Awaitable[bool]],
    ) -> bool | None:
        """One question on a fresh connection to one socket, under the timeout; None (and
        one warning naming the socket) when dovecot cannot answer it."""
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._connect(await find())
                try:
                    return await question(conn)
                finally:
                    conn.close()
        except TimeoutError:
            reason = f"no answer within {self.timeout:g}s"
        except DovecotError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        path = self.userdb_path if socket_name == "userdb" else self.client_path
        log.warning("dovecot %s %s: %s", socket_name, path or "(not found)", reason)
        return None

    async def check(self) -> str | None:
        """At start: None when both sockets accept connections, else what is wrong."""
        path = "dovecot"
        try:
            async with asyncio.timeout(self.timeout):
                for find in (self._userdb, self._client):
                    path = await find()
                    (await self._connect(path)).close()
        except TimeoutError:
            return f"{path}: no answer within {self.timeout:g}s"
        except DovecotError as exc:
            return str(exc)
        except OSError as exc:
            return f"{path}: {exc.strerror or type(exc).__name__}"
        return None

    # -- protocol ------------------------------------------------------------------------

    async def _exists(self, conn: _Connection, user: str) -> bool:
        fields = await conn.readline()
        if fields[0] != "VERSION" or len(fields) < 2 or fields[1] != "1":
            raise DovecotError(f"unexpected greeting {_describe(fields)}")
        fields = await conn.readline()
        if fields[0] != "SPID":
            raise DovecotError(f"unexpected greeting {_describe(fields)}")
        await conn.send(f"VERSION\t1\t1\nUSER\t{_REQUEST_ID}\t{user}\tservice=smtp\n")
        fields = await conn.readline()
        if len(fields) >= 2 and fields[1] == _REQUEST_ID:
            if fields[0] == "USER":
                return True
            if fields[0] == "NOTFOUND":
                return False
            if fields[0] == "FAIL":
                raise DovecotError(f"lookup failed{_reason(fields)} (dovecot's log says more)")
        raise DovecotError(f"unexpected answer {_describe(fields)}")

    async def _authenticate(
        self, conn: _Connection, user: str, password: str, rip: str
    ) -> bool:
        await conn.send(f"VERSION\t1\t1\nCPID\t{os.getpid()}\n")
        fields = await conn.readline()
        if fields[0] != "VERSION" or len(fields) < 2 or fields[1] != "1":
            raise DovecotError(f"unexpected greeting {_describe(fields)}")
        while fields != ["DONE"]:
            fields = await conn.readline()
        # PLAIN (RFC 4616): authorization id, authentication id, password.
        plain = base64.b64encode(f"{user}\0{user}\0{password}".encode()).decode("ascii")
        await conn.send(f"AUTH\t{_REQUEST_ID}\tPLAIN\tservice=smtp\tsecured\tno-penalty\t"
                        f"nologin\t{rip}resp={plain}\n")
        fields = await conn.readline()
        if len(fields) >= 2 and fields[1] == _REQUEST_ID:
            if fields[0] == "OK":
                return True
            if fields[0] == "FAIL":
                if "temp" in fields[2:] or "code=temp_fail" in fields[2:]:
                    raise DovecotError(f"could not check the password{_reason(fields)} "
                                       "(dovecot's log says more)")
                return False
            if fields[0] == "CONT":
                raise DovecotError("asked to continue a PLAIN exchange (CONT)")
        raise DovecotError(f"unexpected answer {_describe(fields)}")

    # -- sockets -------------------------------------------------------------------------

    async def _connect(self, path: str) -> _Connection:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE + 1)
        return _Connection(reader, writer)

    async def _userdb(self) -> str:
        if self.userdb_path is None:
            self.userdb_path = await self._find(self.userdb_candidates)
            if self.userdb_path is None:
                raise DovecotError("no userdb socket found (tried "
                                   f"{', '.join(self.userdb_candidates) or 'nothing'}; "
                                   "set auth.dovecot_userdb_path)")
        return self.userdb_path

    async def _client(self) -> str:
        if self.client_path is None:
            self.client_path = await self._find(self.client_candidates)
            if self.client_path is None:
                raise DovecotError("no auth-client socket found (tried "
                                   f"{', '.join(self.client_candidates) or 'nothing'}; "
                                   "set auth.dovecot_client_path)")
        return self.client_path

    async def _find(self, candidates: Sequence[str]) -> str | None:
        """The first candidate that accepts a connection (chasquid's autodetection)."""
        for path in candidates:
            if not Path(path).exists():
                continue
            try:
                (await self._connect(path)).close()
            except OSError:
                continue
            return path
        return None
