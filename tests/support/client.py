"""A raw SMTP client over asyncio streams, for tests that need byte-level control."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, tls: ssl.SSLContext | None = None,
                      server_hostname: str | None = None, greeting: bool = True) -> RawSMTP:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=server_hostname if tls else None)
        client = cls(reader, writer)
        if greeting:
            code, _ = await client.reply()
            assert code == 220, code
        return client

    async def reply(self, timeout: float = 10.0) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: (code, text lines). Code 0 on EOF."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return 0, lines
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode("utf-8")
        self.writer.write(data if data.endswith(b"\n") else data + b"\r\n")
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        await self.send(line)
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        code, _ = await self.cmd("STARTTLS")
        assert code == 220, code
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def auth_plain(self, user: str, password: str) -> tuple[int, list[str]]:
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {blob}")

    async def send_message(self, sender: str, recipients: list[str], data: bytes) -> int:
        """MAIL/RCPT/DATA; returns the final code (or the first failing one)."""
        code, _ = await self.cmd(f"MAIL FROM:<{sender}>")
        if code != 250:
            return code
        for rcpt in recipients:
            code, _ = await self.cmd(f"RCPT TO:<{rcpt}>")
            if code != 250:
                return code
        code, _ = await self.cmd("DATA")
        if code != 354:
            return code
        body = data.replace(b"\r\n.", b"\r\n..")
        if body.startswith(b"."):
            body = b"." + body
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        self.writer.write(body + b".\r\n")
        code, _ = await self.reply()
        return code

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (ConnectionError, ssl.SSLError):
            return True
        return data == b""
