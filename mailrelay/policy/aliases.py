"""Aliases: chasquid's ``domains/<domain>/aliases`` files, parsed and resolved.

File format, one alias a line::

    # comments are whole lines
    info: me, friend@gmail.test
    tickets: | /usr/local/bin/ticket --queue support
    *: me

Names on the left lose drop characters ('.'), the suffix ('+tag') and case; a target
without ``@`` is in the file's domain; ``*`` is the catch-all of the domain; a pipe
(everything after ``|``) must be the only target.

A later line for the same name replaces an earlier one (chasquid's behaviour). As in
chasquid (internal/aliases/aliases.go), a malformed line makes the whole file an error
(chasquid then refuses to start); here every malformed line is reported with its file
and line. Comments are whole lines: chasquid takes a ``#`` after a target as part of
the address, so such a line is refused rather than read differently from chasquid.

Resolution of a local address (normalised: drop characters removed, suffix cut,
NFC+casefold): an exact alias, else a user, else the domain's catch-all, else nothing.
chasquid sends ``realuser+tag@`` to the catch-all when there is one; here the real
user wins, because the suffix is cut before users are looked up.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..address import AddressError, normalize_domain, normalize_local, split, strip_suffix
from ..config import AliasSettings
from ..errors import ConfigError
from ..queue import EMAIL, MAILBOX, PIPE

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("mailrelay.aliases")

ALIASES_FILE = "aliases"
CATCH_ALL = "*"

# What a target is (the queue's recipient kinds): EMAIL an address, remote or local but
# final (never re-resolved); PIPE a command line, the message on its stdin; MAILBOX a
# local user.

# One resolution may visit at most this many addresses: fan-out across ten levels
# could otherwise take exponential time on every RCPT.
MAX_VISITS = 10_000

DEFAULT_SETTINGS = AliasSettings()

# Characters that cannot appear in an unquoted address (RFC 5321 specials) or that
# point at a typo (a second ':', a '|' inside a list).
_BAD_ADDRESS_CHARS = re.compile(r'[\s<>()\[\]",;:\\|\x00-\x1f\x7f]')
_BAD_NAME_CHARS = re.compile(r"[\s@,\x00-\x1f\x7f]")

HEADER = """\
# Aliases for {domain}, one a line (chasquid syntax):
#
#   name: target, target2     a target without @ is name@{domain}
#   name: | command args      pipe the message to a command
#   *: target                 catch-all: every other address of {domain}
#
# Names ignore '.', anything from '+' on, and case: "Me.Name+tag" is "mename".
# Comments are whole lines starting with '#'. A later line for a name wins.
"""


@dataclass(frozen=True)
class Target:
    kind: str  # EMAIL | PIPE | MAILBOX
    value: str  # the address, or the command line of a pipe


@dataclass
class _Resolution:
    """Bookkeeping of one resolve() call."""

    warn: Callable[[str], None]
    results: list[Target] = field(default_factory=list)
    visits: int = 0


def normalize_name(local: str, settings: AliasSettings = DEFAULT_SETTINGS) -> str:
    """The lookup form of a local part: case-folded, suffix cut, drop characters removed."""
    local = strip_suffix(normalize_local(local), settings.suffix_separators)
    return "".join(ch for ch in local if ch not in settings.drop_characters)


def _parse_address(text: str, domain: str) -> str:
    """``text`` as an address (``domain`` added when it has none); ValueError if it isn't."""
    if text.startswith("|"):
        raise ValueError("a pipe must be the only target (name: | command)")
    if "#" in text and _BAD_ADDRESS_CHARS.search(text):
        raise ValueError(f"{text!r} is not an address (comments must be on their own line)")
    if re.search(r"\s", text):
        raise ValueError(f"whitespace inside the address {text!r}")
    if _BAD_ADDRESS_CHARS.search(text):
        raise ValueError(f"{text!r} is not an address")
    if "@" not in text:
        return f"{text}@{domain}"
    local, _, target_domain = text.rpartition("@")
    if not local or "@" in local or not target_domain:
        raise ValueError(f"{text!r} is not an address")
    try:
        # Remote local parts keep their case: only the receiving host may fold them.
        return f"{local}@{normalize_domain(target_domain)}"
    except AddressError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def _parse_line(line: str, domain: str,
                settings: AliasSettings) -> tuple[str, list[Target]]:
    """One non-comment line -> (normalised name or '*', targets); ValueError if malformed."""
    name, colon, rest = line.partition(":")
    if not colon:
        hint = " (use ':', not '=')" if "=" in line else ""
        raise ValueError(f"expected 'name: target, ...'{hint}")
    name, rest = name.strip(), rest.strip()
    if not name:
        raise ValueError("nothing before ':' (expected a name or '*')")
    if "@" in name:
        raise ValueError(f"{name!r}: the left side is a name without '@' "
                         "(each domain has its own aliases file)")
    if _BAD_NAME_CHARS.search(name):
        raise ValueError(f"{name!r} is not a valid name")
    if name != CATCH_ALL:
        name = normalize_name(name, settings)
        if not name:
            raise ValueError("the name is empty once '.' and '+suffix' are removed")
    if not rest:
        raise ValueError(f"{name}: no targets after ':'")
    if rest.startswith("|"):
        command = rest[1:].strip()
        if not command:
            raise ValueError(f"{name}: '|' without a command")
        return name, [Target(PIPE, command)]
    targets = [Target(EMAIL, _parse_address(piece.strip(), domain))
               for piece in rest.split(",") if piece.strip()]
    if not targets:
        raise ValueError(f"{name}: no targets after ':'")
    return name, targets


