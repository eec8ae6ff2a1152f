"""mailrelay.ops.activation: sockets passed the way systemd passes them, to a real child."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailrelay.errors import ConfigError
from mailrelay.ops.activation import KINDS, activated_sockets

REPO = Path(__file__).resolve().parent.parent.parent

# Does what systemd does between fork and exec: puts the sockets at 3, 4, … (they arrive
# at whatever numbers pass_fds kept), sets LISTEN_FDS and LISTEN_FDNAMES, and lets the
# shell set LISTEN_PID to the pid the service will have ($$: exec keeps it).
WRAPPER = textwrap.dedent(r"""
    import fcntl, os, sys
    fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
    # Out of the way first: a passed descriptor may sit where another one must go.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)  # inheritable, as systemd leaves them
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    if sys.argv[2] != "-":
        os.environ["LISTEN_FDNAMES"] = sys.argv[2]
    pid = sys.argv[3]  # "$$" (the service itself) or another number
    os.execvp("sh", ["sh", "-c", f'LISTEN_PID={pid} exec "$0" -c "$1" "$2"',
                     sys.executable, sys.argv[4], sys.argv[1]])
""")

# The service: reads the sockets, reports, then serves one connection on each.
SERVICE = textwrap.dedent(r"""
    import json, os, subprocess, sys
    from mailrelay.errors import ConfigError
    from mailrelay.ops.activation import activated_sockets
    count = len([fd for fd in sys.argv[1].split(",") if fd])
    report = {"pid": os.getpid()}
    try:
        found = activated_sockets()
    except ConfigError as exc:
        found = {}
        report["error"] = str(exc)
    report["sockets"] = {
        kind: [{"fd": s.fileno(), "family": s.family.name, "address": list(s.getsockname()[:2]),
                "cloexec": not os.get_inheritable(s.fileno()), "blocking": s.getblocking()}
               for s in socks]
        for kind, socks in found.items()}
    report["env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
    report["child_env"] = sorted(
        line.split("=")[0] for line in subprocess.run(["env"], capture_output=True,
                                                      text=True).stdout.splitlines()
        if line.startswith("LISTEN_"))
    # Descriptors 3.. as we leave them: open? inheritable?
    report["fds"] = {}
    for fd in range(3, 3 + count):
        try:
            report["fds"][fd] = "inheritable" if os.get_inheritable(fd) else "cloexec"
        except OSError:
            report["fds"][fd] = "closed"
    print(json.dumps(report), flush=True)
    for kind, socks in found.items():
        for sock in socks:
            sock.settimeout(5)
            conn, _ = sock.accept()
            conn.sendall(kind.encode())
            conn.close()
""")


def run_service(sockets: list[socket.socket], names: str, pid: str = "$$",
                connect: bool = True) -> dict:
    """Start the service with ``sockets`` as fds 3.. named ``names``; its report, after
    connecting once to every listening socket it took (checking it answers its kind)."""
    fds = [s.fileno() for s in sockets]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    process = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), names, pid, SERVICE],
        pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=REPO)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        report = json.loads(line)
        if connect:
            answers = {}
            for entries in report["sockets"].values():
                for entry in entries:
                    host, port = entry["address"]
                    with socket.create_connection((host, port), timeout=5) as client:
                        answers[(host, port)] = client.recv(100).decode()
            report["answers"] = answers
        assert process.wait(10) == 0, process.stderr.read()
        return report
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(5)
    return sock


def has_ipv6_loopback() -> bool:
    try:
        listener("::1").close()
        return True
    except OSError:
        return False


# --- a real child with real inherited sockets ---------------------------------------------


def test_sockets_mapped_to_listener_kinds():
    hosts = ["127.0.0.1", "::1" if has_ipv6_loopback() else "127.0.0.1", "127.0.0.1",
             "127.0.0.1"]
    sockets = [listener(host) for host in hosts]
    addresses = [sock.getsockname()[:2] for sock in sockets]
    try:
        report = run_service(sockets, "smtp:smtp:submission:submission_tls")
    finally:
        for sock in sockets:
            sock.close()
    assert "error" not in report
    found = report["sockets"]
    assert sorted(found) == ["smtp", "submission", "submission_tls"]
    assert [e["fd"] for e in found["smtp"]] == [3, 4]  # two sockets under one name
    assert [e["fd"] for e in found["submission"]] == [5]
    assert [e["fd"] for e in found["submission_tls"]] == [6]
    expected = dict(zip((3, 4, 5, 6), addresses, strict=True))
    for entries in found.values():
        for entry in entries:
            assert tuple(entry["address"]) == expected[entry["fd"]]
            assert entry["cloexec"] is True
            assert entry["blocking"] is False
    if hosts[1] == "::1":
        assert found["smtp"][1]["family"] == "AF_INET6"
    # The variables are gone, for the service and for what it starts.
    assert report["env"] == [] and report["child_env"] == []
    # And each socket really is the one listening: connecting reaches the service.
    assert sorted(report["answers"].values()) == ["smtp", "smtp", "submission",
                                                  "submission_tls"]


def test_variables_for_another_process_are_ignored():
    sockets = [listener()]
    try:
        report = run_service(sockets, "smtp", pid="1", connect=False)
    finally:
        sockets[0].close()
    assert "error" not in report
    assert report["sockets"] == {}
    assert report["fds"] == {"3": "inheritable"}  # left as they were
    assert report["env"] == [] and report["child_env"] == []


@pytest.mark.parametrize("names, words", [
    ("smtp:bogus", "descriptor 4 is named 'bogus'"),
    ("smtp:unknown", "'unknown'"),
    ("smtp", "1 names for LISTEN_FDS=2"),
    ("smtp:submission:submission_tls", "3 names for LISTEN_FDS=2"),
    ("-", "descriptor 3 is named 'unknown'"),  # no LISTEN_FDNAMES: systemd's "unknown"
    ("smtp:", "descriptor 4 is named ''"),
])
def test_bad_names_are_a_clear_error(names, words):
    sockets = [listener(), listener()]
    try:
        report = run_service(sockets, names, connect=False)
    finally:
        for sock in sockets:
            sock.close()
    assert words in report["error"]
    assert "\n" not in report["error"]
    if "named" in words:
        assert "FileDescriptorName=" in report["error"]
    assert report["env"] == [] and report["child_env"] == []


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def unix_listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s"))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("make, words", [
    (lambda tmp: udp_socket(), "not a stream socket"),
    (lambda tmp: socket.socket(), "not listening"),  # bound nowhere, never listened
    (lambda tmp: unix_listener(tmp), "not an IPv4 or IPv6 socket"),
    (lambda tmp: open(tmp / "file", "w"), "not a socket"),  # noqa: SIM115
])
def test_descriptors_that_are_not_tcp_listeners(tmp_path, make, words):
    good, bad = listener(), make(tmp_path)
    try:
        report = run_service([good, bad], "smtp:submission", connect=False)
    finally:
        good.close()
        bad.close()
    assert "descriptor 4 (submission)" in report["error"]
    assert words in report["error"]


def test_a_connected_socket_is_not_a_listener():
    server = listener()
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    try:
        report = run_service([accepted], "smtp", connect=False)
    finally:
        for sock in (server, client, accepted):
            sock.close()
    assert "descriptor 3 (smtp) is not listening" in report["error"]


# --- the environment alone (nothing at 3.. is touched) ----------------------------------------


def test_not_activated():
    env: dict[str, str] = {"PATH": "/bin"}
    assert activated_sockets(env) == {}
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize("env", [
    {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp:submission"},
    {"LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "smtp"},  # no LISTEN_FDS
    {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
    {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtp"},  # no LISTEN_PID
])
def test_nothing_for_us(env):
    assert activated_sockets(env) == {}
    assert env == {}  # unset in any case


@pytest.mark.parametrize("env, words", [
    ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID='abc'"),
    ({"LISTEN_PID": " 1", "LISTEN_FDS": "1"}, "LISTEN_PID"),
    ({"LISTEN_PID": "+1", "LISTEN_FDS": "1"}, "LISTEN_PID"),
    ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID"),
    ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1'"),
    ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "two"}, "LISTEN_FDS"),
    ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "99999"}, "LISTEN_FDS"),
    ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp"}, "1 names"),
])
def test_broken_environment(env, words):
    env = {k: v.replace("{pid}", str(os.getpid())) for k, v in env.items()}
    with pytest.raises(ConfigError, match="systemd socket activation") as info:
        activated_sockets(env)
    assert words in str(info.value)
    assert env == {}


def test_kinds_are_the_listener_kinds():
    from mailrelay.smtp.session import Port
    assert sorted(KINDS) == sorted(port.value for port in Port)


# --- the example units ----------------------------------------------------------------------


UNITS = sorted((REPO / "systemd").glob("mailrelay-*.socket"))


def test_example_socket_units_name_every_kind():
    names = {}
    for unit in UNITS:
        keys = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
        assert keys["Service"] == "mailrelay.service"
        names[keys["FileDescriptorName"]] = keys["ListenStream"]
    assert names == {"smtp": "25", "submission": "587", "submission_tls": "465"}


def test_example_socket_units_pass_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (scripts/setup installs the systemd package)")
    service = (REPO / "systemd" / "mailrelay.service").read_text()
    binary = Path(sys.executable).parent / "mailrelay"
    (tmp_path / "mailrelay.service").write_text(
        service.replace("/opt/mailrelay/.venv/bin/mailrelay", str(binary)))
    for unit in UNITS:
        shutil.copy(unit, tmp_path / unit.name)
    result = subprocess.run([tool, "verify", *(unit.name for unit in UNITS)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in result.stderr.splitlines()
                  if any(unit.name in line for unit in UNITS) or "mailrelay.service" in line]
    assert result.returncode == 0 and complaints == [], result.stderr
