"""The one way into the queue: sign, route, put, schedule.

SMTP sessions (through the policy backend, once it has accepted a message) and the server
itself (DSNs) hand messages here. When a call returns, every part of the message is on
disk (fsynced) and scheduled for delivery; when it raises, nothing of it was kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .address import AddressError, domain_of
from .message.dkim.outgoing import MessageSigner
from .message.headers import parse_headers
from .policy.router import Expansion, Router
from .policy.srs import SRS
from .queue import Queue, QueueItem, Recipient

if TYPE_CHECKING:  # the checks (dkimpy, pyspf) load with the first message from outside
    from .policy.authres import AuthResults

log = logging.getLogger("mailrelay.intake")


@dataclass
class Part:
    """One queue item of an accepted message: its envelope sender, its recipients and
    its bytes (chunks written one after the other)."""

    sender: str
    recipients: list[Recipient]
    chunks: list[bytes]


class Intake:
    """Turns an accepted message into queue items.

    Our own mail (a user's submission, a DSN) is DKIM-signed for its domain and queued as
    one item. Mail from outside is queued as it came for local recipients; what an alias
    sends elsewhere becomes a second item, forwarded: its envelope sender is rewritten
    with SRS, an ARC set records the checks we made, and we sign it. Every item is
    stored before the caller answers anyone (all or nothing), then scheduled.
    """

    def __init__(self, queue: Queue, router: Router, signer: MessageSigner,
                 srs: Callable[[], SRS | None], default_domain: Callable[[], str | None],
                 hostname: str, dns_settings, schedule: Callable[[QueueItem], None]):
        self.queue = queue
        self.router = router
        self.signer = signer
        self._srs = srs
        self._default_domain = default_domain
        self.hostname = hostname
        self.dns_settings = dns_settings
        self.schedule = schedule

    async def own(self, sender: str, recipients: list[str], params: list[dict[str, str]],
                  trace: list[bytes], message: list[bytes], meta: dict[str, str],
                  item_id: str | None = None, reserve: bool = False,
                  fields: list[tuple[str, str]] | None = None,
                  hook_targets: dict[str, list] | None = None) -> list[QueueItem]:
        """Mail that leaves in our name: ``trace`` (Received) stays above the signature,
        which covers ``message`` (added headers and the message itself). ``reserve``:
        see Queue.put. ``fields``: the message's header as the caller parsed it (else
        parsed here); ``hook_targets``: the alias-resolve hook's answers at RCPT (see
        Router.expand)."""
        def sign() -> bytes:  # joining a large message takes time too: in the thread
            data = b"".join(message)
            return self.signer.signature(data, parse_headers(data) if fields is None
                                         else fields, sender)
        signature = await asyncio.to_thread(sign)
        expansion = self.router.expand(recipients, params, hook_targets)
        return await self._store(
            [Part(sender, expansion.local + expansion.remote, [*trace, signature, *message])],
            meta, item_id, reserve)

    async def generated(self, sender: str, recipients: list[str], data: bytes
                        ) -> QueueItem | None:
        """A message we write ourselves (a DSN): signed like all our mail. Routed too: a
        bounce of forwarded mail goes to our SRS address, which stands for the original
        sender. None when no recipient is left to deliver to."""
        # A DSN is stored even when the queue refuses new mail (Queue.put's reserve):
        # the failure it reports is only recorded once it is.
        stored = await self.own(sender, recipients, [{} for _ in recipients], [], [data],
                                {"generated": True}, reserve=True)
        return stored[0] if stored else None

    async def inbound(self, sender: str, recipients: list[str], params: list[dict[str, str]],
                      trace: list[bytes], body: bytes, results: AuthResults | None,
                      meta: dict[str, str], item_id: str | None = None,
                      fields: list[tuple[str, str]] | None = None,
                      hook_targets: dict[str, list] | None = None) -> list[QueueItem]:
        """Mail from outside for our domains; ``trace``: Received (with what the filters
        put above it), Authentication-Results. ``fields`` and ``hook_targets``: as for
        ``own``."""
        # Whether a DSN may return its content to the sender (DeliveryManager).
        meta = {**meta, "sender_verified": sender_verified(sender, results)}
        expansion = self.router.expand(recipients, params, hook_targets)
        parts = []
        if expansion.local:
            parts.append(Part(sender, expansion.local, [*trace, body]))
        if expansion.remote:
            parts.append(await self._forwarded(sender, expansion, trace, body, results,
                                               fields))
        return await self._store(parts, meta, item_id)

    async def _forwarded(self, sender: str, expansion: Expansion, trace: list[bytes],
                         body: bytes, results: AuthResults | None,
                         fields: list[tuple[str, str]] | None = None) -> Part:
        """The envelope sender becomes an SRS address of ours (so SPF passes at the next
        hop and bounces come back through us), an ARC set records what we saw, and we
        sign it for the domain whose alias sent it on."""
        domain = expansion.forwarding_domain or self._default_domain() or self.hostname
        srs = self._srs()
        new_sender = srs.forward(sender, domain) if sender and srs else sender
        keys = self.signer.keys_for(domain)
        seal = results is not None and bool(keys)

        def sign() -> tuple[bytes, bytes]:  # all of it in a thread: big messages take time
            from .message.arc import arc_seal  # dkimpy's ARC: loaded when first needed

            message = b"".join([*trace[1:], body])  # what ARC seals: all but our Received
            arc = b""
            if seal:
                assert results is not None
                arc = arc_seal(message, key=keys, authserv_id=self.hostname,
                               results_header_value=results.header, dns=self.dns_settings)
            signature = self.signer.signature(arc + message, parse_headers(body)
                                              if fields is None else fields, new_sender)
            return arc, signature

        arc, signature = await asyncio.to_thread(sign)
        if seal and not arc:
            log.warning("forward: no ARC set added for %s (no RSA key, or the existing "
                        "chain could not be checked)", domain)
        return Part(new_sender, expansion.remote, [signature, arc, *trace, body])

    async def _store(self, parts: list[Part], meta: dict[str, str],
                     item_id: str | None, reserve: bool = False) -> list[QueueItem]:
        """Every part durably, or none (QueueFullError, OSError); then scheduled."""
        stored: list[QueueItem] = []
        try:
            for part in parts:
                if part.recipients:
                    stored.append(await self.queue.put(
                        part.sender, part.recipients, part.chunks, meta,
                        item_id=item_id if not stored else None, reserve=reserve))
        except BaseException:
            for item in stored:  # not acknowledged, so not accepted: take it back
                await self.queue.remove(item)
            raise
        for item in stored:
            self.schedule(item)
        return stored


def sender_verified(sender: str, results: AuthResults | None) -> bool:
    """Whether the checks show that the envelope sender's domain sent this message: SPF
    passed for it, or DMARC passed for a From: domain of the same organisation. (DMARC
    alone proves the From: domain, which a forger may own while writing someone else's
    address in MAIL FROM, where the DSN would go.)"""
    if not sender or results is None:
        return False
    if results.spf == "pass":  # checked for the MAIL FROM domain
        return True
    if results.dmarc != "pass" or not results.from_domain:
        return False
    from .policy.authres import org_domain

    try:
        return org_domain(domain_of(sender)) == org_domain(results.from_domain)
    except (AddressError, ValueError):
        return False
