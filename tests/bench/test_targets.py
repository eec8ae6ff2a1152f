"""Issue 17's targets are read from the benches' reports: PASS, MISS, "-" when the run
did not measure a figure, "reported" for figures without a limit."""

from __future__ import annotations

from bench import targets


def server_report(ratios: dict[str, tuple[float, float]]) -> dict:
    """scenario -> (e2e ratio, server CPU ratio)."""
    results = {name: {"ratio_mailrelay_to_chasquid": {"e2e_per_s": e2e,
                                                     "server_cpu_ms_per_msg": cpu}}
               for name, (e2e, cpu) in ratios.items()}
    results[targets.SIGNED]["ratio_mailrelay_to_chasquid_unsigned"] = {"e2e_per_s": 0.6}
    return {"results": results}


def test_server_targets():
    report = server_report({"mx-1KiB": (0.75, 2.5), "submit-unsigned-1KiB": (0.99, 1.0),
                            "mx-conn-per-msg": (0.7, 1.9), "mx-100KiB": (1.2, 1.0),
                            targets.SIGNED: (40.0, 0.5)})
    rows = {row["target"]: row for row in targets.server_targets(report)}
    verdicts = {name: targets.verdict(row) for name, row in rows.items()}
    assert verdicts == {
        "a: e2e msg/s, mailrelay/chasquid": "PASS",
        "b unsigned: e2e msg/s, mailrelay/chasquid": "MISS",
        "c: e2e msg/s, mailrelay/chasquid": "PASS",  # the limit itself passes
        "d: e2e msg/s, mailrelay/chasquid": "PASS",
        "b signed: e2e msg/s, mailrelay/chasquid signing (stock hook)": "reported",
        "b signed: e2e msg/s, mailrelay/chasquid unsigned": "reported",
        "a: server CPU ms/msg (all processes), mailrelay/chasquid": "MISS",
        "c: server CPU ms/msg (all processes), mailrelay/chasquid": "PASS",
    }
    assert rows["b signed: e2e msg/s, mailrelay/chasquid unsigned"]["value"] == 0.6


def test_missing_figures_are_not_verdicts():
    rows = targets.all_targets(None, None, {"results": {}}, None)
    assert rows and all(targets.verdict(row) in ("-", "reported") for row in rows)
    assert targets.verdict(targets.target("x", float("nan"), "≥", 1.0, "x")) == "-"


def test_sign_and_queue_targets_and_the_table():
    sign = {"results": {"rsa2048": {"sizes": {"1KiB": {"ratio_to_openssl": 0.55}}},
                        "ed25519": {"sizes": {"1KiB": {"ratio_to_openssl": 0.4}}}}}
    queue = {"target": {"concurrency": 64, "min_ratio": 1.0},
             "results": {"1KiB": {"concurrency": {"64": {"ratio_to_raw": 1.3}}},
                         "100KiB": {"concurrency": {"64": {"ratio_to_raw": 0.9}}}}}
    rows = targets.sign_targets(sign) + targets.queue_targets(queue)
    assert [targets.verdict(row) for row in rows] == ["PASS", "MISS", "PASS", "MISS"]
    text = targets.table(rows)
    assert "| DKIM signing rsa2048 1 KiB / openssl speed | 0.55 x | ≥ 0.5 x | PASS |" in text
    assert "| durable enqueue 100KiB at c=64 / raw fsync loop | 0.90 x | ≥ 1 x | MISS |" in text
