"""mailrelay.smtp.stream: command lines and DATA read from an asyncio.StreamReader."""

from __future__ import annotations

import asyncio

import pytest

from mailrelay.message.headers import to_crlf
from mailrelay.smtp import stream as stream_module
from mailrelay.smtp.stream import (
    END_OF_DATA,
    NO_MEMORY,
    NUL,
    RUN_SIZE,
    TOO_BIG,
    ClientGone,
    DataBudget,
    DataResult,
    DataTimeout,
    LineTooLong,
    Reservation,
    SMTPStream,
)


class TrickleReader(asyncio.StreamReader):
    """A StreamReader whose reads return at most ``chunk`` bytes: every split point."""

    def __init__(self, chunk: int):
        super().__init__()
        self.chunk = chunk

    async def read(self, n: int = -1) -> bytes:
        return await super().read(self.chunk)


def stream_of(*pieces: bytes, eof: bool = False) -> SMTPStream:
    reader = asyncio.StreamReader()
    for piece in pieces:
        reader.feed_data(piece)
    if eof:
        reader.feed_eof()
    return SMTPStream(reader, 30)


def trickle_stream(data: bytes, chunk: int) -> SMTPStream:
    reader = TrickleReader(chunk)
    reader.feed_data(data)
    reader.feed_eof()
    return SMTPStream(reader, 30)


async def feed_byte_by_byte(reader: asyncio.StreamReader, data: bytes) -> None:
    for i in range(len(data)):
        reader.feed_data(data[i : i + 1])
        await asyncio.sleep(0)


async def read_data_fed_byte_by_byte(data: bytes, max_size: int) -> tuple[DataResult, SMTPStream]:
    reader = asyncio.StreamReader()
    stream = SMTPStream(reader, 30)
    task = asyncio.create_task(stream.read_data(max_size))
    await feed_byte_by_byte(reader, data)
    reader.feed_eof()
    return await asyncio.wait_for(task, 5), stream


# --- readline ----------------------------------------------------------------------------


async def test_readline_crlf():
    stream = stream_of(b"EHLO client.test\r\nQUIT\r\n")
    assert await stream.readline(100) == b"EHLO client.test"
    assert await stream.readline(100) == b"QUIT"
    assert not stream.has_buffered_input()


async def test_readline_bare_lf():
    stream = stream_of(b"HELO a\nNOOP\r\nQUIT\n")
    assert await stream.readline(100) == b"HELO a"
    assert await stream.readline(100) == b"NOOP"
    assert await stream.readline(100) == b"QUIT"


async def test_readline_empty_line_and_inner_cr():
    stream = stream_of(b"\r\n\nA\rB\r\n")
    assert await stream.readline(100) == b""
    assert await stream.readline(100) == b""
    assert await stream.readline(100) == b"A\rB"