def parse_text(
    text: str | bytes, domain: str, path: Path | None = None,
    settings: AliasSettings = DEFAULT_SETTINGS, lines: dict[str, int] | None = None,
) -> tuple[dict[str, list[Target]], list[ConfigError]]:
    """Every alias of a file and every error in it (the table holds the good lines).

    Keys are normalised names, ``'*'`` for the catch-all; targets are EMAIL (with a
    domain) or PIPE. ``lines``, when given, gets the line number of each name's entry.
    """
    domain = normalize_domain(domain)
    table: dict[str, list[Target]] = {}
    errors: list[ConfigError] = []
    raw_lines = text.split(b"\n") if isinstance(text, bytes) else text.split("\n")
    for number, raw in enumerate(raw_lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                errors.append(ConfigError("not valid UTF-8", path, number))
                continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name, targets = _parse_line(line, domain, settings)
        except ValueError as exc:
            errors.append(ConfigError(str(exc), path, number))
            continue
        table[name] = targets  # the last line for a name wins, as in chasquid
        if lines is not None:
            lines[name] = number
    return table, errors


def _dedup(targets: Iterable[Target]) -> list[Target]:
    return list(dict.fromkeys(targets))


class Aliases:
    """The aliases of every local domain."""

    def __init__(self, tables: dict[str, dict[str, list[Target]]] | None = None,
                 settings: AliasSettings = DEFAULT_SETTINGS,
                 digests: dict[str, str | None] | None = None):
        self.tables = {normalize_domain(d): t for d, t in (tables or {}).items()}
        self.settings = settings
        # SHA-256 of each domain's file as loaded (None: no file): which version of it is
        # in use, for `mailrelay aliases` to ask the running server.
        self.digests = dict(digests or {})

    @classmethod
    def load(cls, config: Config,
             previous: Aliases | None = None) -> tuple[Aliases, list[ConfigError]]:
        """Read every local domain's file (a missing file is no aliases).

        A broken file is reported and its domain keeps ``previous``'s aliases (or none):
        the other domains load regardless.
        """
        tables: dict[str, dict[str, list[Target]]] = {}
        digests: dict[str, str | None] = {}
        errors: list[ConfigError] = []
        for domain in config.domains:
            path = aliases_path(config, domain)
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                tables[domain], digests[domain] = {}, None
                continue
            except OSError as exc:
                file_errors = [ConfigError(f"cannot read: {exc.strerror or exc}", path)]
            else:
                table, file_errors = parse_text(raw, domain, path, config.aliases)
                if not file_errors:
                    tables[domain] = table
                    digests[domain] = hashlib.sha256(raw).hexdigest()
                    continue
            errors.extend(file_errors)
            tables[domain] = previous.tables.get(domain, {}) if previous else {}
            digests[domain] = previous.digests.get(domain) if previous else None
        return cls(tables, config.aliases, digests), errors

    @classmethod
    def parse(cls, text: str | bytes, domain: str, path: Path | None = None,
              settings: AliasSettings = DEFAULT_SETTINGS) -> dict[str, list[Target]]:
        """One file's aliases; raises the first ConfigError (file:line: what is wrong)."""
        table, errors = parse_text(text, domain, path, settings)
        if errors:
            raise errors[0]
        return table

    def count(self, domain: str) -> int:
        """Aliases of ``domain``, not counting the catch-all."""
        return sum(1 for name in self.tables.get(domain, {}) if name != CATCH_ALL)

    def catch_all(self, domain: str) -> list[Target]:
        return list(self.tables.get(domain, {}).get(CATCH_ALL, []))

    def resolve(
        self, address: str, is_user: Callable[[str], bool],
        is_local_domain: Callable[[str], bool],
        warn: Callable[[str], None] | None = None, use_catch_all: bool = True,
    ) -> list[Target]:
        """The final targets of ``address``, deduplicated in order; [] if unknown.

        Remote addresses come back unchanged as one EMAIL target. Raises AddressError
        for something that is not an address. ``warn`` hears about loops and chains
        longer than max_depth (default: the log).
        """
        local, domain = split(address)
        domain = normalize_domain(domain)
        if not is_local_domain(domain):
            return [Target(EMAIL, address)]
        state = _Resolution(warn or log.warning)
        self._resolve(local, domain, 0, frozenset(), state, is_user, is_local_domain,
                      use_catch_all)
        return _dedup(state.results)

    def exists(self, address: str, is_user: Callable[[str], bool],
               is_local_domain: Callable[[str], bool]) -> bool:
        """Whether RCPT TO ``address`` should be accepted: it resolves to something
        deliverable (an alias whose targets are all unknown local addresses does not)."""
        try:
            return bool(self.resolve(address, is_user, is_local_domain,
                                     warn=lambda message: None))
        except AddressError:
            return False

    def owners(self, address: str, is_user: Callable[[str], bool],
               is_local_domain: Callable[[str], bool]) -> list[str]:
        """The users ``address`` delivers to through its own aliases, for sender rights
        (SenderPolicy's ``owners``); a catch-all makes nobody an owner of everything."""
        try:
            targets = self.resolve(address, is_user, is_local_domain,
                                   warn=lambda message: None, use_catch_all=False)
        except AddressError:
            return []
        return [t.value for t in targets if t.kind == MAILBOX]

    def _user(self, local: str, name: str, domain: str,
              is_user: Callable[[str], bool]) -> str | None:
        """The user ``local@domain`` is: written as is (a user may be called
        ``john.smith``), without its suffix, or in lookup form; None if none."""
        folded = normalize_local(local)
        candidates = (folded, strip_suffix(folded, self.settings.suffix_separators), name)
        for candidate in dict.fromkeys(candidates):
            if candidate and is_user(f"{candidate}@{domain}"):
                return f"{candidate}@{domain}"
        return None

    def _resolve(
        self, local: str, domain: str, depth: int, path: frozenset[str],
        state: _Resolution, is_user: Callable[[str], bool],
        is_local_domain: Callable[[str], bool], use_catch_all: bool,
    ) -> None:
        """Append the final targets of local@domain to ``state.results``.

        ``path`` holds the aliases being expanded above this call (``name@domain``, or
        ``*@domain`` for a catch-all): meeting one again is a loop, and a catch-all
        never expands its own targets through itself.
        """
        state.visits += 1
        if state.visits > MAX_VISITS:
            if state.visits == MAX_VISITS + 1:
                state.warn(f"aliases: resolving touched over {MAX_VISITS} addresses; "
                           "the rest is ignored")
            return
        table = self.tables.get(domain, {})
        name = normalize_name(local, self.settings)
        key = f"{name}@{domain}"
        targets = table.get(name) if name != CATCH_ALL else None
        if targets is not None and key in path:
            # "me: me, me@gmail.test" keeps a copy for the user me; other loops end here.
            user = self._user(local, name, domain, is_user)
            if user is not None:
                state.results.append(Target(MAILBOX, user))
            else:
                state.warn(f"aliases: loop through {key}, ignored")
            return
        if targets is None:
            user = self._user(local, name, domain, is_user)
            if user is not None:
                state.results.append(Target(MAILBOX, user))
                return
            key = f"{CATCH_ALL}@{domain}"
            targets = table.get(CATCH_ALL) if use_catch_all else None
            if targets is None or key in path:
                return  # unknown: nothing delivers here
        if depth >= self.settings.max_depth:
            state.warn(f"aliases: {local}@{domain} is more than "
                       f"{self.settings.max_depth} aliases deep, ignored")
            return
        path = path | {key}
        for target in targets:
            if target.kind != EMAIL:
                state.results.append(target)
                continue
            target_local, target_domain = split(target.value)
            target_domain = normalize_domain(target_domain)
            if not is_local_domain(target_domain):
                state.results.append(target)
                continue
            self._resolve(target_local, target_domain, depth + 1, path, state,
                          is_user, is_local_domain, use_catch_all)


def aliases_path(config: Config, domain: str) -> Path:
    return config.domain_dir(domain) / ALIASES_FILE


def default_text(domain: str) -> str:
    """What a new aliases file starts as: a header explaining the syntax."""
    return HEADER.format(domain=domain)
