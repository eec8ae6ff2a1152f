"""Delivery to remote MX hosts with aiosmtplib: one transaction per domain and host.

TLS (RFC 3207, RFC 7435): STARTTLS with a verifying context first ("verified": the
chain leads to a trust anchor and the certificate names the MX host); when only the
certificate check fails, again on a new connection without verification ("unverified");
without STARTTLS, or after a failed handshake when allowed, in the clear ("plain").
A domain's MTA-STS policy (RFC 8461) in "enforce" mode allows only verified TLS to the
MX hosts it names; in "testing" mode what enforce would refuse is only logged.

Connections are limited in all and per destination domain, and stay open for a short
while after a transaction so the next message for the same MX host reuses them.

Mail for the domains of ``delivery.relay`` goes to that smarthost instead (relay.py opens
the verified, authenticated connection); the transaction, the limits and the reuse are
the same. Direct connections bind to ``delivery.source_ipv4``/``source_ipv6`` and try
only the MX addresses of ``delivery.ip_families``.

SMTPUTF8 (RFC 6531): an address with a non-ASCII local part needs it; its domain, and
the domain of an address whose local part is ASCII, goes as A-labels, which needs
nothing. A server without SMTPUTF8 cannot take a non-ASCII address: that recipient
(every recipient, for a non-ASCII sender) fails for good with 553 5.6.7 (RFC 6531 3.5).
UTF-8 in the header section asks for SMTPUTF8 where it is offered; where it is not, the
message is sent as before (8BITMIME), as chasquid does, rather than bounced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib
import aiosmtplib.protocol
import aiosmtplib.smtp

from ..message.headers import header_section
from .mx import MXHost, PermanentDNSError, TemporaryDNSError, resolve_mx
from .relay import Relay, RelayFailure
from .results import (
    MX,
    NOT_CONNECTED,
    PLAIN,
    RELAY,
    UNVERIFIED,
    VERIFIED,
    Outcome,
    RecipientResult,
    verifying_tls_context,
)

log = logging.getLogger("mailrelay.delivery")

# How long a host whose certificate does not verify goes straight to unverified TLS,
# so it does not cost two connections per message; and how many such hosts we remember.
UNVERIFIABLE_MEMORY = 3600.0
_UNVERIFIABLE_MAX = 10_000
_QUIT_TIMEOUT = 5.0


class _LinearReplyProtocol(aiosmtplib.protocol.SMTPProtocol):
    """aiosmtplib's protocol, but linear in the length of a reply.

    aiosmtplib parses everything buffered for a reply again on each chunk that ends a
    line, so a remote host that drips a multi-line reply line by line costs quadratic
    CPU on the event loop: 8 s for one 32 KiB EHLO reply (its cap), per command. Here
    chunks are only buffered until one ends the reply's last line (no '-' after the
    code), and then the library parses the reply once. Its caps (8 KiB per line, 32 KiB
    per reply) and the command timeouts still bound the rest.
    """

    def data_received(self, data: bytes) -> None:
        # (_response_pending: aiosmtplib 5; an older one without it is always waiting.)
        waiting = (self._response_waiter is not None
                   and getattr(self, "_response_pending", True)
                   and not self._response_waiter.done())
        if (not waiting
                or len(self._buffer) + len(data) > aiosmtplib.protocol.MAX_RESPONSE_LENGTH
                or self._ends_reply(data)):
            super().data_received(data)
        else:
            self._buffer.extend(data)

    def _ends_reply(self, data: bytes) -> bool:
        """Whether the last line ``data`` completes is a final reply line. Each line is
        looked at once, when it completes."""
        end = data.rfind(b"\n")
        if end < 0:
            return False
        start = data.rfind(b"\n", 0, end) + 1
        if start:
            head = data[start:start + 4]
        else:  # the line began in an earlier chunk
            begin = self._buffer.rfind(b"\n") + 1
            head = (bytes(self._buffer[begin:begin + 4]) + data[:4])[:4]
        return head[3:4] != b"-"


# aiosmtplib.SMTP makes its protocol by this module-level name.
aiosmtplib.smtp.SMTPProtocol = _LinearReplyProtocol  # type: ignore[misc]


class STSPolicy(Protocol):
    """A domain's MTA-STS policy (mailrelay.delivery.mta_sts provides it)."""

    @property
    def mode(self) -> str: ...  # "enforce" | "testing" ("none" policies are not returned)

    def matches(self, mx_host: str) -> bool: ...


