"""``mailrelay check`` run as a real subprocess: it loads what ``serve`` loads, as the
server's user sees the files, and names file and line of every error and warning.

Each case of issue 18's "check says OK, serve refuses" has a test here. Cases about
another user's permissions chown the configuration to 4242 (a uid without a name: root
may chown to it) inside a directory every user can traverse, since pytest's tmp_path is
root's alone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from mailrelay.message.dkim.keys import generate_key, write_key
from mailrelay.policy import users as users_mod
from mailrelay.policy.users import UserDB
from tests.delivery.test_relay import RELAY_PASSWORD, configure_relay, start_relay
from tests.support.process import make_python, python_for_other_users
from tests.support.relay import free_port

REPO = Path(__file__).resolve().parents[2]
SERVICE = (4242, 4242)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, uid switch)")


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    # Hashes written by this process; the server reads any valid ln.
    monkeypatch.setattr(users_mod, "SCRYPT_LN", 4)


def mailrelay(*argv: str, prefix: tuple[str, ...] = (),
              python: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real command. Its Python is one the checked user (4242) may execute, as on a
    server (this test interpreter may be root's alone: check reports that, see
    test_a_python_the_service_user_cannot_run_is_an_error)."""
    return subprocess.run(
        [*prefix, python or python_for_other_users(), "-m", "mailrelay.cli.main", *argv],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/",
    )


def check(confdir: Path, *extra: str,
          python: str | None = None) -> subprocess.CompletedProcess[str]:
    return mailrelay("check", "-c", str(confdir), *extra, python=python)


def findings(result: subprocess.CompletedProcess[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) without their prefixes; nothing else may be on stderr."""
    assert "Traceback" not in result.stderr + result.stdout
    errors, warnings = [], []
    for line in result.stderr.splitlines():
        kind, _, text = line.partition(": ")
        assert kind in ("error", "warning"), line
        (errors if kind == "error" else warnings).append(text)
    assert (result.returncode == 1) == bool(errors), (result.returncode, result.stderr)
    return errors, warnings


def only_error(result: subprocess.CompletedProcess[str]) -> str:
    errors, _ = findings(result)
    assert len(errors) == 1, errors
    return errors[0]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 with exactly one line on stderr and no traceback; returns that line."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailrelay: ")
    return lines[0]


def write_config(directory: Path, body: str = "tls: {self_signed: true}\n") -> Path:
    path = directory / "mailrelay.yaml"
    path.write_text(f"hostname: mail.example.com\ndata_dir: var\n{body}")
    return path


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A configuration check finds nothing wrong with: users, postmaster, a DKIM key."""
    directory = tmp_path / "conf"
    for domain, postmaster in (("example.com", "me"), ("example.org", "me@example.com")):
        (directory / "domains" / domain).mkdir(parents=True)
        (directory / "domains" / domain / "aliases").write_text(f"postmaster: {postmaster}\n")
        write_key(directory / "domains" / domain, "s1", generate_key("ed25519"))
    write_config(directory)
    db = UserDB.load(directory / "domains" / "example.com" / "users", "example.com")
    db.set_password("me", "pw")
    db.save()
    return directory


def chown_tree(root: Path, ids: tuple[int, int] = SERVICE) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, *ids, follow_symlinks=False)


def install_cert(confdir: Path, cert: trustme.LeafCert, name: str = "mail.example.com") -> Path:
    directory = confdir / "certs" / name
    directory.mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(directory / "privkey.pem"))
    (directory / "privkey.pem").chmod(0o600)
    cert.cert_chain_pems[0].write_to_path(str(directory / "fullchain.pem"))
    return directory


# -- a good configuration, and the bundled example ---------------------------------------


