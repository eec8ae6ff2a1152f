"""Helpers shared by the CLI commands."""

from __future__ import annotations

from ..address import AddressError, normalize_domain
from ..config import Config
from ..errors import MailrelayError


def local_domain(config: Config, domain: str) -> str:
    """``domain`` normalised, if it is one of ours; else a one-line error naming ours."""
    try:
        domain = normalize_domain(domain)
    except AddressError as exc:
        raise MailrelayError(str(exc)) from None
    if domain not in config.domains:
        known = ", ".join(config.domains) if config.domains else "none"
        raise MailrelayError(f"{domain} is not a local domain (known: {known}; "
                             f"create {config.domain_dir(domain)}/ to add it)")
    return domain
