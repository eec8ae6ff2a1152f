"""Sender rights: which addresses an authenticated user may send as (MAIL FROM and From:)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

from ..address import AddressError, normalize, split, strip_suffix
from ..config import SenderSettings


class SenderPolicy:
    """A user may send as their own address (also with a +suffix), as addresses that
    deliver to them (``owners``, e.g. from aliases), and as configured patterns."""

    def __init__(
        self, settings: SenderSettings,
        owners: Callable[[str], Iterable[str]] | None = None,
    ):
        self.settings = settings
        self.owners = owners

    def may_send_as(self, user: str, address: str) -> bool:
        if not self.settings.restrict:
            return True
        try:
            address = normalize(address)
            local, domain = split(address)
            user_local, user_domain = split(normalize(user))
        except AddressError:
            return False
        if domain == user_domain and strip_suffix(local) == user_local:
            return True
        if self.owners is not None and f"{user_local}@{user_domain}" in self.owners(address):
            return True
        allow = self.settings.allow
        patterns = (*allow.get(f"{user_local}@{user_domain}", ()), *allow.get(user_domain, ()))
        return any(fnmatchcase(address, pattern) for pattern in patterns)