def test_check_good_config(confdir):
    result = check(confdir)
    errors, warnings = findings(result)
    assert result.returncode == 0 and errors == []
    assert all(w.startswith("checked as root") for w in warnings), warnings
    lines = result.stdout.splitlines()
    domain_lines = [line for line in lines if line.startswith("domain ")]
    assert domain_lines == [
        "domain example.com: 1 user(s), 1 alias(es), 1 DKIM key(s) (s1)",
        "domain example.org: 0 user(s), 1 alias(es), 1 DKIM key(s) (s1)",
    ]
    assert any("self-signed" in line for line in lines)
    assert lines[-1] == f"check: ok, 0 error(s), {len(warnings)} warning(s)"
    # check changes nothing on disk: no data_dir, no certificate, no probe left behind.
    assert not (confdir / "var").exists()
    assert sorted(p.name for p in confdir.iterdir()) == ["domains", "mailrelay.yaml"]


def test_bundled_example_config_passes():
    config = REPO / "config"
    before = sorted(p.name for p in config.iterdir())
    result = check(config)
    errors, warnings = findings(result)
    assert result.returncode == 0 and errors == [], result.stderr
    assert "domain example.com: 1 user(s), 2 alias(es)" in result.stdout
    assert sorted(p.name for p in config.iterdir()) == before
    # It is a test setup, and says so: no DKIM key.
    assert any("no DKIM key" in w for w in warnings), warnings


def test_check_counts_users_and_receive_only(confdir):
    db = UserDB.load(confdir / "domains" / "example.org" / "users", "example.org")
    db.set_password("a", "pw")
    db.add_receive_only("b")
    db.save()
    result = check(confdir)
    assert result.returncode == 0, result.stderr
    assert "domain example.org: 2 user(s)" in result.stdout


def test_check_with_config_option_before_command(confdir):
    result = mailrelay("-c", str(confdir), "check")
    assert result.returncode == 0, result.stderr
    assert "domain example.com: 1 user(s)" in result.stdout


def test_check_counts_aliases_and_catch_all(confdir):
    (confdir / "domains" / "example.com" / "aliases").write_text("sales: me\n*: me\n")
    result = check(confdir)
    assert result.returncode == 0, result.stderr
    assert "domain example.com: 1 user(s), 1 alias(es) + catch-all, 1 DKIM key(s)" \
        in result.stdout


# -- mailrelay.yaml itself: one line, since nothing else can be checked ---------------------


def test_check_broken_yaml(confdir):
    (confdir / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\n"
        "limits:\n"
        "  max_errors: 3\n"
        "  max_message_size: lots\n"
    )
    line = one_line_error(check(confdir))
    assert f"{confdir.resolve() / 'mailrelay.yaml'}:4:" in line


def test_check_yaml_syntax_error(confdir):
    (confdir / "mailrelay.yaml").write_text("hostname: mail.example.com\nlisten: smtp: 1\n")
    line = one_line_error(check(confdir))
    assert "mailrelay.yaml:2:" in line


