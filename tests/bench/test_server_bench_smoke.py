"""The whole-server benchmark still runs: every scenario for a few messages against
mailrelay (and chasquid, when it is installed and we are root), and its parts work."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, replace

import pytest

from bench import server_bench
from bench.server_bench import Scenario

# Each scenario's shape, with a few messages: 2 connections x 2 (d and b-signed, whose
# chasquid hook takes about a second a message: x 1).
TINY = tuple(replace(s, connections=2, per_connection=1 if s.size > 10_000 or s.signed else 2)
             for s in server_bench.SCENARIOS)
CHASQUID_HERE = (shutil.which("chasquid") is not None and shutil.which("chasquid-util")
                 is not None and os.geteuid() == 0)


@pytest.mark.parametrize("size", [300, 1024, 1025, 100 * 1024, 100 * 1024 + 77])
def test_messages_have_the_size_and_clean_lines(size):
    message = server_bench.make_message(size, "a@sender.invalid", server_bench.USER, 7)
    assert len(message) == size
    assert message.endswith(b"\r\n")
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", message)  # no bare CR or LF
    assert not any(line.startswith(b".") for line in message.split(b"\r\n"))


def test_small_parts():
    assert server_bench.percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert server_bench.percentile([float(n) for n in range(1, 101)], 0.99) == 99.0
    own, children = server_bench.proc_cpu(os.getpid())
    assert own > 0 and children >= 0
    assert server_bench.proc_status_kib(os.getpid()) > 0
    with pytest.raises(ValueError):
        server_bench.check_loopback("10.0.0.1")
    server_bench.check_loopback("127.0.0.153")
    busy, total = server_bench.machine_ticks()
    assert 0 <= busy <= total
    assert server_bench.busy_percent((100, 1000), (150, 1100)) == 50.0
    assert math.isnan(server_bench.busy_percent((busy, total), (busy, total)))  # no time
    base = server_bench.SCENARIOS[0]
    points = server_bench.sweep_scenarios((1, 10, 32), base)
    assert points[1] is base  # the point equal to scenario a is scenario a
    assert [p.connections for p in points] == [1, 10, 32]
    assert points[0].messages == 200 and points[2].per_connection == 7


def check_report(report: dict, scenarios: list[Scenario]) -> None:
    names = list(report["servers"])
    skipped = report["skipped"]
    assert names[0] == "mailrelay"
    assert report["servers"]["mailrelay"]["process"].startswith("mailrelay")  # its own pid
    if "chasquid" in names:
        assert report["servers"]["chasquid"]["process"] == "chasquid"  # not unshare or sh
    assert report["rounds"] == 1
    for scenario in scenarios:
        entry = report["results"][scenario.name]
        for name in names:
            runs = entry[name]["runs"]
            if name in skipped.get(scenario.name, {}):
                assert runs == [] and entry[name]["median"]["accepted"] == 0
                continue
            assert len(runs) == 1
            run = runs[0]
            # Every message was accepted, and the discard MDA counted each one once.
            assert run["messages"] == scenario.messages, (name, scenario.name)
            assert run["accepted"] == run["messages"] == run["delivered"], run
            assert run["errors"] == 0, run["error_samples"]
            assert 0 < run["e2e_per_s"] <= run["accepted_per_s"]
            assert 0 < run["latency_p50_ms"] <= run["latency_p99_ms"]
            assert run["server_cpu_ms_per_msg"] >= 0 and run["mda_cpu_ms_per_msg"] >= 0
            assert 0 <= run["machine_busy_pct"] <= 100
            assert run["peak_rss_kib"] > 1024 and run["peak_rss_per_measurement"]
            assert run["server_processes"] >= 1
            median = entry[name]["median"]
            for metric in (*server_bench.METRICS, "peak_rss_kib", "rss_before_kib"):
                assert median[metric] is not None, metric
            assert median["accepted"] == median["messages"] == median["delivered"]
        if len(names) == 2 and not skipped.get(scenario.name):
            assert entry["ratio_mailrelay_to_chasquid"]["accepted_per_s"] > 0
    sweep = report["sweep"]
    for name in names:
        assert len(sweep[name]["accepted_per_s"]) == len(sweep["connections"])


def test_run_bench_briefly(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    report = server_bench.run_bench(work, repeat=1, scenarios=TINY, sweep=(1, 2),
                                    sweep_messages=4)
    if CHASQUID_HERE:
        assert list(report["servers"]) == ["mailrelay", "chasquid"]
        assert report["chasquid_absent"] is None
        # chasquid's SPF lookups reached its loopback DNS server, and only that.
        assert report["dns_queries"]["chasquid"].get("TXT sender.invalid", 0) > 0
    else:
        assert list(report["servers"]) == ["mailrelay"]
        assert report["chasquid_absent"]
    check_report(report, [*TINY, Scenario(**report["results"]["sweep-1"]["scenario"])])
    assert report["sweep"]["scenarios"] == ["sweep-1", TINY[0].name]  # 2 x 2 is scenario a
    # Equal work in b: nobody signs; in b-signed every server that ran it signed, and the
    # signature verifies against the bench key.
    unsigned, signed = "submit-unsigned-1KiB", "submit-signed-1KiB"
    measured = [n for n in report["servers"] if n not in report["skipped"].get(signed, {})]
    assert report["signatures"][unsigned] == dict.fromkeys(report["servers"], "unsigned")
    assert list(report["signatures"][signed]) == measured
    for found in report["signatures"][signed].values():
        assert found == f"signed d={server_bench.DOMAIN} s={server_bench.SELECTOR}, verified"
    if "chasquid" in measured:
        # b-signed is held against chasquid signing and chasquid unsigned.
        entry = report["results"][signed]
        assert entry["unsigned_reference"] == unsigned
        assert entry["ratio_mailrelay_to_chasquid_unsigned"]["e2e_per_s"] > 0
        # The hook's work shows as reaped children's CPU, not as the server's.
        hook = entry["chasquid"]["median"]["mda_cpu_ms_per_msg"]
        assert hook > report["results"][unsigned]["chasquid"]["median"]["mda_cpu_ms_per_msg"]

    results = tmp_path / "results"
    text = server_bench.write_results(report, results)
    assert "accepted msg/s" in text and "mx-100KiB" in text
    assert "DKIM in the message delivered in submit-signed-1KiB" in text
    assert json.loads((results / "server.json").read_text())["rounds"] == 1
    assert (results / "server.md").read_text().startswith("## Whole server")
    assert (results / "server.png").read_bytes()[:4] == b"\x89PNG"
    # --render redoes the table and the plot from the JSON alone.
    again = tmp_path / "again"
    assert server_bench.main(["--render", str(results / "server.json"),
                              "--results", str(again)]) == 0
    assert (again / "server.md").read_text() == (results / "server.md").read_text()


def test_render_of_a_report_without_machine_busy():
    """Reports written before the busy column render with "-" there."""
    run = {m: 1.0 for m in server_bench.METRICS if m != "machine_busy_pct"}
    run.update(peak_rss_kib=2048, rss_before_kib=1024, messages=4, accepted=4, delivered=4,
               errors=0)
    median = server_bench.summarise([run])
    assert median["machine_busy_pct"] is None and median["accepted_per_s"] == 1.0
    assert server_bench._fmt(median["machine_busy_pct"], 0) == "-"


def test_cpu_is_counted_from_the_clock_start(tmp_path, monkeypatch):
    """Set-up before the clock (AUTH's scrypt) is not in the per-message CPU: the
    snapshot is taken by Load's on_start, after the sessions are open."""
    calls = []
    real_open = server_bench.Load.open

    async def open_and_note(self):
        client = await real_open(self)
        calls.append("open")
        return client

    monkeypatch.setattr(server_bench.Load, "open", open_and_note)
    real_init = server_bench.Load.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        on_start = self.on_start
        self.on_start = lambda: (calls.append("start"), on_start())

    monkeypatch.setattr(server_bench.Load, "__init__", init)
    work = tmp_path / "work"
    work.mkdir()
    scenario = replace(TINY[1], connections=2, per_connection=1)  # b: STARTTLS + AUTH
    server_bench.run_bench(work, repeat=1, with_chasquid=False, scenarios=[scenario],
                           sweep=(), sweep_messages=0)
    # The warm-up (1 connection), then the measurement (2): each opens, then starts.
    assert calls == ["open", "start", "open", "open", "start"]


def test_main_without_chasquid(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(server_bench, "SCENARIOS", TINY[:1])
    monkeypatch.setattr(server_bench, "SWEEP", ())
    results = tmp_path / "results"
    work = tmp_path / "work"
    assert server_bench.main(["--no-chasquid", "--repeat", "1", "--quiet",
                              "--results", str(results), "--dir", str(work)]) == 0
    report = json.loads((results / "server.json").read_text())
    assert list(report["servers"]) == ["mailrelay"]
    assert report["chasquid_absent"] == "not asked for"
    assert report["results"]["mx-1KiB"]["mailrelay"]["median"]["delivered"] == 4
    assert list(work.iterdir()) == []  # its temporary directory is gone
    assert "mx-1KiB" in capsys.readouterr().out


def test_chasquid_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setattr(server_bench.shutil, "which", lambda name: None)
    assert "not installed" in server_bench.chasquid_status(False, print)
    monkeypatch.setattr(server_bench.os, "geteuid", lambda: 1000)
    assert "needs root" in server_bench.chasquid_status(True, print)  # no apt-get as a user
    monkeypatch.setattr(server_bench.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert "needs root" in server_bench.chasquid_status(False, print)  # no private resolv.conf


def test_server_pids_is_the_tree_without_the_helpers():
    """A server's processes are it and its descendants, less the MDA/hook subtrees."""
    marker = f"bench-mda-marker-{os.getpid()}"
    # root sh -> sleep (a "worker"), and sh <marker> -> sleep (an "MDA" and its child).
    root = subprocess.Popen(["sh", "-c", f"sleep 60 & sh -c 'sleep 60; :' {marker} & wait"],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            everything = server_bench.server_pids(root.pid)
            if len(everything) == 4:
                break
            time.sleep(0.02)
        assert len(everything) == 4 and root.pid in everything
        table = server_bench.process_table()
        own = server_bench.server_pids(root.pid, [marker])
        assert root.pid in own and len(own) == 2
        [worker] = [pid for pid in own if pid != root.pid]
        assert table[worker][0] == root.pid and b"sleep" in table[worker][1]
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()


def test_signature_check_verifies_against_the_bench_key():
    import dkim
    from cryptography.hazmat.primitives import serialization

    pem = server_bench.bench_dkim_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    message = server_bench.make_message(1024, server_bench.USER, server_bench.USER, 1)
    header = dkim.sign(message, server_bench.SELECTOR.encode(), server_bench.DOMAIN.encode(),
                       pem, include_headers=[b"from", b"subject"])
    assert server_bench.signature_check(header + message) == (
        f"signed d={server_bench.DOMAIN} s={server_bench.SELECTOR}, verified")
    assert "FAILED" in server_bench.signature_check(header + message + b"tampered\r\n")
    assert server_bench.signature_check(message) == "unsigned"
    assert server_bench.signature_check(None) == "no message kept"
    assert "k=rsa; p=" in server_bench.dkim_txt(server_bench.bench_dkim_key())


def test_b_signed_is_held_against_both_chasquid_figures():
    unsigned, signed = server_bench.SCENARIOS[1], server_bench.SCENARIOS[2]
    assert (unsigned.label, unsigned.signed, unsigned.user) == ("b", False,
                                                                server_bench.PLAIN_USER)
    assert (signed.label, signed.signed, signed.user) == ("b-signed", True, server_bench.USER)

    def median(rate: float) -> dict:
        return {m: rate for m in (*server_bench.METRICS, "peak_rss_kib")}

    results = {
        s.name: {"scenario": asdict(s), "mailrelay": {"median": median(mine)},
                 "chasquid": {"median": median(theirs)}}
        for s, mine, theirs in ((unsigned, 100.0, 200.0), (signed, 80.0, 2.0))}
    assert server_bench.unsigned_twin(results, results[signed.name]) == unsigned.name
    assert server_bench.unsigned_twin(results, results[unsigned.name]) is None
    ours = results[signed.name]["mailrelay"]["median"]
    assert server_bench.ratios(ours, results[signed.name]["chasquid"]["median"])[
        "e2e_per_s"] == 40.0
    assert server_bench.ratios(ours, results[unsigned.name]["chasquid"]["median"])[
        "e2e_per_s"] == 0.4


def test_the_bench_configuration_passes_mailrelay_check(tmp_path):
    import trustme

    dns = server_bench.DNSServer("127.0.0.1", 53)  # not started: only named in the config
    mda = tmp_path / "mda"
    mda.write_text(server_bench.DISCARD_MDA)
    mda.chmod(0o755)
    mailrelay = server_bench.Mailrelay(tmp_path, mda, trustme.CA(), dns)
    mailrelay.configure()
    assert mailrelay.check() is None


@pytest.mark.skipif(not CHASQUID_HERE, reason="chasquid is not installed, or we are not root")
def test_b_signed_without_the_stock_hook_is_skipped_for_chasquid(tmp_path, monkeypatch):
    """Without the hook (or dkimsign) chasquid cannot sign: b-signed runs for mailrelay
    alone and the report says why, rather than holding mailrelay against unsigned mail."""
    monkeypatch.setattr(server_bench, "STOCK_HOOK", tmp_path / "no-such-hook")
    work = tmp_path / "work"
    work.mkdir()
    scenario = replace(server_bench.SCENARIOS[2], connections=1, per_connection=1)
    report = server_bench.run_bench(work, repeat=1, scenarios=[scenario], sweep=(),
                                    sweep_messages=0)
    assert list(report["servers"]) == ["mailrelay", "chasquid"]
    why = report["skipped"][scenario.name]["chasquid"]
    assert "no-such-hook" in why
    entry = report["results"][scenario.name]
    assert entry["chasquid"]["runs"] == [] and len(entry["mailrelay"]["runs"]) == 1
    assert entry["ratio_mailrelay_to_chasquid"] == {}  # nothing to hold mailrelay against
    assert list(report["signatures"][scenario.name]) == ["mailrelay"]
    text = server_bench.table(server_bench.json_safe(report))
    assert f"{scenario.name}: chasquid not measured: chasquid's stock hook" in text
    assert f"| {scenario.name} | chasquid |" not in text
