"""The queue benchmark still runs (briefly, tiny settings) and its parts still work."""

from __future__ import annotations

import json

import pytest

from bench import queue_bench
from mailrelay import queue as queue_module
from mailrelay.queue import Queue

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid 0 0
/dev/vdb /srv/mail\\040spool xfs rw,noatime 0 0
"""


def test_filesystem_of_picks_the_longest_mount_point():
    assert queue_bench.filesystem_of(queue_bench.Path("/var/lib/x"), MOUNTS)["type"] == "ext4"
    assert queue_bench.filesystem_of(queue_bench.Path("/tmp/q"), MOUNTS)["type"] == "tmpfs"
    spool = queue_bench.filesystem_of(queue_bench.Path("/srv/mail spool/q"), MOUNTS)
    assert spool == {"device": "/dev/vdb", "mount_point": "/srv/mail spool", "type": "xfs",
                     "options": "rw,noatime"}
    assert queue_bench.filesystem_of(queue_bench.Path("/tmpx"), MOUNTS)["type"] == "ext4"


@pytest.mark.parametrize("size", list(queue_bench.SIZES.values()))
def test_messages_have_the_size(size):
    chunks = queue_bench.make_chunks(size)
    assert sum(len(c) for c in chunks) == size
    assert chunks[-1].endswith(b"\r\n")


async def test_raw_payload_matches_what_put_writes(tmp_path):
    chunks = queue_bench.make_chunks(1024)
    item = await Queue(tmp_path).put(queue_bench.SENDER, list(queue_bench.RECIPIENTS), chunks,
                                     queue_bench.META)
    written = item.path.read_bytes()
    raw = b"".join(queue_bench.raw_payload(chunks))
    assert abs(len(written) - len(raw)) <= 8  # the same envelope, up to id and time digits
    assert written[item.body_offset:] == b"".join(chunks)


def test_counting_dir_fsyncs_restores_the_original(tmp_path):
    original = queue_module.fsync_dir
    with queue_bench.counting_dir_fsyncs() as counter:
        queue_module.fsync_dir(tmp_path)
    assert counter == [1]
    assert queue_module.fsync_dir is original


def test_run_bench_briefly(tmp_path):
    sizes = {"1KiB": 1024, "4KiB": 4096}
    report = queue_bench.run_bench(tmp_path, seconds=0.02, repeat=1, concurrencies=(1, 4, 64),
                                   sizes=sizes, warmup=0.01)
    assert list(tmp_path.iterdir()) == []  # cleaned up between and after measurements
    for size in sizes:
        result = report["results"][size]
        assert result["raw_per_s"] > 0 and len(result["raw_runs"]) == 3
        for concurrency in ("1", "4", "64"):
            numbers = result["concurrency"][concurrency]
            assert numbers["ours_per_s"] > 0
            assert numbers["ratio_to_raw"] > 0
            assert len(numbers["paired_ratios"]) == 1
            assert 0 < numbers["dir_fsyncs_per_message"] <= 1.0
        assert result["concurrency"]["1"]["dir_fsyncs_per_message"] == 1.0
    assert set(report["target"]["met"]) == set(sizes)
    assert "ours/raw" in queue_bench.table(report)
    assert queue_bench.machine_line(report).startswith("machine: ")
    json.dumps(report)


def test_main_writes_json_and_cleans_up(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(queue_bench, "SIZES", {"1KiB": 1024})
    monkeypatch.setattr(queue_bench, "CONCURRENCIES", (1, 2))
    work = tmp_path / "work"
    path = tmp_path / "out" / "bench.json"
    assert queue_bench.main(["--seconds", "0.01", "--repeat", "1", "--quiet",
                             "--dir", str(work), "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["repeat"] == 1 and report["same_filesystem_as_default_data_dir"]
    assert list(report["results"]) == ["1KiB"]
    assert list(work.iterdir()) == []  # its temporary directory is gone
    out = capsys.readouterr().out
    assert "ours/raw" in out and "machine: " in out
