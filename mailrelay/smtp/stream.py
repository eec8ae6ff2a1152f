"""Buffered reading of SMTP command lines and DATA from an asyncio stream.

We keep our own buffer (rather than StreamReader.readline) so that DATA is read in large
chunks and scanned for the end marker in C, bytes pipelined after the end of DATA are kept
for the next command, and pipelined plaintext before STARTTLS can be detected and refused.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

READ_CHUNK = 256 * 1024
END_OF_DATA = b"\r\n.\r\n"


class LineTooLong(Exception):
    """A command line longer than the limit (the rest of the line was discarded)."""


class ClientGone(Exception):
    """The client closed the connection."""


class ClientTimeout(Exception):
    """The client sent nothing for the idle timeout."""


@dataclass
class DataResult:
    body: bytes | None  # None when the message was over the size limit (and discarded)
    size: int  # bytes received, including what was discarded


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

    async def _read(self) -> bytes:
        try:
            async with asyncio.timeout(self.idle_timeout):
                chunk = await self.reader.read(READ_CHUNK)
        except TimeoutError:
            raise ClientTimeout() from None
        if not chunk:
            raise ClientGone()
        return chunk

    async def _fill(self) -> None:
        self.buffer += await self._read()

    async def readline(self, limit: int) -> bytes:
        """One line without its line ending (LF or CRLF). Over ``limit``: LineTooLong."""
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
                await self._skip_line()
                raise LineTooLong()
            await self._fill()

    async def _skip_line(self) -> None:
        while True:
            index = self.buffer.find(b"\n")
            if index >= 0:
                del self.buffer[: index + 1]
                return
            self.buffer.clear()
            await self._fill()

    async def read_data(self, max_size: int) -> DataResult:
        """Read a DATA payload up to the ``CRLF.CRLF`` end marker, un-dot-stuffed.

        Only the exact ``CRLF . CRLF`` sequence ends the message: ``LF.LF`` and similar
        (SMTP smuggling) are content. Over ``max_size`` the data is still read to the end
        marker, but thrown away as it arrives.
        """
        # A virtual CRLF in front lets an empty message (".\r\n" at once) match the marker.
        data = bytearray(b"\r\n")
        data += self.buffer
        self.buffer.clear()
        received = 0
        search_from = 0
        overflow = False
        while True:
            index = data.find(END_OF_DATA, search_from)
            if index >= 0:
                self.buffer += data[index + len(END_OF_DATA):]
                received += index
                if overflow or index > max_size:
                    return DataResult(None, received)
                body = bytes(data[2 : index + 2])
                break
            # Not found yet, so the marker starts at len(data) - 4 or later: over the
            # limit only once even that much is more than max_size. From then on, throw
            # data away as it arrives, keeping the tail that could start the end marker.
            if overflow or len(data) - (len(END_OF_DATA) - 1) > max_size:
                overflow = True
                received += len(data) - len(END_OF_DATA)
                del data[: len(data) - len(END_OF_DATA)]
            search_from = max(0, len(data) - len(END_OF_DATA) + 1)
            data += await self._read()
        if b"\r\n." in body:
            body = body.replace(b"\r\n.", b"\r\n")
        if body.startswith(b"."):
            body = body[1:]
        return DataResult(normalize_line_endings(body), received)


def normalize_line_endings(body: bytes) -> bytes:
    """Turn bare LF and bare CR into CRLF (RFC 5321 2.3.8: only CRLF ends a line)."""
    crlf = body.count(b"\r\n")
    if body.count(b"\n") == crlf and body.count(b"\r") == crlf:
        return body
    return body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
