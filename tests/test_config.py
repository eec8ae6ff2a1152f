"""mailrelay.config: loading mailrelay.yaml, defaults, conversions and located errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mailrelay.config import (
    CONFIG_FILE,
    discover_domains,
    load_config,
    parse_duration,
    parse_hostport,
    parse_size,
)
from mailrelay.errors import ConfigError, MailrelayError


def write_config(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def config_error(directory: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(directory)
    return info.value


def assert_located(error: ConfigError, path: Path, line: int | None) -> None:
    """The error names ``path`` (and ``line``) as ``path:line: message``."""
    assert error.path == path
    assert error.line == line
    text = str(error)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert text.startswith(prefix), text
    assert text[len(prefix):].strip(), "the message must say what is wrong"
    assert "\n" not in text


# --- defaults ----------------------------------------------------------------------------


def test_minimal_config_gives_documented_defaults(tmp_path):
    write_config(tmp_path, "hostname: Mail.Example.COM\n")
    config = load_config(tmp_path)
    assert config.config_dir == tmp_path.resolve()
    assert config.hostname == "mail.example.com"
    assert config.listen.smtp == [("0.0.0.0", 25)]
    assert config.listen.submission == [("0.0.0.0", 587)]
    assert config.listen.submission_tls == [("0.0.0.0", 465)]
    assert config.data_dir == Path("/var/lib/mailrelay")
    assert config.tls.certs_dir == tmp_path.resolve() / "certs"
    assert config.tls.acme_sh_home is None
    assert config.tls.self_signed is False
    assert config.dns.nameservers == []
    assert config.dns.timeout == 5.0
    assert config.delivery.smtp_port == 25
    assert config.delivery.retry_intervals == [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0]
    assert config.delivery.give_up_after == 5 * 86400
    assert config.delivery.max_mx_hosts == 5
    assert config.delivery.concurrency == 20
    assert config.delivery.connect_timeout == 30.0
    assert config.delivery.command_timeout == 300.0
    assert config.limits.max_message_size == 50 * 1024 * 1024
    assert config.limits.max_recipients == 100
    assert config.limits.command_timeout == 300.0
    assert config.limits.max_errors == 10
    assert config.limits.max_connections == 1000
    assert config.limits.max_connections_per_ip == 50
    assert config.limits.auth_failures_per_ip == 5
    assert config.limits.auth_block_time == 600.0
    assert config.limits.auth_failure_delay == 1.0
    assert config.domains == ()
    assert config.domains_dir == tmp_path.resolve() / "domains"


def test_empty_sections_keep_defaults(tmp_path):
    write_config(tmp_path, """
        hostname: mx.example.com
        listen:
        tls:
        dns: {}
        delivery:
        limits: {}
    """)
    config = load_config(tmp_path)
    assert config.listen.smtp == [("0.0.0.0", 25)]
    assert config.tls.self_signed is False
    assert config.delivery.concurrency == 20
    assert config.limits.max_recipients == 100


# --- every section -----------------------------------------------------------------------


def test_every_section_parsed(tmp_path):
    write_config(tmp_path, """
        hostname: relay.example.org
        listen:
          smtp: ["127.0.0.1:2525", "[::1]:25"]
          submission: 192.0.2.1:587
          submission_tls: []
        data_dir: state/var
        tls:
          certs_dir: tls/certs
          acme_sh_home: /root/.acme.sh
          self_signed: true
        dns:
          nameservers: ["127.0.0.1:5353", "192.0.2.53", "[::1]:53"]
          timeout: 2s
        delivery:
          smtp_port: 2525
          retry_intervals: [90s, 1h30m, 2h, 1d, 120]
          give_up_after: 5d
          max_mx_hosts: 3
          concurrency: 7
          connect_timeout: 10s
          command_timeout: 1m
        limits:
          max_message_size: 10kB
          max_recipients: 20
          command_timeout: 1h
          max_errors: 3
          max_connections: 200
          max_connections_per_ip: 10
          auth_failures_per_ip: 4
          auth_block_time: 15m
          auth_failure_delay: 500ms
    """)
    config = load_config(tmp_path)
    root = tmp_path.resolve()
    assert config.hostname == "relay.example.org"
    assert config.listen.smtp == [("127.0.0.1", 2525), ("::1", 25)]
    assert config.listen.submission == [("192.0.2.1", 587)]  # a single value is a list of one
    assert config.listen.submission_tls == []
    assert config.data_dir == root / "state" / "var"
    assert config.tls.certs_dir == root / "tls" / "certs"
    assert config.tls.acme_sh_home == Path("/root/.acme.sh")
    assert config.tls.self_signed is True
    assert config.dns.nameservers == [("127.0.0.1", 5353), ("192.0.2.53", 53), ("::1", 53)]
    assert config.dns.timeout == 2.0
    assert config.delivery.smtp_port == 2525
    assert config.delivery.retry_intervals == [90.0, 5400.0, 7200.0, 86400.0, 120.0]
    assert config.delivery.give_up_after == 5 * 86400.0
    assert config.delivery.max_mx_hosts == 3
    assert config.delivery.concurrency == 7
    assert config.delivery.connect_timeout == 10.0
    assert config.delivery.command_timeout == 60.0
    assert config.limits.max_message_size == 10_000
    assert config.limits.max_recipients == 20
    assert config.limits.command_timeout == 3600.0
    assert config.limits.max_errors == 3
    assert config.limits.max_connections == 200
    assert config.limits.max_connections_per_ip == 10
    assert config.limits.auth_failures_per_ip == 4
    assert config.limits.auth_block_time == 900.0
    assert config.limits.auth_failure_delay == 0.5


@pytest.mark.parametrize(
    ("written", "size"),
    [("50MiB", 50 * 1024 * 1024), ("10kB", 10_000), ("1000", 1000), ("512KiB", 512 * 1024),
     ("2GB", 2 * 10**9), ("1.5MiB", 1536 * 1024), ("7b", 7), ("3 mb", 3_000_000)],
)
def test_max_message_size_units(tmp_path, written, size):
    write_config(tmp_path, f"hostname: h.test\nlimits:\n  max_message_size: {written}\n")
    assert load_config(tmp_path).limits.max_message_size == size


def test_header_limits_and_max_hops(tmp_path):
    config = load_config(write_config(tmp_path, "hostname: h.test\n").parent)
    assert (config.limits.max_header_size, config.limits.max_header_fields,
            config.limits.max_hops) == (1024 * 1024, 1000, 50)
    write_config(tmp_path, "hostname: h.test\nlimits:\n  max_header_size: 256KiB\n"
                 "  max_header_fields: 300\n  max_hops: 30\n")
    limits = load_config(tmp_path).limits
    assert (limits.max_header_size, limits.max_header_fields, limits.max_hops) == (
        256 * 1024, 300, 30)
    write_config(tmp_path, "hostname: h.test\nlimits:\n  max_hops: 0\n")
    assert config_error(tmp_path).line == 3


def test_parse_size_values():
    assert parse_size(1000) == 1000
    assert parse_size("50MiB") == 50 * 1024 * 1024
    assert parse_size("10kB") == 10_000
    assert parse_size("1000") == 1000
    for bad in ("-1", "ten", "5 parsecs", "", "1e6", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_size(-5)


def test_parse_duration_values():
    assert parse_duration("5d") == 5 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1w") == 7 * 86400
    assert parse_duration("1h 30m") == 5400
    assert parse_duration(45) == 45.0
    assert parse_duration(2.5) == 2.5
    for bad in ("5", "5x", "h", "", "1h30", "-5s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_duration(-1)


def test_parse_hostport_values():
    assert parse_hostport("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_hostport("[::1]:25") == ("::1", 25)
    assert parse_hostport("[::1]", 53) == ("::1", 53)
    assert parse_hostport("::1", 53) == ("::1", 53)
    assert parse_hostport("192.0.2.53", 53) == ("192.0.2.53", 53)
    assert parse_hostport("dns.example:5353", 53) == ("dns.example", 5353)
    with pytest.raises(ValueError):
        parse_hostport("127.0.0.1")  # no default port
    for bad in ("host:0", "host:65536", "host:http", "host:", "[::1]:99999"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


# --- paths -------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(tmp_path, monkeypatch):
    confdir = tmp_path / "etc" / "mailrelay"
    write_config(confdir, """
        hostname: h.test
        data_dir: ../../var/lib/mr
        tls:
          certs_dir: mycerts
          acme_sh_home: acme
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "mailrelay")
    root = tmp_path.resolve()
    assert config.config_dir == root / "etc" / "mailrelay"
    assert config.data_dir == root / "var" / "lib" / "mr"
    assert config.tls.certs_dir == root / "etc" / "mailrelay" / "mycerts"
    assert config.tls.acme_sh_home == root / "etc" / "mailrelay" / "acme"


