"""MTA-STS policies (RFC 8461): parsing, and discovery against a real DNS server and a real
HTTPS policy server on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import stat
import time

import pytest
import trustme

from mailrelay.config import DNSSettings
from mailrelay.delivery.mta_sts import MTASTS, Policy, PolicyError, parse_policy, parse_txt
from mailrelay.dnsresolver import make_resolver
from tests.support.https_server import PolicyServer

DOMAIN = "remote.test"
POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mx1.remote.test\r\nmx: *.backup.test\r\n"
          "max_age: 86400\r\n")


# -- parsing -------------------------------------------------------------------------


def test_parse_good_policy_crlf_and_lf():
    for text in (POLICY, POLICY.replace("\r\n", "\n"), POLICY.rstrip("\r\n")):
        policy = parse_policy(text, "abc", 100.0)
        assert policy == Policy("enforce", ("mx1.remote.test", "*.backup.test"), 86400, "abc",
                                100.0)


def test_parse_lowercases_patterns_and_ignores_unknown_fields():
    policy = parse_policy("version: STSv1\nmode: testing\nmx: MX.Example.COM.\n"
                          "extension_field: whatever\nmax_age:0\n", "1", 0.0)
    assert policy.mode == "testing"
    assert policy.mx == ("mx.example.com",)
    assert policy.max_age == 0


def test_parse_none_mode_needs_no_mx():
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n", "1", 0.0).mx == ()


@pytest.mark.parametrize("text, error", [
    (POLICY.replace("STSv1", "STSv2"), "version"),
    (POLICY.replace("version: STSv1\r\n", ""), "version"),
    (POLICY.replace("enforce", "strict"), "mode"),
    (POLICY.replace("enforce", "Enforce"), "mode"),
    (POLICY.replace("max_age: 86400\r\n", ""), "max_age"),
    (POLICY.replace("86400", "-1"), "max_age"),
    (POLICY.replace("86400", "31557601"), "max_age"),
    (POLICY.replace("86400", "1d"), "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 60\n", "no mx"),
    (POLICY.replace("mx1.remote.test", "mx1.*.test"), "mx pattern"),
    (POLICY.replace("mx1.remote.test", "127.0.0.1:25"), "mx pattern"),
    (POLICY + "this line has no colon\n", "key: value"),
    ("<html><body>Not a policy</body></html>", "key: value"),
])
def test_parse_bad_policies(text, error):
    with pytest.raises(PolicyError, match=error):
        parse_policy(text, "1", 0.0)


@pytest.mark.parametrize("host, expected", [
    ("mx1.remote.test", True),
    ("MX1.Remote.Test", True),
    ("mx1.remote.test.", True),
    ("mx2.remote.test", False),
    ("remote.test", False),
    ("a.backup.test", True),
    ("B.BACKUP.TEST.", True),
    ("a.b.backup.test", False),  # the wildcard stands for exactly one label
    ("backup.test", False),
    (".backup.test", False),
    ("xbackup.test", False),
    ("mx1.remote.test.evil.test", False),
])
def test_wildcard_matching(host, expected):
    policy = parse_policy(POLICY, "1", 0.0)
    assert policy.matches(host) is expected


@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20260101T000000"], "20260101T000000"),
    (["v=STSv1;id=abc;"], "abc"),
    (["v=STSv1; id=abc; ext=1"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # other records are discarded
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # several: no policy
    (["v=STSv1; ext=1"], None),  # no id
    (["v=STSv1; id=a-b"], None),  # id is alphanumeric only
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv2; id=abc"], None),
    (["id=abc; v=STSv1"], None),
])
def test_parse_txt(records, expected):
    assert parse_txt(records) == expected


# -- discovery and fetching ----------------------------------------------------------


@pytest.fixture
def https(ca):
    with PolicyServer(ca, [DOMAIN, "other.test"], host="127.0.0.1") as server:
        yield server


@pytest.fixture
def client_context(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def publish(dns_server, https):
    """publish(id, policy): the TXT record, the policy host's address and the policy."""

    def publish(policy_id: str | None = "1", policy: str | None = POLICY,
                domain: str = DOMAIN, **options) -> None:
        dns_server.remove(f"_mta-sts.{domain}")
        if policy_id is not None:
            dns_server.add(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id}")
        dns_server.add(f"mta-sts.{domain}", "A", https.host)
        if policy is not None:
            https.set(domain, policy, **options)

    return publish


@pytest.fixture
def make_sts(dns_server, tmp_path, client_context, https):
    def make(**options) -> MTASTS:
        resolver = make_resolver(DNSSettings(nameservers=[dns_server.address], timeout=2.0))
        # These tests change records between lookups: as if every TTL had passed.
        resolver.cache = None
        options.setdefault("port", https.port)
        sts = MTASTS(resolver, tmp_path / "mta-sts", options.pop("context", client_context),
                     **options)
        return sts

    return make


