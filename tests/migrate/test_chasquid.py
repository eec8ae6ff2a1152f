"""``mailrelay import-chasquid``: a real chasquid directory in, a working mailrelay one out.

The fixture tests/fixtures/chasquid/ was made with Debian's chasquid-util and openssl (see
its README); certificates are issued per test by the test CA, so none expire in git.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
import yaml

from mailrelay.cli.main import main
from mailrelay.config import load_config, parse_hostport
from mailrelay.delivery.manager import mda_command
from mailrelay.message.filters.hooks import Hooks
from mailrelay.migrate.chasquid import mda_template, plan_import
from mailrelay.policy.users import UserDB
from tests.support.process import python_for_other_users
from tests.support.relay import RelayEnv, free_port

FIXTURE = Path(__file__).parents[1] / "fixtures" / "chasquid"
PASSWORDS = {
    "me@example.com": "correct horse battery staple",
    "alice@example.com": 'pä"ss\\wörd €',
    "bob@example.org": "bob-password",
}

needs_chasquid_util = pytest.mark.skipif(shutil.which("chasquid-util") is None,
                                         reason="chasquid-util not installed (apt-get install "
                                                "chasquid)")


def mailrelay(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", *argv],
                          capture_output=True, text=True, timeout=60, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def run_import(capsys, *argv: str) -> tuple[int, str, str]:
    """The import in this process. As root it would make the user mailrelay and
    /var/lib/mailrelay: the tests keep everything root's (their own user) and under the
    test directory, unless they say otherwise."""
    extra: list[str] = []
    if "--service-user" not in argv and os.geteuid() == 0:
        extra += ["--service-user", "root"]
    if "--data-dir" not in argv and "-c" in argv:
        target = Path(argv[argv.index("-c") + 1])
        extra += ["--data-dir", str(target.parent / f"{target.name}-data")]
    code = main(["import-chasquid", *argv, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def add_cert(ca, directory: Path, name: str = "mail.example.com") -> None:
    cert = ca.issue_cert(name, "127.0.0.1")
    directory.mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(directory / "privkey.pem"))
    (directory / "privkey.pem").chmod(0o600)  # as certbot and acme.sh leave it
    cert.cert_chain_pems[0].write_to_path(str(directory / "fullchain.pem"))


@pytest.fixture
def chasquid(tmp_path, ca) -> Path:
    """A copy of the fixture directory with a certificate, as chasquid needs one."""
    directory = tmp_path / "chasquid"
    shutil.copytree(FIXTURE, directory)
    (directory / "README.md").unlink()  # ours, not chasquid's
    add_cert(ca, directory / "certs" / "mail.example.com")
    (directory / "certs" / "README.certs").write_text("Debian ships this file here.\n")
    return directory


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file and directory under ``directory``: content hash and mode."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            found[str(path.relative_to(directory))] = (digest, st.st_mode, st.st_mtime_ns)
    return found


def lines_starting(out: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix) for line in out.splitlines() if line.startswith(prefix)]


# --- the import -----------------------------------------------------------------------------


def test_import_converts_everything_and_never_touches_chasquid(chasquid, tmp_path, capsys):
    before = snapshot(chasquid)
    new = tmp_path / "new"
    code, out, err = run_import(capsys, str(chasquid), "-c", str(new))
    assert code == 0, err
    assert snapshot(chasquid) == before

    converted = lines_starting(out, "converted: ")
    missing = lines_starting(out, "not converted: ")
    assert any(line.startswith("hostname: mail.example.com") for line in converted)
    assert any(line.startswith("user me@example.com: same password") for line in converted)
    assert any(line.startswith("user alice@example.com: same password") for line in converted)
    assert any(line.startswith("user shop@example.org: receive-only") for line in converted)
    assert any("DKIM key of example.com, selector 20240101" in line for line in converted)
    assert any(line.startswith("certificate mail.example.com") for line in converted)
    assert any("systemd" in line and "listen.submission_tls: 0.0.0.0:465" in line
               for line in converted)
    # Everything chasquid.conf sets that mailrelay does not do, one line each, with advice.
    for word in ("mail_log_path", "chasquid's queue"):
        assert len([line for line in missing if line.startswith(word)]) == 1, (word, missing)
    # What issue 20 made mailrelay do: carried over, one line each, none "not converted".
    for word in ("monitoring_address", "dovecot", "haproxy", "hooks/", "planned"):
        assert not [line for line in missing if word in line], (word, missing)
    (metrics,) = [line for line in converted if line.startswith("metrics.listen: ")]
    assert metrics.startswith("metrics.listen: 127.0.0.1:1099 (from monitoring_address "
                              "'127.0.0.1:1099' (chasquid.conf:11);")
    (dovecot,) = [line for line in converted if line.startswith("auth.dovecot: true")]
    assert "/run/dovecot/auth-userdb" in dovecot and "/run/dovecot/auth-client" in dovecot
    (proxy,) = [line for line in converted if line.startswith("proxy_protocol: ")]
    assert proxy.startswith("proxy_protocol: 127.0.0.1/32, ::1/128 on smtp, submission and "
                            "submission_tls (from haproxy_incoming, chasquid.conf:30")
    assert "chasquid took a PROXY header from any address" in proxy
    assert "loopback is written" in proxy
    for hook in ("post-data", "alias-resolve"):
        (line,) = [line for line in converted if line.startswith(f"hooks/{hook}: ")]
        assert line.startswith(f"hooks/{hook}: copied to hooks/{hook}, run ")
    (plain,) = [line for line in missing if "legacy" in line]
    assert plain.startswith("user legacy@example.org has a plain-text password in chasquid: "
                            "imported as receive-only; set a password with "
                            "`mailrelay user passwd")

    config = load_config(new)
    assert config.hostname == "mail.example.com"
    assert config.listen.smtp == [("0.0.0.0", 25)]
    assert config.listen.submission == [("127.0.0.1", 587), ("::1", 587)]
    assert config.listen.submission_tls == [("0.0.0.0", 465)]
    assert config.limits.max_message_size == 25 * 1024 * 1024
    assert config.aliases.drop_characters == "._"
    assert config.aliases.suffix_separators == "+-"
    assert config.data_dir == tmp_path / "new-data"  # --data-dir (run_import's)
    assert stat.S_IMODE(config.data_dir.stat().st_mode) == 0o700
    assert config.tls.certs_dir == chasquid / "certs"  # referenced, not copied
    assert not (new / "certs").exists()
    assert config.domains == ("example.com", "example.org")
    # chasquid's %placeholders% became ours; %from% goes through $SENDER.
    assert mda_command(config.delivery.local_mda, "me@example.com") == (
        "/bin/sh -c 'exec /usr/lib/dovecot/dovecot-lda -f \"$SENDER\" -d \"$3\" "
        "-m INBOX/\"$1\"@\"$2\"' mda me example.com me@example.com")

    domain = new / "domains" / "example.com"
    assert (domain / "aliases").read_bytes() == (
        chasquid / "domains" / "example.com" / "aliases").read_bytes()
    key = domain / "dkim:20240101.pem"
    assert key.read_bytes() == (chasquid / "domains" / "example.com" / "dkim:20240101.pem"
                                ).read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((domain / "users").stat().st_mode) == 0o600
    org = UserDB.load(new / "domains" / "example.org" / "users", "example.org")
    assert org.names() == ["bob", "legacy", "shop"]
    assert not org.can_login("shop") and not org.can_login("legacy")
    assert "wrote 8 file(s)" in out

    # issue 20: /metrics, dovecot auth, the PROXY protocol and the hooks carried over.
    assert config.metrics.listen == ("127.0.0.1", 1099)
    assert config.auth.dovecot
    assert config.auth.dovecot_userdb_path == Path("/run/dovecot/auth-userdb")
    assert config.auth.dovecot_client_path == Path("/run/dovecot/auth-client")
    loopback = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    for kind in ("smtp", "submission", "submission_tls"):
        assert config.proxy_protocol.trusted(kind) == loopback, kind
    for hook in ("post-data", "alias-resolve"):
        copied = new / "hooks" / hook
        assert copied.read_bytes() == (chasquid / "hooks" / hook).read_bytes()
        assert stat.S_IMODE(copied.stat().st_mode) == 0o755
    # mailrelay's hook runner finds both where the imported configuration says.
    hooks = Hooks.from_config(config)
    assert (hooks.post_data, hooks.alias_resolve) == (new / "hooks" / "post-data",
                                                      new / "hooks" / "alias-resolve")


def test_imported_config_checks_and_passwords_still_work(chasquid, tmp_path, capsys):
    new = tmp_path / "new"
    assert run_import(capsys, str(chasquid), "-c", str(new))[0] == 0

    result = mailrelay("check", "-c", str(new))
    assert result.returncode == 0, result.stderr
    assert "domain example.com: 2 user(s), 5 alias(es) + catch-all, 1 DKIM key(s)" in result.stdout

    def authenticate(address: str, password: str) -> int:
        return mailrelay("-c", str(new), "user", "authenticate", address, "--password-stdin",
                         stdin=password + "\n").returncode

    for address, password in PASSWORDS.items():
        assert authenticate(address, password) == 0, address
        assert authenticate(address, password + " ") == 1, address
    assert authenticate("me@example.com", PASSWORDS["alice@example.com"]) == 1
    assert authenticate("shop@example.org", "") == 1
    assert authenticate("legacy@example.org", "legacy-password") == 1


def test_dry_run_writes_nothing(chasquid, tmp_path, capsys):
    new = tmp_path / "new"
    code, out, _ = run_import(capsys, str(chasquid), "-c", str(new), "--dry-run")
    assert code == 0
    assert not new.exists()
    assert f"would write {new / 'mailrelay.yaml'} (mode 0640)" in out  # as init writes it
    assert f"would write {new / 'domains' / 'example.com' / 'users'} (mode 0600)" in out
    assert 'hostname: "mail.example.com"' in out  # the YAML it would write
    assert out.rstrip().endswith("dry run: nothing written")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_import(capsys, str(chasquid), "-c", str(empty), "--dry-run")[0] == 0
    assert list(empty.iterdir()) == []


def test_refuses_a_directory_that_has_a_mailrelay_yaml(chasquid, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    (new / "mailrelay.yaml").write_text("hostname: keep.example.com\n")
    for extra in ((), ("--dry-run",)):
        result = mailrelay("import-chasquid", str(chasquid), "-c", str(new), *extra)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "mailrelay.yaml already exists" in result.stderr
    assert [p.name for p in new.iterdir()] == ["mailrelay.yaml"]
    assert (new / "mailrelay.yaml").read_text() == "hostname: keep.example.com\n"


def test_refuses_to_write_inside_chasquids_directory(chasquid, capsys):
    before = snapshot(chasquid)
    for target in (chasquid, chasquid / "mailrelay"):
        code, _, err = run_import(capsys, str(chasquid), "-c", str(target))
        assert code == 1
        assert "must be outside" in err
    assert snapshot(chasquid) == before


def test_refuses_to_replace_existing_files(chasquid, tmp_path, capsys):
    new = tmp_path / "new"
    (new / "domains" / "example.org").mkdir(parents=True)
    (new / "domains" / "example.org" / "aliases").write_text("mine: me\n")
    code, _, err = run_import(capsys, str(chasquid), "-c", str(new))
    assert code == 1 and "aliases already exists" in err
    assert (new / "domains" / "example.org" / "aliases").read_text() == "mine: me\n"
    assert not (new / "mailrelay.yaml").exists()
    assert not (new / "domains" / "example.com").exists()


def test_copy_certs(chasquid, tmp_path, capsys):
    new = tmp_path / "new"
    code, out, _ = run_import(capsys, str(chasquid), "-c", str(new), "--copy-certs")
    assert code == 0
    copied = new / "certs" / "mail.example.com"
    assert stat.S_IMODE((copied / "privkey.pem").stat().st_mode) == 0o600
    assert (copied / "fullchain.pem").read_bytes() == (
        chasquid / "certs" / "mail.example.com" / "fullchain.pem").read_bytes()
    assert load_config(new).tls.certs_dir == new / "certs"
    assert "copied to certs/" in out
    assert mailrelay("check", "-c", str(new)).returncode == 0


def test_chasquid_defaults(tmp_path, capsys):
    """A chasquid.conf that sets nothing: systemd sockets, 50 MB, maildrop, '.' and '+'."""
    chasquid = tmp_path / "chasquid"
    (chasquid / "domains" / "example.com").mkdir(parents=True)
    (chasquid / "chasquid.conf").write_text("# nothing set\n")
    plan = plan_import(chasquid, tmp_path / "new", which=lambda name: None)
    config = yaml.safe_load(plan.config_text)
    assert config["listen"] == {"smtp": ["0.0.0.0:25"], "submission": ["0.0.0.0:587"],
                                "submission_tls": ["0.0.0.0:465"]}
    assert config["limits"]["max_message_size"] == "50MiB"
    assert config["aliases"] == {"drop_characters": ".", "suffix_separators": "+"}
    assert "delivery" not in config  # maildrop is not installed: the built-in Maildir
    assert any("maildrop, is not installed" in line for line in plan.not_converted)
    assert any("no usable certificate" in line for line in plan.not_converted)
    assert len([line for line in plan.converted if "'systemd'" in line]) == 3

    # Where maildrop is installed, chasquid's default MDA carries over.
    plan = plan_import(chasquid, tmp_path / "new", which=lambda name: f"/usr/bin/{name}")
    local_mda = yaml.safe_load(plan.config_text)["delivery"]["local_mda"]
    assert mda_command(local_mda, "me@example.com") == (
        "/bin/sh -c 'exec maildrop -f \"$SENDER\" -d \"$1\"' mda me example.com me@example.com")


def test_later_chasquid_settings_and_unknown_ones(tmp_path, capsys):
    chasquid = tmp_path / "chasquid"
    chasquid.mkdir()
    (chasquid / "chasquid.conf").write_text(
        'hostname: "MX.Example.COM."\n'
        "max_queue_items: 300\n"
        'give_up_send_after: "72h"\n'
        'smtp_address: "0.0.0.0:smtp"\n'
        'suffix_separators: ""\n'
        "future_setting: 3\n"
    )
    new = tmp_path / "new"
    code, out, err = run_import(capsys, str(chasquid), "-c", str(new))
    assert code == 0, err
    config = load_config(new)
    assert config.hostname == "mx.example.com"
    assert config.limits.max_queue_items == 300
    assert config.delivery.give_up_after == 72 * 3600
    assert "  give_up_after: 3d\n" in (new / "mailrelay.yaml").read_text()  # not 259200s
    assert stat.S_IMODE((new / "mailrelay.yaml").stat().st_mode) == 0o640
    assert config.listen.smtp == [("0.0.0.0", 25)]  # the unusable one is reported instead
    assert config.aliases.suffix_separators == ""
    missing = lines_starting(out, "not converted: ")
    assert any(line.startswith("chasquid.conf:6: unknown setting future_setting")
               for line in missing)
    assert any("0.0.0.0:smtp" in line and "listen.smtp" in line for line in missing)


def test_broken_chasquid_conf_is_one_line_naming_the_line(tmp_path):
    chasquid = tmp_path / "chasquid"
    chasquid.mkdir()
    (chasquid / "chasquid.conf").write_text('hostname: "a"\nmax_data_size_mb: "big"\n')
    result = mailrelay("import-chasquid", str(chasquid), "-c", str(tmp_path / "new"))
    assert result.returncode == 1
    assert result.stderr == (f"mailrelay: {chasquid / 'chasquid.conf'}:2: "
                             "max_data_size_mb must be a whole number\n")
    assert not (tmp_path / "new").exists()

    result = mailrelay("import-chasquid", str(tmp_path), "-c", str(tmp_path / "new"))
    assert result.returncode == 1 and "chasquid's configuration directory?" in result.stderr


def test_monitoring_dovecot_haproxy_and_hooks_variants(tmp_path, capsys):
    chasquid = tmp_path / "chasquid"
    (chasquid / "hooks").mkdir(parents=True)
    (chasquid / "chasquid.conf").write_text(
        'hostname: "mail.example.net"\n'
        'monitoring_address: ":1099"\n'
        'dovecot_userdb_path: "/run/dovecot/auth-userdb"\n')
    (chasquid / "hooks" / "post-data").write_text("#!/bin/sh\nexit 0\n")  # not executable
    (chasquid / "hooks" / "alias-exists").write_text("#!/bin/sh\nexit 1\n")
    (chasquid / "hooks" / "alias-exists").chmod(0o755)
    new = tmp_path / "new"
    code, out, err = run_import(capsys, str(chasquid), "-c", str(new))
    assert code == 0, err
    converted = lines_starting(out, "converted: ")
    missing = lines_starting(out, "not converted: ")
    config = load_config(new)
    # Go's ":1099" listened everywhere; /metrics has no authentication: loopback, said so.
    assert config.metrics.listen == ("127.0.0.1", 1099)
    (metrics,) = [line for line in converted if line.startswith("metrics.listen: ")]
    assert "chasquid listened on every address there" in metrics
    # Socket paths without dovecot_auth: chasquid did not use them either.
    assert not config.auth.dovecot and config.auth.dovecot_userdb_path is None
    assert any(line.startswith("dovecot_userdb_path '/run/dovecot/auth-userdb' "
                               "(chasquid.conf:3): dovecot_auth is off") for line in missing)
    assert config.proxy_protocol.trusted("smtp") == ()  # no haproxy_incoming
    # A hook chasquid could not run is copied as it was, and said so; alias-exists is not.
    hook = new / "hooks" / "post-data"
    assert stat.S_IMODE(hook.stat().st_mode) == 0o644
    assert any(line.startswith("hooks/post-data is not executable") for line in missing)
    assert Hooks.from_config(config).post_data is None
    assert not (new / "hooks" / "alias-exists").exists()
    assert any(line.startswith("hooks/alias-exists: mailrelay runs no alias-exists hook")
               for line in missing)

    chasquid2 = tmp_path / "chasquid2"
    chasquid2.mkdir()
    (chasquid2 / "chasquid.conf").write_text('hostname: "mail.example.net"\n'
                                            'monitoring_address: "localhost"\n')
    code, out, _ = run_import(capsys, str(chasquid2), "-c", str(tmp_path / "new2"))
    assert code == 0
    assert any(line.startswith("monitoring_address 'localhost' (chasquid.conf:2): ")
               and "set metrics.listen (host:port) by hand" in line
               for line in lines_starting(out, "not converted: "))
    assert load_config(tmp_path / "new2").metrics.listen is None


def test_odd_domains_users_aliases_and_hook_dkim(chasquid, tmp_path, capsys):
    """What chasquid tolerates and mailrelay does not is reported, not copied blindly."""
    # chasquid-util keeps the domain's case in the directory name.
    os.rename(chasquid / "domains" / "example.org", chasquid / "domains" / "Example.ORG")
    odd = chasquid / "domains" / "example.net"
    odd.mkdir()
    (odd / "aliases").write_text("good: me\nthis line has no colon\n*: me\n")
    (odd / "users").write_text(
        'users: { key: "short" value: { scrypt: { logN: 14 r: 8 p: 1 keyLen: 32 '
        'salt: "abc" encrypted: "0123456789abcdef0123456789abcdef" } } }\n'
        'users: { key: "nopass" }\n')
    (odd / "notes.txt").write_text("mine\n")
    # The dkimsign layout of chasquid's example post-data hook.
    (odd / "dkim_selector").write_text("hooksel\n")
    (chasquid / "certs" / "example.net").mkdir()
    shutil.copy(chasquid / "domains" / "example.com" / "dkim:20240101.pem",
                chasquid / "certs" / "example.net" / "dkim_privkey.pem")

    new = tmp_path / "new"
    code, out, err = run_import(capsys, str(chasquid), "-c", str(new))
    assert code == 0, err
    converted = lines_starting(out, "converted: ")
    missing = lines_starting(out, "not converted: ")
    assert "domain example.org (renamed from Example.ORG)" in converted
    assert any("selector hooksel from the post-data hook" in line for line in converted)
    assert any("aliases of example.net, line 2" in line for line in missing)
    assert any(line.startswith("user short@example.net: its chasquid password hash is "
                               "unusable (salt is too short") for line in missing)
    assert any(line.startswith("user nopass@example.net has no password") for line in missing)
    assert any("notes.txt" in line for line in missing)
    assert any("certs/example.net: lacks fullchain.pem" in line for line in missing)

    aliases = (new / "domains" / "example.net" / "aliases").read_text()
    assert "# import-chasquid: not understood: this line has no colon\n" in aliases
    assert (new / "domains" / "example.net" / "dkim:hooksel.pem").exists()
    net = UserDB.load(new / "domains" / "example.net" / "users", "example.net")
    assert net.names() == ["nopass", "short"] and not net.can_login("short")
    result = mailrelay("check", "-c", str(new))
    assert "domain example.org: 3 user(s)" in result.stdout
    # The import is faithful, and check says what chasquid let pass: example.net has no
    # user "me", so its aliases, catch-all and postmaster@ deliver nowhere.
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    net_aliases = new / "domains" / "example.net" / "aliases"
    assert any(f"{net_aliases}:1: good@example.net delivers nowhere" in e for e in errors), errors
    assert any(f"{net_aliases}:3: the catch-all of example.net" in e for e in errors), errors
    assert any("postmaster@example.net is refused" in e for e in errors), errors
    assert len(errors) == 3, errors


def test_mda_template_quotes_and_placeholders():
    template = mda_template("/usr/bin/deliver it", ["--to=%to%", "{x}", "", "%to_user%"])
    assert template == "'/usr/bin/deliver it' --to={address} '{{x}}' '' {user}"
    command = mda_command(template, "o'brien@example.com")
    assert shlex.split(command) == ["/usr/bin/deliver it", "--to=o'brien@example.com", "{x}",
                                    "", "o'brien"]


@needs_chasquid_util
def test_directory_made_by_chasquid_util_imports(tmp_path, capsys):
    chasquid = tmp_path / "chasquid"
    chasquid.mkdir()
    (chasquid / "chasquid.conf").write_text('hostname: "mail.example.net"\n')
    passwords = {"ana@example.net": "ana's pässword", "Ben@Example.net": "ben"}
    for address, password in passwords.items():
        subprocess.run(["chasquid-util", f"-C={chasquid}", "user-add", address,
                        f"--password={password}"], check=True, capture_output=True, timeout=60)
    before = snapshot(chasquid)
    new = tmp_path / "new"
    code, out, err = run_import(capsys, str(chasquid), "-c", str(new))
    assert code == 0, err
    assert snapshot(chasquid) == before
    # chasquid-util made domains/Example.net for Ben besides domains/example.net: the
    # lower-case one is imported, the other reported rather than merged silently.
    assert "domain example.net" in lines_starting(out, "converted: ")
    assert any(line.startswith("domains/Example.net: the same domain as domains/example.net")
               for line in lines_starting(out, "not converted: "))
    db = UserDB.load(new / "domains" / "example.net" / "users", "example.net")
    assert db.check_password("ana", "ana's pässword")
    assert not db.check_password("ana", "ana")


# --- the imported server takes mail --------------------------------------------------------


def imported_env(tmp_path: Path, chasquid: Path, dns_server, ca, capsys,
                 keep_mda: bool = False) -> RelayEnv:
    """Import ``chasquid`` into env.config_dir, then point it at loopback: free ports, the
    test DNS server, a data_dir under the test directory."""
    env = RelayEnv(root=tmp_path, dns=dns_server, ca=ca, sink_port=free_port())
    code, _, err = run_import(capsys, str(chasquid), "-c", str(env.config_dir))
    assert code == 0, err
    path = env.config_dir / "mailrelay.yaml"
    settings = yaml.safe_load(path.read_text())
    env.ports = {name: free_port() for name in ("smtp", "submission", "submission_tls")}
    settings["listen"] = {name: [f"127.0.0.1:{port}"] for name, port in env.ports.items()}
    settings["data_dir"] = "var"
    settings["dns"] = {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": "2s"}
    # No haproxy, no dovecot and chasquid's monitoring port in this test network: the
    # clients connect directly, users are in the users files.
    for section in ("proxy_protocol", "auth", "metrics"):
        settings.pop(section, None)
    delivery = settings.setdefault("delivery", {})
    if not keep_mda:
        delivery.pop("local_mda", None)
    delivery.update({"smtp_port": env.sink_port, "retry_intervals": ["1s"]})
    settings.setdefault("limits", {})["auth_failure_delay"] = "0s"
    path.write_text(yaml.safe_dump(settings))
    return env


def message(sender: str, to: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, "moved from chasquid"
    msg.set_content("Hello from the imported configuration.\n")
    return msg.as_bytes()


async def test_imported_server_accepts_the_original_password(chasquid, tmp_path, dns_server,
                                                             ca, capsys):
    env = imported_env(tmp_path, chasquid, dns_server, ca, capsys)
    try:
        await env.start()
        await env.submit(["sales@example.com"], message("alice@example.com", "sales@example.com"),
                         sender="alice@example.com", password=PASSWORDS["alice@example.com"])
        # "sales: me" came over with the aliases, so it reaches me's Maildir.
        delivered = await env.wait_mailbox(1, "me@example.com")
        assert b"moved from chasquid" in delivered[0]
        assert b"DKIM-Signature:" in delivered[0]  # chasquid's key signs
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await env.submit(["me@example.com"], message("me@example.com", "me@example.com"),
                             sender="me@example.com", password="not the password")
    finally:
        await env.stop()
        env.close()


async def test_imported_mda_command_runs_with_chasquids_arguments(chasquid, tmp_path,
                                                                   dns_server, ca, capsys):
    out = tmp_path / "mda-out"
    out.mkdir()
    script = tmp_path / "mda"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {out}/args\ncat > {out}/message\n')
    script.chmod(0o755)
    conf = chasquid / "chasquid.conf"
    text = conf.read_text().replace("/usr/lib/dovecot/dovecot-lda", str(script))
    conf.write_text(text)
    env = imported_env(tmp_path, chasquid, dns_server, ca, capsys, keep_mda=True)
    try:
        await env.start()
        await env.submit(["me@example.com"], message("alice@example.com", "me@example.com"),
                         sender="alice@example.com", password=PASSWORDS["alice@example.com"])
        await env.wait_queue_empty()
    finally:
        await env.stop()
        env.close()
    # chasquid.conf: -f %from% -d %to% -m INBOX/%to_user%@%to_domain%
    assert (out / "args").read_text().splitlines() == [
        "-f", "alice@example.com", "-d", "me@example.com", "-m", "INBOX/me@example.com"]
    assert b"moved from chasquid" in (out / "message").read_bytes()


def test_listen_values_are_valid_hostports(chasquid, tmp_path):
    plan = plan_import(chasquid, tmp_path / "new")
    for values in yaml.safe_load(plan.config_text)["listen"].values():
        for value in values:
            parse_hostport(value)


# --- as root: the service user, as init does it ----------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                    reason="creating a system user needs root and useradd")
def test_as_root_everything_goes_to_the_service_user_and_checks(chasquid):
    """The operator's migration: import as root wrote everything root's (0750), so
    `check --user mailrelay` stopped at "cannot read mailrelay.yaml", and data_dir did not
    exist. Now the service user (created when missing) gets the new directory and the
    data directory, and the result checks as that user."""
    name = f"mrtest{secrets.token_hex(3)}"
    open_dir = Path(tempfile.mkdtemp(prefix="mailrelay-import-"))
    try:
        open_dir.chmod(0o755)
        target, data = open_dir / "etc" / "mailrelay", open_dir / "lib" / "mailrelay"
        result = mailrelay("import-chasquid", str(chasquid), "-c", str(target), "--copy-certs",
                           "--service-user", name, "--data-dir", str(data))
        assert result.returncode == 0, result.stderr
        entry = pwd.getpwnam(name)
        ids = (entry.pw_uid, entry.pw_gid)
        assert f"created user {name} (useradd --system --user-group " in result.stdout
        assert entry.pw_shell == "/usr/sbin/nologin"
        for path in [target, *target.rglob("*"), data]:
            assert (path.stat().st_uid, path.stat().st_gid) == ids, path
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((target / "mailrelay.yaml").stat().st_mode) == 0o640
        assert (open_dir / "lib").stat().st_uid == 0  # made on the way: root's, traversable
        assert stat.S_IMODE((open_dir / "lib").stat().st_mode) == 0o755
        assert f"created data_dir {data}/ ({name}'s)" in result.stdout
        assert f"  setpriv --reuid={name} --regid={name} --init-groups " in result.stdout

        checked = subprocess.run([python_for_other_users(), "-m", "mailrelay.cli.main", "check",
                                  "-c", str(target)], capture_output=True, text=True,
                                 timeout=60, cwd="/")
        assert checked.stdout.startswith(f"checked as {name} (uid {entry.pw_uid}), the owner "
                                         f"of {target}\n"), checked.stdout + checked.stderr
        assert checked.returncode == 0, checked.stderr
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True, timeout=60)
        subprocess.run(["groupdel", name], capture_output=True, timeout=60)


def test_service_user_needs_root_and_data_dir_is_never_chasquids(chasquid, tmp_path):
    result = mailrelay("import-chasquid", str(chasquid), "-c", str(tmp_path / "new"),
                       "--data-dir", "/var/lib/chasquid")
    assert result.returncode == 1
    assert result.stderr == ("mailrelay: --data-dir /var/lib/chasquid is chasquid's data_dir: "
                             "give mailrelay a directory of its own (nothing was written)\n")
    assert not (tmp_path / "new").exists()
