"""Footprint benchmark: memory, start-up, command start and install size, mailrelay next
to chasquid, on loopback.

    .venv/bin/python -m bench.footprint_bench [--repeat R] [--starts N] [--idle S]
        [--submissions N] [--cli-runs N] [--no-venv] [--venv-cache DIR] [--no-chasquid]
        [--install-chasquid] [--quick] [--results DIR]

Writes DIR/footprint.md (the tables) and footprint.json; ``python -m bench.run_all``
runs it with the other benches. The servers are configured as in bench.server_bench
(same certificate, users, DKIM key, discard MDA, loopback DNS; chasquid in a private
mount namespace with its own resolv.conf), and take turns, the order flipping each time:

- start-up, --starts times each: ``mailrelay serve`` from the start of the process to
  READY=1 on a NOTIFY_SOCKET the bench provides (a unix datagram socket, as systemd's
  Type=notify), and to the moment all its ports accept a connection; chasquid (no
  sd_notify) until all its ports accept. Then, after --settle seconds, the idle RSS (and
  PSS) of the fresh server, summed over all its processes (the process and every
  descendant but the MDAs).
- after submissions, --repeat rounds: a fresh server takes --submissions messages on 587
  (STARTTLS + AUTH PLAIN, 1 KiB, 8 connections x 20 messages a batch, as the server
  bench's b; mailrelay DKIM-signs them, chasquid runs without its post-data hook, whose
  memory would be that of short-lived children), delivers them to the discard MDA, idles
  --idle seconds, and its RSS and PSS are read, summed over its processes.
- command start, --cli-runs times after one warm-up, alternating: wall time of
  ``mailrelay --help``, ``mailrelay check -c DIR``, ``mailrelay user add ADDR
  --password-stdin`` (into a copy of the configuration) next to ``python -c pass`` of the
  same interpreter, and chasquid-util's ``--help``, ``print-config`` and ``user-add``.
- install size: a lean server venv (``pip install .``, runtime dependencies only, no
  extras) in --venv-cache, kept between runs (rebuilt when the dependencies or Python
  change; mailrelay itself is reinstalled each run), its size (du), the largest packages
  in it, and the size of the bench's own (test) venv. With a lean venv, the command
  starts and ``serve`` run from it: what a server gets. Without (--no-venv, --quick),
  from the bench's interpreter, and the report says so.

Each figure is the median of its runs; the issue 17 targets are printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import server_bench
from bench.report import emit
from bench.server_bench import (
    CHASQUID_DNS,
    DISCARD_MDA,
    KIB,
    PASSWORD,
    REPO,
    Chasquid,
    DNSServer,
    Load,
    Mailrelay,
    Scenario,
    Server,
)

MIB = 1024  # KiB per MiB
# One batch of submissions: b's shape (STARTTLS + AUTH, 1 KiB), 8 connections x 20.
SUBMIT = Scenario("footprint-submit", "b-signed", "submission", KIB, 8, 20, signed=True)
DEFAULTS = {"repeat": 3, "starts": 5, "idle": 20.0, "settle": 2.0, "submissions": 1000,
            "cli_runs": 5}
QUICK = {"repeat": 1, "starts": 3, "idle": 5.0, "settle": 1.0, "submissions": 200,
         "cli_runs": 5}
# Issue 17's targets.
TARGET_IDLE_MIB = 35.0
TARGET_AFTER_MIB = 50.0
TARGET_HELP_RATIO = 3.0
TARGET_READY_S = 0.4
TARGET_VENV_MIB = 80.0
DEFAULT_VENV_CACHE = REPO / "bench" / "results" / ".cache"  # git ignores bench/results/


# -- memory ----------------------------------------------------------------------------


def pss_kib(pid: int) -> int | None:
    """Proportional set size of ``pid`` (smaps_rollup): shared pages split among sharers."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return None


