"""Durable enqueue throughput of mailrelay's queue, next to a naive one-file-per-message spool.

    .venv/bin/python -m bench.queue_bench [--seconds N] [--repeat R] [--json PATH] [--dir DIR]

"Ours" is the exact accept path of the server: ``Queue(directory).put(sender, recipients,
chunks, meta)``, which writes one file, fsyncs it, renames it into place and shares the
directory fsync between concurrent callers (group commit). N asyncio tasks put messages
in a loop for the length of a measurement (N = 1, 16, 64), as N SMTP sessions would.

"Raw" is the reference a naive spool pays: one writer, in a plain loop (no asyncio, no
threads), doing create + write + fsync + close + rename + directory fsync per message.

Both write the same bytes (envelope line + message, 1 KiB and 100 KiB messages) into the
same directory, measured in turns (ours c=1, raw, ours c=16, raw, ours c=64, raw, ...)
for several rounds; the medians are reported, because the cost of an fsync drifts with
whatever else the disk is doing. The queue files are removed between measurements
(outside the timed part) and the removal is made durable, so no measurement pays for the
previous one's clean-up. The project's target: ours at concurrency 64 >= 1.0x raw.

The directory is a fresh temporary one on the filesystem of the default data directory
(/var/lib/mailrelay, or its nearest existing parent), or inside --dir; it is removed at
the end. fsync cost depends on the filesystem, so the machine line names it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import emit
from mailrelay import queue as queue_module
from mailrelay.fsutil import write_all
from mailrelay.queue import MAGIC, Queue, Recipient

SIZES = {"1KiB": 1024, "100KiB": 100 * 1024}
CONCURRENCIES = (1, 16, 64)
TARGET_CONCURRENCY = 64
TARGET_RATIO = 1.0
DEFAULT_DATA_DIR = Path("/var/lib/mailrelay")  # mailrelay.config's default data_dir

SENDER = "jane@example.com"
RECIPIENTS = ("john@remote.test", "team@remote.test")
META = {"client_ip": "192.0.2.10", "helo": "client.example.com", "user": "jane@example.com"}
_HEADER = (
    b"From: Jane Example <jane@example.com>\r\nTo: John Remote <john@remote.test>\r\n"
    b"Cc: team@remote.test\r\nSubject: Quarterly numbers\r\n"
    b"Date: Mon, 01 Jan 2024 09:30:00 +0000\r\nMessage-ID: <20240101093000.12345@example.com>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
)
_BASE64_LINE = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
_RECEIVED = (b"Received: from client.example.com (client.example.com [192.0.2.10])\r\n"
             b"\tby mail.example.com (mailrelay) with ESMTPSA id 018c2a3b4c5d0123456789\r\n"
             b"\tfor <john@remote.test>; Mon, 01 Jan 2024 09:30:01 +0000\r\n")


def make_message(size: int) -> bytes:
    """A message body of exactly ``size`` bytes (headers, then base64 lines)."""
    body = _HEADER + _BASE64_LINE * max(0, (size - len(_HEADER)) // len(_BASE64_LINE) + 1)
    return body[:size - 2] + b"\r\n"


def make_chunks(size: int) -> list[bytes]:
    """What the server hands to ``put``: the Received header it adds, then the body."""
    return [_RECEIVED, make_message(size - len(_RECEIVED))]


def raw_payload(chunks: list[bytes]) -> list[bytes]:
    """The same bytes ``put`` writes: an envelope line like the queue's, then the chunks."""
    envelope = {"id": "0" * 22, "sender": SENDER,
                "recipients": [{"address": r, "params": {}} for r in RECIPIENTS],
                "created": time.time(), "meta": META}
    return [MAGIC + json.dumps(envelope, separators=(",", ":")).encode() + b"\n", *chunks]


# -- measurements -----------------------------------------------------------------------


def clear_directory(directory: Path) -> int:
    """Remove every file in ``directory`` and make that durable (outside the timed part,
    so the next measurement does not commit this one's unlinks). Returns the count."""
    count = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                count += 1
    queue_module.fsync_dir(directory)
    return count


@contextlib.contextmanager
def counting_dir_fsyncs() -> Iterator[list[int]]:
    """Count the directory fsyncs the queue's group commit issues (one list element)."""
    original = queue_module.fsync_dir
    counter = [0]

    def counted(path: Path | str) -> None:
        counter[0] += 1
        original(path)

    queue_module.fsync_dir = counted  # the group commit looks the name up at call time
    try:
        yield counter
    finally:
        queue_module.fsync_dir = original