async def test_readline_keeps_pipelined_input_buffered():
    stream = stream_of(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    assert await stream.readline(100) == b"MAIL FROM:<a@b.test>"
    assert stream.has_buffered_input()
    stream.discard_buffer()
    assert not stream.has_buffered_input()


async def test_readline_line_split_across_feeds():
    reader = asyncio.StreamReader()
    stream = SMTPStream(reader, 30)
    task = asyncio.create_task(stream.readline(100))
    await feed_byte_by_byte(reader, b"NOOP hello\r\nQUIT\r\n")
    assert await asyncio.wait_for(task, 5) == b"NOOP hello"
    assert await stream.readline(100) == b"QUIT"


async def test_readline_too_long_then_next_line_readable():
    stream = stream_of(b"X" * 500 + b"\r\nQUIT\r\n")
    with pytest.raises(LineTooLong):
        await stream.readline(100)
    assert await stream.readline(100) == b"QUIT"


async def test_readline_within_limit():
    stream = stream_of(b"Y" * 99 + b"\n")
    assert await stream.readline(100) == b"Y" * 99


async def test_readline_longer_than_limit_arriving_in_pieces():
    reader = asyncio.StreamReader()
    stream = SMTPStream(reader, 30)
    task = asyncio.create_task(stream.readline(50))
    for _ in range(20):
        reader.feed_data(b"Z" * 30)
        await asyncio.sleep(0)
    assert not task.done()  # still skipping the over-long line
    reader.feed_data(b"Z" * 7 + b"\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        await asyncio.wait_for(task, 5)
    assert await stream.readline(50) == b"NOOP"
    # The discarded line was not kept around.
    assert not stream.has_buffered_input()


@pytest.mark.parametrize("chunk", [1, 7, 64])
async def test_readline_too_long_trickled(chunk):
    stream = trickle_stream(b"W" * 300 + b"\r\nRSET\r\n", chunk)
    with pytest.raises(LineTooLong):
        await stream.readline(100)
    assert await stream.readline(100) == b"RSET"


async def test_readline_client_gone_at_eof():
    stream = stream_of(eof=True)
    with pytest.raises(ClientGone):
        await stream.readline(100)


async def test_readline_client_gone_with_partial_line():
    stream = stream_of(b"QUI", eof=True)
    with pytest.raises(ClientGone):
        await stream.readline(100)


async def test_readline_client_gone_after_last_line():
    stream = stream_of(b"QUIT\r\n", eof=True)
    assert await stream.readline(100) == b"QUIT"
    with pytest.raises(ClientGone):
        await stream.readline(100)


async def test_readline_client_gone_while_skipping_long_line():
    stream = stream_of(b"V" * 300, eof=True)
    with pytest.raises(ClientGone):
        await stream.readline(100)


# --- read_data ---------------------------------------------------------------------------

MESSAGE = b"Subject: hi\r\n\r\nhello\r\nworld\r\n"


async def test_read_data_simple():
    stream = stream_of(MESSAGE + b".\r\n")
    result = await stream.read_data(10_000)
    assert result.body == MESSAGE
    assert result.size == len(MESSAGE)
    assert not stream.has_buffered_input()


async def test_read_data_empty_message():
    stream = stream_of(b".\r\n")
    result = await stream.read_data(10_000)
    assert result.body == b""
    assert result.size == 0


async def test_read_data_empty_message_after_an_earlier_command():
    stream = stream_of(b"DATA\r\n.\r\nQUIT\r\n")
    assert await stream.readline(100) == b"DATA"
    result = await stream.read_data(10_000)
    assert result.body == b""
    assert await stream.readline(100) == b"QUIT"


async def test_read_data_single_empty_line():
    stream = stream_of(b"\r\n.\r\n")
    result = await stream.read_data(10_000)
    assert result.body == b"\r\n"


async def test_read_data_dot_unstuffing():
    wire = b"..first line\r\nmiddle\r\n..\r\n...three\r\n. space\r\nlast.\r\n.\r\n"
    result = await stream_of(wire).read_data(10_000)
    assert result.body == b".first line\r\nmiddle\r\n.\r\n..three\r\n space\r\nlast.\r\n"


async def test_read_data_dot_unstuffing_of_a_lone_first_dot_line():
    # "..\r\n" on the first line is a line holding one dot, not the end marker.
    result = await stream_of(b"..\r\n.\r\n").read_data(10_000)
    assert result.body == b".\r\n"


async def test_read_data_no_dot_in_middle_of_line_is_removed():
    result = await stream_of(b"a.b\r\nc .\r\n.\r\n").read_data(10_000)
    assert result.body == b"a.b\r\nc .\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7])
async def test_read_data_end_marker_at_every_split(chunk):
    wire = b"line one\r\n..dotted\r\n" + b".\r\n" + b"QUIT\r\n"
    stream = trickle_stream(wire, chunk)
    result = await stream.read_data(10_000)
    assert result.body == b"line one\r\n.dotted\r\n"
    assert await stream.readline(100) == b"QUIT"


async def test_read_data_fed_byte_by_byte():
    result, stream = await read_data_fed_byte_by_byte(MESSAGE + b".\r\nQUIT\r\n", 10_000)
    assert result.body == MESSAGE
    assert result.size == len(MESSAGE)
    assert await stream.readline(100) == b"QUIT"


async def test_read_data_empty_message_fed_byte_by_byte():
    result, stream = await read_data_fed_byte_by_byte(b".\r\nNOOP\r\n", 10_000)
    assert result.body == b""
    assert await stream.readline(100) == b"NOOP"


async def test_read_data_pipelined_commands_remain_for_readline():
    stream = stream_of(MESSAGE + b".\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    result = await stream.read_data(10_000)
    assert result.body == MESSAGE
    assert stream.has_buffered_input()
    assert await stream.readline(100) == b"MAIL FROM:<a@b.test>"
    assert await stream.readline(100) == b"RCPT TO:<c@d.test>"


async def test_read_data_second_message_in_same_buffer():
    stream = stream_of(b"one\r\n.\r\nDATA\r\ntwo\r\n.\r\n")
    assert (await stream.read_data(100)).body == b"one\r\n"
    assert await stream.readline(100) == b"DATA"
    assert (await stream.read_data(100)).body == b"two\r\n"


async def test_read_data_uses_input_buffered_by_readline():
    stream = stream_of(b"DATA\r\nbody\r\n.\r\nQUIT\r\n")
    assert await stream.readline(100) == b"DATA"
    assert stream.has_buffered_input()
    result = await stream.read_data(100)
    assert result.body == b"body\r\n"
    assert await stream.readline(100) == b"QUIT"


async def test_read_data_over_max_size_is_discarded():
    big = b"x" * 78 + b"\r\n"
    message = big * 100  # 8000 bytes
    stream = stream_of(message + b".\r\nQUIT\r\n")
    result = await stream.read_data(1000)
    assert result.body is None
    assert result.size == len(message)
    assert await stream.readline(100) == b"QUIT"


async def test_read_data_over_max_size_in_one_read():
    # The whole message (and the end marker) arrives in a single read.
    stream = stream_of(b"y" * 200 + b"\r\n.\r\nNOOP\r\n")
    result = await stream.read_data(50)
    assert result.body is None
    assert result.size == 202
    assert await stream.readline(100) == b"NOOP"


@pytest.mark.parametrize("chunk", [1, 3, 5, 100])
async def test_read_data_over_max_size_trickled(chunk):
    message = b"z" * 60 + b"\r\n" + b".." * 30 + b"\r\n"
    stream = trickle_stream(message + b".\r\nRSET\r\n", chunk)
    result = await stream.read_data(40)
    assert result.body is None
    assert result.size == len(message)
    assert await stream.readline(100) == b"RSET"


async def test_read_data_over_max_size_fed_byte_by_byte():
    message = b"q" * 300 + b"\r\n"
    result, stream = await read_data_fed_byte_by_byte(message + b".\r\nQUIT\r\n", 100)
    assert result.body is None
    assert result.size == len(message)
    assert await stream.readline(100) == b"QUIT"


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 4, 5, 13])
async def test_read_data_exactly_max_size_is_accepted(chunk):
    message = b"0123456789" * 3 + b"\r\n"  # 32 bytes
    wire = message + b".\r\nQUIT\r\n"
    stream = stream_of(wire) if chunk is None else trickle_stream(wire, chunk)
    result = await stream.read_data(len(message))
    assert result.body == message
    assert result.size == len(message)
    assert await stream.readline(100) == b"QUIT"


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 4, 5, 13])
async def test_read_data_one_byte_over_max_size_is_refused(chunk):
    message = b"0123456789" * 3 + b"\r\n"
    wire = message + b".\r\nQUIT\r\n"
    stream = stream_of(wire) if chunk is None else trickle_stream(wire, chunk)
    result = await stream.read_data(len(message) - 1)
    assert result.body is None
    assert result.size == len(message)
    assert await stream.readline(100) == b"QUIT"


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
@pytest.mark.parametrize("ending", [b"\n", b"\r"])
async def test_read_data_bare_line_endings_count_as_stored(chunk, ending):
    """Outside eyes: 48,000,000 bare LFs (under 50 MiB on the wire) were queued as a
    96 MB message. The limit holds for what is stored, each bare LF or CR a CRLF."""
    for lines, accepted in ((60, True), (61, False)):
        message = ending * lines  # stored as `lines` CRLFs: 120 or 122 bytes
        wire = message + b"\r\n.\r\nQUIT\r\n"
        stream = stream_of(wire) if chunk is None else trickle_stream(wire, chunk)
        result = await stream.read_data(122)  # the wire size stays well under it
        assert (result.body is not None) is accepted, (lines, result.refused)
        assert await stream.readline(100) == b"QUIT"


