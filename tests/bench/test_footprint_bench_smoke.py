"""The footprint benchmark still runs: a start, a few submissions and one turn of the
commands for mailrelay (and chasquid, when it is installed and we are root), and its
parts work. No timing is asserted: only that every figure is there and sane."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from bench import footprint_bench, targets

CHASQUID_HERE = (shutil.which("chasquid") is not None and shutil.which("chasquid-util")
                 is not None and os.geteuid() == 0)
TARGET_NAMES = ("idle RSS", "RSS after", "--help", "READY=1", "venv")


def test_notify_socket_sees_ready():
    notify = footprint_bench.NotifySocket()
    try:
        assert not notify.ready(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"STATUS=starting", notify.path)
            assert not notify.ready(0.2)  # a status is not readiness
            sender.sendto(b"READY=1\nSTATUS=serving\nMAINPID=1", notify.path)
            assert notify.ready(1.0)
    finally:
        notify.close()
    assert not os.path.exists(notify.path)


def test_sizes_and_the_venv_key(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "blob").write_bytes(os.urandom(300 * 1024))
    (tmp_path / "small").write_bytes(b"x")
    assert footprint_bench.du_kib(tmp_path) >= 300
    largest = footprint_bench.largest(tmp_path)
    assert largest[0]["name"] == "pkg" and largest[0]["mib"] > 0.25
    dependencies = footprint_bench.runtime_dependencies()
    assert any(d.startswith("cryptography") for d in dependencies)
    assert not any(d.startswith("pytest") for d in dependencies)  # runtime only
    key = footprint_bench.venv_key(dependencies)
    assert key == footprint_bench.venv_key(list(reversed(dependencies)))
    assert key != footprint_bench.venv_key(dependencies[1:])  # a dependency gone: rebuild


def test_run_bench_briefly(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    report = footprint_bench.run_bench(work, repeat=1, starts=1, idle=0.2, settle=0.1,
                                       submissions=10, cli_runs=1, with_venv=False)
    names = ["mailrelay", "chasquid"] if CHASQUID_HERE else ["mailrelay"]
    assert list(report["servers"]) == names
    assert report["submissions"] == 16  # whole batches of 8 connections
    for name in names:
        [start] = report["startup"][name]["runs"]
        assert 0 < start["listening_s"] < 30 and 0 < start["ready_s"] < 30
        assert start["idle_rss_kib"] > 1024 and start["processes"] >= 1
        assert len(start["per_process_rss_kib"]) == start["processes"]
        [after] = report["after"][name]["runs"]
        assert after["accepted"] == after["delivered"] == after["messages"] == 16
        assert after["errors"] == 0, after["error_samples"]
        assert after["rss_kib"] > 1024 and after["peak_rss_kib"] >= after["rss_kib"]
        assert after["pss_kib"] is None or 0 < after["pss_kib"] <= after["rss_kib"]
        assert report["startup"][name]["median"]["idle_rss_kib"] == start["idle_rss_kib"]
    commands = report["cli"]["commands"]
    wanted = ["python -c pass", "mailrelay --help", "mailrelay check", "mailrelay user add"]
    if CHASQUID_HERE:
        wanted += ["chasquid-util --help", "chasquid-util print-config",
                   "chasquid-util user-add"]
        assert report["startup"]["ratio_mailrelay_to_chasquid"]["idle_rss_kib"] > 0
    assert list(commands) == wanted
    for name, entry in commands.items():
        assert entry["failed"] is None, (name, entry["failed"])
        assert entry["median_ms"] > 0 and len(entry["runs_ms"]) == 1
    assert commands["python -c pass"]["ratio_to_python"] == 1.0
    assert report["venv"]["lean"] is None and report["venv"]["why_not"] == "not asked for"
    assert report["serve_from"] == "the bench's venv"
    rows = report["targets"]
    assert [any(word in row["target"] for word in TARGET_NAMES) for row in rows] == [True] * 5
    for row in rows:
        if "venv" in row["target"]:
            assert row["value"] is None and row["met"] is None
        else:
            assert row["value"] > 0 and row["met"] == (row["value"] <= row["limit"])

    results = tmp_path / "results"
    text = footprint_bench.write_results(report, results, show=False)
    assert text.startswith("## Footprint") and "idle RSS" in text and "python -c pass" in text
    assert ("PASS" in text) or ("MISS" in text)
    assert json.loads((results / "footprint.json").read_text())["starts"] == 1
    assert (results / "footprint.md").read_text() == text + "\n"


def test_main_without_chasquid(tmp_path, monkeypatch, capsys):
    calls = {}

    def fake_run(work, **kwargs):
        calls.update(kwargs)
        return footprint_bench.summarise_report({
            "repeat": 1, "starts": 1, "idle": 5.0, "settle": 1.0, "submissions": 200,
            "seconds": 1.0, "servers": {"mailrelay": {"version": "mailrelay test"}},
            "chasquid_absent": "not asked for", "mailrelay_settings": {},
            "serve_from": "the bench's venv",
            "startup": {"mailrelay": {"runs": [
                {"ready_s": 0.3, "listening_s": 0.2, "idle_rss_kib": 30 * 1024,
                 "idle_pss_kib": 20 * 1024, "processes": 1}]}},
            "after": {"mailrelay": {"runs": [
                {"rss_kib": 60 * 1024, "pss_kib": 50 * 1024, "peak_rss_kib": 70 * 1024,
                 "processes": 1, "submit_seconds": 2.0, "accepted": 200, "errors": 0}]}},
            "cli": {"runs": 5, "install": "the bench's venv", "python": "python",
                    "commands": {
                        "python -c pass": {"pair": "python", "runs_ms": [20.0],
                                           "median_ms": 20.0, "ratio_to_python": 1.0,
                                           "failed": None},
                        "mailrelay --help": {"pair": "help", "runs_ms": [50.0],
                                             "median_ms": 50.0, "ratio_to_python": 2.5,
                                             "failed": None}}},
            "venv": {"lean": None, "why_not": "not asked for", "test": None, "chasquid": None},
            "machine": {"cpu": "cpu", "cpus": 2, "python": "3.11"},
            "notes": footprint_bench.notes("not asked for"),
        })

    monkeypatch.setattr(footprint_bench, "run_bench", fake_run)
    results = tmp_path / "results"
    assert footprint_bench.main(["--quick", "--no-chasquid", "--idle", "7", "--quiet",
                                 "--results", str(results)]) == 0
    # --quick's settings, --idle given on top, and no venv made.
    assert calls["repeat"] == 1 and calls["starts"] == 3 and calls["submissions"] == 200
    assert calls["idle"] == 7.0 and calls["with_venv"] is False
    assert calls["with_chasquid"] is False
    report = json.loads((results / "footprint.json").read_text())
    verdicts = {row["target"]: targets.verdict(row) for row in report["targets"]}
    assert list(verdicts.values()) == ["PASS", "MISS", "PASS", "PASS", "-"]
    assert "| MISS |" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--starts", "0"], ["--submissions", "0"]])
def test_main_refuses_empty_measurements(bad):
    with pytest.raises(SystemExit):
        footprint_bench.main(bad)
