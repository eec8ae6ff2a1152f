"""rspamd natively (mailrelay.message.filters.rspamd): a real rspamd, and bad servers.

The real rspamd is Debian's, started by the session fixture with a minimal
configuration (tests/support/spam_daemons.py). The bad servers are asyncio servers on
loopback that answer garbage, too much, too slowly, or not JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from bench.ports import free_port
from mailrelay.config import RspamdSettings
from mailrelay.message.filters.rspamd import (
    MAX_RESPONSE,
    RspamdClient,
    verdict_from,
)
from mailrelay.message.filters.verdict import FilterInput, apply_verdict
from tests.support.spam_daemons import GTUBE, GTUBE_ADD_HEADER, GTUBE_REWRITE_SUBJECT

INPUT = FilterInput(
    remote_addr="192.0.2.7", remote_port=40123, helo="mail.example.org",
    mail_from="alice@example.org", rcpt_to=("bob@example.com", "carol@example.com"),
    auth_as=None, on_tls=True, from_local_domain=False, spf_pass=False, queue_id="Q123")

CLEAN = (b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\n"
         b"X-Spam-Status: No, forged by the sender\r\nX-Spam: No\r\n"
         b"Subject: Lunch on Thursday\r\nMessage-ID: <1@example.org>\r\n\r\n"
         b"Shall we meet at noon?\r\n")


def message_with(text: str) -> bytes:
    return CLEAN.replace(b"Shall we meet at noon?", text.encode())


@pytest.fixture(autouse=True)
def _log_everything(caplog):
    caplog.set_level(logging.DEBUG, "mailrelay.filters")


def one_line(caplog, level: int) -> str:
    """The outcome logged exactly one line at ``level``, without a traceback."""
    records = [r for r in caplog.records if r.name == "mailrelay.filters"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == level and records[0].exc_info is None
    assert "\n" not in records[0].getMessage()
    return records[0].getMessage()


def field_values(headers: list[bytes]) -> dict[str, str]:
    return {raw.split(b":", 1)[0].decode(): raw.split(b":", 1)[1].strip().decode()
            for raw in headers}


# --- a real rspamd --------------------------------------------------------------------------


async def test_gtube_is_refused_with_550_5_7_1(rspamd, caplog):
    verdict = await RspamdClient(rspamd.url).check(INPUT, message_with(GTUBE))
    assert verdict.action == "reject" and verdict.error is None
    assert verdict.reply.startswith("550 5.7.1 ")
    assert "reject" in one_line(caplog, logging.INFO)


async def test_clean_message_is_accepted_with_spam_headers(rspamd, caplog):
    verdict = await RspamdClient(rspamd.url).check(INPUT, CLEAN)
    assert verdict.action == "accept" and verdict.error is None
    values = field_values(verdict.headers)
    assert values["X-Spam-Action"] == "no action"
    score, required = map(float, values["X-Spam-Score"].split("/"))
    assert score < required
    assert values["X-Spam-Status"].startswith("No, score=")
    assert "X-Spam" not in values
    # rspamd's milter block (its milter_headers module) is applied too.
    assert values["X-Spamd-Result"].startswith("default: False")
    one_line(caplog, logging.DEBUG)

    result = apply_verdict(CLEAN, verdict)
    head, body = result.split(b"\r\n\r\n", 1)
    assert body == b"Shall we meet at noon?\r\n"
    assert b"forged by the sender" not in head and b"X-Spam: No" not in head
    assert head.startswith(verdict.headers[0])
    assert head.count(b"X-Spam-Status:") == 1


async def test_add_header_action_marks_the_message(rspamd):
    verdict = await RspamdClient(rspamd.url).check(INPUT, message_with(GTUBE_ADD_HEADER))
    assert verdict.action == "accept"
    values = field_values(verdict.headers)
    assert values["X-Spam"] == "Yes"
    assert values["X-Spam-Action"] == "add header"
    assert values["X-Spam-Status"].startswith("Yes, score=")
    assert "GTUBE" in values["X-Spam-Status"]


async def test_rewrite_subject_action_rewrites_the_subject(rspamd):
    message = message_with(GTUBE_REWRITE_SUBJECT)
    verdict = await RspamdClient(rspamd.url).check(INPUT, message)
    assert verdict.action == "accept"
    assert verdict.subject == "*** SPAM *** Lunch on Thursday"
    result = apply_verdict(message, verdict)
    assert b"\r\nSubject: *** SPAM *** Lunch on Thursday\r\n" in result
    assert b"Subject: Lunch" not in result
    assert field_values(verdict.headers)["X-Spam"] == "Yes"


async def test_authenticated_mail_is_checked_only_with_submission_on(rspamd):
    submitted = FilterInput(**{**INPUT.__dict__, "auth_as": "me@example.com"})
    assert not RspamdClient(rspamd.url).applies_to(submitted)
    assert RspamdClient(rspamd.url).applies_to(INPUT)
    client = RspamdClient(rspamd.url, submission=True)
    assert client.applies_to(submitted)
    verdict = await client.check(submitted, message_with(GTUBE))
    assert verdict.action == "reject" and verdict.reply.startswith("550 5.7.1 ")


def test_client_from_settings():
    assert RspamdClient.from_settings(RspamdSettings()) is None
    client = RspamdClient.from_settings(RspamdSettings(
        url="http://127.0.0.1:11333", timeout=3.0, on_error="tempfail", submission=True))
    assert (client.endpoint.host, client.endpoint.port, client.endpoint.path) == (
        "127.0.0.1", 11333, "/checkv2")
    assert (client.timeout, client.on_error, client.submission) == (3.0, "tempfail", True)


# --- rspamd down ----------------------------------------------------------------------------


@pytest.mark.parametrize(("on_error", "action", "reply"), [
    ("accept", "accept", None),
    ("tempfail", "tempfail", "451 4.7.1 "),
])
async def test_rspamd_down(caplog, on_error, action, reply):
    client = RspamdClient(f"http://127.0.0.1:{free_port()}", on_error=on_error)
    verdict = await client.check(INPUT, CLEAN)
    assert (verdict.action, verdict.error) == (action, "connect")
    assert verdict.headers == []
    if reply:
        assert verdict.reply.startswith(reply)
    one_line(caplog, logging.WARNING)


# --- servers that answer badly --------------------------------------------------------------


Respond = Callable[[asyncio.StreamWriter], Awaitable[None]]


class FakeRspamd:
    """An HTTP server on loopback that records each request and answers with ``respond``."""

    def __init__(self, respond: Respond):
        self.respond = respond
        self.requests: list[tuple[bytes, bytes]] = []
        self.tasks: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def __aenter__(self) -> FakeRspamd:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        # Not task.cancel(): asyncio 3.11 logs a cancelled connection task as an error.
        for writer in self.tasks.values():
            writer.transport.abort()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks[task] = writer
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            body = await reader.readexactly(length)
            self.requests.append((head, body))
            await self.respond(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.tasks.pop(task, None)


def raw(data: bytes) -> Respond:
    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
    return respond


def answer(body: bytes, status: str = "200 OK", extra: bytes = b"") -> Respond:
    return raw(b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n"
               + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def json_answer(obj) -> Respond:
    return answer(json.dumps(obj).encode())


async def slow_drip(writer: asyncio.StreamWriter) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.05)


async def endless_chunks(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"c" * 0x10000 + b"\r\n"
    while True:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0)  # drain() does not yield while the socket takes it all


async def endless_body(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
    while True:
        writer.write(b"b" * 65536)
        await writer.drain()
        await asyncio.sleep(0)  # drain() does not yield while the socket takes it all


async def endless_headers(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    while True:
        writer.write(b"X-More: yes\r\n")
        await writer.drain()
        await asyncio.sleep(0)  # drain() does not yield while the socket takes it all


GOOD = json.dumps({"action": "no action", "score": 1.5, "required_score": 15.0,
                   "symbols": {}}).encode()


@pytest.mark.parametrize(("respond", "error"), [
    (raw(b"hello, I am not rspamd\r\n\r\n"), "bad-http"),
    (raw(b"\x00\xff" * 50000), "bad-http"),  # no line end within 8 KiB
    (raw(b"HTTP/1.1 200 OK\r\nX-Long: " + b"l" * 20000 + b"\r\n\r\n{}"), "bad-http"),
    (raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"), "bad-http"),  # cut short
    (raw(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"), "bad-http"),
    (raw(b""), "bad-http"),  # closed without a word
    (endless_headers, "bad-http"),
    (answer(GOOD, extra=b"Content-Encoding: zstd\r\n"), "bad-http"),
    (answer(GOOD, status="500 Internal Server Error"), "http-status"),
    (raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n"), "too-large"),
    (endless_chunks, "too-large"),
    (endless_body, "too-large"),
    (slow_drip, "timeout"),
    (answer(b"{not json"), "bad-json"),
    (answer(b"[" * 100000 + b"]" * 100000), "bad-json"),  # deeper than the parser goes
    (answer(b'{"action": "reject", "score": NaN, "required_score": 15}'), "bad-json"),
    # An integer too long for Python to read in linear time (int_max_str_digits).
    (answer(b'{"action": "no action", "required_score": 15, "score": 1' + b"9" * 5000 + b"}"),
     "bad-json"),
    (json_answer(["reject"]), "bad-response"),
    (json_answer({"action": "explode", "score": 1, "required_score": 15}), "bad-response"),
    (json_answer({"action": "reject", "score": "high", "required_score": 15}),
     "bad-response"),
    (json_answer({"action": "no action", "score": 1e300, "required_score": 15}),
     "bad-response"),
])
@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
async def test_bad_answers_fail_open_or_closed_with_one_line(caplog, respond, error, on_error):
    async with FakeRspamd(respond) as server:
        client = RspamdClient(server.url, timeout=1.0, on_error=on_error)
        started = time.monotonic()
        verdict = await client.check(INPUT, CLEAN)
        elapsed = time.monotonic() - started
    assert verdict.error == error
    if on_error == "accept":
        assert (verdict.action, verdict.reply, verdict.headers) == ("accept", None, [])
    else:
        assert verdict.action == "tempfail" and verdict.reply.startswith("451 4.7.1 ")
    assert elapsed < 2.5
    message = one_line(caplog, logging.WARNING)
    assert "Q123" in message


async def test_chunked_and_unsized_answers_are_read(caplog):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(GOOD[i:i + 7]), GOOD[i:i + 7])
                          for i in range(0, len(GOOD), 7))
               + b"0\r\nX-Trailer: ignored\r\n\r\n")
    for respond in (raw(chunked), raw(b"HTTP/1.0 200 OK\r\n\r\n" + GOOD)):
        async with FakeRspamd(respond) as server:
            verdict = await RspamdClient(server.url).check(INPUT, CLEAN)
        assert verdict.error is None
        assert field_values(verdict.headers)["X-Spam-Score"] == "1.50/15.00"


async def test_the_request_carries_rspamds_headers_and_the_message():
    async with FakeRspamd(answer(GOOD)) as server:
        inp = FilterInput(
            remote_addr="::ffff:192.0.2.7", remote_port=1, helo="evil\r\nPass: all",
            mail_from="", rcpt_to=("bob@example.com", "carol@example.com"),
            auth_as="me@example.com", on_tls=True, from_local_domain=True, spf_pass=True,
            queue_id="Q9", client_hostname="mail.example.org")
        message = CLEAN + b"x" * (3 * 1024 * 1024) + b"\r\n"
        verdict = await RspamdClient(server.url + "/").check(inp, message)
        (head, body), = server.requests
    assert verdict.error is None
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /checkv2 HTTP/1.1"
    fields = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
    assert ("IP", "192.0.2.7") in fields
    assert ("From", "<>") in fields
    assert [v for k, v in fields if k == "Rcpt"] == ["bob@example.com", "carol@example.com"]
    assert ("Helo", "evilPass: all") in fields  # the CR LF of the client's HELO dropped
    assert not any(k == "Pass" for k, _ in fields)
    assert ("User", "me@example.com") in fields
    assert ("Queue-Id", "Q9") in fields
    assert ("Hostname", "mail.example.org") in fields
    assert ("Content-Length", str(len(message))) in fields
    assert body == message


# --- rspamd's answer, read ------------------------------------------------------------------


def test_soft_reject_and_greylist_are_temporary():
    for action in ("soft reject", "greylist"):
        verdict = verdict_from({"action": action, "score": 5, "required_score": 15}, CLEAN)
        assert verdict.action == "tempfail" and verdict.reply.startswith("451 4.7.1 ")
    verdict = verdict_from({"action": "soft reject", "score": 0, "required_score": 15,
                            "messages": {"smtp_message": "4.7.0 Ratelimit exceeded"}}, CLEAN)
    assert verdict.reply == "451 4.7.0 Ratelimit exceeded"


def test_reject_text_comes_from_smtp_message():
    verdict = verdict_from({"action": "reject", "score": 20, "required_score": 15,
                            "messages": {"smtp_message": "Spam\r\n250 OK injected"}}, CLEAN)
    assert verdict.reply == "550 5.7.1 Spam??250 OK injected"


def test_milter_block_forms():
    verdict = verdict_from({
        "action": "no action", "score": 0, "required_score": 15,
        "milter": {
            "add_headers": {
                "X-One": {"value": "1", "order": 1},
                "X-Two": [{"value": "2a", "order": 0}, {"value": "2b"}],
                "X-Plain": "text",
                "X-Folded": {"value": "line one\nline two"},
                "Bad Name": {"value": "x"},
                "X-Injected": {"value": "v\r\n\r\nbody?"},
                "X-Spam-Status": {"value": "theirs"},
            },
            "remove_headers": {"DKIM-Signature": -1, "X-Old": 0, "Nope": "x"},
        }}, CLEAN)
    assert b"X-Two: 2a\r\n" in verdict.headers and b"X-Two: 2b\r\n" in verdict.headers
    assert b"X-One: 1\r\n" in verdict.headers
    assert b"X-Plain: text\r\n" in verdict.headers
    assert b"X-Folded: line one\r\n\tline two\r\n" in verdict.headers
    assert b"X-Injected: v\r\n\tbody?\r\n" in verdict.headers
    assert not any(h.startswith(b"Bad Name") for h in verdict.headers)
    # rspamd's own X-Spam-Status wins over ours.
    assert [h for h in verdict.headers if h.startswith(b"X-Spam-Status")] == [
        b"X-Spam-Status: theirs\r\n"]
    assert ("DKIM-Signature", -1) in verdict.remove_headers
    assert ("X-Old", 0) in verdict.remove_headers
    assert not any(name == "Nope" for name, _ in verdict.remove_headers)


def test_milter_no_action_only_says_the_action():
    verdict = verdict_from({"action": "reject", "score": 20, "required_score": 15,
                            "milter": {"no_action": True}}, CLEAN)
    assert verdict.action == "accept"
    assert verdict.headers == [b"X-Rspamd-Action: reject\r\n"]


def test_remove_headers_orders_apply_as_rspamd_means_them():
    message = (b"X-A: 1\r\nX-A: 2\r\nX-B: 1\r\nX-A: 3\r\n folded\r\nX-B: 2\r\n"
               b"Subject: s\r\n\r\nX-A: in the body\r\n")
    verdict = verdict_from({"action": "no action", "score": 0, "required_score": 1,
                            "milter": {"remove_headers": {"X-A": -1, "x-b": 0}}}, message)
    result = apply_verdict(message, verdict)
    assert result.endswith(b"X-A: 1\r\nX-A: 2\r\nSubject: s\r\n\r\nX-A: in the body\r\n")
    verdict.remove_headers = [("X-A", 2)]
    verdict.headers = []
    assert apply_verdict(message, verdict).startswith(b"X-A: 1\r\nX-B: 1\r\nX-A: 3\r\n")


def test_rewrite_subject_without_rspamds_subject_and_with_non_ascii():
    verdict = verdict_from({"action": "rewrite subject", "score": 7, "required_score": 15},
                           CLEAN)
    assert verdict.subject == "*** SPAM *** Lunch on Thursday"
    verdict = verdict_from({"action": "rewrite subject", "score": 7, "required_score": 15,
                            "subject": "*** SPAM *** Café\r\nBcc: x@evil.example"}, CLEAN)
    assert verdict.subject.startswith("=?utf-8?") and verdict.subject.isascii()
    result = apply_verdict(b"To: a@b\r\n\r\nbody\r\n", verdict)  # no Subject: one is added
    assert result.startswith(b"X-Spam: Yes\r\n") and b"\r\nBcc:" not in result
    assert b"Subject: =?utf-8?" in result and result.endswith(b"\r\n\r\nbody\r\n")


def test_symbols_in_x_spam_status_are_capped_and_folded():
    symbols = {f"SYMBOL_{i:03d}": {"score": 0.1} for i in range(200)}
    verdict = verdict_from({"action": "add header", "score": 7, "required_score": 15,
                            "symbols": symbols}, CLEAN)
    (status,) = [h for h in verdict.headers if h.startswith(b"X-Spam-Status:")]
    lines = status.split(b"\r\n")[:-1]
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:])
    assert status.count(b"SYMBOL_") == 50 and b"..." in status


# --- linear time ----------------------------------------------------------------------------


async def test_answer_size_costs_linear_time():
    """Answers of 10x and 100x the size take about 10x and 100x the time."""
    def body(count: int) -> bytes:
        symbols = {f"SYM_{i}": {"name": f"SYM_{i}", "score": 0.01, "options": ["o" * 20]}
                   for i in range(count)}
        return json.dumps({"action": "no action", "score": 0.5, "required_score": 15,
                           "symbols": symbols}).encode()

    timings = []
    for count in (100, 1_000, 10_000):
        data = body(count)
        assert len(data) < MAX_RESPONSE
        async with FakeRspamd(answer(data)) as server:
            client = RspamdClient(server.url)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                verdict = await client.check(INPUT, CLEAN)
                best = min(best, time.perf_counter() - started)
                assert verdict.error is None
        timings.append((len(data), best))
    (size1, _), (_, t10), (size100, t100) = timings
    assert size100 > 90 * size1
    assert t100 < 1.0, timings
    # Linear: 10x the answer costs at most ~10x (with room for noise), not ~100x.
    assert t100 < 30 * t10 + 0.02, timings
