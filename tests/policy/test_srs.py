"""Tests for mailrelay.policy.srs: the Shevek/libsrs2 Sender Rewriting Scheme."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.errors import ConfigError
from mailrelay.policy.srs import SRS, SRSError, _unquote, load_or_create_secrets

SECRET = b"s" * 32
OLD_SECRET = b"o" * 32
DAY = 86400
# An absolute day whose counter (mod 1024) is 1020, near the wrap to 0.
BASE_DAY = 20 * 1024 + 1020


class Clock:
    """Injectable time source, in days since the epoch."""

    def __init__(self, day: float = BASE_DAY) -> None:
        self.day = day

    def __call__(self) -> float:
        return self.day * DAY + 3600.5


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def srs(clock: Clock) -> SRS:
    return SRS([SECRET], now=clock)


def fields(address: str) -> list[str]:
    return address.rpartition("@")[0].split("=")


def test_round_trip(srs: SRS) -> None:
    rewritten = srs.forward("alice@sender.test", "example.com")
    tag, digest, stamp, host, local = fields(rewritten)
    assert (tag, host, local) == ("SRS0", "sender.test", "alice")
    assert rewritten.endswith("@example.com")
    assert len(digest) == 4 and len(stamp) == 2
    # Day 1020 = 31*32 + 28 -> "7" "4" in A-Z2-7.
    assert stamp == "74"
    assert srs.reverse(rewritten) == "alice@sender.test"
    assert SRS.is_srs(rewritten)


def test_known_vector(srs: SRS) -> None:
    # base64(HMAC-SHA1(secret, "74sender.testalice"))[:4], computed independently.
    expected = base64.b64encode(hmac.new(SECRET, b"74sender.testalice", hashlib.sha1).digest())
    rewritten = srs.forward("Alice@Sender.TEST", "example.com")
    assert fields(rewritten)[1] == expected[:4].decode()
    # The original case is kept; the hash ignores it.
    assert srs.reverse(rewritten) == "Alice@Sender.TEST"


def test_null_sender(srs: SRS) -> None:
    assert srs.forward("", "example.com") == ""


def test_local_sender_unchanged(srs: SRS) -> None:
    assert srs.forward("me@example.com", "example.com") == "me@example.com"
    assert srs.forward("me@EXAMPLE.com", "example.com.") == "me@EXAMPLE.com"
    # Even an SRS address of ours is not rewritten again.
    ours = srs.forward("alice@sender.test", "example.com")
    assert srs.forward(ours, "example.com") == ours


def test_separator(clock: Clock) -> None:
    plus = SRS([SECRET], separator="+", now=clock)
    rewritten = plus.forward("alice@sender.test", "example.com")
    assert rewritten.startswith("SRS0+")
    assert plus.reverse(rewritten) == "alice@sender.test"
    # Any separator is accepted on reversal (libsrs2 does the same).
    assert SRS([SECRET], now=clock).reverse(rewritten) == "alice@sender.test"
    with pytest.raises(ValueError):
        SRS([SECRET], separator="x")


def test_hash_case_insensitive(srs: SRS) -> None:
    rewritten = srs.forward("alice@sender.test", "example.com")
    assert srs.reverse(rewritten.lower()) == "alice@sender.test"
    assert srs.reverse(rewritten.upper()) == "ALICE@SENDER.TEST"


@pytest.mark.parametrize("index", [1, 3, 4])
def test_tampered(srs: SRS, index: int) -> None:
    rewritten = srs.forward("alice@sender.test", "example.com")
    parts = fields(rewritten)
    parts[index] = {1: "AAAA" if parts[1] != "AAAA" else "BBBB", 3: "evil.test", 4: "mallory"}[
        index
    ]
    with pytest.raises(SRSError, match="hash"):
        srs.reverse("=".join(parts) + "@example.com")


def test_tampered_timestamp(srs: SRS, clock: Clock) -> None:
    rewritten = srs.forward("alice@sender.test", "example.com")
    parts = fields(rewritten)
    parts[2] = "73"  # one day older: the hash covers the stamp
    with pytest.raises(SRSError, match="hash"):
        srs.reverse("=".join(parts) + "@example.com")


def test_wrong_secret(srs: SRS, clock: Clock) -> None:
    rewritten = SRS([b"x" * 32], now=clock).forward("alice@sender.test", "example.com")
    with pytest.raises(SRSError):
        srs.reverse(rewritten)


def test_expiry_and_wrap(srs: SRS, clock: Clock) -> None:
    rewritten = srs.forward("alice@sender.test", "example.com")  # day counter 1020
    clock.day = BASE_DAY + 4  # counter wrapped to 0
    assert srs.reverse(rewritten) == "alice@sender.test"
    clock.day = BASE_DAY + 21  # counter 17: the last valid day (libsrs2: age <= maxage)
    assert srs.reverse(rewritten) == "alice@sender.test"
    clock.day = BASE_DAY + 22
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(rewritten)
    clock.day = BASE_DAY + 1024  # same counter 1024 days later: indistinguishable, valid
    assert srs.reverse(rewritten) == "alice@sender.test"


def test_future_timestamp_rejected(srs: SRS, clock: Clock) -> None:
    clock.day = BASE_DAY + 1
    rewritten = srs.forward("alice@sender.test", "example.com")
    clock.day = BASE_DAY
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(rewritten)


def test_max_age_configurable(clock: Clock) -> None:
    short = SRS([SECRET], max_age_days=2, now=clock)
    rewritten = short.forward("alice@sender.test", "example.com")
    clock.day = BASE_DAY + 2
    assert short.reverse(rewritten) == "alice@sender.test"
    clock.day = BASE_DAY + 3
    with pytest.raises(SRSError):
        short.reverse(rewritten)


def test_srs1_chain(clock: Clock) -> None:
    first = SRS([b"first-hop-secret-0123456789"], now=clock)
    second = SRS([SECRET], now=clock)
    third = SRS([b"third-hop-secret-0123456789"], now=clock)

    srs0 = first.forward("alice@sender.test", "first.test")
    srs1 = second.forward(srs0, "example.com")
    opaque = srs0.rpartition("@")[0][4:]
    tag, digest, host, _rest = srs1.rpartition("@")[0].split("=", 3)
    assert (tag, host) == ("SRS1", "first.test")
    assert srs1 == f"SRS1={digest}=first.test={opaque}@example.com"
    assert "==" in srs1
    # A bounce to us goes back to the first hop, which reverses to alice.
    assert second.reverse(srs1) == srs0
    assert first.reverse(second.reverse(srs1)) == "alice@sender.test"

    # A third hop keeps the first hop and re-signs.
    srs1b = third.forward(srs1, "third.test")
    assert srs1b.startswith("SRS1=") and "=first.test=" in srs1b
    assert srs1b.endswith(f"={opaque}@third.test")
    assert third.reverse(srs1b) == srs0

    # SRS1 is not timestamped: still reversible long after.
    clock.day += 100
    assert second.reverse(srs1) == srs0
    # Tampering with the first hop is caught.
    with pytest.raises(SRSError):
        second.reverse(srs1.replace("first.test", "evil.test"))


def test_malformed_srs1_sender_is_wrapped(srs: SRS) -> None:
    rewritten = srs.forward("SRS1=abc@other.test", "example.com")
    assert rewritten.startswith("SRS0=")
    assert srs.reverse(rewritten) == "SRS1=abc@other.test"


def test_rotation(clock: Clock) -> None:
    old = SRS([OLD_SECRET], now=clock)
    made_old = old.forward("alice@sender.test", "example.com")
    rotated = SRS([SECRET, OLD_SECRET], now=clock)
    assert rotated.reverse(made_old) == "alice@sender.test"
    made_new = rotated.forward("alice@sender.test", "example.com")
    assert made_new == SRS([SECRET], now=clock).forward("alice@sender.test", "example.com")
    with pytest.raises(SRSError):
        old.reverse(made_new)
    with pytest.raises(ValueError):
        SRS([])


def test_quoted_local_part(srs: SRS) -> None:
    rewritten = srs.forward('"john doe"@sender.test', "example.com")
    assert rewritten.startswith('"SRS0=') and rewritten.endswith('=john doe"@example.com')
    assert SRS.is_srs(rewritten)
    assert srs.reverse(rewritten) == '"john doe"@sender.test'


@pytest.mark.parametrize(
    "address",
    [
        "SRS0=abc@example.com",
        "SRS0==@example.com",
        "SRS0====@example.com",
        "SRS0==AAAA=AA=host=user@example.com",
        "SRS0=AAAA==host=user@example.com",
        "SRS0=AAAA=AA==user@example.com",
        "SRS0=AAAA=AA=host=@example.com",
        "SRS0=AAAAA=AA=host=user@example.com",
        "SRS0=AAAA=A!=host=user@example.com",
        "SRS1=abc@example.com",
        "SRS1=AAAA=host=user@example.com",  # opaque part lacks its separator
        "SRS1==host==x@example.com",
        "SRS2=AAAA=AA=host=user@example.com",
        "SRS0xAAAA=AA=host=user@example.com",
        "alice@example.com",
        "SRS0=AAAA=AA=host=user",
        "",
        "@",
        '""@example.com',
    ],
)
def test_malformed(srs: SRS, address: str) -> None:
    with pytest.raises(SRSError):
        srs.reverse(address)


def test_forward_rejects_garbage(srs: SRS) -> None:
    for sender in ["alice", "@sender.test", "alice@", "alice@a=b.test"]:
        with pytest.raises(SRSError):
            srs.forward(sender, "example.com")


def test_is_srs() -> None:
    assert SRS.is_srs("SRS0=x@y")
    assert SRS.is_srs("srs1+x@y")
    assert not SRS.is_srs("alice@y")
    assert not SRS.is_srs("SRS0=x")
    assert not SRS.is_srs("SRS0@y")
    assert not SRS.is_srs("")


# -- secrets file -------------------------------------------------------------------


def test_secrets_created_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = load_or_create_secrets(data_dir)
    path = data_dir / "srs.secret"
    content = path.read_bytes()
    assert len(first) == 1 and len(first[0]) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secrets(data_dir) == first
    assert path.read_bytes() == content
    assert sorted(p.name for p in data_dir.iterdir()) == ["srs.secret"]


def test_secrets_rotation_file(tmp_path: Path, clock: Clock) -> None:
    old = load_or_create_secrets(tmp_path)
    made_old = SRS(old, now=clock).forward("alice@sender.test", "example.com")
    path = tmp_path / "srs.secret"
    new_hex = "ab" * 32
    path.write_text(f"# rotated\n{new_hex}\n\n" + path.read_text())
    secrets = load_or_create_secrets(tmp_path)
    assert secrets == [bytes.fromhex(new_hex), old[0]]
    rotated = SRS(secrets, now=clock)
    assert rotated.reverse(made_old) == "alice@sender.test"
    made_new = rotated.forward("alice@sender.test", "example.com")
    with pytest.raises(SRSError):
        SRS(old, now=clock).reverse(made_new)


@pytest.mark.parametrize("content", ["", "# only a comment\n", "not*base64\n", "YWJj\n"])
def test_secrets_bad_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "srs.secret").write_text(content)
    with pytest.raises(ConfigError, match=r"srs\.secret"):
        load_or_create_secrets(tmp_path)


# -- properties ----------------------------------------------------------------------

_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
_atom = st.text(st.sampled_from(_ATEXT) | st.characters(min_codepoint=0x80), min_size=1)
_local = (
    st.lists(_atom, min_size=1, max_size=4).map(".".join).filter(lambda s: not SRS.is_srs(s + "@x"))
)
_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(local=_local, domain=_domain, day=st.integers(0, 100_000), age=st.integers(0, 21))
def test_property_round_trip(local: str, domain: str, day: int, age: int) -> None:
    clock = Clock(day)
    srs = SRS([SECRET], now=clock)
    sender = f"{local}@{domain}"
    rewritten = srs.forward(sender, "example.com")
    assert rewritten.endswith("@example.com")
    clock.day = day + age
    assert srs.reverse(rewritten) == sender


@settings(max_examples=300, deadline=None)
@given(local=st.text(min_size=1), domain=_domain)
def test_property_round_trip_any_local(local: str, domain: str) -> None:
    # Arbitrary (quoted when needed) local parts survive too.
    srs = SRS([SECRET], now=Clock())
    if SRS.is_srs(f"{local}@x") or local.startswith('"'):
        return
    rewritten = srs.forward(f"{local}@{domain}", "example.com")
    local_back, _, domain_back = srs.reverse(rewritten).rpartition("@")
    assert domain_back == domain
    assert _unquote(local_back) == local


_srsish = st.one_of(
    st.text(),
    st.builds(
        lambda tag, sep, body, dom: f"{tag}{sep}{body}@{dom}",
        st.sampled_from(["SRS0", "SRS1", "srs0", "srs1", "SRS2"]),
        st.sampled_from(["=", "+", "-", "x", ""]),
        st.text(st.sampled_from('=AB54x.@"\\ \udc80é') | st.characters(), max_size=40),
        st.text(max_size=10),
    ),
)


@settings(max_examples=500, deadline=None)
@given(address=_srsish)
def test_property_reverse_only_raises_srserror(address: str) -> None:
    srs = SRS([SECRET], now=Clock())
    with contextlib.suppress(SRSError):
        srs.reverse(address)
    with contextlib.suppress(SRSError):
        srs.forward(address, "example.com")


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 60), char=st.characters())
def test_property_mutated_address(position: int, char: str) -> None:
    # One changed character: rejected with SRSError, or (case, a changed "@x" domain)
    # still the original sender.
    srs = SRS([SECRET], now=Clock())
    rewritten = srs.forward("alice@sender.test", "example.com")
    position %= len(rewritten)
    mutated = rewritten[:position] + char + rewritten[position + 1 :]
    try:
        result = srs.reverse(mutated)
    except SRSError:
        return
    assert result.lower() == "alice@sender.test" or mutated == rewritten


# -- interoperability with srslib (libsrs2-compatible) -------------------------------


def test_srslib_interop(clock: Clock) -> None:
    srslib = pytest.importorskip("srslib")
    ours = SRS([SECRET], now=clock)
    theirs = srslib.SRS(SECRET)
    theirs._time_fn = clock  # srslib's own hook for tests

    # Same address, byte for byte, both ways.
    for sender in ["alice@sender.test", "Bob.Smith+tag@Sub.Sender.TEST"]:
        made_by_them = theirs.forward(sender, "example.com")
        made_by_us = ours.forward(sender, "example.com")
        assert made_by_us == made_by_them
        assert ours.reverse(made_by_them) == sender
        assert theirs.reverse(made_by_us) == sender
        assert ours.reverse(made_by_them.lower()) == sender.lower()

    # SRS1, both ways.
    srs0 = SRS([b"first-hop-secret-0123456789"], now=clock).forward("a@s.test", "first.test")
    made_by_them = theirs.forward(srs0, "example.com")
    assert ours.forward(srs0, "example.com") == made_by_them
    assert ours.reverse(made_by_them) == theirs.reverse(made_by_them) == srs0
    srs1b = theirs.forward(made_by_them, "third.test")
    assert ours.forward(made_by_them, "third.test") == srs1b

    # Rotation: srslib's prev_secrets are our later secrets.
    old = srslib.SRS(OLD_SECRET)
    old._time_fn = clock
    assert (
        SRS([SECRET, OLD_SECRET], now=clock).reverse(
            old.forward("alice@sender.test", "example.com")
        )
        == "alice@sender.test"
    )
