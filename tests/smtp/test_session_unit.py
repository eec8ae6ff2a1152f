"""The SMTP session alone, against a fake backend over a socket pair: the protocol's state
machine without a server, a queue or DNS (the end-to-end tests in test_session_protocol.py
drive the real server)."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from dataclasses import dataclass, field

import pytest
import trustme

from mailrelay.smtp.parse import Path
from mailrelay.smtp.session import Envelope, Port, Session, SessionInfo


class FakeEvents:
    """Records what the session reports, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def tls_established(self, info: SessionInfo) -> None:
        self.seen.append(("tls", info.tls_version))

    def reply(self, code: str) -> None:
        self.seen.append(("reply", code))

    def command(self, verb: str) -> None:
        self.seen.append(("command", verb))

    def rejected(self, info, verb, reply, sender=None, recipients=None) -> None:
        self.seen.append(("rejected", verb, reply[:3]))


@dataclass
class FakeBackend:
    """A policy that accepts what the test says, and remembers what it was asked."""

    tls: ssl.SSLContext | None = None
    hostname: str = "mx.test"
    max_message_size: int = 10_000
    max_recipients: int = 3
    command_timeout: float = 5.0
    max_errors: int = 5
    events: FakeEvents = field(default_factory=FakeEvents)
    password: str = "secret"
    refuse_sender: str | None = None
    messages: list[tuple[Envelope, bytes]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    def tls_context(self) -> ssl.SSLContext | None:
        return self.tls

    async def authenticate(self, info: SessionInfo, username: str, password: str) -> str:
        self.logins.append((username, password))
        if password != self.password:
            return "535 5.7.8 Authentication credentials invalid"
        info.user = username
        return "235 2.7.0 Authentication successful"

    async def check_sender(self, info: SessionInfo, path: Path) -> str | None:
        if self.refuse_sender is not None and path.address == self.refuse_sender:
            return "550 5.7.1 Not you"
        return None

    async def check_recipient(self, info: SessionInfo, envelope: Envelope,
                              address: str) -> str | None:
        return "550 5.1.1 No such user" if address.startswith("nobody@") else None

    async def accept_message(self, info: SessionInfo, envelope: Envelope, body: bytes) -> str:
        self.messages.append((envelope, body))
        return f"250 2.0.0 Ok: queued as {len(self.messages)}"


class Client:
    """The other end of the socket pair, reading whole (multi-line) replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 5)).decode()
            assert line.endswith("\r\n"), f"incomplete reply line {line!r}"
            lines.append(line[4:-2])
            if line[3] == " ":
                return int(line[:3]), lines

    async def cmd(self, text: str) -> tuple[int, list[str]]:
        self.writer.write(text.encode() + b"\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), 5) == b""
        except ConnectionResetError:  # closed with our unread input in its buffer: a reset
            return True


async def serve(backend: FakeBackend, ours: socket.socket, port: Port = Port.SMTP
                ) -> tuple[Session, asyncio.Task[None]]:
    """A session on our end of a socket pair, accepted the way a server accepts (a
    client_connected callback), so that STARTTLS knows this end is the server's."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        loop.create_future())
    await loop.connect_accepted_socket(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(),
                                             lambda r, w: accepted.set_result((r, w))),
        ours)
    reader, writer = await accepted
    session = Session(backend, port, reader, writer, "t.1")
    return session, asyncio.create_task(session.run())


