"""``mailrelay send``: submit a test message and show the SMTP dialogue, step by step."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import aiosmtplib
from cryptography import x509

from ..address import AddressError, split
from ..config import CONFIG_FILE, Config, load_config, parse_hostport
from ..errors import MailrelayError
from .common import check_terminal, read_password

SUBJECT = "mailrelay test message"
TLS_MODES = ("starttls", "implicit", "none")
_QUEUED = re.compile(r"queued as (\S+)")
# Listening on every address means: talk to it over loopback.
_WILDCARD = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Submit a small test message (EHLO, STARTTLS or implicit TLS, AUTH, MAIL, RCPT, DATA) and "
        "print each step with the server's reply.")
    parser.add_argument("--to", required=True, metavar="ADDR", help="recipient")
    parser.add_argument("--from", dest="sender", metavar="ADDR",
                        help="sender (default: the --user)")
    parser.add_argument("--server", metavar="HOST:PORT",
                        help="server to talk to (default: the configuration's first "
                             "submission listener)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--user", metavar="USER", help="log in as USER (default: the --from)")
    auth.add_argument("--no-auth", action="store_true",
                      help="do not log in (e.g. to test the MX port)")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    parser.add_argument("--tls-name", metavar="NAME",
                        help="the name the server's certificate must carry, sent as SNI "
                             "too: for a --server given as an IP address (default: the "
                             "host of --server, else the configuration's hostname)")
    parser.add_argument("--tls", choices=TLS_MODES,
                        help="starttls (default), implicit (default for port 465 and the "
                             "configuration's submission_tls ports) or none")
    parser.add_argument("--subject", default=SUBJECT, help=f"subject (default {SUBJECT!r})")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--cafile", metavar="PEM",
                       help="verify the server's certificate against these CAs "
                            "(default: the system's)")
    trust.add_argument("--insecure", action="store_true",
                       help="do not verify the server's certificate (self-signed test setups)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="per connection and command (default 30)")
    parser.set_defaults(func=cmd_send)


@dataclass
class Plan:
    """Everything decided before connecting."""

    host: str
    port: int
    tls_name: str  # name the certificate must carry (SNI too)
    tls: str
    sender: str
    recipient: str
    user: str | None
    password: str | None  # None with a user: asked on the terminal, once TLS is verified
    subject: str
    context: ssl.SSLContext | None
    verify: bool
    cafile: str | None
    timeout: float


class SendFailed(MailrelayError):
    """The dialogue went wrong; the message is the one line for the user."""


# -- deciding what to do ---------------------------------------------------------------


def _try_config(path: str) -> tuple[Config | None, MailrelayError | None]:
    try:
        return load_config(path), None
    except MailrelayError as exc:
        return None, exc


def _has_config_file(directory: str) -> bool:
    """Whether ``directory`` has a mailrelay.yaml (that may not load): a broken or
    unreadable one is what to fix, not a reason to ask for --server."""
    try:
        os.stat(Path(directory) / CONFIG_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _check_address(value: str, what: str) -> str:
    try:
        split(value)
    except AddressError:
        raise MailrelayError(f"{what}: not an address: {value!r} (expected user@domain)") from None
    return value


def _endpoint(args: argparse.Namespace, config: Config | None,
              config_error: MailrelayError | None) -> tuple[str, int, str, bool]:
    """Host, port, TLS name, and whether the port is an implicit-TLS one."""
    host, port, tls_name, implicit = _address(args, config, config_error)
    if args.tls_name:
        tls_name = args.tls_name.strip().rstrip(".").lower()
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|[0-9a-f:.]+", tls_name):
            raise MailrelayError(f"--tls-name {args.tls_name!r} is not a host name")
    return host, port, tls_name, implicit


def _address(args: argparse.Namespace, config: Config | None,
             config_error: MailrelayError | None) -> tuple[str, int, str, bool]:
    implicit_ports = {port for _, port in config.listen.submission_tls} if config else set()
    if args.server:
        try:
            host, port = parse_hostport(args.server, default_port=587)
        except ValueError as exc:
            raise MailrelayError(f"--server: {exc}") from None
        return host, port, host, port == 465 or port in implicit_ports
    if config is None:
        if _has_config_file(args.config):
            raise MailrelayError(f"the configuration does not load, so it names no server: "
                                 f"{config_error} (`mailrelay check -c {args.config}` says "
                                 "more; or give --server HOST:PORT)")
        raise MailrelayError(f"--server HOST:PORT is required ({config_error})")
    listeners = config.listen.submission or config.listen.submission_tls
    if not listeners:
        raise MailrelayError("the configuration has no submission listener: give --server")
    host, port = listeners[0]
    host = _WILDCARD.get(host, host)
    # Over loopback, the certificate still names the server's hostname.
    return host, port, config.hostname, port == 465 or port in implicit_ports


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise MailrelayError(f"--cafile {args.cafile}: cannot load: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None


def make_plan(args: argparse.Namespace) -> Plan:
    config, config_error = _try_config(args.config)
    host, port, tls_name, implicit = _endpoint(args, config, config_error)
    tls = args.tls or ("implicit" if implicit else "starttls")
    recipient = _check_address(args.to, "--to")
    user = None if args.no_auth else (args.user or args.sender)
    sender = args.sender or user
    if sender is None:
        raise MailrelayError("give --from ADDR (or --user)")
    _check_address(sender, "--from")
    if args.no_auth and args.password_stdin:
        raise MailrelayError("--password-stdin makes no sense with --no-auth")
    if user is not None and tls == "none":
        raise MailrelayError("refusing to send a password without TLS: AUTH only over TLS "
                             "(use --tls starttls or implicit, or --no-auth)")
    context = None if tls == "none" else _tls_context(args)
    password = None
    if user is not None and args.password_stdin:
        password = read_password(True)
    elif user is not None:
        check_terminal()  # now, not after connecting; the prompt comes once TLS is verified
    return Plan(host=host, port=port, tls_name=tls_name, tls=tls, sender=sender,
                recipient=recipient, user=user, password=password, subject=args.subject,
                context=context, verify=not args.insecure, cafile=args.cafile,
                timeout=args.timeout)


def build_message(plan: Plan) -> bytes:
    msg = EmailMessage()
    msg["From"] = plan.sender
    msg["To"] = plan.recipient
    msg["Subject"] = plan.subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=split(plan.sender)[1])
    msg.set_content(
        "This is a test message sent with `mailrelay send`.\n\n"
        f"Sent:   {email.utils.formatdate(localtime=True)}\n"
        f"From:   {socket.gethostname()}\n"
        f"Server: {_where(plan)} ({plan.tls if plan.tls != 'none' else 'no'} TLS)\n"
    )
    return msg.as_bytes(policy=SMTP_POLICY)


def _where(plan: Plan) -> str:
    host = f"[{plan.host}]" if ":" in plan.host else plan.host
    return f"{host}:{plan.port}"


# -- the dialogue ----------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(step: str, detail: str) -> None:
    print(f"{step:<9}{detail}", flush=True)


def _reply(response: aiosmtplib.SMTPResponse | aiosmtplib.SMTPResponseException) -> str:
    return f"{response.code} {_one_line(response.message)}"


def _ehlo_summary(response: aiosmtplib.SMTPResponse) -> str:
    lines = response.message.splitlines()
    extensions = ", ".join(line.strip() for line in lines[1:])
    return f"{response.code} {lines[0] if lines else ''}" + (f" [{extensions}]"
                                                             if extensions else "")


# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _mismatch_hint(plan: Plan, names: list[str] | None) -> str:
    """What to do when the certificate does not name plan.tls_name: --tls-name with a
    name it carries; --server stays, being only where to connect."""
    keep = f" (--server {_where(plan)} stays: it is only where to connect)"
    if names:
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        usable = [n for n in names if not n.startswith("*.")] or [names[0]]
        return (f"it is for {shown}, not {plan.tls_name}: give --tls-name {usable[0]}"
                + (keep if _is_ip(plan.tls_name) else "") + " (or --insecure)")
    return ("give --tls-name with the name on the certificate (the server's hostname)"
            + keep + " (or --insecure)")


def _tls_error(plan: Plan, exc: BaseException, names: list[str] | None = None) -> SendFailed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = (exc.verify_message or str(exc)).rstrip(".")
        if exc.verify_code in _NAME_MISMATCH:
            hint = _mismatch_hint(plan, names)
        elif plan.cafile:
            hint = f"is it signed by a CA in {plan.cafile}? (--insecure skips the check)"
        else:
            hint = "for a self-signed test setup use --insecure (or --cafile PEM)"
        return SendFailed(f"TLS: the certificate of {plan.tls_name} did not verify: "
                          f"{reason}; {hint}")
    reason = getattr(exc, "reason", None) or _one_line(str(exc))
    if reason == "WRONG_VERSION_NUMBER":  # a plain-text server answered the handshake
        reason += " (no TLS on this port? try --tls starttls)"
    return SendFailed(f"TLS handshake with {_where(plan)} failed: {reason}")


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _is_mismatch(exc: BaseException) -> bool:
    return (isinstance(exc, ssl.SSLCertVerificationError)
            and exc.verify_code in _NAME_MISMATCH)


def certificate_names(der: bytes) -> list[str]:
    """The DNS names and IP addresses a certificate is for (subjectAltName), else its CN."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME)]
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


