"""Buffered reading of SMTP command lines and DATA from an asyncio stream.

We keep our own buffer (rather than StreamReader.readline) so that DATA is read in large
chunks and scanned for the end marker in C, bytes pipelined after the end of DATA are kept
for the next command, and pipelined plaintext before STARTTLS can be detected and refused.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

from ..message.headers import to_crlf

READ_CHUNK = 256 * 1024
END_OF_DATA = b"\r\n.\r\n"
# DATA is processed (un-dot-stuffed, line endings normalised) a run of lines at a time
# once this much is waiting: few enough steps, little memory on top of the message.
RUN_SIZE = 64 * 1024


class LineTooLong(Exception):
    """A command line longer than the limit (the rest of the line was discarded)."""


class ClientGone(Exception):
    """The client closed the connection."""


class ClientTimeout(Exception):
    """The client sent nothing for the idle timeout."""


class DataTimeout(Exception):
    """DATA took longer than its overall time limit (a client dripping bytes)."""


# Why a message was read to its end but not kept (DataResult.refused).
TOO_BIG = "size"  # over max_size
NUL = "nul"  # a NUL byte in it (RFC 5322 2.3 forbids them in a message)
NO_MEMORY = "memory"  # the budget for messages in flight is spent


class DataBudget:
    """The bytes of message data all sessions together may hold in memory.

    Each DATA phase takes from it as its message grows, and gives it back once the
    message is queued or refused (``Reservation``). Taking and giving are O(1).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.taken = 0  # bytes taken in all, ever
        self.messages = 0  # reservations made, ever (one per DATA)

    def available(self) -> int:
        return self.limit - self.used


class Reservation:
    """One message's share of a ``DataBudget`` (no budget: unlimited)."""

    def __init__(self, budget: DataBudget | None = None):
        self.budget = budget
        self.held = 0
        if budget is not None:
            budget.messages += 1

    def grow_to(self, size: int) -> bool:
        """Hold ``size`` bytes in all; False (and nothing more held) when over budget."""
        more = size - self.held
        if more <= 0 or self.budget is None:
            return True
        if self.budget.used + more > self.budget.limit:
            return False
        self.budget.used += more
        self.budget.taken += more
        self.held = size
        return True

    def release(self) -> None:
        if self.budget is not None:
            self.budget.used -= self.held
        self.held = 0


@dataclass
class DataResult:
    body: bytes | None  # None when the message was refused and thrown away
    size: int  # bytes received, including what was thrown away
    refused: str | None = None  # TOO_BIG, NUL or NO_MEMORY when body is None


