"""The policy behind every SMTP port: who may log in, send, relay and to whom, and what
a message must pass (sender rights, SPF/DKIM/DMARC) before the intake queues it."""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import math
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..address import AddressError, domain_of, normalize, split
from ..config import Config
from ..intake import Intake
from ..message.filters import FilterInput, Filters, Hooks
from ..message.headers import HeaderError, count, get_all, header_end, mailboxes, read_header
from ..message.received import protocol_name, received_header, submission_fixups
from ..ops.events import Events
from ..queue import Queue, QueueFullError, new_id
from ..smtp.parse import Path
from ..smtp.session import Envelope, SessionInfo
from ..smtp.throttle import AuthThrottle, client_key
from .aliases import normalize_name
from .dovecot import DovecotAuth
from .router import Router
from .senders import SenderPolicy
from .users import Users

if TYPE_CHECKING:
    import dns.resolver

    # The checks (dkimpy, pyspf, the public suffix list) load with the first message
    # from outside: a server that only submits never pays for them.
    from .authres import AuthResults

log = logging.getLogger("mailrelay.smtp")

# A header section up to this size is parsed on the event loop (a few milliseconds at
# worst, with a From: made to be slow to read); a larger one, or a message whose header
# does not end within it, in a thread.
INLINE_HEADER = 16 * 1024
# Copying more than this (the Message-ID/Date we add to a submission, in front of it)
# happens in a thread.
INLINE_COPY = 1024 * 1024

# Keys the digests of credentials that failed in a session (SessionInfo.failed_logins):
# they are compared, never stored, and mean nothing outside this process.
_CREDENTIALS_KEY = os.urandom(32)
INVALID_REPLY = "535 5.7.8 Authentication credentials invalid"
UNAVAILABLE_REPLY = "454 4.7.0 Temporary authentication failure, try again later"


def credentials_digest(username: str, password: str) -> bytes:
    data = f"{username}\0{password}".encode("utf-8", "surrogatepass")
    return hmac.digest(_CREDENTIALS_KEY, data, "sha256")


class KnownUsers:
    """Addresses dovecot said exist (at RCPT), for the router to route as local users
    when the message is queued a moment later. Bounded in size and time."""

    def __init__(self, ttl: float = 3600.0, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, address: str) -> None:
        key = address.lower()
        self._until.pop(key, None)
        self._until[key] = time.monotonic() + self.ttl
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def __call__(self, address: str) -> bool:
        until = self._until.get(address.lower())
        return until is not None and until > time.monotonic()


def blocked_reply(remaining: float) -> str:
    """454, saying when the block ends (rounded up: never too early)."""
    seconds = max(1, math.ceil(remaining))
    if seconds < 60:
        when = f"{seconds} seconds"
    else:
        minutes = math.ceil(seconds / 60)
        when = f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"454 4.7.0 Too many failed logins, try again in {when}"


