"""Where each recipient goes: local users, aliases (with catch-all), pipes, and SRS
addresses whose bounces we relay back to the original sender."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..address import AddressError, normalize_domain, split
from ..queue import EMAIL, MAILBOX, PIPE, Recipient
from .aliases import Aliases, Target
from .srs import SRS, SRSError
from .users import Users

log = logging.getLogger("mailrelay.router")

@dataclass
class Expansion:
    """The final recipients of a message's envelope recipients."""

    local: list[Recipient]  # mailboxes and pipes: delivered here
    remote: list[Recipient]  # addresses elsewhere: sent on by SMTP
    # The local domain whose aliases sent mail elsewhere (the SRS domain when forwarding).
    forwarding_domain: str | None = None


class Router:
    """Where each envelope recipient goes: our users' mailboxes, aliases (and their
    pipes and forwards), SRS addresses of ours back to the original sender, and the
    catch-all last. RCPT asks it whether an address exists; the intake, where to."""

    def __init__(
        self,
        is_local_domain: Callable[[str], bool],
        users: Callable[[], Users],
        aliases: Callable[[], Aliases],
        srs: SRS | None,
    ):
        self.is_local_domain = is_local_domain
        self._users = users
        self._aliases = aliases
        self.srs = srs
        # Users known elsewhere (dovecot, asked at RCPT): users like those of the files.
        self.also_user: Callable[[str], bool] | None = None

    def is_user(self, address: str) -> bool:
        return self._users().exists(address) or (
            self.also_user is not None and self.also_user(address))

    def takes_without_catch_all(self, address: str) -> bool:
        """Whether an alias, a user or our SRS takes ``address`` (the catch-all aside):
        before the catch-all, dovecot is asked about it (as chasquid does)."""
        try:
            if self._srs_reverse(address) is not None:
                return True
            return bool(self._aliases().resolve(address, self.is_user, self.is_local_domain,
                                                warn=lambda message: None,
                                                use_catch_all=False))
        except (SRSError, AddressError):
            return False

    def _srs_reverse(self, address: str) -> str | None:
        """The original sender an SRS address of ours stands for; None if it is not one.

        Raises SRSError for a forged or expired SRS address."""
        if self.srs is None or not SRS.is_srs(address):
            return None
        return self.srs.reverse(address)

    def _srs_original(self, address: str) -> str | None:
        """Like _srs_reverse, to the end: an SRS1 address of ours whose first hop is our
        domain too (mail that went out, came back through another forwarder and went out
        again) reverses to an SRS0 address of ours, which reverses to the sender."""
        original = self._srs_reverse(address)
        if original is None:
            return None
        try:
            local_again = self.is_local_domain(normalize_domain(split(original)[1]))
            again = self._srs_reverse(original) if local_again else None
        except (AddressError, SRSError):
            again = None  # bounced here as unknown: nothing better to do with it
        return again or original

    def check_recipient(self, address: str) -> str | None:
        """None to accept RCPT TO a local-domain address, else the refusal reply."""
        try:
            if self._srs_reverse(address) is not None:
                return None
        except SRSError as exc:
            log.info("rcpt refused: <%s>: %s", address, exc)
            return f"550 5.1.1 <{address}>: invalid or expired SRS address"
        if self._aliases().exists(address, self.is_user, self.is_local_domain):
            return None
        return f"550 5.1.1 <{address}>: no such user here"

    def is_unknown(self, address: str) -> bool:
        """Neither an SRS address of ours, nor a user, an alias or a catch-all's: the
        only addresses the alias-resolve hook is asked about."""
        try:
            if self._srs_reverse(address) is not None:
                return False
        except SRSError:
            return False  # ours, but forged or expired: refused as such
        return not self._aliases().exists(address, self.is_user, self.is_local_domain)

    def owners(self, address: str) -> list[str]:
        """Users an address delivers to through aliases (for sender rights)."""
        return self._aliases().owners(address, self.is_user, self.is_local_domain)

    def expand(self, addresses: list[str], params: list[dict[str, str]],
               hook_targets: dict[str, list] | None = None) -> Expansion:
        """The final recipients. ``hook_targets``: what the alias-resolve hook gave at RCPT
        for addresses the aliases do not know (AliasTarget lists, by envelope address);
        a target in our domains is resolved once more through users and aliases."""
        hook_targets = hook_targets or {}
        expansion = Expansion(local=[], remote=[])
        seen: set[tuple[str, str, str | None]] = set()

        def add(rcpt: Recipient, original: str) -> None:
            key = (rcpt.kind, rcpt.address, rcpt.command)
            if key in seen:
                return
            seen.add(key)
            # A DSN names the address the sender used, not where an alias led.
            rcpt.params.setdefault("ORCPT", f"rfc822;{original}")
            if original.casefold() != rcpt.address.casefold():
                rcpt.original = original  # for the mail log (orig_to) and `queue show`
            is_remote = rcpt.kind == EMAIL and not self.is_local_domain(
                normalize_domain(split(rcpt.address)[1]))
            (expansion.remote if is_remote else expansion.local).append(rcpt)

        for address, rcpt_params in zip(addresses, params, strict=True):
            try:
                domain = normalize_domain(split(address)[1])
            except AddressError:
                continue
            if not self.is_local_domain(domain):
                add(Recipient(address, params=dict(rcpt_params)), address)
                continue
            try:
                original = self._srs_original(address)
            except SRSError:
                original = None  # checked at RCPT; expired since: nothing to relay to
            if original is not None:
                add(Recipient(original, params=dict(rcpt_params)), address)
                continue
            targets = (self._hook_targets(hook_targets[address]) if address in hook_targets
                       else self._aliases().resolve(address, self.is_user, self.is_local_domain))
            for target in targets:
                if target.kind == PIPE:
                    add(Recipient(address, kind=PIPE, command=target.value,
                                  params=dict(rcpt_params)), address)
                elif target.kind == MAILBOX:
                    add(Recipient(target.value, kind=MAILBOX, params=dict(rcpt_params)),
                        address)
                else:
                    add(Recipient(target.value, params=dict(rcpt_params)), address)
                    expansion.forwarding_domain = expansion.forwarding_domain or domain
        return expansion

    def _hook_targets(self, found: list) -> list[Target]:
        return hook_targets(found, self._aliases(), self.is_user, self.is_local_domain,
                            warn=lambda text: log.warning("alias-resolve: %s", text))


def hook_targets(found: list, aliases: Aliases, is_user: Callable[[str], bool],
                 is_local_domain: Callable[[str], bool],
                 warn: Callable[[str], None]) -> list[Target]:
    """The alias-resolve hook's targets as final ones: pipes and remote addresses as
    they are; addresses in our domains through users and aliases (not the hook again:
    a hook that names itself cannot loop). The server and `aliases resolve` share it."""
    targets: list[Target] = []
    for target in found:
        if target.kind == PIPE:
            targets.append(Target(PIPE, target.value))
            continue
        try:
            resolved = aliases.resolve(target.value, is_user, is_local_domain)
        except AddressError:
            resolved = []
        if not resolved:
            warn(f"target <{target.value}> delivers nowhere, dropped")
        targets.extend(resolved)
    return targets
