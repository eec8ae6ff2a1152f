"""merge_expositions: several processes' registries served as one /metrics, summed; and
MetricsServer with an ``extra`` source of expositions, scraped over real HTTP."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mailrelay.metrics import MetricsServer, merge_expositions


def registry(connections: int, open_now: int, latencies: list[float],
             replies: dict[str, int]) -> CollectorRegistry:
    """The same families in every process, as events.Events makes them."""
    reg = CollectorRegistry()
    Counter("t_connections", "Connections", registry=reg).inc(connections)
    Gauge("t_connections_open", "Open connections", registry=reg).set(open_now)
    replies_counter = Counter("t_replies", "Replies, by code", ["code"], registry=reg)
    for code, count in replies.items():
        replies_counter.labels(code).inc(count)
    latency = Histogram("t_latency_seconds", "Latency", ["kind"], buckets=(0.1, 1.0),
                        registry=reg)
    for value in latencies:
        latency.labels("local").observe(value)
    return reg


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def families(text: bytes) -> dict[str, tuple[str, str]]:
    return {f.name: (f.type, f.documentation)
            for f in text_string_to_metric_families(text.decode())}


MAIN = registry(3, 1, [0.05, 0.5], {"250": 4})
WORKER = registry(5, 2, [2.0], {"250": 6, "550": 1})


def test_two_registries_are_summed():
    merged = samples(merge_expositions([generate_latest(MAIN), generate_latest(WORKER)]))
    assert merged[("t_connections_total", ())] == 8
    assert merged[("t_connections_open", ())] == 3
    assert merged[("t_replies_total", (("code", "250"),))] == 10
    assert merged[("t_replies_total", (("code", "550"),))] == 1  # only the worker has it
    local = (("kind", "local"),)
    assert merged[("t_latency_seconds_bucket", (("kind", "local"), ("le", "0.1")))] == 1
    assert merged[("t_latency_seconds_bucket", (("kind", "local"), ("le", "1.0")))] == 2
    assert merged[("t_latency_seconds_bucket", (("kind", "local"), ("le", "+Inf")))] == 3
    assert merged[("t_latency_seconds_count", local)] == 3
    assert merged[("t_latency_seconds_sum", local)] == 2.55


def test_created_timestamps_are_dropped():
    text = merge_expositions([generate_latest(MAIN), generate_latest(WORKER)])
    assert b"_created" not in text
    assert not any(name.endswith("_created") for name, _ in samples(text))
    # ... but not a gauge that merely has that name.
    reg = CollectorRegistry()
    Gauge("t_files_created", "Files made", registry=reg).set(4)
    assert samples(merge_expositions([generate_latest(reg)] * 2)) == {
        ("t_files_created", ()): 8}


def test_type_and_help_kept_and_families_of_one_text_kept():
    only = CollectorRegistry()
    Gauge("t_worker_only", "Only in the worker", registry=only).set(7)
    Counter("t_unused", "Labelled, never used", ["code"], registry=only)
    text = merge_expositions([generate_latest(MAIN), generate_latest(only)])
    kinds = families(text)
    assert kinds["t_connections"] == ("counter", "Connections")
    assert kinds["t_latency_seconds"] == ("histogram", "Latency")
    assert kinds["t_worker_only"] == ("gauge", "Only in the worker")
    assert kinds["t_unused"] == ("counter", "Labelled, never used")  # no samples, still there
    merged = samples(text)
    assert merged[("t_worker_only", ())] == 7
    assert merged[("t_connections_total", ())] == 3


def test_single_input_round_trips():
    original = generate_latest(MAIN)
    expected = {key: value for key, value in samples(original).items()
                if not key[0].endswith("_created")}
    merged = merge_expositions([original])
    assert samples(merged) == expected
    assert families(merged) == {name: kind for name, kind in families(original).items()
                                if not name.endswith("_created")}
    assert merge_expositions([merged]) == merged


async def http_metrics(port: int) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


async def scrape_with(extra) -> tuple[str, dict]:
    """Start a MetricsServer with ``extra``, scrape it once over HTTP, stop it: the status
    line and the samples."""
    server = MetricsServer(MAIN, "127.0.0.1", 0, extra=extra)
    await server.start()
    try:
        status, body = await http_metrics(server.addresses()[0][1])
    finally:
        await server.stop()
    return status, samples(body)


async def test_server_serves_the_sum_of_main_and_extra():
    async def extra() -> list[bytes]:
        return [generate_latest(WORKER)]

    status, merged = await scrape_with(extra)
    assert status.split()[1] == "200"
    assert merged[("t_connections_total", ())] == 8
    assert merged[("t_replies_total", (("code", "550"),))] == 1
    assert merged[("t_latency_seconds_count", (("kind", "local"),))] == 3


async def test_server_answers_with_its_own_registry_when_extra_fails(caplog):
    async def extra() -> list[bytes]:
        raise ConnectionRefusedError("worker gone")

    status, merged = await scrape_with(extra)
    assert status.split()[1] == "200"
    assert merged[("t_connections_total", ())] == 3
    assert merged[("t_replies_total", (("code", "250"),))] == 4
    assert "worker gone" in caplog.text


async def test_server_does_not_wait_for_a_slow_extra(monkeypatch):
    monkeypatch.setattr("mailrelay.metrics.REQUEST_TIMEOUT", 0.2)

    async def extra() -> list[bytes]:
        await asyncio.sleep(30)
        return [generate_latest(WORKER)]

    status, merged = await scrape_with(extra)
    assert status.split()[1] == "200"
    assert merged[("t_connections_total", ())] == 3
