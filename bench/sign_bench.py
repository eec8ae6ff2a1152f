"""DKIM signing throughput of mailrelay's signer, next to OpenSSL's own sign rate.

    .venv/bin/python -m bench.sign_bench [--seconds N] [--repeat R] [--json PATH]

One core: our signer runs in this process, ``openssl speed`` without -multi. The two
are measured in turns (ours, openssl, ours, ...) several times and the medians are
reported, because a shared machine's speed drifts. OpenSSL's rate is the ceiling: it
signs a digest and does nothing else, while we also parse, canonicalise and hash the
message and build the header field. dkimpy's stock signer is measured once, for scale.

The messages are a short text part (format=flowed, as Thunderbird writes it) and, from
10 KiB on, a base64 attachment.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bench.report import emit
from mailrelay.message.dkim.signer import DKIMKey, sign

SIZES = {"1KiB": 1024, "10KiB": 10 * 1024, "100KiB": 100 * 1024}
ALGOS = ("rsa2048", "ed25519")
_HEADER = (
    b"From: Jane Example <jane@example.com>\r\nTo: John Remote <john@remote.test>\r\n"
    b"Cc: team@remote.test\r\nSubject: Quarterly numbers, and a question about the plan\r\n"
    b"Date: Mon, 01 Jan 2024 09:30:00 +0000\r\nMessage-ID: <20240101093000.12345@example.com>\r\n"
    b"MIME-Version: 1.0\r\nUser-Agent: bench\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain; charset=utf-8; format=flowed\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
)
# Text as Thunderbird writes it (format=flowed: soft breaks leave a trailing space)...
_TEXT = (b"Hello John,\r\n\r\nhere are the numbers we talked about on Friday.  The second \r\n"
         b"quarter looks better than the first, mostly thanks to the new \r\n"
         b"customers in the north; the details are in the attached sheet.\r\n\r\n")
# ... and an attachment, base64 in lines of 76.
_ATTACHMENT = (b"--b1\r\nContent-Type: application/octet-stream; name=sheet.bin\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n")
_BASE64_LINE = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"


def make_message(size: int) -> bytes:
    """A message of ``size`` bytes: headers, up to 2 KiB of text, then (for the larger
    sizes) a base64 attachment, the way big messages usually are."""
    end = b"--b1--\r\n"
    message = _HEADER + _TEXT
    while len(message) + len(_TEXT) + len(end) <= min(size, 2048):
        message += _TEXT
    if size - len(message) - len(end) > 512:
        message += _ATTACHMENT
        lines, rest = divmod(size - len(message) - len(end), len(_BASE64_LINE))
        message += _BASE64_LINE * lines
        if rest > 2:
            message += _BASE64_LINE[:rest - 2] + b"\r\n"
    else:
        rest = size - len(message) - len(end)
        if rest > 2:
            message += (b"and a few more words to finish " * 40)[:rest - 2] + b"\r\n"
    return message + end


def make_key(algo: str) -> DKIMKey:
    if algo == "rsa2048":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return DKIMKey.from_private_key("example.com", "bench", private)


def rate(function: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``function`` over about ``seconds``."""
    function()  # warm up caches
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        function()
        count += 1
        now = time.perf_counter()
    return count / (now - start)


def ours(key: DKIMKey, message: bytes, seconds: float) -> float:
    return rate(lambda: sign(message, [key]), seconds)


def dkimpy_rate(key: DKIMKey, message: bytes, seconds: float) -> float:
    """dkimpy's own dkim.sign (pure-Python RSA) on the same message."""
    import dkim

    pem = key.private_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
    return rate(lambda: dkim.sign(message, b"bench", b"example.com", pem,
                                  canonicalize=(b"relaxed", b"relaxed")), seconds)


def parse_openssl_speed(output: str, algo: str) -> float:
    """Signatures per second from ``openssl speed [-mr]`` output."""
    # Machine-readable lines: "+F2:<n>:2048:<sign/s>:<verify/s>" (RSA) and
    # "+F6:<n>:253:Ed25519:<sign/s>:<verify/s>" (EdDSA).
    for line in output.splitlines():
        fields = line.strip().split(":")
        if algo == "rsa2048" and fields[0] == "+F2" and fields[2] == "2048":
            return float(fields[3])
        if algo == "ed25519" and fields[0] == "+F6" and "Ed25519" in fields:
            return float(fields[fields.index("Ed25519") + 1])
    # The table: "rsa 2048 bits 0.000685s 0.000021s   1460.0  47246.5", the Ed25519
    # line ending the same way (sign/s, verify/s).
    pattern = r"rsa\s+2048 bits" if algo == "rsa2048" else r"\(Ed25519\)"
    for line in output.splitlines():
        if re.search(pattern, line):
            numbers = re.findall(r"(\d+(?:\.\d+)?)(?=\s|$)", line)
            return float(numbers[-2])
    raise ValueError(f"no {algo} sign rate in openssl output:\n{output}")


