"""Prometheus /metrics on metrics.listen: scraped over loopback from the running server,
parsed with prometheus_client's own parser, before and after real traffic."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailrelay.message.dkim.keys import generate_key, write_key
from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, USER, free_port

MESSAGE = b"From: me@example.com\r\nSubject: metrics\r\n\r\ncount me\r\n"


class Scrape:
    def __init__(self, text: str):
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in self.families.values() for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        """Summed over all label values."""
        return sum(v for (sample, _), v in self.samples.items() if sample == name)


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert int(headers["content-length"]) == len(body)
    return int(status.split()[1]), headers, body.decode()


async def scrape(port: int) -> Scrape:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), headers
    return Scrape(body)


@pytest.fixture
async def metered(env):
    env.metrics_port = free_port()
    env.write_config(metrics={"listen": f"127.0.0.1:{env.metrics_port}"})
    write_key(env.config_dir / "domains" / "example.com", "m1", generate_key("ed25519"))
    # The name the sink's certificate (from the test CA) is issued for: TLS verifies.
    env.add_mx("remote.test", (10, "mx.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    env.dns.add("nullmx.test", "MX", (0, "."))
    # Nothing listens there: every attempt fails with a temporary error and is retried.
    env.add_mx("down.test", (10, "mx.down.test", "127.0.0.5"))
    await env.start()
    return env


async def wait_for(port: int, check, timeout: float = 15.0) -> Scrape:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        current = await scrape(port)
        if check(current):
            return current
        assert asyncio.get_running_loop().time() < deadline, "metrics did not get there"
        await asyncio.sleep(0.1)


async def test_counters_follow_the_traffic(metered):
    env, port = metered, metered.metrics_port
    before = await scrape(port)
    assert before.value("mailrelay_queue_messages") == 0
    assert before.value("mailrelay_queue_oldest_age_seconds") == 0
    assert before.value("mailrelay_smtp_connections_total", port="submission") == 0
    # Labelled series exist at 0 from the start (rate() and alerts need no first event).
    assert ("mailrelay_auth_total", (("result", "blocked"),)) in before.samples
    for name in ("mailrelay_smtp_commands", "mailrelay_auth", "mailrelay_deliveries",
                 "mailrelay_delivery_latency_seconds", "mailrelay_dkim_signatures",
                 "mailrelay_delivery_tls", "mailrelay_smtp_tls", "mailrelay_dsn_generated"):
        assert name in before.families, name

    # A wrong password on 465.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.ports["submission_tls"], ssl=env.client_tls(),
        server_hostname=HOSTNAME)
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.auth_plain(USER, "not the password"))[0] == 535
    assert (await client.cmd("QUIT"))[0] == 221
    await client.close()

    # A submission delivered to a remote MX, one that bounces (null MX), one deferred.
    await env.submit(["friend@remote.test"], MESSAGE)
    await env.sink.until(1)
    await env.submit(["friend@nullmx.test"], MESSAGE)
    await env.wait_mailbox(1)  # the DSN, delivered locally
    await env.submit(["friend@down.test"], MESSAGE)
    after = await wait_for(port, lambda s: s.value(
        "mailrelay_deliveries_total", result="temporary", final="no", via="mx") >= 1)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("mailrelay_smtp_connections_total", port="submission_tls") == 1
    assert delta("mailrelay_smtp_connections_total", port="submission") == 3
    assert delta("mailrelay_smtp_tls_total", port="submission", version="TLSv1.3") == 3
    assert delta("mailrelay_smtp_tls_total", port="submission_tls", version="TLSv1.3") == 1
    assert delta("mailrelay_auth_total", result="failure") == 1
    assert delta("mailrelay_auth_total", result="success") == 3
    assert delta("mailrelay_smtp_commands_total", verb="AUTH") == 4
    assert delta("mailrelay_smtp_commands_total", verb="DATA") == 3
    assert delta("mailrelay_smtp_commands_total", verb="STARTTLS") == 3
    assert delta("mailrelay_smtp_replies_total", code="535") == 1
    assert delta("mailrelay_smtp_replies_total", code="235") == 3
    assert delta("mailrelay_smtp_replies_total", code="354") == 3
    assert delta("mailrelay_messages_queued_total", port="submission") == 3

    # The mail log's words: result (sent, temporary, permanent), final, via.
    assert delta("mailrelay_deliveries_total", result="sent", final="yes", via="mx") == 1
    assert delta("mailrelay_deliveries_total", result="permanent", final="yes", via="mx") == 1
    assert delta("mailrelay_deliveries_total", result="sent", final="yes", via="local") == 1
    assert delta("mailrelay_dsn_generated_total", kind="failed") == 1
    # The sink has a certificate from the test CA, which delivery trusts (ca_file).
    assert delta("mailrelay_delivery_tls_total", state="verified", version="TLSv1.3") == 1
    assert delta("mailrelay_delivery_latency_seconds_count") == 2  # remote + DSN
    assert after.value("mailrelay_delivery_latency_seconds_bucket", le="+Inf") == 2
    # Three submissions and the DSN, each signed with the domain's one key.
    assert delta("mailrelay_dkim_signatures_total", domain="example.com",
                 algorithm="ed25519-sha256") == 4

    # Queue gauges are computed at scrape time: the deferred message is still there.
    assert after.value("mailrelay_queue_messages") == 1
    assert after.value("mailrelay_queue_recipients") == 1
    assert 0 < after.value("mailrelay_queue_oldest_age_seconds") < 60

    # A refused RCPT is counted by command and code.
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["smtp"])
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<someone@remote.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<nobody@example.com>"))[0] == 550
    assert (await client.cmd("QUIT"))[0] == 221
    await client.close()
    last = await scrape(port)
    assert (last.value("mailrelay_smtp_rejections_total", command="RCPT", code="550")
            - before.value("mailrelay_smtp_rejections_total", command="RCPT", code="550")) == 1
    assert last.value("mailrelay_smtp_connections_total", port="smtp") == 1


async def test_only_metrics_is_served_and_it_stops_with_the_server(metered):
    port = metered.metrics_port
    status, _, _ = await http_get(port, "/")
    assert status == 404
    status, _, _ = await http_get(port, "/metrics?x=1")
    assert status == 200
    await metered.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_no_metrics_listener_unless_configured(relay):
    assert relay.server.metrics is None
