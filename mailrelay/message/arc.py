"""ARC sealing of the mail we forward (RFC 8617), through dkimpy.

A forwarded message keeps its author's From: but leaves from our IP with our SRS
envelope, so the author's SPF no longer aligns and any change breaks DMARC. An ARC set
records what we saw on arrival (our Authentication-Results) under our signature, so the
next receiver (Gmail) can trust those results.

dkimpy signs with its pure-Python RSA (about 10 ms per set of two signatures): fine at
forwarding volumes. Swapping in ``cryptography`` would mean replacing
``dkim.crypto.RSASSA_PKCS1_v1_5_sign`` (the one call both DKIM and ARC signing make).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import authres
import dkim
from authres.arc import ARCAuthenticationResult
from cryptography.hazmat.primitives import serialization

from ..config import DNSSettings
from ..policy.authres import (
    MAX_SIGNED_NAMES,
    DNSLookup,
    DNSTempError,
    QuietLogger,
    strip_our_authentication_results,
)
from .dkim.signer import RSA_SHA256, DKIMKey
from .headers import count, get_all, header_section, parse_headers

log = logging.getLogger("mailrelay.arc")
_DKIMPY_LOG = QuietLogger(logging.getLogger("mailrelay.arc.dkimpy"), {})

_ARC_FIELDS = (b"arc-seal:", b"arc-message-signature:", b"arc-authentication-results:")
MAX_ARC_SETS = 50  # RFC 8617 4.2.1: instance values are 1 to 50


def arc_seal(message: bytes, *, key: DKIMKey | Sequence[DKIMKey], authserv_id: str,
             results_header_value: bytes | str, dns: DNSSettings | None = None,
             timestamp: int | None = None) -> bytes:
    """The ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results fields (CRLF
    terminated) to put in front of ``message``, or b"" when we cannot seal: no RSA key
    (ARC is rsa-sha256 only), a chain that is already failed, or DNS trouble while
    validating the existing chain (its result, cv=, must be pass or fail, not unknown).

    ``key`` is the forwarding domain's key or all its keys (the first RSA one signs).
    ``results_header_value`` is our Authentication-Results for the message, with or
    without the field name; its authserv-id must be ours. ``dns`` is needed to validate
    a chain the message already carries.
    """
    authserv_id = authserv_id.lower()  # dkimpy matches it against authres's lowercased one
    rsa_key = _rsa_key(key)
    if rsa_key is None:
        return b""
    cv = _chain_validation(message, dns)
    if cv is None:
        return b""
    try:
        results = _results_header(results_header_value, authserv_id, cv)
    except authres.AuthResError as exc:
        log.warning("arc: not sealing: our Authentication-Results do not parse (%s)", exc)
        return b""
    # dkimpy takes our results (and cv) from the Authentication-Results fields with our
    # authserv-id in the message: exactly one, the one we give.
    working = results + b"\r\n" + strip_our_authentication_results(message, authserv_id)
    pem = rsa_key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    try:
        fields = dkim.arc_sign(working, rsa_key.selector.encode("ascii"),
                               rsa_key.domain.encode("ascii"), pem,
                               authserv_id.encode("utf-8"), timestamp=timestamp,
                               logger=_DKIMPY_LOG)
    except dkim.DKIMException as exc:  # e.g. instance 50 reached, no From: to sign
        log.warning("arc: cannot seal: %s", exc)
        return b""
    return b"".join(fields)


def _rsa_key(key: DKIMKey | Sequence[DKIMKey]) -> DKIMKey | None:
    keys = [key] if isinstance(key, DKIMKey) else list(key)
    return next((k for k in keys if k.algorithm == RSA_SHA256), None)


def has_arc_chain(message: bytes) -> bool:
    """Whether the header section has ARC fields."""
    head = header_section(message).lower()
    return any(head.startswith(name) or b"\n" + name in head for name in _ARC_FIELDS)


def _too_big(message: bytes) -> str | None:
    """Why an existing chain is more than we validate (dkimpy's work grows with sets x
    fields and with h= names x fields), or None."""
    fields = parse_headers(message)
    if count(fields, "ARC-Seal") > MAX_ARC_SETS:
        return f"more than {MAX_ARC_SETS} ARC sets"
    if any(value.count(":") >= MAX_SIGNED_NAMES
           for value in get_all(fields, "ARC-Message-Signature")):
        return f"an ARC-Message-Signature naming {MAX_SIGNED_NAMES} fields or more"
    return None


def _chain_validation(message: bytes, dns: DNSSettings | None) -> str | None:
    """cv= for our set: none, pass or fail; None when we should not seal."""
    if not has_arc_chain(message):
        return "none"
    if dns is None:
        raise ValueError("the message has an ARC chain: arc_seal needs dns= to validate it")
    reason = _too_big(message)
    if reason is not None:
        log.info("arc: not sealing: %s", reason)
        return None
    lookup = DNSLookup(dns)
    try:
        cv, _results, reason = dkim.arc_verify(message, logger=_DKIMPY_LOG,
                                               dnsfunc=lookup.dkim_dnsfunc)
    except DNSTempError as exc:
        log.warning("arc: not sealing: existing chain not validated (%s)", exc)
        return None
    if cv is None:  # an earlier sealer already recorded cv=fail: the chain is over
        log.info("arc: not sealing: %s", reason)
        return None
    return cv.decode("ascii")


def _results_header(value: bytes | str, authserv_id: str, cv: str) -> bytes:
    """Our Authentication-Results field, its arc= result replaced by ``cv``."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    name, colon, rest = text.partition(":")
    if colon and name.strip().lower() == "authentication-results":
        text = rest.strip()
    header = authres.AuthenticationResultsHeader.parse_value(text.replace("\r\n", " "))
    if header.authserv_id.lower() != authserv_id.lower():
        raise ValueError(f"results are from {header.authserv_id!r}, not {authserv_id!r}")
    results = [r for r in header.results if r.method != "arc"]
    if cv != "none":
        results.append(ARCAuthenticationResult(result=cv))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    return str(header).encode("utf-8")

