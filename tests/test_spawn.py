"""Starting commands: a new session, default signals, fds 0-2, and every way of starting
(libc or os.posix_spawnp on a thread, os.posix_spawnp on the calling thread)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from mailrelay import spawn as spawn_module
from mailrelay.spawn import spawn

SCRIPT = ("import os, sys; print(os.getsid(0) == os.getpid(), sys.stdin.read(), "
          "os.environ['ONLY'], sorted(os.environ), file=sys.stderr)")


@pytest.fixture(params=["libc", "os.posix_spawnp", "inline"])
def way(request, monkeypatch):
    if request.param == "os.posix_spawnp":  # on a thread, where libc cannot be loaded
        monkeypatch.setattr(spawn_module, "_libc", None)
    else:
        assert spawn_module._libc is not None, "glibc is expected on the test machine"
    return request.param


async def run(way, argv, env, stdin_data=b""):
    stdin_read, stdin_write = os.pipe()
    err_read, err_write = os.pipe()
    os.write(stdin_write, stdin_data)
    os.close(stdin_write)
    try:
        pid = await spawn(argv, env, stdin_read, err_write, inline=way.endswith("inline"))
    finally:
        os.close(stdin_read)
        os.close(err_write)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    with os.fdopen(err_read, "rb") as err:
        return os.waitstatus_to_exitcode(status), err.read().decode()


async def test_the_command_gets_its_own_session_our_stdin_and_only_our_env(way):
    python = os.path.realpath(os.sys.executable)
    code, err = await run(way, [python, "-c", SCRIPT], {"ONLY": "this"}, b"hello")
    assert code == 0, err
    assert err.split(None, 3)[:3] == ["True", "hello", "this"]
    assert "'ONLY'" in err and "'HOME'" not in err


async def test_path_is_searched_and_a_missing_command_is_an_oserror(way):
    code, _ = await run(way, ["true"], {"PATH": "/usr/bin:/bin"})
    assert code == 0
    with pytest.raises(OSError):
        await run(way, ["no-such-command-here"], {"PATH": "/usr/bin:/bin"})


async def test_signals_python_ignores_start_at_their_default(way):
    # The server ignores SIGPIPE (Python does); an ignored signal would stay ignored
    # across exec, so a command writing to a closed pipe would never be stopped by it.
    code, err = await run(way, ["sh", "-c", "grep SigIgn /proc/self/status >&2"],
                          {"PATH": "/usr/bin:/bin"})
    assert code == 0
    ignored = int(err.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))
