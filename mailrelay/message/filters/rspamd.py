"""rspamd, natively: its HTTP protocol (``POST /checkv2``) to the normal worker.

The request carries the message and what rspamd would otherwise have to guess, as
rspamd's protocol headers (rspamd.com/doc/developers/protocol.html): ``IP``, ``Helo``,
``From``, one ``Rcpt`` per recipient, ``User`` when authenticated, ``Queue-Id`` and
``Hostname`` (the client's reverse DNS name) when known.

The answer is JSON; its ``action`` decides:

=================  =================================================================
reject             ``550 5.7.1`` (with rspamd's ``messages.smtp_message`` as the text)
soft reject        ``451 4.7.1``
greylist           ``451 4.7.1``
add header         accepted, ``X-Spam: Yes`` (or ``milter.spam_header``) added
rewrite subject    accepted, Subject: becomes rspamd's ``subject`` (else "*** SPAM *** "
                   and the old one), ``X-Spam: Yes`` added
no action          accepted
=================  =================================================================

Every accepted message also gets ``X-Spam-Action``, ``X-Spam-Score`` (score/required,
as the spamc line of chasquid's example hook) and ``X-Spam-Status`` (SpamAssassin's
shape: "No, score=0.00 required=15.00 tests=..."), plus what rspamd's ``milter`` block
asks for (``add_headers``, ``remove_headers``). Fields of those names already in the
message are removed first, so a sender cannot forge them.

HTTP/1.1 is spoken here on asyncio streams, one connection per message. Everything
read is bounded: the status line and each header line (8 KiB), the header count (100),
the body (1 MiB), the time (``filters.rspamd.timeout`` for the whole exchange). A
failure of any kind (refused connection, timeout, a status other than 200, a body too
large, not JSON, not rspamd's shape) gives one WARNING line and, per
``filters.rspamd.on_error``, acceptance (the default: fail open) or ``451 4.7.1``;
``Verdict.error`` names it for /metrics.
"""

from __future__ import annotations

import asyncio
import email.header
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ...address import parse_ip
from .verdict import FilterInput, Verdict, fold_value, smtp_reply, subject_of

if TYPE_CHECKING:
    from ...config import RspamdSettings

log = logging.getLogger("mailrelay.filters")

DEFAULT_TIMEOUT = 10.0
MAX_RESPONSE = 1024 * 1024  # rspamd's answers are a few KiB; a big one lists many symbols
MAX_LINE = 8 * 1024
MAX_HEADERS = 100
MAX_ADDED_FIELDS = 50  # from the milter block
MAX_TESTS = 50  # symbol names in X-Spam-Status
_BODY_CHUNK = 256 * 1024
_PARSE_INLINE = 64 * 1024  # bigger JSON bodies are parsed in a thread

ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")
SPAM_PREFIX = "*** SPAM *** "
OUR_FIELDS = ("X-Spam-Action", "X-Spam-Score", "X-Spam-Status")
DEFAULT_SPAM_HEADER = "X-Spam"
ERROR_REPLY = "451 4.7.1 Cannot check the message for spam now, try again later"

_FIELD_NAME = re.compile(r"[!-9;-~]{1,100}")
_SYMBOL = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_VALUE_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # CR, LF, NUL... must never reach a request


class RspamdError(Exception):
    """rspamd did not give a usable answer; ``label`` is short and stable, for /metrics."""

    def __init__(self, label: str, detail: str):
        super().__init__(detail)
        self.label = label


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int
    path: str
    host_header: str