class PolicyBackend:
    """The ``Backend`` of SMTP sessions on every port (see smtp.session.Backend): each
    decision of policy, then the intake for an accepted message."""

    def __init__(
        self,
        config: Config,
        is_local_domain: Callable[[str], bool],
        users: Callable[[], Users],
        queue: Queue,
        intake: Intake,
        tls_context: ssl.SSLContext | None,
        senders: SenderPolicy,
        router: Router,
        dns_resolver: Callable[[], dns.resolver.Resolver],
        events: Events | None = None,
        filters: Callable[[], Filters] | None = None,
    ):
        self.config = config
        self.is_local_domain = is_local_domain
        self.hostname = config.hostname
        self.max_message_size = config.limits.max_message_size
        self.max_recipients = config.limits.max_recipients
        self.command_timeout = config.limits.command_timeout
        self.data_timeout = config.limits.data_timeout
        self.max_errors = config.limits.max_errors
        # Where RCPT TO:<postmaster> without a domain goes (the server sets the live one).
        self.primary_domain_of: Callable[[], str | None] = lambda: config.primary_domain
        self._users = users
        self.queue = queue
        self.intake = intake
        self._tls_context = tls_context
        self.senders = senders
        self.router = router
        self.events = events if events is not None else Events()
        self._dns = dns_resolver  # made at the first message from outside
        # The filters of the configuration now (a reload rebuilds them); none by default.
        if filters is None:
            no_filters = Filters(Hooks(cwd=config.config_dir))
            filters = lambda: no_filters  # noqa: E731
        self._filters = filters
        self.throttle = AuthThrottle(
            config.limits.auth_failures_per_ip, config.limits.auth_block_time,
            delay_step=config.limits.auth_failure_delay,
        )
        # Logins of users not in our users files (chasquid's dovecot_auth).
        auth = config.auth
        self.dovecot = DovecotAuth(auth.dovecot_userdb_path, auth.dovecot_client_path,
                                   auth.dovecot_timeout) if auth.dovecot else None
        # Clients blocked by the throttle whose password is being checked (for the log).
        self._checking_blocked: set[str] = set()
        # Recipients dovecot knows (the router takes them for users: Server wires it).
        self.dovecot_users = KnownUsers()

    async def start(self) -> None:
        """Say at start what will not work (the server runs anyway)."""
        if self.dovecot is not None:
            problem = await self.dovecot.check()
            if problem:
                log.warning("auth.dovecot: %s; logins of users not in the users files get "
                            "454 until dovecot answers", problem)
            else:
                log.info("auth.dovecot: userdb %s, auth-client %s", self.dovecot.userdb_path,
                         self.dovecot.client_path)

    @property
    def primary_domain(self) -> str | None:
        return self.primary_domain_of()

    def tls_context(self) -> ssl.SSLContext | None:
        return self._tls_context

    # -- AUTH -----------------------------------------------------------------

    async def authenticate(self, info: SessionInfo, username: str, password: str) -> str:
        """A user of our users files, else (auth.dovecot) of dovecot. Wrong passwords
        count against the client (AuthThrottle): growing delays, then a block, during
        which every login gets 454 with the time left. The same wrong credentials tried
        again in one session (another mechanism) count once."""
        ip = info.peer_ip
        remaining = self.throttle.blocked(ip)
        if remaining:
            return await self._refuse_blocked(info, username, password, remaining)
        digest = credentials_digest(username, password)
        if digest in info.failed_logins:
            self.events.auth_failed(info, username, INVALID_REPLY, note="repeated")
            return INVALID_REPLY
        user = await self._check(info, username, password)
        remaining = self.throttle.blocked(ip)
        if remaining:
            # Blocked while this attempt was being checked (guesses sent at once on many
            # connections): its answer, right or wrong, would be one guess too many.
            reply = blocked_reply(remaining)
            self.events.auth_failed(info, username, reply, blocked=True,
                                    note="right-password" if user else None)
            return reply
        if user is None:
            self.events.auth_failed(info, username, UNAVAILABLE_REPLY, note="unavailable")
            return UNAVAILABLE_REPLY
        if user is False:
            info.failed_logins.add(digest)
            delay = self.throttle.failure(ip)
            self.events.auth_failed(info, username, INVALID_REPLY)
            if delay:
                await asyncio.sleep(delay)
            return INVALID_REPLY
        self.throttle.success(ip)
        info.user = user
        self.events.auth_ok(info, user)
        return "235 2.7.0 Authentication successful"

    async def _check(self, info: SessionInfo, username: str, password: str) -> str | bool | None:
        """The user's address if the password is right; False if wrong; None if dovecot,
        which had to be asked, could not answer."""
        users = self._users()
        if self.dovecot is None or users.exists(username):
            # scrypt takes tens of milliseconds: keep it off the event loop.
            user = await asyncio.to_thread(users.authenticate, username, password)
            return user if user is not None else False
        verdict = await self.dovecot.authenticate(username, password, remote_ip=info.peer_ip)
        if verdict is None:
            return None
        return _login_name(username) if verdict else False

    async def _refuse_blocked(self, info: SessionInfo, username: str, password: str,
                              remaining: float) -> str:
        """454 whatever the password; the log says when it was the right one (the owner,
        locked out by a client with an old password, say). One check per client at a
        time, so a blocked client cannot keep the password checks busy."""
        reply = blocked_reply(remaining)
        note = None
        key = client_key(info.peer_ip)
        if key not in self._checking_blocked:
            self._checking_blocked.add(key)
            try:
                if await self._check(info, username, password):
                    note = "right-password"
            finally:
                self._checking_blocked.discard(key)
        self.events.auth_failed(info, username, reply, blocked=True, note=note)
        return reply

    # -- envelope -------------------------------------------------------------

    async def check_sender(self, info: SessionInfo, path: Path) -> str | None:
        try:
            self.queue.check_space()  # say so now, before the client sends the data
        except QueueFullError as exc:
            log.warning("refusing mail from %s: %s", info.peer_ip, exc)
            return "452 4.3.1 Insufficient system storage, try again later"
        if info.user is None:
            return None  # inbound mail: any sender (SPF checks come on top of this)
        if self.senders.settings.restrict and (
            path.is_null or not self.senders.may_send_as(info.user, path.address)
        ):
            return f"550 5.7.1 Not authorised to send as <{path.address}>"
        return None

    async def check_recipient(
        self, info: SessionInfo, envelope: Envelope, address: str
    ) -> str | None:
        try:
            local, domain = split(normalize(address))
        except AddressError:
            return f"550 5.1.2 <{address}>: address literals are not accepted"
        if self.is_local_domain(domain):
            normal = f"{local}@{domain}"
            if self.dovecot is not None and not self.router.takes_without_catch_all(normal):
                # No alias, no user of ours: dovecot's user, before the catch-all.
                exists = await self.dovecot.exists(normal)
                if exists is None:
                    return (f"451 4.3.0 <{normal}>: cannot check the recipient now, "
                            "try again later")
                if exists:
                    self.dovecot_users.add(normal)
                    return None
            reply = self.router.check_recipient(normal)
            if reply is not None and self.router.is_unknown(normal):
                # Unknown to users and aliases (a catch-all included): the alias-resolve
                # hook's turn, if there is one, with the address as written and then, as
                # chasquid asks it, without its suffix and drop characters. Its targets
                # are routed with the message.
                cleaned = f"{normalize_name(local, self.config.aliases)}@{domain}"
                for name in dict.fromkeys((normal, cleaned)):
                    targets = await self._filters().resolve(name)
                    if targets is None:
                        return (f"451 4.3.0 <{address}>: cannot look the address up now, "
                                "try again")
                    if targets:
                        envelope.alias_targets[address] = targets
                        return None
            return reply
        if info.user is not None:
            return None
        return f"554 5.7.1 <{address}>: Relay access denied"

    # -- DATA -----------------------------------------------------------------

    async def accept_message(self, info: SessionInfo, envelope: Envelope, body: bytes) -> str:
        assert envelope.sender is not None
        item_id = new_id()
        tls = f"{info.tls_version} {info.tls_cipher}" if info.tls else None
        received = received_header(
            helo=info.helo, peer_ip=info.peer_ip, hostname=self.hostname, queue_id=item_id,
            protocol=protocol_name(info.esmtp, info.tls, info.user is not None),
            recipient=envelope.recipients[0] if len(envelope.recipients) == 1 else None,
            tls=tls,
        )
        meta: dict[str, str] = {"client_ip": info.peer_ip, "helo": info.helo}
        if info.user:
            meta["user"] = info.user
        for key, name in (("RET", "ret"), ("ENVID", "envid")):
            value = envelope.sender_params.get(key)
            if value:
                meta[name] = value.upper() if key == "RET" else value
        params = [{k: v for k, v in p.items() if v is not None}
                  for p in envelope.recipient_params]
        results: AuthResults | None = None
        filters = self._filters()
        try:
            # The header section is parsed once, here; in a thread when it is large.
            end = header_end(body, INLINE_HEADER)
            if end is None and len(body) > INLINE_HEADER:
                fields = await asyncio.to_thread(self._inspect, info.user, body)
            else:
                fields = self._inspect(info.user, body)
            if info.user is not None:
                fixups = submission_fixups(fields, split(info.user)[1])
                message = (fixups + body if not fixups or len(body) <= INLINE_COPY
                           else await asyncio.to_thread(bytes.__add__, fixups, body))
                outcome = await filters.check(self._filter_input(info, envelope, item_id),
                                              received, message)
                if outcome.reply is not None:
                    return outcome.reply
                stored = await self.intake.own(
                    envelope.sender, envelope.recipients, params, [outcome.top + received],
                    [outcome.message], meta, item_id, fields=fields,
                    hook_targets=envelope.alias_targets)
            else:
                checked = await self._check_inbound(info, envelope.sender, body, fields)
                if isinstance(checked, str):
                    return checked
                results, body = checked
                outcome = await filters.check(
                    self._filter_input(info, envelope, item_id, results),
                    received + results.header, body)
                if outcome.reply is not None:
                    return outcome.reply
                stored = await self.intake.inbound(
                    envelope.sender, envelope.recipients, params,
                    [outcome.top + received, results.header], outcome.message, results, meta,
                    item_id, fields=fields, hook_targets=envelope.alias_targets)
        except HeaderError as exc:
            return exc.reply
        except QueueFullError as exc:
            log.warning("queue refused message from %s: %s", info.peer_ip, exc)
            return "452 4.3.1 Insufficient system storage, try again later"
        except OSError as exc:
            log.error("queue write failed: %s", exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                return "452 4.3.1 Insufficient system storage, try again later"
            return "451 4.3.0 Local error in processing, try again later"
        if not stored:
            return "554 5.5.1 No valid recipients"
        for item in stored:
            self.events.queued_message(info, item, results)
        return f"250 2.0.0 Ok: queued as {stored[0].id}"

    def _inspect(self, user: str | None, body: bytes) -> list[tuple[str, str]]:
        """The parsed header section, once it has passed what every message must: the
        size and field caps, the hop count (a mail loop), and for a submission, that each
        From: mailbox is the user's. HeaderError (the reply) when it has not."""
        limits = self.config.limits
        fields = read_header(body, limits.max_header_size, limits.max_header_fields)
        # RFC 5321 6.3. Postfix's rule (hopcount_limit): refused when the Received:
        # fields, ours included, reach the limit; a message we accept leaves with fewer.
        hops = count(fields, "Received") + 1
        if hops >= limits.max_hops:
            raise HeaderError(f"554 5.4.6 Too many hops ({hops}, the limit is "
                              f"{limits.max_hops}): a mail loop?")
        mailboxes_from = mailboxes(get_all(fields, "From"), "From:")  # capped; may refuse
        if user is not None:
            # Sender: (and Resent-From:/Resent-Sender:) name who sent the message; a user
            # may no more put another's address there than in From: (outside eyes).
            found_in = [("From", mailboxes_from)] + [
                (name, mailboxes(get_all(fields, name), f"{name}:"))
                for name in ("Sender", "Resent-From", "Resent-Sender")]
            for name, found in found_in:
                for address in found:  # "From: me" (no domain) is nobody's address
                    if not self.senders.may_send_as(user, address):
                        raise HeaderError(f"550 5.7.1 Not authorised to send as "
                                          f"<{address}> ({name}: header)")
        return fields

    def _filter_input(self, info: SessionInfo, envelope: Envelope, item_id: str,
                      results: AuthResults | None = None) -> FilterInput:
        sender = envelope.sender or ""
        try:
            local_sender = self.is_local_domain(domain_of(sender)) if sender else False
        except AddressError:
            local_sender = False
        return FilterInput(
            remote_addr=info.peer_ip, remote_port=info.peer_port, helo=info.helo,
            mail_from=sender, rcpt_to=tuple(envelope.recipients), auth_as=info.user,
            on_tls=info.tls, from_local_domain=local_sender,
            spf_pass=results is not None and results.spf == "pass", queue_id=item_id)

    async def _check_inbound(
        self, info: SessionInfo, sender: str, body: bytes, fields: list[tuple[str, str]]
    ) -> tuple[AuthResults, bytes] | str:
        """SPF, DKIM and DMARC of mail from outside: the results (and the body without
        forged Authentication-Results claiming to be ours), or the refusal reply."""
        settings = self.config.inbound

        from .authres import check_message, decide, strip_our_authentication_results

        resolver = self._dns()

        def run() -> tuple[AuthResults, bytes]:
            cleaned = strip_our_authentication_results(body, self.hostname, arc=True)
            results = check_message(cleaned, client_ip=info.peer_ip, helo=info.helo,
                                    mail_from=sender, authserv_id=self.hostname,
                                    dns=self.config.dns, resolver=resolver, fields=fields)
            return results, cleaned

        # In a thread: lookups block, and parsing and hashing take time on big messages.
        results, cleaned = await asyncio.to_thread(run)
        reply = decide(results, reject_spf=settings.reject_spf_fail,
                       reject_dmarc=settings.reject_dmarc)
        if reply is None and settings.on_dns_error == "tempfail" and "temperror" in (
            results.spf, results.dmarc, *(r for r, _, _ in results.dkim)
        ):
            reply = "451 4.4.3 Temporary DNS failure checking the sender, try again later"
        if reply is not None:
            return reply
        return results, cleaned


def _login_name(username: str) -> str:
    """A dovecot user as the session knows it: ``user@domain`` with the domain in lower
    case (what sender rights compare), or a bare name as given."""
    local, at, domain = username.rpartition("@")
    return f"{local}@{domain.lower()}" if at else username
