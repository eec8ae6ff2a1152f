"""SMTP worker processes: sessions in children, delivery, metrics and the queue in the main
process, and what happens when either side dies."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.server_bench import worker_pids
from mailrelay.errors import ConfigError
from mailrelay.queue import Queue
from mailrelay.workers import Channel, channel_pair
from tests.support.client import RawSMTP
from tests.support.process import start_server
from tests.support.relay import PASSWORD, USER, free_port
from tests.support.sink import SinkBehaviour

MESSAGE = b"From: me@example.com\r\nTo: friend@remote.test\r\nSubject: w\r\n\r\nHello.\r\n"
INBOUND = b"From: alice@sender.test\r\nSubject: in\r\n\r\nHi.\r\n"


async def until(condition, timeout: float = 20.0, step: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(step)


async def send_inbound(env, recipients=(USER,), message: bytes = INBOUND) -> int:
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    code = await client.send_message("alice@sender.test", list(recipients), message)
    await client.close()
    return code


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    response = await reader.read()
    writer.close()
    body = response.split(b"\r\n\r\n", 1)[1].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.fixture
async def workers(env):
    """A started server with one SMTP worker; remote.test's MX is a sink."""
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    env.metrics_port = free_port()
    env.write_config(workers=1, metrics={"listen": f"127.0.0.1:{env.metrics_port}"})
    await env.start()
    return env


async def test_sessions_run_in_the_worker_and_mail_flows_both_ways(workers):
    env = workers
    server = env.server
    assert server.listeners is None, "the main process serves no SMTP itself"
    [pid] = server.workers.pids()
    assert pid != os.getpid() and worker_pids(os.getpid()) == [pid]
    await env.submit(["friend@remote.test"], MESSAGE)  # 587: STARTTLS, AUTH
    assert await send_inbound(env) == 250
    [sent] = await env.sink.until(1)
    assert b"Hello." in sent.data and sent.tls
    [stored] = await env.wait_mailbox(1)
    assert b"Hi." in stored
    await env.wait_queue_empty()


async def test_metrics_of_the_worker_are_merged_into_the_main_endpoint(workers):
    env = workers
    before = await scrape(env.metrics_port)
    await env.submit(["friend@remote.test"], MESSAGE)
    assert await send_inbound(env) == 250
    await env.sink.until(1)
    await env.wait_mailbox(1)
    await env.wait_queue_empty()
    after = await scrape(env.metrics_port)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    # Counted in the worker (sessions) and in the main process (deliveries).
    assert moved("mailrelay_messages_queued_total", port="submission") == 1
    assert moved("mailrelay_messages_queued_total", port="smtp") == 1
    assert moved("mailrelay_smtp_connections_total", port="smtp") == 1
    assert moved("mailrelay_auth_total", result="success") == 1
    assert moved("mailrelay_deliveries_total", result="delivered", via="remote") == 1
    assert moved("mailrelay_deliveries_total", result="delivered", via="local") == 1


async def test_a_killed_worker_is_replaced_and_its_unreported_mail_is_delivered(workers):
    env = workers
    [old] = env.server.workers.pids()
    # What a worker leaves when it dies between its fsync and its report: a committed
    # queue file the main process has not heard of, and a half-written temporary file.
    orphan_queue = Queue(env.data_dir / "queue")
    orphan = await orphan_queue.put("alice@sender.test", [USER], b"Subject: orphan\r\n\r\nx\r\n")
    half = env.data_dir / "queue" / f".{orphan.id}x.msg.tmp{old}"
    half.write_bytes(b"MAILRELAY1 {")
    os.kill(old, signal.SIGKILL)
    [stored] = await env.wait_mailbox(1)
    assert b"Subject: orphan" in stored
    assert not half.exists()
    new = await until(lambda: [p for p in env.server.workers.pids() if p != old])
    assert new and old not in worker_pids(os.getpid())
    assert await send_inbound(env) == 250, "the replacement serves the same ports"
    await env.wait_mailbox(2)