def test_check_unknown_setting(confdir):
    (confdir / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\n\n\nlistn:\n  smtp: ['127.0.0.1:25']\n")
    line = one_line_error(check(confdir))
    assert "mailrelay.yaml:4:" in line
    assert "listn" in line


def test_check_bad_domain_directory(confdir):
    (confdir / "domains" / "Example.NET").mkdir()
    line = one_line_error(check(confdir))
    assert "Example.NET" in line


@pytest.mark.parametrize(
    "argv",
    [
        ("check", "-c", "{missing}"),
        ("-c", "{missing}", "check"),
        ("serve", "-c", "{missing}"),
        ("user", "list", "-c", "{missing}"),
    ],
)
def test_nonexistent_config_dir(tmp_path, argv):
    missing = tmp_path / "does-not-exist"
    result = mailrelay(*(arg.format(missing=missing) for arg in argv))
    line = one_line_error(result)
    assert str(missing) in line
    assert result.stdout == ""


# -- certificates ------------------------------------------------------------------------


def test_no_certificate_and_no_self_signed_is_an_error(confdir):
    """serve exits 1 here ("no TLS certificate found"); check said "none found", rc 0."""
    write_config(confdir, "tls:\n  certs_dir: certs\n  self_signed: false\n")
    error = only_error(check(confdir))
    assert error.startswith(f"{confdir / 'mailrelay.yaml'}:3: no TLS certificate found")


def test_fullchain_without_privkey_is_an_error(confdir, ca):
    write_config(confdir, "tls: {self_signed: false}\n")
    directory = install_cert(confdir, ca.issue_cert("mail.example.com"))
    (directory / "privkey.pem").unlink()
    errors, _ = findings(check(confdir))
    assert f"{directory / 'fullchain.pem'}: privkey.pem is missing beside it, so this " \
           "certificate is not loaded" in errors
    assert any("no TLS certificate found" in e for e in errors), errors


def test_certificate_for_another_name(confdir, ca):
    write_config(confdir, "tls: {self_signed: false}\n")
    install_cert(confdir, ca.issue_cert("www.example.net"), "www.example.net")
    error = only_error(check(confdir))
    assert error.startswith(f"{confdir / 'mailrelay.yaml'}:1: no certificate covers the "
                            "hostname mail.example.com (found: www.example.net)")
    # With self_signed the server makes one for the hostname: a warning, not an error.
    write_config(confdir, "tls: {self_signed: true}\n")
    result = check(confdir)
    errors, warnings = findings(result)
    assert errors == [] and any("no certificate covers the hostname" in w for w in warnings)


def test_expired_certificate(confdir, ca):
    write_config(confdir, "tls: {self_signed: false}\n")
    now = dt.datetime.now(dt.UTC)
    directory = install_cert(confdir, ca.issue_cert(
        "mail.example.com", not_before=now - dt.timedelta(days=90),
        not_after=now - dt.timedelta(days=1)))
    error = only_error(check(confdir))
    assert error.startswith(f"{directory / 'fullchain.pem'}: expired on ")


def test_certificate_expiring_soon_is_a_warning(confdir, ca):
    write_config(confdir, "tls: {self_signed: false}\n")
    now = dt.datetime.now(dt.UTC)
    directory = install_cert(confdir, ca.issue_cert(
        "mail.example.com", not_after=now + dt.timedelta(days=5, hours=1)))
    result = check(confdir)
    errors, warnings = findings(result)
    assert result.returncode == 0 and errors == []
    assert any(w.startswith(f"{directory / 'fullchain.pem'}: expires on ") and "in 5 day(s)"
               in w for w in warnings), warnings
    assert "certificate mail.example.com: mail.example.com" in result.stdout


def test_key_of_another_certificate(confdir, ca):
    write_config(confdir, "tls: {self_signed: false}\n")
    directory = install_cert(confdir, ca.issue_cert("mail.example.com"))
    ca.issue_cert("mail.example.com").private_key_pem.write_to_path(
        str(directory / "privkey.pem"))
    errors, _ = findings(check(confdir))
    assert any(e.startswith(f"{directory / 'privkey.pem'}: private key does not match")
               for e in errors), errors


def test_certificate_key_readable_by_others(confdir, ca):
    write_config(confdir, "tls: {self_signed: false}\n")
    directory = install_cert(confdir, ca.issue_cert("mail.example.com"))
    (directory / "privkey.pem").chmod(0o644)
    error = only_error(check(confdir))
    assert error.startswith(f"{directory / 'privkey.pem'}: readable by others (mode 0644)")


def test_acme_sh_home_directories_without_certificates_are_not_errors(confdir, ca, tmp_path):
    home = tmp_path / "acme"
    for name in ("ca", "deploy", "dnsapi"):
        (home / name).mkdir(parents=True)
    cert = ca.issue_cert("mail.example.com")
    (home / "mail.example.com_ecc").mkdir()
    cert.cert_chain_pems[0].write_to_path(str(home / "mail.example.com_ecc" / "fullchain.cer"))
    cert.private_key_pem.write_to_path(str(home / "mail.example.com_ecc" /
                                           "mail.example.com.key"))
    (home / "mail.example.com_ecc" / "mail.example.com.key").chmod(0o600)
    (home / "other.example.net_ecc").mkdir()
    cert.cert_chain_pems[0].write_to_path(str(home / "other.example.net_ecc" /
                                              "fullchain.cer"))
    write_config(confdir, f"tls: {{self_signed: false, acme_sh_home: {home}}}\n")
    error = only_error(check(confdir))
    assert error == (f"{home / 'other.example.net_ecc' / 'fullchain.cer'}: "
                     "other.example.net.key is missing beside it, so this certificate is "
                     "not loaded")


# -- data_dir ------------------------------------------------------------------------------


def test_data_dir_proc_self(confdir):
    (confdir / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\ntls: {self_signed: true}\n\ndata_dir: /proc/self\n")
    error = only_error(check(confdir))
    assert error.startswith(f"{confdir / 'mailrelay.yaml'}:4: data_dir /proc/")
    assert "cannot create files in it" in error


def test_data_dir_that_is_a_file(confdir):
    (confdir / "var").write_text("")
    error = only_error(check(confdir))
    assert error == f"{confdir / 'mailrelay.yaml'}:2: data_dir {confdir / 'var'} is not a " \
                    "directory"


@needs_root
def test_data_dir_the_service_cannot_write(confdir, open_dir):
    """serve failed on "srs.secret: Permission denied"; check said OK."""
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    chown_tree(conf)
    (conf / "var").mkdir(mode=0o755)  # root's, as a `mkdir` by root leaves it
    result = check(conf)
    assert result.stdout.startswith(f"checked as 4242, the owner of {conf}\n")
    error = only_error(result)
    assert error == (f"{conf / 'mailrelay.yaml'}:2: data_dir {conf / 'var'}: cannot create "
                     "files in it (Permission denied); the queue and srs.secret live there")
    # The service's data_dir, with a secret root made (`mailrelay serve` run by root once).
    os.chown(conf / "var", *SERVICE)
    (conf / "var" / "srs.secret").write_text("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\n")
    (conf / "var" / "srs.secret").chmod(0o600)
    (conf / "var" / "queue").mkdir(mode=0o700)
    error_lines, _ = findings(check(conf))
    assert error_lines == [
        f"{conf / 'var' / 'queue'}: cannot create files in it (Permission denied); chown -R "
        "the data_dir to the server's user",
        f"{conf / 'var' / 'srs.secret'}: cannot be loaded: Permission denied",
    ]
    chown_tree(conf / "var")
    assert check(conf).returncode == 0


@needs_root
def test_missing_data_dir_the_service_cannot_create(confdir, open_dir):
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    chown_tree(conf)
    (conf / "mailrelay.yaml").write_text(
        f"hostname: mail.example.com\ndata_dir: {open_dir / 'lib' / 'mailrelay'}\n"
        "tls: {self_signed: true}\n")
    (open_dir / "lib").mkdir(mode=0o755)
    error = only_error(check(conf))
    assert error == (f"{conf / 'mailrelay.yaml'}:2: data_dir {open_dir}/lib/mailrelay "
                     f"does not exist, and it cannot be created in {open_dir / 'lib'} "
                     "(Permission denied): create it for the server's user: install -d -m "
                     f"0700 -o 4242 -g 4242 {open_dir}/lib/mailrelay")
    os.chown(open_dir / "lib", *SERVICE)
    result = check(conf)
    assert result.returncode == 0, result.stderr
    assert f"data_dir {open_dir}/lib/mailrelay: created at the first start" in result.stdout
    assert list((open_dir / "lib").iterdir()) == []


@needs_root
def test_a_missing_data_dir_under_var_lib_is_for_systemd_to_make(confdir, open_dir):
    """import-chasquid's data_dir, /var/lib/mailrelay, did not exist: check says that the
    unit's StateDirectory= makes it, and how to make it without systemd (a warning: the
    server starts under the unit)."""
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    chown_tree(conf)
    data_dir = Path("/var/lib") / f"mailrelay-check-{os.getpid()}"
    assert not data_dir.exists()
    (conf / "mailrelay.yaml").write_text(
        f"hostname: mail.example.com\ndata_dir: {data_dir}\ntls: {{self_signed: true}}\n")
    result = check(conf)
    errors, warnings = findings(result)
    assert errors == [] and result.returncode == 0
    [warning] = [w for w in warnings if "data_dir" in w]
    assert warning == (f"{conf / 'mailrelay.yaml'}:2: data_dir {data_dir} does not exist, and "
                       "it cannot be created in /var/lib (Permission denied): under systemd "
                       "the unit creates it at the first start (StateDirectory=); without "
                       f"systemd, create it first: install -d -m 0700 -o 4242 -g 4242 {data_dir}")
    assert not data_dir.exists()


# -- what the service user can read, and modes -------------------------------------------


@needs_root
def test_dkim_key_written_by_root_is_unreadable_for_the_service(confdir, open_dir):
    """The guide's `mailrelay dkim keygen` as root, before files took their directory's
    owner: root:root 0600 in the service's directory, so mail went out unsigned."""
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    chown_tree(conf)
    key = write_key(conf / "domains" / "example.com", "root", generate_key("ed25519"))
    os.chown(key, 0, 0)
    error = only_error(check(conf))
    assert error == f"{key}: cannot read DKIM key: Permission denied"


@needs_root
def test_an_unreadable_key_is_not_called_missing(confdir, open_dir):
    """The domain's only key is root's: check said both "cannot read DKIM key" and "no
    DKIM key … run dkim keygen", which would not help (the key exists)."""
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    chown_tree(conf)
    [key] = (conf / "domains" / "example.org").glob("dkim:*.pem")
    os.chown(key, 0, 0)
    result = check(conf)
    assert only_error(result) == f"{key}: cannot read DKIM key: Permission denied"
    _, warnings = findings(result)
    assert not [w for w in warnings if "no DKIM key" in w or "keygen" in w], warnings
    assert ("domain example.org: 0 user(s), 1 alias(es), no DKIM keys (1 key file(s) that "
            "do not load)") in result.stdout.splitlines()


@needs_root
def test_check_as_the_user_option(confdir, open_dir):
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    for path in (conf, conf / "domains", *(conf / "domains").iterdir()):
        path.chmod(0o755)
    (conf / "mailrelay.yaml").chmod(0o644)
    result = check(conf, "--user", "nobody")
    assert result.stdout.startswith("checked as nobody (uid 65534), --user\n")
    errors, _ = findings(result)
    users = conf / "domains" / "example.com" / "users"
    assert f"{users}: cannot read: Permission denied" in errors
    assert any("cannot read DKIM key: Permission denied" in e for e in errors)
    assert one_line_error(check(conf, "--user", "no-such-user-here")) == \
        "mailrelay: --user no-such-user-here: no such user"


@needs_root
def test_check_run_without_root(open_dir):
    """Not root, check uses the caller's permissions, and says when that is not the
    server's user."""
    conf = open_dir / "conf"
    (conf / "domains" / "example.com").mkdir(parents=True)
    write_config(conf)
    (conf / "domains" / "example.com" / "aliases").write_text("postmaster: me@elsewhere.test\n")
    chown_tree(conf, (65534, 65534))
    users = conf / "domains" / "example.com" / "users"
    users.write_text("me !\n")
    users.chmod(0o600)  # root's
    as_nobody = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    result = mailrelay("check", "-c", str(conf), prefix=as_nobody)
    assert result.stdout.startswith("checked as nobody (uid 65534), the owner of")
    errors, warnings = findings(result)
    assert errors == [f"{users}: cannot read: Permission denied"]
    assert not any("checked" in w for w in warnings)
    os.chown(conf, 0, 0)
    _, warnings = findings(mailrelay("check", "-c", str(conf), prefix=as_nobody))
    assert any(w.startswith("checked with the permissions of nobody (uid 65534), not of the "
                            "server's user root (uid 0)") for w in warnings), warnings


def test_users_file_modes(confdir):
    users = confdir / "domains" / "example.com" / "users"
    users.chmod(0o666)
    error = only_error(check(confdir))
    assert error.startswith(f"{users}: writable by group and others (mode 0666)")
    users.chmod(0o644)
    result = check(confdir)
    errors, warnings = findings(result)
    assert errors == [] and result.returncode == 0
    assert any(w.startswith(f"{users}: readable by others (mode 0644)") for w in warnings)


def test_dkim_key_readable_by_others(confdir):
    key = confdir / "domains" / "example.com" / "dkim:s1.pem"
    key.chmod(0o644)
    error = only_error(check(confdir))
    assert error.startswith(f"{key}: readable by others (mode 0644): anyone on this machine "
                            "can sign mail as example.com")


def test_group_writable_configuration(confdir):
    (confdir / "mailrelay.yaml").chmod(0o664)
    error = only_error(check(confdir))
    assert error.startswith(f"{confdir / 'mailrelay.yaml'}: writable by group (mode 0664)")
    (confdir / "mailrelay.yaml").chmod(0o644)
    (confdir / "domains" / "example.org").chmod(0o777)
    error = only_error(check(confdir))
    assert error.startswith(f"{confdir / 'domains' / 'example.org'}: writable by group and "
                            "others (mode 0777)")


# -- delivery.local_mda --------------------------------------------------------------------


def test_local_mda_placeholders(confdir):
    # Placeholders are checked by load_config, so check and serve refuse it alike.
    write_config(confdir, "tls: {self_signed: true}\ndelivery:\n"
                          "  local_mda: /bin/cat --to {address} --x {nope}\n")
    error = one_line_error(check(confdir))
    assert error.startswith(f"mailrelay: {confdir / 'mailrelay.yaml'}:5: delivery.local_mda: "
                            "unknown placeholder {nope}")
    write_config(confdir, "tls: {self_signed: true}\ndelivery:\n  local_mda: /bin/cat {0}\n")
    assert "positional placeholders" in one_line_error(check(confdir))
    write_config(confdir, "tls: {self_signed: true}\ndelivery:\n"
                          "  local_mda: /no/such/mda -d {user}\n")
    error = only_error(check(confdir))
    assert error.startswith(f"{confdir / 'mailrelay.yaml'}:5: delivery.local_mda: /no/such/mda "
                            "is not an executable program")
    write_config(confdir, "tls: {self_signed: true}\ndelivery:\n"
                          "  local_mda: /bin/cat {user} {domain} {address} {address_ascii} "
                          "{domain_ascii} {{literal}}\n")
    assert check(confdir).returncode == 0


# -- users, aliases, DKIM ------------------------------------------------------------------


def test_every_users_file_error_at_once(confdir):
    users = confdir / "domains" / "example.org" / "users"
    users.write_text("# users\nalice !\nbob not-a-hash\ncarol\nalice !\n\ndave $scrypt$x\n")
    errors, _ = findings(check(confdir))
    assert [e.split(": ", 1)[0] for e in errors] == [f"{users}:{n}" for n in (3, 4, 5, 7)]
    assert "bob" in errors[0] and "duplicate user 'alice'" in errors[2]


def test_check_reports_broken_aliases_and_dkim_keys(confdir):
    domain_dir = confdir / "domains" / "example.com"
    (domain_dir / "aliases").write_text("# ok\npostmaster: me\nbroken line\n")
    (domain_dir / "dkim:bad.pem").write_text("not a key\n")
    (domain_dir / "dkim:bad.pem").chmod(0o600)
    result = check(confdir)
    errors, _ = findings(result)
    assert any(e.startswith(f"{domain_dir / 'aliases'}:3:") for e in errors), errors
    assert any(e.startswith(f"{domain_dir / 'dkim:bad.pem'}:") for e in errors), errors
    assert len(errors) == 2, errors
    assert "domain example.com: 1 user(s)" in result.stdout


def test_alias_loops_and_targets_that_deliver_nowhere(confdir):
    aliases = confdir / "domains" / "example.com" / "aliases"
    aliases.write_text("a: b\nb: a\n# the next two reach nobody\nghost: nobody\n"
                       "postmaster: nobody\nabuse: nobody@example.org\nsales: me\n")
    errors, _ = findings(check(confdir))
    by_line = {}
    for error in errors:
        where, _, text = error.partition(": ")
        by_line.setdefault(where, []).append(text)
    assert sorted(by_line) == sorted([f"{aliases}:{n}" for n in (1, 2, 4, 5, 6)] + [str(aliases)])
    assert any("loop through a@example.com" in t for t in by_line[f"{aliases}:1"])
    assert any("ghost@example.com delivers nowhere" in t for t in by_line[f"{aliases}:4"])
    assert any("abuse@example.com delivers nowhere" in t for t in by_line[f"{aliases}:6"])
    assert by_line[str(aliases)] == [
        "postmaster@example.com is refused (550 5.1.1), but RFC 5321 4.5.1 requires it to "
        "reach a person: add `postmaster: <user>` (`mailrelay aliases edit example.com`)"]


def test_catch_all_that_delivers_nowhere(confdir):
    aliases = confdir / "domains" / "example.com" / "aliases"
    aliases.write_text("postmaster: me\n*: nobody\n")
    error = only_error(check(confdir))
    assert error.startswith(f"{aliases}:2: the catch-all of example.com delivers nowhere")


def test_postmaster_missing(confdir):
    (confdir / "domains" / "example.org" / "aliases").unlink()
    error = only_error(check(confdir))
    assert error.startswith(f"{confdir / 'domains' / 'example.org' / 'aliases'}: "
                            "postmaster@example.org is refused (550 5.1.1)")
    # A catch-all or a user named postmaster is as good as an alias.
    (confdir / "domains" / "example.org" / "aliases").write_text("*: me@example.com\n")
    assert check(confdir).returncode == 0


def test_domain_without_dkim_key_is_a_warning(confdir):
    domain_dir = confdir / "domains" / "example.org"
    (domain_dir / "dkim:s1.pem").unlink()
    result = check(confdir)
    errors, warnings = findings(result)
    assert result.returncode == 0 and errors == []
    assert any(w.startswith(f"{domain_dir}: no DKIM key: mail from example.org leaves "
                            "unsigned") for w in warnings), warnings
    assert "domain example.org: 0 user(s), 1 alias(es), no DKIM keys" in result.stdout


# -- delivery.relay: probed, a warning when it cannot be reached ------------------------------

def checkable(env) -> None:
    """The test network's configuration, as check wants it apart from the relay."""
    (env.config_dir / "certs" / "mail.example.com" / "privkey.pem").chmod(0o600)
    (env.config_dir / "domains" / "example.com" / "aliases").write_text("postmaster: me\n")


async def test_check_logs_in_to_the_relay(env):
    checkable(env)
    relay = start_relay(env)
    configure_relay(env, port=relay.relay_port)
    result = await asyncio.to_thread(check, env.config_dir)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if "relay smtp.relay.test" in x]
    assert line.startswith(f"relay smtp.relay.test:{relay.relay_port} (starttls) for all "
                           "remote mail: ok")
    assert "TLS verified" in line and "logged in as AKIAEXAMPLERELAYUSER" in line
    assert relay.logins == [("AKIAEXAMPLERELAYUSER", True, True)]
    assert RELAY_PASSWORD not in result.stdout + result.stderr


async def test_check_warns_about_a_relay_it_cannot_use(env):
    checkable(env)
    configure_relay(env, port=free_port())  # nothing listens
    result = await asyncio.to_thread(check, env.config_dir)
    assert result.returncode == 0, result.stderr  # a network condition: only a warning
    assert "warning: relay smtp.relay.test" in result.stderr
    assert "451 4.4.1 connection to relay" in result.stderr

    relay = start_relay(env)
    configure_relay(env, port=relay.relay_port, password="not-the-password")
    result = await asyncio.to_thread(check, env.config_dir)
    assert result.returncode == 0
    assert "warning: relay" in result.stderr and "535 5.7.8" in result.stderr
    output = result.stdout + result.stderr
    assert "not-the-password" not in output and RELAY_PASSWORD not in output


async def test_check_refuses_a_password_file_others_can_read(env):
    configure_relay(env, port=587)
    (env.config_dir / "relay.password").chmod(0o644)
    line = one_line_error(await asyncio.to_thread(check, env.config_dir))
    assert "relay.password is open to group or others (mode 0644)" in line
    (env.config_dir / "relay.password").unlink()
    line = one_line_error(await asyncio.to_thread(check, env.config_dir))
    assert "relay.password does not exist" in line


@needs_root
def test_a_python_the_service_user_cannot_run_is_an_error(confdir, open_dir):
    """check switches uid without exec'ing, so it said ok for a service user that could
    not even start mailrelay's Python (a venv under /root, mode 0700)."""
    shutil.copytree(confdir, open_dir / "conf")
    chown_tree(open_dir / "conf")
    private = open_dir / "root-only"
    private.mkdir(mode=0o700)
    python = make_python(private / "venv")
    error = only_error(check(open_dir / "conf", python=python))
    assert error.startswith("the server's user cannot run this mailrelay: it cannot search "
                            f"{private}, on the way to its Python {python}")
    # The same configuration with a Python it may run: nothing to say.
    errors, _ = findings(check(open_dir / "conf"))
    assert errors == []


def relay_config(conf: Path, extra: str = "") -> Path:
    """delivery.relay to a port where nothing listens, with its password file."""
    password = conf / "relay.password"
    password.write_text("the-relay-secret\n")
    password.chmod(0o600)
    write_config(conf, "tls: {self_signed: true}\ndelivery:\n"
                       f"  relay: {{host: 127.0.0.1, port: {free_port()}, username: me,"
                       f" password_file: relay.password}}\n{extra}")
    return password


@needs_root
def test_a_relay_password_file_the_service_user_cannot_read_is_an_error(confdir, open_dir):
    """README's check table: what the server's user cannot read is an error. The relay
    password file root wrote (not chowned) was only a warning (the login failed), so
    check passed and every relay login of the server failed."""
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    password = relay_config(conf)
    chown_tree(conf)
    os.chown(password, 0, 0)
    result = check(conf)
    error = only_error(result)
    assert error.startswith(f"{password}: the relay password file cannot be read "
                            "(Permission denied)")
    assert "the-relay-secret" not in result.stdout + result.stderr
    assert "login not tried" in result.stdout  # one finding, not a login warning as well
    os.chown(password, *SERVICE)
    errors, warnings = findings(check(conf))
    assert errors == [] and any("451 4.4.1 connection to relay" in w for w in warnings)


@needs_root
def test_a_missing_ca_file_is_one_error_with_file_and_line(confdir, open_dir):
    """With a relay, a delivery.ca_file that does not exist ended the check as the service
    user with "the check as … failed: ConfigError: …", without file and line."""
    conf = open_dir / "conf"
    shutil.copytree(confdir, conf)
    relay_config(conf, "  ca_file: missing-ca.pem\n")
    chown_tree(conf)
    result = check(conf)
    error = only_error(result)
    assert error.startswith(f"{conf / 'mailrelay.yaml'}:6: delivery.ca_file "
                            f"{conf / 'missing-ca.pem'}: ")
    assert "failed" not in result.stderr.split("error:")[0]