def memory(server: Server) -> dict[str, Any]:
    """RSS, PSS and peak RSS of all the server's processes now, summed, in KiB."""
    pids = server.processes()
    pss = [v for pid in pids if (v := pss_kib(pid)) is not None]
    return {"rss_kib": server_bench.sum_kib(pids, "VmRSS"),
            "pss_kib": sum(pss) if pss else None,
            "peak_rss_kib": server_bench.sum_kib(pids, "VmHWM"),
            "processes": len(pids),
            "per_process_rss_kib": [server_bench.proc_status_kib(pid, "VmRSS")
                                    for pid in pids]}


# -- start-up --------------------------------------------------------------------------


class NotifySocket:
    """The NOTIFY_SOCKET of sd_notify(3): a unix datagram socket the server writes
    READY=1 to, as systemd provides it to a Type=notify service."""

    def __init__(self) -> None:
        # A short path of its own: unix socket paths are limited to 107 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="mrb-notify-"))
        self.path = str(self.directory / "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.setblocking(False)

    def ready(self, timeout: float) -> bool:
        """True once a READY=1 datagram came within ``timeout`` seconds."""
        readable, _, _ = select.select([self.socket], [], [], timeout)
        while readable:
            try:
                data = self.socket.recv(4096)
            except BlockingIOError:
                return False
            if b"READY=1" in data.split(b"\n"):
                return True
            readable, _, _ = select.select([self.socket], [], [], 0)
        return False

    def close(self) -> None:
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_started(server: Server, started: float, notify: NotifySocket | None,
                 timeout: float = 30.0, poll: float = 0.002) -> tuple[float, float]:
    """(ready, listening) in seconds since ``started``: READY=1 on ``notify`` (without
    one: when listening) and when all the server's ports accept a connection."""
    assert server.process is not None
    waiting = set(server.ports.values())
    ready = listening = None
    while ready is None or listening is None:
        now = time.perf_counter()
        if now - started > timeout:
            raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s: "
                               f"{server.log.read_text(errors='replace')[-1000:]}")
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.process.returncode}): "
                               f"{server.log.read_text(errors='replace')[-1000:]}")
        if listening is None:
            waiting = {port for port in waiting if not accepts(port)}
            if not waiting:
                listening = time.perf_counter() - started
        if ready is None and notify is not None:
            if notify.ready(poll):
                ready = time.perf_counter() - started
        elif ready is None:
            ready = listening
            if ready is None:
                time.sleep(poll)
    return ready, listening


def start_once(server: Server, settle: float) -> dict[str, Any]:
    """Start ``server`` fresh, time it to ready, read its idle memory, stop it."""
    notify = NotifySocket() if isinstance(server, Mailrelay) else None
    try:
        started = server.launch({"NOTIFY_SOCKET": notify.path} if notify else None)
        ready, listening = wait_started(server, started, notify)
        time.sleep(settle)
        found = memory(server)
        return {"ready_s": ready, "listening_s": listening, "idle_rss_kib": found["rss_kib"],
                "idle_pss_kib": found["pss_kib"], "processes": found["processes"],
                "per_process_rss_kib": found["per_process_rss_kib"]}
    finally:
        server.stop()
        if notify is not None:
            notify.close()


