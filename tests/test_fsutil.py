"""fsutil's ownership rule: a file written into a directory belongs to the directory's
owner (a rewritten file keeps its own), and so does a directory make_dirs creates.

As root, chown works for any uid, whether or not a user has it, so a directory owned by
4242:4242 stands in for the service's."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailrelay.fsutil import atomic_write, make_dirs, owner_for

SERVICE = (4242, 4242)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "service"
    directory.mkdir()
    os.chown(directory, *SERVICE)
    return directory


@needs_root
def test_new_file_gets_the_directory_owner(service_dir):
    path = service_dir / "users"
    atomic_write(path, b"me !\n", mode=0o600)
    assert owner(path) == SERVICE
    assert mode(path) == 0o600
    assert path.read_bytes() == b"me !\n"
    assert owner_for(service_dir / "other") == SERVICE


@needs_root
def test_rewritten_file_keeps_its_own_owner(service_dir):
    path = service_dir / "aliases"
    path.write_bytes(b"old\n")
    os.chown(path, 4343, 4344)
    atomic_write(path, b"new\n", mode=0o644)
    assert owner(path) == (4343, 4344)
    assert mode(path) == 0o644


@needs_root
def test_file_in_our_own_directory_stays_ours(tmp_path):
    path = tmp_path / "mine"
    atomic_write(path, b"x", mode=0o640)
    assert owner(path) == (os.geteuid(), os.getegid())
    assert mode(path) == 0o640


@needs_root
def test_make_dirs_gives_each_new_directory_its_parents_owner(service_dir):
    deep = service_dir / "domains" / "example.com"
    created = make_dirs(deep, 0o750)
    assert created == [service_dir / "domains", deep]
    for directory in created:
        assert owner(directory) == SERVICE
        assert mode(directory) == 0o750
    # A file written into the new directory follows the same rule.
    atomic_write(deep / "dkim:s1.pem", b"key", mode=0o600)
    assert owner(deep / "dkim:s1.pem") == SERVICE


def test_make_dirs_sets_the_mode_despite_the_umask_and_keeps_existing_ones(tmp_path):
    old = os.umask(0o077)
    try:
        created = make_dirs(tmp_path / "a" / "b", 0o750)
    finally:
        os.umask(old)
    assert created == [tmp_path / "a", tmp_path / "a" / "b"]
    assert mode(tmp_path / "a" / "b") == 0o750
    (tmp_path / "a").chmod(0o755)
    assert make_dirs(tmp_path / "a" / "b" / "c", 0o700) == [tmp_path / "a" / "b" / "c"]
    assert mode(tmp_path / "a") == 0o755  # existing directories are left as they are