def openssl_rate(algo: str, seconds: int) -> float:
    command = ["openssl", "speed", "-mr", "-seconds", str(seconds), algo]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 10 + 60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return parse_openssl_speed(done.stdout + done.stderr, algo)


def run_bench(seconds: float = 1.0, repeat: int = 3, with_openssl: bool = True,
              dkimpy_seconds: float = 2.0,
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    keys = {algo: make_key(algo) for algo in ALGOS}
    messages = {name: make_message(size) for name, size in SIZES.items()}
    ours_runs: dict[str, dict[str, list[float]]] = {a: {s: [] for s in SIZES} for a in ALGOS}
    openssl_runs: dict[str, list[float]] = {a: [] for a in ALGOS}
    with_openssl = with_openssl and shutil.which("openssl") is not None
    for round_ in range(repeat):
        for algo in ALGOS:
            for number, size in enumerate(SIZES):
                ours_runs[algo][size].append(ours(keys[algo], messages[size], seconds))
                log(f"round {round_ + 1}: ours {algo} {size}: "
                    f"{ours_runs[algo][size][-1]:.0f}/s")
                if number == 0 and with_openssl:  # right after ours at 1 KiB
                    openssl_runs[algo].append(openssl_rate(algo, max(1, round(seconds))))
                    log(f"round {round_ + 1}: openssl {algo}: {openssl_runs[algo][-1]:.0f}/s")
    results: dict[str, Any] = {}
    for algo in ALGOS:
        ceiling = statistics.median(openssl_runs[algo]) if openssl_runs[algo] else None
        results[algo] = {"openssl_sign_per_s": ceiling, "openssl_runs": openssl_runs[algo],
                         "sizes": {}}
        for size in SIZES:
            median = statistics.median(ours_runs[algo][size])
            results[algo]["sizes"][size] = {
                "ours_per_s": median, "runs": ours_runs[algo][size],
                "ratio_to_openssl": median / ceiling if ceiling else None,
            }
    dkimpy = None
    if dkimpy_seconds > 0:
        dkimpy = dkimpy_rate(keys["rsa2048"], messages["1KiB"], dkimpy_seconds)
        log(f"dkimpy rsa2048 1KiB: {dkimpy:.0f}/s")
    return {
        "seconds": seconds, "repeat": repeat, "machine": machine(),
        "results": results, "dkimpy_rsa2048_1KiB_per_s": dkimpy,
    }


def machine() -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    openssl = shutil.which("openssl")
    version = (subprocess.run([openssl, "version"], capture_output=True, text=True).stdout
               .strip() if openssl else None)
    return {"cpu": cpu, "python": platform.python_version(), "openssl_cli": version,
            "cryptography_openssl": backend.openssl_version_text()}


def table(report: dict[str, Any]) -> str:
    rows = [f"{'algorithm':10} {'size':>7} {'ours/s':>10} {'openssl/s':>10} {'ours/openssl':>13}"]
    for algo, result in report["results"].items():
        ceiling = result["openssl_sign_per_s"]
        for size, numbers in result["sizes"].items():
            ratio = numbers["ratio_to_openssl"]
            rows.append(f"{algo:10} {size:>7} {numbers['ours_per_s']:10.0f} "
                        f"{ceiling if ceiling is not None else float('nan'):10.0f} "
                        f"{ratio * 100 if ratio is not None else float('nan'):12.0f}%")
    if report["dkimpy_rsa2048_1KiB_per_s"] is not None:
        rows.append(f"dkimpy's own dkim.sign, rsa2048 1KiB: "
                    f"{report['dkimpy_rsa2048_1KiB_per_s']:.0f}/s")
    rows.append(f"medians of {report['repeat']} rounds of {report['seconds']} s; "
                f"{report['machine']['cpu']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sign_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="length of each measurement (default 1; openssl gets at least 1)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON here")
    parser.add_argument("--no-openssl", action="store_true", help="skip openssl speed")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeat < 1:
        parser.error("--seconds must be positive and --repeat at least 1")

    def progress(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    report = run_bench(args.seconds, args.repeat, with_openssl=not args.no_openssl,
                       dkimpy_seconds=min(2.0, args.seconds * 2), log=progress)
    emit(report, table(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
