"""bench.run_all runs the four benches into one directory (the benches faked: each has
its own smoke test), keeps the server bench inside the time budget and puts issue 17's
targets at the top of the summary."""

from __future__ import annotations

import json
from pathlib import Path

from bench import footprint_bench, queue_bench, run_all, server_bench, sign_bench


def test_run_all_writes_every_result(tmp_path, monkeypatch, capsys):
    calls: dict[str, dict] = {}

    def fake_sign(seconds, repeat, **kwargs):
        calls["sign"] = {"seconds": seconds, "repeat": repeat}
        return {"bench": "sign"}

    def fake_queue(directory, seconds, repeat, **kwargs):
        calls["queue"] = {"seconds": seconds, "repeat": repeat}
        return {"bench": "queue"}

    def fake_footprint(work, **kwargs):
        calls["footprint"] = kwargs
        return {"bench": "footprint", "targets": [
            {"target": "idle RSS of serve", "value": 30.0, "op": "≤", "limit": 35.0,
             "unit": "MiB", "met": True}]}

    def fake_footprint_write(report, results: Path, show: bool = True) -> str:
        (results / "footprint.md").write_text("footprint table\n")
        (results / "footprint.json").write_text(json.dumps(report))
        return "footprint table"

    def fake_server(work, **kwargs):
        calls["server"] = kwargs
        return {"bench": "server"}

    def fake_write(report, results: Path, show: bool = True) -> str:
        (results / "server.md").write_text("server table\n")
        (results / "server.json").write_text(json.dumps(report))
        return "server table"

    monkeypatch.setattr(sign_bench, "run_bench", fake_sign)
    monkeypatch.setattr(sign_bench, "table", lambda report: "sign table")
    monkeypatch.setattr(queue_bench, "run_bench", fake_queue)
    monkeypatch.setattr(queue_bench, "table", lambda report: "queue table")
    monkeypatch.setattr(queue_bench, "make_work_dir", lambda parent: (tmp_path / "q", True))
    monkeypatch.setattr(footprint_bench, "run_bench", fake_footprint)
    monkeypatch.setattr(footprint_bench, "write_results", fake_footprint_write)
    monkeypatch.setattr(server_bench, "run_bench", fake_server)
    monkeypatch.setattr(server_bench, "write_results", fake_write)
    results = tmp_path / "results"
    assert run_all.main(["--quick", "--quiet", "--results", str(results)]) == 0

    assert sorted(p.name for p in results.iterdir()) == [
        "footprint.json", "footprint.md", "queue.json", "queue.md", "server.json",
        "server.md", "sign.json", "sign.md", "summary.md"]
    summary = (results / "summary.md").read_text()
    for text in ("sign table", "queue table", "footprint table", "server table", "--quick",
                 "## Targets of issue 17", "| idle RSS of serve | 30.0 MiB | ≤ 35 MiB | PASS |",
                 "| a: e2e msg/s, mailrelay/chasquid | - | ≥ 0.7 x | - |"):
        assert text in summary
    assert summary.index("Targets of issue 17") < summary.index("sign table")
    assert summary in capsys.readouterr().out
    assert calls["sign"]["repeat"] == calls["queue"]["repeat"] == calls["server"]["repeat"] == 1
    # --quick: the footprint's short settings, no lean venv.
    footprint = calls["footprint"]
    assert footprint["repeat"] == 1 and footprint["idle"] == footprint_bench.QUICK["idle"]
    assert footprint["with_venv"] is False
    # A fifth of the messages, and a budget that leaves room for the round in progress.
    assert calls["server"]["scenarios"][0].per_connection == 4
    assert 30 <= calls["server"]["time_budget"] <= 540 - run_all.ROUND_RESERVE
