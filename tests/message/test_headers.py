"""Reading header fields; the fast path for address fields must agree with the standard
library's parser on every input."""

from __future__ import annotations

import email.utils
import time
import tracemalloc

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mailrelay.message.headers as headers
from mailrelay.message.headers import (
    MAX_ADDRESSES,
    MAX_COMMENT_DEPTH,
    HeaderError,
    addresses,
    count,
    get_all,
    header_end,
    header_section,
    mailboxes,
    parse_headers,
    read_header,
)
from tests.support.linear import assert_linear

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
atom = st.text(ATEXT, min_size=1, max_size=6)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
addr_spec = st.builds(lambda local, domain: f"{local}@{domain}", dot_atom, dot_atom)
display_name = st.text(ATEXT + ". \t", max_size=12)
simple_value = st.one_of(
    addr_spec,
    st.builds(lambda name, addr: f"{name}<{addr}>", display_name, addr_spec),
    st.builds(lambda before, value, after: before + value + after,
              st.sampled_from(["", " ", "\t "]), addr_spec, st.sampled_from(["", " ", " \t"])),
)
# Anything at all, weighted towards what address parsing cares about.
odd_value = st.text(ATEXT + ' .\t"()<>,;:@[]\\', max_size=30)


def standard(values: list[str]) -> list[str]:
    return [addr for _, addr in email.utils.getaddresses(values) if "@" in addr]


@settings(max_examples=600)
@given(st.lists(simple_value, min_size=1, max_size=3))
@example(["Jane Example <jane@example.com>"])
@example([" J. Doe <j.d@x.y> "])
@example(["a.@b"])
def test_plain_shapes_give_what_getaddresses_gives(values):
    assert addresses(values) == standard(values)


@settings(max_examples=600)
@given(st.lists(st.one_of(simple_value, odd_value), min_size=0, max_size=3))
@example(['"abc', "x@y"])  # an open quote in one field swallows the next one
@example(["a@b, c@d"])
@example(['"Q" <a@b>'])
@example(["x <a@b> y"])
@example(["(comment) a@b"])
def test_any_value_gives_what_getaddresses_gives(values):
    try:
        found = addresses(values)
    except HeaderError as exc:  # only for what goes past the caps
        assert exc.reply.startswith("554 5.6.0 Comments nested too deeply"), exc.reply
        assert max(value.count("(") for value in values) > MAX_COMMENT_DEPTH
        return
    assert found == standard(values)


def test_parse_headers_unfolds_and_get_all_ignores_case():
    fields = parse_headers(b"From: A <a@x>\r\nSubject: one\r\n\ttwo\r\nfrom: b@y\r\n\r\nbody")
    assert fields == [("From", "A <a@x>"), ("Subject", "one two"), ("from", "b@y")]
    assert addresses(get_all(fields, "FROM")) == ["a@x", "b@y"]


# --- obsolete syntax, mailboxes without a domain ---------------------------------------------


@pytest.mark.parametrize("line", [b"From : evil@x.test", b"From\t: evil@x.test",
                                  b"FROM \t : evil@x.test"])
def test_white_space_before_the_colon_is_the_same_field(line):
    # RFC 5322 4.5.5 (obs-optional): receivers read it as From:, so must we.
    fields = parse_headers(b"Subject: s\r\n" + line + b"\r\n\r\nbody")
    assert addresses(get_all(fields, "From")) == ["evil@x.test"]


def test_a_mailbox_without_a_domain_is_a_mailbox_but_not_an_address():
    assert mailboxes(["me"]) == ["me"]
    assert mailboxes(["Me <me>, you@x.test"]) == ["me", "you@x.test"]
    assert addresses(["me"]) == []
    assert mailboxes(["undisclosed-recipients:;"]) == []


def test_lines_that_are_no_field_are_skipped_and_lf_works():
    fields = parse_headers(b" orphan\nnot a field\n more\nA: 1\n  2 \n\t3\nB:\n\nbody")
    assert fields == [("A", "1 2 3"), ("B", "")]


# --- the header section, bounded ------------------------------------------------------------


def test_header_end():
    assert header_end(b"A: b\r\n\r\nbody") == 4
    assert header_end(b"A: b\n\nbody") == 4
    assert header_end(b"A: b\r\n\nbody") == 4
    assert header_end(b"\r\nbody") == 0
    assert header_end(b"A: b\r\n") is None
    assert header_section(b"A: b\r\n") == b"A: b\r\n"
    # Bounded: the search looks at the first limit + 4 bytes only.
    assert header_end(b"A: b\r\n" + b"x" * 100 + b"\r\n\r\n", limit=50) is None


