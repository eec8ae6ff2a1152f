"""Property tests: parsers of files and addresses fail only with their own clear errors."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.address import AddressError, normalize, normalize_domain, normalize_local
from mailrelay.errors import ConfigError
from mailrelay.policy.users import UserDB

LINE_PIECES = st.sampled_from([
    "me", "Me", "x.y", "#", " ", "\t", "!", "$scrypt$", "ln=14,r=8,p=1", "$", "ln=99",
    "AAAA", "====", "\x00", "é", "@", "users:", "{", "}", "\r", "\n",
])


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(LINE_PIECES, st.text(max_size=12)), max_size=40))
def test_users_file_parser_fails_only_with_config_errors(tmp_path, pieces):
    path = tmp_path / "users"
    path.write_bytes("".join(pieces).encode("utf-8", "surrogatepass"))
    try:
        db = UserDB.load(path, "example.com")
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
        return
    for name in db.names():
        assert name == normalize_local(name)
        assert "@" not in name and not any(c.isspace() for c in name)


ADDRESS_TEXT = st.text(alphabet=string.printable + "éß\u0130\u212a.@", max_size=40)


@settings(max_examples=500)
@given(ADDRESS_TEXT)
def test_address_normalisation_fails_only_with_address_errors(text):
    try:
        result = normalize(text)
    except AddressError:
        return
    local, _, domain = result.rpartition("@")
    assert local and domain
    assert domain == normalize_domain(domain), "normalising is idempotent"
    assert normalize(result) == result
