"""Server certificates: discovery on disk, SNI selection, self-signed fallback, hot reload.

Certificates come from a certbot/chasquid style ``certs_dir`` (``<name>/fullchain.pem`` +
``privkey.pem``) and from an acme.sh home (``<domain>[_ecc]/fullchain.cer`` + ``<domain>.key``).
Listeners get one long-lived ``SSLContext`` whose SNI callback swaps in the per-certificate
context from the store's *current* state, so a reload takes effect for new handshakes
without touching listeners or open connections.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import TLSSettings
from ..errors import ConfigError, MailrelayError
from ..fsutil import atomic_write

log = logging.getLogger("mailrelay.tls")

SELF_SIGNED_VALIDITY = dt.timedelta(days=3650)
_READ_ATTEMPTS = 3  # re-read when a file is replaced while we load it
# Polls that retry a mismatched pair though nothing changed on disk: a renewal writes the
# chain and then the key, and the key's write may leave its stat unchanged (same inode and
# size, same coarse mtime tick), so "retry when the files change" alone could miss it.
_MISMATCH_RETRIES = 5


class KeyMismatchError(ConfigError):
    """The private key does not belong to the certificate (often: a renewal half-written)."""


@dataclass(frozen=True)
class CertificateSource:
    """One certificate (with its key) found on disk."""

    name: str
    cert_path: Path
    key_path: Path
    names: tuple[str, ...]
    not_after: dt.datetime

    def covers(self, server_name: str) -> bool:
        """True if ``server_name`` matches a name exactly or via a one-level wildcard."""
        server_name = _normalize(server_name)
        if server_name in self.names:
            return True
        _, dot, parent = server_name.partition(".")
        return bool(dot) and f"*.{parent}" in self.names

    @property
    def expired(self) -> bool:
        return self.not_after <= dt.datetime.now(dt.UTC)


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


# --- discovery -----------------------------------------------------------------------------


def _list_dirs(root: Path) -> list[Path]:
    """Visible sub-directories of ``root``, sorted; a missing root has none."""
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ConfigError("not a directory", root) from None
    except OSError as exc:
        raise ConfigError(f"cannot list directory: {exc.strerror or exc}", root) from None
    return [e for e in entries if not e.name.startswith(".") and e.is_dir()]


def _candidates(tls: TLSSettings) -> list[tuple[str, Path, Path]]:
    """Every (name, cert, key) pair the layouts allow, whether or not the files exist."""
    found: list[tuple[str, Path, Path]] = []
    if tls.certs_dir is not None:
        for entry in _list_dirs(tls.certs_dir):
            found.append((entry.name, entry / "fullchain.pem", entry / "privkey.pem"))
    if tls.acme_sh_home is not None:
        # acme.sh keeps ECC certs in "<domain>_ecc" and RSA certs in "<domain>".
        for entry in _list_dirs(tls.acme_sh_home):
            domain = entry.name.removesuffix("_ecc") or entry.name
            found.append((domain, entry / "fullchain.cer", entry / f"{domain}.key"))
    return found


def find_certificates(tls: TLSSettings) -> list[CertificateSource]:
    """Certificates in ``certs_dir`` then ``acme_sh_home``; dirs lacking a file are skipped.

    A certificate or key that does not parse, or a key that does not belong to its
    certificate, raises :class:`ConfigError` naming the file.
    """
    return [loaded.source for loaded in _load_all(tls)]


def _load_all(tls: TLSSettings) -> list[_Loaded]:
    if tls.acme_sh_home is not None and not tls.acme_sh_home.is_dir():
        # It is never defaulted, so a missing one is a typo worth reporting.
        raise ConfigError("tls.acme_sh_home is not a directory", tls.acme_sh_home)
    loaded = []
    for name, cert_path, key_path in _candidates(tls):
        has_cert, has_key = cert_path.is_file(), key_path.is_file()
        if not (has_cert and has_key):
            # Half a pair is a mistake worth a line (`mailrelay check` calls it an error);
            # neither file is just another directory (acme.sh's ca/, dnsapi/...).
            log.log(logging.WARNING if has_cert or has_key else logging.DEBUG,
                    "skipping %s: needs both %s and %s", name, cert_path, key_path.name)
            continue
        loaded.append(_load_pair(name, cert_path, key_path))
    return loaded


def inspect_certificates(tls: TLSSettings) -> tuple[list[CertificateSource], list[ConfigError]]:
    """For ``mailrelay check``: every certificate :func:`find_certificates` would load, and
    every problem at once instead of the first: a broken pair, and a half pair (a
    certificate without its key, or a key without its certificate), which the server skips.
    A directory with neither file (acme.sh's ``ca/``, ``deploy/``...) is no certificate."""
    if tls.acme_sh_home is not None and not tls.acme_sh_home.is_dir():
        return [], [ConfigError("tls.acme_sh_home is not a directory", tls.acme_sh_home)]
    try:
        candidates = _candidates(tls)
    except ConfigError as exc:
        return [], [exc]
    found: list[CertificateSource] = []
    problems: list[ConfigError] = []
    for name, cert_path, key_path in candidates:
        has_cert, has_key = cert_path.is_file(), key_path.is_file()
        if has_cert != has_key:
            present, absent = (cert_path, key_path) if has_cert else (key_path, cert_path)
            problems.append(ConfigError(f"{absent.name} is missing beside it, so this "
                                        "certificate is not loaded", present))
        elif has_cert:
            try:
                found.append(_load_pair(name, cert_path, key_path).source)
            except ConfigError as exc:
                problems.append(exc)
    return found, problems


@dataclass(frozen=True)
class _Loaded:
    """A parsed certificate plus its ready-to-use server context."""

    source: CertificateSource
    context: ssl.SSLContext
    fingerprint: str  # sha256 of the leaf certificate, hex


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path) from None


