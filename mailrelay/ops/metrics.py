"""Prometheus ``/metrics`` over plain HTTP, served from the server's own event loop.

A few lines of HTTP/1.0 rather than prometheus_client's threaded server: the queue
gauges read ``queue.items`` at scrape time, which must happen on the loop that changes it,
and the endpoint stops with the server like every other listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("mailrelay.metrics")

REQUEST_TIMEOUT = 10.0
MAX_HEADER_LINES = 100

class MetricsServer:
    """``GET /metrics`` on one address, rendering the server's registry at each scrape."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, host=self.host, port=self.port, reuse_address=True,
            family=socket.AF_INET6 if ":" in self.host else socket.AF_INET)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readline()
                for _ in range(MAX_HEADER_LINES):  # headers are read and ignored
                    if (await reader.readline()).strip() == b"":
                        break
            response = self._response(request)
            async with asyncio.timeout(REQUEST_TIMEOUT):
                writer.write(response)
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # a broken or slow client: just hang up
        except Exception:
            log.exception("metrics request")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    def _response(self, request: bytes) -> bytes:
        parts = request.split()
        method = parts[0] if parts else b""
        target = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif target != b"/metrics":
            status, content_type, body = "404 Not Found", "text/plain", b"see /metrics\n"
        else:
            status, content_type = "200 OK", CONTENT_TYPE_LATEST
            body = generate_latest(self.registry)
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head if method == b"HEAD" else head + body
