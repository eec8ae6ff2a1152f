"""MTA-STS (RFC 8461): discover, fetch, cache and refresh the TLS policies of recipient
domains, so delivery can insist on verified TLS to the MX hosts a domain lists."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from ..address import AddressError, normalize_domain
from ..fsutil import atomic_write

log = logging.getLogger("mailrelay.mta-sts")

MODES = ("enforce", "testing", "none")
MAX_MAX_AGE = 31557600  # RFC 8461 section 3.2: about one year
WELL_KNOWN = "/.well-known/mta-sts.txt"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # RFC 8461 section 3.1
_TXT_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)")
_POLICY_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})+")
_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: .*)?")
_MAX_HEADER_BYTES = 32 * 1024
_MAX_HEADER_LINES = 100


class PolicyError(Exception):
    """No usable policy: a bad record or policy, or a failed fetch."""


@dataclass(frozen=True)
class Policy:
    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]  # patterns, lowercased, without a trailing dot
    max_age: int
    id: str  # the TXT record's id= value the policy was fetched under
    fetched: float  # time.time() when fetched

    def matches(self, mx_host: str) -> bool:
        """Whether ``mx_host`` is allowed; "*.example.net" covers exactly one more label
        on the left (RFC 8461 section 4.1)."""
        host = mx_host.strip().rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                suffix = pattern[1:]
                label = host[: -len(suffix)]
                if host.endswith(suffix) and label and "." not in label:
                    return True
            elif host == pattern:
                return True
        return False

    def expires(self) -> float:
        return self.fetched + self.max_age

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires()


def parse_txt(strings: Iterable[str]) -> str | None:
    """The policy id from the TXT record strings of _mta-sts.<domain>; None if there is no
    single valid record (RFC 8461 section 3.1: then the domain has no policy)."""
    records = [s for s in strings if s.startswith("v=STSv1;")]
    if len(records) != 1:
        return None
    policy_id = None
    for part in records[0][len("v=STSv1;"):].split(";"):
        part = part.strip(" \t")
        if not part:
            continue  # a trailing ";" is allowed
        match = _TXT_FIELD.fullmatch(part)
        if match is None:
            return None
        if match[1] == "id" and policy_id is None:
            if not _ID.fullmatch(match[2]):
                return None
            policy_id = match[2]
    return policy_id


def parse_policy(text: str, policy_id: str, fetched: float) -> Policy:
    """The policy file (RFC 8461 section 3.2); raises PolicyError when it is invalid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r").rstrip(" \t")
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not _POLICY_KEY.fullmatch(key):
            raise PolicyError(f"policy line {number} is not 'key: value'")
        value = value.strip(" \t")
        if key == "mx":
            pattern = value.lower().removesuffix(".")
            if not _MX_PATTERN.fullmatch(pattern):
                raise PolicyError(f"invalid mx pattern {value!r}")
            if pattern not in mx:
                mx.append(pattern)
        else:
            fields.setdefault(key, value)  # the first occurrence counts; unknown keys ignored
    if fields.get("version") != "STSv1":
        raise PolicyError(f"unsupported policy version {fields.get('version')!r}")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"invalid policy mode {mode!r}")
    max_age = fields.get("max_age")
    if max_age is None or not re.fullmatch(r"[0-9]{1,10}", max_age):
        raise PolicyError(f"missing or invalid max_age {max_age!r}")
    if int(max_age) > MAX_MAX_AGE:
        raise PolicyError(f"max_age {max_age} is above {MAX_MAX_AGE}")
    if not mx and mode != "none":
        raise PolicyError(f"no mx in a policy of mode {mode}")
    return Policy(mode, tuple(mx), int(max_age), policy_id, fetched)


