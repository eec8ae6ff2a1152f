"""Durable file writes: write to a temporary file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a single write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _keep_owner(fd: int, path: Path) -> None:
    """Give the new file the old one's owner: root editing a users file must not make it
    unreadable for the unprivileged server."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        # Not root: the file stays ours, as it would with any editor.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, st.st_uid, st.st_gid)


def atomic_write(
    path: Path | str, data: bytes | Sequence[bytes], mode: int = 0o600, sync_dir: bool = True,
    new_file: bool = False,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written in order) so readers see
    either the old or the new file, and a crash leaves no partial file under ``path``.

    The temporary file is created with ``mode`` from the start (no window where a
    secret is world-readable) and removed again if anything fails. Its name is
    ``.<name>.tmp<pid>``, so the leftovers of a dead process can be told apart.
    ``new_file``: ``path`` does not exist yet (a queue file, written per message), so
    there is no owner to keep, and the mode is left as the umask makes it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            if not new_file:
                os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
                _keep_owner(fd, path)
            for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)