async def test_fetch_ok_and_cached_on_disk(publish, make_sts, https, tmp_path):
    publish("20260101")
    sts = make_sts()
    before = time.time()
    policy = await sts.policy_for("Remote.Test.")
    assert policy is not None
    assert policy.mode == "enforce"
    assert policy.mx == ("mx1.remote.test", "*.backup.test")
    assert policy.id == "20260101"
    assert policy.max_age == 86400
    assert before <= policy.fetched <= time.time()
    assert https.count(DOMAIN) == 1
    assert https.requests[0].path == "/.well-known/mta-sts.txt"

    cache_dir = tmp_path / "mta-sts"
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    stored = json.loads((cache_dir / "remote.test.json").read_text())
    assert stored["id"] == "20260101" and stored["mode"] == "enforce"
    assert stat.S_IMODE((cache_dir / "remote.test.json").stat().st_mode) == 0o600


async def test_no_txt_record_no_policy_no_fetch(publish, make_sts, https):
    publish(None)
    assert await make_sts().policy_for(DOMAIN) is None
    assert https.count(DOMAIN) == 0


async def test_body_without_content_length(publish, make_sts):
    publish("1", POLICY, send_length=False)
    policy = await make_sts().policy_for(DOMAIN)
    assert policy is not None and policy.mode == "enforce"


async def test_redirect_is_refused(publish, make_sts, https, caplog):
    publish("1", POLICY, status=301, location="https://mta-sts.other.test/.well-known/mta-sts.txt")
    https.set("other.test", POLICY)
    with caplog.at_level(logging.WARNING, "mailrelay.mta-sts"):
        assert await make_sts().policy_for(DOMAIN) is None
    assert "redirect" in caplog.text
    assert https.count("other.test") == 0


@pytest.mark.parametrize("status", [404, 500])
async def test_error_status_is_refused(publish, make_sts, status):
    publish("1", POLICY, status=status)
    assert await make_sts().policy_for(DOMAIN) is None


@pytest.mark.parametrize("content_type", ["text/html", "application/octet-stream", None])
async def test_wrong_content_type_is_refused(publish, make_sts, caplog, content_type):
    publish("1", POLICY, content_type=content_type)
    with caplog.at_level(logging.WARNING, "mailrelay.mta-sts"):
        assert await make_sts().policy_for(DOMAIN) is None
    assert "Content-Type" in caplog.text


async def test_content_type_parameters_allowed(publish, make_sts):
    publish("1", POLICY, content_type="Text/Plain; charset=utf-8")
    assert await make_sts().policy_for(DOMAIN) is not None


@pytest.mark.parametrize("send_length", [True, False])
async def test_oversize_policy_is_refused(publish, make_sts, caplog, send_length):
    padding = "".join(f"x{i}: {'y' * 60}\n" for i in range(2000))  # > 64 KiB, valid lines
    publish("1", POLICY + padding, send_length=send_length)
    with caplog.at_level(logging.WARNING, "mailrelay.mta-sts"):
        assert await make_sts().policy_for(DOMAIN) is None
    assert "larger than 65536" in caplog.text


async def test_policy_within_size_limit_with_padding(publish, make_sts):
    padding = "".join(f"x{i}: {'y' * 60}\n" for i in range(100))
    publish("1", POLICY + padding)
    assert await make_sts().policy_for(DOMAIN) is not None


async def test_untrusted_certificate_is_refused(publish, make_sts, https, caplog):
    publish("1")
    other_ca = trustme.CA()
    context = ssl.create_default_context()
    other_ca.configure_trust(context)  # trusts a CA that did not sign the server's cert
    with caplog.at_level(logging.WARNING, "mailrelay.mta-sts"):
        assert await make_sts(context=context).policy_for(DOMAIN) is None
    assert "certificate" in caplog.text.lower()
    assert https.count(DOMAIN) == 0


async def test_certificate_for_another_name_is_refused(publish, make_sts, https, ca, dns_server):
    # mta-sts.third.test points at a server whose certificate only names the other domains.
    publish("1")
    dns_server.add("_mta-sts.third.test", "TXT", "v=STSv1; id=1")
    dns_server.add("mta-sts.third.test", "A", https.host)
    https.set("third.test", POLICY)
    assert await make_sts().policy_for("third.test") is None
    assert https.count("third.test") == 0


async def test_slow_server_bounded_by_fetch_timeout(publish, make_sts):
    publish("1", POLICY, delay=3.0)
    started = time.monotonic()
    assert await make_sts(fetch_timeout=0.5).policy_for(DOMAIN) is None
    assert time.monotonic() - started < 2.5


async def test_cache_reused_while_id_unchanged(publish, make_sts, https):
    publish("1")
    sts = make_sts()
    first = await sts.policy_for(DOMAIN)
    for _ in range(3):
        assert await sts.policy_for(DOMAIN) == first
    assert https.count(DOMAIN) == 1


