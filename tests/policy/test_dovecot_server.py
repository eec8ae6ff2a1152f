"""dovecot auth wired into the server (issue 20, item 4), against a real dovecot with a
passwd-file userdb on private sockets: a dovecot-only user logs in over 587 and receives
mail, wrong passwords count against the throttle, and a dovecot that cannot answer gets
454 without counting."""

from __future__ import annotations

import asyncio
import logging

from tests.policy.test_dovecot import PASSWORD as DOVECOT_PASSWORD
from tests.policy.test_dovecot import USER as DOVECOT_USER
from tests.policy.test_dovecot import dovecot  # noqa: F401  (the session's real dovecot)
from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, PASSWORD, USER

MAX_FAILURES = 3


async def submission(env, source: str = "127.0.0.1") -> RawSMTP:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["submission"],
                                                   local_addr=(source, 0))
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    await client.starttls(env.client_tls(), HOSTNAME)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    return client


def dovecot_settings(dovecot_server) -> dict:
    return {"dovecot": True, "dovecot_userdb_path": str(dovecot_server.userdb),
            "dovecot_client_path": str(dovecot_server.client), "dovecot_timeout": "3s"}


async def test_a_dovecot_user_logs_in_sends_and_receives(env, dovecot, caplog):  # noqa: F811
    env.write_config(auth=dovecot_settings(dovecot),
                     limits={"auth_failures_per_ip": MAX_FAILURES, "auth_block_time": "1m",
                             "auth_failure_delay": "0s"})
    env.add_user()
    (env.config_dir / "domains" / "example.com" / "aliases").write_text("*: me\n")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    caplog.set_level(logging.INFO)
    await env.start()
    assert any("auth.dovecot: userdb" in r.getMessage() for r in caplog.records)

    client = await submission(env)
    code, lines = await client.auth_plain(DOVECOT_USER, DOVECOT_PASSWORD)
    assert code == 235, (code, lines)
    # Sender rights as for a user of ours: its own address.
    assert await client.send_message(DOVECOT_USER, ["friend@remote.test"],
                                     b"Subject: from dovecot's user\r\n\r\nhi\r\n") == 250
    assert (await client.cmd("MAIL FROM:<me@example.com>"))[0] == 550
    await client.close()
    [sent] = await env.sink.until(1)
    assert sent.sender == DOVECOT_USER

    # Mail to the dovecot user is delivered here, not to the catch-all (as chasquid);
    # an address nobody has still goes to the catch-all.
    mx = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await mx.cmd("EHLO client.test"))[0] == 250
    assert await mx.send_message("a@elsewhere.test", [DOVECOT_USER, "nobody@example.com"],
                                 b"Subject: for dovecot's user\r\n\r\nhi\r\n") == 250
    await mx.close()
    [stored] = await env.wait_mailbox(1, DOVECOT_USER)
    assert b"Subject: for dovecot's user" in stored
    [caught] = await env.wait_mailbox(1, USER)
    assert b"Subject: for dovecot's user" in caught

    # The users file's own users are checked there only: a local user's right password.
    client = await submission(env)
    assert (await client.auth_plain(USER, PASSWORD))[0] == 235
    await client.close()


async def test_wrong_passwords_count_and_the_throttle_blocks(env, dovecot):  # noqa: F811
    env.write_config(auth=dovecot_settings(dovecot),
                     limits={"auth_failures_per_ip": MAX_FAILURES, "auth_block_time": "1m",
                             "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    client = await submission(env)
    for guess in range(MAX_FAILURES):
        code, lines = await client.auth_plain(DOVECOT_USER, f"wrong {guess}")
        assert code == 535 and lines[0].startswith("5.7.8"), (code, lines)
    # Blocked now, also for the right password, and for the users file's users.
    code, lines = await client.auth_plain(DOVECOT_USER, DOVECOT_PASSWORD)
    assert code == 454 and lines[0].startswith("4.7.0"), (code, lines)
    assert "try again in 1 minute" in lines[0]
    assert (await client.auth_plain(USER, PASSWORD))[0] == 454
    await client.close()
    # Another address is not blocked.
    other = await submission(env, "127.0.0.3")
    assert (await other.auth_plain(DOVECOT_USER, DOVECOT_PASSWORD))[0] == 235
    await other.close()


async def test_dovecot_unavailable_is_a_temporary_failure_not_a_guess(env, tmp_path, caplog):
    env.write_config(auth={"dovecot": True,
                           "dovecot_userdb_path": str(tmp_path / "no-such-userdb"),
                           "dovecot_client_path": str(tmp_path / "no-such-client")},
                     limits={"auth_failures_per_ip": 2, "auth_failure_delay": "0s"})
    env.add_user()
    (env.config_dir / "domains" / "example.com" / "aliases").write_text("*: me\n")
    caplog.set_level(logging.INFO)
    await env.start()
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "auth.dovecot" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-userdb" in warnings[0], warnings

    client = await submission(env)
    for _ in range(4):  # more than auth_failures_per_ip: none of them counts
        code, lines = await client.auth_plain(DOVECOT_USER, DOVECOT_PASSWORD)
        assert code == 454 and lines[0].startswith("4.7.0"), (code, lines)
    assert (await client.auth_plain(USER, PASSWORD))[0] == 235  # not blocked
    await client.close()
    failed = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("auth-failed ")]
    assert len(failed) == 4 and all('reason="454 4.7.0 unavailable"' in f for f in failed)

    # RCPT: dovecot cannot say whether the address exists: try again later (451).
    mx = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await mx.cmd("EHLO client.test"))[0] == 250
    assert (await mx.cmd("MAIL FROM:<a@elsewhere.test>"))[0] == 250
    code, lines = await mx.cmd(f"RCPT TO:<{DOVECOT_USER}>")
    assert code == 451 and lines[0].startswith("4.3.0"), (code, lines)
    assert (await mx.cmd(f"RCPT TO:<{USER}>"))[0] == 250  # our own user: no question
    await mx.close()
