"""All the benchmarks, one command, one results directory.

    .venv/bin/python -m bench.run_all [--results DIR] [--repeat R] [--quick] [--no-chasquid]

Runs, in this order, the DKIM signing bench (bench.sign_bench), the durable-queue bench
(bench.queue_bench) and the whole-server bench against chasquid (bench.server_bench), and
writes into DIR (default bench/results/<UTC timestamp>/, which git ignores):

    summary.md                    the three tables, with the command and the version
    sign.md, sign.json            DKIM signing rate next to `openssl speed`
    queue.md, queue.json          enqueue rate next to a raw fsync loop
    server.md, server.json        mailrelay and chasquid per scenario, and the ratio
    server.png                    throughput against concurrency, both servers

Bounded in count and time: every measurement has a fixed length or message count, and
the server bench starts no new round once the whole run has used --budget seconds minus
a reserve for the round in progress; by default the run takes about 2.5 minutes on a
2-core machine and stays under 10. --quick is a one-round look in under a minute.
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

from bench import queue_bench, server_bench, sign_bench

ROUND_RESERVE = 120.0  # seconds: what one server-bench round may take on a busy machine


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
        "## DKIM signing (bench.sign_bench)", "", "```", sign_text, "```", "",
        "## Durable enqueue (bench.queue_bench)", "", "```", queue_text, "```", "",
        server_text, "", "![throughput against concurrency](server.png)", ""])
    (results / "summary.md").write_text(summary)
    print(summary)
    progress(f"results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
