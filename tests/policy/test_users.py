"""The users database: password hashing, the users file format and lookups."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailrelay.errors import ConfigError, MailrelayError
from mailrelay.policy import users as users_mod
from mailrelay.policy.users import (
    UserDB,
    Users,
    hash_password,
    parse_hash,
    verify_password,
)


@pytest.fixture
def fast_scrypt(monkeypatch):
    """Cheap parameters for new hashes: the format is the same, the tests stay fast."""
    monkeypatch.setattr(users_mod, "SCRYPT_LN", 4)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def make_hash(password: str, ln: int = 4, r: int = 8, p: int = 1, salt: bytes = b"s" * 16,
              dklen: int = 32) -> str:
    """An independent implementation of the stored format."""
    key = hashlib.scrypt(password.encode(), salt=salt, n=1 << ln, r=r, p=p, dklen=dklen)
    return f"$scrypt$ln={ln},r={r},p={p}${b64(salt)}${b64(key)}"


def test_hash_default_parameters_and_roundtrip():
    encoded = hash_password("correct horse")
    assert encoded.startswith("$scrypt$ln=14,r=8,p=1$")
    parsed = parse_hash(encoded)
    assert (len(parsed.salt), len(parsed.key)) == (16, 32)
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horsE", encoded)


def test_salt_is_random(fast_scrypt):
    assert hash_password("x") != hash_password("x")


def test_params_are_read_from_the_stored_string():
    encoded = make_hash("pw", ln=3, r=2, p=2, salt=b"0123456789", dklen=20)
    parsed = parse_hash(encoded)
    assert (parsed.ln, parsed.r, parsed.p, len(parsed.key)) == (3, 2, 2, 20)
    assert verify_password("pw", encoded)
    assert not verify_password("pW", encoded)


def test_unicode_passwords_are_nfc_normalised(fast_scrypt):
    encoded = hash_password("caf\u00e9")  # precomposed é
    assert verify_password("cafe\u0301", encoded)  # e + combining accent


def test_empty_password_rejected():
    with pytest.raises(MailrelayError, match="password must not be empty"):
        hash_password("")
    assert not verify_password("", make_hash(""))


@pytest.mark.parametrize("encoded", [
    "!", "", "plain", "$scrypt$ln=14,r=8,p=1$c2FsdA", "$bcrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$a2V5",
    "$scrypt$ln=0,r=8,p=1$c2FsdHNhbHQ$" + b64(b"k" * 32),
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$" + b64(b"k" * 32) + "=",
    "$scrypt$ln=4,r=8,p=1$c2E$" + b64(b"k" * 32),  # salt too short
    "$scrypt$ln=30,r=999,p=1$c2FsdHNhbHQ$" + b64(b"k" * 32),  # absurd memory
])
def test_verify_is_false_for_malformed_hashes(encoded):
    assert verify_password("anything", encoded) is False


def test_dummy_hash_is_valid_so_unknown_users_cost_the_same():
    parsed = parse_hash(users_mod._DUMMY_HASH)
    assert (parsed.ln, parsed.r, parsed.p) == (
        users_mod.SCRYPT_LN, users_mod.SCRYPT_R, users_mod.SCRYPT_P)


def test_file_round_trip_mode_and_no_temp_files(tmp_path, fast_scrypt):
    path = tmp_path / "users"
    db = UserDB.load(path, "Example.COM")
    assert db.domain == "example.com" and db.names() == []
    db.set_password("Alice", "secret one")
    db.add_receive_only("shop")
    db.save()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["users"]
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#")
    entries = [line.split() for line in lines if not line.startswith("#")]
    assert [e[0] for e in entries] == ["alice", "shop"]
    assert entries[1][1] == "!"

    again = UserDB.load(path, "example.com")
    assert again.names() == ["alice", "shop"]
    assert again.check_password("ALICE", "secret one")
    assert not again.check_password("alice", "secret two")
    assert again.can_login("alice") and not again.can_login("shop")


def test_save_keeps_the_header_comment_and_is_idempotent(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# my users\n# second line\n\nbob {make_hash('pw')}\n# note\n")
    path.chmod(0o644)
    db = UserDB.load(path, "example.com")
    db.save()
    text = path.read_text()
    assert text == f"# my users\n# second line\nbob {make_hash('pw')}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    UserDB.load(path, "example.com").save()
    assert path.read_text() == text


def test_missing_file_is_empty(tmp_path):
    db = UserDB.load(tmp_path / "nope", "example.com")
    assert db.names() == [] and "x" not in db


def test_remove(tmp_path):
    db = UserDB.load(tmp_path / "users", "example.com")
    db.add_receive_only("a")
    assert db.remove("A") is True
    assert db.remove("a") is False
    assert "a" not in db


@pytest.mark.parametrize("content, line, message", [
    ("alice\n", 1, "expected '<user> <password hash>'"),
    ("# c\n\nalice ! extra\n", 3, "expected"),
    ("alice $scrypt$ln=14$abc$def\n", 1, "password hash must look like"),
    ("alice $scrypt$ln=99,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5\n", 1, "bad scrypt parameters"),
    ("alice $scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$a2V5\n", 1, "key must be"),
    ("alice !\nAlice !\n", 2, "duplicate user 'alice'"),
    ("a@b !\n", 1, "must not contain '@'"),
    ("ok !\nbad\x01name !\n", 2, "control characters"),
])
def test_malformed_lines_report_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "users"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        UserDB.load(path, "example.com")
    assert info.value.path == path and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert "\n" not in str(info.value)


def test_invalid_utf8_reports_line(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"alice !\n\xff !\n")
    with pytest.raises(ConfigError) as info:
        UserDB.load(path, "example.com")
    assert info.value.line == 2


@pytest.mark.parametrize("name", ["", "a b", "a@b", "#x", "tab\there"])
def test_bad_user_names_rejected_by_api(tmp_path, name):
    db = UserDB.load(tmp_path / "users", "example.com")
    with pytest.raises(MailrelayError):
        db.add_receive_only(name)


def test_receive_only_cannot_log_in(tmp_path):
    db = UserDB.load(tmp_path / "users", "example.com")
    db.add_receive_only("shop")
    assert "shop" in db
    assert not db.can_login("shop")
    assert not db.check_password("shop", "!")


def test_unknown_user_spends_scrypt_time(tmp_path, monkeypatch):
    calls: list[str] = []
    real = users_mod.verify_password
    monkeypatch.setattr(users_mod, "verify_password",
                        lambda pw, enc: calls.append(enc) or real(pw, enc))
    db = UserDB.load(tmp_path / "users", "example.com")
    assert not db.check_password("ghost", "pw")
    assert calls == [users_mod._DUMMY_HASH]


def make_config(tmp_path: Path, *domains: str) -> SimpleNamespace:
    """Just what Users.load reads from a Config."""
    for domain in domains:
        (tmp_path / "domains" / domain).mkdir(parents=True)
    return SimpleNamespace(
        domains=domains, domain_dir=lambda d: tmp_path / "domains" / d)


def test_users_across_domains(tmp_path):
    config = make_config(tmp_path, "example.com", "example.org")
    (tmp_path / "domains/example.com/users").write_text(
        f"alice {make_hash('pw')}\nshop !\n")
    users = Users.load(config)

    assert users.exists("alice@example.com")
    assert users.exists("ALICE@Example.COM")
    assert users.exists("shop@example.com")
    assert not users.exists("alice@example.org")
    assert not users.exists("alice@elsewhere.test")
    assert not users.exists("not-an-address")
    assert users.domain("EXAMPLE.ORG").names() == []
    assert users.domain("elsewhere.test") is None

    assert users.authenticate("Alice@EXAMPLE.com", "pw") == "alice@example.com"
    assert users.authenticate("alice@example.com", "PW") is None
    assert users.authenticate("alice@example.org", "pw") is None


def test_authenticate_unknown_paths_fail_without_error(tmp_path):
    users = Users.load(make_config(tmp_path, "example.com"))
    assert users.authenticate("nobody", "pw") is None  # also spends the dummy scrypt
    assert users.authenticate("x@[127.0.0.1]", "pw") is None


def test_broken_users_file_fails_load(tmp_path):
    config = make_config(tmp_path, "example.com")
    (tmp_path / "domains/example.com/users").write_text("broken\n")
    with pytest.raises(ConfigError, match=r"users:1: "):
        Users.load(config)


def test_password_hashed_as_typed_in_decomposed_form_still_matches():
    """chasquid hashed the bytes as typed; we hash NFC. Both forms must log in."""
    import base64
    import hashlib

    decomposed = "cafe\u0301"  # "café" with a combining accent
    salt = b"0123456789abcdef"
    key = hashlib.scrypt(decomposed.encode(), salt=salt, n=2**4, r=8, p=1, dklen=32)
    encoded = ("$scrypt$ln=4,r=8,p=1$" + base64.b64encode(salt).decode().rstrip("=") + "$"
               + base64.b64encode(key).decode().rstrip("="))
    assert verify_password(decomposed, encoded)
    assert not verify_password("cafe", encoded)
