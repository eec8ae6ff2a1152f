"""mailrelay.smtp.parse: command lines, MAIL/RCPT paths, ESMTP parameters and xtext."""

from __future__ import annotations

import pytest

from mailrelay.smtp.parse import (
    MAX_LOCAL_PART,
    MAX_PATH,
    Path,
    SyntaxErrorReply,
    decode_xtext,
    parse_params,
    parse_path,
    split_command,
)


def mail(arg: str, *, utf8: bool = False) -> Path:
    return parse_path(arg, "FROM:", utf8_allowed=utf8, null_allowed=True)


def rcpt(arg: str, *, utf8: bool = False) -> Path:
    return parse_path(arg, "TO:", utf8_allowed=utf8, null_allowed=False)


def refused(func, *args, **kwargs) -> str:
    """The reply of the SyntaxErrorReply that ``func`` raises."""
    with pytest.raises(SyntaxErrorReply) as info:
        func(*args, **kwargs)
    reply = info.value.reply
    assert str(info.value) == reply
    return reply


def codes(reply: str) -> tuple[str, str]:
    """(basic code, enhanced code) of a one-line reply such as ``501 5.1.3 ...``."""
    basic, enhanced = reply.split()[:2]
    return basic, enhanced


# --- split_command -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("MAIL FROM:<a@b.test>", ("MAIL", "FROM:<a@b.test>")),
        ("mail FROM:<a@b.test>", ("MAIL", "FROM:<a@b.test>")),
        ("eHlO client.test", ("EHLO", "client.test")),
        ("QUIT", ("QUIT", "")),
        ("noop", ("NOOP", "")),
        ("RCPT  TO:<a@b.test>  ", ("RCPT", "TO:<a@b.test>")),
        ("AUTH PLAIN dGVzdA==", ("AUTH", "PLAIN dGVzdA==")),
        ("", ("", "")),
    ],
)
def test_split_command(line, expected):
    assert split_command(line) == expected


def test_split_command_keeps_argument_case():
    assert split_command("helo MiXeD.Example") == ("HELO", "MiXeD.Example")


# --- paths -------------------------------------------------------------------------------


def test_angle_brackets():
    path = mail("FROM:<user@example.test>")
    assert path.address == "user@example.test"
    assert path.params == {}
    assert not path.is_null


def test_keyword_is_case_insensitive_and_space_after_colon_is_tolerated():
    assert mail("from:<user@example.test>").address == "user@example.test"
    assert mail("FROM: <user@example.test>").address == "user@example.test"
    assert rcpt("to:<user@example.test>").address == "user@example.test"


def test_wrong_keyword():
    reply = refused(mail, "TO:<user@example.test>")
    assert codes(reply) == ("501", "5.5.4")
    reply = refused(rcpt, "FROM:<user@example.test>")
    assert codes(reply) == ("501", "5.5.4")
    assert codes(refused(mail, "")) == ("501", "5.5.4")


def test_bare_address_without_brackets():
    path = mail("FROM:user@example.test")
    assert path.address == "user@example.test"
    assert path.params == {}


def test_bare_address_with_params():
    path = mail("FROM:user@example.test SIZE=100 BODY=8BITMIME")
    assert path.address == "user@example.test"
    assert path.params == {"SIZE": "100", "BODY": "8BITMIME"}


def test_null_path_allowed_on_mail():
    path = mail("FROM:<>")
    assert path.address == ""
    assert path.is_null
    path = mail("FROM:<> SIZE=10")
    assert path.is_null
    assert path.params == {"SIZE": "10"}


def test_null_path_refused_on_rcpt():
    reply = refused(rcpt, "TO:<>")
    assert codes(reply) == ("501", "5.1.3")


def test_source_route_is_ignored():
    path = rcpt("TO:<@a.test,@b.test:user@c.test>")
    assert path.address == "user@c.test"
    assert mail("FROM:<@relay.test:user@c.test> SIZE=5").address == "user@c.test"


def test_source_route_without_colon():
    assert codes(refused(rcpt, "TO:<@a.test,@b.test>")) == ("501", "5.1.3")


def test_quoted_local_part_is_kept():
    assert rcpt('TO:<"user@remote"@local.test>').address == '"user@remote"@local.test'
    assert rcpt('TO:<"john doe"@local.test>').address == '"john doe"@local.test'
    assert rcpt('TO:<"a\\"b"@local.test>').address == '"a\\"b"@local.test'


def test_unterminated_quoted_local_part():
    assert codes(refused(rcpt, 'TO:<"user@local.test>')) == ("501", "5.1.3")


def test_percent_hack_address_is_just_a_local_part():
    assert rcpt("TO:<user%remote@local.test>").address == "user%remote@local.test"


