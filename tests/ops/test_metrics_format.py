"""ops/metrics.py writes the Prometheus text format itself: prometheus_client's own
parser reads it back, escapes and all."""

from __future__ import annotations

import math
import threading

from prometheus_client.parser import text_string_to_metric_families

from mailrelay.ops.metrics import Counter, Gauge, Histogram, Registry


def parsed(registry: Registry) -> dict:
    text = registry.exposition().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_counters_gauges_histogram_and_collectors_parse_back():
    registry = Registry()
    hits = Counter("t_hits", "Hits\nby kind \\ with a backslash", ["kind"], registry=registry)
    open_now = Gauge("t_open", "Open now", ["port"], registry=registry)
    plain = Counter("t_plain", "No labels", registry=registry)
    latency = Histogram("t_latency_seconds", "Latency", [0.1, 1.0], registry=registry)
    registry.collectors.append(lambda: [("t_queue", "Queued", 3)])
    hits.labels('a "quoted"\nvalue\\').inc()
    hits.labels("b").inc(2)
    hits.labels("never")  # exists at 0 from the start
    open_now.labels("smtp").inc()
    open_now.labels("smtp").dec()
    plain.labels().inc()
    for value in (0.05, 0.5, 5.0):
        latency.observe(value)

    families = parsed(registry)
    assert families["t_hits"].type == "counter"
    assert families["t_hits"].documentation == "Hits\nby kind \\ with a backslash"
    samples = {(s.name, tuple(s.labels.items())): s.value for f in families.values()
               for s in f.samples}
    assert samples[("t_hits_total", (("kind", 'a "quoted"\nvalue\\'),))] == 1
    assert samples[("t_hits_total", (("kind", "b"),))] == 2
    assert samples[("t_hits_total", (("kind", "never"),))] == 0
    assert samples[("t_open", (("port", "smtp"),))] == 0
    assert samples[("t_plain_total", ())] == 1
    assert samples[("t_queue", ())] == 3
    buckets = {s.labels["le"]: s.value for s in families["t_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 1, "1.0": 2, "+Inf": 3}
    assert samples[("t_latency_seconds_count", ())] == 3
    assert math.isclose(samples[("t_latency_seconds_sum", ())], 5.55)


def test_increments_from_threads_are_not_lost():
    registry = Registry()
    signed = Counter("t_signed", "From threads", ["domain"], registry=registry)

    def work() -> None:
        for _ in range(10_000):
            signed.labels("example.com").inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [sample] = parsed(registry)["t_signed"].samples
    assert sample.value == 40_000
