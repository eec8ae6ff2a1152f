"""The users database: one ``users`` file per domain holding scrypt password hashes.

File format (``domains/<domain>/users``), one user per line::

    # comment
    alice $scrypt$ln=14,r=8,p=1$<salt>$<key>
    shop !

``!`` marks a receive-only user (chasquid's "denied"): mail is accepted for it,
but it cannot log in. Salt and key are base64 without padding (PHC string format).

chasquid's own users file (protobuf text format, see :mod:`mailrelay.policy.chasquid_users`)
is also read, so passwords keep working on a directory taken over from chasquid. That
is read-only in spirit: ``save()`` on such a database writes this format, which chasquid
cannot read back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..address import AddressError, normalize_domain, normalize_local, split, strip_suffix
from ..errors import ConfigError, MailrelayError
from ..fsutil import atomic_write
from .chasquid_users import DENIED, PLAIN, SCRYPT, ChasquidUser, is_chasquid_users, parse_users

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("mailrelay.users")

USERS_FILE = "users"
RECEIVE_ONLY = "!"

# chasquid's parameters: N=2^14, r=8, p=1, 32-byte key, 16-byte salt.
SCRYPT_LN = 14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_LEN = 32
SALT_LEN = 16

# Refuse parameters that would need more memory than this (a typo like ln=40
# must not take the server down when it loads the file).
_MAX_SCRYPT_MEMORY = 1 << 30

_HASH_RE = re.compile(
    r"\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,3}),p=(?P<p>\d{1,3})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<key>[A-Za-z0-9+/]+)"
)

DEFAULT_HEADER = (
    "# mailrelay users: <local part> <password hash>, or <local part> ! for a\n"
    "# user that receives mail but cannot log in. Edit with `mailrelay user`.\n"
)

# Checked for unknown users so a failed login costs the same scrypt time
# whether or not the user exists (salt and key are arbitrary).
_DUMMY_HASH = (
    "$scrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA"
    "$ZHVtbXlkdW1teWR1bW15ZHVtbXlkdW1teWR1bW15ZHU"
)


@dataclass(frozen=True)
class ScryptHash:
    """A parsed ``$scrypt$`` string."""

    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @property
    def memory(self) -> int:
        # What OpenSSL allocates: 128*r*(N+2) for V plus 128*r*p for B.
        return 128 * self.r * ((1 << self.ln) + 2 + self.p)

    def derive(self, password: bytes) -> bytes:
        return hashlib.scrypt(
            password, salt=self.salt, n=1 << self.ln, r=self.r, p=self.p,
            maxmem=self.memory + (1 << 20), dklen=len(self.key),
        )


def _b64decode(text: str) -> bytes:
    if len(text) % 4 == 1:
        raise ValueError("bad base64 length")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def parse_hash(encoded: str) -> ScryptHash:
    """Parse and sanity-check a ``$scrypt$...`` string; ValueError says what is wrong."""
    match = _HASH_RE.fullmatch(encoded)
    if not match:
        raise ValueError("password hash must look like $scrypt$ln=14,r=8,p=1$<salt>$<key>")
    ln, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
    if not 1 <= ln <= 30 or r < 1 or p < 1:
        raise ValueError(f"bad scrypt parameters ln={ln},r={r},p={p}")
    try:
        salt, key = _b64decode(match["salt"]), _b64decode(match["key"])
    except (ValueError, binascii.Error):
        raise ValueError("salt and key must be base64 without padding") from None
    if len(salt) < 8:
        raise ValueError("salt is too short (at least 8 bytes)")
    if not 16 <= len(key) <= 64:
        raise ValueError("key must be 16 to 64 bytes long")
    parsed = ScryptHash(ln, r, p, salt, key)
    if parsed.memory > _MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt parameters ln={ln},r={r},p={p} need too much memory")
    return parsed


def _password_bytes(password: str) -> bytes:
    # NFC so the same password typed on different systems hashes the same.
    return unicodedata.normalize("NFC", password).encode("utf-8")


def hash_password(password: str) -> str:
    """A new ``$scrypt$`` string for ``password`` with a fresh random salt."""
    if not password:
        raise MailrelayError("password must not be empty")
    params = ScryptHash(SCRYPT_LN, SCRYPT_R, SCRYPT_P, os.urandom(SALT_LEN), b"\0" * KEY_LEN)
    key = params.derive(_password_bytes(password))
    return (f"$scrypt$ln={params.ln},r={params.r},p={params.p}"
            f"${_b64encode(params.salt)}${_b64encode(key)}")


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded``; False for ``!`` and malformed hashes."""
    try:
        parsed = parse_hash(encoded)
    except ValueError:
        return False
    # NFC first (how we hash); then the bytes as typed, which is how chasquid hashed the
    # passwords of imported users (only tried when the two differ).
    candidates = dict.fromkeys([_password_bytes(password), password.encode("utf-8", "replace")])
    matched = False
    for candidate in candidates:
        try:
            key = parsed.derive(candidate)
        except (ValueError, MemoryError):
            return False
        matched |= hmac.compare_digest(key, parsed.key)
    # Evaluated after the derivation so an empty password costs the same time.
    return matched and bool(password)