async def start(backend: FakeBackend, port: Port = Port.SMTP
                ) -> tuple[Client, Session, asyncio.Task[None]]:
    ours, theirs = socket.socketpair()
    session, task = await serve(backend, ours, port)
    client = Client(*await asyncio.open_connection(sock=theirs))
    code, _ = await client.reply()
    assert code == 220
    return client, session, task


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_a_whole_transaction_reaches_the_backend():
    backend = FakeBackend()
    client, _, task = await start(backend)
    assert (await client.cmd("EHLO c.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@b.test> BODY=8BITMIME"))[0] == 250
    assert (await client.cmd("RCPT TO:<x@mx.test> NOTIFY=FAILURE"))[0] == 250
    assert (await client.cmd("RCPT TO:<nobody@mx.test>"))[0] == 550
    assert (await client.cmd("DATA"))[0] == 354
    code, lines = await client.cmd("Subject: s\r\n\r\n..dot\r\nbare\nlf\r\n.")
    assert code == 250 and lines == ["2.0.0 Ok: queued as 1"]
    [(envelope, body)] = backend.messages
    assert envelope.sender == "a@b.test" and envelope.recipients == ["x@mx.test"]
    assert envelope.recipient_params == [{"NOTIFY": "FAILURE"}]
    assert body == b"Subject: s\r\n\r\n.dot\r\nbare\r\nlf\r\n"  # unstuffed, CRLF only
    assert (await client.cmd("QUIT"))[0] == 221
    await task
    assert ("rejected", "RCPT", "550") in backend.events.seen


async def test_commands_out_of_order_are_refused_and_counted():
    backend = FakeBackend(max_errors=3)
    client, _, task = await start(backend)
    assert (await client.cmd("MAIL FROM:<a@b.test>"))[0] == 503  # no EHLO yet
    assert (await client.cmd("EHLO c.test"))[0] == 250
    assert (await client.cmd("RCPT TO:<x@mx.test>"))[0] == 503  # no MAIL yet
    assert (await client.cmd("DATA"))[0] == 503
    code, lines = await client.reply()  # the third error ends the session
    assert code == 421 and lines[0].startswith("4.7.0")
    assert await client.closed()
    await task


async def test_pipelined_commands_get_their_replies_in_order():
    backend = FakeBackend()
    client, _, task = await start(backend)
    client.writer.write(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\n"
                        b"RCPT TO:<nobody@mx.test>\r\nDATA\r\n")
    codes = [(await client.reply())[0] for _ in range(5)]
    assert codes == [250, 250, 250, 550, 354]
    client.writer.write(b"body\r\n.\r\nQUIT\r\n")
    assert [(await client.reply())[0] for _ in range(2)] == [250, 221]
    await task


async def test_too_many_recipients_and_a_message_over_the_size_limit():
    backend = FakeBackend(max_recipients=2, max_message_size=100)
    client, _, task = await start(backend)
    await client.cmd("EHLO c.test")
    assert (await client.cmd("MAIL FROM:<a@b.test> SIZE=101"))[0] == 552
    assert (await client.cmd("MAIL FROM:<a@b.test>"))[0] == 250
    assert [(await client.cmd(f"RCPT TO:<r{n}@mx.test>"))[0] for n in range(3)] == [
        250, 250, 452]
    assert (await client.cmd("DATA"))[0] == 354
    code, _ = await client.cmd("x" * 200 + "\r\n.")
    assert code == 552 and backend.messages == []
    assert (await client.cmd("NOOP"))[0] == 250, "the session goes on"
    client.writer.close()
    await task


async def test_lines_too_long_nul_and_bad_utf8_get_a_reply_each():
    backend = FakeBackend()
    client, _, task = await start(backend)
    assert (await client.cmd("NOOP " + "x" * 5000))[0] == 500
    client.writer.write(b"NO\x00OP\r\n")
    assert (await client.reply())[0] == 500
    client.writer.write(b"EHLO \xff\r\n")
    assert (await client.reply())[0] == 500
    assert (await client.cmd("NOOP"))[0] == 250
    client.writer.close()
    await task


async def test_auth_needs_tls_on_submission_and_does_not_exist_on_port_25(contexts):
    backend = FakeBackend(tls=contexts[0])
    client, _, task = await start(backend)
    await client.cmd("EHLO c.test")
    assert (await client.cmd("AUTH PLAIN AGFAAGI="))[0] == 503  # port 25
    client.writer.close()
    await task

    client, _, task = await start(backend, Port.SUBMISSION)
    _, lines = await client.cmd("EHLO c.test")
    assert "STARTTLS" in lines and not any(line.startswith("AUTH") for line in lines)
    assert (await client.cmd("AUTH PLAIN AGFAAGI="))[0] == 538
    assert (await client.cmd("MAIL FROM:<a@b.test>"))[0] == 530
    assert backend.logins == []
    client.writer.close()
    await task


