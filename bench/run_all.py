"""All the benchmarks, one command, one results directory.

    .venv/bin/python -m bench.run_all [--results DIR] [--repeat R] [--quick] [--no-chasquid]
                                      [--idle S] [--no-venv]

Runs, in this order, the DKIM signing bench (bench.sign_bench), the durable-queue bench
(bench.queue_bench), the footprint bench (bench.footprint_bench: memory, start-up,
command start, install size) and the whole-server bench against chasquid
(bench.server_bench), and writes into DIR (default bench/results/<UTC timestamp>/, which
git ignores):

    summary.md                    issue 17's targets (PASS/MISS), then the four tables,
                                  with the command and the version
    sign.md, sign.json            DKIM signing rate next to `openssl speed`
    queue.md, queue.json          enqueue rate next to a raw fsync loop
    footprint.md, footprint.json  memory, start-up, command start, venv size, and chasquid's
    server.md, server.json        mailrelay and chasquid per scenario, and the ratio
    server.png                    throughput against concurrency, both servers

Bounded in count and time: every measurement has a fixed length or message count; the
footprint bench starts no new round after FOOTPRINT_SHARE of --budget, and the server
bench none once the whole run has used --budget seconds minus a reserve for the round in
progress. --quick is a one-round look with shorter measurements and no lean venv.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import footprint_bench, queue_bench, server_bench, sign_bench, targets

ROUND_RESERVE = 120.0  # seconds: what one server-bench round may take on a busy machine
FOOTPRINT_SHARE = 0.4  # of --budget: the footprint bench starts no round after that


def save(results: Path, stem: str, report: dict[str, Any], text: str) -> None:
    (results / f"{stem}.md").write_text(text + "\n")
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, metavar="DIR",
                        help="results directory (default bench/results/<UTC timestamp>/)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each bench (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="one round, short measurements, a fifth of the messages")
    parser.add_argument("--budget", type=float, default=540.0, metavar="SECONDS",
                        help="whole run's time budget (default 540)")
    parser.add_argument("--no-chasquid", action="store_true", help="server bench: mailrelay only")
    parser.add_argument("--install-chasquid", action="store_true",
                        help="server bench: apt-get install chasquid if missing (root only)")
    parser.add_argument("--idle", type=float, metavar="SECONDS",
                        help="footprint: idle time after the submissions (default 20, "
                             "--quick 5)")
    parser.add_argument("--no-venv", action="store_true",
                        help="footprint: do not make the lean server venv")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    repeat = 1 if args.quick else args.repeat
    seconds = 0.3 if args.quick else 1.0
    scale = 0.2 if args.quick else 1.0
    results = args.results or server_bench.default_results_dir()
    results.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - start:5.0f}s] {text}", file=sys.stderr, flush=True)

    progress("DKIM signing bench")
    sign = sign_bench.run_bench(seconds, repeat, with_openssl=shutil.which("openssl") is not None,
                                dkimpy_seconds=min(2.0, seconds * 2), log=progress)
    sign_text = sign_bench.table(sign)
    save(results, "sign", sign, sign_text)

    progress("queue bench")
    directory, same_fs = queue_bench.make_work_dir(None)
    try:
        queue = queue_bench.run_bench(directory, seconds, repeat, warmup=min(0.1, seconds / 5),
                                      log=progress)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    queue["same_filesystem_as_default_data_dir"] = same_fs
    queue_text = queue_bench.table(queue)
    save(results, "queue", queue, queue_text)

    progress("footprint bench")
    settings = dict(footprint_bench.QUICK if args.quick else footprint_bench.DEFAULTS)
    settings["repeat"] = repeat
    if args.idle is not None:
        settings["idle"] = args.idle
    with tempfile.TemporaryDirectory(prefix="mailrelay-footprint-bench-") as work:
        footprint = footprint_bench.run_bench(
            Path(work), **settings, with_venv=not (args.quick or args.no_venv),
            with_chasquid=not args.no_chasquid, install_chasquid=args.install_chasquid,
            time_budget=args.budget * FOOTPRINT_SHARE, log=progress)
    footprint_text = footprint_bench.write_results(footprint, results, show=False)

    progress("server bench")
    budget = max(30.0, args.budget - (time.monotonic() - start) - ROUND_RESERVE)
    scenarios = [replace(s, per_connection=max(1, round(s.per_connection * scale)))
                 for s in server_bench.SCENARIOS]
    with tempfile.TemporaryDirectory(prefix="mailrelay-server-bench-") as work:
        server = server_bench.run_bench(
            Path(work), repeat=repeat, with_chasquid=not args.no_chasquid,
            install_chasquid=args.install_chasquid, scenarios=scenarios,
            sweep_messages=max(1, round(server_bench.SWEEP_MESSAGES * scale)),
            time_budget=budget, log=progress)
    server_text = server_bench.write_results(server, results, show=False)

    elapsed = time.monotonic() - start
    command = " ".join(["python -m bench.run_all", *(argv if argv is not None else sys.argv[1:])])
    summary = "\n".join([
        f"# mailrelay benchmarks, {server_bench.git_version()}", "",
        f"`{command}`, {elapsed:.0f} s.", "",
        "## Targets of issue 17", "",
        targets.table(targets.all_targets(sign, queue, server, footprint)), "",
        "## DKIM signing (bench.sign_bench)", "", "```", sign_text, "```", "",
        "## Durable enqueue (bench.queue_bench)", "", "```", queue_text, "```", "",
        footprint_text, "",
        server_text, "", "![throughput against concurrency](server.png)", ""])
    (results / "summary.md").write_text(summary)
    print(summary)
    progress(f"results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