async def _put_loop(queue: Queue, concurrency: int, chunks: list[bytes],
                    seconds: float) -> tuple[int, float]:
    """``concurrency`` tasks putting messages until ``seconds`` have passed; returns the
    number of messages stored and the time until the last one was durable."""
    start = time.perf_counter()
    deadline = start + seconds
    counts = [0] * concurrency

    async def session(number: int) -> None:
        while time.perf_counter() < deadline:
            await queue.put(SENDER, [Recipient(r) for r in RECIPIENTS], chunks, META)
            counts[number] += 1

    await asyncio.gather(*(session(n) for n in range(concurrency)))
    return sum(counts), time.perf_counter() - start


def ours_rate(directory: Path, concurrency: int, chunks: list[bytes], seconds: float,
              warmup: float = 0.1) -> tuple[float, float]:
    """Messages per second through ``Queue.put`` at ``concurrency``, and the directory
    fsyncs per message (1.0 = no group commit, lower = shared)."""

    async def measure() -> tuple[int, float, int]:
        # Warm up in the same loop, so the queue's commit thread exists before timing.
        await _put_loop(Queue(directory), concurrency, chunks, warmup)
        clear_directory(directory)
        queue = Queue(directory)
        with counting_dir_fsyncs() as dir_fsyncs:
            count, elapsed = await _put_loop(queue, concurrency, chunks, seconds)
        return count, elapsed, dir_fsyncs[0]

    count, elapsed, dir_fsyncs = asyncio.run(measure())
    clear_directory(directory)
    return count / elapsed, dir_fsyncs / count


def raw_rate(directory: Path, payload: list[bytes], seconds: float) -> float:
    """Messages per second of one writer doing, per message: create, write, fsync,
    close, rename, directory fsync. The directory stays open (the cheapest honest way)."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        number = 0

        def one() -> None:
            nonlocal number
            number += 1
            name = f"{number:012d}raw.msg"
            tmp = directory / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                for chunk in payload:
                    write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, directory / name)
            os.fsync(dir_fd)

        one()  # warm up
        clear_directory(directory)
        count = 0
        start = time.perf_counter()
        deadline = start + seconds
        now = start
        while now < deadline:
            one()
            count += 1
            now = time.perf_counter()
        return count / (now - start)
    finally:
        os.close(dir_fd)
        clear_directory(directory)


# -- the whole run ----------------------------------------------------------------------


def run_bench(directory: Path, seconds: float = 1.0, repeat: int = 3,
              concurrencies: tuple[int, ...] | None = None,
              sizes: dict[str, int] | None = None, warmup: float = 0.1,
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure in ``directory`` (an existing, empty directory, which is left empty)."""
    sizes = dict(SIZES if sizes is None else sizes)
    concurrencies = CONCURRENCIES if concurrencies is None else concurrencies
    chunks = {name: make_chunks(size) for name, size in sizes.items()}
    ours_runs = {s: {c: [] for c in concurrencies} for s in sizes}
    fsync_runs = {s: {c: [] for c in concurrencies} for s in sizes}
    raw_runs: dict[str, list[float]] = {s: [] for s in sizes}
    paired: dict[str, dict[int, list[float]]] = {s: {c: [] for c in concurrencies} for s in sizes}
    for round_ in range(repeat):
        for size in sizes:
            for concurrency in concurrencies:
                rate, per_message = ours_rate(directory, concurrency, chunks[size], seconds,
                                              warmup)
                ours_runs[size][concurrency].append(rate)
                fsync_runs[size][concurrency].append(per_message)
                log(f"round {round_ + 1}: ours {size} c={concurrency}: {rate:.0f}/s "
                    f"({per_message:.2f} dir fsyncs/msg)")
                raw = raw_rate(directory, raw_payload(chunks[size]), seconds)
                raw_runs[size].append(raw)
                paired[size][concurrency].append(rate / raw)
                log(f"round {round_ + 1}: raw  {size}: {raw:.0f}/s")
    results: dict[str, Any] = {}
    for size in sizes:
        raw_median = statistics.median(raw_runs[size])
        results[size] = {"bytes": sizes[size], "raw_per_s": raw_median,
                         "raw_runs": raw_runs[size], "concurrency": {}}
        for concurrency in concurrencies:
            median = statistics.median(ours_runs[size][concurrency])
            results[size]["concurrency"][str(concurrency)] = {
                "ours_per_s": median, "runs": ours_runs[size][concurrency],
                "ratio_to_raw": median / raw_median,
                # each run over the raw run right after it: robust to slow drift
                "paired_ratios": paired[size][concurrency],
                "dir_fsyncs_per_message": statistics.median(fsync_runs[size][concurrency]),
            }
    target: dict[str, Any] = {"concurrency": TARGET_CONCURRENCY, "min_ratio": TARGET_RATIO,
                              "met": None}
    if TARGET_CONCURRENCY in concurrencies:
        target["met"] = {
            size: results[size]["concurrency"][str(TARGET_CONCURRENCY)]["ratio_to_raw"]
            >= TARGET_RATIO for size in sizes}
    return {"seconds": seconds, "repeat": repeat, "directory": str(directory),
            "machine": machine(directory), "results": results, "target": target}


