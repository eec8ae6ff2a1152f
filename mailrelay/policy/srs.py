"""Sender Rewriting Scheme (SRS) for mail we forward.

When mail from ``alice@sender.test`` is forwarded to a remote address, the envelope
sender becomes an address in our domain, so SPF passes at the receiver and bounces
come back to us; :meth:`SRS.reverse` then tells where to relay the bounce.

This is Shevek's "guarded" scheme as implemented by libsrs2 (and postsrsd, which
ships a copy of libsrs2's ``srs2.c``) and by the Python ``srslib``; addresses are
interchangeable with theirs when they share the secret (tested against srslib):

* ``SRS0=HHHH=TT=sender.test=alice@our.domain``: ``TT`` is the day number mod 1024
  as two base32 characters (``A-Z2-7``); ``HHHH`` is the first 4 characters of
  standard base64 (``A-Za-z0-9+/``) of HMAC-SHA1(secret, lower(TT + host + local)),
  lower-casing ASCII only, as libsrs2 does on bytes.
* ``SRS1=HHHH=first.hop==HHHH=TT=orig.host=local@our.domain``: re-forwarding an
  ``SRS0`` address of another domain keeps that domain's opaque part (from its
  separator on) and hashes lower(first hop host + opaque part). Reversing it gives
  back ``SRS0=HHHH=TT=orig.host=local@first.hop``, whose owner checks its own hash.
  Re-forwarding an ``SRS1`` address keeps its first hop and opaque part.

Reversal is as libsrs2: hashes compare case-insensitively (some MTAs lower-case
local parts), an address is valid up to ``max_age_days`` days old inclusive (a
timestamp "from the future" counts as 1024 days old), SRS1 carries no timestamp.
Unlike libsrs2 we compare in constant time, require exactly 4 hash and 2 timestamp
characters, and quote/unquote local parts that are not dot-atoms so the rewritten
sender is a valid RFC 5321 address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets as _secrets
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..address import AddressError, normalize_domain
from ..errors import ConfigError, MailrelayError
from ..fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)

SECRET_FILE = "srs.secret"
SECRET_BYTES = 32
# Shorter keys make the 24-bit hash guessable offline from a few samples sooner.
MIN_SECRET_BYTES = 16

HASH_LENGTH = 4
# Any of these may follow the SRS0/SRS1 tag (libsrs2's srs_separators); the fields
# after it are always separated by "=".
SEPARATORS = "=+-"
_FIELD_SEP = "="

_DAY = 86400
_TIME_SLOTS = 1024  # two base32 characters
_TIME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

# RFC 5321 dot-atom, with RFC 6531's non-ASCII characters allowed in atoms.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class SRSError(MailrelayError, ValueError):
    """An address that cannot be rewritten or reversed (malformed, bad hash, expired)."""


def _unquote(local: str) -> str:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1], flags=re.DOTALL)
    return local


def _quote(local: str) -> str:
    # A quoted original sender ("john doe") must yield a quoted SRS local part, or
    # the next MTA rejects the MAIL FROM.
    if _DOT_ATOM.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split_local(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise SRSError(f"not an address: {address!r}")
    local = _unquote(local)
    if not local:
        raise SRSError(f"empty local part: {address!r}")
    return local, domain


def _split_tag(local: str) -> tuple[str, str, str] | None:
    """``SRS0=rest`` -> ("SRS0", "=", "rest"); None when not tagged."""
    tag = local[:4]
    # isascii: str.upper() maps e.g. "ſ" to "S", which no other implementation does.
    if len(local) < 5 or not tag.isascii() or local[4] not in SEPARATORS:
        return None
    tag = tag.upper()
    if tag not in ("SRS0", "SRS1"):
        return None
    return tag, local[4], local[5:]


def _same_domain(a: str, b: str) -> bool:
    try:
        return normalize_domain(a) == normalize_domain(b)
    except AddressError:
        return a.lower().rstrip(".") == b.lower().rstrip(".")


def _hash(secret: bytes, *parts: str) -> str:
    # bytes.lower() folds ASCII only, like libsrs2's tolower() over the raw bytes.
    data = "".join(parts).encode("utf-8", "surrogatepass").lower()
    digest = hmac.new(secret, data, hashlib.sha1).digest()
    return base64.b64encode(digest)[:HASH_LENGTH].decode("ascii")


class SRS:
    """Rewrite forwarded senders and reverse bounce addresses.

    ``secrets[0]`` signs new addresses; every secret is accepted on reversal, so an
    operator rotates by prepending a new secret and dropping old ones after
    ``max_age_days``. ``now`` returns Unix time (injectable for tests).
    """

    def __init__(
        self,
        secrets: Sequence[bytes],
        max_age_days: int = 21,
        separator: str = "=",
        now: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("SRS needs at least one secret")
        if any(not isinstance(s, bytes) or not s for s in secrets):
            raise ValueError("SRS secrets must be non-empty bytes")
        if separator not in SEPARATORS or len(separator) != 1:
            raise ValueError(f"SRS separator must be one of {SEPARATORS!r}")
        if not 0 <= max_age_days < _TIME_SLOTS - 1:
            raise ValueError(f"max_age_days must be in 0..{_TIME_SLOTS - 2}")
        self._secrets = list(secrets)
        self.max_age_days = max_age_days
        self.separator = separator
        self._now = now

    # -- forward --------------------------------------------------------------

    def forward(self, sender: str, our_domain: str) -> str:
        """The envelope sender to use when forwarding mail from ``sender``."""
        if sender == "":
            return ""  # bounces are never bounced: nothing to rewrite
        local, domain = _split_local(sender)
        if _same_domain(domain, our_domain):
            return sender
        if _FIELD_SEP in domain:
            # Would shift the field boundaries on reversal and fail the hash.
            raise SRSError(f"invalid domain in sender {sender!r}")
        tagged = _split_tag(local)
        if tagged is not None:
            tag, sep, rest = tagged
            if tag == "SRS0":
                # We are the second hop: bounce via the first hop, which checks its hash.
                return self._srs1(domain, sep + rest, our_domain)
            parts = rest.split(_FIELD_SEP, 2)
            if len(parts) == 3 and all(parts) and parts[2][0] in SEPARATORS:
                # Third or later hop: keep the first hop, replace the hash with ours.
                return self._srs1(parts[1], parts[2], our_domain)
            # A malformed SRS1 is wrapped like any local part (libsrs2 refuses to
            # forward it): the mail still goes out and a bounce returns it verbatim.
        day = int(self._now() // _DAY) % _TIME_SLOTS
        stamp = _TIME_CHARS[day >> 5] + _TIME_CHARS[day & 31]
        digest = _hash(self._secrets[0], stamp, domain, local)
        srs_local = f"SRS0{self.separator}{digest}={stamp}={domain}={local}"
        return f"{_quote(srs_local)}@{our_domain}"

    def _srs1(self, first_hop: str, opaque: str, our_domain: str) -> str:
        digest = _hash(self._secrets[0], first_hop, opaque)
        srs_local = f"SRS1{self.separator}{digest}={first_hop}={opaque}"
        return f"{_quote(srs_local)}@{our_domain}"

    # -- reverse --------------------------------------------------------------

    def reverse(self, address: str) -> str:
        """The address a bounce to ``address`` (one of ours) must be relayed to."""
        local, _domain = _split_local(address)
        tagged = _split_tag(local)
        if tagged is None:
            raise SRSError(f"not an SRS address: {address!r}")
        tag, _sep, rest = tagged
        if tag == "SRS0":
            parts = rest.split(_FIELD_SEP, 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError(f"malformed SRS0 address: {address!r}")
            digest, stamp, host, user = parts
            # Hash first, so "expired" is only ever said of an address we made.
            self._check_hash(address, digest, stamp, host, user)
            self._check_stamp(address, stamp)
            return f"{_quote(user)}@{host}"
        parts = rest.split(_FIELD_SEP, 2)
        if len(parts) != 3 or not all(parts) or parts[2][0] not in SEPARATORS:
            raise SRSError(f"malformed SRS1 address: {address!r}")
        digest, host, opaque = parts
        self._check_hash(address, digest, host, opaque)
        return f"{_quote('SRS0' + opaque)}@{host}"

    def _check_hash(self, address: str, digest: str, *parts: str) -> None:
        if len(digest) != HASH_LENGTH:
            raise SRSError(f"invalid SRS hash: {address!r}")
        given = digest.encode("utf-8", "surrogatepass").lower()
        ok = False
        for secret in self._secrets:
            # Constant time, and no early exit that would tell which secret matched.
            ok |= hmac.compare_digest(_hash(secret, *parts).encode("ascii").lower(), given)
        if not ok:
            raise SRSError(f"invalid SRS hash: {address!r}")

    def _check_stamp(self, address: str, stamp: str) -> None:
        stamp = stamp.upper() if stamp.isascii() else stamp
        if len(stamp) != 2 or any(c not in _TIME_CHARS for c in stamp):
            raise SRSError(f"invalid SRS timestamp: {address!r}")
        then = _TIME_CHARS.index(stamp[0]) << 5 | _TIME_CHARS.index(stamp[1])
        today = int(self._now() // _DAY) % _TIME_SLOTS
        # Modular age handles the wrap from day 1023 to day 0.
        if (today - then) % _TIME_SLOTS > self.max_age_days:
            raise SRSError(f"expired SRS address: {address!r}")

    @staticmethod
    def is_srs(address: str) -> bool:
        """Whether ``address`` has an SRS0/SRS1 local part (not whether it is valid)."""
        local, at, domain = address.rpartition("@")
        if not at or not domain:
            return False
        return _split_tag(_unquote(local)) is not None


# -- secrets file ---------------------------------------------------------------


def _decode_secret(text: str) -> bytes:
    # Hex first: an even-length hex string is also valid base64, and an operator
    # who pastes `openssl rand -hex 32` means hex.
    if _HEX.fullmatch(text):
        return bytes.fromhex(text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64 or hex") from exc


def _read_secrets(path: Path) -> list[bytes]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text", path) from exc
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    result: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            secret = _decode_secret(line)
        except ValueError as exc:
            raise ConfigError(f"SRS secret is {exc}", path, number) from exc
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"SRS secret shorter than {MIN_SECRET_BYTES} bytes", path, number)
        result.append(secret)
    if not result:
        raise ConfigError("no SRS secret in file", path)
    return result


def load_or_create_secrets(data_dir: Path) -> list[bytes]:
    """Secrets from ``data_dir/srs.secret``, newest (signing) first.

    One secret per line, base64 or hex; blank lines and ``#`` comments are skipped.
    The file is created once with a random 32-byte secret, mode 0600. To rotate,
    the operator prepends a new line; older lines keep reversing addresses already
    handed out and can be removed after ``max_age_days``.
    """
    data_dir = Path(data_dir)
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        content = base64.b64encode(_secrets.token_bytes(SECRET_BYTES)) + b"\n"
        tmp = data_dir / f".{SECRET_FILE}.new{os.getpid()}.{_secrets.token_hex(4)}"
        atomic_write(tmp, content, mode=0o600, sync_dir=False)
        try:
            # link(), unlike rename(), fails if the file exists: when two processes
            # start at once, both end up with the one secret that won.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        fsync_dir(data_dir)
    return _read_secrets(path)
