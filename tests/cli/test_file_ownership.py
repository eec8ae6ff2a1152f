"""Files the CLI writes belong to the service, whoever runs it: run as root in a
configuration directory owned by another uid (4242, which has no name: chown works for
root regardless), every new file and directory of `user add`, `dkim keygen` and `aliases
edit` gets the owner of the directory it is written into (fsutil.owner_for), with a safe
mode; `import-chasquid` and `init` hand their directories to --service-user first."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVICE = (4242, 4242)
FIXTURE = Path(__file__).parents[1] / "fixtures" / "chasquid"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def mailrelay(*argv: str, stdin: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", *argv],
                            capture_output=True, text=True, timeout=60, input=stdin,
                            stdin=None if stdin is not None else subprocess.DEVNULL,
                            env=env)
    assert result.returncode == 0, result.stderr
    return result


def owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def confdir() -> Iterator[Path]:
    """A configuration directory as the service owns it: 4242 throughout, where 4242 can
    reach it (pytest's tmp_path is root's alone)."""
    open_dir = Path(tempfile.mkdtemp(prefix="mailrelay-owner-"))
    open_dir.chmod(0o755)
    yield _service_conf(open_dir)
    shutil.rmtree(open_dir, ignore_errors=True)


def _service_conf(directory: Path) -> Path:
    conf = directory / "conf"
    (conf / "domains" / "example.com").mkdir(parents=True)
    (conf / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    for path in (conf, conf / "domains", conf / "domains" / "example.com",
                 conf / "mailrelay.yaml"):
        os.chown(path, *SERVICE)
    return conf


def test_user_add_into_a_service_directory(confdir):
    mailrelay("user", "add", "me@example.com", "--password-stdin", "-c", str(confdir),
              stdin="secret-password\n")
    users = confdir / "domains" / "example.com" / "users"
    assert owner(users) == SERVICE and mode(users) == 0o600
    # Rewritten by root again (a second user): still the service's.
    mailrelay("user", "add", "you@example.com", "--password-stdin", "-c", str(confdir),
              stdin="another-password\n")
    assert owner(users) == SERVICE and mode(users) == 0o600


def test_dkim_keygen_into_a_service_directory(confdir):
    """The issue's case: root's `dkim keygen` left a root:root 0600 key the server could
    not read, so mail went out unsigned."""
    mailrelay("dkim", "keygen", "example.com", "--selector", "s1", "-c", str(confdir))
    key = confdir / "domains" / "example.com" / "dkim:s1.pem"
    assert owner(key) == SERVICE and mode(key) == 0o600


def test_aliases_edit_creates_a_service_file(confdir, tmp_path):
    editor = tmp_path / "editor.py"
    editor.write_text("import sys\nopen(sys.argv[1], 'a').write('sales: me@elsewhere.test\\n')\n")
    mailrelay("aliases", "edit", "example.com", "-c", str(confdir),
              env={**os.environ, "EDITOR": f"{sys.executable} {editor}"})
    aliases = confdir / "domains" / "example.com" / "aliases"
    assert "sales: me@elsewhere.test" in aliases.read_text()
    assert owner(aliases) == SERVICE and mode(aliases) == 0o644


def test_import_chasquid_into_a_service_directory(tmp_path, ca):
    chasquid = tmp_path / "chasquid"
    shutil.copytree(FIXTURE, chasquid)
    cert = ca.issue_cert("mail.example.com")
    (chasquid / "certs" / "mail.example.com").mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(chasquid / "certs" / "mail.example.com" /
                                           "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(chasquid / "certs" / "mail.example.com" /
                                              "fullchain.pem"))
    target = tmp_path / "etc" / "mailrelay"  # etc/ is made on the way
    mailrelay("import-chasquid", str(chasquid), "-c", str(target), "--copy-certs",
              "--service-user", "nobody", "--data-dir", str(tmp_path / "var"))
    nobody = 65534, 65534
    found = sorted(target.rglob("*"))
    assert any(p.name == "users" for p in found) and any(p.suffix == ".pem" for p in found)
    assert owner(tmp_path / "etc") == (0, 0) and mode(tmp_path / "etc") == 0o755
    assert owner(tmp_path / "var") == nobody and mode(tmp_path / "var") == 0o700
    for path in [target, *found]:
        assert owner(path) == nobody, path
        if path.is_dir():
            assert mode(path) == 0o750, path
        elif path.name in ("users", "privkey.pem") or path.name.startswith("dkim:"):
            assert mode(path) == 0o600, path


def test_init_files_belong_to_the_service_user(tmp_path):
    """As root, init hands the configuration and data directories to --service-user (an
    existing one here, so no account is made), and everything below follows."""
    nobody = 65534, 65534
    (tmp_path / "etc").mkdir(mode=0o755)  # made by root beforehand: handed over too
    result = mailrelay("init", "example.com", "--hostname", "mail.example.com", "--forward-to",
              "me@gmail.test", "--user", "me@example.com", "--password-stdin",
              "-c", str(tmp_path / "etc"), "--data-dir", str(tmp_path / "srv" / "var"),
              "--service-user", "nobody", "--no-systemd", "--ip", "192.0.2.1",
              stdin="secret-password\n")
    assert f"changed owner  {tmp_path / 'etc'}/ (to nobody" in result.stdout
    for path in [tmp_path / "etc", *sorted((tmp_path / "etc").rglob("*")),
                 tmp_path / "srv" / "var"]:
        assert owner(path) == nobody, path
    assert mode(tmp_path / "srv" / "var") == 0o700
    # Made on the way to the data directory: root's, and the service user can pass it.
    assert owner(tmp_path / "srv") == (0, 0) and mode(tmp_path / "srv") == 0o755
