"""Prometheus metrics: counters, gauges and a histogram, and ``/metrics`` over HTTP.

The Prometheus text format (0.0.4) is a few lines of code: writing it here rather than
importing prometheus_client keeps about 5 MB out of every idle server (the tests read
our output with prometheus_client's own parser). The endpoint is a few lines of HTTP/1.0
on the server's event loop: the queue gauges read ``queue.items`` at scrape time, which
must happen on the loop that changes it, and it stops with the server like every other
listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger("mailrelay.metrics")

REQUEST_TIMEOUT = 10.0
MAX_HEADER_LINES = 100
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A collector called at each scrape: (name, help, value) for each gauge it reports.
GaugeCollector = Callable[[], Iterable[tuple[str, str, float]]]


class Registry:
    """The metrics of one server (tests run several servers in one process)."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []
        self.collectors: list[GaugeCollector] = []

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one series (``name`` as exposed, e.g. ``x_total``), or None."""
        for metric in self.metrics:
            if isinstance(metric, Metric) and metric.name == name:
                key = tuple((labels or {}).get(label, "") for label in metric.label_names)
                with metric._lock:
                    return metric.values.get(key)
        return None

    def exposition(self) -> bytes:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.lines()
        for collect in self.collectors:
            for name, help_text, value in collect():
                lines += [f"# HELP {name} {_help(help_text)}", f"# TYPE {name} gauge",
                          f"{name} {_number(value)}"]
        return ("\n".join(lines) + "\n").encode()


class Metric:
    """A counter or a gauge, with labels; ``labels(...)`` gives the series to change.
    Changes may come from threads (DKIM signing runs in one): a lock keeps them whole."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 registry: Registry | None = None):
        self.name = name + "_total" if self.kind == "counter" else name
        self.help = help_text
        self.label_names = tuple(labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()
        if registry is not None:
            registry.metrics.append(self)

    def labels(self, *values: str) -> Series:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes {len(self.label_names)} label values")
        with self._lock:
            self.values.setdefault(values, 0.0)
        return Series(self, values)

    def add(self, key: tuple[str, ...], amount: float) -> None:
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            values = list(self.values.items())
        for key, value in values:
            labels = _labels(zip(self.label_names, key, strict=True))
            out.append(f"{self.name}{labels} {_number(value)}")
        return out


class Counter(Metric):
    kind = "counter"


class Gauge(Metric):
    kind = "gauge"


class Series:
    """One series of a metric: its label values fixed."""

    __slots__ = ("key", "metric")

    def __init__(self, metric: Metric, key: tuple[str, ...]):
        self.metric = metric
        self.key = key

    def inc(self, amount: float = 1.0) -> None:
        self.metric.add(self.key, amount)

    def dec(self, amount: float = 1.0) -> None:
        self.metric.add(self.key, -amount)


class Histogram:
    """Observations counted in cumulative buckets (no labels: none is needed here)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 registry: Registry | None = None):
        self.name = name
        self.help = help_text
        self.bounds = [*sorted(buckets), math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.metrics.append(self)  # type: ignore[arg-type]

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            for index, bound in enumerate(self.bounds):
                if value <= bound:
                    self.counts[index] += 1
                    break

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {_help(self.help)}", f"# TYPE {self.name} histogram"]
        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative = 0
        for bound, count in zip(self.bounds, counts, strict=True):
            cumulative += count
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        out += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {cumulative}"]
        return out


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    text = ",".join(f'{name}="{_label_value(value)}"' for name, value in pairs)
    return f"{{{text}}}" if text else ""

class MetricsServer:
    """``GET /metrics`` on one address, rendering the server's registry at each scrape."""

    def __init__(self, registry: Registry, host: str, port: int):
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
            status, content_type = "200 OK", CONTENT_TYPE
            body = self.registry.exposition()
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head if method == b"HEAD" else head + body