@pytest.mark.parametrize(
    "address",
    [
        "first.last@example.test",
        "user+tag@example.test",
        "o'brien@example.test",
        "x@sub.domain.example.test",
        "x@a-b.test",
        "x@localhost",
        "x@123.test",
    ],
)
def test_valid_addresses(address):
    assert rcpt(f"TO:<{address}>").address == address


def test_missing_closing_bracket():
    assert codes(refused(mail, "FROM:<user@example.test")) == ("501", "5.5.4")
    assert codes(refused(mail, "FROM:<user@example.test SIZE=10")) == ("501", "5.5.4")


@pytest.mark.parametrize("tail", ["x", ">", "SIZE=10", "<x@y.test>"])
def test_garbage_right_after_closing_bracket(tail):
    assert codes(refused(mail, f"FROM:<user@example.test>{tail}")) == ("501", "5.5.4")


@pytest.mark.parametrize(
    "address",
    [
        "user",  # no @
        "@example.test",  # no local part
        "user@",  # no domain
        ".user@example.test",
        "user.@example.test",
        "us..er@example.test",
        "us er@example.test",
        "us(er@example.test",
        "us\x01er@example.test",
    ],
)
def test_bad_local_part_or_shape(address):
    basic, enhanced = codes(refused(rcpt, f"TO:<{address}>"))
    assert basic == "501"
    assert enhanced == "5.1.3"


@pytest.mark.parametrize(
    "domain",
    [
        "-bad-.test",
        "bad-.test",
        "-bad.test",
        "a..b",
        ".a.test",
        "a.test.",
        "exa_mple.test",
        "exa mple.test",
        "a" * 64 + ".test",  # label over 63
        "[127.0.0.1",
        "[IPv7:1]",
    ],
)
def test_invalid_domain(domain):
    assert codes(refused(rcpt, f"TO:<user@{domain}>")) == ("501", "5.1.2")


def test_domain_at_label_limit_is_fine():
    domain = "a" * 63 + ".test"
    assert rcpt(f"TO:<user@{domain}>").address == f"user@{domain}"


def test_address_literals():
    assert rcpt("TO:<user@[127.0.0.1]>").address == "user@[127.0.0.1]"
    assert rcpt("TO:<user@[IPv6:::1]>").address == "user@[IPv6:::1]"
    assert rcpt("TO:<user@[IPv6:2001:db8::1]>").address == "user@[IPv6:2001:db8::1]"


def test_local_part_length_limit():
    ok = "a" * MAX_LOCAL_PART
    assert rcpt(f"TO:<{ok}@example.test>").address == f"{ok}@example.test"
    too_long = "a" * (MAX_LOCAL_PART + 1)
    assert codes(refused(rcpt, f"TO:<{too_long}@example.test>")) == ("501", "5.1.3")


def test_local_part_length_counts_utf8_bytes():
    # 33 two-byte characters: 33 characters but 66 octets.
    local = "é" * 33
    assert codes(refused(rcpt, f"TO:<{local}@example.test>", utf8=True)) == ("501", "5.1.3")
    local = "é" * 32
    assert rcpt(f"TO:<{local}@example.test>", utf8=True).address == f"{local}@example.test"


def test_path_length_limit():
    # Labels of 60 characters keep the domain valid; only the total length is too much.
    label = "d" * 60
    domain = ".".join([label] * 4)  # 243 characters
    local = "u" * (MAX_PATH - len(domain) - 1)
    address = f"{local}@{domain}"
    assert len(address) == MAX_PATH
    assert rcpt(f"TO:<{address}>").address == address
    longer = f"{local}u@{domain}"
    assert len(longer) == MAX_PATH + 1
    assert codes(refused(rcpt, f"TO:<{longer}>")) == ("501", "5.1.3")
    assert codes(refused(rcpt, "TO:<" + "x" * 1000 + ">")) == ("501", "5.1.3")


# --- SMTPUTF8 ----------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["josé@example.test", "user@exämple.test", "用户@例子.test"])
def test_non_ascii_refused_without_smtputf8(address):
    reply = refused(mail, f"FROM:<{address}>")
    assert codes(reply) == ("553", "5.6.7")
    reply = refused(rcpt, f"TO:<{address}>")
    assert codes(reply) == ("553", "5.6.7")


@pytest.mark.parametrize("address", ["josé@example.test", "user@exämple.test", "用户@例子.test"])
def test_non_ascii_allowed_with_smtputf8_on_mail(address):
    path = mail(f"FROM:<{address}> SMTPUTF8")
    assert path.address == address
    assert path.params == {"SMTPUTF8": None}


@pytest.mark.parametrize("address", ["josé@example.test", "user@exämple.test"])
def test_non_ascii_allowed_when_transaction_is_utf8(address):
    assert rcpt(f"TO:<{address}>", utf8=True).address == address
    assert mail(f"FROM:<{address}>", utf8=True).address == address


