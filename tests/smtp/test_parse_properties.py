"""Property tests for mailrelay.smtp.parse (run only where hypothesis is installed)."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

from mailrelay.smtp.parse import (  # noqa: E402
    SyntaxErrorReply,
    decode_xtext,
    parse_params,
    parse_path,
)

# Arbitrary text, plus text built from the characters that matter to the parser so that
# near-valid paths (and their edge cases) come up often.
_SPECIAL = st.sampled_from([*'<>@:,."\\ =%[]-+', "FROM:", "TO:", "SMTPUTF8", "é", "\udcff"])
_TEXT = st.one_of(
    st.text(),
    st.lists(st.one_of(_SPECIAL, st.text(max_size=4)), max_size=30).map("".join),
)


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(
    arg=_TEXT,
    keyword=st.sampled_from(["FROM:", "TO:"]),
    utf8_allowed=st.booleans(),
    null_allowed=st.booleans(),
)
def test_parse_path_only_raises_syntax_error_reply(arg, keyword, utf8_allowed, null_allowed):
    try:
        path = parse_path(arg, keyword, utf8_allowed, null_allowed)
    except SyntaxErrorReply as exc:
        assert exc.reply[:3] in {"501", "553"}
        return
    assert isinstance(path.address, str)
    assert path.address or null_allowed
    assert all(key == key.upper() for key in path.params)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(arg=_TEXT)
def test_parse_path_with_keyword_prefix_only_raises_syntax_error_reply(arg):
    for keyword in ("FROM:", "TO:"):
        try:
            parse_path(keyword + arg, keyword, False, True)
        except SyntaxErrorReply as exc:
            assert exc.reply[:3] in {"501", "553"}


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(text=_TEXT)
def test_parse_params_and_xtext_only_raise_syntax_error_reply(text):
    for func in (parse_params, decode_xtext):
        try:
            func(text)
        except SyntaxErrorReply as exc:
            assert exc.reply.startswith("501 5.5.4")
