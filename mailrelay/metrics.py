"""Prometheus ``/metrics`` over plain HTTP, served from the server's own event loop.

A few lines of HTTP/1.0 rather than prometheus_client's threaded server: the queue
gauges read ``queue.items`` at scrape time, which must happen on the loop that changes it,
and the endpoint stops with the server like every other listener.

With SMTP worker processes, each worker has its own registry; ``extra`` fetches their
expositions and ``merge_expositions`` sums them with the main one, so Prometheus still
scrapes one endpoint for the whole server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("mailrelay.metrics")

REQUEST_TIMEOUT = 10.0
MAX_HEADER_LINES = 100

# The families whose samples generate_latest follows with a "<name>_created" gauge family.
_CREATED_PARENTS = ("counter", "histogram", "summary", "gaugehistogram")


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """One exposition out of several processes' (generate_latest output), so a single
    /metrics endpoint covers the main process and its SMTP workers.

    Samples with the same name and labels are summed (counters, gauges, histogram buckets,
    _sum and _count); the ``*_created`` timestamps of counters and histograms are dropped,
    since a sum of them means nothing. A family's type and help come from the first text
    that has it; whatever only one text has is kept as it is.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        parsed = list(text_string_to_metric_families(text.decode("utf-8")))
        created = {f"{f.name}_created" for f in parsed if f.type in _CREATED_PARENTS}
        for family in parsed:
            if family.name in created:
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            summed = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                summed[key] = summed.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector handing out ready-made families, to render them with generate_latest."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 extra: Callable[[], Awaitable[list[bytes]]] | None = None):
        self.registry = registry
        self.host = host
        self.port = port
        self.extra = extra  # other processes' expositions, merged into this one's
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, host=self.host, port=self.port, reuse_address=True,
            family=socket.AF_INET6 if ":" in self.host else socket.AF_INET)

    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

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
            response = await self._response(request)  # self.extra has its own timeout
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

    async def _response(self, request: bytes) -> bytes:
        parts = request.split()
        method = parts[0] if parts else b""
        target = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif target != b"/metrics":
            status, content_type, body = "404 Not Found", "text/plain", b"see /metrics\n"
        else:
            status, content_type = "200 OK", CONTENT_TYPE_LATEST
            body = await self._exposition()
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head if method == b"HEAD" else head + body

    async def _exposition(self) -> bytes:
        own = generate_latest(self.registry)
        if self.extra is None:
            return own
        try:
            others = await asyncio.wait_for(self.extra(), REQUEST_TIMEOUT)
        except Exception as e:  # a worker that does not answer must not hide the rest
            log.warning("metrics of the other processes unavailable, serving this one's "
                        "alone: %r", e)
            others = []
        return merge_expositions([own, *others])