async def test_starttls_forgets_the_session_then_auth_plain_and_login(contexts):
    backend = FakeBackend(tls=contexts[0])
    client, session, task = await start(backend, Port.SUBMISSION)
    await client.cmd("EHLO c.test")
    assert (await client.cmd("STARTTLS"))[0] == 220
    await client.writer.start_tls(contexts[1], server_hostname="mx.test")
    assert (await client.cmd("MAIL FROM:<a@b.test>"))[0] == 503, "EHLO again after TLS"
    _, lines = await client.cmd("EHLO c.test")
    assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines
    plain = base64.b64encode(b"\x00me@mx.test\x00wrong").decode()
    assert (await client.cmd(f"AUTH PLAIN {plain}"))[0] == 535
    assert (await client.cmd("AUTH LOGIN"))[0] == 334
    assert (await client.cmd(base64.b64encode(b"me@mx.test").decode()))[0] == 334
    assert (await client.cmd(base64.b64encode(b"secret").decode()))[0] == 235
    assert session.info.user == "me@mx.test" and session.info.tls
    assert backend.logins == [("me@mx.test", "wrong"), ("me@mx.test", "secret")]
    assert ("tls", session.info.tls_version) in backend.events.seen
    client.writer.close()
    await task


async def test_commands_pipelined_behind_starttls_are_refused(contexts):
    backend = FakeBackend(tls=contexts[0])
    client, _, task = await start(backend, Port.SUBMISSION)
    await client.cmd("EHLO c.test")
    client.writer.write(b"STARTTLS\r\nAUTH PLAIN AGFAAGI=\r\n")
    code, _ = await client.reply()
    assert code == 554  # CVE-2011-0411: nothing runs with the TLS credit
    assert await client.closed()
    await task
    assert backend.logins == []


async def test_an_idle_client_is_cut_off_after_the_command_timeout():
    backend = FakeBackend(command_timeout=0.3)
    client, _, task = await start(backend)
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<a@b.test>")
    await client.cmd("RCPT TO:<x@mx.test>")
    assert (await client.cmd("DATA"))[0] == 354
    client.writer.write(b"Subject: slow\r\n")  # then silence, inside DATA
    code, lines = await client.reply()
    assert code == 421 and lines[0].startswith("4.4.2")
    assert await client.closed()
    await task
    assert backend.messages == []


async def test_a_command_dripped_a_byte_at_a_time_is_cut_at_the_command_timeout():
    """Outside eyes: one byte every 3 s with a 5 s timeout held a session for as long as
    the client liked; the whole line must now arrive within command_timeout."""
    backend = FakeBackend(command_timeout=0.5)
    client, _, task = await start(backend)
    loop = asyncio.get_running_loop()

    async def drip() -> None:
        for byte in b"NOOP NOOP NOOP NOOP NOOP\r\n":
            client.writer.write(bytes([byte]))
            await asyncio.sleep(0.1)  # each byte well inside the timeout

    dripper = asyncio.create_task(drip())
    started = loop.time()
    code, lines = await client.reply()
    assert code == 421 and lines[0].startswith("4.4.2"), (code, lines)
    assert loop.time() - started < 1.2  # the line would have taken 2.6 s
    dripper.cancel()
    assert await client.closed()
    await task


