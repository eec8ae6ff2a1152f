"""Reading header fields; the fast path for address fields must agree with the standard
library's parser on every input."""

from __future__ import annotations

import email.utils

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailrelay.message.headers import addresses, get_all, parse_headers

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
    assert addresses(values) == standard(values)


def test_parse_headers_unfolds_and_get_all_ignores_case():
    fields = parse_headers(b"From: A <a@x>\r\nSubject: one\r\n\ttwo\r\nfrom: b@y\r\n\r\nbody")
    assert fields == [("From", "A <a@x>"), ("Subject", "one two"), ("from", "b@y")]
    assert addresses(get_all(fields, "FROM")) == ["a@x", "b@y"]