# -- where, and on what -----------------------------------------------------------------


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_of(path: Path, mounts: str | None = None) -> dict[str, str] | None:
    """The /proc/mounts entry whose mount point holds ``path`` (the longest match)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: dict[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = _unescape_mount(fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best["mount_point"])):
            best = {"device": _unescape_mount(fields[0]), "mount_point": point,
                    "type": fields[2], "options": fields[3]}
    return best


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def make_work_dir(parent: Path | None) -> tuple[Path, bool]:
    """A fresh temporary directory: inside ``parent`` if given, else on the filesystem of
    the default data directory. Returns it, and whether that filesystem was matched."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="queue-bench-", dir=parent)), True
    anchor = existing_ancestor(DEFAULT_DATA_DIR)
    device = anchor.stat().st_dev
    candidates = [Path(tempfile.gettempdir()), anchor]
    for candidate in candidates:
        if candidate.stat().st_dev == device and os.access(candidate, os.W_OK | os.X_OK):
            return Path(tempfile.mkdtemp(prefix="mailrelay-queue-bench-", dir=candidate)), True
    return Path(tempfile.mkdtemp(prefix="mailrelay-queue-bench-")), False


def machine(directory: Path) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cpus = os.cpu_count() or 1
    return {"cpu": cpu, "cpus": cpus, "kernel": platform.release(),
            "python": platform.python_version(),
            "filesystem": filesystem_of(directory)}


def machine_line(report: dict[str, Any]) -> str:
    info = report["machine"]
    fs = info["filesystem"]
    where = (f"{fs['type']} ({fs['device']} on {fs['mount_point']}, {fs['options']})"
             if fs else "unknown filesystem")
    return (f"machine: {info['cpu']}, {info['cpus']} cpus, Linux {info['kernel']}, "
            f"Python {info['python']}; {report['directory']} on {where}")


def table(report: dict[str, Any]) -> str:
    rows = [f"{'size':>7} {'conc':>5} {'ours msg/s':>11} {'raw msg/s':>10} {'ours/raw':>9} "
            f"{'dir fsyncs/msg':>15}"]
    for size, result in report["results"].items():
        for concurrency, numbers in result["concurrency"].items():
            rows.append(f"{size:>7} {concurrency:>5} {numbers['ours_per_s']:11.0f} "
                        f"{result['raw_per_s']:10.0f} {numbers['ratio_to_raw']:8.2f}x "
                        f"{numbers['dir_fsyncs_per_message']:15.2f}")
    target = report["target"]
    if target["met"] is not None:
        verdict = ", ".join(f"{size} {'met' if met else 'NOT met'}"
                            for size, met in target["met"].items())
        rows.append(f"target: ours at c={target['concurrency']} >= "
                    f"{target['min_ratio']:.1f}x raw: {verdict}")
    rows.append(f"medians of {report['repeat']} rounds of {report['seconds']} s "
                f"(raw: every raw run of the size)")
    rows.append(machine_line(report))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="length of each measurement (default 1: about 45 s in all)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON here")
    parser.add_argument("--dir", type=Path, metavar="DIR",
                        help="measure in a temporary directory inside DIR (default: on the "
                             f"filesystem of {DEFAULT_DATA_DIR})")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeat < 1:
        parser.error("--seconds must be positive and --repeat at least 1")

    def progress(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    directory, same_fs = make_work_dir(args.dir)
    try:
        if not same_fs:
            progress(f"note: no writable directory on the filesystem of {DEFAULT_DATA_DIR}; "
                     f"measuring in {directory}")
        report = run_bench(directory, args.seconds, args.repeat,
                           warmup=min(0.1, args.seconds / 5), log=progress)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    report["same_filesystem_as_default_data_dir"] = same_fs
    emit(report, table(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
