"""Test helpers for DKIM: publishing keys on the loopback DNS server, a dkimpy ``dnsfunc``
that really queries it, random messages, and OpenDKIM's verifier.

OpenDKIM (``opendkim-testmsg``, Debian's opendkim-tools) is a C implementation that
shares no code with dkimpy or with us. libopendkim resolves keys with the C library's
resolver, which reads /etc/resolv.conf and always uses port 53. To point it at test data
without touching the machine, :func:`run_opendkim` starts this module (``main``) inside
fresh user, mount and network namespaces (``unshare -r -m -n``): there it owns port 53 on
its own loopback, serves the records with TestDNSServer and bind-mounts a private
resolv.conf over /etc/resolv.conf.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mailrelay.message.dkim.keys import dns_record
from mailrelay.message.dkim.signer import DKIMKey
from tests.support.dns_server import TestDNSServer

REPO = Path(__file__).resolve().parents[3]


# -- DNS -------------------------------------------------------------------------------

def publish(dns_server: TestDNSServer, *keys: DKIMKey) -> list[tuple[str, str]]:
    records = [dns_record(key) for key in keys]
    for name, value in records:
        dns_server.add(name, "TXT", value)
    return records


# -- messages --------------------------------------------------------------------------

_WORDS = [b"hello", "wörld".encode(), b"caf\xe9", b"a", b"x" * 90, b"=?utf-8?q?hi?=",
          b"<m@x>", b";", b":", b'quoted "s"', b"\xff\xfe\x80", b"tab\there", b"end."]
# Fields RFC 5322 3.6 allows at most once (From and Date exactly once): OpenDKIM refuses
# messages that break the rule ("Syntax error") before it looks at a signature.
_SINGLE = ["To", "Cc", "Subject", "Message-ID", "Reply-To", "In-Reply-To", "References",
           "MIME-Version", "Content-Type", "Content-Transfer-Encoding"]
_REPEATABLE = ["Received", "X-Mailer", "X-Spam", "List-Id", "List-Unsubscribe", "List-Post"]


def _any_case(rng: random.Random, name: str) -> str:
    return rng.choice([name, name.lower(), name.upper()])


def random_message(rng: random.Random) -> bytes:
    """A message with folding, whitespace runs, 8-bit bytes, repeated fields and odd
    bodies; field counts follow RFC 5322 and the body ends with a line break (as on the
    wire). Line endings are CRLF, LF or a mix."""
    eol = rng.choice([b"\r\n", b"\n", None])

    def end() -> bytes:
        return eol if eol is not None else rng.choice([b"\r\n", b"\n"])

    def ws() -> bytes:
        return rng.choice([b" ", b"  ", b"\t", b" \t ", b""])

    def text(words: int) -> bytes:
        out = ws()
        for _ in range(words):
            out += rng.choice(_WORDS) + rng.choice([b" ", b"  ", b"\t"])
            if rng.random() < 0.15:
                out += end() + rng.choice([b" ", b"\t", b"    "])  # folding
        return out + ws()

    names = ["From", "Date", *rng.sample(_SINGLE, rng.randint(0, len(_SINGLE)))]
    names += rng.choices(_REPEATABLE, k=rng.randint(0, 5))  # some of them twice
    rng.shuffle(names)
    def value(name: str) -> bytes:
        if name != "From":
            return text(rng.randint(0, 8))
        # OpenDKIM parses From for its domain, so it needs a real address.
        display = rng.choice([b"", b'"J\xc3\xb6rg  Q."', b"Me\t", b"caf\xe9"])
        fold = rng.choice([b" ", b"\t", end() + b" \t"])
        return ws() + display + fold + b"<me@example.com>" + ws()

    message = b"".join(_any_case(rng, name).encode() + b":" + value(name) + end()
                       for name in names)
    message += end()
    for _ in range(rng.choice([0, 1, 3, 20])):
        message += text(rng.randint(0, 12)) + end()
    message += end() * rng.choice([0, 0, 1, 3])  # trailing empty lines
    return message


# -- OpenDKIM --------------------------------------------------------------------------

OPENDKIM = "opendkim-testmsg"


def opendkim_unavailable() -> str | None:
    """Why opendkim-testmsg cannot run here, or None."""
    if shutil.which(OPENDKIM) is None:
        return f"{OPENDKIM} is not installed (apt-get install opendkim-tools)"
    for probe in (["unshare", "-r", "-m", "-n", "true"], ["unshare", "-m", "-n", "true"]):
        if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return None
    return "this sandbox cannot create mount and network namespaces for opendkim-testmsg"


def run_opendkim(tmp_path: Path, records: Sequence[tuple[str, str]],
                 messages: Sequence[bytes]) -> list[tuple[int, str]]:
    """Verify each message with opendkim-testmsg; (exit status, stderr) per message.

    Messages are given to it with CRLF line endings, as SMTP transmits them: OpenDKIM
    takes all-LF input too but reports a syntax error for a mix of both.
    """
    job = {"records": list(records), "messages": []}
    for i, message in enumerate(messages):
        path = tmp_path / f"message{i}.eml"
        path.write_bytes(re.sub(rb"\r?\n", b"\r\n", message))
        job["messages"].append(str(path))
    job_path = tmp_path / "opendkim-job.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "tests.message.dkim.dkimtools", str(job_path)]
    # Unprivileged user namespaces where allowed; root can do without the user namespace.
    attempts = [["unshare", "-r", "-m", "-n", *command]]
    if os.geteuid() == 0:
        attempts.append(["unshare", "-m", "-n", *command])
    failures = []
    for attempt in attempts:
        result = subprocess.run(attempt, capture_output=True, text=True, cwd=REPO, env=env,
                                timeout=300)
        if result.returncode == 0:
            return [tuple(item) for item in json.loads(result.stdout)]
        failures.append(f"{' '.join(attempt[:4])}: {result.stderr.strip()[-500:]}")
    raise RuntimeError("could not run opendkim-testmsg in namespaces: " + "; ".join(failures))


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_MS_BIND = 4096


def _loopback_up() -> None:
    # A new network namespace starts with lo down.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _private_resolv_conf(directory: str) -> None:
    path = os.path.join(directory, "resolv.conf")
    with open(path, "w") as handle:
        handle.write("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.path.realpath("/etc/resolv.conf")
    if libc.mount(path.encode(), target.encode(), None, _MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"cannot bind-mount over {target}")


def main() -> int:
    """Inside the namespaces: serve the records on 127.0.0.1:53 and run the verifier."""
    job = json.loads(Path(sys.argv[1]).read_text())
    _loopback_up()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _private_resolv_conf(tmp)
        with TestDNSServer("127.0.0.1", 53) as server:
            for name, value in job["records"]:
                server.add(name, "TXT", value)
            for path in job["messages"]:
                with open(path, "rb") as message:
                    done = subprocess.run([OPENDKIM], stdin=message, capture_output=True,
                                          timeout=60)
                results.append([done.returncode, done.stderr.decode("utf-8", "replace")])
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
