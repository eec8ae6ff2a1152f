"""Delivery to remote MX hosts with aiosmtplib: one transaction per domain and host."""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass
from enum import Enum

import aiosmtplib

from .mx import MXHost, PermanentDNSError, TemporaryDNSError, resolve_mx

log = logging.getLogger("mailrelay.delivery")


class Outcome(Enum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class RecipientResult:
    address: str
    outcome: Outcome
    reply: str  # the remote reply ("550 5.1.1 no such user") or our own reason
    remote_host: str | None = None
    tls: str = "plain"  # plain | unverified | verified


class HostFailure(Exception):
    """This host could not take the message; try the next one (or retry later)."""

    def __init__(self, reply: str, permanent: bool = False, tls_failed: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent
        self.tls_failed = tls_failed


def _reply_text(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def _opportunistic_tls_context() -> ssl.SSLContext:
    # Opportunistic STARTTLS (RFC 7435): encrypt even when the certificate cannot be
    # verified; verification policy (MTA-STS) is layered on top of this.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RemoteDelivery:
    def __init__(
        self,
        hostname: str,
        resolver,
        smtp_port: int = 25,
        max_mx_hosts: int = 5,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
    ):
        self.hostname = hostname
        self.resolver = resolver
        self.smtp_port = smtp_port
        self.max_mx_hosts = max_mx_hosts
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.tls_context = _opportunistic_tls_context()

    async def deliver(
        self, domain: str, sender: str, recipients: list[str], data: bytes,
        mail_options: list[str] | None = None,
    ) -> list[RecipientResult]:
        """Try the MX hosts of ``domain`` in order until one takes the transaction."""

        def everyone(outcome: Outcome, reply: str,
                     host: str | None = None) -> list[RecipientResult]:
            return [RecipientResult(r, outcome, reply, host) for r in recipients]

        try:
            hosts = await resolve_mx(domain, self.resolver, self.max_mx_hosts)
        except PermanentDNSError as exc:
            status = "556 5.1.10" if "null MX" in str(exc) else "550 5.1.2"
            return everyone(Outcome.PERMANENT, f"{status} {domain}: {exc}")
        except TemporaryDNSError as exc:
            return everyone(Outcome.TEMPORARY, f"451 4.4.3 {domain}: {exc}")

        last = HostFailure(f"451 4.4.1 {domain}: no MX host could be reached")
        for host in hosts:
            for address in host.addresses:
                try:
                    try:
                        return await self._transaction(host, address, sender, recipients, data,
                                                       mail_options or [], use_tls=True)
                    except HostFailure as failure:
                        if not failure.tls_failed:
                            raise
                        log.info("delivery: TLS with %s [%s] failed (%s); retrying without TLS",
                                 host.name, address, failure.reply)
                        return await self._transaction(host, address, sender, recipients, data,
                                                       mail_options or [], use_tls=False)
                except HostFailure as failure:
                    log.info("delivery: %s [%s] for %s: %s", host.name, address, domain,
                             failure.reply)
                    if failure.permanent:
                        return everyone(Outcome.PERMANENT, failure.reply, host.name)
                    last = failure
        return everyone(Outcome.TEMPORARY, last.reply)

    async def _transaction(
        self, host: MXHost, address: str, sender: str, recipients: list[str], data: bytes,
        mail_options: list[str], use_tls: bool,
    ) -> list[RecipientResult]:
        smtp = aiosmtplib.SMTP(
            hostname=address, port=self.smtp_port, local_hostname=self.hostname,
            timeout=self.command_timeout, start_tls=False, use_tls=False,
        )
        tls_state = "plain"
        try:
            try:
                await smtp.connect(timeout=self.connect_timeout)
            except aiosmtplib.SMTPConnectResponseError as exc:
                raise HostFailure(f"greeting: {_reply_text(exc.code, exc.message)}") from None
            except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                raise HostFailure(f"451 4.4.1 connection to {host.name} [{address}] failed: "
                                  f"{exc}") from None
            await smtp.ehlo()
            if use_tls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(tls_context=self.tls_context, server_hostname=host.name)
                except aiosmtplib.SMTPResponseException as exc:
                    raise HostFailure(_reply_text(exc.code, exc.message), tls_failed=True) from None
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    raise HostFailure(f"451 4.7.5 TLS handshake failed: {exc}",
                                      tls_failed=True) from None
                tls_state = "unverified"
                await smtp.ehlo()
            options = list(mail_options)
            if smtp.supports_extension("size"):
                options.append(f"SIZE={len(data)}")
            if smtp.supports_extension("8bitmime") and not data.isascii():
                options.append("BODY=8BITMIME")
            try:
                await smtp.mail(sender, options=options, encoding="utf-8")
            except aiosmtplib.SMTPSenderRefused as exc:
                reply = _reply_text(exc.code, exc.message)
                raise HostFailure(reply, permanent=500 <= exc.code < 600) from None

            results: dict[str, RecipientResult] = {}
            accepted: list[str] = []
            for rcpt in recipients:
                try:
                    await smtp.rcpt(rcpt, encoding="utf-8")
                    accepted.append(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    outcome = Outcome.PERMANENT if 500 <= exc.code < 600 else Outcome.TEMPORARY
                    results[rcpt] = RecipientResult(rcpt, outcome,
                                                    _reply_text(exc.code, exc.message),
                                                    host.name, tls_state)
            if accepted:
                try:
                    response = await smtp.data(data)
                    outcome, reply = Outcome.SENT, _reply_text(response.code, response.message)
                except aiosmtplib.SMTPDataError as exc:
                    outcome = Outcome.PERMANENT if 500 <= exc.code < 600 else Outcome.TEMPORARY
                    reply = _reply_text(exc.code, exc.message)
                for rcpt in accepted:
                    results[rcpt] = RecipientResult(rcpt, outcome, reply, host.name, tls_state)
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
            return [results[r] for r in recipients]
        except aiosmtplib.SMTPResponseException as exc:  # e.g. EHLO refused
            raise HostFailure(_reply_text(exc.code, exc.message),
                              permanent=False) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise HostFailure(f"451 4.4.2 {host.name} [{address}]: {exc}") from None
        finally:
            smtp.close()
