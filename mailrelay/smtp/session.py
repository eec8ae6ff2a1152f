"""One SMTP session: the command state machine (RFC 5321) with ESMTP extensions.

Policy (who may relay, which recipients exist, what happens to the message) lives in the
``Backend``; the session only speaks the protocol. Every reply carries an enhanced status
code (RFC 3463). Nothing a client sends can raise out of here: unexpected errors become a
``451 4.3.0`` reply and a log line, never a traceback on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from .parse import Path, SyntaxErrorReply, decode_xtext, parse_path, split_command
from .stream import (
    NO_MEMORY,
    NUL,
    ClientGone,
    ClientTimeout,
    DataBudget,
    DataTimeout,
    LineTooLong,
    Reservation,
    SMTPStream,
)

if TYPE_CHECKING:
    from ..ops.events import Events

log = logging.getLogger("mailrelay.smtp")

COMMAND_LINE_LIMIT = 1000  # RFC 5321 4.5.3.1.4 (512), raised for long AUTH lines
AUTH_LINE_LIMIT = 12288  # RFC 4954 4: at least 12288 octets for AUTH responses
# Verbs of other protocols: a browser or proxy talking to us (ALPACA) gets no reply at all.
FOREIGN_VERBS = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE",
                           "USER", "PASS"})
# Refusals of these go to the mail log (the others are protocol chatter).
LOGGED_REFUSALS = frozenset({"MAIL", "RCPT", "DATA"})
# Commands that move no mail (Postfix's smtpd_junk_command_limit, with its default): past
# JUNK_LIMIT of them since the last accepted message, each counts as an error, so a client
# cannot hold a session open forever with one NOOP per command_timeout.
JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "HELO", "EHLO"})
JUNK_LIMIT = 100
RCPT_OVERSHOOT = 1000  # RCPTs past max_recipients before each counts as an error
TLS_HANDSHAKE_TIMEOUT = 30.0
STORAGE_REPLY = "452 4.3.1 Insufficient system storage, try again later"
# DATA is refused at once (before 354) with less room than this in the in-flight budget.
DATA_ROOM = 64 * 1024


class Port(Enum):
    SMTP = "smtp"  # port 25: inbound mail for our domains
    SUBMISSION = "submission"  # 587: STARTTLS then AUTH required
    SUBMISSION_TLS = "submission_tls"  # 465: implicit TLS, AUTH required

    @property
    def requires_auth(self) -> bool:
        return self is not Port.SMTP


@dataclass
class Envelope:
    sender: str | None = None
    sender_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)
    recipient_params: list[dict[str, str | None]] = field(default_factory=list)
    smtputf8: bool = False
    # The backend's notes on recipients found at RCPT (the alias-resolve hook's targets),
    # for the routing of this transaction's message.
    alias_targets: dict[str, list] = field(default_factory=dict)


@dataclass
class SessionInfo:
    """What the backend may consult about the session."""

    port: Port
    peer_ip: str
    peer_port: int
    helo: str = ""
    esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    user: str | None = None  # authenticated address
    session_id: str = ""
    # Keyed digests of credentials that failed in this session: the same wrong password
    # tried again (smtplib tries PLAIN, then LOGIN) is not counted twice.
    failed_logins: set[bytes] = field(default_factory=set)

    @property
    def tls(self) -> bool:
        return self.tls_version is not None


class Backend(Protocol):
    hostname: str
    max_message_size: int
    max_recipients: int
    command_timeout: float
    max_errors: int
    events: Events
    # Optional: data_timeout (seconds for a whole DATA payload), primary_domain (where
    # RCPT TO:<postmaster> without a domain goes, RFC 5321 4.5.1).

    def tls_context(self) -> ssl.SSLContext | None: ...

    async def authenticate(self, info: SessionInfo, username: str, password: str) -> str:
        """The reply for an AUTH attempt; on success sets ``info.user``."""
        ...

    async def check_sender(self, info: SessionInfo, path: Path) -> str | None:
        """None to accept MAIL FROM, else the refusal reply."""
        ...

    async def check_recipient(
        self, info: SessionInfo, envelope: Envelope, address: str
    ) -> str | None:
        """None to accept RCPT TO, else the refusal reply."""
        ...

    async def accept_message(self, info: SessionInfo, envelope: Envelope, body: bytes) -> str:
        """Store the message durably and return the final reply (250 only once it is on disk)."""
        ...


class CloseSession(Exception):
    """End the session after sending ``reply`` (if any)."""

    def __init__(self, reply: str | None = None):
        super().__init__(reply)
        self.reply = reply


class Session:
    """One client connection, from the greeting to the close: reads commands, answers
    them, and asks the ``Backend`` for every decision of policy."""

    def __init__(
        self,
        backend: Backend,
        port: Port,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session_id: str,
        *,
        peer: tuple[str, int] | None = None,
        data_budget: DataBudget | None = None,
        tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
    ):
        """``peer``: the client (from a PROXY header), else the socket's peer."""
        self.backend = backend
        self.stream = SMTPStream(reader, backend.command_timeout)
        self.writer = writer
        peer = peer or writer.get_extra_info("peername") or ("?", 0)
        self.info = SessionInfo(port=port, peer_ip=peer[0], peer_port=peer[1],
                                session_id=session_id)
        self.data_budget = data_budget
        self.tls_handshake_timeout = tls_handshake_timeout
        self._transport_gone = False  # a failed STARTTLS handshake dropped the connection
        self.envelope = Envelope()
        self.errors = 0
        self.junk = 0  # JUNK_VERBS since the last accepted message
        self._overshoot = 0  # RCPTs refused for max_recipients in this session
        self.events = backend.events
        # The command being answered, and the addresses it is about, for the mail log.
        self._verb = ""
        self._about_from: str | None = None
        self._about_to: list[str] = []
        # Shutdown: a session waiting for its next command outside a transaction is told
        # 421 and closed at once; one inside a transaction may finish it first.
        self._shutdown = False
        self._idle = False
        self._note_tls()

    # -- plumbing -------------------------------------------------------------

    def _note_tls(self) -> None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.info.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.info.tls_cipher = cipher[0] if cipher else None
            self.events.tls_established(self.info)

    def send(self, reply: str | list[str]) -> None:
        """Queue a reply; it is flushed before we wait for more input (pipelining)."""
        lines = [reply] if isinstance(reply, str) else reply
        out = []
        for i, line in enumerate(lines):
            code, text = line[:3], line[4:]
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{text}\r\n")
        self.writer.write("".join(out).encode("utf-8", "replace"))
        self.events.reply(lines[-1][:3])
        if lines[-1][:1] in "45":
            self._count_error(lines[-1])
            if self._verb in LOGGED_REFUSALS:
                self.events.rejected(self.info, self._verb, lines[-1], self._about_from,
                                     self._about_to)

    def _count_error(self, reply: str) -> None:
        # Transient replies caused by us (queue trouble) do not count against the client.
        if reply.startswith(("421", "451", "452", "454")):
            return
        self.errors += 1

    async def flush(self) -> None:
        """Wait until the client has taken our replies, at most ``command_timeout``: one
        that sends and never reads must not hold its session (and slot) forever."""
        try:
            async with asyncio.timeout(self.stream.idle_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise ClientTimeout() from None

    def shutdown(self) -> None:
        """The server is stopping (RFC 5321 3.8: 421 is allowed at any time)."""
        self._shutdown = True
        if self._idle:
            # Waiting for a command, with every reply sent: say goodbye and close; the
            # read then ends (ClientGone) and the session with it.
            self.send(self._closing_reply())
            self.writer.close()

    def _closing_reply(self) -> str:
        return f"421 4.3.2 {self.backend.hostname} Service shutting down, closing"

    async def read_line(self, limit: int = COMMAND_LINE_LIMIT, command: bool = False) -> bytes:
        """One line; ``command``: the next command, where a shutdown may interrupt us."""
        idle = command and self.envelope.sender is None
        if idle and self._shutdown:
            raise CloseSession(self._closing_reply())
        if not self.stream.has_buffered_input():
            await self.flush()
        self._idle = idle
        try:
            return await self.stream.readline(limit)
        finally:
            self._idle = False

    # -- main loop ------------------------------------------------------------

    async def run(self) -> None:
        try:
            self.send(f"220 {self.backend.hostname} ESMTP mailrelay")
            while True:
                if self.errors >= self.backend.max_errors:
                    raise CloseSession("421 4.7.0 Too many errors, closing")
                try:
                    raw = await self.read_line(command=True)
                except LineTooLong:
                    self.send("500 5.5.2 Line too long")
                    continue
                await self.handle_line(raw)
        except CloseSession as close:
            if close.reply:
                self.send(close.reply)
        except ClientTimeout:
            self.send(f"421 4.4.2 {self.backend.hostname} Timeout, closing")
        except DataTimeout:
            log.info("session %s: DATA from %s not complete within %gs, closing",
                     self.info.session_id, self.info.peer_ip, self._data_timeout())
            self.send(f"421 4.4.2 {self.backend.hostname} DATA took too long, closing")
        except (ClientGone, ConnectionError, ssl.SSLError):
            pass
        except Exception:
            log.exception("session %s: internal error", self.info.session_id)
            self.send("421 4.3.0 Internal error, closing")
        except asyncio.CancelledError:
            if self._shutdown:  # cut off at the end of the stop's grace: say so (RFC 5321 3.8)
                with contextlib.suppress(Exception):
                    self.send(self._closing_reply())
            raise
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._transport_gone:
            return
        # With nothing left to send and no TLS close to exchange, the socket closes on the
        # loop's next turn: bounding the waits (a task and a timer each) buys nothing.
        bounded = (self.writer.transport.get_write_buffer_size() > 0
                   or self.writer.get_extra_info("ssl_object") is not None)
        if bounded:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.writer.drain(), 5)
        self.writer.close()
        try:
            closed = self.writer.wait_closed()
            await (asyncio.wait_for(closed, 5) if bounded else closed)
        except TimeoutError:
            # A client that does not read keeps our replies unsent, and asyncio keeps the
            # socket until they are: drop it, or its descriptor outlives the session.
            self.writer.transport.abort()
        except (Exception, asyncio.CancelledError):
            pass

    async def handle_line(self, raw: bytes) -> None:
        if b"\x00" in raw:
            self.send("500 5.5.2 NUL character not allowed")
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.send("500 5.5.2 Invalid UTF-8 in command")
            return
        verb, arg = split_command(line)
        self.events.command(verb)
        if verb in FOREIGN_VERBS:
            log.info("session %s: %s from %s, closing", self.info.session_id, verb,
                     self.info.peer_ip)
            raise CloseSession(None)
        handler = getattr(self, f"cmd_{verb}", None) if verb.isalpha() else None
        if handler is None:
            self.send("500 5.5.1 Command unrecognized")
            return
        self._verb = verb
        if verb in JUNK_VERBS:
            self.junk += 1
            if self.junk > JUNK_LIMIT:
                self.errors += 1
        try:
            await handler(arg)
        except SyntaxErrorReply as exc:
            self.send(exc.reply)
        finally:
            self._verb, self._about_from, self._about_to = "", None, []

    # -- commands -------------------------------------------------------------

    def _require_helo(self) -> bool:
        if not self.info.helo:
            self.send("503 5.5.1 Send HELO/EHLO first")
            return False
        return True

    async def cmd_HELO(self, arg: str) -> None:
        await self._greet(arg, esmtp=False)

    async def cmd_EHLO(self, arg: str) -> None:
        await self._greet(arg, esmtp=True)

    async def _greet(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg or not arg.isprintable():
            self.send(f"501 5.5.4 Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        self.info.helo = arg
        self.info.esmtp = esmtp
        self.envelope = Envelope()
        if not esmtp:
            self.send(f"250 {self.backend.hostname}")
            return
        lines = [
            f"250 {self.backend.hostname}",
            "250 PIPELINING",
            f"250 SIZE {self.backend.max_message_size}",
            "250 8BITMIME",
            "250 SMTPUTF8",
            "250 ENHANCEDSTATUSCODES",
            "250 DSN",
        ]
        if not self.info.tls and self.backend.tls_context() is not None:
            lines.append("250 STARTTLS")
        if self.info.tls and self.info.port.requires_auth:
            lines.append("250 AUTH PLAIN LOGIN")
        self.send(lines)

    async def cmd_NOOP(self, arg: str) -> None:
        self.send("250 2.0.0 Ok")

    async def cmd_RSET(self, arg: str) -> None:
        self.envelope = Envelope()
        self.send("250 2.0.0 Ok")

    async def cmd_QUIT(self, arg: str) -> None:
        raise CloseSession("221 2.0.0 Bye")

    async def cmd_VRFY(self, arg: str) -> None:
        self.send("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    async def cmd_EXPN(self, arg: str) -> None:
        self.send("502 5.5.1 EXPN not available")

    async def cmd_HELP(self, arg: str) -> None:
        self.send("214 2.0.0 See RFC 5321")

    async def cmd_STARTTLS(self, arg: str) -> None:
        context = self.backend.tls_context()
        if arg:
            self.send("501 5.5.4 Syntax: STARTTLS")
            return
        if self.info.tls:
            self.send("503 5.5.1 TLS already active")
            return
        if context is None:
            self.send("454 4.7.0 TLS not available")
            return
        if self.stream.has_buffered_input():
            # Commands pipelined behind STARTTLS would run with TLS credit (CVE-2011-0411).
            raise CloseSession("554 5.5.1 Pipelining not allowed after STARTTLS")
        self.send("220 2.0.0 Ready to start TLS")
        await self.flush()
        try:
            await self.writer.start_tls(context,
                                        ssl_handshake_timeout=self.tls_handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError, EOFError) as exc:
            log.info("session %s: TLS handshake failed from %s: %s", self.info.session_id,
                     self.info.peer_ip, describe_tls_error(exc, self.tls_handshake_timeout))
            # The socket now belongs to the TLS layer that failed: the stream's own close
            # would never be reported (wait_closed hung until shutdown, and the session kept
            # its connection slot), so it is dropped here and not waited for.
            self.writer.transport.abort()
            self._transport_gone = True
            raise ClientGone() from None
        # RFC 3207 4.2: forget everything learned before TLS.
        self.stream.discard_buffer()
        self.info.helo = ""
        self.info.esmtp = False
        self.envelope = Envelope()
        self._note_tls()

    async def cmd_AUTH(self, arg: str) -> None:
        if not self._require_helo():
            return
        if not self.info.port.requires_auth:
            self.send("503 5.5.1 AUTH not available on this port; use submission (587/465)")
            return
        if not self.info.tls:
            self.send("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.info.user is not None:
            self.send("503 5.5.1 Already authenticated")
            return
        if self.envelope.sender is not None:
            self.send("503 5.5.1 AUTH not allowed during a mail transaction")
            return
        words = arg.split()
        if not words or len(words) > 2:
            self.send("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mechanism == "PLAIN":
            credentials = await self._auth_plain(initial)
        elif mechanism == "LOGIN":
            credentials = await self._auth_login(initial)
        else:
            self.send("504 5.5.4 Unrecognized authentication mechanism")
            return
        if credentials is None:
            return
        username, password = credentials
        self.send(await self.backend.authenticate(self.info, username, password))

    async def _auth_response(self, challenge: str) -> bytes | None:
        """Send a 334 challenge and decode the client's answer; None if aborted or bad."""
        self.send(f"334 {challenge}")
        try:
            answer = await self.read_line(AUTH_LINE_LIMIT)
        except LineTooLong:
            self.send("500 5.5.2 Line too long")
            return None
        if answer.strip() == b"*":
            self.send("501 5.7.0 Authentication aborted")
            return None
        return self._b64(answer)

    def _b64(self, text: bytes | str) -> bytes | None:
        try:
            if text in ("=", b"="):  # RFC 4954: a zero-length initial response
                return b""
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.send("501 5.5.2 Cannot decode base64")
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = self._b64(initial) if initial is not None else await self._auth_response("")
        if blob is None:
            return None
        fields = blob.split(b"\x00")
        if len(fields) != 3:
            self.send("501 5.5.2 Malformed AUTH PLAIN response")
            return None
        authzid, authcid, password = fields
        try:
            user, pw, authz = authcid.decode(), password.decode(), authzid.decode()
        except UnicodeDecodeError:
            self.send("501 5.5.2 Credentials are not UTF-8")
            return None
        if authz and authz.lower() != user.lower():
            self.send("535 5.7.8 Authorization identity must match the login")
            return None
        return user, pw

    async def _auth_login(self, initial: str | None) -> tuple[str, str] | None:
        if initial is not None:
            user_blob = self._b64(initial)
        else:
            user_blob = await self._auth_response(base64.b64encode(b"Username:").decode())
        if user_blob is None:
            return None
        password_blob = await self._auth_response(base64.b64encode(b"Password:").decode())
        if password_blob is None:
            return None
        try:
            return user_blob.decode(), password_blob.decode()
        except UnicodeDecodeError:
            self.send("501 5.5.2 Credentials are not UTF-8")
            return None

    async def cmd_MAIL(self, arg: str) -> None:
        if not self._require_helo():
            return
        if self.info.port.requires_auth and self.info.user is None:
            self.send("530 5.7.0 Authentication required")
            return
        if self.envelope.sender is not None:
            self.send("503 5.5.1 Nested MAIL command")
            return
        path = parse_path(arg, "FROM:", utf8_allowed=False, null_allowed=True)
        self._about_from = path.address
        reply = self._check_mail_params(path)
        if reply is None:
            reply = await self.backend.check_sender(self.info, path)
        if reply is not None:
            self.send(reply)
            return
        self.envelope = Envelope(sender=path.address, sender_params=path.params,
                                 smtputf8="SMTPUTF8" in path.params)
        self.send("250 2.1.0 Ok")

    def _check_mail_params(self, path: Path) -> str | None:
        params = path.params
        if not self.info.esmtp and params:
            return "555 5.5.4 Parameters need EHLO"
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return "501 5.5.4 Bad SIZE value"
                if int(value) > self.backend.max_message_size:
                    return "552 5.3.4 Message size exceeds fixed maximum message size"
                if self.data_budget is not None and int(value) > self.data_budget.available():
                    # RFC 1870 6.1: room for it, not now (messages in flight).
                    self._log_no_memory()
                    return STORAGE_REPLY
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return "501 5.5.4 SMTPUTF8 takes no value"
            elif key == "RET":
                if (value or "").upper() not in ("FULL", "HDRS"):
                    return "501 5.5.4 RET must be FULL or HDRS"
            elif key == "ENVID":
                if value is None or len(value) > 100:
                    return "501 5.5.4 Bad ENVID"
                decode_xtext(value)
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted and not passed on
            else:
                return f"555 5.5.4 Unsupported parameter {key}"
        return None

    async def cmd_RCPT(self, arg: str) -> None:
        if not self._require_helo():
            return
        if self.envelope.sender is None:
            self.send("503 5.5.1 Need MAIL command first")
            return
        self._about_from = self.envelope.sender
        path = parse_path(self._postmaster(arg), "TO:", utf8_allowed=self.envelope.smtputf8,
                          null_allowed=False)
        self._about_to = [path.address]
        for key, value in path.params.items():
            if key == "NOTIFY":
                words = (value or "").upper().split(",")
                if not value or not set(words) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                    "NEVER" in words and len(words) > 1
                ):
                    self.send("501 5.5.4 Bad NOTIFY value")
                    return
            elif key == "ORCPT":
                if value is None or ";" not in value:
                    self.send("501 5.5.4 Bad ORCPT value")
                    return
                decode_xtext(value)
            else:
                self.send(f"555 5.5.4 Unsupported parameter {key}")
                return
        if len(self.envelope.recipients) >= self.backend.max_recipients:
            # Postfix's smtpd_recipient_overshoot_limit: past RCPT_OVERSHOOT more, each
            # one counts as an error (and max_errors ends the session and its log lines).
            self._overshoot += 1
            if self._overshoot > RCPT_OVERSHOOT:
                self.errors += 1
            self.send("452 4.5.3 Too many recipients")
            return
        reply = await self.backend.check_recipient(self.info, self.envelope, path.address)
        if reply is not None:
            self.send(reply)
            return
        if path.address not in self.envelope.recipients:
            self.envelope.recipients.append(path.address)
            self.envelope.recipient_params.append(path.params)
        self.send("250 2.1.5 Ok")

    def _postmaster(self, arg: str) -> str:
        """``TO:<Postmaster>`` without a domain (RFC 5321 4.5.1: must be accepted) as the
        postmaster of our primary domain; any other argument unchanged."""
        head, _, rest = arg.partition(">")
        if head.replace(" ", "").lower() != "to:<postmaster" or rest[:1] not in ("", " "):
            return arg
        domain = getattr(self.backend, "primary_domain", None)
        return f"TO:<postmaster@{domain}>{rest}" if domain else arg

    def _data_timeout(self) -> float | None:
        return getattr(self.backend, "data_timeout", None)

    async def cmd_DATA(self, arg: str) -> None:
        if not self._require_helo():
            return
        if arg:
            self.send("501 5.5.4 Syntax: DATA")
            return
        if self.envelope.sender is None:
            self.send("503 5.5.1 Need MAIL command first")
            return
        self._about_from, self._about_to = self.envelope.sender, list(self.envelope.recipients)
        if not self.envelope.recipients:
            self.send("554 5.5.1 No valid recipients")
            return
        if self.data_budget is not None and self.data_budget.available() < min(
                self.backend.max_message_size, DATA_ROOM):
            self._log_no_memory()
            self.send(STORAGE_REPLY)
            return
        self.send("354 End data with <CR><LF>.<CR><LF>")
        await self.flush()
        started = time.monotonic()
        reservation = Reservation(self.data_budget)
        try:
            # Each read waits at most command_timeout (the stream's idle timeout), and
            # the whole payload at most data_timeout.
            result = await self.stream.read_data(self.backend.max_message_size, reservation,
                                                 self._data_timeout())
            envelope, self.envelope = self.envelope, Envelope()
            if result.refused == NUL:
                log.info("session %s: message from %s refused: a NUL byte in it",
                         self.info.session_id, self.info.peer_ip)
                self.send("554 5.6.0 Message contains NUL characters")
                return
            if result.refused == NO_MEMORY:
                self._log_no_memory()
                self.send(STORAGE_REPLY)
                return
            if result.body is None:
                self.send("552 5.3.4 Message size exceeds fixed maximum message size")
                return
            reply = await self.backend.accept_message(self.info, envelope, result.body)
        finally:
            reservation.release()
        log.debug("session %s: DATA of %d bytes in %.3fs", self.info.session_id,
                  result.size, time.monotonic() - started)
        if reply.startswith("250"):
            self.junk = 0
        self.send(reply)

    def _log_no_memory(self) -> None:
        assert self.data_budget is not None
        log.warning("session %s: message from %s refused for now: %d bytes of messages in "
                    "flight reached limits.max_data_in_flight", self.info.session_id,
                    self.info.peer_ip, self.data_budget.used)


def describe_tls_error(exc: BaseException, timeout: float | None = None) -> str:
    """One line about a failed TLS handshake, never empty (``str()`` of a reset or a
    timeout is)."""
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if reason:
            return str(reason).replace("_", " ").lower()  # e.g. "wrong version number"
        return str(exc).strip() or "TLS error"
    if isinstance(exc, TimeoutError) or (
            isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)):
        return (f"no handshake within {timeout:g}s" if timeout
                else "no handshake in time")
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the client"
    if isinstance(exc, (EOFError, BrokenPipeError, ConnectionAbortedError)):
        return "the client closed the connection"
    text = str(exc).strip()
    return text or type(exc).__name__