def test_absolute_paths_are_kept(tmp_path):
    write_config(tmp_path, f"hostname: h.test\ndata_dir: {tmp_path / 'abs'}\n"
                           f"tls:\n  certs_dir: {tmp_path / 'c'}\n")
    config = load_config(tmp_path)
    assert config.data_dir == (tmp_path / "abs").resolve()
    assert config.tls.certs_dir == (tmp_path / "c").resolve()


# --- errors with file and line -----------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        # a comment
        listen:
          smtp: ["127.0.0.1:25"]
        hostnmae: typo.test
    """)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 5)
    assert "hostnmae" in error.message


def test_unknown_key_in_section(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        limits:
          max_recipients: 10
          max_errors: 3

          max_recipeints: 5
    """)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 6)
    assert "limits.max_recipeints" in error.message


def test_bad_size(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        delivery:
          concurrency: 3
        limits:
          max_recipients: 10
          max_message_size: 50 parsecs
    """)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 6)
    assert "limits.max_message_size" in error.message


def test_bad_duration(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        delivery:
          give_up_after: 5d
          retry_intervals:
            - 1m
            - 5 minutes
            - 1h
    """)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 6)
    assert "delivery.retry_intervals" in error.message


def test_bad_duration_scalar(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\ndns:\n  timeout: soon\n")
    assert_located(config_error(tmp_path), path.resolve(), 3)


@pytest.mark.parametrize(
    ("listen", "line"),
    [
        ('  smtp: ["127.0.0.1:25"]\n  submission: ["127.0.0.1:99999"]\n', 4),
        ('  submission_tls:\n    - "127.0.0.1:465"\n    - "127.0.0.1:https"\n', 5),
        ("  smtp: 127.0.0.1\n", 3),  # no port at all
    ],
)
def test_bad_listen_port(tmp_path, listen, line):
    path = write_config(tmp_path, "hostname: h.test\nlisten:\n" + listen)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), line)
    assert "listen." in error.message


