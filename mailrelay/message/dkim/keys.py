"""DKIM keys on disk (``domains/<domain>/dkim:<selector>.pem``, chasquid's layout) and
the DNS records that publish them."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ...errors import ConfigError, MailrelayError
from ...fsutil import atomic_write
from .signer import DKIMKey

if TYPE_CHECKING:
    from ...config import Config

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

KEY_PREFIX = "dkim:"
KEY_SUFFIX = ".pem"
ALGOS = ("rsa2048", "rsa3072", "ed25519")
MIN_RSA_BITS = 1024  # RFC 8301: smaller keys are not to be used, and verifiers reject them
# A selector is one or more DNS labels (RFC 6376 3.1); it becomes part of a DNS name.
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def check_selector(selector: str) -> str:
    if not _SELECTOR.fullmatch(selector) or len(selector) > 200:
        raise MailrelayError(f"not a valid DKIM selector: {selector!r} "
                             "(letters, digits and hyphens, e.g. 20240101)")
    return selector


def key_path(domain_dir: Path, selector: str) -> Path:
    return domain_dir / f"{KEY_PREFIX}{selector}{KEY_SUFFIX}"


def load_key(path: Path, domain: str, selector: str) -> DKIMKey:
    """Load one key file; ConfigError names the file and the problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read DKIM key: {exc.strerror or exc}", path) from None
    try:
        # PKCS#8 ("BEGIN PRIVATE KEY") or traditional RSA ("BEGIN RSA PRIVATE KEY", as
        # chasquid and `openssl genrsa` write it).
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError("DKIM key is encrypted; store it without a passphrase", path) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        # cryptography's first sentence says what is wrong; the rest is a link.
        reason = str(exc).split(". ")[0].strip() or "unreadable"
        raise ConfigError(f"not a PEM private key ({reason})", path) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"RSA key of {key.key_size} bits is too small for DKIM "
                              f"(at least {MIN_RSA_BITS}, 2048 recommended)", path)
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"DKIM keys are RSA or Ed25519, not {type(key).__name__}", path)
    return DKIMKey.from_private_key(domain, selector, key, path)


def load_domain_keys(domain_dir: Path, domain: str) -> tuple[list[DKIMKey], list[ConfigError]]:
    """Every ``dkim:<selector>.pem`` of one domain, sorted by selector; a broken file is
    reported and the others still load."""
    keys: list[DKIMKey] = []
    errors: list[ConfigError] = []
    if not domain_dir.is_dir():
        return keys, errors
    for path in sorted(domain_dir.glob(f"{KEY_PREFIX}*{KEY_SUFFIX}")):
        selector = path.name[len(KEY_PREFIX):-len(KEY_SUFFIX)]
        try:
            check_selector(selector)
            keys.append(load_key(path, domain, selector))
        except ConfigError as exc:
            errors.append(exc)
        except MailrelayError as exc:
            errors.append(ConfigError(str(exc), path))
    return keys, errors


class KeyRing:
    """The DKIM keys of all local domains; every key of the sender's domain signs."""

    def __init__(self, keys: dict[str, list[DKIMKey]] | None = None):
        self._keys = {domain.lower(): list(found) for domain, found in (keys or {}).items()
                      if found}

    @classmethod
    def load(cls, config: Config) -> tuple[KeyRing, list[ConfigError]]:
        keys: dict[str, list[DKIMKey]] = {}
        errors: list[ConfigError] = []
        for domain in config.domains:
            found, problems = load_domain_keys(config.domain_dir(domain), domain)
            keys[domain] = found
            errors += problems
        return cls(keys), errors

    def keys_for(self, domain: str) -> list[DKIMKey]:
        return list(self._keys.get(domain.lower().rstrip("."), ()))

    def domains(self) -> list[str]:
        """The domains that have at least one key."""
        return sorted(self._keys)


def generate_key(algo: str) -> PrivateKey:
    """A new private key: ``rsa2048``, ``rsa3072`` or ``ed25519``."""
    if algo == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algo == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if algo == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise MailrelayError(f"unknown key algorithm {algo!r} (use one of {', '.join(ALGOS)})")


def write_key(domain_dir: Path, selector: str, key: PrivateKey) -> Path:
    """Write ``dkim:<selector>.pem`` (PKCS#8 PEM, mode 0600); never replaces a key, since
    a key that is still published in DNS must keep signing until it is retired."""
    path = key_path(domain_dir, check_selector(selector))
    if path.exists():
        raise MailrelayError(f"{path} already exists (choose another selector)")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem, mode=0o600)
    return path


def dns_record(key: DKIMKey) -> tuple[str, str]:
    """The TXT record's name and value (RFC 6376 3.6.1; RFC 8463 for Ed25519)."""
    public = key.private_key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        kind = "ed25519"
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        kind = "rsa"
        raw = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    value = f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"
    return f"{key.selector}._domainkey.{key.domain}", value


def format_txt(name: str, value: str) -> str:
    """A zone-file line; the value is split into quoted strings of at most 255 bytes
    (the limit of one DNS character-string)."""
    data = value.encode("utf-8")
    chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    quoted = " ".join(f'"{_zone_escape(chunk)}"' for chunk in chunks)
    return f"{name.rstrip('.')}. IN TXT ( {quoted} )"


def _zone_escape(chunk: bytes) -> str:
    # RFC 1035 5.1: \" and \\ for the quote and backslash, \DDD for other bytes.
    out = []
    for byte in chunk:
        if byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)