class SMTPStream:
    """The client's side of a session: command lines and DATA, each read from the socket
    bounded by ``idle_timeout`` (seconds of silence, also within DATA)."""

    def __init__(self, reader: asyncio.StreamReader, idle_timeout: float):
        self.reader = reader
        self.idle_timeout = idle_timeout
        self.buffer = bytearray()

    def has_buffered_input(self) -> bool:
        return bool(self.buffer)

    def discard_buffer(self) -> None:
        self.buffer.clear()

    async def _read(self, deadline: float | None = None) -> bytes:
        """One chunk, waiting at most ``idle_timeout`` (or until ``deadline``)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.idle_timeout
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await self.reader.read(READ_CHUNK)
        except TimeoutError:
            raise ClientTimeout() from None
        if not chunk:
            raise ClientGone()
        return chunk

    async def _fill(self, deadline: float) -> None:
        self.buffer += await self._read(deadline)

    async def readline(self, limit: int) -> bytes:
        """One line without its line ending (LF or CRLF). Over ``limit``: LineTooLong.

        The whole line must arrive within ``idle_timeout``: a client dripping a byte
        now and then cannot stretch one command over hours."""
        deadline = asyncio.get_running_loop().time() + self.idle_timeout
        scanned = 0
        while True:
            index = self.buffer.find(b"\n", scanned)
            if index >= 0:
                line = bytes(self.buffer[:index])
                del self.buffer[: index + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > limit:
                    raise LineTooLong()
                return line
            scanned = len(self.buffer)
            if scanned > limit + 1:  # + the CR of a CRLF not seen yet
                # Do not buffer an endless line: throw it away up to its end.
                await self._skip_line(deadline)
                raise LineTooLong()
            await self._fill(deadline)

    async def _skip_line(self, deadline: float) -> None:
        while True:
            index = self.buffer.find(b"\n")
            if index >= 0:
                del self.buffer[: index + 1]
                return
            self.buffer.clear()
            await self._fill(deadline)

    async def read_data(
        self, max_size: int, reservation: Reservation | None = None,
        time_limit: float | None = None,
    ) -> DataResult:
        """Read a DATA payload up to the ``CRLF.CRLF`` end marker, un-dot-stuffed, with
        bare CR and LF turned into CRLF.

        Only the exact ``CRLF . CRLF`` sequence ends the message: ``LF.LF`` and similar
        (SMTP smuggling) are content. A message over ``max_size``, with a NUL byte, or
        more than ``reservation`` can hold is still read to the end marker, but thrown
        away as it arrives (``DataResult.refused`` says why). ``time_limit``: seconds
        for the whole payload (else DataTimeout), on top of each read's idle timeout.

        The payload is processed as it arrives, a run of whole lines at a time, into
        one buffer: what is held is about the size of the message, not a multiple.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit if time_limit else None
        reservation = reservation or Reservation()
        # BytesIO: its getvalue() hands over its buffer without a copy (CPython).
        out = io.BytesIO()
        # What is not processed yet; a virtual CRLF in front lets an empty message
        # (".\r\n" at once) match the marker.
        tail = bytearray(b"\r\n")
        tail += self.buffer
        self.buffer.clear()
        refused: str | None = None
        base = 0  # bytes dropped from the front of tail so far, the virtual CRLF included
        first = True
        search_from = 0  # where the marker may start
        while True:
            index = tail.find(END_OF_DATA, search_from)
            if index >= 0:
                self.buffer += tail[index + len(END_OF_DATA):]
                size = base + index
                if refused is None and size > max_size:
                    refused = TOO_BIG
                if refused is None and not reservation.grow_to(out.tell() + index + 2):
                    refused = NO_MEMORY
                if refused is None and not _unstuff_into(out, tail, index + 2, first):
                    refused = NUL
                if refused is None and out.tell() > max_size:
                    refused = TOO_BIG  # bare LFs made CRLFs: the stored size counts
                if refused is not None:
                    reservation.release()
                    return DataResult(None, size, refused)
                del tail[:]
                return DataResult(out.getvalue(), size)
            # Not found yet, so the marker starts at len(tail) - 4 or later: over the
            # limit only once even that much is more than max_size.
            if refused is None and base + len(tail) - (len(END_OF_DATA) - 1) > max_size:
                refused = TOO_BIG
            if refused is None and len(tail) >= max(RUN_SIZE, 8):
                # Process all but what could start the marker, cut where processing in
                # two runs gives what one would: not inside a CRLF, and not between a
                # CRLF and a dot it stuffs (then before that CRLF).
                cut = len(tail) - (len(END_OF_DATA) - 1)
                if tail[cut - 1:cut + 1] == b"\r\n":
                    cut -= 1
                elif tail[cut - 2:cut + 1] == b"\r\n.":
                    cut -= 2
                if not _unstuff_into(out, tail, cut, first):
                    refused = NUL
                elif out.tell() > max_size:
                    refused = TOO_BIG
                first = False
                base += cut
                del tail[:cut]
            if refused is None and not reservation.grow_to(out.tell() + len(tail)):
                refused = NO_MEMORY
            if refused is not None:
                # Throw data away as it arrives, keeping what could start the marker.
                drop = len(tail) - (len(END_OF_DATA) - 1)
                if drop > 0:
                    base += drop
                    del tail[:drop]
                out = io.BytesIO()
                reservation.release()
            search_from = max(0, len(tail) - len(END_OF_DATA) + 1)
            tail += await self._read_until(deadline)

    async def _read_until(self, deadline: float | None) -> bytes:
        if deadline is None:
            return await self._read()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._read()
        except TimeoutError:
            raise DataTimeout() from None


def _unstuff_into(out: io.BytesIO, tail: bytearray, end: int, first: bool) -> bool:
    """Append ``tail[:end]`` without dot-stuffing and with line endings normalised; the
    ``first`` run starts with the virtual CRLF, which is left out. False, appending
    nothing, when it holds a NUL byte."""
    with memoryview(tail) as view:
        run = bytes(view[:end])
    if b"\x00" in run:
        return False
    if b"\r\n." in run:
        run = run.replace(b"\r\n.", b"\r\n")
    run = to_crlf(run)
    if first:
        with memoryview(run) as view:
            out.write(view[2:])
    else:
        out.write(run)
    return True