def test_smtputf8_parameter_on_rcpt_does_not_allow_utf8():
    reply = refused(rcpt, "TO:<josé@example.test> SMTPUTF8")
    assert codes(reply) == ("553", "5.6.7")


def test_smtputf8_keyword_is_case_insensitive():
    assert mail("FROM:<josé@example.test> smtputf8").address == "josé@example.test"


def test_non_ascii_but_invalid_text_refused_even_with_smtputf8():
    # Bytes that were not UTF-8 reach us as surrogate escapes.
    bad = b"jos\xe9@example.test".decode("utf-8", "surrogateescape")
    assert codes(refused(rcpt, f"TO:<{bad}>", utf8=True)) == ("501", "5.1.3")


def test_non_ascii_invalid_domain_with_smtputf8():
    assert codes(refused(rcpt, "TO:<user@ä..test>", utf8=True)) == ("501", "5.1.2")


def test_ascii_address_needs_no_smtputf8():
    assert mail("FROM:<plain@example.test>").address == "plain@example.test"


# --- parameters --------------------------------------------------------------------------


def test_params_key_and_key_value():
    path = mail("FROM:<a@example.test> BODY=8BITMIME SMTPUTF8 SIZE=1234")
    assert path.params == {"BODY": "8BITMIME", "SMTPUTF8": None, "SIZE": "1234"}


def test_params_keys_upper_cased_values_kept():
    path = rcpt("TO:<a@example.test> notify=success,failure orcpt=rfc822;A@Example.test")
    assert path.params == {"NOTIFY": "success,failure", "ORCPT": "rfc822;A@Example.test"}


def test_params_extra_spaces():
    assert parse_params("  SIZE=1   BODY=7BIT  ") == {"SIZE": "1", "BODY": "7BIT"}
    assert parse_params("") == {}


def test_params_value_may_not_contain_equals():
    # RFC 5321 4.1.2: esmtp-value excludes "=" (xtext encodes it as +3D).
    with pytest.raises(SyntaxErrorReply):
        parse_params("ENVID=a=b")


@pytest.mark.parametrize(
    "params",
    ["SIZE=1 SIZE=2", "SIZE=1 size=2", "SMTPUTF8 smtputf8", "BODY=7BIT BODY"],
)
def test_duplicate_params(params):
    assert codes(refused(parse_params, params)) == ("501", "5.5.4")
    assert codes(refused(mail, f"FROM:<a@example.test> {params}")) == ("501", "5.5.4")


@pytest.mark.parametrize("params", ["=x", "-SIZE=1", "SI_ZE=1", "SIZE=", "S!ZE", "SIZE:1"])
def test_bad_param_keyword(params):
    assert codes(refused(parse_params, params)) == ("501", "5.5.4")
    assert codes(refused(rcpt, f"TO:<a@example.test> {params}")) == ("501", "5.5.4")


# --- xtext -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("plain", "plain"),
        ("", ""),
        ("a+2Bb", "a+b"),
        ("a+3Db", "a=b"),
        ("+20", " "),
        ("rfc822;user+2Btag@example.test", "rfc822;user+tag@example.test"),
        ("+41+42+43", "ABC"),
    ],
)
def test_decode_xtext(value, decoded):
    assert decode_xtext(value) == decoded


@pytest.mark.parametrize("value", ["a b", "a=b", "tab\there", "caf\u00e9", "\x7f", "line\r\n"])
def test_decode_xtext_refuses_bad_characters(value):
    assert codes(refused(decode_xtext, value)) == ("501", "5.5.4")


@pytest.mark.parametrize("arg", ["FROM:", "FROM: ", "FROM:<@a.test:>"])
def test_null_path_must_be_written_as_angle_brackets(arg):
    with pytest.raises(SyntaxErrorReply) as raised:
        parse_path(arg, "FROM:", utf8_allowed=False, null_allowed=True)
    assert raised.value.reply.startswith("501")


@pytest.mark.parametrize("address", ["user@[300.1.1.1]", "user@[IPv6:::::]", "user@[1.2.3]"])
def test_bad_address_literals(address):
    with pytest.raises(SyntaxErrorReply):
        parse_path(f"TO:<{address}>", "TO:", utf8_allowed=False, null_allowed=False)


@pytest.mark.parametrize("value", ["a+zz", "+", "a+2b"])
def test_xtext_plus_needs_two_upper_hex_digits(value):
    with pytest.raises(SyntaxErrorReply):
        decode_xtext(value)


def test_param_values_are_printable_ascii():
    with pytest.raises(SyntaxErrorReply):
        parse_params(" SIZE=ü")