async def test_read_data_bare_lfs_over_max_size_in_large_runs():
    message = b"\n" * (3 * RUN_SIZE)
    result = await stream_of(message + b"\r\n.\r\n").read_data(4 * RUN_SIZE)
    assert result.body is None and result.refused == TOO_BIG


async def test_read_data_client_gone_before_end_marker():
    stream = stream_of(b"Subject: x\r\n\r\nno end", eof=True)
    with pytest.raises(ClientGone):
        await stream.read_data(10_000)


async def test_read_data_client_gone_while_discarding():
    stream = stream_of(b"w" * 5000, eof=True)
    with pytest.raises(ClientGone):
        await stream.read_data(100)


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        # LF . LF: not an end marker; bare LFs become CRLF in the stored body.
        (b"a\r\nb\n.\nMAIL FROM:<x@evil.test>\r\nc\r\n",
         b"a\r\nb\r\n.\r\nMAIL FROM:<x@evil.test>\r\nc\r\n"),
        # LF . CRLF
        (b"a\r\nb\n.\r\nRCPT TO:<x@evil.test>\r\n",
         b"a\r\nb\r\n.\r\nRCPT TO:<x@evil.test>\r\n"),
        # CRLF . LF: the line starts with a dot followed by more text, so it is unstuffed.
        (b"a\r\n.\nDATA\r\n", b"a\r\n\r\nDATA\r\n"),
        # CR . CR
        (b"a\r.\rQUIT\r\n", b"a\r\n.\r\nQUIT\r\n"),
        # CR . CRLF and CRLF . CR
        (b"a\r.\r\nb\r\n.\rc\r\n", b"a\r\n.\r\nb\r\n\r\nc\r\n"),
    ],
)
async def test_read_data_smuggling_sequences_do_not_end_data(wire, body):
    stream = stream_of(wire + b".\r\nNOOP\r\n")
    result = await stream.read_data(10_000)
    assert result.body == body
    assert result.size == len(wire)
    assert await stream.readline(100) == b"NOOP"
    assert not stream.has_buffered_input()