def measure_starts(servers: Sequence[Server], starts: int, settle: float,
                   log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for server in servers:  # warm-up: the page cache, .pyc files
        start_once(server, 0.0)
    for number in range(starts):
        order = servers if number % 2 == 0 else servers[::-1]
        for server in order:
            run = start_once(server, settle)
            runs[server.name].append(run)
            log(f"start {number + 1} {server.name:9} ready {run['ready_s'] * 1000:6.0f} ms  "
                f"listening {run['listening_s'] * 1000:6.0f} ms  idle RSS "
                f"{run['idle_rss_kib'] / MIB:6.1f} MiB ({run['processes']} processes)")
    return runs


# -- after submissions -----------------------------------------------------------------


async def submit(server: Server, count: int, tls: Any) -> dict[str, Any]:
    """``count`` submissions in batches of SUBMIT, until the MDA has every one."""
    base = server.delivered()
    sent, accepted, errors = 0, 0, []
    begin = time.perf_counter()
    while sent < count:
        per = min(SUBMIT.per_connection, math.ceil((count - sent) / SUBMIT.connections))
        batch = replace(SUBMIT, per_connection=per)
        result = await Load("127.0.0.1", server.ports["submission"], batch, batch.user,
                            tls).run()
        sent += batch.messages
        accepted += result.accepted
        errors += result.errors
    done = await server_bench.wait_delivered(server, base + accepted, 60 + count * 0.5)
    return {"messages": sent, "accepted": accepted,
            "delivered": server.delivered() - base, "errors": len(errors),
            "error_samples": sorted(set(errors))[:3],
            "submit_seconds": (done or time.perf_counter()) - begin,
            "done_at": done or time.perf_counter()}


def measure_after(servers: Sequence[Server], repeat: int, submissions: int, idle: float,
                  tls: Any, deadline: float,
                  log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """Per round: both servers fresh, each takes the submissions in turn, then each idles
    ``idle`` seconds from its last delivery before its memory is read."""
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for round_ in range(repeat):
        if round_ and time.monotonic() > deadline:
            log(f"time budget used: {round_} rounds after submissions")
            break
        order = servers if round_ % 2 == 0 else servers[::-1]
        try:
            for server in order:
                server.start()
            done = {}
            for server in order:
                done[server.name] = asyncio.run(submit(server, submissions, tls))
            for server in order:
                wait = done[server.name]["done_at"] + idle - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                found = memory(server)
                run = {**done[server.name], **found, "idle_s": idle,
                       "order": order.index(server)}
                del run["done_at"]
                runs[server.name].append(run)
                log(f"round {round_ + 1} {server.name:9} {run['accepted']}/{submissions} "
                    f"in {run['submit_seconds']:5.1f} s, then {idle:.0f} s idle: RSS "
                    f"{found['rss_kib'] / MIB:6.1f} MiB, PSS "
                    f"{(found['pss_kib'] or 0) / MIB:6.1f} MiB, peak "
                    f"{found['peak_rss_kib'] / MIB:6.1f} MiB")
        finally:
            for server in order:
                server.stop()
    return runs


# -- command start ---------------------------------------------------------------------


def cli_commands(python: str, mailrelay: Sequence[str], mailrelay_config: Path,
                 chasquid_config: Path | None) -> list[dict[str, Any]]:
    """The commands timed: name, what it is compared with, and its argv for run n."""
    domain = server_bench.DOMAIN
    commands: list[dict[str, Any]] = [
        {"name": "python -c pass", "pair": "python", "argv": lambda n: [python, "-c", "pass"]},
        {"name": "mailrelay --help", "pair": "help", "argv": lambda n: [*mailrelay, "--help"]},
        {"name": "mailrelay check", "pair": "check",
         "argv": lambda n: [*mailrelay, "-c", str(mailrelay_config), "check"]},
        {"name": "mailrelay user add", "pair": "user add", "stdin": PASSWORD + "\n",
         "argv": lambda n: [*mailrelay, "-c", str(mailrelay_config), "user", "add",
                            f"cli{n}@{domain}", "--password-stdin"]},
    ]
    if chasquid_config is not None:
        util = shutil.which("chasquid-util") or "chasquid-util"
        commands += [
            {"name": "chasquid-util --help", "pair": "help",
             "argv": lambda n: [util, "--help"]},
            {"name": "chasquid-util print-config", "pair": "check",
             "argv": lambda n: [util, f"--configdir={chasquid_config}", "print-config"]},
            {"name": "chasquid-util user-add", "pair": "user add",
             "argv": lambda n: [util, f"--configdir={chasquid_config}", "user-add",
                                f"cli{n}@{domain}", f"--password={PASSWORD}"]},
        ]
    return commands


def time_command(argv: list[str], stdin: str | None) -> tuple[float, int, str]:
    """(wall seconds, exit status, last line of error output)."""
    begin = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - begin
    lines = done.stderr.strip().splitlines()
    return seconds, done.returncode, lines[-1] if lines else ""


def measure_cli(commands: list[dict[str, Any]], runs: int,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Each command ``runs`` times after a warm-up, in turns whose order flips."""
    times: dict[str, list[float]] = {c["name"]: [] for c in commands}
    failures: dict[str, str] = {}
    for number in range(runs + 1):
        order = commands if number % 2 == 0 else commands[::-1]
        for command in order:
            seconds, status, error = time_command(command["argv"](number),
                                                  command.get("stdin"))
            if status != 0:
                failures[command["name"]] = f"exit status {status}: {error}"
            elif number:  # the first turn warms up
                times[command["name"]].append(seconds)
    python = statistics.median(times["python -c pass"]) if times["python -c pass"] else None
    results: dict[str, Any] = {}
    for command in commands:
        runs_ = times[command["name"]]
        median = statistics.median(runs_) if runs_ else None
        results[command["name"]] = {
            "pair": command["pair"], "runs_ms": [t * 1000 for t in runs_],
            "median_ms": median * 1000 if median is not None else None,
            "ratio_to_python": median / python if median is not None and python else None,
            "failed": failures.get(command["name"])}
        if median is not None:
            log(f"{command['name']:28} {median * 1000:7.1f} ms"
                + (f"  {median / python:5.1f}x python -c pass" if python else ""))
    return {"runs": runs, "commands": results}


# -- install size ----------------------------------------------------------------------


def du_kib(*paths: Path) -> int:
    """Disk usage (du -sk) of ``paths`` together, in KiB."""
    done = subprocess.run(["du", "-skc", *map(str, paths)], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1].split()[0])


def runtime_dependencies(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"].get("dependencies", []))


def venv_key(dependencies: Sequence[str]) -> str:
    """What the cached venv depends on: the runtime dependencies and the interpreter."""
    text = json.dumps([sorted(dependencies), sys.version, platform.machine()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def largest(directory: Path, count: int = 8) -> list[dict[str, Any]]:
    """The ``count`` largest entries of ``directory`` (du), dist-info folded into none."""
    entries = [p for p in directory.iterdir() if not p.name.endswith((".dist-info", ".pth"))]
    if not entries:
        return []
    done = subprocess.run(["du", "-sk", *map(str, entries)], capture_output=True, text=True,
                          check=True)
    sizes = [(int(kib), Path(path).name) for kib, path in
             (line.split("\t", 1) for line in done.stdout.strip().splitlines())]
    return [{"name": name, "mib": kib / MIB} for kib, name in sorted(sizes, reverse=True)[:count]]


def lean_venv(cache: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The lean server venv in ``cache``: made with ``pip install .`` when the runtime
    dependencies or Python changed, else mailrelay alone reinstalled from this checkout."""
    dependencies = runtime_dependencies()
    venv = cache / f"lean-venv-{venv_key(dependencies)}"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    begin = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    made = not python.exists()
    try:
        if made:
            for old in cache.glob("lean-venv-*"):  # another dependency set's: outdated
                shutil.rmtree(old, ignore_errors=True)
            log(f"making the lean server venv {venv} (pip install ., runtime deps only)")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True)
            subprocess.run([*pip, str(REPO)], check=True, capture_output=True, text=True)
        else:
            log(f"reinstalling mailrelay into the lean server venv {venv}")
            subprocess.run([*pip, "--no-deps", "--force-reinstall", str(REPO)], check=True,
                           capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(venv, ignore_errors=True)
        error = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise RuntimeError(f"pip install . failed: {error[-1] if error else exc}") from None
    packages = site_packages(venv)
    tools = [p for p in packages.iterdir()
             if p.name.split("-")[0].split(".")[0].lower() in ("pip", "setuptools",
                                                               "_distutils_hack", "pkg_resources",
                                                               "distutils-precedence")]
    return {"path": str(venv), "made_now": made, "seconds": time.monotonic() - begin,
            "dependencies": dependencies,
            "mib": du_kib(venv) / MIB,
            "pip_setuptools_mib": du_kib(*tools) / MIB if tools else 0.0,
            "largest": largest(packages),
            "python": str(python), "mailrelay": str(venv / "bin" / "mailrelay")}


def test_venv() -> dict[str, Any] | None:
    """The venv the bench runs in (made by scripts/setup with the test tools)."""
    prefix = Path(sys.prefix)
    if prefix == Path(sys.base_prefix):
        prefix = REPO / ".venv"
        if not prefix.is_dir():
            return None
    return {"path": str(prefix), "mib": du_kib(prefix) / MIB,
            "largest": largest(site_packages(prefix))}


def chasquid_install() -> dict[str, Any] | None:
    binaries = [Path(p) for name in ("chasquid", "chasquid-util") if (p := shutil.which(name))]
    if not binaries:
        return None
    return {"files": [str(p) for p in binaries], "mib": du_kib(*binaries) / MIB}


# -- the whole run ---------------------------------------------------------------------


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise_report(report: dict[str, Any]) -> dict[str, Any]:
    """Medians, ratios and the targets from the runs."""
    names = list(report["servers"])
    for part, keys in (("startup", ("ready_s", "listening_s", "idle_rss_kib", "idle_pss_kib",
                                    "processes")),
                       ("after", ("rss_kib", "pss_kib", "peak_rss_kib", "processes",
                                  "submit_seconds", "accepted", "errors"))):
        for name in names:
            entry = report[part][name]
            entry["median"] = {k: median_of(entry["runs"], k) for k in keys}
        if len(names) == 2:
            ours, theirs = (report[part][n]["median"] for n in ("mailrelay", "chasquid"))
            report[part]["ratio_mailrelay_to_chasquid"] = {
                k: ours[k] / theirs[k] if ours[k] is not None and theirs[k] else None
                for k in keys if k not in ("accepted", "errors", "processes")}
    report["targets"] = targets(report)
    return report


def _mib(kib: float | None) -> float | None:
    return kib / MIB if kib is not None else None


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's footprint targets: the figure, the limit, met (None: not measured)."""
    start = report["startup"].get("mailrelay", {}).get("median", {})
    after = report["after"].get("mailrelay", {}).get("median", {})
    help_ = report["cli"]["commands"].get("mailrelay --help", {}) if report["cli"] else {}
    venv = report["venv"].get("lean") if report["venv"] else None
    rows = [
        ("idle RSS of serve, fresh (all processes)", _mib(start.get("idle_rss_kib")),
         TARGET_IDLE_MIB, "MiB", "≤"),
        (f"RSS after {report['submissions']:,} submissions + {report['idle']:.0f} s idle",
         _mib(after.get("rss_kib")), TARGET_AFTER_MIB, "MiB", "≤"),
        ("mailrelay --help / python -c pass", help_.get("ratio_to_python"),
         TARGET_HELP_RATIO, "x", "≤"),
        ("serve start to READY=1", start.get("ready_s"), TARGET_READY_S, "s", "≤"),
        ("lean server venv (du)", venv["mib"] if venv else None, TARGET_VENV_MIB, "MiB", "≤"),
    ]
    return [{"target": name, "value": value, "limit": limit, "unit": unit, "op": op,
             "met": None if value is None else value <= limit}
            for name, value, limit, unit, op in rows]


def run_bench(work: Path, *, repeat: int = 3, starts: int = 5, idle: float = 20.0,
              settle: float = 2.0, submissions: int = 1000, cli_runs: int = 5,
              with_venv: bool = True, venv_cache: Path = DEFAULT_VENV_CACHE,
              with_chasquid: bool = True, install_chasquid: bool = False,
              time_budget: float = 600.0,
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Configure both servers in ``work`` (an empty directory) and measure."""
    import trustme

    began = time.monotonic()
    # Whole batches of SUBMIT's connections: 1,000 is 6 x 160 + 8 x 5.
    submissions = math.ceil(submissions / SUBMIT.connections) * SUBMIT.connections
    absent = (server_bench.chasquid_status(install_chasquid, log) if with_chasquid
              else "not asked for")
    if absent:
        log(f"chasquid: {absent}; mailrelay alone")
    venv: dict[str, Any] = {"test": test_venv(), "chasquid": chasquid_install()}
    if with_venv:
        try:
            venv["lean"] = lean_venv(venv_cache, log)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            venv["lean"] = None
            venv["why_not"] = str(exc)
            log(f"no lean venv: {exc}")
    else:
        venv["lean"] = None
        venv["why_not"] = "not asked for"
    lean = venv["lean"]
    python = lean["python"] if lean else sys.executable
    cli = [lean["mailrelay"]] if lean else None
    mda = work / "discard-mda"
    mda.write_text(DISCARD_MDA)
    mda.chmod(0o755)
    ca = trustme.CA()
    dns_servers = {"mailrelay": DNSServer("127.0.0.1")}
    if not absent:
        dns_servers["chasquid"] = DNSServer(*CHASQUID_DNS)
    servers: list[Server] = []
    try:
        dns_servers["mailrelay"].start()
        mailrelay = Mailrelay(work, mda, ca, dns_servers["mailrelay"], cli=cli)
        mailrelay.configure()
        servers.append(mailrelay)
        if not absent:
            chasquid = Chasquid(work, mda, ca, dns_servers["chasquid"])
            try:
                dns_servers["chasquid"].start()
                chasquid.configure()
                servers.append(chasquid)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                absent = f"chasquid could not be configured: {' '.join(str(exc).split())[:300]}"
                log(f"{absent}; mailrelay alone")
        log("command start")
        cli_config = work / "cli-config"
        shutil.copytree(mailrelay.config_dir, cli_config / "mailrelay")
        chasquid_config = None
        if len(servers) == 2:
            chasquid_config = cli_config / "chasquid"
            shutil.copytree(servers[1].config_dir, chasquid_config)  # type: ignore[attr-defined]
        cli_report = measure_cli(
            cli_commands(python, cli or mailrelay._cli(), cli_config / "mailrelay",
                         chasquid_config), cli_runs, log)
        cli_report["install"] = ("lean venv" if lean else "the bench's venv")
        cli_report["python"] = python
        log("start-up and idle memory")
        start_runs = measure_starts(servers, starts, settle, log)
        log(f"memory after {submissions} submissions and {idle:.0f} s idle")
        after_runs = measure_after(servers, repeat, submissions, idle,
                                   server_bench.client_context(ca),
                                   began + time_budget, log)
    finally:
        for server in servers:
            server.stop()
        for dns in dns_servers.values():
            dns.stop()
    names = [s.name for s in servers]
    return summarise_report({
        "repeat": repeat, "starts": starts, "idle": idle, "settle": settle,
        "submissions": submissions, "seconds": time.monotonic() - began,
        "servers": {s.name: {"version": s.version} for s in servers},
        "chasquid_absent": absent,
        "serve_from": "lean venv" if lean else "the bench's venv",
        "startup": {n: {"runs": start_runs[n]} for n in names},
        "after": {n: {"runs": after_runs[n]} for n in names},
        "cli": cli_report,
        "venv": venv,
        "machine": server_bench.machine(work),
        "notes": notes(absent),
    })


def notes(absent: str | None) -> list[str]:
    found = [
        "RSS and PSS are summed over all the server's processes: the process and every "
        "descendant but the MDAs. Pages "
        "shared between processes count once per process in RSS, once in all in PSS.",
        "mailrelay is ready at READY=1 on the bench's NOTIFY_SOCKET; chasquid 1.11 has no "
        "sd_notify and is ready when all three ports accept. chasquid starts through "
        "unshare + sh (its private resolv.conf), a few ms that are in its figures.",
        "After the submissions, mailrelay has signed every message (its domain has a key); "
        "chasquid runs without its post-data hook (the hook's memory would be that of "
        "short-lived children). chasquid 1.11 keeps no queue files after delivery; both "
        "have delivered every message to the discard MDA before the idle time starts. "
        "Every session authenticates, 8 at once: each AUTH's scrypt takes 16 MiB (N=2^14, "
        "r=8) in both servers, and how much of that a server keeps shows in these figures.",
        "Command starts are wall times from fork to exit, the median after one warm-up "
        "turn; `user add` hashes the password (scrypt) in both.",
    ]
    if absent:
        found.append(f"chasquid not measured: {absent}.")
    return found


# -- output ----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("PASS" if met else "MISS")


def table(report: dict[str, Any]) -> str:
    names = list(report["servers"])
    both = len(names) == 2

    def row(label: str, part: str, key: str, scale: float = 1.0, digits: int = 1) -> str:
        values = []
        for name in ("mailrelay", "chasquid"):
            value = report[part].get(name, {}).get("median", {}).get(key)
            values.append(_fmt(value / scale if value is not None else None, digits))
        ratio = report[part].get("ratio_mailrelay_to_chasquid", {}).get(key) if both else None
        return f"| {label} | {values[0]} | {values[1]} | {_fmt(ratio, 2, 'x')} |"

    processes = report["startup"].get("mailrelay", {}).get("median", {}).get("processes")
    lines = [
        "## Footprint: mailrelay vs chasquid", "",
        "| figure (median) | mailrelay | chasquid | mailrelay/chasquid |",
        "|---|---:|---:|---:|",
        row(f"idle RSS, fresh, MiB (mailrelay: {_fmt(processes, 0)} processes)",
            "startup", "idle_rss_kib", MIB),
        row("idle PSS, fresh, MiB", "startup", "idle_pss_kib", MIB),
        row(f"RSS after {report['submissions']:,} submissions + {report['idle']:.0f} s idle, "
            "MiB", "after", "rss_kib", MIB),
        row("PSS after the submissions + idle, MiB", "after", "pss_kib", MIB),
        row("peak RSS since start (through the submissions), MiB", "after", "peak_rss_kib",
            MIB),
        row(f"{report['submissions']:,} submissions, delivered, s", "after", "submit_seconds"),
        row("start to ready, ms (mailrelay: READY=1)", "startup", "ready_s", 0.001, 0),
        row("start to all ports accepting, ms", "startup", "listening_s", 0.001, 0),
        "",
    ]
    cli = report["cli"]
    if cli:
        by_pair: dict[str, dict[str, Any]] = {}
        for name, entry in cli["commands"].items():
            by_pair.setdefault(entry["pair"], {})[name.split()[0]] = (name, entry)
        lines += [f"Command start, wall ms (median of {cli['runs']}, {cli['install']}):", "",
                  "| command | ms | × python -c pass | chasquid-util | ms | × python -c pass "
                  "| mailrelay/chasquid-util |", "|---|---:|---:|---|---:|---:|---:|"]
        for pair, found in by_pair.items():
            if pair == "python":
                continue
            ours = found.get("mailrelay", (None, {}))
            theirs = found.get("chasquid-util", (None, {}))
            ratio = (ours[1]["median_ms"] / theirs[1]["median_ms"]
                     if ours[1].get("median_ms") and theirs[1].get("median_ms") else None)
            lines.append(
                f"| `{ours[0]}` | {_fmt(ours[1].get('median_ms'))} "
                f"| {_fmt(ours[1].get('ratio_to_python'), 2, 'x')} "
                f"| {'`' + theirs[0] + '`' if theirs[0] else '-'} "
                f"| {_fmt(theirs[1].get('median_ms'))} "
                f"| {_fmt(theirs[1].get('ratio_to_python'), 2, 'x')} | {_fmt(ratio, 2, 'x')} |")
        python = cli["commands"]["python -c pass"]
        lines.append(f"| `python -c pass` | {_fmt(python['median_ms'])} | 1.00x | | | | |")
        failed = {n: e["failed"] for n, e in cli["commands"].items() if e["failed"]}
        lines += [f"- {name} failed: {why}" for name, why in failed.items()]
        lines.append("")
    venv = report["venv"]
    lines += ["Install size (du):", ""]
    lean = venv.get("lean")
    if lean:
        top = ", ".join(f"{p['name']} {p['mib']:.1f}" for p in lean["largest"])
        lines.append(f"- lean server venv (`pip install .`, runtime dependencies): "
                     f"**{lean['mib']:.1f} MiB**, of which pip + setuptools "
                     f"{lean['pip_setuptools_mib']:.1f}; largest (MiB): {top}")
    else:
        lines.append(f"- lean server venv: not measured ({venv.get('why_not')})")
    if venv.get("test"):
        top = ", ".join(f"{p['name']} {p['mib']:.1f}" for p in venv["test"]["largest"][:5])
        lines.append(f"- the bench's (test) venv {venv['test']['path']}: "
                     f"{venv['test']['mib']:.1f} MiB; largest (MiB): {top}")
    if venv.get("chasquid"):
        lines.append(f"- chasquid + chasquid-util binaries: {venv['chasquid']['mib']:.1f} MiB")
    lines += ["", "Issue 17 targets:", "", "| target | mailrelay | limit | |",
              "|---|---:|---:|---|"]
    for target in report["targets"]:
        digits = 2 if target["unit"] in ("s", "x") else 1
        lines.append(f"| {target['target']} | {_fmt(target['value'], digits)} {target['unit']} "
                     f"| {target['op']} {target['limit']:g} {target['unit']} "
                     f"| {verdict(target['met'])} |")
    info = report["machine"]
    versions = "; ".join(s["version"] for s in report["servers"].values())
    rounds = len(report["after"].get("mailrelay", {}).get("runs", []))
    lines += ["", f"{report['starts']} starts, {rounds} rounds after submissions "
              f"({versions}); serve from {report['serve_from']}; "
              f"{info['cpu']}, {info['cpus']} cpus, Python {info['python']}; "
              f"{report['seconds']:.0f} s.", ""]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines)


def write_results(report: dict[str, Any], results_dir: Path, show: bool = True) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    report = server_bench.json_safe(report)
    text = table(report)
    (results_dir / "footprint.md").write_text(text + "\n")
    if show:
        emit(report, text, results_dir / "footprint.json")
    else:
        (results_dir / "footprint.json").write_text(json.dumps(report, indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, help="rounds after submissions (default 3)")
    parser.add_argument("--starts", type=int, help="fresh starts of each server (default 5)")
    parser.add_argument("--idle", type=float, metavar="SECONDS",
                        help="idle time after the submissions (default 20)")
    parser.add_argument("--settle", type=float, metavar="SECONDS",
                        help="wait after ready before the idle memory is read (default 2)")
    parser.add_argument("--submissions", type=int, help="messages per round (default 1000)")
    parser.add_argument("--cli-runs", type=int, help="runs of each command (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 3 starts, 5 s idle, 200 submissions, no lean venv")
    parser.add_argument("--no-venv", action="store_true", help="do not make the lean venv")
    parser.add_argument("--venv-cache", type=Path, default=DEFAULT_VENV_CACHE, metavar="DIR",
                        help="where the lean venv is kept (default bench/results/.cache)")
    parser.add_argument("--no-chasquid", action="store_true", help="measure mailrelay alone")
    parser.add_argument("--install-chasquid", action="store_true",
                        help="apt-get install chasquid if it is missing (root only)")
    parser.add_argument("--results", type=Path, metavar="DIR",
                        help="write footprint.md and footprint.json here "
                             "(default bench/results/<UTC timestamp>/)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else DEFAULTS)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["repeat"] < 1 or settings["starts"] < 1 or settings["cli_runs"] < 1 \
            or settings["submissions"] < 1 or settings["idle"] < 0:
        parser.error("--repeat, --starts, --cli-runs and --submissions must be at least 1")

    def progress(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    results_dir = args.results or server_bench.default_results_dir()
    with tempfile.TemporaryDirectory(prefix="mailrelay-footprint-bench-") as work:
        report = run_bench(Path(work), **settings, with_venv=not (args.no_venv or args.quick),
                           venv_cache=args.venv_cache, with_chasquid=not args.no_chasquid,
                           install_chasquid=args.install_chasquid, log=progress)
    write_results(report, results_dir)
    progress(f"results in {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