def test_read_header_caps_size_and_fields():
    fields = read_header(b"A: 1\r\nB: 2\r\n\r\n" + b"x" * 10_000, max_size=12, max_fields=2)
    assert fields == [("A", "1"), ("B", "2")]
    with pytest.raises(HeaderError) as caught:
        read_header(b"A: 1\r\nB: 22\r\n\r\nbody", max_size=10)
    assert caught.value.reply.startswith("552 5.6.0 ")
    with pytest.raises(HeaderError) as caught:
        read_header(b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody", max_fields=2)
    assert caught.value.reply.startswith("552 5.6.0 ")
    # A message that is all header counts whole.
    with pytest.raises(HeaderError):
        read_header(b"A: " + b"x" * 100, max_size=50)
    assert read_header(b"A: " + b"x" * 40, max_size=50) == [("A", "x" * 40)]


def test_read_header_of_a_huge_message_without_a_blank_line_is_quick():
    data = b"Subject: x\r\n" + b" y\r\n" * 12_000_000  # 48 MB, never a blank line
    started = time.thread_time()
    with pytest.raises(HeaderError):
        read_header(data)
    elapsed = time.thread_time() - started
    assert elapsed < 0.5, elapsed


def test_count_ignores_case():
    assert count([("Received", "a"), ("received", "b"), ("X", "c")], "RECEIVED") == 2


# --- linear time ----------------------------------------------------------------------------


def folded(lines: int) -> bytes:
    """The issue's message: one Subject: with ``lines`` continuation lines."""
    return b"Subject: x\r\n" + b" y\r\n" * lines + b"From: a@b.test\r\n\r\nbody\r\n"


def test_unfolding_is_linear():
    # The sizes: 50k, 500k and 5M folded lines (200 KB to 20 MB); the code before
    # took 70 s for 1M.
    assert_linear(parse_headers, folded, 50_000, repeat=2, label="parse_headers, folded lines")


def test_many_fields_are_linear():
    def many(n: int) -> bytes:
        return b"".join(b"X-%d: v\r\n" % i for i in range(n)) + b"\r\nbody"
    assert_linear(parse_headers, many, 2_000, label="parse_headers, fields")


def test_a_from_with_many_addresses_is_refused_in_linear_time():
    def many(n: int) -> list[str]:
        return [", ".join(f"u{i}@example.com" for i in range(n))]
    assert len(addresses(many(MAX_ADDRESSES))) == MAX_ADDRESSES
    with pytest.raises(HeaderError) as caught:
        addresses(many(MAX_ADDRESSES + 1), "From:")
    assert caught.value.reply == (f"554 5.6.0 Too many addresses in From: (the limit is "
                                  f"{MAX_ADDRESSES})")
    # Quoted commas are no addresses; commas inside comments neither.
    quoted = ['"Doe, John" <j@x.test>, ' * 60 + "(a, b, c) k@x.test"]
    assert len(addresses(quoted)) == 61

    def refused(values: list[str]) -> None:
        with pytest.raises(HeaderError):
            addresses(values)
    # The 150k addresses (2.2 MB) are at the 100x step.
    assert_linear(refused, many, 1_500, label="addresses, over the cap")


@pytest.mark.parametrize("value", [
    "(" * 5000 + ")" * 5000 + " a@b.test",  # the nesting
    "(" * 5000 + " a@b.test",  # never closed
    "(" * (MAX_COMMENT_DEPTH + 1) + ")" * (MAX_COMMENT_DEPTH + 1) + " a@b.test",
])
def test_deeply_nested_comments_are_refused(value):
    with pytest.raises(HeaderError) as caught:
        addresses([value], "From:")
    assert caught.value.reply == "554 5.6.0 Comments nested too deeply in From:"


@pytest.mark.parametrize("value", [
    "(" * MAX_COMMENT_DEPTH + ")" * MAX_COMMENT_DEPTH + " a@b.test",
    '"' + "(" * 500 + '" <a@b.test>',  # not comments: a quoted display name
    "(" + "\\(" * 500 + ") a@b.test",  # quoted-pairs inside one comment
])
def test_nesting_within_the_cap_is_read(value):
    assert addresses([value]) == ["a@b.test"] == standard([value])


def test_nesting_check_is_linear():
    def nested(n: int) -> list[str]:
        return ["(" + "\\(" * n + ") a@b.test"]
    assert_linear(addresses, nested, 5_000, label="addresses, long comment")


@settings(max_examples=500)
@given(st.binary(max_size=80).map(lambda b: b.translate(bytes.maketrans(
    bytes(range(256)), (b"a \t\r\n" * 52)[:256]))), st.integers(1, 8))
def test_unfolding_in_slices_is_unfolding(value, slice_size):
    saved = headers._UNFOLD_SLICE
    headers._UNFOLD_SLICE = slice_size
    try:
        assert headers._unfold(value) == headers._UNFOLD.sub(b" ", value)
    finally:
        headers._UNFOLD_SLICE = saved


def test_unfolding_memory_stays_near_the_size_of_the_header():
    data = folded(1_000_000)  # 4 MB
    tracemalloc.start()
    try:
        parse_headers(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data), peak  # re.sub alone held 45 times the size