def _policy_from_json(data: object) -> Policy:
    if not isinstance(data, dict):
        raise ValueError("not an object")
    policy = Policy(mode=data["mode"], mx=tuple(data["mx"]), max_age=int(data["max_age"]),
                    id=data["id"], fetched=float(data["fetched"]))
    if (policy.mode not in MODES or not all(isinstance(p, str) for p in policy.mx)
            or not isinstance(policy.id, str)):
        raise ValueError("invalid fields")
    return policy


class MTASTS:
    """Policies of recipient domains, cached in memory and as JSON files in ``cache_dir``."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        cache_dir: Path,
        ssl_context: ssl.SSLContext,
        port: int = 443,
        fetch_timeout: float = 10.0,
        max_policy_size: int = 64 * 1024,
    ):
        self.resolver = resolver
        self.cache_dir = Path(cache_dir)
        self.ssl_context = ssl_context
        self.port = port
        self.fetch_timeout = fetch_timeout
        self.max_policy_size = max_policy_size
        # How often the background task looks at cached policies, and after how long a
        # policy is fetched again even if its id did not change (RFC 8461 section 5.1
        # suggests daily). Attributes rather than parameters: tests shorten them.
        self.refresh_interval = 3600.0
        self.refresh_after = 86400.0
        # After a failed fetch, the same domain and id are not fetched again this soon:
        # every delivery attempt would otherwise wait for a broken policy host.
        self.retry_after = 300.0
        self._cache: dict[str, Policy] = {}
        self._failures: dict[str, tuple[str, float]] = {}
        self._inflight: dict[str, asyncio.Task[Policy | None]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- the interface --------------------------------------------------------------

    async def policy_for(self, domain: str) -> Policy | None:
        """The policy to apply to mail for ``domain``; None when it has none (or "none")."""
        try:
            domain = normalize_domain(domain)
        except AddressError:
            return None
        if not _DOMAIN.fullmatch(domain):
            return None
        policy = await self._shared(domain, refresh=False)
        if policy is None or policy.mode == "none":
            return None
        return policy

    def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="mta-sts-refresh")

    async def stop(self) -> None:
        tasks = [t for t in (self._refresher, *self._inflight.values()) if t is not None]
        self._refresher = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # -- discovery ------------------------------------------------------------------

    async def _shared(self, domain: str, refresh: bool) -> Policy | None:
        # Concurrent deliveries to one domain wait for one lookup; shielded so that a
        # cancelled delivery does not cancel the fetch the others are waiting for.
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.create_task(self._discover(domain, refresh),
                                       name=f"mta-sts-{domain}")
            self._inflight[domain] = task

            def forget(done: asyncio.Task[Policy | None]) -> None:
                if self._inflight.get(domain) is done:
                    del self._inflight[domain]

            task.add_done_callback(forget)
        return await asyncio.shield(task)

    async def _discover(self, domain: str, refresh: bool) -> Policy | None:
        cached = None
        try:
            cached = await self._cached(domain)
            return await self._discover_with(domain, cached, refresh)
        except Exception:
            # A bug here must not stop delivery: behave like any failed discovery.
            log.exception("mta-sts: %s: policy discovery failed", domain)
            return cached

    async def _discover_with(self, domain: str, cached: Policy | None,
                             refresh: bool) -> Policy | None:
        due = refresh and cached is not None and self._refresh_due(cached)
        try:
            record_id = await self._record_id(domain)
        except PolicyError as exc:
            log.warning("mta-sts: %s: %s%s", domain, exc,
                        "; using the cached policy" if cached else "")
            record_id = None
        if record_id is None:
            if not due:
                # No live policy, but a cached one applies until it expires (RFC 8461
                # section 5.1): an attacker removing the TXT record must not disable it.
                return cached
            assert cached is not None
            record_id = cached.id
        elif cached is not None and cached.id == record_id and not due:
            return cached

        failure = self._failures.get(domain)
        if failure and failure[0] == record_id and time.monotonic() - failure[1] < self.retry_after:
            return cached
        try:
            async with asyncio.timeout(self.fetch_timeout):
                policy = await self._fetch(domain, record_id)
        except (PolicyError, TimeoutError) as exc:
            self._failures[domain] = (record_id, time.monotonic())
            reason = str(exc) or f"timed out after {self.fetch_timeout:g}s"
            if cached is not None:
                log.warning("mta-sts: %s: fetching the policy failed (%s); using the cached "
                            "policy (mode %s, id %s)", domain, reason, cached.mode, cached.id)
            else:
                log.warning("mta-sts: %s: fetching the policy failed (%s); no policy applies",
                            domain, reason)
            return cached
        self._failures.pop(domain, None)
        if cached is None or (cached.id, cached.mode, cached.mx) != (policy.id, policy.mode,
                                                                     policy.mx):
            log.info("mta-sts: %s: policy id %s, mode %s, mx %s, max_age %d", domain,
                     policy.id, policy.mode, ", ".join(policy.mx) or "-", policy.max_age)
        await self._store(domain, policy)
        return policy

    def _refresh_due(self, policy: Policy) -> bool:
        # A "none" policy protects nothing: it is only refetched when its id changes.
        if policy.mode == "none":
            return False
        return time.time() - policy.fetched >= min(self.refresh_after, policy.max_age / 2)

    async def _record_id(self, domain: str) -> str | None:
        """The id of the TXT record; None without one valid record; PolicyError if unsure."""
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.DNSException, OSError) as exc:
            raise PolicyError(f"TXT lookup of _mta-sts.{domain} failed: "
                              f"{exc.__class__.__name__}") from None
        strings = [b"".join(rdata.strings).decode("ascii", "replace") for rdata in answer]
        return parse_txt(strings)

    # -- fetching -------------------------------------------------------------------

    async def _addresses(self, host: str) -> list[str]:
        """A and AAAA of the policy host, through our resolver (never the system's)."""
        addresses: list[str] = []
        errors: list[str] = []
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self.resolver.resolve(host, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.exception.DNSException, OSError) as exc:
                errors.append(f"{rdtype} lookup failed: {exc.__class__.__name__}")
                continue
            addresses.extend(rdata.address for rdata in answer)
        if not addresses:
            raise PolicyError(f"{host} has no address" + (f" ({errors[0]})" if errors else ""))
        return addresses

    async def _fetch(self, domain: str, record_id: str) -> Policy:
        host = f"mta-sts.{domain}"
        last: BaseException | None = None
        for address in await self._addresses(host):
            try:
                # SNI and certificate checks against the policy host's name, not the IP.
                reader, writer = await asyncio.open_connection(
                    address, self.port, ssl=self.ssl_context, server_hostname=host)
            except OSError as exc:  # refused, unreachable, certificate not trusted...
                last = exc
                continue
            try:
                body = await self._get(reader, writer, host)
            finally:
                writer.close()
                with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise PolicyError("the policy is not UTF-8 text") from None
            return parse_policy(text, record_id, time.time())
        raise PolicyError(f"cannot connect to {host} port {self.port}: {last}")

    async def _get(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   host: str) -> bytes:
        """One HTTP/1.0 GET of the policy (no chunked encoding, the end is the close)."""
        host_header = host if self.port == 443 else f"{host}:{self.port}"
        writer.write(f"GET {WELL_KNOWN} HTTP/1.0\r\nHost: {host_header}\r\n"
                     f"User-Agent: mailrelay\r\nAccept: text/plain\r\n"
                     f"Connection: close\r\n\r\n".encode("ascii"))
        try:
            await writer.drain()
            status_line = await _read_line(reader)
            headers: dict[str, str] = {}
            size = len(status_line)
            for _ in range(_MAX_HEADER_LINES):
                line = await _read_line(reader)
                size += len(line)
                if size > _MAX_HEADER_BYTES:
                    raise PolicyError("HTTP response header too large")
                if not line:
                    break
                name, sep, value = line.partition(":")
                if not sep:
                    raise PolicyError("malformed HTTP header line")
                headers.setdefault(name.strip().lower(), value.strip())
            else:
                raise PolicyError("too many HTTP header lines")

            status = _STATUS_LINE.fullmatch(status_line)
            if status is None:
                raise PolicyError(f"not an HTTP response: {status_line[:60]!r}")
            code = int(status[1])
            if 300 <= code < 400:
                # RFC 8461 section 3.3: senders must not follow redirects.
                raise PolicyError(f"HTTP {code} redirect to {headers.get('location', '?')!r} "
                                  "(redirects are not followed)")
            if code != 200:
                raise PolicyError(f"HTTP status {code}")
            content_type = headers.get("content-type", "")
            if content_type.split(";")[0].strip().lower() != "text/plain":
                raise PolicyError(f"Content-Type {content_type!r} is not text/plain")
            if headers.get("transfer-encoding", "identity").lower() != "identity":
                raise PolicyError("unexpected Transfer-Encoding in an HTTP/1.0 response")

            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise PolicyError(f"invalid Content-Length {length!r}")
                if int(length) > self.max_policy_size:
                    raise PolicyError(f"policy larger than {self.max_policy_size} bytes")
                return await reader.readexactly(int(length))
            body = b""
            while chunk := await reader.read(self.max_policy_size + 1 - len(body)):
                body += chunk
                if len(body) > self.max_policy_size:
                    raise PolicyError(f"policy larger than {self.max_policy_size} bytes")
            return body
        except asyncio.IncompleteReadError:
            raise PolicyError("connection closed in the middle of the response") from None
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            raise PolicyError(f"HTTPS error: {exc}") from None

    # -- the cache ------------------------------------------------------------------

    def _path(self, domain: str) -> Path:
        return self.cache_dir / f"{domain}.json"

    async def _cached(self, domain: str) -> Policy | None:
        """The unexpired cached policy of ``domain`` (from memory, else from disk)."""
        policy = self._cache.get(domain)
        if policy is None:
            policy = await asyncio.to_thread(self._load, domain)
            if policy is not None:
                self._cache[domain] = policy
        if policy is not None and policy.expired():
            await self._forget(domain)
            return None
        return policy

    def _load(self, domain: str) -> Policy | None:
        path = self._path(domain)
        try:
            return _policy_from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("mta-sts: ignoring the unreadable cache file %s: %s", path, exc)
            return None

    async def _store(self, domain: str, policy: Policy) -> None:
        self._cache[domain] = policy
        data = json.dumps({"domain": domain, **asdict(policy)}, indent=1).encode()
        try:
            await asyncio.to_thread(atomic_write, self._path(domain), data)
        except OSError as exc:
            # The policy still applies from memory; it is just not kept over a restart.
            log.error("mta-sts: cannot write the policy cache of %s: %s", domain, exc)

    async def _forget(self, domain: str) -> None:
        self._cache.pop(domain, None)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._path(domain).unlink)

    def _cached_domains(self) -> set[str]:
        domains = set(self._cache)
        with contextlib.suppress(OSError):
            domains.update(p.name.removesuffix(".json") for p in self.cache_dir.glob("*.json")
                           if _DOMAIN.fullmatch(p.name.removesuffix(".json")))
        return domains

    async def _refresh_loop(self) -> None:
        # Refreshing ahead of expiry keeps a policy in force even when an attacker blocks
        # the TXT lookup or the fetch around the time it would expire (RFC 8461 sec. 10).
        while True:
            await asyncio.sleep(self.refresh_interval)
            for domain in sorted(await asyncio.to_thread(self._cached_domains)):
                try:
                    await self._shared(domain, refresh=True)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("mta-sts: refreshing the policy of %s", domain)


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise PolicyError("HTTP header line too long") from None
    return line.decode("latin-1").rstrip("\r\n")
