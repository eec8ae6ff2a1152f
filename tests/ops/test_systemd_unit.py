"""systemd/mailrelay.service: systemd's own checker accepts it, it matches README's install
layout, and the server works under its strictest setting (MemoryDenyWriteExecute=yes)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mailrelay.message.headers import get_all, parse_headers
from mailrelay.server import SHUTDOWN_GRACE
from tests.support.client import RawSMTP
from tests.support.dkim_dns import publish_new_key
from tests.support.process import start_server
from tests.support.relay import HOSTNAME, PASSWORD, USER

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "mailrelay.service"
INSTALLED_BINARY = "/opt/mailrelay/.venv/bin/mailrelay"


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (scripts/setup installs the systemd package)")
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"systemd-analyze cannot run here: {exc}")
    return path


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's mailrelay, so verify can check
    that the binary exists; everything else (User= included) as shipped."""
    binary = Path(sys.executable).parent / "mailrelay"
    assert binary.is_file(), binary
    text = UNIT.read_text() if text is None else text
    assert INSTALLED_BINARY in text
    directory = tmp_path / "units"
    directory.mkdir(exist_ok=True)
    path = directory / "mailrelay.service"
    path.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return path


def verify(tool: str, unit: Path) -> tuple[int, list[str]]:
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    # Complaints about the unit are prefixed with its name; other lines would be about the
    # container's own units.
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    return result.returncode, complaints


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = systemd_analyze()
    code, complaints = verify(tool, local_copy(tmp_path))
    assert code == 0 and complaints == [], complaints


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is real: here verify does report a typo and a bad value."""
    tool = systemd_analyze()
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict").replace(
        "RestrictNamespaces=yes", "RestrictNamespaces=maybe")
    _, complaints = verify(tool, local_copy(tmp_path, broken))
    assert any("ProtectSystm" in line for line in complaints), complaints
    assert any("maybe" in line for line in complaints), complaints
    if not Path(INSTALLED_BINARY).exists():
        # Which is why the copy points ExecStart at this checkout.
        code, complaints = verify(tool, UNIT)
        assert code != 0 and any("not executable" in line for line in complaints), complaints


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    tool = systemd_analyze()
    result = subprocess.run([tool, "security", "--offline=yes", str(local_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for mailrelay\.service: ([\d.]+)", result.stdout)
    if result.returncode != 0 and match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported: {result.stderr.strip()}")
    assert match, result.stdout
    assert float(match.group(1)) <= 2.5, result.stdout


def test_unit_matches_readme_and_needs() -> None:
    unit = directives(UNIT.read_text())
    readme = (REPO / "README.md").read_text()
    [exec_start] = unit["ExecStart"]
    assert exec_start == f"{INSTALLED_BINARY} serve -c /etc/mailrelay"
    assert exec_start in readme.replace("\\\n", "").replace("\n", " ") or (
        f"ExecStart={exec_start}" in readme)
    assert "data_dir: /var/lib/mailrelay" in readme
    expected = {
        "Type": "notify", "User": "mailrelay", "Restart": "on-failure",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "StateDirectory": "mailrelay", "ReadWritePaths": "/var/lib/mailrelay",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(unit["LimitNOFILE"][0]) >= 4096
    # Longer than serve's own bounded shutdown (sessions, then deliveries in flight).
    assert int(unit["TimeoutStopSec"][0].removesuffix("s")) > 2 * SHUTDOWN_GRACE
    assert "systemctl reload mailrelay" in readme


# --- the server under the unit's restrictions --------------------------------------------

MESSAGE = b"From: me@example.com\r\nTo: friend@remote.test\r\nSubject: sandbox\r\n\r\nHello.\r\n"


def prepare(env) -> None:
    domain_dir = env.config_dir / "domains" / "example.com"
    publish_new_key(env.dns, domain_dir, "example.com", "rsa1", "rsa2048")
    publish_new_key(env.dns, domain_dir, "example.com", "ed1", "ed25519")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    # A pipe alias: a command started by the server.
    (domain_dir / "aliases").write_text(f"archive: | sh -c 'cat > {env.root / 'piped'}'\n")


async def exercise(env, pid: int) -> None:
    """What the server does in a day: TLS on every port, AUTH (scrypt), DKIM signing with
    RSA and Ed25519, delivery out (STARTTLS) and in (Maildir and a pipe alias), a SIGHUP
    reload."""
    client = await RawSMTP.connect("127.0.0.1", env.ports["submission_tls"],
                                   tls=env.client_tls(), server_hostname=HOSTNAME)
    await client.cmd("EHLO client.test")
    assert (await client.auth_plain(USER, PASSWORD))[0] == 235
    assert await client.send_message(USER, ["friend@remote.test"], MESSAGE) == 250
    await client.close()
    await env.submit(["friend@remote.test"], MESSAGE)  # 587, STARTTLS
    for item in await env.sink.until(2, timeout=20):
        assert item.tls
        signatures = get_all(parse_headers(item.data), "DKIM-Signature")
        assert sorted("a=rsa-sha256" in s for s in signatures) == [False, True]
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    await client.starttls(env.client_tls(), HOSTNAME)
    await client.cmd("EHLO mx.sender.test")
    assert await client.send_message("alice@sender.test", [USER],
                                     b"Subject: in\r\n\r\nHi.\r\n") == 250
    await client.close()
    await env.wait_mailbox(1)
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    assert await client.send_message("alice@sender.test", ["archive@example.com"],
                                     b"Subject: piped\r\n\r\nKeep.\r\n") == 250
    await client.close()
    piped = env.root / "piped"
    for _ in range(200):
        if piped.exists() and b"Keep." in piped.read_bytes():
            break
        await asyncio.sleep(0.05)
    assert b"Subject: piped" in piped.read_bytes()
    os.kill(pid, signal.SIGHUP)
    await asyncio.sleep(1)


# MemoryDenyWriteExecute=yes: the kernel's PR_SET_MDWE refuses the same (memory both
# writable and executable, or made executable later); it is inherited across exec.
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
_libc = ctypes.CDLL(None, use_errno=True)


def _deny_write_execute() -> None:
    if _libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")


def _mdwe_supported() -> bool:
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import mmap\ntry:\n mmap.mmap(-1, 4096, prot=7)\n"
             "except PermissionError:\n raise SystemExit(3)"],
            preexec_fn=_deny_write_execute, capture_output=True, timeout=60)
    except subprocess.SubprocessError:  # prctl failed in the child: Linux < 6.3
        return False
    return probe.returncode == 3


async def test_server_works_without_writable_executable_memory(env) -> None:
    if not await asyncio.to_thread(_mdwe_supported):
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    prepare(env)
    process = await start_server(env, preexec_fn=_deny_write_execute)
    try:
        await exercise(env, process.pid)
        assert process.returncode is None
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 40)
    log = (await process.log_drain).decode()
    assert code == 0 and "Traceback" not in log, log


def _syscall_group(tool: str, group: str, seen: set[str]) -> set[str]:
    out = subprocess.run([tool, "syscall-filter", group], capture_output=True, text=True,
                         timeout=60).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line.startswith("@") and line not in seen:
            seen.add(line)
            names |= _syscall_group(tool, line, seen)
        elif line and not line.startswith(("#", "@")):
            names.add(line)
    return names


async def test_server_calls_only_what_system_service_allows(env) -> None:
    """SystemCallFilter=@system-service: strace lists every system call the server makes
    while it works; each must be in the filter (else it would get EPERM)."""
    tool = systemd_analyze()
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace not installed")
    allowed = _syscall_group(tool, "@system-service", set())
    assert {"read", "sendmsg", "epoll_wait"} <= allowed
    prepare(env)
    counts = env.root / "syscalls.txt"
    process = await asyncio.create_subprocess_exec(
        strace, "-f", "-c", "-o", str(counts), "--", sys.executable, "-m",
        "mailrelay.cli.main", "serve", "-c", str(env.config_dir),
        stderr=asyncio.subprocess.PIPE)
    log = b""
    try:
        while b"mailrelay ready" not in log:
            line = await asyncio.wait_for(process.stderr.readline(), 60)
            if not line:
                pytest.skip(f"cannot trace here: {log.decode()[-500:]}")
            log += line
        drain = asyncio.ensure_future(process.stderr.read())
        pid = int((env.data_dir / "mailrelay.pid").read_text())
        await exercise(env, pid)
        os.kill(pid, signal.SIGTERM)  # strace ends with its tracee
        assert await asyncio.wait_for(process.wait(), 40) == 0, (log + await drain).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    used = {fields[-1] for line in counts.read_text().splitlines()[2:]
            if len(fields := line.split()) > 1 and re.fullmatch(r"[a-z0-9_]+", fields[-1])}
    used.discard("total")
    assert len(used) > 20, counts.read_text()
    assert used <= allowed, sorted(used - allowed)