class PolicySource(Protocol):
    async def policy_for(self, domain: str) -> STSPolicy | None: ...


class HostFailure(Exception):
    """This host could not take the message; try the next one (or retry later)."""

    def __init__(self, reply: str, permanent: bool = False, sts: bool = False,
                 tls: str | None = None):
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent
        self.sts = sts  # refused by the MTA-STS policy
        self.tls = tls  # the connection's TLS state when it failed (None: not known)


class _Stale(Exception):
    """A reused connection failed before the transaction started: open a new one."""


def _reply_text(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def envelope_address(address: str) -> tuple[str, bool]:
    """(the address as sent, whether it needs SMTPUTF8): the domain as A-labels, so only
    a non-ASCII local part needs the extension."""
    if address.isascii():
        return address, False
    local, at, domain = address.rpartition("@")
    if not at:
        return address, True
    # Queued addresses were checked at RCPT; one the codec refuses stays as it is (and
    # so needs SMTPUTF8).
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")
    wire = f"{local}@{domain}"
    return wire, not wire.isascii()


def _no_smtputf8(host: str, address: str) -> str:
    # RFC 6531 3.5: 553, and X.6.7 "non-ASCII addresses not permitted for that
    # sender/recipient".
    return (f"553 5.6.7 {host} does not support SMTPUTF8, which the non-ASCII address "
            f"<{address}> needs")


def _opportunistic_tls_context() -> ssl.SSLContext:
    # Opportunistic STARTTLS (RFC 7435): encrypt even when the certificate cannot be
    # verified (the verifying context is tried first; see _negotiate).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _Limits:
    """Open outbound connections, in all and per destination domain.

    A counter rather than semaphores: a pooled idle connection holds its slot, and a
    delivery that finds no free slot closes an idle one instead of waiting for it to
    expire, which needs to know whose slot is whose.
    """

    def __init__(self, total: int, per_domain: int):
        self.total = max(1, total)
        self.per_domain = max(1, per_domain)
        self.open = 0
        self.by_domain: dict[str, int] = {}
        self._waiters: list[asyncio.Future[None]] = []

    def room(self, domain: str) -> tuple[bool, bool]:
        """(room in all, room for ``domain``)"""
        return self.open < self.total, self.by_domain.get(domain, 0) < self.per_domain

    def take(self, domain: str) -> None:
        self.open += 1
        self.by_domain[domain] = self.by_domain.get(domain, 0) + 1

    def release(self, domain: str) -> None:
        self.open -= 1
        self._decrement(domain)
        self.notify()

    def move(self, old: str, new: str) -> bool:
        """Count a (pooled) connection for another domain, if that domain has room."""
        if old == new:
            return True
        if self.by_domain.get(new, 0) >= self.per_domain:
            return False
        self.by_domain[new] = self.by_domain.get(new, 0) + 1
        self._decrement(old)
        self.notify()
        return True

    def _decrement(self, domain: str) -> None:
        left = self.by_domain[domain] - 1
        if left:
            self.by_domain[domain] = left
        else:
            del self.by_domain[domain]

    def notify(self) -> None:
        """Something changed (a slot freed, a connection went idle): waiters look again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    host: str  # the MX name (what the certificate was checked against)
    address: str
    port: int
    tls: str
    domain: str  # whose per-domain slot this connection holds (the relay's: Relay.slot)
    tls_version: str | None = None
    via: str = MX  # mx | relay (logged in to the smarthost)
    idle_since: float = 0.0
    expiry: asyncio.TimerHandle | None = None
    released: bool = False

    @property
    def key(self) -> tuple[str, str, int, str, str]:
        # The name is part of the key: "verified" was checked against this name only.
        return self.host, self.address, self.port, self.tls, self.via


@contextlib.contextmanager
def _closed_on_failure(smtp: aiosmtplib.SMTP, where: str) -> Iterator[None]:
    """Close ``smtp`` on any failure; SMTP and network errors become this host's failure."""
    try:
        yield
    except HostFailure:
        smtp.close()
        raise
    except aiosmtplib.SMTPResponseException as exc:  # e.g. EHLO refused
        smtp.close()
        raise HostFailure(_reply_text(exc.code, exc.message)) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        smtp.close()
        raise HostFailure(f"451 4.4.2 {where}: {exc}") from None
    except BaseException:
        smtp.close()
        raise


class RemoteDelivery:
    """SMTP delivery of one message to one domain's recipients (``deliver``).

    It finds where to send (the domain's MX hosts, or the smarthost of ``relay``), opens
    or reuses a connection within the limits, runs one transaction and answers with a
    RecipientResult per recipient, in order. It keeps no queue state: retries, bounces
    and the mail log are the DeliveryManager's.
    """

    def __init__(
        self,
        hostname: str,
        resolver,
        smtp_port: int = 25,
        max_mx_hosts: int = 5,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        *,
        max_connections: int = 100,
        max_connections_per_domain: int = 10,
        connection_idle_time: float = 5.0,
        tls_fallback_plain: bool = True,
        verify_context: ssl.SSLContext | None = None,
        policies: PolicySource | None = None,
        relay: Relay | None = None,
        source_ipv4: str | None = None,
        source_ipv6: str | None = None,
        ip_families: tuple[str, ...] = ("ipv4", "ipv6"),
    ):
        self.hostname = hostname
        self.resolver = resolver
        self.smtp_port = smtp_port
        self.max_mx_hosts = max_mx_hosts
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.connection_idle_time = connection_idle_time
        self.tls_fallback_plain = tls_fallback_plain
        self.policies = policies
        self.relay = relay
        self.sources = {4: source_ipv4, 6: source_ipv6}
        self.families = frozenset(4 if f == "ipv4" else 6 for f in ip_families)
        self.tls_context = _opportunistic_tls_context()
        self.verify_context = verify_context or verifying_tls_context(None)
        self._limits = _Limits(max_connections, max_connections_per_domain)
        self._idle: dict[tuple[str, str, int, str], list[_Connection]] = {}
        self._unverifiable: dict[tuple[str, str], float] = {}  # (MX name, address): until
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- one message --------------------------------------------------------------

    async def deliver(
        self, domain: str, sender: str, recipients: list[str], data: bytes,
        mail_options: list[str] | None = None,
    ) -> list[RecipientResult]:
        """Try the MX hosts of ``domain`` in order until one takes the transaction."""

        def everyone(outcome: Outcome, reply: str,
                     host: str | None = None) -> list[RecipientResult]:
            return [RecipientResult(r, outcome, reply, host) for r in recipients]

        domain = domain.lower()
        if self.relay is not None and self.relay.covers(domain):
            return await self._deliver_relay(sender, recipients, data, mail_options or [])
        # The policy (maybe an HTTPS fetch) is looked up while DNS answers.
        policy_job = (asyncio.create_task(self._policy(domain), name=f"mta-sts-{domain}")
                      if self.policies is not None else None)
        try:
            try:
                hosts = await resolve_mx(domain, self.resolver, self.max_mx_hosts)
            except PermanentDNSError as exc:
                status = "556 5.1.10" if "null MX" in str(exc) else "550 5.1.2"
                return everyone(Outcome.PERMANENT, f"{status} {domain}: {exc}")
            except TemporaryDNSError as exc:
                return everyone(Outcome.TEMPORARY, f"451 4.4.3 {domain}: {exc}")
            policy = await policy_job if policy_job is not None else None
        finally:
            if policy_job is not None and not policy_job.done():
                policy_job.cancel()

        hosts = self._of_our_families(hosts)
        if not hosts:
            return everyone(Outcome.TEMPORARY,
                            f"451 4.4.4 {domain}: no MX host has an {self._families_text()} "
                            "address (delivery.ip_families)")

        enforce = policy is not None and policy.mode == "enforce"
        testing = policy is not None and policy.mode == "testing"
        if policy is not None:
            outside = [h.name for h in hosts if not policy.matches(h.name)]
            if outside and enforce:
                log.warning("delivery: MTA-STS enforce for %s: not using MX %s (not in the "
                            "policy)", domain, ", ".join(outside))
                hosts = [h for h in hosts if policy.matches(h.name)]
                if not hosts:
                    return everyone(Outcome.TEMPORARY,
                                    f"451 4.7.5 MTA-STS: no MX host of {domain} matches its "
                                    f"policy ({', '.join(outside)})")
            elif outside and testing:
                log.warning("delivery: MTA-STS testing for %s: MX %s not in the policy; "
                            "enforce would not use them", domain, ", ".join(outside))

        last = HostFailure(f"451 4.4.1 {domain}: no MX host could be reached")
        for host in hosts:
            for address in host.addresses:
                try:
                    results, tls = await self._deliver_via(
                        domain, host.name, address, self.smtp_port, MX,
                        (VERIFIED,) if enforce else (VERIFIED, UNVERIFIED, PLAIN),
                        lambda h=host, a=address: self._open(domain, h, a, enforce),
                        sender, recipients, data, mail_options or [])
                except HostFailure as failure:
                    (log.warning if failure.sts else log.info)(
                        "delivery: %s [%s] for %s: %s", host.name, address, domain,
                        failure.reply)
                    if failure.permanent:
                        return everyone(Outcome.PERMANENT, failure.reply, host.name)
                    # Why a domain is stuck: a policy refusal says more than a later
                    # host's connection failure.
                    if failure.sts or not last.sts:
                        last = failure
                    continue
                if testing and (tls != VERIFIED or not policy.matches(host.name)):
                    log.warning("delivery: MTA-STS testing for %s: delivered to %s [%s] with "
                                "TLS %s; enforce would have refused it", domain, host.name,
                                address, tls)
                return results
        return everyone(Outcome.TEMPORARY, last.reply)

    async def _deliver_relay(self, sender: str, recipients: list[str], data: bytes,
                             mail_options: list[str]) -> list[RecipientResult]:
        """To the smarthost: its addresses in turn; every failure to reach it, to trust
        its certificate or to log in is temporary, and names the relay."""
        relay = self.relay
        assert relay is not None

        def everyone(reply: str, tls: str = NOT_CONNECTED) -> list[RecipientResult]:
            return [RecipientResult(r, Outcome.TEMPORARY, reply, relay.host, tls,
                                    via=RELAY) for r in recipients]

        try:
            addresses = [a for a in await relay.addresses(self.resolver)
                         if self._family(a) in self.families]
        except RelayFailure as failure:
            return everyone(failure.reply)
        if not addresses:
            return everyone(f"451 4.4.4 relay {relay.host} has no {self._families_text()} "
                            "address (delivery.ip_families)")
        last = f"451 4.4.1 relay {relay.host} could not be reached"
        last_tls = NOT_CONNECTED  # how far the failed attempt got: "-", plain or verified
        for address in addresses:
            try:
                results, _ = await self._deliver_via(
                    relay.slot, relay.host, address, relay.port, RELAY, (VERIFIED,),
                    lambda a=address: self._open_relay(a), sender, recipients, data,
                    mail_options)
            except HostFailure as failure:
                log.warning("delivery: %s: %s", relay.where(address), failure.reply)
                if failure.permanent:  # e.g. 5xx to MAIL: as from an MX host, for good
                    return [RecipientResult(r, Outcome.PERMANENT, failure.reply, relay.host,
                                            VERIFIED, via=RELAY) for r in recipients]
                last, last_tls = failure.reply, failure.tls or NOT_CONNECTED
                continue
            return results
        return everyone(last, last_tls)

    async def _open_relay(self, address: str) -> _Connection:
        """A new connection to the relay, in the slot _obtain took."""
        assert self.relay is not None
        relay = self.relay
        try:
            smtp = await relay.open(address, self._source_for(address))
        except RelayFailure as failure:
            self._limits.release(relay.slot)
            raise HostFailure(failure.reply, tls=failure.tls) from None
        except BaseException:
            self._limits.release(relay.slot)
            raise
        ssl_object = smtp.get_transport_info("ssl_object")
        return _Connection(smtp, relay.host, address, relay.port, VERIFIED, relay.slot,
                           ssl_object.version() if ssl_object is not None else None,
                           via=RELAY)

    # -- address families and source addresses ------------------------------------------

    @staticmethod
    def _family(address: str) -> int:
        return 6 if ":" in address else 4

    def _families_text(self) -> str:
        return " or ".join(f"IPv{f}" for f in sorted(self.families))

    def _of_our_families(self, hosts: list[MXHost]) -> list[MXHost]:
        """The MX hosts with only the addresses of delivery.ip_families (hosts left with
        none are dropped)."""
        if self.families == {4, 6}:
            return hosts
        kept = []
        for host in hosts:
            addresses = tuple(a for a in host.addresses if self._family(a) in self.families)
            if addresses:
                kept.append(MXHost(host.name, host.preference, addresses))
        return kept

    def _source_for(self, address: str) -> tuple[str, int] | None:
        """(delivery.source_ipv4 or _ipv6, any port) for a connection to ``address``."""
        source = self.sources[self._family(address)]
        return (source, 0) if source else None

    async def _policy(self, domain: str) -> STSPolicy | None:
        assert self.policies is not None
        try:
            return await self.policies.policy_for(domain)
        except Exception as exc:  # a policy we cannot get is no policy (RFC 8461 5)
            log.warning("delivery: MTA-STS policy of %s unavailable: %s", domain, exc)
            return None

    async def _deliver_via(
        self, slot: str, name: str, address: str, port: int, via: str,
        states: tuple[str, ...], open_new: Callable[[], Awaitable[_Connection]],
        sender: str, recipients: list[str], data: bytes, mail_options: list[str],
    ) -> tuple[list[RecipientResult], str]:
        """One transaction with host ``name`` at ``address``, on a pooled connection of one
        of ``states`` or a new one from ``open_new``; ``slot`` is the destination domain
        (the relay's Relay.slot) whose connection limit it counts against."""
        where = f"{name} [{address}]"
        while (conn := await self._obtain(slot, name, address, port, via, states)) is not None:
            log.info("delivery: %s for %s: tls=%s (reused connection)", where, slot, conn.tls)
            try:
                results = await self._transaction(conn, sender, recipients, data,
                                                  mail_options, reused=True)
            except _Stale as exc:
                log.debug("delivery: reused connection to %s failed (%s); trying another",
                          where, exc)
                self._drop(conn)
                continue
            except HostFailure as failure:
                self._drop(conn)
                failure.tls = failure.tls or conn.tls
                raise
            except BaseException:
                self._drop(conn)
                raise
            await self._checkin(conn)
            return results, conn.tls

        # No idle connection, and a slot for a new one is ours.
        conn = await open_new()
        log.info("delivery: %s for %s: tls=%s (new connection)", where, slot, conn.tls)
        try:
            results = await self._transaction(conn, sender, recipients, data, mail_options,
                                              reused=False)
        except HostFailure as failure:
            self._drop(conn)
            failure.tls = failure.tls or conn.tls  # it failed on this connection
            raise
        except BaseException:
            self._drop(conn)
            raise
        await self._checkin(conn)
        return results, conn.tls

    async def _transaction(
        self, conn: _Connection, sender: str, recipients: list[str], data: bytes,
        mail_options: list[str], reused: bool,
    ) -> list[RecipientResult]:
        smtp = conn.smtp
        where = f"{conn.host} [{conn.address}]"
        if reused:
            # Both resets the session and shows the connection is still alive; a short
            # timeout, since a silently vanished peer would otherwise take command_timeout.
            try:
                await smtp.rset(timeout=min(self.command_timeout, self.connect_timeout))
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _Stale(f"RSET: {exc}") from None
        def result(rcpt: str, outcome: Outcome, reply: str) -> RecipientResult:
            return RecipientResult(rcpt, outcome, reply, conn.host, conn.tls, conn.tls_version,
                                   via=conn.via)

        try:
            utf8_offered = smtp.supports_extension("smtputf8")
            wire_sender, sender_utf8 = envelope_address(sender)
            if sender_utf8 and not utf8_offered:
                reply = _no_smtputf8(conn.host, sender)
                return [result(r, Outcome.PERMANENT, reply) for r in recipients]
            results: dict[str, RecipientResult] = {}
            wire: dict[str, str] = {}
            need_utf8 = sender_utf8
            for rcpt in recipients:
                wire[rcpt], rcpt_utf8 = envelope_address(rcpt)
                if rcpt_utf8 and not utf8_offered:
                    results[rcpt] = result(rcpt, Outcome.PERMANENT, _no_smtputf8(conn.host, rcpt))
                need_utf8 = need_utf8 or rcpt_utf8
            if len(results) == len(recipients):
                return [results[r] for r in recipients]

            options = list(mail_options)
            if smtp.supports_extension("size"):
                options.append(f"SIZE={len(data)}")
            # As chasquid: BODY=8BITMIME whenever offered (a 7-bit body is valid 8BITMIME).
            if smtp.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            # UTF-8 headers (RFC 6532) want SMTPUTF8 too, but only where it is offered: see
            # the module's docstring.
            if utf8_offered and (need_utf8 or not header_section(data).isascii()):
                options.append("SMTPUTF8")
            try:
                await smtp.mail(wire_sender, options=options, encoding="utf-8")
            except aiosmtplib.SMTPSenderRefused as exc:
                reply = _reply_text(exc.code, exc.message)
                if reused:  # maybe the session, not the sender: ask a new one
                    raise _Stale(f"MAIL: {reply}") from None
                raise HostFailure(reply, permanent=500 <= exc.code < 600) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if reused:
                    raise _Stale(f"MAIL: {exc}") from None
                raise

            accepted: list[str] = []
            for rcpt in recipients:
                if rcpt in results:  # refused above (SMTPUTF8)
                    continue
                try:
                    await smtp.rcpt(wire[rcpt], encoding="utf-8")
                    accepted.append(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    outcome = Outcome.PERMANENT if 500 <= exc.code < 600 else Outcome.TEMPORARY
                    results[rcpt] = result(rcpt, outcome, _reply_text(exc.code, exc.message))
            if accepted:
                try:
                    response = await smtp.data(data)
                    outcome, reply = Outcome.SENT, _reply_text(response.code, response.message)
                except aiosmtplib.SMTPDataError as exc:
                    outcome = Outcome.PERMANENT if 500 <= exc.code < 600 else Outcome.TEMPORARY
                    reply = _reply_text(exc.code, exc.message)
                for rcpt in accepted:
                    results[rcpt] = result(rcpt, outcome, reply)
            return [results[r] for r in recipients]
        except aiosmtplib.SMTPResponseException as exc:
            raise HostFailure(_reply_text(exc.code, exc.message)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise HostFailure(f"451 4.4.2 {where}: {exc}") from None

    # -- new connections and TLS ------------------------------------------------------

    async def _open(self, domain: str, host: MXHost, address: str,
                    enforce: bool) -> _Connection:
        """A new connection, in the slot _obtain took, with TLS as good as we can get."""
        try:
            smtp, tls = await self._negotiate(host, address, enforce)
        except BaseException:
            self._limits.release(domain)
            raise
        ssl_object = smtp.get_transport_info("ssl_object") if tls != PLAIN else None
        return _Connection(smtp, host.name, address, self.smtp_port, tls, domain,
                           ssl_object.version() if ssl_object is not None else None)

    async def _negotiate(self, host: MXHost, address: str,
                         enforce: bool) -> tuple[aiosmtplib.SMTP, str]:
        """Connect, EHLO and STARTTLS; the connection and its TLS state.

        Python's ssl cannot tell after a CERT_NONE handshake whether the certificate
        would have verified, so the verifying handshake comes first and a certificate
        failure costs a second connection (remembered per host to avoid that next time).
        """
        where = f"{host.name} [{address}]"
        plans = [VERIFIED]
        if not enforce:
            if self._is_unverifiable(host.name, address):
                plans = [UNVERIFIED]
            else:
                plans.append(UNVERIFIED)
            if self.tls_fallback_plain:
                plans.append(PLAIN)
        prefix = "MTA-STS: " if enforce else ""
        reason = ""
        while plans:
            plan = plans.pop(0)
            smtp = await self._connect(host, address)
            with _closed_on_failure(smtp, where):
                if plan == PLAIN:  # after a failed handshake: this time without TLS
                    log.info("delivery: %s: TLS failed (%s); delivering without TLS",
                             where, reason)
                    return smtp, PLAIN
                if not smtp.supports_extension("starttls"):
                    if enforce:
                        raise HostFailure(f"451 4.7.5 MTA-STS: {where} does not offer "
                                          f"STARTTLS", sts=True)
                    return smtp, PLAIN
                context = self.verify_context if plan == VERIFIED else self.tls_context
                try:
                    await smtp.starttls(tls_context=context, server_hostname=host.name,
                                        timeout=self.connect_timeout)
                except ssl.SSLCertVerificationError as exc:
                    reason = f"certificate does not verify: {exc.verify_message}"
                    if plan == VERIFIED and not enforce:
                        self._remember_unverifiable(host.name, address)
                        log.info("delivery: %s: %s; using TLS without verification", where,
                                 reason)
                    smtp.close()
                    continue
                except aiosmtplib.SMTPResponseException as exc:  # STARTTLS refused
                    reason = f"STARTTLS: {_reply_text(exc.code, exc.message)}"
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
                    reason = f"TLS handshake failed: {str(exc) or type(exc).__name__}"
                else:
                    if plan == VERIFIED:
                        self._unverifiable.pop((host.name, address), None)
                    await smtp.ehlo()  # RFC 3207 4.2: forget what was said in the clear
                    return smtp, plan
                # Not a certificate problem: unverified TLS would fail the same way.
                smtp.close()
                with contextlib.suppress(ValueError):
                    plans.remove(UNVERIFIED)
        raise HostFailure(f"451 4.7.5 {prefix}{where}: {reason}", sts=enforce)

    async def _connect(self, host: MXHost, address: str) -> aiosmtplib.SMTP:
        """A connection that has been greeted and has said EHLO."""
        smtp = aiosmtplib.SMTP(
            hostname=address, port=self.smtp_port, local_hostname=self.hostname,
            timeout=self.command_timeout, start_tls=False, use_tls=False,
            source_address=self._source_for(address),
        )
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise HostFailure(f"greeting: {_reply_text(exc.code, exc.message)}") from None
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            smtp.close()
            raise HostFailure(f"451 4.4.1 connection to {host.name} [{address}] failed: "
                              f"{exc}") from None
        except BaseException:
            smtp.close()
            raise
        with _closed_on_failure(smtp, f"{host.name} [{address}]"):
            await smtp.ehlo()
        return smtp

    def _is_unverifiable(self, name: str, address: str) -> bool:
        until = self._unverifiable.get((name, address))
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._unverifiable[(name, address)]
        return False

    def _remember_unverifiable(self, name: str, address: str) -> None:
        now = time.monotonic()
        if len(self._unverifiable) >= _UNVERIFIABLE_MAX:
            self._unverifiable = {k: v for k, v in self._unverifiable.items() if v > now}
            while len(self._unverifiable) >= _UNVERIFIABLE_MAX:  # oldest first
                del self._unverifiable[next(iter(self._unverifiable))]
        self._unverifiable.pop((name, address), None)
        self._unverifiable[(name, address)] = now + UNVERIFIABLE_MEMORY

    # -- limits and the pool of idle connections ---------------------------------------

    async def _obtain(self, domain: str, host: str, address: str, port: int, via: str,
                      states: tuple[str, ...]) -> _Connection | None:
        """An idle connection to reuse, or None once a slot for a new one is taken."""
        while True:
            conn = self._checkout(domain, host, address, port, via, states)
            if conn is not None:
                return conn
            total, for_domain = self._limits.room(domain)
            if total and for_domain:
                self._limits.take(domain)
                return None
            # An idle connection is only a guess that it will be useful; a delivery
            # waiting for its slot is not. (One we could use was checked out above.)
            victim = self._idle_victim(None if not total else domain)
            if victim is not None:
                await self._discard(victim)
                continue
            await self._limits.changed()

    def _idle_victim(self, domain: str | None) -> _Connection | None:
        """The longest idle pooled connection (of ``domain``'s, unless None), unpooled."""
        candidates = [c for stack in self._idle.values() for c in stack
                      if domain is None or c.domain == domain]
        if not candidates:
            return None
        victim = min(candidates, key=lambda c: c.idle_since)
        self._unpool(victim)
        return victim

    def _checkout(self, domain: str, host: str, address: str, port: int, via: str,
                  states: tuple[str, ...]) -> _Connection | None:
        """An idle connection to ``host`` at ``address`` with one of ``states`` (best first)."""
        if self._closed:
            return None
        for state in states:
            stack = self._idle.get((host, address, port, state, via), [])
            # Most recently used first (likeliest still open); ours before other domains'.
            candidates = sorted(reversed(stack), key=lambda c: c.domain != domain)
            for conn in candidates:
                if not conn.smtp.is_connected:
                    self._unpool(conn)
                    self._drop(conn)
                    continue
                if not self._limits.move(conn.domain, domain):
                    break  # another domain's, and ours has no room for it
                self._unpool(conn)
                conn.domain = domain
                return conn
        return None

    async def _checkin(self, conn: _Connection) -> None:
        """Keep a connection after its transaction, or close it."""
        if self._closed or self.connection_idle_time <= 0 or not conn.smtp.is_connected:
            await self._discard(conn)
            return
        conn.idle_since = time.monotonic()
        conn.expiry = asyncio.get_running_loop().call_later(
            self.connection_idle_time, self._expire, conn)
        self._idle.setdefault(conn.key, []).append(conn)
        self._limits.notify()  # a waiting delivery may want to close it

    def _unpool(self, conn: _Connection) -> None:
        stack = self._idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)
            if not stack:
                del self._idle[conn.key]
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None

    def _expire(self, conn: _Connection) -> None:
        self._unpool(conn)
        task = asyncio.get_running_loop().create_task(self._discard(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _discard(self, conn: _Connection) -> None:
        """Say QUIT and close; the slot is free only once the connection is closed."""
        try:
            if conn.smtp.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await conn.smtp.quit(timeout=_QUIT_TIMEOUT)
        finally:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.smtp.close()
        if not conn.released:
            conn.released = True
            self._limits.release(conn.domain)

    async def close(self) -> None:
        """Close the idle connections (at shutdown, after the deliveries have stopped)."""
        self._closed = True
        idle = [conn for stack in self._idle.values() for conn in stack]
        for conn in idle:
            self._unpool(conn)
        jobs = [self._discard(conn) for conn in idle]
        await asyncio.gather(*jobs, *self._closing, return_exceptions=True)
