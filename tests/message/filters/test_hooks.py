"""chasquid's hooks (mailrelay.message.filters.hooks), run for real.

chasquid's example post-data hook (tests/fixtures/chasquid/hooks/post-data, unchanged)
runs with SpamAssassin's real spamc against a real spamd, and with rspamd's rspamc
against a real rspamd; the bad hooks are real scripts that hang, flood, die by a signal
or print what is not a header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from mailrelay.config import FilterSettings
from mailrelay.message.filters.hooks import (
    MAX_OUTPUT,
    Hooks,
    go_tcp_addr,
    header_fields,
    last_line,
    parse_alias_output,
    run_alias_resolve,
    run_post_data,
)
from mailrelay.message.filters.verdict import FilterInput, apply_verdict
from tests.support.linear import assert_linear
from tests.support.spam_daemons import GTUBE

STOCK_HOOK = Path(__file__).parents[2] / "fixtures" / "chasquid" / "hooks" / "post-data"
FIXTURE_ALIAS_HOOK = STOCK_HOOK.with_name("alias-resolve")

INPUT = FilterInput(
    remote_addr="192.0.2.7", remote_port=40123, helo="mail.example.org",
    mail_from="alice@example.org", rcpt_to=("bob@example.com", "carol@example.com"),
    auth_as=None, on_tls=True, from_local_domain=False, spf_pass=False, queue_id="q1")

CLEAN = (b"Received: from mail.example.org ([192.0.2.7]) by mail.example.com; "
         b"Mon, 1 Jan 2024 10:00:00 +0000\r\n"
         b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\n"
         b"Subject: Lunch on Thursday\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
         b"Message-ID: <1@example.org>\r\n\r\nShall we meet at noon?\r\n")
SPAM = CLEAN.replace(b"Shall we meet at noon?", GTUBE.encode())


def filter_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mailrelay.filters"]


def one_line(caplog, level: int | None = None) -> logging.LogRecord:
    """The outcome logged exactly one line, without a traceback."""
    records = filter_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None
    assert "\n" not in records[0].getMessage()
    if level is not None:
        assert records[0].levelno == level
    return records[0]


def write_hook(path: Path, text: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def tool_path(bin_dir: Path, *tools: str) -> str:
    """A PATH of ``bin_dir`` holding only ``tools``: what the hook finds is what the test
    chose (the machine's rspamc, clamdscan or greylist would change the hook's output)."""
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(autouse=True)
def _log_everything(caplog):
    caplog.set_level(logging.DEBUG, "mailrelay.filters")


@pytest.fixture
def config_dir(tmp_path) -> Path:
    path = tmp_path / "config"
    (path / "hooks").mkdir(parents=True)
    return path


def load(config_dir: Path, **settings) -> Hooks:
    return Hooks.load(config_dir, FilterSettings(hooks_dir=config_dir / "hooks", **settings))


# --- chasquid's example hook with real filters ----------------------------------------------


def test_the_fixture_is_chasquids_example_hook():
    text = STOCK_HOOK.read_text()
    assert text.startswith("#!/bin/bash\n#\n# This file is an example post-data hook")
    assert 'if ! SL=$(spamc -c - < "$TF") ; then' in text
    assert os.access(STOCK_HOOK, os.X_OK)


async def test_stock_hook_with_spamd_refuses_gtube_and_marks_clean_mail(
        spamd, config_dir, tmp_path, monkeypatch, caplog):
    shutil.copy2(STOCK_HOOK, config_dir / "hooks" / "post-data")
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", tool_path(bin_dir, "mktemp", "cat", "rm"))
    spamd.spamc_wrapper(bin_dir)
    hooks = load(config_dir)
    assert hooks.post_data is not None

    caplog.clear()
    verdict = await hooks.check(INPUT, SPAM)
    assert verdict.action == "reject"
    # chasquid's code for exit 20, the hook's last line ("spam detected") as the text.
    assert verdict.reply == "554 5.7.1 spam detected"
    one_line(caplog, logging.INFO)

    caplog.clear()
    verdict = await hooks.check(INPUT, CLEAN)
    assert verdict.action == "accept" and verdict.error is None
    assert verdict.headers == [b"X-Spam-Score: 0.0/5.0\r\n"]
    assert apply_verdict(CLEAN, verdict) == b"X-Spam-Score: 0.0/5.0\r\n" + CLEAN
    one_line(caplog, logging.DEBUG)


async def test_stock_hook_with_rspamc_refuses_gtube(rspamd, config_dir, tmp_path, monkeypatch):
    shutil.copy2(STOCK_HOOK, config_dir / "hooks" / "post-data")
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", tool_path(bin_dir, "mktemp", "cat", "rm", "grep", "cut"))
    rspamd.rspamc_wrapper(bin_dir)
    hooks = load(config_dir)

    verdict = await hooks.check(INPUT, SPAM)
    assert (verdict.action, verdict.reply) == ("reject", "554 5.7.1 spam detected")
    verdict = await hooks.check(INPUT, CLEAN)
    assert verdict.action == "accept"
    assert verdict.headers == [b"X-Spam-Action: no action\r\n"]


# --- the contract: environment, directory, stdin, replies -----------------------------------


async def test_hook_sees_chasquids_environment_in_the_config_directory(
        config_dir, tmp_path, monkeypatch):
    dump = tmp_path / "dump"
    write_hook(config_dir / "hooks" / "post-data",
               f'#!/bin/sh\nenv > {dump}.env\npwd > {dump}.cwd\ncat > {dump}.stdin\n')
    monkeypatch.setenv("USER", "mailrelay")
    monkeypatch.delenv("SHELL", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("MAILRELAY_TEST_SECRET", "must not leak")
    inp = FilterInput(
        remote_addr="2001:db8::7", remote_port=2525, helo="[2001:db8::7] $(reboot);`x`",
        mail_from="", rcpt_to=("a@example.com", "b@example.com"), auth_as="me@example.com",
        on_tls=False, from_local_domain=True, spf_pass=True)
    message = CLEAN + b"x" * (1024 * 1024) + b"\r\n"  # more than a pipe buffer holds

    verdict = await load(config_dir).check(inp, message)

    assert verdict.action == "accept" and verdict.headers == []
    env = dict(line.split("=", 1) for line in (tmp_path / "dump.env").read_text().splitlines())
    assert env == {
        "USER": "mailrelay", "PWD": str(config_dir), "SHELL": "", "PATH": "/usr/bin:/bin",
        "REMOTE_ADDR": "[2001:db8::7]:2525",
        "EHLO_DOMAIN": "[2001:db8::7]rebootx",
        "EHLO_DOMAIN_RAW": "[2001:db8::7] $(reboot);`x`",
        "MAIL_FROM": "", "RCPT_TO": "a@example.com b@example.com",
        "AUTH_AS": "me@example.com", "ON_TLS": "0", "FROM_LOCAL_DOMAIN": "1", "SPF_PASS": "1",
    }
    assert (tmp_path / "dump.cwd").read_text().strip() == str(config_dir)
    assert (tmp_path / "dump.stdin").read_bytes() == message


@pytest.mark.parametrize(("host", "port", "expected"), [
    ("192.0.2.7", 25, "192.0.2.7:25"),
    ("2001:DB8:0:0::1", 587, "[2001:db8::1]:587"),
    ("::ffff:192.0.2.7", 465, "192.0.2.7:465"),  # Go prints a mapped address as IPv4
    ("fe80::1%eth0", 25, "[fe80::1%eth0]:25"),
])
def test_remote_addr_is_gos_host_port(host, port, expected):
    assert go_tcp_addr(host, port) == expected


async def test_example_hooks_ip_extraction_works_on_remote_addr(tmp_path):
    # The greylist part of chasquid's hook: REMOTE_IP=$(echo "$REMOTE_ADDR" | rev | cut ...)
    for host, ip in (("192.0.2.7", "192.0.2.7"), ("2001:db8::1", "[2001:db8::1]")):
        process = await asyncio.create_subprocess_exec(
            "/bin/bash", "-c", 'echo "$REMOTE_ADDR" | rev | cut -d : -f 2- | rev',
            env={"REMOTE_ADDR": go_tcp_addr(host, 4567), "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE)
        out, _ = await process.communicate()
        assert out.decode().strip() == ip


@pytest.mark.parametrize(("script", "action", "reply"), [
    # chasquid's t-10-hooks cases: exit 1 is temporary, 20 permanent, last line as text.
    ('echo "first line"\necho "Nos hacemos la permanente"\nexit 20', "reject",
     "554 5.7.1 Nos hacemos la permanente"),
    ('echo "No pasaran"\nexit 1', "tempfail", "451 4.3.0 No pasaran"),
    # Debian's example hook greylisting: exit 75.
    ('echo "greylisted, please try again"\nexit 75', "tempfail",
     "451 4.3.0 greylisted, please try again"),
    # A hook's own enhanced code of the right class is kept, one of the wrong class is not.
    ('echo "5.7.0 virus detected"\nexit 20', "reject", "554 5.7.0 virus detected"),
    ('echo "4.7.1 greylisted"\nexit 75', "tempfail", "451 4.7.1 greylisted"),
    ('echo "4.7.1 spam"\nexit 20', "reject", "554 5.7.1 spam"),
    # Nothing printed: a text of ours; non-ASCII is not sent raw (RFC 5321 textstring).
    ("exit 20", "reject", "554 5.7.1 Message refused by a filter"),
    ('echo "¡No pasarán!"\nexit 1', "tempfail", "451 4.3.0 ?No pasar?n!"),
    # The last line with text counts, terminated or not.
    ('printf "a\\nlast words"\nexit 20', "reject", "554 5.7.1 last words"),
])
async def test_exit_status_and_last_line(config_dir, caplog, script, action, reply):
    hook = write_hook(config_dir / "hooks" / "post-data", f"#!/bin/sh\n{script}\n")
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir)
    assert (verdict.action, verdict.reply, verdict.headers) == (action, reply, [])
    one_line(caplog, logging.INFO)


async def test_header_output_is_added_at_the_top(config_dir):
    # chasquid's t-10-hooks post-data.good output.
    hook = write_hook(config_dir / "hooks" / "post-data", (
        '#!/bin/sh\ncat > /dev/null\necho "X-Post-Data: success"\n'
        'echo "X-Post-Data-Multiline: multiline"\necho "  header for testing."\n'))
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir)
    assert verdict.headers == [b"X-Post-Data: success\r\n",
                               b"X-Post-Data-Multiline: multiline\r\n  header for testing.\r\n"]
    assert apply_verdict(CLEAN, verdict) == (
        b"X-Post-Data: success\r\nX-Post-Data-Multiline: multiline\r\n"
        b"  header for testing.\r\n" + CLEAN)


@pytest.mark.parametrize("output", [
    "This is not a header\\n",  # chasquid's post-data.bad1
    "X-Post-DATA: This starts like a header\\n\\nBut then is not\\n",  # bad2
    "\\n",  # bad3
    "X-Post-DATA: valid header with no newline at the end",  # bad4
    # Stricter than chasquid, which takes any line with a ':' for a field:
    "not a header: but has a colon\\n",
    " starts folded: x\\n",
    "X-A: 1\\n   \\n",
    "X-A: has a \\033[31mcontrol\\n",
    "X-Long: " + "x" * 1000 + "\\n",
])
async def test_output_that_is_not_header_fields_is_ignored(config_dir, caplog, output):
    hook = write_hook(config_dir / "hooks" / "post-data", f'#!/bin/sh\nprintf "{output}"\n')
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir)
    # chasquid: the message is accepted, the output skipped.
    assert (verdict.action, verdict.headers, verdict.error) == ("accept", [], "bad-output")
    one_line(caplog, logging.WARNING)


def test_header_fields_accepts_crlf_and_utf8_values():
    assert header_fields(b"X-A: 1\r\nX-B: \xc3\xa9t\xc3\xa9\r\n\tmore\r\n") == [
        b"X-A: 1\r\n", b"X-B: \xc3\xa9t\xc3\xa9\r\n\tmore\r\n"]
    assert header_fields(b"") == []


def test_last_line_of_output():
    assert last_line(b"one\ntwo\n") == "two"
    assert last_line(b"one\ntwo\n\n\n") == "two"
    assert last_line(b"") == ""


# --- bad hooks ------------------------------------------------------------------------------


async def test_hook_that_hangs_is_killed_with_its_children(config_dir, tmp_path, caplog):
    pids = tmp_path / "pids"
    hook = write_hook(config_dir / "hooks" / "post-data",
                      f"#!/bin/sh\nsleep 300 &\necho $$ $! > {pids}\nwait\n")
    started = time.monotonic()
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir, timeout=0.5)
    elapsed = time.monotonic() - started
    assert verdict.action == "tempfail" and verdict.reply.startswith("451 4.3.0 ")
    assert verdict.error == "timeout"
    assert elapsed < 3
    hook_pid, child_pid = map(int, pids.read_text().split())
    # The hook was reaped (no zombie of ours), its child killed with the process group.
    assert not Path(f"/proc/{hook_pid}").exists()
    for _ in range(50):
        if gone_or_zombie(child_pid):
            break
        await asyncio.sleep(0.02)
    assert gone_or_zombie(child_pid)
    one_line(caplog, logging.WARNING)


async def test_hook_that_exits_but_leaves_a_child_holding_stdout(config_dir, tmp_path):
    # chasquid waits for the pipe to close, past its own timeout; here the limit holds.
    hook = write_hook(config_dir / "hooks" / "post-data",
                      "#!/bin/sh\necho 'X-A: 1'\nsleep 300 &\nexit 0\n")
    started = time.monotonic()
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir, timeout=0.5)
    assert (verdict.action, verdict.error) == ("tempfail", "timeout")
    assert time.monotonic() - started < 3


async def test_hook_that_never_reads_its_stdin(config_dir):
    hook = write_hook(config_dir / "hooks" / "post-data", "#!/bin/sh\necho 'X-A: 1'\n")
    big = CLEAN + b"y" * (4 * 1024 * 1024)
    verdict = await run_post_data(hook, INPUT, big, cwd=config_dir, timeout=5)
    assert (verdict.action, verdict.headers) == ("accept", [b"X-A: 1\r\n"])


@pytest.mark.parametrize("flood", ["yes 'X-Flood: yes'", "yes 'an error' >&2",
                                   "head -c 5000000 /dev/zero"])
async def test_hook_that_prints_megabytes_is_stopped_at_the_cap(config_dir, caplog, flood):
    hook = write_hook(config_dir / "hooks" / "post-data", f"#!/bin/sh\n{flood}\n")
    started = time.monotonic()
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir, timeout=10)
    assert verdict.action == "tempfail" and verdict.reply.startswith("451 4.3.0 ")
    assert verdict.error == "output-too-large"
    assert time.monotonic() - started < 3
    one_line(caplog, logging.WARNING)


async def test_output_just_under_the_cap_is_fine(config_dir):
    line = b"X-Fill: " + b"f" * 90 + b"\n"
    count = (MAX_OUTPUT - 1) // len(line)
    (config_dir / "out").write_bytes(line * count)
    hook = write_hook(config_dir / "hooks" / "post-data", "#!/bin/sh\ncat out\n")
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir)
    assert verdict.action == "accept" and len(verdict.headers) == count


@pytest.mark.parametrize("signal_name", ["TERM", "KILL", "SEGV"])
async def test_hook_that_dies_by_a_signal(config_dir, caplog, signal_name):
    hook = write_hook(config_dir / "hooks" / "post-data",
                      f"#!/bin/sh\necho 'X-A: 1'\nkill -{signal_name} $$\n")
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir)
    assert (verdict.action, verdict.error) == ("tempfail", "signal")
    # As chasquid: the last line printed is the text; it is no enhanced code, so 4.3.0.
    assert verdict.reply == "451 4.3.0 X-A: 1"
    assert signal_name in one_line(caplog, logging.WARNING).getMessage()


async def test_hook_that_is_not_executable_is_absent(config_dir, caplog):
    write_hook(config_dir / "hooks" / "post-data", "#!/bin/sh\nexit 20\n", mode=0o644)
    write_hook(config_dir / "hooks" / "alias-resolve", "#!/bin/sh\nexit 1\n", mode=0o600)
    hooks = load(config_dir)
    assert hooks.post_data is None and hooks.alias_resolve is None
    # Said once, at load.
    assert len([r for r in filter_records(caplog) if r.levelno == logging.WARNING]) == 2
    caplog.clear()
    assert (await hooks.check(INPUT, CLEAN)).action == "accept"
    assert await hooks.resolve("x@example.com") == []
    assert filter_records(caplog) == []


async def test_missing_hook_is_absent(config_dir, caplog):
    hooks = load(config_dir)
    assert hooks.post_data is None and hooks.alias_resolve is None
    assert filter_records(caplog) == []
    # A hook removed after the load: run_post_data finds no file and accepts.
    verdict = await run_post_data(config_dir / "hooks" / "post-data", INPUT, CLEAN,
                                  cwd=config_dir)
    assert (verdict.action, verdict.error) == ("accept", None)


async def test_hook_that_cannot_start_fails_temporarily(config_dir, caplog):
    # Executable but neither a program nor a script: chasquid answers 451 too.
    hook = write_hook(config_dir / "hooks" / "post-data", "\x7fELF garbage")
    verdict = await run_post_data(hook, INPUT, CLEAN, cwd=config_dir)
    assert verdict.action == "tempfail" and verdict.reply.startswith("451 4.3.0 ")
    assert verdict.error == "start"
    one_line(caplog, logging.WARNING)


async def test_a_slow_hook_does_not_block_the_event_loop(config_dir):
    hook = write_hook(config_dir / "hooks" / "post-data",
                      "#!/bin/sh\ncat > /dev/null\nsleep 0.5\necho 'X-A: 1'\n")
    gaps: list[float] = []

    async def ticker():
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.ensure_future(ticker())
    message = CLEAN + b"z" * (8 * 1024 * 1024)
    results = await asyncio.gather(*(run_post_data(hook, INPUT, message, cwd=config_dir)
                                     for _ in range(4)))
    tick.cancel()
    assert all(v.headers == [b"X-A: 1\r\n"] for v in results)
    assert len(gaps) > 20 and max(gaps) < 0.25, max(gaps)


def test_header_fields_parse_in_linear_time():
    line = b"X-Field: " + b"v" * 60 + b"\n"
    timings = []
    for count in (1_000, 10_000, 100_000):
        out = line * count
        best = min(_timed(header_fields, out) for _ in range(3))
        timings.append(best)
    assert timings[2] < 1.0
    assert timings[2] < 30 * timings[1] + 0.01, timings


def test_header_fields_are_linear_in_continuation_lines():
    # One field of many continuation lines: each line used to be appended to the field's
    # bytes, copying them every time (quadratic).
    def folded(lines: int) -> bytes:
        return b"X-Long: v\n" + b" w\n" * lines
    assert header_fields(folded(2)) == [b"X-Long: v\r\n w\r\n w\r\n"]
    assert_linear(header_fields, folded, 2_000, label="hooks.header_fields, folded lines")


def _timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


# --- alias-resolve --------------------------------------------------------------------------


@pytest.mark.parametrize(("output", "targets"), [
    ("p@q, x@y", [("email", "p@q"), ("email", "x@y")]),  # chasquid's normal-hook.sh
    ("", []),  # empty-hook.sh
    ("pepe, joan@testserver", [("email", "pepe@example.com"), ("email", "joan@testserver")]),
    ("| writemailto ../.data/pipe_alias_worked",
     [("pipe", "writemailto ../.data/pipe_alias_worked")]),
    ("  a@B.Example,  ,b,\n", [("email", "a@b.example"), ("email", "b@example.com")]),
])
def test_alias_output_parses_as_chasquids_right_hand_side(output, targets):
    assert [(t.kind, t.value) for t in parse_alias_output(output, "vicuna@example.com")] \
        == targets


@pytest.mark.parametrize("output", [
    "|",  # chasquid's invalid-hook.sh
    "a@x via mx.example.net",  # chasquid's forwarding: not something mailrelay does
    "a b@x", "a@x\nb@y", "<a@x>", "a@",
])
def test_alias_output_that_does_not_parse(output):
    with pytest.raises(ValueError):
        parse_alias_output(output, "v@example.com")


async def test_alias_resolve_hook_gets_the_address_and_our_environment(
        config_dir, tmp_path, monkeypatch):
    dump = tmp_path / "dump"
    hook = write_hook(config_dir / "hooks" / "alias-resolve",
                      f'#!/bin/sh\necho "$#:$1" > {dump}\nenv >> {dump}\npwd >> {dump}\n'
                      'echo "fwd-$(echo "$1" | cut -d @ -f 1)@elsewhere.example, local"\n')
    monkeypatch.setenv("MAILRELAY_TEST_MARK", "inherited")
    targets = await run_alias_resolve(hook, "vic.uña+abc@example.com", cwd=config_dir)
    assert [(t.kind, t.value) for t in targets] == [
        ("email", "fwd-vic.uña+abc@elsewhere.example"), ("email", "local@example.com")]
    lines = dump.read_text().splitlines()
    assert lines[0] == "1:vic.uña+abc@example.com"
    assert "MAILRELAY_TEST_MARK=inherited" in lines  # chasquid: its whole environment
    assert f"PWD={config_dir}" in lines and lines[-1] == str(config_dir)


async def test_alias_resolve_fixture_hook_gives_nothing(config_dir):
    hook = shutil.copy2(FIXTURE_ALIAS_HOOK, config_dir / "hooks" / "alias-resolve")
    assert await run_alias_resolve(Path(hook), "sales@example.com", cwd=config_dir) == []


@pytest.mark.parametrize(("script", "timeout"), [
    ("exit 1", 5),  # erroring-hook.sh
    ("echo '|'", 5),  # invalid-hook.sh
    ("sleep 300", 0.3),
    ("yes a@b.example,", 5),
    ("kill -KILL $$", 5),
    ("printf 'a@\\377.example'", 5),
])
async def test_alias_resolve_hook_failures(config_dir, caplog, script, timeout):
    hook = write_hook(config_dir / "hooks" / "alias-resolve", f"#!/bin/sh\n{script}\n")
    started = time.monotonic()
    assert await run_alias_resolve(hook, "x@example.com", cwd=config_dir,
                                   timeout=timeout) is None
    assert time.monotonic() - started < 3
    one_line(caplog, logging.WARNING)


async def test_hooks_from_settings(config_dir):
    write_hook(config_dir / "hooks" / "post-data", "#!/bin/sh\nsleep 5\n")
    write_hook(config_dir / "hooks" / "alias-resolve", "#!/bin/sh\necho me\n")
    hooks = load(config_dir, hook_timeout=0.2, alias_resolve_timeout=2.0)
    assert hooks.found == ["post-data", "alias-resolve"]
    assert (await hooks.check(INPUT, CLEAN)).error == "timeout"
    assert [(t.kind, t.value) for t in await hooks.resolve("a@example.com")] == [
        ("email", "me@example.com")]


async def test_messages_in_the_filters_at_once_are_bounded(config_dir, monkeypatch):
    """Outside eyes: 91 messages at once each started a hook (three pipes apiece) and ran
    the server out of descriptors. A bounded number run; the rest wait their turn, and
    one that waits too long gets 451."""
    from mailrelay.message.filters import chain

    started = config_dir / "started"
    write_hook(config_dir / "hooks" / "post-data",
               f"#!/bin/sh\necho x >> {started}\nsleep 1\n")
    filters = chain.Filters(load(config_dir), slots=asyncio.Semaphore(2))
    monkeypatch.setattr(chain, "SLOT_WAIT", 1.5)
    outcomes = await asyncio.gather(*(filters.check(INPUT, b"", CLEAN) for _ in range(6)))
    replies = [outcome.reply for outcome in outcomes]
    # Two at a time: the second round of 1 s starts within the wait, the third not.
    assert replies.count(None) == 4, replies
    assert replies.count(chain.BUSY_REPLY) == 2, replies
    assert len(started.read_text().split()) == 4