async def test_read_data_all_smuggling_sequences_in_one_message():
    content = (b"Subject: s\r\n\r\nx\n.\nMAIL FROM:<a@evil.test>\n"
               b"y\n.\r\nRCPT TO:<b@evil.test>\r\n"
               b"z\r\n.\nDATA\r\n"
               b"w\r.\rQUIT\r\n")
    stream = trickle_stream(content + b".\r\nNOOP\r\n", 3)
    result = await stream.read_data(10_000)
    assert result.body is not None
    for fragment in (b"MAIL FROM:<a@evil.test>", b"RCPT TO:<b@evil.test>", b"DATA", b"QUIT"):
        assert fragment in result.body
    assert result.size == len(content)
    assert await stream.readline(100) == b"NOOP"


async def test_read_data_normalises_bare_line_endings():
    result = await stream_of(b"one\ntwo\rthree\r\n.\r\n").read_data(10_000)
    assert result.body == b"one\r\ntwo\r\nthree\r\n"


# --- normalize_line_endings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", b""),
        (b"no newline", b"no newline"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\nb\nc\rd", b"a\r\nb\r\nc\r\nd"),
        (b"\n\n", b"\r\n\r\n"),
        (b"a\n\rb", b"a\r\n\r\nb"),  # LF then CR: two line breaks
        (b"a\r\r\nb", b"a\r\n\r\nb"),  # bare CR then CRLF
    ],
)
def test_to_crlf(raw, expected):
    assert to_crlf(raw) == expected


def test_normalize_line_endings_returns_same_object_when_clean():
    body = b"x\r\ny\r\n"
    assert to_crlf(body) is body


# --- DATA processed as it arrives (issue 16, rows 13, 20, 11) ------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")


def one_pass(wire: bytes) -> bytes:
    """What DATA gives for ``wire`` (a payload without its end marker), processed in one
    go as the reader did before it worked a run of lines at a time."""
    body = wire
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n")
    if body.startswith(b"."):
        body = body[1:]
    return to_crlf(body)


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(
    pieces=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"x", b"yz",
                                     b"\r\n.", b"\n.", b"\r."]), max_size=60),
    chunk=st.integers(1, 9), run_size=st.integers(1, 12))
async def test_processing_in_runs_gives_what_one_pass_gives(pieces, chunk, run_size):
    """Any cut the reader makes between runs (however small RUN_SIZE) and any way the
    bytes arrive give the same body as processing the payload in one go."""
    wire = b"".join(pieces)
    end = b"" if wire.endswith(b"\r\n") or not wire else b"\r\n"
    # The marker inside (".\r\n" first counts): not a payload.
    hypothesis.assume(END_OF_DATA not in b"\r\n" + wire + end)
    old = stream_module.RUN_SIZE
    stream_module.RUN_SIZE = run_size
    try:
        stream = trickle_stream(wire + end + b".\r\nNOOP\r\n", chunk)
        result = await stream.read_data(10_000)
    finally:
        stream_module.RUN_SIZE = old
    assert result.body == one_pass(wire + end)
    assert result.size == len(wire + end)
    assert await stream.readline(100) == b"NOOP"


