"""Issue 17's measurable targets, read from one run of every bench (bench.run_all): each
figure beside its limit, PASS or MISS ("-" when the run did not measure it, "reported"
for the figures the issue asks to see without a limit)."""

from __future__ import annotations

import math
from typing import Any

# Whole-server throughput, end to end, mailrelay/chasquid (issue 17, "Targets").
E2E_TARGETS = (("mx-1KiB", "a", 0.7), ("submit-unsigned-1KiB", "b unsigned", 1.0),
               ("mx-conn-per-msg", "c", 0.7), ("mx-100KiB", "d", 1.0))
CPU_TARGETS = (("mx-1KiB", "a", 2.0), ("mx-conn-per-msg", "c", 2.0))
SIGNED = "submit-signed-1KiB"
SIGN_MIN_RATIO = 0.5  # of openssl's signing rate, at 1 KiB


def target(name: str, value: float | None, op: str, limit: float | None,
           unit: str) -> dict[str, Any]:
    if value is not None and isinstance(value, float) and math.isnan(value):
        value = None
    if op == "report" or limit is None or value is None:
        met = None
    else:
        met = value >= limit if op == "≥" else value <= limit
    return {"target": name, "value": value, "op": op, "limit": limit, "unit": unit,
            "met": met}


def server_targets(server: dict[str, Any] | None) -> list[dict[str, Any]]:
    results = (server or {}).get("results", {})

    def ratio(scenario: str, metric: str, key: str = "ratio_mailrelay_to_chasquid") -> Any:
        return (results.get(scenario, {}).get(key) or {}).get(metric)

    rows = [target(f"{label}: e2e msg/s, mailrelay/chasquid", ratio(name, "e2e_per_s"), "≥",
                   limit, "x") for name, label, limit in E2E_TARGETS]
    rows.append(target("b signed: e2e msg/s, mailrelay/chasquid signing (stock hook)",
                       ratio(SIGNED, "e2e_per_s"), "report", None, "x"))
    rows.append(target("b signed: e2e msg/s, mailrelay/chasquid unsigned",
                       ratio(SIGNED, "e2e_per_s", "ratio_mailrelay_to_chasquid_unsigned"),
                       "report", None, "x"))
    rows += [target(f"{label}: server CPU ms/msg (all processes), mailrelay/chasquid",
                    ratio(name, "server_cpu_ms_per_msg"), "≤", limit, "x")
             for name, label, limit in CPU_TARGETS]
    return rows


def sign_targets(sign: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for algo, result in (sign or {}).get("results", {}).items():
        value = result.get("sizes", {}).get("1KiB", {}).get("ratio_to_openssl")
        rows.append(target(f"DKIM signing {algo} 1 KiB / openssl speed", value, "≥",
                           SIGN_MIN_RATIO, "x"))
    return rows


def queue_targets(queue: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not queue:
        return []
    wanted = queue.get("target", {})
    concurrency, limit = str(wanted.get("concurrency")), wanted.get("min_ratio")
    return [target(f"durable enqueue {size} at c={concurrency} / raw fsync loop",
                   result.get("concurrency", {}).get(concurrency, {}).get("ratio_to_raw"),
                   "≥", limit, "x")
            for size, result in queue.get("results", {}).items()]


def all_targets(sign: dict[str, Any] | None, queue: dict[str, Any] | None,
                server: dict[str, Any] | None,
                footprint: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [*(footprint or {}).get("targets", []), *server_targets(server),
            *sign_targets(sign), *queue_targets(queue)]


def verdict(row: dict[str, Any]) -> str:
    if row["op"] == "report":
        return "reported"
    return "-" if row["met"] is None else ("PASS" if row["met"] else "MISS")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target (issue 17) | figure | limit | |", "|---|---:|---:|---|"]
    for row in rows:
        digits = 2 if row["unit"] in ("x", "s") else 1
        value = "-" if row["value"] is None else f"{row['value']:.{digits}f} {row['unit']}"
        limit = "" if row["limit"] is None else f"{row['op']} {row['limit']:g} {row['unit']}"
        lines.append(f"| {row['target']} | {value} | {limit} | {verdict(row)} |")
    return "\n".join(lines)