async def test_reload_reaches_the_worker(workers):
    env = workers
    env.add_user("new@example.com", "new password")
    env.server.signal_workers(signal.SIGHUP)

    async def login() -> int:
        client = await RawSMTP.connect("127.0.0.1", env.ports["submission"])
        await client.cmd("EHLO client.test")
        await client.starttls(env.client_tls(), "mail.example.com")
        await client.cmd("EHLO client.test")
        code, _ = await client.auth_plain("new@example.com", "new password")
        await client.close()
        return code

    deadline = asyncio.get_running_loop().time() + 10
    while (code := await login()) != 235 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    assert code == 235


async def test_the_queue_limit_holds_across_processes(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    env.sink.behaviour = SinkBehaviour(data="451 4.3.0 try later")
    env.write_config(workers=1, limits={"max_queue_items": 2},
                     delivery={"retry_intervals": ["1h"]})
    await env.start()
    for _ in range(2):
        await env.submit(["friend@remote.test"], MESSAGE)
    await until(lambda: len(env.server.queue.items) == 2)
    await asyncio.sleep(1.2)  # the main process reports the queue's size twice a second
    client = await RawSMTP.connect("127.0.0.1", env.ports["submission"])
    await client.cmd("EHLO client.test")
    await client.starttls(env.client_tls(), "mail.example.com")
    await client.cmd("EHLO client.test")
    assert (await client.auth_plain(USER, PASSWORD))[0] == 235
    code, lines = await client.cmd(f"MAIL FROM:<{USER}>")
    assert code == 452 and "storage" in lines[0]
    await client.close()


async def test_stop_lets_the_worker_finish_and_exit(workers):
    env = workers
    [pid] = env.server.workers.pids()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    await client.cmd("MAIL FROM:<alice@sender.test>")
    await client.cmd(f"RCPT TO:<{USER}>")
    assert (await client.cmd("DATA"))[0] == 354
    stopping = asyncio.ensure_future(env.stop())
    await asyncio.sleep(0.3)
    # The transaction in flight completes, and its message is delivered before the stop.
    client.writer.write(INBOUND + b".\r\n")
    code, _ = await client.reply()
    assert code == 250
    await client.close()
    await asyncio.wait_for(stopping, 40)
    assert not Path(f"/proc/{pid}").exists() or pid not in worker_pids(os.getpid())
    assert len(env.mailbox()) == 1


async def test_workers_die_with_a_killed_main_process_and_a_restart_gets_the_ports(env):
    env.write_config(workers=1)
    server = await start_server(env)
    try:
        [worker] = await until(lambda: worker_pids(server.pid))
        assert await send_inbound(env) == 250
        server.send_signal(signal.SIGKILL)
        await server.wait()
        await until(lambda: not Path(f"/proc/{worker}/cmdline").exists()
                    or not Path(f"/proc/{worker}/cmdline").read_bytes(), timeout=5)
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    server = await start_server(env)
    try:
        assert await send_inbound(env) == 250
        await env.wait_mailbox(2)
    finally:
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 40) == 0


async def test_reports_wait_in_order_when_the_channel_is_full():
    ours, theirs = channel_pair()
    got: list[bytes] = []
    sender = Channel(ours, lambda m: None, lambda: None)
    # Far more than the socket buffers hold while nobody reads.
    sent = [f"queued {n:020d}".encode() * 300 for n in range(3000)]
    assert all(sender.send(message) for message in sent)
    assert sender._backlog, "the socket should have been full"
    theirs.setblocking(False)
    receiver = Channel(theirs, got.append, lambda: None)
    await sender.drain(timeout=10)
    await until(lambda: len(got) == len(sent), timeout=10)
    assert got == sent
    sender.close()
    await until(lambda: receiver.closed, timeout=5)


@pytest.mark.parametrize("workers", [0, 1], ids=["one-process", "smtp-worker"])
async def test_an_address_in_use_is_one_clear_error_and_nothing_is_left_open(
        env, monkeypatch, workers):
    monkeypatch.setattr("mailrelay.workers.BIND_RETRY_TIME", 0.3)
    env.write_config(workers=workers)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", env.ports["submission"]))
    squatter.listen()
    try:
        with pytest.raises(ConfigError) as caught:
            await env.start()
    finally:
        squatter.close()
    assert str(caught.value).startswith(f"cannot listen on 127.0.0.1:{env.ports['submission']}")
    env.server = None
    # The port bound before the failing one was given back: a start now works.
    await env.start()
    assert await send_inbound(env) == 250