async def _peer_names(plan: Plan) -> list[str] | None:
    """The names on the server's certificate, read over a second connection that checks
    nothing (only for the hint after a name mismatch; nothing is sent but EHLO and
    STARTTLS); None when that fails too."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        sock = await _connect_socket(plan)
    except SendFailed:
        return None
    smtp = aiosmtplib.SMTP(sock=sock, hostname=plan.tls_name, use_tls=plan.tls == "implicit",
                           start_tls=False, tls_context=context, timeout=plan.timeout,
                           local_hostname=socket.gethostname() or "localhost")
    try:
        await smtp.connect()
        if plan.tls == "starttls":
            await smtp.ehlo()
            await smtp.starttls(server_hostname=plan.tls_name, tls_context=context)
        ssl_object = smtp.get_transport_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        return certificate_names(der) if der else None
    except (aiosmtplib.SMTPException, OSError, ValueError, ssl.SSLError):
        return None
    finally:
        smtp.close()


async def _connect_socket(plan: Plan) -> socket.socket:
    try:
        sock = await asyncio.wait_for(
            asyncio.to_thread(socket.create_connection, (plan.host, plan.port), plan.timeout),
            plan.timeout)
    except TimeoutError:
        raise SendFailed(f"cannot connect to {_where(plan)}: timed out") from None
    except OSError as exc:
        raise SendFailed(f"cannot connect to {_where(plan)}: "
                         f"{exc.strerror or _one_line(str(exc))}") from None
    sock.setblocking(False)
    return sock


def _describe_tls(plan: Plan, smtp: aiosmtplib.SMTP) -> None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if ssl_object is None:
        raise SendFailed("TLS: no TLS session after the handshake")
    name, _protocol, bits = ssl_object.cipher()
    if plan.verify:
        check = f"certificate verified for {plan.tls_name}"
    else:
        check = "certificate NOT verified (--insecure)"
    _show("TLS", f"{ssl_object.version()} {name} ({bits} bits), {check}")


async def _ehlo(smtp: aiosmtplib.SMTP) -> None:
    try:
        response = await smtp.ehlo()
    except aiosmtplib.SMTPResponseException as exc:
        raise SendFailed(f"EHLO refused: {_reply(exc)}") from None
    _show("EHLO", _ehlo_summary(response))


async def _authenticate(plan: Plan, smtp: aiosmtplib.SMTP) -> None:
    assert plan.user is not None
    methods = [m.upper() for m in smtp.server_auth_methods]
    if "PLAIN" in methods:
        mechanism, login = "PLAIN", smtp.auth_plain
    elif "LOGIN" in methods:
        mechanism, login = "LOGIN", smtp.auth_login
    else:
        offered = ", ".join(methods) or "none"
        raise SendFailed(f"the server offers no AUTH PLAIN or LOGIN (offered: {offered})")
    if plan.password is None:
        # Only now: the certificate has been verified (or --insecure said not to), so the
        # password is typed for the server it is going to.
        plan.password = await asyncio.to_thread(read_password, False,
                                                f"Password for {plan.user}: ")
    try:
        response = await login(plan.user, plan.password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        _show("AUTH", f"{mechanism} as {plan.user}: {_reply(exc)}")
        raise SendFailed(f"authentication as {plan.user} failed: {_reply(exc)}") from None
    _show("AUTH", f"{mechanism} as {plan.user}: {_reply(response)}")


async def _dialogue(plan: Plan, message: bytes) -> str:
    """Run the transaction; the queue id (or the whole reply) of the final 250."""
    sock = await _connect_socket(plan)
    smtp = aiosmtplib.SMTP(
        sock=sock, hostname=plan.tls_name, use_tls=plan.tls == "implicit",
        start_tls=False, tls_context=plan.context, timeout=plan.timeout,
        local_hostname=socket.gethostname() or "localhost",
    )
    _show("connect", f"{_where(plan)} ({'TLS' if plan.tls == 'implicit' else 'plain'})")
    try:
        greeting = await smtp.connect()
    except aiosmtplib.SMTPConnectResponseError as exc:
        raise SendFailed(f"the server refused the connection: {_reply(exc)}") from None
    except aiosmtplib.SMTPConnectTimeoutError:
        hint = "" if plan.tls == "implicit" else " (an implicit-TLS port? try --tls implicit)"
        raise SendFailed(f"no greeting from {_where(plan)} within {plan.timeout:g}s{hint}"
                         ) from None
    except aiosmtplib.SMTPException as exc:
        ssl_exc = _find_cause(exc, ssl.SSLError)
        if ssl_exc is not None:
            names = await _peer_names(plan) if _is_mismatch(ssl_exc) else None
            raise _tls_error(plan, ssl_exc, names) from None
        raise SendFailed(f"connection to {_where(plan)} failed: {_one_line(str(exc))}") from None
    _show("greeting", _reply(greeting))
    try:
        if plan.tls == "implicit":
            _describe_tls(plan, smtp)
        await _ehlo(smtp)
        if plan.tls == "starttls":
            if not smtp.supports_extension("starttls"):
                raise SendFailed(f"{_where(plan)} does not offer STARTTLS "
                                 "(try --tls implicit, or --tls none without AUTH)")
            try:
                response = await smtp.starttls(server_hostname=plan.tls_name)
            except aiosmtplib.SMTPResponseException as exc:
                raise SendFailed(f"STARTTLS refused: {_reply(exc)}") from None
            except ssl.SSLError as exc:
                names = await _peer_names(plan) if _is_mismatch(exc) else None
                raise _tls_error(plan, exc, names) from None
            _show("STARTTLS", _reply(response))
            _describe_tls(plan, smtp)
            await _ehlo(smtp)  # RFC 3207: what was said before TLS no longer counts
        if plan.user is not None:
            await _authenticate(plan, smtp)
        try:
            response = await smtp.mail(plan.sender)
        except aiosmtplib.SMTPSenderRefused as exc:
            _show("MAIL", f"FROM:<{plan.sender}> {_reply(exc)}")
            raise SendFailed(f"sender <{plan.sender}> refused: {_reply(exc)}") from None
        _show("MAIL", f"FROM:<{plan.sender}> {_reply(response)}")
        try:
            response = await smtp.rcpt(plan.recipient)
        except aiosmtplib.SMTPRecipientRefused as exc:
            _show("RCPT", f"TO:<{plan.recipient}> {_reply(exc)}")
            raise SendFailed(f"recipient <{plan.recipient}> refused: {_reply(exc)}") from None
        _show("RCPT", f"TO:<{plan.recipient}> {_reply(response)}")
        try:
            response = await smtp.data(message)
        except aiosmtplib.SMTPResponseException as exc:
            _show("DATA", _reply(exc))
            raise SendFailed(f"message refused: {_reply(exc)}") from None
        _show("DATA", _reply(response))
        match = _QUEUED.search(response.message)
        # The message is queued; a rude goodbye changes nothing.
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            _show("QUIT", _reply(await smtp.quit()))
        return match.group(1) if match else _one_line(response.message)
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise SendFailed(f"the server closed the connection: {_one_line(str(exc))}") from None
    except aiosmtplib.SMTPTimeoutError as exc:
        raise SendFailed(f"timed out: {_one_line(str(exc))}") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise SendFailed(f"unexpected reply: {_reply(exc)}") from None
    except aiosmtplib.SMTPException as exc:
        raise SendFailed(_one_line(str(exc))) from None
    finally:
        smtp.close()


def cmd_send(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    queued = asyncio.run(_dialogue(plan, build_message(plan)))
    print(f"sent: {plan.sender} -> {plan.recipient}, queued as {queued}")
    return 0
