"""A bounded, seeded SMTP session fuzzer against the real server on loopback (issue 7).

Hundreds of short sessions on all three ports send random commands (valid, broken, huge,
with NUL, non-UTF-8 bytes and odd line endings), random bytes, random DATA blocks, real
and fake STARTTLS, AUTH dialogues, and hang up at random points. Every reply line must be
a well-formed SMTP reply without Python exception text, the server must log no ERROR,
every session must end, and afterwards a normal client still gets its mail through.

The seed is fixed (MAILRELAY_FUZZ_SEED overrides it); a failure names the session, whose
own generator is seeded from the seed and its number, so it can be replayed alone.

Also: hypothesis properties of the command-line parsing path that
tests/smtp/test_parse_properties.py does not cover (split_command on whole decoded lines,
the shape of every syntax reply, and what an accepted address may contain).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
import re
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.smtp.parse import SyntaxErrorReply, parse_path, split_command
from tests.support.relay import HOSTNAME, PASSWORD, USER

SEED = int(os.environ.get("MAILRELAY_FUZZ_SEED", "20250607"))
SESSIONS = 300
MAX_ACTIONS = 20
WORKERS = 8
TIME_BUDGET = 25.0  # no new session after this: the whole test stays under ~40 s
MIN_SESSIONS = 60  # even on a slow machine, this many must have run

REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -])([^\r\n\x00]*)\r\n")
PYTHON_TEXT = re.compile(rb"Traceback|Exception|Error:|Error\(|File \"|\.py\b|<object at")

MESSAGE = b"From: me@example.com\r\nTo: friend@remote.test\r\nSubject: %s\r\n\r\nhello\r\n"


# -- random inputs ----------------------------------------------------------------------

VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "AUTH", "STARTTLS",
         "VRFY", "EXPN", "HELP"]
OTHER_VERBS = ["BDAT", "TURN", "ETRN", "XCLIENT", "SEND", "SAML", "SOML", "ATRN", "XEXCH50"]
FOREIGN = ["GET / HTTP/1.1", "POST /x HTTP/1.0", "USER root", "CONNECT a:25 HTTP/1.1"]
ADDRESSES = [USER, "Me@Example.COM", "me+tag@example.com", "nobody@example.com",
             "friend@remote.test", "friend%remote.test@example.com", "a@[127.0.0.2]",
             "@example.com:friend@remote.test", '"q u@x"@example.com', "pöstmaster@example.com",
             "", "postmaster", "a" * 70 + "@example.com", "b@" + "c" * 300 + ".test",
             "SRS0=abcd=AB=remote.test=friend@example.com", "x@-bad-.test", "x@x..test"]
PARAMS = ["SIZE=100", "SIZE=99999999999999999999", "SIZE=", "SIZE=x", "BODY=8BITMIME",
          "BODY=BINARYMIME", "SMTPUTF8", "SMTPUTF8=yes", "RET=HDRS", "RET=bogus",
          "ENVID=abc+2B", "ENVID=+ZZ", "NOTIFY=NEVER", "NOTIFY=NEVER,DELAY", "NOTIFY=",
          "ORCPT=rfc822;a@b", "ORCPT=nosemi", "AUTH=<>", "X-UNKNOWN=1", "=", "A==B",
          "SIZE=1 SIZE=2"]
ENDINGS = [b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b"\n\r", b"", b"\r\n\r\n"]
ODD_BYTES = [b"\x00", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x1b[2J",
             b"\t", b"\x7f", b"\xe2\x80\xa8", b"\xc2\x85", "é".encode(), "𝔘".encode()]


def rand_token(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return b""
    if kind == 1:  # around the command and AUTH line limits
        size = rng.choice([rng.randint(980, 1010), rng.randint(12270, 12300),
                           rng.randint(2000, 40000)])
        return bytes(rng.choice(b"AZaz09.@<>: ") for _ in range(size))
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    if kind == 3:
        return rng.choice(ODD_BYTES) * rng.randint(1, 3)
    if kind == 4:
        return rng.choice(ADDRESSES).encode()
    if kind == 5:
        return rng.choice(PARAMS).encode()
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz.-[]:") for _ in range(rng.randint(1, 20)))


def mutate(rng: random.Random, line: bytes) -> bytes:
    """A few random edits of a command line."""
    data = bytearray(line)
    for _ in range(rng.randint(1, 3)):
        where = rng.randint(0, len(data))
        edit = rng.randrange(5)
        if edit == 0:
            data[where:where] = rng.choice(ODD_BYTES)
        elif edit == 1 and data:
            del data[where:where + rng.randint(1, 5)]
        elif edit == 2:
            data[where:where] = rand_token(rng)
        elif edit == 3:
            data = bytearray(data.swapcase())
        else:
            data[where:where] = rng.choice([b" ", b"  ", b"\t", b":", b"<", b">", b"="])
    return bytes(data)


def rand_command(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.04:
        return rng.choice(FOREIGN).encode()
    if roll < 0.12:  # an unknown verb
        return bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_1") for _ in range(
            rng.randint(1, 12))) + b" " + rand_token(rng)
    verb = rng.choice(VERBS) if rng.random() < 0.9 else rng.choice(OTHER_VERBS)
    if rng.random() < 0.3:
        verb = rng.choice(["MAIL", "RCPT"])  # the commands with the most to parse
    if verb in ("MAIL", "RCPT"):
        path = rng.choice(ADDRESSES)
        params = " ".join(rng.sample(PARAMS, rng.randint(0, 2)))
        arg = f"{'FROM' if verb == 'MAIL' else 'TO'}:<{path}> {params}".rstrip().encode()
        if rng.random() < 0.2:
            arg = arg.replace(b"<", b"").replace(b">", b"")
        if rng.random() < 0.2:
            arg = arg.replace(b":", rng.choice([b": ", b" :", b""]), 1)
    elif verb in ("EHLO", "HELO"):
        arg = rng.choice([b"client.test", b"[127.0.0.1]", HOSTNAME.encode(), rand_token(rng)])
    elif verb in ("DATA", "RSET", "QUIT", "STARTTLS", "NOOP"):
        arg = b"" if rng.random() < 0.8 else rand_token(rng)
    else:
        arg = rand_token(rng)
    line = verb.encode() + (b" " + arg if arg else b"")
    if rng.random() < 0.3:
        line = line.lower() if rng.random() < 0.5 else line
    if rng.random() < 0.3:
        line = mutate(rng, line)
    return line


def rand_body(rng: random.Random, subject: bytes = b"fuzz") -> bytes:
    """A DATA payload, with or without a proper end marker."""
    parts = [b"Subject: " + subject + b"\r\n", b"From: " + rng.choice(ADDRESSES).encode()
             + b"\r\n"]
    for _ in range(rng.randint(0, 12)):
        parts.append(rng.choice([
            b"X-Fuzz: " + rand_token(rng)[:500] + b"\r\n", b"\r\n", b".\r\n", b"..\r\n",
            b"\n.\n", b"\r.\r", b".\n", b"\r\n.\n", b"DKIM-Signature: v=1; a=rsa-sha256; d=x;"
            b" s=y; b=; bh=\r\n", b"line\rwith bare CR\r\n", b"bare LF\n",
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))),
            b"MAIL FROM:<evil@elsewhere.test>\r\nRCPT TO:<friend@remote.test>\r\n",
            b"x" * rng.choice([10, 998, 1000, 5000, 70000]) + b"\r\n",
        ]))
    end = rng.choice([b"\r\n.\r\n"] * 6 + [b"\r\n.\r\nNOOP\r\n", b"\n.\n", b".\r\n", b"",
                                           b"\r\n.", b"\r\n.\r\nQUIT\r\n"])
    return b"".join(parts) + end


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def rand_auth(rng: random.Random) -> list[bytes]:
    """An AUTH dialogue as the lines the client sends (answers sent blindly)."""
    user = rng.choice([USER.encode(), b"nobody@example.com", rand_token(rng)[:100]])
    password = rng.choice([PASSWORD.encode(), b"wrong", rand_token(rng)[:100]])
    roll = rng.randrange(7)
    if roll == 0:
        return [b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + password)]
    if roll == 1:
        return [b"AUTH PLAIN", b64(rng.choice([b"", b"\0", b"a\0b", b"x\0" + user + b"\0"
                                              + password, user + b"\0" + password]))]
    if roll == 2:
        return [b"AUTH LOGIN", b64(user), b64(password)]
    if roll == 3:
        return [b"AUTH LOGIN " + b64(user), rng.choice([b"*", b64(password), b"!!"])]
    if roll == 4:
        return [b"AUTH PLAIN", rng.choice([b"*", b"=", b"%%%", b"A" * 13000, b"\xff\xfe"])]
    if roll == 5:
        return [b"AUTH " + rng.choice([b"CRAM-MD5", b"XOAUTH2 abc", b"PLAIN a b c", b"",
                                       b"plain =", b"LOGIN =", b"PLAIN " + b"A" * 5000])]
    return [b"AUTH PLAIN " + b64(user + b"\0" + user + b"\0" + password)]


def transaction(rng: random.Random, subject: bytes, port: str) -> list[bytes]:
    """A plausible pipelined transaction (mostly one the port accepts), whose pieces may
    be broken."""
    if port == "smtp":
        sender, recipient = rng.choice(["a@elsewhere.test", "", USER]), USER
    else:
        sender, recipient = USER, "friend@remote.test"
    if rng.random() < 0.2:
        sender = rng.choice(ADDRESSES)
    if rng.random() < 0.2:
        recipient = rng.choice(ADDRESSES)
    lines = [b"EHLO client.test", f"MAIL FROM:<{sender}>".encode(),
             f"RCPT TO:<{recipient}>".encode(), b"DATA"]
    if rng.random() < 0.2:
        index = rng.randrange(len(lines))
        lines[index] = mutate(rng, lines[index])
    return [*lines, rand_body(rng, subject)]


# -- the client side --------------------------------------------------------------------


@dataclass
class Stats:
    sessions: int = 0
    actions: Counter = field(default_factory=Counter)
    verbs: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    ports: Counter = field(default_factory=Counter)
    endings: Counter = field(default_factory=Counter)
    bytes_sent: int = 0
    reply_lines: int = 0
    tls_upgrades: int = 0
    problems: list[str] = field(default_factory=list)


class FuzzSession:
    def __init__(self, env, number: int, stats: Stats):
        self.env = env
        self.number = number
        self.rng = random.Random(f"{SEED}-{number}")
        self.stats = stats
        self.log: list[str] = []  # what we did, for the failure message
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tls = False
        self.port = ""
        self.closed_by_server = False  # (or the connection is gone for another reason)
        self.hanging_up = False

    def problem(self, text: str) -> None:
        self.stats.problems.append(
            f"session {self.number} (seed {SEED}): {text}; actions: {self.log[-8:]}")

    async def read_replies(self, reader: asyncio.StreamReader) -> None:
        """Check every line the server sends, until it closes."""
        continuing: bytes | None = None  # the code of an unfinished multi-line reply
        final: bytes | None = None  # a 221/421 ends the session: nothing may follow
        try:
            while True:
                line = await reader.readline()
                if not line or (self.hanging_up and not line.endswith(b"\n")):
                    break  # (a reply cut short by our own hang-up is not the server's fault)
                self.stats.reply_lines += 1
                if final is not None:
                    self.problem(f"data after the closing reply {final!r}: {line[:80]!r}")
                match = REPLY_LINE.fullmatch(line)
                if match is None:
                    self.problem(f"malformed reply line {line[:200]!r}")
                elif continuing is not None and match.group(1) != continuing:
                    self.problem(f"multi-line reply changes code: {line[:80]!r}")
                if PYTHON_TEXT.search(line) or b"Internal error" in line:
                    self.problem(f"exception text in reply {line[:200]!r}")
                if match is not None:
                    code, sep = match.group(1), match.group(2)
                    continuing = code if sep == b"-" else None
                    if sep == b" ":
                        self.stats.codes[code.decode()] += 1
                        if code in (b"221", b"421") or line.startswith(b"554 5.5.1 Pipelining"):
                            final = line
                self.lines.put_nowait(line)
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        except ValueError:  # StreamReader's 64 KiB line limit
            self.problem("a reply line over 64 KiB")
        finally:
            self.closed_by_server = True
            self.lines.put_nowait(None)

    async def wait_for(self, wanted: list[bytes], timeout: float) -> bytes | None:
        """The first reply line containing one of ``wanted`` (None: timeout or closed)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = await asyncio.wait_for(self.lines.get(), left)
            except TimeoutError:
                return None
            if line is None:
                self.lines.put_nowait(None)
                return None
            if any(w in line for w in wanted):
                return line
        return None

    async def run(self) -> None:
        rng = self.rng
        port = rng.choices(["smtp", "submission", "submission_tls"], [5, 3, 2])[0]
        self.stats.ports[port] += 1
        self.port = port
        self.tls = port == "submission_tls"
        # Many source addresses, none of them 127.0.0.1: AUTH blocks stay per fuzzer IP.
        source = f"127.0.1.{self.number % 250 + 1}"
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", self.env.ports[port], local_addr=(source, 0),
            ssl=self.env.client_tls() if self.tls else None,
            server_hostname=HOSTNAME if self.tls else None), 10)
        reading = asyncio.create_task(self.read_replies(reader))
        try:
            await self.actions(writer)
        except (ConnectionError, ssl.SSLError, OSError):
            pass  # the server hung up on us, as it may
        finally:
            await self.finish(writer, reading)

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.stats.bytes_sent += len(data)
        writer.write(data)
        await asyncio.wait_for(writer.drain(), 10)

    async def actions(self, writer: asyncio.StreamWriter) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            # Well behaved at first, to get deep into the protocol: TLS, EHLO and (on the
            # submission ports) a good login, so that mail is accepted and relayed.
            if not await self.login(writer):
                return
        elif roll < 0.85:
            await self.send(writer, b"EHLO fuzz.test\r\n")
        for _ in range(rng.randint(1, MAX_ACTIONS)):
            if self.closed_by_server:
                return
            kind = rng.choices(
                ["command", "transaction", "auth", "raw", "data", "starttls", "pause",
                 "hangup"], [45, 16, 8, 4, 6, 4, 6, 2])[0]
            self.stats.actions[kind] += 1
            self.log.append(kind)
            if kind == "command":
                line = rand_command(rng)
                self.stats.verbs[line.split(b" ", 1)[0][:12].upper().decode("ascii", "replace")
                                 ] += 1
                ending = rng.choice(ENDINGS)
                self.stats.endings[repr(ending)] += 1
                self.log[-1] = f"command {line[:60]!r}+{ending!r}"
                await self.send(writer, line + ending)
            elif kind == "transaction":
                subject = f"fuzz {self.number}".encode()
                await self.send(writer, b"\r\n".join(transaction(rng, subject, self.port)))
            elif kind == "auth":
                lines = rand_auth(rng)
                self.log[-1] = f"auth {[x[:40] for x in lines]}"
                await self.send(writer, b"".join(x + rng.choice(ENDINGS[:10]) for x in lines))
            elif kind == "raw":
                await self.send(writer, bytes(rng.randrange(256)
                                              for _ in range(rng.randint(1, 3000))))
            elif kind == "data":
                await self.send(writer, rand_body(rng))
            elif kind == "starttls":
                if not await self.starttls(writer):
                    return
            elif kind == "pause":
                await asyncio.sleep(rng.choice([0, 0.001, 0.01, 0.05]))
            else:  # hang up in the middle of whatever we were sending
                await self.send(writer, rand_command(rng)[: rng.randint(0, 30)])
                return

    async def login(self, writer: asyncio.StreamWriter) -> bool:
        """STARTTLS where needed, EHLO, AUTH with the right password on submission ports."""
        self.log.append("login")
        if not self.tls and self.rng.random() < 0.8 and not await self.starttls(writer):
            return False
        await self.send(writer, b"EHLO fuzz.test\r\n")
        if self.port != "smtp":
            blob = b64(f"\0{USER}\0{PASSWORD}".encode())
            await self.send(writer, b"AUTH PLAIN " + blob + b"\r\n")
            if await self.wait_for([b"235 ", b"454 ", b"538 "], 3.0) is None:
                return not self.closed_by_server
        return True

    async def starttls(self, writer: asyncio.StreamWriter) -> bool:
        """A real STARTTLS when the server agrees; False when the session is over."""
        if self.tls:
            await self.send(writer, b"STARTTLS\r\n")
            return True
        while not self.lines.empty():  # forget replies to earlier commands
            if self.lines.get_nowait() is None:
                return False
        await self.send(writer, b"STARTTLS\r\n")
        line = await self.wait_for([b"220 2.0.0", b"TLS already active", b"TLS not available",
                                    b"Syntax: STARTTLS", b"554 5.5.1 Pipelining"], 1.0)
        if line is None or not line.startswith(b"220"):
            return not self.closed_by_server
        try:
            await asyncio.wait_for(
                writer.start_tls(self.env.client_tls(), server_hostname=HOSTNAME), 10)
        except (ConnectionError, ssl.SSLError, OSError, TimeoutError) as exc:
            self.problem(f"TLS handshake after 220 failed: {exc!r}")
            return False
        self.tls = True
        self.stats.tls_upgrades += 1
        return True

    async def finish(self, writer: asyncio.StreamWriter, reading: asyncio.Task) -> None:
        how = self.rng.choice(["quit", "close", "abort", "eof"])
        self.stats.actions[f"end:{how}"] += 1
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, TimeoutError,
                                 RuntimeError):
            if how == "quit" and not self.closed_by_server:
                await self.send(writer, b"\r\nQUIT\r\n")
                await asyncio.wait_for(asyncio.shield(reading), 2)
            elif how == "eof" and writer.can_write_eof():
                writer.write_eof()
                await asyncio.wait_for(asyncio.shield(reading), 2)
        self.hanging_up = True
        if how == "abort":
            writer.transport.abort()
        else:
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


