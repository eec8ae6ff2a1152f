"""The mail log and the metrics.

Every event of interest (a connection, a login, a refusal, a queued message, a delivery
attempt, a bounce) goes through one method of ``Events``, which writes one line on the
``mailrelay.mail`` logger and updates the Prometheus metrics of the server. The line is
an event word followed by ``key=value`` fields in a fixed order (README, "Mail log"):

    auth-failed ip=203.0.113.9 port=submission user="me@example.com" reason="535 5.7.8" ...

Values are written bare when they are printable ASCII without spaces, quotes or
backslashes, else in double quotes with ``\\"``, ``\\\\`` and ``\\xNN`` (control characters)
escapes; fields that carry client-controlled or free text (``user``, ``reason``,
``reply``) are always quoted, so a value can never be mistaken for another field or line
(fail2ban relies on this).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .metrics import Counter, Gauge, Histogram, Registry

if TYPE_CHECKING:
    from ..delivery.results import RecipientResult
    from ..policy.authres import AuthResults
    from ..queue import Queue, QueueItem, Recipient
    from ..smtp.session import SessionInfo

log = logging.getLogger("mailrelay.mail")

_BARE = re.compile(r"[!#-\[\]-~]+")  # printable ASCII but space, '"' and '\'
MAX_VALUE = 300  # a client cannot make a line arbitrarily long
ALWAYS_QUOTED = frozenset({"user", "reason", "reply"})
# SMTP verbs we answer; anything else is counted as "unknown" (bounded label values).
VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY",
                   "EXPN", "HELP", "STARTTLS", "AUTH"})
PORT_KINDS = ("smtp", "submission", "submission_tls")  # smtp.session.Port values
# Queued-to-delivered: seconds for local mail, up to days for retried remote mail.
LATENCY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)


def quote(value: str) -> str:
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:  # control characters: a newline would start a forged line
            out.append("".join(f"\\x{b:02x}" for b in char.encode("utf-8")))
    return '"' + "".join(out) + '"'


def format_value(key: str, value: object) -> str:
    text = str(value)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
    if key in ALWAYS_QUOTED or not _BARE.fullmatch(text):
        return quote(text)
    return text


def format_line(event: str, fields: Iterable[tuple[str, object]]) -> str:
    """``event key=value ...``; fields whose value is None are left out."""
    parts = [event]
    parts += [f"{key}={format_value(key, value)}" for key, value in fields if value is not None]
    return " ".join(parts)


def _check_fields(checks: AuthResults | None) -> list[tuple[str, object]]:
    if checks is None:
        return []
    dkim = ",".join(result for result, _, _ in checks.dkim) or "none"
    return [("spf", checks.spf), ("dkim", dkim), ("dmarc", checks.dmarc)]


def angle(address: str | None) -> str | None:
    return None if address is None else f"<{address}>"


def angles(addresses: Iterable[str]) -> str:
    return ",".join(f"<{a}>" for a in addresses)


def originals(recipients: Iterable[Recipient]) -> str | None:
    """``orig_to``: the addresses the sender wrote where aliases led elsewhere (None: none)."""
    found = list(dict.fromkeys(r.original for r in recipients if r.original))
    return angles(found) if found else None


def reply_code(reply: str) -> str:
    """``"535 5.7.8"`` of ``"535 5.7.8 Authentication credentials invalid"``."""
    parts = reply.split()
    if len(parts) > 1 and parts[1].count(".") == 2:
        return f"{parts[0]} {parts[1]}"
    return parts[0] if parts else ""


def queue_gauges(queue: Queue) -> Callable[[], Iterator[tuple[str, str, float]]]:
    """Queue gauges computed at scrape time (the queue is the truth; no bookkeeping)."""

    def collect() -> Iterator[tuple[str, str, float]]:
        items = list(queue.items.values())
        now = time.time()
        yield "mailrelay_queue_messages", "Messages in the queue", len(items)
        yield ("mailrelay_queue_recipients", "Recipients still to deliver",
               sum(len(item.pending) for item in items))
        oldest = min((item.created for item in items), default=now)
        yield ("mailrelay_queue_oldest_age_seconds",
               "Age of the oldest queued message (0 when empty)", max(0.0, now - oldest))

    return collect


class Events:
    """One server's mail log and metrics (a private registry: tests run several servers
    in one process)."""

    def __init__(self, registry: Registry | None = None):
        self.registry = registry if registry is not None else Registry()
        r = self.registry
        self.connections = Counter("mailrelay_smtp_connections",
                                   "SMTP connections accepted, by port kind", ["port"],
                                   registry=r)
        self.connections_open = Gauge("mailrelay_smtp_connections_open",
                                      "SMTP connections open now, by port kind", ["port"],
                                      registry=r)
        self.connections_refused = Counter("mailrelay_smtp_connections_refused",
                                           "SMTP connections refused at once (limits)",
                                           ["port"], registry=r)
        self.tls_in = Counter("mailrelay_smtp_tls",
                              "TLS sessions established by clients, by port kind and version",
                              ["port", "version"], registry=r)
        self.commands = Counter("mailrelay_smtp_commands", "SMTP commands received, by verb",
                                ["verb"], registry=r)
        self.replies = Counter("mailrelay_smtp_replies", "SMTP replies sent, by code",
                               ["code"], registry=r)
        self.rejections = Counter("mailrelay_smtp_rejections",
                                  "Refused connections, MAIL, RCPT and DATA commands",
                                  ["command", "code"], registry=r)
        self.auth = Counter("mailrelay_auth", "AUTH attempts: success, failure or blocked "
                            "(the client IP is over auth_failures_per_ip)", ["result"],
                            registry=r)
        self.queued = Counter("mailrelay_messages_queued",
                              "Messages accepted into the queue, by port kind", ["port"],
                              registry=r)
        # The mail log's words: result sent | temporary | permanent, final yes | no (no: it
        # is retried), via mx | relay | local | pipe.
        self.deliveries = Counter("mailrelay_deliveries",
                                  "Delivery attempts, one per recipient: result sent, "
                                  "temporary or permanent; final=no when it is retried",
                                  ["result", "final", "via"], registry=r)
        self.latency = Histogram("mailrelay_delivery_latency_seconds",
                                 "Time from queued to delivered, per recipient",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tls_out = Counter("mailrelay_delivery_tls",
                               "Attempts at remote MX hosts, by TLS state "
                               "(verified, unverified, plain) and version",
                               ["state", "version"], registry=r)
        self.dsns = Counter("mailrelay_dsn_generated",
                            "Delivery status notifications sent to senders, by kind",
                            ["kind"], registry=r)
        self.dkim = Counter("mailrelay_dkim_signatures",
                            "DKIM signatures made, by domain and algorithm",
                            ["domain", "algorithm"], registry=r)
        self.filter_runs = Counter("mailrelay_filter_runs",
                                   "Filter checks (post-data, rspamd, alias-resolve), by "
                                   "filter and verdict: accept, reject or tempfail",
                                   ["filter", "action"], registry=r)
        self.filter_errors = Counter("mailrelay_filter_errors",
                                     "Filter checks that got no real answer (timeout, "
                                     "connect, ...), by filter and error", ["filter", "error"],
                                     registry=r)

        # Series that exist from the start, at 0, so rate() and alerts see them at once.
        for port in PORT_KINDS:
            self.connections.labels(port)
            self.queued.labels(port)
        for result in ("success", "failure", "blocked"):
            self.auth.labels(result)
        for result, final in (("sent", "yes"), ("temporary", "no"), ("temporary", "yes"),
                              ("permanent", "yes")):
            self.deliveries.labels(result, final, "mx")
            self.deliveries.labels(result, final, "local")
        for kind in ("failed", "delayed"):
            self.dsns.labels(kind)

    def watch_queue(self, queue: Queue) -> None:
        self.registry.collectors.append(queue_gauges(queue))

    @staticmethod
    def _write(event: str, fields: Sequence[tuple[str, Any]], level: int = logging.INFO) -> None:
        if log.isEnabledFor(level):
            log.log(level, "%s", format_line(event, fields))

    # -- SMTP sessions ----------------------------------------------------------

    def connected(self, info: SessionInfo) -> None:
        port = info.port.value
        self.connections.labels(port).inc()
        self.connections_open.labels(port).inc()
        self._write("connect", [("ip", info.peer_ip), ("port", port),
                                ("session", info.session_id)])

    def disconnected(self, info: SessionInfo, duration: float) -> None:
        port = info.port.value
        self.connections_open.labels(port).dec()
        self._write("disconnect", [("ip", info.peer_ip), ("port", port),
                                   ("user", info.user), ("duration", f"{duration:.3f}"),
                                   ("session", info.session_id)])

    def tls_established(self, info: SessionInfo) -> None:
        self.tls_in.labels(info.port.value, info.tls_version or "unknown").inc()
        self._write("tls", [("ip", info.peer_ip), ("port", info.port.value),
                            ("version", info.tls_version), ("cipher", info.tls_cipher),
                            ("session", info.session_id)])

    def command(self, verb: str) -> None:
        self.commands.labels(verb if verb in VERBS else "unknown").inc()

    def reply(self, code: str) -> None:
        self.replies.labels(code if code.isdigit() and len(code) == 3 else "other").inc()

    def auth_ok(self, info: SessionInfo, user: str) -> None:
        self.auth.labels("success").inc()
        self._write("auth-ok", [("ip", info.peer_ip), ("port", info.port.value),
                                ("user", user), ("session", info.session_id)])

    def auth_failed(self, info: SessionInfo, username: str, reply: str,
                    blocked: bool = False, note: str | None = None) -> None:
        """A refused login. fail2ban counts those whose reason is the bare code (a wrong
        password, a login from a blocked IP); a ``note`` after the code marks one it
        must not count (README, "Mail log"). Only the name the client gave is written,
        never the password or AUTH data."""
        self.auth.labels("blocked" if blocked else "failure").inc()
        reason = reply_code(reply) + (f" {note}" if note else "")
        self._write("auth-failed", [("ip", info.peer_ip), ("port", info.port.value),
                                    ("user", username), ("reason", reason),
                                    ("session", info.session_id)], logging.WARNING)

    def rejected(self, info: SessionInfo, command: str, reply: str, sender: str | None = None,
                 recipients: Sequence[str] = ()) -> None:
        """A refused MAIL, RCPT or DATA (or CONNECT: a connection over the limits)."""
        self.rejections.labels(command, reply[:3]).inc()
        if command == "CONNECT":
            self.connections_refused.labels(info.port.value).inc()
        self._write("reject", [("ip", info.peer_ip), ("port", info.port.value),
                               ("cmd", command), ("user", info.user),
                               ("from", angle(sender)),
                               ("to", angles(recipients) if recipients else None),
                               ("reply", reply), ("session", info.session_id or None)])

    def queued_message(self, info: SessionInfo, item: QueueItem,
                       checks: AuthResults | None = None) -> None:
        """``checks``: what SPF, DKIM and DMARC said of mail from outside (None: our user's)."""
        self.queued.labels(info.port.value).inc()
        self._write("queued", [("id", item.id), ("ip", info.peer_ip),
                               ("port", info.port.value), ("user", info.user),
                               ("from", angle(item.sender)),
                               ("to", angles(r.address for r in item.recipients)),
                               ("orig_to", originals(item.recipients)),
                               ("size", item.size), ("session", info.session_id),
                               *_check_fields(checks)])

    # -- delivery ---------------------------------------------------------------

    def delivery_attempt(self, item: QueueItem, rcpt: Recipient, result: RecipientResult,
                         final: bool) -> None:
        """One recipient's attempt; ``final``: no retry follows (sent, or failed for good)."""
        host = result.remote_host
        outcome = result.outcome.value  # sent | temporary | permanent
        self.deliveries.labels(outcome, "yes" if final else "no", result.via).inc()
        if outcome == "sent":
            self.latency.observe(max(0.0, time.time() - item.created))
        # Else there was no TLS state ("-": a host named but never talked to).
        connected = result.via in ("mx", "relay") and host is not None and result.tls != "-"
        if connected:
            self.tls_out.labels(result.tls, result.tls_version or "none").inc()
        self._write("delivery", [("id", item.id), ("to", angle(result.address)),
                                 ("orig_to", angle(rcpt.original or None)),
                                 ("result", outcome),
                                 ("final", "yes" if final else "no"),
                                 ("host", host or "-"), ("via", result.via),
                                 ("tls", result.tls if connected else "-"),
                                 ("attempt", item.attempts), ("reply", result.reply)])

    def removed(self, item: QueueItem, dsn_id: str | None) -> None:
        """``mailrelay queue remove``: the message is gone; ``to`` lists the recipients it
        had not reached (``dsn``: the bounce that tells the sender, if one was sent)."""
        pending = [r for r in item.recipients if r.status == "pending"]
        self._write("removed", [("id", item.id), ("from", angle(item.sender)),
                                ("to", angles(r.address for r in pending) or None),
                                ("orig_to", originals(pending)), ("dsn", dsn_id)])

    def dsn_generated(self, dsn_id: str, for_id: str, to: str, recipients: Sequence[str],
                      kind: str = "failed") -> None:
        self.dsns.labels(kind).inc()
        self._write("dsn", [("id", dsn_id), ("for", for_id), ("to", angle(to)),
                            ("kind", kind), ("rcpts", angles(recipients))])

    # -- signing ----------------------------------------------------------------

    def dkim_signed(self, domain: str, algorithms: Iterable[str]) -> None:
        for algorithm in algorithms:
            self.dkim.labels(domain, algorithm).inc()

    # -- filters ----------------------------------------------------------------

    def filter_checked(self, name: str, action: str, error: str | None = None) -> None:
        """One check by a filter; ``error``: why it gave no real answer (it may still
        have accepted: rspamd failing open)."""
        self.filter_runs.labels(name, action).inc()
        if error:
            self.filter_errors.labels(name, error).inc()