def test_bad_smtp_port_number(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\ndelivery:\n  smtp_port: 70000\n")
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 3)
    assert "delivery.smtp_port" in error.message


def test_bad_nameserver_port(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\n\ndns:\n  nameservers: ['1.1.1.1:x']\n")
    assert_located(config_error(tmp_path), path.resolve(), 4)


def test_list_where_mapping_expected(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        listen:
          smtp: ["127.0.0.1:25"]
        limits:
          - max_recipients: 10
    """)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 5)
    assert "limits" in error.message


def test_top_level_not_a_mapping(tmp_path):
    path = write_config(tmp_path, "- hostname: h.test\n")
    assert_located(config_error(tmp_path), path.resolve(), 1)


def test_mapping_where_value_expected(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        limits:
          max_errors:
            value: 3
    """)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 4)


def test_wrong_scalar_types(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\ntls:\n  self_signed: yes please\n")
    assert_located(config_error(tmp_path), path.resolve(), 3)
    write_config(tmp_path, "hostname: h.test\nlimits:\n  max_errors: 0\n")
    assert_located(config_error(tmp_path), path.resolve(), 3)
    write_config(tmp_path, "hostname: h.test\nlimits:\n  max_errors: true\n")
    assert_located(config_error(tmp_path), path.resolve(), 3)


def test_empty_retry_intervals(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\ndelivery:\n  retry_intervals: []\n")
    error = config_error(tmp_path)
    assert error.path == path.resolve()
    assert error.line is not None
    assert "retry_intervals" in error.message


def test_yaml_syntax_error(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        limits:
          max_errors: 3: 4
          max_recipients: 5
    """)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 3)
    assert "YAML" in error.message


def test_yaml_syntax_error_tab(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\nlimits:\n\tmax_errors: 3\n")
    assert_located(config_error(tmp_path), path.resolve(), 3)


def test_yaml_syntax_error_unclosed_bracket(tmp_path):
    path = write_config(tmp_path, """
        hostname: h.test
        limits:
          max_errors: 3
          max_recipients: [10
        dns:
          timeout: 5s
    """)
    error = config_error(tmp_path)
    # PyYAML notices the unclosed flow sequence only where the next key starts.
    assert error.line in (4, 5)
    assert str(error).startswith(f"{path.resolve()}:{error.line}: ")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("hostname: h.test\nlimits:\n  max_errors: 3\nlimits:\n  max_recipients: 5\n", 4),
        ("hostname: h.test\nlimits:\n  max_errors: 3\n  max_errors: 4\n", 4),
        ("hostname: a.test\ndata_dir: var\nhostname: b.test\n", 3),
    ],
)
def test_duplicate_key(tmp_path, text, line):
    path = write_config(tmp_path, text)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), line)
    assert "twice" in error.message


def test_yaml_syntax_error_bad_indentation(tmp_path):
    path = write_config(tmp_path,
                        "hostname: h.test\nlimits:\n  max_errors: 3\n max_recipients: 1\n")
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 4)


def test_bad_hostname(tmp_path):
    path = write_config(tmp_path, "data_dir: var\nhostname: not a host!\n")
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), 2)
    assert "hostname" in error.message


def test_missing_hostname(tmp_path):
    path = write_config(tmp_path, "listen:\n  smtp: ['127.0.0.1:25']\n")
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), None)
    assert "hostname" in error.message


def test_empty_file_misses_hostname(tmp_path):
    path = write_config(tmp_path, "# nothing yet\n")
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), None)
    assert "hostname" in error.message


def test_missing_file(tmp_path):
    error = config_error(tmp_path)
    assert_located(error, (tmp_path / CONFIG_FILE).resolve(), None)
    assert isinstance(error, MailrelayError)


def test_missing_directory(tmp_path):
    error = config_error(tmp_path / "nope")
    assert error.path == (tmp_path / "nope" / CONFIG_FILE).resolve()


def test_not_utf8(tmp_path):
    path = tmp_path / CONFIG_FILE
    path.write_bytes(b"hostname: h\xff.test\n")
    error = config_error(tmp_path)
    assert error.path == path.resolve()


# --- domains -----------------------------------------------------------------------------


def test_discover_domains(tmp_path):
    write_config(tmp_path, "hostname: h.test\n")
    for name in ("example.org", "example.com", "xn--bcher-kva.test"):
        (tmp_path / "domains" / name).mkdir(parents=True)
    (tmp_path / "domains" / ".hidden").mkdir()
    (tmp_path / "domains" / "README").write_text("not a domain\n")
    expected = ("example.com", "example.org", "xn--bcher-kva.test")
    assert discover_domains(tmp_path) == expected
    config = load_config(tmp_path)
    assert config.domains == expected
    assert config.is_local_domain("Example.COM")
    assert not config.is_local_domain("example.net")
    assert config.domain_dir("example.com") == tmp_path.resolve() / "domains" / "example.com"


def test_discover_domains_without_domains_dir(tmp_path):
    assert discover_domains(tmp_path) == ()


def test_upper_case_domain_directory_is_refused(tmp_path):
    (tmp_path / "domains" / "example.com").mkdir(parents=True)
    (tmp_path / "domains" / "Example.ORG").mkdir()
    with pytest.raises(ConfigError) as info:
        discover_domains(tmp_path)
    assert info.value.path == tmp_path / "domains" / "Example.ORG"
    assert "example.org" in info.value.message
    assert str(info.value).startswith(f"{tmp_path / 'domains' / 'Example.ORG'}: ")


def test_unicode_domain_directory_is_refused(tmp_path):
    (tmp_path / "domains" / "bücher.test").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        discover_domains(tmp_path)
    assert "xn--bcher-kva.test" in info.value.message


def test_load_config_reports_bad_domain_directory(tmp_path):
    write_config(tmp_path, "hostname: h.test\n")
    (tmp_path / "domains" / "UPPER.test").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.path == tmp_path.resolve() / "domains" / "UPPER.test"


def test_fractional_byte_count_is_refused():
    with pytest.raises(ValueError):
        parse_size(1.5)


def test_the_removed_workers_key_is_a_warning_naming_its_line(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\nworkers: auto\n")
    config = load_config(tmp_path)
    [warning] = config.warnings
    assert warning.startswith(f"{path.resolve()}:2: workers:") and "one process" in warning
    write_config(tmp_path, "hostname: h.test\n")
    assert load_config(tmp_path).warnings == ()


# --- filters (chasquid's hooks, rspamd) ------------------------------------------------------


def test_filters_defaults(tmp_path):
    write_config(tmp_path, "hostname: h.test\n")
    filters = load_config(tmp_path).filters
    assert filters.hooks_dir == tmp_path.resolve() / "hooks"  # chasquid's place
    assert filters.hook_timeout == 60.0  # chasquid's fixed minute
    assert filters.alias_resolve_timeout == 5.0
    assert filters.rspamd.url is None
    assert filters.rspamd.timeout == 10.0
    assert filters.rspamd.on_error == "accept"
    assert filters.rspamd.submission is False


def test_filters_section(tmp_path):
    write_config(tmp_path, """
        hostname: h.test
        filters:
          hooks_dir: my-hooks
          hook_timeout: 30s
          alias_resolve_timeout: 2s
          rspamd:
            url: http://127.0.0.1:11333
            timeout: 4s
            on_error: tempfail
            submission: true
    """)
    filters = load_config(tmp_path).filters
    assert filters.hooks_dir == tmp_path.resolve() / "my-hooks"
    assert (filters.hook_timeout, filters.alias_resolve_timeout) == (30.0, 2.0)
    assert filters.rspamd.url == "http://127.0.0.1:11333"
    assert (filters.rspamd.timeout, filters.rspamd.on_error) == (4.0, "tempfail")
    assert filters.rspamd.submission is True


@pytest.mark.parametrize(("lines", "line", "words"), [
    ("  rspamd:\n    url: https://127.0.0.1:11333\n", 4, "filters.rspamd.url"),
    ("  rspamd:\n    url: http://127.0.0.1\n", 4, "needs a port"),
    ("  rspamd:\n    url: http://user:pw@127.0.0.1:11333\n", 4, "filters.rspamd.url"),
    ("  rspamd:\n    url: 127.0.0.1:11333\n", 4, "filters.rspamd.url"),
    ("  rspamd:\n    on_error: reject\n", 4, "filters.rspamd.on_error"),
    ("  rspamd:\n    timeout: 0s\n", 4, "filters.rspamd.timeout"),
    ("  rspamd:\n    urll: http://127.0.0.1:11333\n", 4, "filters.rspamd.urll"),
    ("  hook_timeout: soon\n", 3, "filters.hook_timeout"),
    ("  post_data: hooks/post-data\n", 3, "filters.post_data"),
])
def test_bad_filters_settings(tmp_path, lines, line, words):
    path = write_config(tmp_path, "hostname: h.test\nfilters:\n" + lines)
    error = config_error(tmp_path)
    assert_located(error, path.resolve(), line)
    assert words in error.message


def test_connection_limits_per_listener_kind(tmp_path):
    """Issue 16, row 8: each kind has its own limits; the general keys still work and
    are the default of every kind."""
    write_config(tmp_path, """
        hostname: mail.example.com
        limits:
          max_connections: 300
          max_connections_per_ip: 20
          smtp:
            max_connections: 800
          submission_tls:
            max_connections_per_ip: 5
    """)
    limits = load_config(tmp_path).limits
    assert limits.connection_limits("smtp") == (800, 20)
    assert limits.connection_limits("submission") == (300, 20)
    assert limits.connection_limits("submission_tls") == (300, 5)
    write_config(tmp_path, "hostname: mail.example.com\n")
    limits = load_config(tmp_path).limits
    assert [limits.connection_limits(k) for k in ("smtp", "submission", "submission_tls")] \
        == [(1000, 50)] * 3
    assert (limits.tls_handshake_timeout, limits.data_timeout) == (30.0, 1200.0)
    assert limits.data_in_flight == 2 * limits.max_message_size


@pytest.mark.parametrize("lines, line, words", [
    ("  smtp:\n    max_connections: 0\n", 4, "limits.smtp.max_connections"),
    ("  smtp:\n    max_sessions: 5\n", 4, "unknown setting limits.smtp.max_sessions"),
    ("  pop3:\n    max_connections: 5\n", 3, "unknown setting limits.pop3"),
    ("  max_message_size: 10MiB\n  max_data_in_flight: 5MiB\n", 3,
     "limits.max_data_in_flight (5242880 bytes) must be at least"),
    ("  data_timeout: 0s\n", 3, "limits.data_timeout"),
    ("  tls_handshake_timeout: soon\n", 3, "limits.tls_handshake_timeout"),
])
def test_bad_limits(tmp_path, lines, line, words):
    path = write_config(tmp_path, "hostname: mail.example.com\nlimits:\n" + lines)
    error = config_error(tmp_path)
    assert_located(error, path, line)
    assert words in str(error)


def test_a_configuration_that_listens_nowhere_loads_with_a_warning(tmp_path):
    path = write_config(tmp_path, "hostname: h.test\nlisten:\n  smtp: []\n  submission: []\n"
                                  "  submission_tls: []\n")
    [warning] = load_config(tmp_path).warnings
    assert warning.startswith(f"{path.resolve()}:2: listen: no address at all")