@pytest.fixture
async def fuzz_env(env):
    """Like the ``relay`` fixture, with a small size limit so the fuzzer also overflows it,
    more errors allowed per session so it gets further, and a short command timeout so
    that no abandoned session can linger."""
    env.write_config(limits={"max_message_size": "64KiB", "command_timeout": "5s",
                             "max_errors": 25, "auth_failure_delay": "0s"})
    env.add_user()
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    await env.start()
    return env


async def test_random_sessions_get_well_formed_replies_and_crash_nothing(fuzz_env, caplog):
    env = fuzz_env
    caplog.set_level(logging.ERROR)
    stats = Stats()
    started = time.monotonic()
    numbers = iter(range(SESSIONS))

    async def worker() -> None:
        for number in numbers:
            if time.monotonic() - started > TIME_BUDGET:
                return
            session = FuzzSession(env, number, stats)
            try:
                await asyncio.wait_for(session.run(), 10)
            except TimeoutError:
                session.problem("session did not end within 10s")
            except (ConnectionError, OSError) as exc:
                session.problem(f"could not connect: {exc!r}")
            stats.sessions += 1

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    fuzzing = time.monotonic() - started

    # Every session ends on the server side too (none stuck in TLS or DATA).
    deadline = time.monotonic() + 10
    while env.server.listeners.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = len(env.server.listeners.sessions)
    limits = env.server.listeners.limits

    # And the server still does its job for a normal client.
    subject = f"after fuzzing {SEED}"
    await env.submit(["friend@remote.test"], MESSAGE % subject.encode())
    received = await env.sink.until(1, timeout=15)
    deadline = time.monotonic() + 15
    while not any(subject.encode() in m.data for m in received):
        assert time.monotonic() < deadline, "the normal submission did not arrive"
        await asyncio.sleep(0.1)
        received = list(env.sink.messages)

    print(f"\nfuzz seed {SEED}: {stats.sessions} sessions in {fuzzing:.1f}s, "
          f"{sum(v for k, v in stats.actions.items() if not k.startswith('end:'))} actions, "
          f"{stats.bytes_sent} bytes sent, {stats.reply_lines} reply lines, "
          f"{stats.tls_upgrades} STARTTLS upgrades")
    print(f"ports {dict(stats.ports)}\nactions {dict(stats.actions)}")
    print(f"verbs {dict(stats.verbs.most_common(25))}\nline endings {dict(stats.endings)}")
    print(f"reply codes {dict(sorted(stats.codes.items()))}")
    print(f"sink received {len(env.sink.messages)} message(s)")

    assert not stats.problems, "\n".join(stats.problems[:20])
    errors = [r for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("mailrelay", "asyncio")]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}"
                                 for r in errors[:5])
    assert left == 0, f"{left} server sessions still open 10s after the clients left"
    assert limits.total == 0 and not limits.per_ip
    assert stats.sessions >= MIN_SESSIONS
    assert stats.codes["250"] and stats.codes["354"], "the fuzzer never got anywhere"


