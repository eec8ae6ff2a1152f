"""The signing benchmark still runs (briefly, without openssl) and its parts still work."""

from __future__ import annotations

import json

import dkim
import pytest

from bench import sign_bench
from mailrelay.message.dkim.keys import dns_record
from mailrelay.message.dkim.signer import sign

MR_OUTPUT = "+F2:2:2048:1512.121212:53040.000000\n+F6:0:253:Ed25519:23319.191919:8381.000000\n"
TABLE_OUTPUT = """\
                  sign    verify    sign/s verify/s
rsa 2048 bits 0.000685s 0.000021s   1460.0  47246.5
                              sign    verify    sign/s verify/s
 253 bits EdDSA (Ed25519)   0.0000s   0.0001s  20487.5   7980.0
"""


def test_parse_openssl_speed():
    assert sign_bench.parse_openssl_speed(MR_OUTPUT, "rsa2048") == pytest.approx(1512.121212)
    assert sign_bench.parse_openssl_speed(MR_OUTPUT, "ed25519") == pytest.approx(23319.191919)
    assert sign_bench.parse_openssl_speed(TABLE_OUTPUT, "rsa2048") == 1460.0
    assert sign_bench.parse_openssl_speed(TABLE_OUTPUT, "ed25519") == 20487.5
    with pytest.raises(ValueError):
        sign_bench.parse_openssl_speed("nothing here", "rsa2048")


@pytest.mark.parametrize("size", list(sign_bench.SIZES.values()))
def test_messages_have_the_size_and_sign(size):
    message = sign_bench.make_message(size)
    assert len(message) == size
    key = sign_bench.make_key("ed25519")
    _, value = dns_record(key)
    signed = sign(message, [key]) + message
    assert dkim.verify(signed, dnsfunc=lambda qname, timeout=5: value.encode())


def test_run_bench_briefly(capsys):
    report = sign_bench.run_bench(seconds=0.02, repeat=1, with_openssl=False,
                                  dkimpy_seconds=0.02)
    for algo in sign_bench.ALGOS:
        result = report["results"][algo]
        assert result["openssl_sign_per_s"] is None
        for size in sign_bench.SIZES:
            assert result["sizes"][size]["ours_per_s"] > 0
    assert report["dkimpy_rsa2048_1KiB_per_s"] > 0
    assert "rsa2048" in sign_bench.table(report)
    json.dumps(report)


def test_main_writes_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    assert sign_bench.main(["--seconds", "0.01", "--repeat", "1", "--no-openssl", "--quiet",
                            "--json", str(path)]) == 0
    assert json.loads(path.read_text())["repeat"] == 1
    assert "ours/openssl" in capsys.readouterr().out
