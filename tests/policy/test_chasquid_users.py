"""chasquid's users file (protobuf text format): the parser, and UserDB reading it in place.

The fixtures in tests/fixtures/chasquid/ were written by Debian's chasquid-util (see the
README there); tests that run chasquid-util themselves skip when it is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.errors import ConfigError
from mailrelay.policy import chasquid_users as cu
from mailrelay.policy.users import UserDB, parse_hash
from mailrelay.policy.users import login_entries as users_login_entries

FIXTURES = Path(__file__).parents[1] / "fixtures" / "chasquid"
EXAMPLE_COM = FIXTURES / "domains" / "example.com" / "users"
EXAMPLE_ORG = FIXTURES / "domains" / "example.org" / "users"
# The passwords the fixtures were made with (tests/fixtures/chasquid/README.md).
PASSWORDS = {
    "me@example.com": "correct horse battery staple",
    "alice@example.com": 'pä"ss\\wörd €',
    "bob@example.org": "bob-password",
}

needs_chasquid_util = pytest.mark.skipif(shutil.which("chasquid-util") is None,
                                         reason="chasquid-util not installed (apt-get install "
                                                "chasquid)")


# --- reference encoders: how Go writes bytes fields -------------------------------------------


def _utf8_length(data: bytes, i: int) -> int:
    """Length of the valid UTF-8 sequence at ``i``, 0 if invalid (Go's RuneError, 1)."""
    lead = data[i]
    n = 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF \
        else 4 if 0xF0 <= lead <= 0xF4 else 0
    if n == 0:
        return 0
    try:
        data[i:i + n].decode("utf-8")  # strict, like Go: no surrogates, no overlongs
    except UnicodeDecodeError:
        return 0
    return n


def go_prototext_quote(data: bytes) -> bytes:
    """Go's prototext (google.golang.org/protobuf, what chasquid writes today): valid UTF-8
    as it is, C1 controls as \\u00XX, other bytes as \\n \\r \\t \\" \\\\ or \\xHH."""
    out = bytearray(b'"')
    i = 0
    while i < len(data):
        n = _utf8_length(data, i)
        code = data[i] if n <= 1 else ord(data[i:i + n].decode("utf-8"))
        if n == 0 or code < 0x20 or code in (0x22, 0x5C, 0x7F):
            named = {0x22: b'\\"', 0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}
            out += named.get(data[i], f"\\x{data[i]:02x}".encode())
            i += 1
        elif 0x80 <= code <= 0x9F:
            out += f"\\u{code:04x}".encode()
            i += n
        else:
            out += data[i:i + n]
            i += n
    return bytes(out + b'"')


def go_octal_quote(data: bytes) -> bytes:
    """golang/protobuf's old text marshaler (older chasquid): printable ASCII as it is,
    \\n \\r \\t \\" \\\\, every other byte as octal \\NNN."""
    out = bytearray(b'"')
    named = {0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t", 0x22: b'\\"', 0x5C: b"\\\\"}
    for byte in data:
        if byte in named:
            out += named[byte]
        elif 0x20 <= byte < 0x7F:
            out.append(byte)
        else:
            out += f"\\{byte:03o}".encode()
    return bytes(out + b'"')


def users_file(users: list[cu.ChasquidUser], quote=go_prototext_quote, old: bool = False) -> bytes:
    """A users file as chasquid writes it (``old``: golang/protobuf's ``<`` ``>`` style)."""
    start, end = (b"<", b">") if old else (b"{", b"}")
    out = b""
    for user in users:
        out += (b"users: %s\n  key: %s\n  value: %s\n    scrypt: %s\n"
                b"      logN: %d\n      r: %d\n      p: %d\n      keyLen: %d\n"
                b"      salt: %s\n      encrypted: %s\n    %s\n  %s\n%s\n") % (
            start, quote(user.name.encode()), start, start, user.log_n, user.r, user.p,
            user.key_len, quote(user.salt), quote(user.key), end, end, end)
    return out


# --- the fixtures -----------------------------------------------------------------------------


def test_fixture_written_by_chasquid_util_parses():
    users = cu.parse_users(EXAMPLE_COM.read_bytes(), EXAMPLE_COM)
    assert [u.name for u in users] == ["alice", "me"]
    for user in users:
        assert user.scheme == cu.SCRYPT
        assert (user.log_n, user.r, user.p, user.key_len) == (14, 8, 1, 32)
        assert len(user.salt) == 16 and len(user.key) == 32
        parsed = parse_hash(user.phc())  # our own parser takes the PHC string as it is
        assert parsed.salt == user.salt and parsed.key == user.key


def test_denied_and_plain_entries():
    users = {u.name: u for u in cu.parse_users(EXAMPLE_ORG.read_bytes(), EXAMPLE_ORG)}
    assert users["bob"].scheme == cu.SCRYPT
    assert users["shop"].scheme == cu.DENIED
    assert users["legacy"].scheme == cu.PLAIN
    with pytest.raises(ValueError):
        users["legacy"].phc()


def test_userdb_reads_chasquid_file_in_place():
    db = UserDB.load(EXAMPLE_COM, "example.com")
    assert db.names() == ["alice", "me"]
    assert db.check_password("me", PASSWORDS["me@example.com"])
    assert db.check_password("alice", PASSWORDS["alice@example.com"])
    assert not db.check_password("alice", "pa\"ss\\word €")
    assert not db.check_password("me", "")

    org = UserDB.load(EXAMPLE_ORG, "example.org")
    assert org.names() == ["bob", "legacy", "shop"]
    assert org.check_password("bob", PASSWORDS["bob@example.org"])
    # denied: receive-only; plain: never a login here (it would need the clear text kept).
    assert not org.can_login("shop") and "shop" in org
    assert not org.can_login("legacy")
    assert not org.check_password("legacy", "legacy-password")


def test_save_on_a_chasquid_file_writes_our_format(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(EXAMPLE_COM.read_bytes())
    db = UserDB.load(path, "example.com")
    db.remove("alice")
    db.save()
    text = path.read_text()
    assert not cu.is_chasquid_users(path.read_bytes())
    assert "\nme $scrypt$ln=14,r=8,p=1$" in text
    again = UserDB.load(path, "example.com")
    assert again.names() == ["me"]
    assert again.check_password("me", PASSWORDS["me@example.com"])


def test_older_octal_format_reads_the_same(tmp_path):
    """Older chasquid wrote ``users: <`` ... ``>`` with octal escapes; same hashes."""
    users = cu.parse_users(EXAMPLE_COM.read_bytes())
    old = users_file(users, quote=go_octal_quote, old=True)
    assert b"users: <" in old and b"\\" in old
    assert [replace(u, line=0) for u in cu.parse_users(old)] == [
        replace(u, line=0) for u in users]
    path = tmp_path / "users"
    path.write_bytes(old)
    db = UserDB.load(path, "example.com")
    assert db.check_password("alice", PASSWORDS["alice@example.com"])


@needs_chasquid_util
def test_passwords_set_by_chasquid_util_log_in(tmp_path):
    passwords = {"plain": "hunter2", "spaces": "  two  spaces ", "quotes": "'\"\\",
                 "unicode": "пароль-ñ-😀", "long": "x" * 200}
    (tmp_path / "chasquid.conf").write_text('hostname: "mail.example.net"\n')
    for name, password in passwords.items():
        subprocess.run(["chasquid-util", f"-C={tmp_path}", "user-add", f"{name}@example.net",
                        f"--password={password}"], check=True, capture_output=True, timeout=60)
    path = tmp_path / "domains" / "example.net" / "users"
    assert cu.is_chasquid_users(path.read_bytes())
    db = UserDB.load(path, "example.net")
    assert db.names() == sorted(passwords)
    for name, password in passwords.items():
        assert db.check_password(name, password), name
        assert not db.check_password(name, password + "x"), name


# --- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (b'users: {\n  key: "me"\n}\n', True),
    (b"# a comment\n\nusers {\n}\n", True),
    (b"  users <\n>\n", True),
    (b"users:{}", True),
    (b"", False),
    (b"# only a comment\n", False),
    (b"me $scrypt$ln=14,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5\n", False),
    (b"users !\n", False),  # our format, with a user called "users"
    (b"# users: {\nme !\n", False),
])
def test_is_chasquid_users(text, expected):
    assert cu.is_chasquid_users(text) is expected


# --- the text format ------------------------------------------------------------------------


@pytest.mark.parametrize("escaped, raw", [
    (rb"\a\b\f\n\r\t\v\\\'\"\?", b"\a\b\f\n\r\t\v\\'\"?"),
    (rb"\0\00\000\1\12\123\377", b"\x00\x00\x00\x01\x0a\x53\xff"),
    (rb"\1234", b"\x534"),  # octal takes at most three digits
    (rb"\x0\x41\xfg\X7e", b"\x00A\x0fg~"),
    (rb"\u00e9\u20ac\U0001F600", "é€😀".encode()),
    (rb"\ud83d\ude00", "😀".encode()),  # a UTF-16 surrogate pair is one character
    ("ä€".encode(), "ä€".encode()),  # raw UTF-8 stays as it is
])
def test_unescape(escaped, raw):
    assert cu.unescape(escaped) == raw


@pytest.mark.parametrize("escaped", [rb"\400", rb"\x", rb"\q", rb"\u12", rb"\ud800", rb"\udc00",
                                     rb"\U00110000", b"\\"])
def test_unescape_rejects(escaped):
    with pytest.raises(ValueError):
        cu.unescape(escaped)


@settings(max_examples=400)
@given(st.binary(max_size=80))
def test_unescape_round_trips_go_prototext(data):
    assert cu.unescape(go_prototext_quote(data)[1:-1]) == data


@settings(max_examples=400)
@given(st.binary(max_size=80))
def test_unescape_round_trips_go_octal(data):
    assert cu.unescape(go_octal_quote(data)[1:-1]) == data


@settings(max_examples=100)
@given(salt=st.binary(min_size=1, max_size=40), key=st.binary(min_size=1, max_size=64),
       name=st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1,
                    max_size=12),
       old=st.booleans())