def check_localpart(localpart: str) -> str:
    """Validate and normalise a local part for the users file; ValueError if unusable."""
    if not localpart:
        raise ValueError("empty user name")
    if "@" in localpart:
        raise ValueError(f"user name {localpart!r} must not contain '@'")
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in localpart):
        raise ValueError(f"user name {localpart!r} must not contain spaces or control characters")
    if localpart.startswith("#"):
        # It would read back as a comment.
        raise ValueError(f"user name {localpart!r} must not start with '#'")
    return normalize_local(localpart)


class UserDB:
    """The users of one domain, as stored in its ``users`` file."""

    def __init__(self, path: Path, domain: str, entries: dict[str, str] | None = None,
                 header: str = DEFAULT_HEADER, digest: str = ""):
        self.path = Path(path)
        self.domain = normalize_domain(domain)
        self._entries: dict[str, str] = dict(entries or {})
        self._header = header
        # SHA-256 of the file as loaded ("" when there was none): which version of the
        # file this is, for `mailrelay user` to ask the running server.
        self.digest = digest

    @classmethod
    def load(cls, path: Path, domain: str) -> UserDB:
        """Read ``path``; a missing file is an empty database. Raises the first error."""
        db, errors = cls.load_all(path, domain)
        if errors:
            raise errors[0]
        return db

    @classmethod
    def load_all(cls, path: Path, domain: str) -> tuple[UserDB, list[ConfigError]]:
        """Like :meth:`load`, but every broken line is reported (``mailrelay check``);
        the database holds the good lines."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path, domain), []
        except OSError as exc:
            return cls(path, domain), [ConfigError(f"cannot read: {exc.strerror or exc}", path)]
        digest = file_digest(raw)
        if is_chasquid_users(raw):
            # chasquid's file, read in place; save() would write our format instead.
            try:
                return cls(path, domain, login_entries(raw, path), digest=digest), []
            except ConfigError as exc:
                return cls(path, domain), [exc]
        entries: dict[str, str] = {}
        errors: list[ConfigError] = []
        header_lines: list[str] = []
        in_header = True
        for number, raw_line in enumerate(raw.split(b"\n"), start=1):
            try:
                line = raw_line.decode("utf-8").strip()
            except UnicodeDecodeError:
                errors.append(ConfigError("not valid UTF-8", path, number))
                continue
            if line.startswith("#"):
                if in_header:  # the comment block at the top is kept on save
                    header_lines.append(line)
                continue
            in_header = False
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                errors.append(ConfigError("expected '<user> <password hash>' (or '<user> !')",
                                          path, number))
                continue
            name, encoded = fields
            try:
                local = check_localpart(name)
            except ValueError as exc:
                errors.append(ConfigError(str(exc), path, number))
                continue
            if encoded != RECEIVE_ONLY:
                try:
                    parse_hash(encoded)
                except ValueError as exc:
                    errors.append(ConfigError(f"user {name}: {exc}", path, number))
                    continue
            if local in entries:
                errors.append(ConfigError(f"duplicate user {local!r}", path, number))
                continue
            entries[local] = encoded
        header = "".join(f"{h}\n" for h in header_lines) if header_lines else DEFAULT_HEADER
        return cls(path, domain, entries, header, digest), errors

    def __contains__(self, localpart: object) -> bool:
        return isinstance(localpart, str) and normalize_local(localpart) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def can_login(self, localpart: str) -> bool:
        return self._entries.get(normalize_local(localpart), RECEIVE_ONLY) != RECEIVE_ONLY

    def check_password(self, localpart: str, password: str) -> bool:
        """Slow (scrypt): callers on an event loop run it in a thread."""
        encoded = self._entries.get(normalize_local(localpart), RECEIVE_ONLY)
        if encoded == RECEIVE_ONLY:
            # Same cost as a real check, so timing doesn't reveal who exists.
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, encoded)

    def set_password(self, localpart: str, password: str) -> None:
        """Add the user or change its password (a receive-only user becomes a login user)."""
        local = self._checked(localpart)
        self._entries[local] = hash_password(password)

    def add_receive_only(self, localpart: str) -> None:
        """Add the user as receive-only (replaces a password if it had one)."""
        self._entries[self._checked(localpart)] = RECEIVE_ONLY

    def remove(self, localpart: str) -> bool:
        return self._entries.pop(normalize_local(localpart), None) is not None

    def save(self) -> None:
        """Write the file atomically, readable by the owner only."""
        body = "".join(f"{name} {self._entries[name]}\n" for name in self.names())
        data = (self._header + body).encode("utf-8")
        atomic_write(self.path, data, mode=0o600)
        self.digest = file_digest(data)

    @staticmethod
    def _checked(localpart: str) -> str:
        try:
            return check_localpart(localpart)
        except ValueError as exc:
            raise MailrelayError(str(exc)) from None


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Users:
    """The users of every local domain of a configuration (one UserDB per domain)."""

    def __init__(self, dbs: dict[str, UserDB]):
        self._dbs = dbs

    @classmethod
    def load(cls, config: Config) -> Users:
        """Every domain's users; the first error of any file raises (ConfigError, with
        file and line): at start the server refuses to run without a domain's logins."""
        return cls({
            domain: UserDB.load(config.domain_dir(domain) / USERS_FILE, domain)
            for domain in config.domains
        })

    @classmethod
    def reload(cls, config: Config, previous: Users,
               only: str | None = None) -> tuple[Users, list[ConfigError]]:
        """Each domain's users loaded on its own (``only``: just that domain's, the
        others stay): a broken file keeps that domain's ``previous`` users, and is
        reported; the other domains take their files as they are now."""
        dbs: dict[str, UserDB] = {}
        errors: list[ConfigError] = []
        for domain in config.domains:
            old = previous.domain(domain)
            if only is not None and domain != only and old is not None:
                dbs[domain] = old
                continue
            db, file_errors = UserDB.load_all(config.domain_dir(domain) / USERS_FILE, domain)
            if file_errors:
                errors += file_errors
                db = old if old is not None else UserDB(db.path, domain)
            dbs[domain] = db
        return cls(dbs), errors

    def domain(self, domain: str) -> UserDB | None:
        try:
            return self._dbs.get(normalize_domain(domain))
        except AddressError:
            return None

    def _lookup(self, address: str) -> tuple[str, UserDB] | None:
        try:
            local, domain = split(address)
        except AddressError:
            return None
        db = self.domain(domain)
        return (normalize_local(local), db) if db is not None else None

    def exists(self, address: str) -> bool:
        """Whether ``local@domain`` is a user (receive-only users count)."""
        found = self._lookup(address)
        return found is not None and found[0] in found[1]

    def mailbox_for(self, address: str) -> str | None:
        """The user that receives mail for ``address``: the exact user, else the user
        before a ``+suffix`` (me+tag@example.com -> me@example.com); None if neither."""
        found = self._lookup(address)
        if found is None:
            return None
        local, db = found
        for candidate in (local, strip_suffix(local)):
            if candidate in db:
                return f"{candidate}@{db.domain}"
        return None

    def authenticate(self, username: str, password: str) -> str | None:
        """The normalised address if ``username`` (local@domain) has this password."""
        found = self._lookup(username)
        if found is None:
            verify_password(password, _DUMMY_HASH)  # keep the timing uniform
            return None
        local, db = found
        if not db.check_password(local, password):
            return None
        return f"{local}@{db.domain}"