def parse_url(url: str) -> _Endpoint:
    """``http://host:port[/prefix]`` → where to connect and the path of ``/checkv2``."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"{url!r}: expected http://host:port")
    path = parts.path.rstrip("/") + "/checkv2"
    return _Endpoint(parts.hostname, parts.port, path, parts.netloc)


def _header_value(value: str) -> bytes:
    # The values come from the SMTP client (HELO, addresses): no CR/LF may pass, or the
    # client could add headers of its own to the request (Settings:, Pass: all...).
    return _VALUE_UNSAFE.sub("", value).encode("utf-8", "replace")


def _plain_ip(text: str) -> str:
    ip = parse_ip(text)
    return text if ip is None else str(ip)


def build_request(endpoint: _Endpoint, inp: FilterInput, length: int) -> bytes:
    """The request head of ``POST /checkv2`` for a message of ``length`` bytes."""
    fields: list[tuple[str, str]] = [
        ("Host", endpoint.host_header),
        ("Connection", "close"),
        ("Content-Length", str(length)),
        ("IP", _plain_ip(inp.remote_addr)),
        ("From", inp.mail_from or "<>"),
    ]
    if inp.helo:
        fields.append(("Helo", inp.helo))
    fields.extend(("Rcpt", rcpt) for rcpt in inp.rcpt_to)
    if inp.auth_as:
        fields.append(("User", inp.auth_as))
    if inp.queue_id:
        fields.append(("Queue-Id", inp.queue_id))
    if inp.client_hostname:
        fields.append(("Hostname", inp.client_hostname))
    head = [f"POST {endpoint.path} HTTP/1.1".encode("ascii")]
    head.extend(name.encode("ascii") + b": " + _header_value(value) for name, value in fields)
    return b"\r\n".join(head) + b"\r\n\r\n"


# --- HTTP/1.1, the few parts of it rspamd uses ----------------------------------------------


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise RspamdError("bad-http", f"a line longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError:
        raise RspamdError("bad-http", "the connection closed in the middle of the answer") \
            from None


async def _read_response(reader: asyncio.StreamReader, max_body: int) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.x response, with every part bounded."""
    status_line = (await _line(reader)).rstrip(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: .*)?", status_line)
    if not match:
        raise RspamdError("bad-http", f"not an HTTP status line: {status_line[:80]!r}")
    status = int(match.group(1))
    headers: dict[bytes, bytes] = {}
    for _ in range(MAX_HEADERS + 1):
        line = (await _line(reader)).rstrip(b"\r\n")
        if not line:
            break
        name, colon, value = line.partition(b":")
        if not colon:
            raise RspamdError("bad-http", f"not an HTTP header: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    else:
        raise RspamdError("bad-http", f"more than {MAX_HEADERS} header fields")
    encoding = headers.get(b"content-encoding", b"identity").lower()
    if encoding != b"identity":
        raise RspamdError("bad-http", f"unasked-for Content-Encoding {encoding[:40]!r}")
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return status, await _read_chunked(reader, max_body)
    if b"content-length" in headers:
        text = headers[b"content-length"]
        if not re.fullmatch(rb"\d{1,15}", text):
            raise RspamdError("bad-http", f"bad Content-Length {text[:40]!r}")
        length = int(text)
        if length > max_body:
            raise RspamdError("too-large", f"an answer of {length} bytes (at most {max_body})")
        try:
            return status, await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise RspamdError("bad-http", "the answer is shorter than its Content-Length") \
                from None
    body = await reader.read(max_body + 1)  # no length: the body ends with the connection
    chunks = [body]
    size = len(body)
    while body and size <= max_body:
        body = await reader.read(max_body + 1 - size)
        chunks.append(body)
        size += len(body)
    if size > max_body:
        raise RspamdError("too-large", f"an answer of more than {max_body} bytes")
    return status, b"".join(chunks)


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        line = (await _line(reader)).rstrip(b"\r\n")
        match = re.fullmatch(rb"([0-9A-Fa-f]{1,8})(?:;.*)?", line)
        if not match:
            raise RspamdError("bad-http", f"bad chunk size {line[:40]!r}")
        length = int(match.group(1), 16)
        if length == 0:
            break
        size += length
        if size > max_body:
            raise RspamdError("too-large", f"an answer of more than {max_body} bytes")
        try:
            chunks.append(await reader.readexactly(length))
            end = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise RspamdError("bad-http", "the connection closed in the middle of a chunk") \
                from None
        if end != b"\r\n":
            raise RspamdError("bad-http", "a chunk does not end with CRLF")
    for _ in range(MAX_HEADERS + 1):  # trailer fields, ignored
        if not (await _line(reader)).rstrip(b"\r\n"):
            return b"".join(chunks)
    raise RspamdError("bad-http", f"more than {MAX_HEADERS} trailer fields")


# --- rspamd's answer ------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number rspamd sends")


def parse_json(body: bytes) -> Any:
    """json.loads in linear time (CPython's parser), NaN/Infinity refused."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RspamdError("bad-json", f"the answer is not JSON ({str(exc)[:80]})") from None


def _number(result: dict[str, Any], key: str) -> float:
    value = result.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RspamdError("bad-response", f"{key} is not a number")
    value = float(value)
    if not math.isfinite(value) or abs(value) > 1e9:
        raise RspamdError("bad-response", f"{key} is out of range")
    return value


def _field(name: str, value: str) -> bytes:
    return f"{name}: {fold_value(value)}\r\n".encode()


def _fold_list(prefix: str, items: list[str], width: int = 60) -> str:
    """``prefix`` then ``items`` joined with commas, folded at about ``width`` characters
    (a field name of up to 16 characters still keeps lines within 78)."""
    lines, line = [], prefix
    for index, item in enumerate(items):
        piece = item + ("," if index < len(items) - 1 else "")
        if len(line) + len(piece) > width and line.strip():
            lines.append(line)
            line = "\t"
        line += piece
    lines.append(line)
    return "\r\n".join(lines)


def _milter_adds(add: Any) -> list[tuple[int, str, str]]:
    """rspamd's milter.add_headers: {name: {value, order} | [{value, order}...] | value}."""
    if not isinstance(add, dict):
        return []
    found: list[tuple[int, str, str]] = []
    for name, spec in add.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            continue
        for item in (spec if isinstance(spec, list) else [spec])[:MAX_ADDED_FIELDS]:
            order = 0
            if isinstance(item, dict):
                value, order = item.get("value"), item.get("order", 0)
                if isinstance(order, bool) or not isinstance(order, int):
                    order = 0
            else:
                value = item
            if isinstance(value, str) and fold_value(value):
                found.append((order, name, value))
            if len(found) >= MAX_ADDED_FIELDS:
                return found
    return found


def _milter_removes(remove: Any) -> list[tuple[str, int]]:
    if not isinstance(remove, dict):
        return []
    found = []
    for name, order in list(remove.items())[:MAX_ADDED_FIELDS]:
        if (isinstance(name, str) and _FIELD_NAME.fullmatch(name)
                and isinstance(order, int) and not isinstance(order, bool)):
            found.append((name, order))
    return found


def _encode_subject(subject: str) -> str:
    subject = fold_value(subject.replace("\r", " ").replace("\n", " "), 998)
    if subject.isascii():
        return subject
    return email.header.Header(subject, "utf-8").encode(linesep="\r\n")


def verdict_from(result: Any, message: bytes) -> Verdict:
    """rspamd's JSON answer as a verdict; RspamdError when it is not rspamd's shape."""
    if not isinstance(result, dict):
        raise RspamdError("bad-response", "the answer is not a JSON object")
    action = result.get("action")
    if action not in ACTIONS:
        raise RspamdError("bad-response", f"unknown action {str(action)[:40]!r}")
    score, required = _number(result, "score"), _number(result, "required_score")
    messages = result.get("messages")
    smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
    text = smtp_message if isinstance(smtp_message, str) else ""
    milter = result.get("milter")
    milter = milter if isinstance(milter, dict) else {}

    if milter.get("no_action") is True:
        # rspamd's milter protocol: "instead of doing any action to a message, just add
        # header X-Rspamd-Action equal to that action and accept message".
        return Verdict("accept", headers=[_field("X-Rspamd-Action", action)])
    if action == "reject":
        return Verdict("reject", smtp_reply(550, "5.7.1", text, "Message refused as spam"))
    if action in ("soft reject", "greylist"):
        return Verdict("tempfail", smtp_reply(451, "4.7.1", text, "Try again later"))

    spam = action in ("add header", "rewrite subject")
    added = _milter_adds(milter.get("add_headers"))
    taken = {name.lower() for _, name, _ in added}
    spam_header = milter.get("spam_header")
    if not isinstance(spam_header, str) or not _FIELD_NAME.fullmatch(spam_header):
        spam_header = DEFAULT_SPAM_HEADER
    symbols = result.get("symbols")
    tests = sorted(name for name in symbols if isinstance(name, str) and _SYMBOL.fullmatch(name)) \
        if isinstance(symbols, dict) else []
    if len(tests) > MAX_TESTS:
        tests = [*tests[:MAX_TESTS], "..."]
    ours = [
        ("X-Spam-Action", action),
        ("X-Spam-Score", f"{score:.2f}/{required:.2f}"),
        ("X-Spam-Status", _fold_list(
            f"{'Yes' if spam else 'No'}, score={score:.2f} required={required:.2f} tests=",
            tests or ["none"])),
    ]
    if spam:
        ours.insert(0, (spam_header, "Yes"))
    headers = [_field(name, value) for name, value in ours if name.lower() not in taken]
    headers += [_field(name, value) for _, name, value in sorted(added, key=lambda a: a[0])]
    # Fields of our names already in the message are a sender's forgery: out with them.
    remove = [(name, 0) for name in (spam_header, *OUR_FIELDS)]
    remove += _milter_removes(milter.get("remove_headers"))
    subject = None
    if action == "rewrite subject":
        new = result.get("subject")
        if not isinstance(new, str) or not new.strip():
            new = SPAM_PREFIX + (subject_of(message) or "")
        subject = _encode_subject(new)
    return Verdict("accept", headers=headers, subject=subject, remove_headers=remove)


# --- the client -----------------------------------------------------------------------------


class RspamdClient:
    """Checks messages with one rspamd (its normal worker, or its proxy)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT, on_error: str = "accept",
                 submission: bool = False, max_response: int = MAX_RESPONSE):
        if on_error not in ("accept", "tempfail"):
            raise ValueError(f"on_error: expected accept or tempfail, not {on_error!r}")
        self.url = url
        self.endpoint = parse_url(url)
        self.timeout = timeout
        self.on_error = on_error
        self.submission = submission
        self.max_response = max_response

    @classmethod
    def from_settings(cls, settings: RspamdSettings) -> RspamdClient | None:
        """The client filters.rspamd asks for, or None when it is off (no url)."""
        if not settings.url:
            return None
        return cls(settings.url, timeout=settings.timeout, on_error=settings.on_error,
                   submission=settings.submission)

    def applies_to(self, inp: FilterInput) -> bool:
        """Mail from outside always; authenticated mail only with ``submission: true``."""
        return inp.auth_as is None or self.submission

    async def check(self, inp: FilterInput, message: bytes) -> Verdict:
        """rspamd's verdict on ``message``; never raises (errors follow ``on_error``).

        One log line at most: WARNING when rspamd failed, INFO for an action other than
        "no action", DEBUG else.
        """
        where = "rspamd" + (f" ({inp.queue_id})" if inp.queue_id else "")
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await self._exchange(inp, message)
            if status != 200:
                raise RspamdError("http-status", f"HTTP status {status}")
            if len(body) > _PARSE_INLINE:
                result = await asyncio.to_thread(parse_json, body)
            else:
                result = parse_json(body)
            verdict = verdict_from(result, message)
        except RspamdError as exc:
            return self._failed(where, exc.label, str(exc))
        except TimeoutError:
            return self._failed(where, "timeout", f"no answer within {self.timeout:g}s")
        except OSError as exc:
            return self._failed(where, "io", exc.strerror or type(exc).__name__)
        except Exception as exc:  # a bug here must not cost the message or a traceback
            return self._failed(where, "internal", f"{type(exc).__name__}: {exc}"[:200])
        action = result.get("action")
        score = f"score {result.get('score')}/{result.get('required_score')}"
        if verdict.action != "accept":
            log.info("%s: %s (%s): %s", where, action, score, verdict.reply)
        elif action != "no action":
            log.info("%s: %s (%s)", where, action, score)
        else:
            log.debug("%s: %s (%s)", where, action, score)
        return verdict

    def _failed(self, where: str, label: str, detail: str) -> Verdict:
        outcome = "accepted unchecked" if self.on_error == "accept" else "answered 451"
        log.warning("%s at %s: %s: %s", where, self.url, detail, outcome)
        if self.on_error == "accept":
            return Verdict("accept", error=label)
        return Verdict("tempfail", ERROR_REPLY, error=label)

    async def _exchange(self, inp: FilterInput, message: bytes) -> tuple[int, bytes]:
        endpoint = self.endpoint
        try:
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port,
                                                           limit=MAX_LINE)
        except OSError as exc:
            raise RspamdError("connect", f"cannot connect: {exc.strerror or exc}") from None
        try:
            writer.write(build_request(endpoint, inp, len(message)))
            view = memoryview(message)
            for start in range(0, len(view), _BODY_CHUNK):
                writer.write(view[start:start + _BODY_CHUNK])
                await writer.drain()
            await writer.drain()
            return await _read_response(reader, self.max_response)
        finally:
            writer.transport.abort()