def test_users_file_round_trips(salt, key, name, old):
    user = cu.ChasquidUser(name, cu.SCRYPT, 1, 14, 8, 1, len(key), salt, key)
    quote = go_octal_quote if old else go_prototext_quote
    (parsed,) = cu.parse_users(users_file([user], quote=quote, old=old))
    assert parsed == user


def test_text_format_syntax():
    message = cu.parse_text(
        b"# comment\n"
        b"a: \"one\" 'two'  # adjacent strings are one\n"
        b"b: -0x1F, c: 017; d: true\n"
        b"e { f: 1 } g: < h: [1, 2] >\n"
        b"list: [{ x: 1 }, { x: 2 }]\n"
    )
    names = message.names()
    assert names == ["a", "b", "c", "d", "e", "g", "list", "list"]
    fields = {f.name: f for f in message.fields}
    assert cu.as_bytes(fields["a"], None) == b"onetwo"
    assert cu.as_int(fields["b"], None) == -31
    assert cu.as_int(fields["c"], None) == 15
    assert cu.as_bool(fields["d"], None) is True
    assert fields["e"].line == 4
    inner = fields["g"].value
    assert isinstance(inner, cu.Message)
    assert [cu.as_int(f, None) for f in inner.fields] == [1, 2]


@pytest.mark.parametrize("text, line, words", [
    (b'users: {\n  key: "me\n}\n', 2, "not closed"),
    (b'users: {\n  key: "me"\n  value: { scrypt: { salt: "\\q" } }\n}\n', 3, "unknown escape"),
    (b'users: {\n  key: "me"\n', 1, "missing '}'"),
    (b'users: {\n  key: "me"\n  color: "red"\n}\n', 3, "unknown field color"),
    (b'groups: {\n}\n', 1, "unknown field groups"),
    (b'users: {\n  key "me"\n}\n', 2, "expected ':'"),
    (b'users: {\n  key: "me"\n  value: { scrypt: { logN: "14" } }\n}\n', 3, "whole number"),
    (b'users: {\n  value: { denied: {} }\n}\n', 1, "without a key"),
    (b'users: {\n  key: "me"\n  value: { denied: {} plain: {} }\n}\n', 3, "more than one"),
    (b'users: {\n  key: "me"\n  key: "you"\n}\n', 3, "given twice"),
    (b'users: {\n  key: "me" value: {\n  scrypt: { r: 8 r: 8 } } }\n', 3, "given twice"),
    (b'users: {\n  key: "\\xff"\n}\n', 2, "not valid UTF-8"),
    (b'users: {\n  key: "me" @\n}\n', 2, "unexpected character"),
])
def test_errors_name_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "users"
    with pytest.raises(ConfigError) as info:
        cu.parse_users(text, path)
    assert info.value.path == path
    assert info.value.line == line, str(info.value)
    assert words in str(info.value)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_userdb_load_reports_unusable_hash_with_line(tmp_path):
    user = cu.ChasquidUser("me", cu.SCRYPT, 1, 14, 8, 1, 32, b"s" * 16, b"k" * 31)
    path = tmp_path / "users"
    path.write_bytes(b"# chasquid users\n" + users_file([user]))
    with pytest.raises(ConfigError) as info:
        UserDB.load(path, "example.com")
    assert str(info.value).startswith(f"{path}:2: user me: keyLen 32 but the key has 31")


def test_userdb_load_reports_syntax_errors(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b'users: {\n  key: "me"\n  value: {\n')
    with pytest.raises(ConfigError) as info:
        UserDB.load(path, "example.com")
    assert f"{path}:3:" in str(info.value)


def test_later_entry_wins_like_chasquid():
    first = cu.ChasquidUser("me", cu.SCRYPT, 1, 14, 8, 1, 16, b"a" * 16, b"b" * 16)
    data = users_file([first]) + b'users: { key: "me" value: { denied: {} } }\n'
    assert users_login_entries(data) == {"me": "!"}
