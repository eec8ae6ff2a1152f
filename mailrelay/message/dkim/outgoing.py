"""Choosing the DKIM signing domain for mail that leaves through us, and signing it."""

from __future__ import annotations

from collections.abc import Callable

from ...address import AddressError, domain_of
from ...ops.events import Events
from ..headers import addresses, get_all
from .keys import KeyRing
from .signer import sign


class MessageSigner:
    """Signs with every key of the signing domain: the From: header's domain when it is
    ours (so DKIM aligns for DMARC), else the envelope sender's domain when that is ours."""

    def __init__(self, keyring: Callable[[], KeyRing], is_local_domain: Callable[[str], bool],
                 events: Events | None = None):
        self._keyring = keyring
        self.is_local_domain = is_local_domain
        self.events = events if events is not None else Events()

    def signing_domain(self, fields: list[tuple[str, str]], sender: str) -> str | None:
        candidates = [*addresses(get_all(fields, "From"))[:1], sender]
        for address in candidates:
            try:
                domain = domain_of(address)
            except AddressError:
                continue
            if self.is_local_domain(domain):
                return domain
        return None

    def keys_for(self, domain: str) -> list:
        return self._keyring().keys_for(domain)

    def signature(self, message: bytes, fields: list[tuple[str, str]], sender: str) -> bytes:
        """DKIM-Signature header fields to prepend (empty when we have no key to sign with).

        CPU-bound (hashing, RSA): callers run it in a worker thread.
        """
        domain = self.signing_domain(fields, sender)
        if domain is None:
            return b""
        keys = self._keyring().keys_for(domain)
        if not keys:
            return b""
        signature = sign(message, keys)
        self.events.dkim_signed(domain, [key.algorithm for key in keys])
        return signature
