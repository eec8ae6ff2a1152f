"""Real spam filters on loopback for the tests: SpamAssassin's spamd and rspamd.

Both are Debian's packages (``scripts/setup`` installs them), started here on a free
loopback port with a private configuration, all their files under one test directory,
and stopped (their whole process group) at teardown. Neither may reach the network.

spamd: Debian ships SpamAssassin's rules (/usr/share/spamassassin, no sa-update needed),
but their score for a test message depends on its addresses and on missing reverse DNS
(3.7 of 5 for a plain one). The tests want a fixed answer, so spamd reads a one-rule
configuration instead: the Check plugin and the GTUBE rule as Debian's 20_body_tests.cf
and 50_scores.cf define it (``-C`` replaces the rules directory, ``--siteconfigpath``
the site one); ``-L`` keeps it off the network. GTUBE scores 1000 of 5, anything else 0.

rspamd: a configuration of its own instead of /etc/rspamd (whose modules want DNS and
redis): one normal worker, no rules but rspamd's built-in GTUBE patterns with the test
ones enabled (``enable_test_patterns``: XJS... reject, YJS... add header, ZJS...
rewrite subject), the milter_headers module for a milter block, a five-line TLD list
(compiling Debian's full one takes 15 s), DNS pointed at a closed loopback port, and
its hyperscan caches in the test directory (by default they go to /var/lib/rspamd).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.ports import free_port

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# rspamd's other test patterns (enabled below): the actions they force.
GTUBE_ADD_HEADER = "Y" + GTUBE[1:]
GTUBE_REWRITE_SUBJECT = "Z" + GTUBE[1:]

SPAMD = shutil.which("spamd") or ("/usr/sbin/spamd" if os.access("/usr/sbin/spamd", os.X_OK)
                                  else None)
SPAMC = shutil.which("spamc")
RSPAMD = shutil.which("rspamd") or ("/usr/bin/rspamd" if os.access("/usr/bin/rspamd", os.X_OK)
                                    else None)
RSPAMC = shutil.which("rspamc") or ("/usr/bin/rspamc" if os.access("/usr/bin/rspamc", os.X_OK)
                                    else None)
SA_RULES = Path("/usr/share/spamassassin")

START_TIMEOUT = 30.0

SPAMD_CF = r"""# One rule: GTUBE, as SpamAssassin's 20_body_tests.cf and 50_scores.cf define it.
loadplugin Mail::SpamAssassin::Plugin::Check
util_rb_tld com org net test
required_score 5.0
body GTUBE /XJS\*C4JDBQADN1\.NSBN3\*2IDNEN\*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL\*C\.34X/
describe GTUBE Generic Test for Unsolicited Bulk Email
tflags GTUBE userconf noautolearn
score GTUBE 1000.000
"""

RSPAMD_CONF = """options {{
    pidfile = "{run}/rspamd.pid";
    control_socket = "{run}/rspamd.sock mode=0600";
    dynamic_conf = "{db}/rspamd_dynamic";
    cache_file = "{db}/symbols.cache";
    hs_cache_dir = "{db}";
    tempdir = "{tmp}";
    url_tld = "{root}/tld.dat";
    filters = "";
    local_addrs = [];
    enable_test_patterns = true;
    dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.1s; retransmits = 1; }}
}}
logging {{ type = "console"; level = "notice"; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; }}
worker "hs_helper" {{ cache_dir = "{db}"; }}
modules {{ path = "${{PLUGINSDIR}}"; }}
milter_headers {{ use = ["x-spamd-result", "x-rspamd-action"]; }}
"""


def spamd_unavailable() -> str | None:
    """Why spamd and spamc cannot run here, or None."""
    missing = [name for name, path in (("spamd", SPAMD), ("spamc", SPAMC)) if path is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (scripts/setup, or apt-get install "
                "spamassassin spamd spamc)")
    return None


def rspamd_unavailable() -> str | None:
    """Why rspamd cannot run here, or None."""
    if RSPAMD is None:
        return "rspamd is not installed (scripts/setup, or apt-get install rspamd)"
    return None


class _Daemon:
    """A daemon in its own process group, its output in a log file."""

    name = "daemon"

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = root / f"{self.name}.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s: "
                           f"{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        # Children (spamd's and rspamd's workers) go with the group, whatever the parent did.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        self.cleanup()

    def cleanup(self) -> None:
        """Remove what lives outside ``root``."""

    def listening(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0


class Spamd(_Daemon):
    """SpamAssassin's spamd with the one-rule configuration (see the module's docstring)."""

    name = "spamd"

    def __init__(self, root: Path):
        super().__init__(root)
        # Started by root, spamd reads its rules as nobody (it refuses to scan as root),
        # and nobody cannot get through pytest's private temporary directories: its
        # configuration then lives in a directory of its own, removed at stop.
        self.public = root
        if os.geteuid() == 0:
            self.public = Path(tempfile.mkdtemp(prefix="mailrelay-test-spamd-"))
            self.public.chmod(0o755)

    def cleanup(self) -> None:
        if self.public != self.root:
            shutil.rmtree(self.public, ignore_errors=True)

    def command(self) -> list[str]:
        rules, site, home = (self.public / "rules", self.public / "site",
                             self.public / "home")
        for directory in (rules, site, home):
            directory.mkdir(mode=0o755, exist_ok=True)
        (rules / "local.cf").write_text(SPAMD_CF)
        (rules / "local.cf").chmod(0o644)
        command = [SPAMD, "-L", "-x", "-C", str(rules), f"--siteconfigpath={site}",
                   "-i", f"127.0.0.1:{self.port}", "-A", "127.0.0.1", "-m", "1",
                   "--min-children=1", "-r", str(self.root / "spamd.pid"), "-s", "stderr",
                   "-H", str(home)]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # spamd will not scan as root
        return command

    def ready(self) -> bool:
        if not self.listening():
            return False
        ping = subprocess.run([SPAMC, "-d", "127.0.0.1", "-p", str(self.port), "-K"],
                              capture_output=True, timeout=5)
        return ping.returncode == 0

    def spamc_wrapper(self, bin_dir: Path) -> Path:
        """``bin_dir/spamc``: the real spamc pointed at this spamd.

        chasquid's hook runs plain ``spamc``, which would ask localhost:783 (or whatever
        /etc/spamassassin/spamc.conf says); on a server that is where spamd listens.
        """
        wrapper = bin_dir / "spamc"
        wrapper.write_text(f'#!/bin/sh\nexec {SPAMC} -d 127.0.0.1 -p {self.port} "$@"\n')
        wrapper.chmod(0o755)
        return wrapper


class Rspamd(_Daemon):
    """rspamd with the minimal configuration (see the module's docstring)."""

    name = "rspamd"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        dirs = {name: self.root / name for name in ("run", "db", "tmp")}
        for directory in dirs.values():
            directory.mkdir(exist_ok=True)
        (self.root / "tld.dat").write_text("com\norg\nnet\ntest\nexample\n")
        conf = self.root / "rspamd.conf"
        conf.write_text(RSPAMD_CONF.format(port=self.port, root=self.root,
                                           **{k: str(v) for k, v in dirs.items()}))
        # -i: a root-run rspamd keeps its workers as root instead of refusing to start.
        return [RSPAMD, "-f", "-i", "-c", str(conf)]

    def ready(self) -> bool:
        if not self.listening():
            return False
        try:
            # No proxy from the environment: this is loopback.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"{self.url}/ping", timeout=2) as answer:
                return answer.read().strip() == b"pong"
        except OSError:
            return False

    def rspamc_wrapper(self, bin_dir: Path) -> Path:
        """``bin_dir/rspamc``: the real rspamc pointed at this rspamd."""
        wrapper = bin_dir / "rspamc"
        wrapper.write_text(f'#!/bin/sh\nexec {RSPAMC} -h 127.0.0.1:{self.port} "$@"\n')
        wrapper.chmod(0o755)
        return wrapper
