"""Delivery through a smarthost (``delivery.relay``): which recipients go to it, and the
verified-TLS, authenticated connection to it.

The transaction itself (MAIL, RCPT, DATA), the connection limits and the reuse of idle
connections are remote.py's, shared with direct delivery; this module only answers
"does this domain go to the relay?" and opens a connection that is ready for MAIL:
TLS verified against ``delivery.ca_file`` or the system's CAs (implicit on 465, STARTTLS
otherwise), never a fallback to plain, and AUTH PLAIN or LOGIN, as the relay offers,
only under that TLS. Every failure here is temporary: a relay that is down, refuses our
password or shows a certificate that does not verify is the owner's to fix, and the
message waits for it (and, after ``give_up_after``, bounces).

The password is read from ``password_file`` when a connection logs in (so a corrected
file is used without a restart) and is never put in a log line, an error or a reply:
what the relay answers during AUTH is scrubbed of it too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
from pathlib import Path

import aiosmtplib
import dns.asyncresolver

from ..config import Config, RelaySettings
from ..dnsresolver import describe_resolver, explain_dns_error
from .mx import _host_addresses, _is_ip_literal
from .results import NOT_CONNECTED, PLAIN, VERIFIED

log = logging.getLogger("mailrelay.delivery")

# How much of a password file is read: a password is a line, not a file.
_MAX_PASSWORD = 4096


class RelayFailure(Exception):
    """The relay could not be reached, would not talk TLS we trust, or refused our login.

    ``tls`` is how far the connection got (the mail log's ``tls=``): ``-`` when nothing
    was said with the relay, ``plain`` when it failed in the clear (before or during
    STARTTLS), ``verified`` when TLS was up (a refused login, say)."""

    def __init__(self, reply: str, tls: str = NOT_CONNECTED):
        super().__init__(reply)
        self.reply = reply
        self.tls = tls


HOSTS_FILE = Path("/etc/hosts")
_MAX_HOSTS_FILE = 1 << 20  # an owner's file; bounded all the same


def hosts_file_addresses(name: str, path: Path | None = None) -> tuple[str, ...]:
    """The addresses ``path`` (/etc/hosts) gives ``name`` (any case, a trailing dot
    ignored), IPv6 first as DNS answers are used; () when it has none or cannot be read."""
    wanted = name.rstrip(".").lower()
    try:
        with open(path or HOSTS_FILE, "rb") as handle:
            text = handle.read(_MAX_HOSTS_FILE).decode("utf-8", "replace")
    except OSError:
        return ()
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or wanted not in (f.rstrip(".").lower() for f in fields[1:]):
            continue
        address = fields[0].split("%", 1)[0]  # fe80::1%eth0: the zone is not ours to use
        if _is_ip_literal(address) and address not in found:
            found.append(address)
    return tuple(sorted(found, key=lambda a: ":" not in a))


def read_password(path: Path) -> str:
    """The password: the file's first line, without its line break (spaces are kept)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_PASSWORD + 1)
    except OSError as exc:
        raise RelayFailure(f"451 4.3.5 relay password file {path}: cannot read it "
                           f"({exc.strerror or type(exc).__name__})") from None
    if len(raw) > _MAX_PASSWORD:
        raise RelayFailure(f"451 4.3.5 relay password file {path}: longer than "
                           f"{_MAX_PASSWORD} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RelayFailure(f"451 4.3.5 relay password file {path}: not UTF-8") from None
    password = text.split("\n", 1)[0].removesuffix("\r")
    if not password:
        raise RelayFailure(f"451 4.3.5 relay password file {path}: empty")
    return password


def _redact(text: str, secrets: list[str]) -> str:
    """``text`` with every secret (and its base64 forms, as PLAIN and LOGIN send them)
    replaced: a relay that echoes what we sent must not put it into our logs."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def _secret_forms(username: str, password: str) -> list[str]:
    plain = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
    login = base64.b64encode(password.encode()).decode()
    return [plain, login, password]


def relay_from_config(config: Config, verify_context: ssl.SSLContext) -> Relay | None:
    """The relay of ``delivery.relay`` (None: none is configured), for RemoteDelivery."""
    settings = config.delivery.relay
    if settings is None:
        return None
    return Relay(settings, hostname=config.hostname, verify_context=verify_context,
                 connect_timeout=config.delivery.connect_timeout,
                 command_timeout=config.delivery.command_timeout)


class Relay:
    """The smarthost of ``delivery.relay``: routing, and opening authenticated connections.

    ``slot`` is the name its connections are counted under in remote.py's per-domain
    limit (so at most ``max_connections_per_domain`` go to the relay at once), and
    cannot collide with a domain name.
    """

    def __init__(self, settings: RelaySettings, *, hostname: str,
                 verify_context: ssl.SSLContext, connect_timeout: float,
                 command_timeout: float):
        self.settings = settings
        self.host = settings.host
        self.port = settings.port
        self.hostname = hostname  # our EHLO name
        self.verify_context = verify_context
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.slot = f"[relay {settings.host}]"
        self._domains = frozenset(settings.domains)

    def covers(self, domain: str) -> bool:
        """Whether mail for (remote) ``domain`` goes to the relay; the caller has already
        kept local domains out."""
        return not self._domains or domain.lower() in self._domains

    def where(self, address: str) -> str:
        return f"relay {self.host} [{address}]:{self.port}"

    async def addresses(self, resolver: dns.asyncresolver.Resolver) -> tuple[str, ...]:
        """The relay's addresses (IPv6 first): from /etc/hosts when it names the relay
        (``localhost``, a relay on the LAN: a name the owner wrote, as the C library
        looks it up), else through the same resolver as MX lookups (dns.nameservers, or
        the system's). The failure names the resolver and why it gave nothing."""
        if _is_ip_literal(self.host):
            return (self.host.strip("[]"),)
        listed = await asyncio.to_thread(hosts_file_addresses, self.host)
        if listed:
            return listed
        found, error = await _host_addresses(resolver, self.host)
        if not found:
            asked = describe_resolver(resolver)
            if error is None:
                why = f"no address: not in {HOSTS_FILE}, and {asked} has no A/AAAA record"
            else:
                trouble = await explain_dns_error(resolver, error)
                why = f"not in {HOSTS_FILE}, and the DNS lookup failed: {trouble}"
            raise RelayFailure(f"451 4.4.3 relay {self.host}: {why}")
        return found

    async def open(self, address: str,
                   source: tuple[str, int] | None = None) -> aiosmtplib.SMTP:
        """A connection to the relay at ``address``: greeted, TLS verified, EHLO said
        under TLS and logged in; ready for MAIL. Raises RelayFailure (temporary)."""
        where = self.where(address)
        implicit = self.settings.tls == "implicit"
        sock = await self._tcp(address, source)
        # The certificate is checked against the relay's name, not the address we dialled.
        smtp = aiosmtplib.SMTP(
            hostname=self.host, sock=sock, local_hostname=self.hostname,
            timeout=self.command_timeout, use_tls=implicit, start_tls=False,
            tls_context=self.verify_context,
        )
        # What the mail log's tls= says if this fails (RelayFailure.tls).
        state = NOT_CONNECTED
        try:
            try:
                await smtp.connect(timeout=self.connect_timeout)
            except aiosmtplib.SMTPConnectResponseError as exc:
                state = VERIFIED if implicit else PLAIN
                raise RelayFailure(f"451 4.4.1 {where}: greeting "
                                   f"{_reply(exc.code, exc.message)}") from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise RelayFailure(self._connect_failure(exc, where, implicit)) from None
            state = VERIFIED if implicit else PLAIN
            await self._ehlo(smtp, where)
            if not implicit:
                await self._starttls(smtp, where)
                state = VERIFIED
                await self._ehlo(smtp, where)  # RFC 3207 4.2: what was said before is void
            if self.settings.username is not None:
                await self._login(smtp, where)
        except RelayFailure as failure:
            smtp.close()
            if failure.tls == NOT_CONNECTED:
                failure.tls = state
            raise
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _connect_failure(self, exc: BaseException, where: str, implicit: bool) -> str:
        """The reply for a connection that went wrong before the greeting, naming the
        usual cause: a tls: setting that is not what the port speaks."""
        if implicit:
            if _plain_text_answer(exc):
                return (f"451 4.7.5 {where}: the relay answered in plain text, not TLS: port "
                        f"{self.port} seems to be a STARTTLS port (set delivery.relay.tls: "
                        "starttls; implicit TLS is usually port 465)")
            return f"451 4.7.5 {where}: {_tls_reason(exc)}"
        if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
            return (f"451 4.4.1 {where}: no greeting within {self.connect_timeout:g}s; if port "
                    f"{self.port} starts with TLS (465 does), set delivery.relay.tls: implicit")
        return f"451 4.4.1 {where}: {_cause(exc)}"

    async def _tcp(self, address: str, source: tuple[str, int] | None) -> socket.socket:
        """The TCP connection, bound to ``source`` when given, made here so that TLS can
        be verified against the relay's name while we dial the address we resolved."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source is not None:
                sock.bind(source)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (address, self.port)),
                self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or exc)
            raise RelayFailure(f"451 4.4.1 connection to {self.where(address)} failed: "
                               f"{reason}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _ehlo(self, smtp: aiosmtplib.SMTP, where: str) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            raise RelayFailure(f"451 4.4.2 {where}: EHLO {_reply(exc.code, exc.message)}") \
                from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise RelayFailure(f"451 4.4.2 {where}: {exc}") from None

    async def _starttls(self, smtp: aiosmtplib.SMTP, where: str) -> None:
        if not smtp.supports_extension("starttls"):
            raise RelayFailure(f"451 4.7.5 {where} does not offer STARTTLS; mail and the "
                               "password go to the relay only over verified TLS")
        try:
            await smtp.starttls(tls_context=self.verify_context, server_hostname=self.host,
                                timeout=self.connect_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            raise RelayFailure(f"451 4.7.5 {where}: STARTTLS "
                               f"{_reply(exc.code, exc.message)}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise RelayFailure(f"451 4.7.5 {where}: {_tls_reason(exc)}") from None

    async def _login(self, smtp: aiosmtplib.SMTP, where: str) -> None:
        # Never AUTH without TLS (open() only gets here with TLS up; this is the guard
        # should that ever change).
        if smtp.get_transport_info("sslcontext") is None:
            raise RelayFailure(f"451 4.7.5 {where}: no TLS, so no login")
        methods = smtp.server_auth_methods
        method = "plain" if "plain" in methods else "login" if "login" in methods else None
        if method is None:
            offered = " ".join(methods).upper() or "none"
            raise RelayFailure(f"451 4.7.0 {where} offers no AUTH PLAIN or LOGIN "
                               f"(offered: {offered[:100]})")
        assert self.settings.password_file is not None and self.settings.username is not None
        password = await asyncio.to_thread(read_password, self.settings.password_file)
        username = self.settings.username
        secrets = _secret_forms(username, password)
        try:
            if method == "plain":
                await smtp.auth_plain(username, password, timeout=self.command_timeout)
            else:
                await smtp.auth_login(username, password, timeout=self.command_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            reply = _redact(_reply(exc.code, exc.message), secrets)
            raise RelayFailure(f"451 4.7.0 {where}: login as {username} refused: "
                               f"{reply}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            reason = _redact(str(exc) or type(exc).__name__, secrets)
            raise RelayFailure(f"451 4.4.2 {where}: login: {reason}") from None
        finally:
            del password, secrets
        log.debug("delivery: %s: logged in as %s (AUTH %s)", where, username, method.upper())


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in found):
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def _cause(exc: BaseException) -> str:
    """What went wrong, without aiosmtplib's "Error connecting to HOST on port None"
    (it did not open the socket, so it has no port to name)."""
    if isinstance(exc, aiosmtplib.SMTPConnectError) and exc.__cause__ is not None:
        inner = exc.__cause__
        return str(inner) or type(inner).__name__
    return str(exc) or type(exc).__name__


def _plain_text_answer(exc: BaseException) -> bool:
    """Whether a TLS handshake failed because the peer answered in plain text (an SMTP
    greeting where a ServerHello was due)."""
    return any(isinstance(e, ssl.SSLError) and e.reason in (
        "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST", "UNKNOWN_PROTOCOL") for e in _chain(exc))


def _tls_reason(exc: BaseException) -> str:
    """Why TLS to the relay failed, in words: a certificate that does not verify is named."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate does not verify: {current.verify_message}"
        current = current.__cause__ or current.__context__
    with contextlib.suppress(Exception):
        return f"TLS failed: {_cause(exc)}"
    return "TLS failed"
