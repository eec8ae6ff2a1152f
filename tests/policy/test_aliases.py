"""Aliases: chasquid's file syntax and resolution semantics (plus our catch-all fix)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import AddressError
from mailrelay.config import AliasSettings, load_config
from mailrelay.errors import ConfigError
from mailrelay.policy.aliases import EMAIL, MAILBOX, PIPE, Aliases, Target, default_text, parse_text

COM = """\
# aliases for example.com
info: me, friend@gmail.test

sales: In.Fo
shadowed: me
ticket: | /usr/bin/ticket --queue support
a: b
b: c
c: me
dead: nobody, ghost@example.net
mixed: nobody, me
loop1: loop2
loop2: loop1
keep: keep, copy@remote.test
dup: first@remote.test
dup: second@remote.test
xorg: other@example.org
twice: me, me, info, Me+x
"""
ORG = "*: me@example.com\n"
NET = "*: nobody\n"

USERS = {"me@example.com", "élodie@example.com", "mename@example.com",
         "john.smith@example.com", "shadowed@example.com", "keep@example.com",
         "other@example.org"}
LOCAL = {"example.com", "example.org", "example.net"}


def is_user(address: str) -> bool:
    return address in USERS


def is_local(domain: str) -> bool:
    return domain in LOCAL


DEFAULTS = AliasSettings()


def make(com: str = COM, org: str = ORG, net: str = NET,
         alias_settings: AliasSettings = DEFAULTS) -> Aliases:
    return Aliases({
        "example.com": Aliases.parse(com, "example.com", settings=alias_settings),
        "example.org": Aliases.parse(org, "example.org", settings=alias_settings),
        "example.net": Aliases.parse(net, "example.net", settings=alias_settings),
    }, alias_settings)


def mbox(address: str) -> Target:
    return Target(MAILBOX, address)


def email(address: str) -> Target:
    return Target(EMAIL, address)


ME = mbox("me@example.com")
INFO = [ME, email("friend@gmail.test")]

CASES = [
    # users, and the normalisations that find them
    ("me@example.com", [ME]),
    ("Me@Example.COM", [ME]),
    ("m.e@example.com", [ME]),  # drop characters
    ("me+tag@example.com", [ME]),  # suffix
    ("me+a+b@example.com", [ME]),
    ("me.name@example.com", [mbox("mename@example.com")]),
    ("Me.Name+x@example.com", [mbox("mename@example.com")]),
    ("ÉLODIE@example.com", [mbox("élodie@example.com")]),
    ("E\u0301lodie+tag@example.com", [mbox("élodie@example.com")]),  # decomposed É
    ("john.smith@example.com", [mbox("john.smith@example.com")]),  # a user with a dot
    ("unknown@example.com", []),
    # aliases
    ("info@example.com", INFO),  # multiple targets, a target without domain
    ("in.fo+x@example.com", INFO),
    ("INFO@example.com", INFO),
    ("sales@example.com", INFO),  # an alias to an alias
    ("shadowed@example.com", [ME]),  # the alias wins over the user of the same name
    ("ticket@example.com", [Target(PIPE, "/usr/bin/ticket --queue support")]),
    ("a@example.com", [ME]),  # a -> b -> c -> me
    ("dead@example.com", []),  # only unknown local targets
    ("mixed@example.com", [ME]),  # unknown targets are dropped, the rest delivers
    ("loop1@example.com", []),  # a loop ends
    ("keep@example.com", [mbox("keep@example.com"), email("copy@remote.test")]),
    ("dup@example.com", [email("second@remote.test")]),  # the last line wins
    ("xorg@example.com", [mbox("other@example.org")]),  # across local domains
    ("twice@example.com", INFO),  # deduplicated, in order
    # catch-all
    ("anything@example.org", [ME]),
    ("other@example.org", [mbox("other@example.org")]),
    ("other+tag@example.org", [mbox("other@example.org")]),  # real user beats catch-all
    ("ot.her@example.org", [mbox("other@example.org")]),
    ("someone@example.net", []),  # catch-all to an unknown local does not loop
    # remote addresses are left alone
    ("friend@gmail.test", [email("friend@gmail.test")]),
    ("Friend+X@Gmail.test", [email("Friend+X@Gmail.test")]),
]


@pytest.mark.parametrize(("address", "expected"), CASES)
def test_resolve(address: str, expected: list[Target]) -> None:
    aliases = make()
    assert aliases.resolve(address, is_user, is_local) == expected
    assert aliases.exists(address, is_user, is_local) == bool(expected)


def test_alias_to_unknown_locals_is_refused() -> None:
    aliases = make()
    assert not aliases.exists("dead@example.com", is_user, is_local)
    assert not aliases.exists("nobody@example.com", is_user, is_local)
    assert not aliases.exists("not an address", is_user, is_local)
    with pytest.raises(AddressError):
        aliases.resolve("no-at-sign", is_user, is_local)


def chain(length: int) -> str:
    """l0: l1, l1: l2, ... l<length-1>: me: ``length`` alias hops to the user."""
    return "".join(f"l{i}: l{i + 1}\n" for i in range(length - 1)) + f"l{length - 1}: me\n"


def test_recursion_limit() -> None:
    warnings: list[str] = []
    assert make(chain(10)).resolve("l0@example.com", is_user, is_local, warnings.append) == [ME]
    assert not warnings
    assert make(chain(11)).resolve("l0@example.com", is_user, is_local, warnings.append) == []
    assert any("more than 10 aliases deep" in w for w in warnings)
    # The limit is a setting.
    shallow = make(chain(3), alias_settings=AliasSettings(max_depth=2))
    assert shallow.resolve("l0@example.com", is_user, is_local, lambda w: None) == []
    assert shallow.resolve("l1@example.com", is_user, is_local, lambda w: None) == [ME]


def test_loop_is_reported() -> None:
    warnings: list[str] = []
    assert make().resolve("loop1@example.com", is_user, is_local, warnings.append) == []
    assert any("loop" in w for w in warnings)


def test_other_settings() -> None:
    custom = AliasSettings(drop_characters="", suffix_separators="-+")
    aliases = make("j.doe: me\n", alias_settings=custom)
    assert aliases.resolve("j.doe-news@example.com", is_user, is_local) == [ME]
    assert aliases.resolve("jdoe@example.com", is_user, is_local) == []
    assert aliases.resolve("me-x@example.com", is_user, is_local) == [ME]


def test_owners_ignore_the_catch_all() -> None:
    aliases = make()
    assert aliases.owners("info@example.com", is_user, is_local) == ["me@example.com"]
    assert aliases.owners("anything@example.org", is_user, is_local) == []


def test_parse_keys_and_targets() -> None:
    table = Aliases.parse(COM + ORG.replace("me@example.com", "x, y@Example.ORG"),
                          "Example.com")
    assert table["info"] == [email("me@example.com"), email("friend@gmail.test")]
    assert table["sales"] == [email("In.Fo@example.com")]
    assert table["ticket"] == [Target(PIPE, "/usr/bin/ticket --queue support")]
    assert table["*"] == [email("x@example.com"), email("y@example.org")]
    assert "me.name" not in Aliases.parse("Me.Name+x: me\n", "example.com")
    assert Aliases.parse("Me.Name+x: me\n", "example.com") == {"mename": [email("me@example.com")]}
    # CRLF, surrounding spaces, trailing comma, a pipe without spaces
    text = "  a :  b ,c,\r\n\r\n#x\r\np:|cmd  arg\r\n"
    assert Aliases.parse(text, "example.com") == {
        "a": [email("b@example.com"), email("c@example.com")],
        "p": [Target(PIPE, "cmd  arg")],
    }
    # the header of a new file parses as nothing
    assert Aliases.parse(default_text("example.com"), "example.com") == {}


BAD_LINES = [
    ("no separator here", "expected 'name: target"),
    ("user = target", "use ':'"),
    (": target", "nothing before ':'"),
    ("me@example.com: x", "without '@'"),
    ("me:", "no targets"),
    ("me: , ,", "no targets"),
    ("me: a b", "whitespace"),
    ("me: x # note", "comments must be on their own line"),
    ("me: a@b@c", "not an address"),
    ("me: <a@b.test>", "not an address"),
    ("me: a:b", "not an address"),
    ("me: a, | cmd", "a pipe must be the only target"),
    ("me: |  ", "without a command"),
    ("a b: c", "not a valid name"),
    (".+x: c", "name is empty"),
    ("me: a@bad..domain", "bad..domain"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_parse_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "aliases"
    with pytest.raises(ConfigError) as caught:
        Aliases.parse(f"# ok\ninfo: me\n{line}\nlast: me\n", "example.com", path)
    assert caught.value.line == 3
    assert str(caught.value).startswith(f"{path}:3: ")
    assert message in caught.value.message


def test_parse_text_reports_every_error_and_keeps_good_lines() -> None:
    table, errors = parse_text(b"a: b\nbroken\nc: \xff\nd:\n", "example.com")
    assert table == {"a": [email("b@example.com")]}
    assert [e.line for e in errors] == [2, 3, 4]
    assert "UTF-8" in errors[1].message


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\ndata_dir: var\naliases:\n  max_depth: 3\n")
    for domain in ("example.com", "example.org", "example.net"):
        (tmp_path / "domains" / domain).mkdir(parents=True)
    return tmp_path


def test_load_from_config(confdir: Path) -> None:
    (confdir / "domains/example.com/aliases").write_text("info: me\n")
    (confdir / "domains/example.org/aliases").write_text("ok: me\nbroken line\n")
    config = load_config(confdir)
    aliases, errors = Aliases.load(config)
    assert [str(e) for e in errors] == [
        f"{confdir}/domains/example.org/aliases:2: expected 'name: target, ...'"]
    assert aliases.settings.max_depth == 3
    assert aliases.resolve("info@example.com", is_user, config.is_local_domain) == [ME]
    # The broken domain has no aliases (nothing earlier to keep) ...
    assert aliases.resolve("ok@example.org", is_user, config.is_local_domain) == []
    # ... or keeps the previous good ones on reload.
    good = Aliases({"example.org": {"ok": [email("me@example.com")]}})
    reloaded, errors = Aliases.load(config, previous=good)
    assert len(errors) == 1
    assert reloaded.resolve("ok@example.org", is_user, config.is_local_domain) == [ME]
    assert reloaded.resolve("info@example.com", is_user, config.is_local_domain) == [ME]


# Property tests: any text parses or fails with ConfigError, and resolution ends.

NAMES = ["a", "b", "c", "me", "x.y", "A+t", "*"]
TARGETS = ["a", "b", "c", "me", "nobody", "b@example.org", "*", "x.y+z",
           "far@remote.test", "a@example.org"]


@st.composite
def alias_files(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.sampled_from(NAMES))
        if draw(st.integers(0, 9)) == 0:
            lines.append(f"{name}: | cmd")
        else:
            targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4))
            lines.append(f"{name}: {', '.join(targets)}")
    return "\n".join(lines)


@given(st.text())
@settings(max_examples=300)
def test_parse_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        Aliases.parse(text, "example.com")
    except ConfigError as exc:
        assert exc.line is not None and exc.line >= 1


@given(st.binary())
@settings(max_examples=100)
def test_parse_arbitrary_bytes_raises_only_config_error(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        Aliases.parse(data, "example.com")


@given(alias_files(), alias_files(), st.sampled_from([*NAMES[:-1], "zz", "me+q"]),
       st.sampled_from(["example.com", "example.org"]))
@settings(max_examples=300, deadline=None)
def test_resolve_terminates(com: str, org: str, local: str, domain: str) -> None:
    aliases = Aliases({"example.com": Aliases.parse(com, "example.com"),
                       "example.org": Aliases.parse(org, "example.org")})
    targets = aliases.resolve(f"{local}@{domain}", is_user, is_local, lambda w: None)
    assert len(targets) == len(set(targets))
    for target in targets:
        assert target.kind in (EMAIL, MAILBOX, PIPE)
        if target.kind == MAILBOX:
            assert is_user(target.value)
        if target.kind == EMAIL:
            assert not is_local(target.value.rpartition("@")[2])


def test_wide_fan_out_is_bounded() -> None:
    # Ten levels of ten-way fan-out would be 10^10 paths; the visit budget stops it.
    lines = [f"l{i}x{j}: " + ", ".join(f"l{i + 1}x{k}" for k in range(10))
             for i in range(10) for j in range(10)]
    lines += [f"l10x{j}: me" for j in range(10)]
    warnings: list[str] = []
    started = time.monotonic()
    targets = make("\n".join(lines)).resolve("l0x0@example.com", is_user, is_local,
                                             warnings.append)
    assert time.monotonic() - started < 10
    assert targets in ([], [ME])
    assert any("the rest is ignored" in w for w in warnings)