async def test_junk_commands_past_the_limit_count_as_errors_until_a_message_is_accepted():
    """Postfix's smtpd_junk_command_limit: NOOP, RSET, HELO… move no mail; past 100 of
    them each counts as an error, and max_errors ends the session."""
    from mailrelay.smtp.session import JUNK_LIMIT

    backend = FakeBackend(max_errors=5)
    client, _, task = await start(backend)
    for _ in range(JUNK_LIMIT - 1):
        assert (await client.cmd("NOOP"))[0] == 250
    # A message accepted starts the count again.
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<a@b.test>")
    await client.cmd("RCPT TO:<x@mx.test>")
    assert (await client.cmd("DATA"))[0] == 354
    assert (await client.cmd("Subject: hi\r\n\r\nbody\r\n."))[0] == 250
    for _ in range(JUNK_LIMIT):
        assert (await client.cmd("RSET"))[0] == 250
    for _ in range(5):  # each one more is an error: the fifth reaches max_errors
        assert (await client.cmd("NOOP"))[0] == 250
    code, lines = await client.reply()
    assert code == 421 and "Too many errors" in lines[0]
    assert await client.closed()
    await task


async def test_recipients_far_past_the_limit_end_the_session():
    """Postfix's smtpd_recipient_overshoot_limit (outside eyes: 150,000 RCPTs past the
    limit were each answered 452 and logged)."""
    from mailrelay.smtp.session import RCPT_OVERSHOOT

    backend = FakeBackend(max_recipients=2, max_errors=3)
    client, _, task = await start(backend)
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<a@b.test>")
    for n in range(2 + RCPT_OVERSHOOT + 2):
        client.writer.write(f"RCPT TO:<x{n}@mx.test>\r\n".encode())
    codes = [(await client.reply())[0] for _ in range(2 + RCPT_OVERSHOOT + 2)]
    assert codes[:2] == [250, 250] and set(codes[2:]) == {452}
    # Two errors so far; the next refusal is the third (max_errors): 421 follows it.
    assert (await client.cmd("RCPT TO:<one-more@mx.test>"))[0] == 452
    code, lines = await client.reply()
    assert code == 421 and "Too many errors" in lines[0]
    await task


async def test_a_client_that_never_reads_its_replies_is_cut_and_its_socket_closed():
    """Outside eyes: a client that sent many commands and never read the replies held
    its session in flush() forever, and after a close its socket stayed open with
    megabytes unsent."""
    backend = FakeBackend(command_timeout=0.5)
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    session, task = await serve(backend, ours)
    writer = session.writer
    loop = asyncio.get_running_loop()
    theirs.setblocking(False)
    # Many commands with long replies, never reading one (HELP: 214; EHLO: several lines).
    commands = b"EHLO c.test\r\n" * 50_000
    sent = 0
    deadline = loop.time() + 5
    while sent < len(commands) and loop.time() < deadline:
        try:
            sent += theirs.send(commands[sent:sent + 65536])
        except BlockingIOError:
            await asyncio.sleep(0.01)
    started = loop.time()
    await asyncio.wait_for(task, 15)  # flush times out, then close gives up and aborts
    assert loop.time() - started < 12
    assert writer.transport.is_closing()
    assert ours.fileno() == -1  # the descriptor is gone with the session
    theirs.close()


async def test_shutdown_closes_an_idle_session_at_once_and_lets_a_transaction_finish():
    backend = FakeBackend()
    client, session, task = await start(backend)
    await client.cmd("EHLO c.test")
    await asyncio.sleep(0.05)  # waiting for the next command
    session.shutdown()
    code, _ = await client.reply()
    assert code == 421
    await task

    client, session, task = await start(backend)
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<a@b.test>")
    session.shutdown()  # in a transaction: it may finish
    assert (await client.cmd("RCPT TO:<x@mx.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    assert (await client.cmd("body\r\n."))[0] == 250
    code, _ = await client.reply()  # between transactions: now it is told, unasked
    assert code == 421
    await task
    assert len(backend.messages) == 1


async def test_a_refused_sender_and_a_foreign_protocol():
    backend = FakeBackend(refuse_sender="spoof@b.test")
    client, _, task = await start(backend)
    await client.cmd("EHLO c.test")
    assert (await client.cmd("MAIL FROM:<spoof@b.test>"))[0] == 550
    assert ("rejected", "MAIL", "550") in backend.events.seen
    client.writer.write(b"GET / HTTP/1.1\r\n")  # a browser (ALPACA): no reply, closed
    assert await client.closed()
    await task
