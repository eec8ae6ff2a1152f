"""bench.run_all runs the three benches into one directory (the benches faked: each has
its own smoke test) and keeps the server bench inside the time budget."""

from __future__ import annotations

import json
from pathlib import Path

from bench import queue_bench, run_all, server_bench, sign_bench


def test_run_all_writes_every_result(tmp_path, monkeypatch, capsys):
    calls: dict[str, dict] = {}

    def fake_sign(seconds, repeat, **kwargs):
        calls["sign"] = {"seconds": seconds, "repeat": repeat}
        return {"bench": "sign"}

    def fake_queue(directory, seconds, repeat, **kwargs):
        calls["queue"] = {"seconds": seconds, "repeat": repeat}
        return {"bench": "queue"}

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
    monkeypatch.setattr(server_bench, "run_bench", fake_server)
    monkeypatch.setattr(server_bench, "write_results", fake_write)
    results = tmp_path / "results"
    assert run_all.main(["--quick", "--quiet", "--results", str(results)]) == 0

    assert sorted(p.name for p in results.iterdir()) == [
        "queue.json", "queue.md", "server.json", "server.md", "sign.json", "sign.md",
        "summary.md"]
    summary = (results / "summary.md").read_text()
    for text in ("sign table", "queue table", "server table", "--quick"):
        assert text in summary
    assert summary in capsys.readouterr().out
    assert calls["sign"]["repeat"] == calls["queue"]["repeat"] == calls["server"]["repeat"] == 1
    # A fifth of the messages, and a budget that leaves room for the round in progress.
    assert calls["server"]["scenarios"][0].per_connection == 4
    assert 30 <= calls["server"]["time_budget"] <= 540 - run_all.ROUND_RESERVE