async def test_refetched_when_id_changes(publish, make_sts, https):
    publish("1")
    sts = make_sts()
    assert (await sts.policy_for(DOMAIN)).mode == "enforce"
    publish("2", POLICY.replace("enforce", "testing"))
    policy = await sts.policy_for(DOMAIN)
    assert (policy.mode, policy.id) == ("testing", "2")
    assert https.count(DOMAIN) == 2


async def test_cached_policy_used_when_server_down(publish, make_sts, https, caplog):
    publish("1")
    sts = make_sts()
    first = await sts.policy_for(DOMAIN)
    https.stop()
    publish("2", None)  # a new id, but the policy host does not answer
    with caplog.at_level(logging.WARNING, "mailrelay.mta-sts"):
        assert await sts.policy_for(DOMAIN) == first
    assert "using the cached policy" in caplog.text


async def test_cached_policy_used_when_txt_record_disappears(publish, make_sts, dns_server):
    publish("1")
    sts = make_sts()
    first = await sts.policy_for(DOMAIN)
    dns_server.remove(f"_mta-sts.{DOMAIN}")
    assert await sts.policy_for(DOMAIN) == first


async def test_cache_survives_a_new_instance(publish, make_sts, https):
    publish("1")
    first = await make_sts().policy_for(DOMAIN)
    https.stop()
    second = await make_sts().policy_for(DOMAIN)
    assert second == first
    assert https.count(DOMAIN) == 1


async def test_expired_cache_is_not_used(publish, make_sts, https, tmp_path):
    publish("1")
    await make_sts().policy_for(DOMAIN)
    path = tmp_path / "mta-sts" / "remote.test.json"
    stored = json.loads(path.read_text())
    stored["fetched"] = time.time() - stored["max_age"] - 1
    path.write_text(json.dumps(stored))
    https.stop()
    assert await make_sts().policy_for(DOMAIN) is None
    assert not path.exists()


async def test_none_mode_is_cached_but_returns_none(publish, make_sts, https, tmp_path):
    publish("1")
    sts = make_sts()
    assert await sts.policy_for(DOMAIN) is not None
    publish("2", "version: STSv1\nmode: none\nmax_age: 86400\n")
    assert await sts.policy_for(DOMAIN) is None
    assert await sts.policy_for(DOMAIN) is None
    assert https.count(DOMAIN) == 2  # the "none" policy is cached like any other
    stored = json.loads((tmp_path / "mta-sts" / "remote.test.json").read_text())
    assert (stored["mode"], stored["id"]) == ("none", "2")


async def test_concurrent_lookups_share_one_fetch(publish, make_sts, https):
    publish("1", POLICY, delay=0.3)
    sts = make_sts()
    results = await asyncio.gather(*(sts.policy_for(DOMAIN) for _ in range(10)))
    assert all(r is not None and r == results[0] for r in results)
    assert https.count(DOMAIN) == 1


async def test_dns_failure_falls_back_to_cache(publish, make_sts, dns_server):
    publish("1")
    sts = make_sts()
    first = await sts.policy_for(DOMAIN)
    dns_server.set_servfail(f"_mta-sts.{DOMAIN}")
    assert await sts.policy_for(DOMAIN) == first
    assert await make_sts().policy_for("other.test") is None  # no record at all


async def test_failed_fetch_not_retried_at_once(publish, make_sts, https):
    publish("1", POLICY, status=500)
    sts = make_sts()
    assert await sts.policy_for(DOMAIN) is None
    assert await sts.policy_for(DOMAIN) is None
    assert https.count(DOMAIN) == 1
    sts.retry_after = 0.0
    https.set(DOMAIN, POLICY)
    assert await sts.policy_for(DOMAIN) is not None


async def test_background_refresh_picks_up_a_new_id(publish, make_sts, https):
    publish("1")
    sts = make_sts()
    sts.refresh_interval = 0.1
    await sts.policy_for(DOMAIN)
    sts.start()
    try:
        publish("2", POLICY.replace("enforce", "testing"))
        for _ in range(100):
            if https.count(DOMAIN) == 2:
                break
            await asyncio.sleep(0.05)
        assert https.count(DOMAIN) == 2
        https.stop()  # the refreshed policy is cached: no fetch needed any more
        policy = await sts.policy_for(DOMAIN)
        assert (policy.mode, policy.id) == ("testing", "2")
    finally:
        await sts.stop()


async def test_background_refresh_before_expiry(publish, make_sts, https):
    publish("1", POLICY.replace("86400", "2"))
    sts = make_sts()
    sts.refresh_interval = 0.2
    first = await sts.policy_for(DOMAIN)
    sts.start()
    try:
        # Half of max_age later the policy is fetched again, with the same id.
        for _ in range(100):
            if https.count(DOMAIN) >= 2:
                break
            await asyncio.sleep(0.05)
        assert https.count(DOMAIN) >= 2
        refreshed = await sts.policy_for(DOMAIN)
        assert refreshed is not None and refreshed.fetched > first.fetched
    finally:
        await sts.stop()