def _parse(name: str, cert_path: Path, key_path: Path,
           cert_pem: bytes, key_pem: bytes) -> tuple[CertificateSource, str]:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}", cert_path) from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: encrypted
        raise ConfigError(f"not a usable PEM private key: {exc}", key_path) from None

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise KeyMismatchError(f"private key does not match certificate {cert_path}", key_path)

    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        raw_names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        raw_names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = tuple(dict.fromkeys(_normalize(n) for n in raw_names if n))
    source = CertificateSource(name, cert_path, key_path, names, leaf.not_valid_after_utc)
    fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    return source, fingerprint


def _new_server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE  # no client certificates
    return context


def _load_pair(name: str, cert_path: Path, key_path: Path) -> _Loaded:
    """Parse and load one pair, making sure the context holds exactly the bytes we checked."""
    for _ in range(_READ_ATTEMPTS):
        cert_pem, key_pem = _read(cert_path), _read(key_path)
        source, fingerprint = _parse(name, cert_path, key_path, cert_pem, key_pem)
        context = _new_server_context()
        try:
            # ssl can only load from files, so the files are read a second time here; the
            # password callback stops OpenSSL prompting on the tty if a key became encrypted.
            context.load_cert_chain(cert_path, key_path, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            if _read(cert_path) != cert_pem or _read(key_path) != key_pem:
                continue  # replaced under us; parse again
            raise ConfigError(f"OpenSSL cannot load certificate/key: {exc}", cert_path) from None
        if _read(cert_path) == cert_pem and _read(key_path) == key_pem:
            return _Loaded(source, context, fingerprint)
    raise ConfigError("certificate or key kept changing while being read", cert_path)


# --- self-signed fallback ------------------------------------------------------------------


def ensure_self_signed(hostname: str, directory: Path) -> CertificateSource:
    """A self-signed certificate for ``hostname`` in ``directory``, generated only if needed.

    An existing pair is reused while it parses, covers ``hostname`` and is unexpired;
    otherwise (it is our own file) it is replaced.
    """
    return _ensure_self_signed(hostname, directory).source


def _ensure_self_signed(hostname: str, directory: Path) -> _Loaded:
    hostname = _normalize(hostname)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    if cert_path.is_file() and key_path.is_file():
        try:
            loaded = _load_pair(hostname, cert_path, key_path)
        except ConfigError as exc:
            log.warning("regenerating self-signed certificate: %s", exc)
        else:
            if loaded.source.covers(hostname) and not loaded.source.expired:
                return loaded
            log.warning("regenerating self-signed certificate in %s for %s", directory, hostname)

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate small clock skew
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Key first: a crash in between leaves no cert, which makes us regenerate both.
        atomic_write(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ), mode=0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write self-signed certificate: {exc}", directory) from None
    log.warning("generated a self-signed certificate for %s in %s", hostname, directory)
    return _load_pair(hostname, cert_path, key_path)


# --- the store -----------------------------------------------------------------------------

_Snapshot = tuple[tuple[str, object], ...]


def _stat(path: Path) -> object:
    try:
        st = os.stat(path)  # follows certbot's live/ symlinks into archive/
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"error {exc.errno}"
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _snapshot(settings: TLSSettings, extra: Iterable[Path] = ()) -> _Snapshot:
    """Stats of every candidate file; the candidate list doubles as the directory listing."""
    try:
        pairs = _candidates(settings)
    except ConfigError as exc:
        return (("error", str(exc)),)
    paths = [p for _, cert, key in pairs for p in (cert, key)]
    paths.extend(extra)
    return tuple((str(p), _stat(p)) for p in paths)


def _match(exact: dict[str, _Loaded], wildcard: dict[str, _Loaded],
           server_name: str) -> _Loaded | None:
    server_name = _normalize(server_name)
    if server_name in exact:
        return exact[server_name]
    _, dot, parent = server_name.partition(".")
    return wildcard.get(f"*.{parent}") if dot else None


@dataclass(frozen=True)
class _State:
    """Everything a handshake needs; replaced as a whole so readers never see a mix."""

    entries: tuple[_Loaded, ...] = ()
    exact: Mapping[str, _Loaded] = field(default_factory=dict)
    wildcard: Mapping[str, _Loaded] = field(default_factory=dict)  # "*.example.com" -> entry
    default: _Loaded | None = None

    @classmethod
    def build(cls, entries: list[_Loaded], hostname: str) -> _State:
        exact: dict[str, _Loaded] = {}
        wildcard: dict[str, _Loaded] = {}
        for entry in entries:
            for name in entry.source.names:
                table = wildcard if name.startswith("*.") else exact
                current = table.get(name)
                # Two certs for one name (e.g. a renewal in a new dir): the newest wins.
                if current is None or entry.source.not_after > current.source.not_after:
                    table[name] = entry
        default = _match(exact, wildcard, hostname) or (entries[0] if entries else None)
        return cls(tuple(entries), exact, wildcard, default)

    def select(self, server_name: str | None) -> _Loaded | None:
        found = _match(self.exact, self.wildcard, server_name) if server_name else None
        return found or self.default


class CertificateStore:
    """The server's certificates; reloadable while listeners keep running."""

    def __init__(self, settings: TLSSettings, hostname: str, self_signed_dir: Path):
        self.settings = settings
        self.hostname = _normalize(hostname)
        self.self_signed_dir = Path(self_signed_dir)
        self._state = _State()
        # What the last load attempt saw on disk, and the self-signed files it used.
        self._snapshot: _Snapshot | None = None
        self._snapshot_extra: tuple[Path, ...] = ()
        self._context: ssl.SSLContext | None = None
        self._mismatch_retries = 0  # forced retries left after a KeyMismatchError

    @property
    def certificates(self) -> list[CertificateSource]:
        return [entry.source for entry in self._state.entries]

    def load(self) -> None:
        """(Re)read all certificates; raises :class:`ConfigError` if none is usable."""
        # Taken before reading so a change during the load is noticed next time; kept on
        # failure too, so a watcher retries once the files change again, not on every poll.
        self._snapshot, self._snapshot_extra = _snapshot(self.settings), ()
        state, extra = self._read_all()
        self._state = state
        if extra:
            self._snapshot += _snapshot(_NO_DIRS, extra)
            self._snapshot_extra = extra

    def _read_all(self) -> tuple[_State, tuple[Path, ...]]:
        settings = self.settings
        entries = _load_all(settings)
        extra: tuple[Path, ...] = ()
        if not any(e.source.covers(self.hostname) for e in entries):
            if settings.self_signed:
                loaded = _ensure_self_signed(self.hostname, self.self_signed_dir)
                entries.append(loaded)
                extra = (loaded.source.cert_path, loaded.source.key_path)
            elif entries:
                log.warning("no certificate covers the hostname %s; clients without a "
                            "matching name get %s", self.hostname, entries[0].source.cert_path)
        if not entries:
            where = [str(p) for p in (settings.certs_dir, settings.acme_sh_home) if p]
            raise ConfigError(
                "no TLS certificate found (looked in " + (", ".join(where) or "nowhere")
                + "); add one or set tls.self_signed: true",
                settings.certs_dir,
            )
        for entry in entries:
            if entry.source.expired:
                log.warning("certificate %s expired on %s; still serving it",
                            entry.source.cert_path, entry.source.not_after.isoformat())
        log.info("loaded %d TLS certificate(s): %s", len(entries),
                 ", ".join(f"{e.source.name} ({' '.join(e.source.names)})" for e in entries))
        return _State.build(entries, self.hostname), extra

    def reload(self) -> bool:
        """Like :meth:`load`, but on error keep serving the previous certificates."""
        try:
            self.load()
        except KeyMismatchError as exc:
            # Most likely a renewal caught between writing the chain and the key.
            self._mismatch_retries = (self._mismatch_retries - 1 if self._mismatch_retries
                                      else _MISMATCH_RETRIES)
            when = "at the next check" if self._mismatch_retries else "when the files change"
            log.error("TLS reload failed, keeping the previous certificates: %s (a renewal "
                      "half-written? retrying %s)", exc, when)
            return False
        except (MailrelayError, OSError) as exc:
            self._mismatch_retries = 0
            log.error("TLS reload failed, keeping the previous certificates: %s", exc)
            return False
        self._mismatch_retries = 0
        return True

    def server_context(self) -> ssl.SSLContext:
        """The one context for all listeners; SNI picks the current certificate per handshake."""
        if self._context is None:
            context = _new_server_context()
            context.sni_callback = self._sni_callback
            self._context = context
        return self._context

    def _sni_callback(self, ssl_object: ssl.SSLObject | ssl.SSLSocket,
                      server_name: str | None, _context: ssl.SSLContext) -> int | None:
        # OpenSSL calls this for every ClientHello, with server_name None when there is no SNI.
        try:
            entry = self._state.select(server_name)
            if entry is None:
                log.error("TLS handshake for %r but no certificate is loaded", server_name)
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            ssl_object.context = entry.context
        except Exception:  # an exception here would only surface as an unraisable warning
            log.exception("TLS certificate selection failed for %r", server_name)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    def _select(self, server_name: str | None) -> _Loaded:
        entry = self._state.select(server_name)
        if entry is None:
            raise MailrelayError("no TLS certificate loaded")
        return entry

    def fingerprint_for(self, server_name: str | None) -> str:
        """SHA-256 (hex) of the leaf certificate chosen for ``server_name``."""
        return self._select(server_name).fingerprint

    def changed_on_disk(self) -> bool:
        """Cheap stat-only check whether a reload could see something new."""
        if self._snapshot is None or self._mismatch_retries:
            return True
        current = _snapshot(self.settings)
        if self._snapshot_extra:
            current += _snapshot(_NO_DIRS, self._snapshot_extra)
        return current != self._snapshot


_NO_DIRS = TLSSettings()  # lets _snapshot stat only the extra paths