# -- properties of the parsing path -----------------------------------------------------

_PIECES = st.sampled_from(
    ["MAIL", "RCPT", "mail", "FROM:", "TO:", "from:", "<", ">", "@", ":", ",", '"', "\\",
     " ", "  ", "\t", "\r", "=", "%", "!", "[", "]", ".", "example.com", "IPv6:", "::1",
     "127.0.0.1", "SIZE=", "SMTPUTF8", "NOTIFY=", "ORCPT=rfc822;", "ENVID=", "+2B", "é",
     "\u2028", "\x85", "\x7f", "\x1b", "\ufeff", "\udcff"])
_LINES = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(_PIECES, st.text(max_size=5)), max_size=40).map(
        lambda parts: "".join(parts).encode("utf-8", "surrogateescape")),
)
_ENHANCED_REPLY = re.compile(r"[45][0-9]{2} [45]\.[0-9]{1,3}\.[0-9]{1,3} [^\r\n\x00]*")


@settings(max_examples=600, deadline=None)
@given(raw=_LINES, utf8=st.booleans())
def test_command_lines_parse_or_get_a_clean_syntax_reply(raw, utf8):
    """What Session.handle_line does with a line from the wire, up to parse_path: only
    SyntaxErrorReply may come out, its reply is one well-formed line, and an accepted
    address carries no control characters or line breaks into headers and logs."""
    raw = raw.split(b"\n")[0].removesuffix(b"\r")  # one line, as SMTPStream.readline gives
    if b"\x00" in raw:
        return  # refused before parsing
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # refused before parsing
    verb, arg = split_command(line)
    assert verb == verb.upper()
    assert " " not in verb
    assert arg == arg.strip()
    for keyword, null_allowed in (("FROM:", True), ("TO:", False)):
        try:
            path = parse_path(arg, keyword, utf8_allowed=utf8, null_allowed=null_allowed)
        except SyntaxErrorReply as exc:
            assert _ENHANCED_REPLY.fullmatch(exc.reply), exc.reply
            assert exc.reply == str(exc)
            continue
        address = path.address
        assert address or null_allowed
        assert not any(ord(ch) < 0x20 or ord(ch) == 0x7f for ch in address), address
        assert not any("\udc80" <= ch <= "\udcff" for ch in address)
        if address:
            assert "@" in address
        if not (utf8 or (keyword == "FROM:" and "SMTPUTF8" in path.params)):
            assert address.isascii()
        for key, value in path.params.items():
            assert key == key.upper() and key.isascii() and " " not in key
            assert value is None or (value.isascii() and value.isprintable() and " " not in value)