# -- chasquid's users files ----------------------------------------------------------

def chasquid_entry(user: ChasquidUser) -> tuple[str, str | None]:
    """What a chasquid user becomes in our users file: its scrypt hash as it is (the same
    scrypt, so the password keeps working), or receive-only (``!``) with the reason it
    cannot log in here (None for chasquid's ``denied``, which could not either).
    ValueError for a scrypt hash that could not log in to chasquid either."""
    if user.scheme == SCRYPT:
        encoded = user.phc()
        parse_hash(encoded)
        return encoded, None
    if user.scheme == DENIED:
        return RECEIVE_ONLY, None
    if user.scheme == PLAIN:
        return RECEIVE_ONLY, "a plain-text password in chasquid"
    return RECEIVE_ONLY, (f"password scheme {user.scheme!r} in chasquid" if user.scheme
                          else "no password in chasquid")


def login_entries(data: bytes, path: Path | None = None) -> dict[str, str]:
    """A chasquid users file as :class:`UserDB` entries: local part -> ``$scrypt$...``, or
    ``!`` (receive-only) for users that cannot log in here. A later entry for a name wins,
    as in chasquid."""
    entries: dict[str, str] = {}
    for user in parse_users(data, path):
        try:
            local = check_localpart(user.name)
            entries[local], problem = chasquid_entry(user)
        except ValueError as exc:
            raise ConfigError(f"user {user.name}: {exc}", path, user.line) from None
        if problem:
            log.warning("%s:%d: user %s has %s: it cannot log in; set a new password with "
                        "`mailrelay user passwd`", path, user.line, user.name, problem)
    return entries
