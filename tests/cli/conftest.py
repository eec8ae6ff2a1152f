"""Fixtures the CLI tests share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A temporary directory under /tmp that other users can traverse (pytest's tmp_path
    is private to root, so a check or serve run as the service user could not reach it)."""
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-cli-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