async def test_a_nul_byte_refuses_the_message_and_the_session_goes_on():
    message = b"Subject: x\r\n\r\nbinary \x00 here\r\n"
    for chunk in (None, 1, 7):
        wire = message + b".\r\nRSET\r\n"
        stream = stream_of(wire) if chunk is None else trickle_stream(wire, chunk)
        result = await stream.read_data(10_000)
        assert (result.body, result.refused, result.size) == (None, NUL, len(message))
        assert await stream.readline(100) == b"RSET"
    # In a long message, after many runs; and a NUL after the end marker (the next
    # command, already read) is not the message's.
    big = b"x" * 70 + b"\r\n"
    stream = stream_of(big * 3000 + b"\x00\r\n" + big + b".\r\n")
    assert (await stream.read_data(10**6)).refused == NUL
    stream = stream_of(big + b".\r\nNOOP \x00\r\n")
    result = await stream.read_data(10_000)
    assert result.body == big and result.refused is None


async def test_the_in_flight_budget_is_shared_and_given_back():
    budget = DataBudget(300_000)
    first, second = Reservation(budget), Reservation(budget)
    big = (b"y" * 98 + b"\r\n") * 2000  # 200,000 bytes
    result = await stream_of(big + b".\r\n").read_data(10**6, first)
    assert result.body == big
    assert budget.used >= len(big) and first.held == budget.used
    # The first message is still held (being queued): the second does not fit.
    stream = stream_of(big + b".\r\nQUIT\r\n")
    result = await stream.read_data(10**6, second)
    assert (result.body, result.refused, result.size) == (None, NO_MEMORY, len(big))
    assert second.held == 0
    assert await stream.readline(100) == b"QUIT"
    first.release()
    assert budget.used == 0
    # Now it fits.
    assert (await stream_of(big + b".\r\n").read_data(10**6, second)).body == big
    second.release()
    assert budget.used == 0


async def test_the_whole_payload_has_a_time_limit():
    reader = asyncio.StreamReader()
    stream = SMTPStream(reader, 30)  # each read may wait 30 s: the drip never waits that
    task = asyncio.create_task(stream.read_data(10_000, time_limit=0.3))
    started = asyncio.get_running_loop().time()
    with pytest.raises(DataTimeout):
        while not task.done():
            reader.feed_data(b"x")
            await asyncio.sleep(0.02)
        await task
    assert 0.25 < asyncio.get_running_loop().time() - started < 1.0


async def test_a_message_costs_about_its_size_in_memory():
    """Peak memory of reading a 4 MiB message, with dots to unstuff and bare LFs to
    normalise: it was 3 to 4 times the message (a bytearray, a slice, a bytes copy,
    one per replace); now one buffer and a run of lines."""
    tracemalloc = pytest.importorskip("tracemalloc")
    for line in (b"x" * 76 + b"\r\n", b".x" + b"x" * 74 + b"\r\n", b"x" * 77 + b"\n"):
        message = line * (4 * 1024 * 1024 // len(line)) + b"\r\n"
        stream = trickle_stream(message + b".\r\n", 65536)
        tracemalloc.start()
        try:
            result = await stream.read_data(10**8)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.body is not None
        ratio = peak / len(result.body)
        assert ratio < 2.0, f"peak {ratio:.2f}x the message for lines like {line[:4]!r}"
        del message, result, stream


@pytest.mark.parametrize("pieces", [1460, 65536])
async def test_one_long_line_is_read_in_linear_time(pieces):
    """A payload with no CRLF at all (or only bare LFs) is cut into runs too: 1x, 10x and
    100x the size take about 1x, 10x and 100x the time."""
    timings = []
    for size in (50_000, 500_000, 5_000_000):
        stream = trickle_stream(b"z" * size + b"\n" * 10 + b"\r\n.\r\n", pieces)
        started = asyncio.get_running_loop().time()
        result = await stream.read_data(10**8)
        timings.append(asyncio.get_running_loop().time() - started)
        assert len(result.body) == size + 22
    assert timings[2] < 2.0, timings
    assert timings[2] < 300 * max(timings[0], 1e-3), timings
