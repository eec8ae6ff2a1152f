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


def owner_for(path: Path) -> tuple[int, int]:
    """Who a file written at ``path`` should belong to (uid, gid): the owner of the file
    it replaces, else the owner of the directory it is written into.

    The one ownership rule of every file and directory mailrelay writes: root running
    `mailrelay user add`, `dkim keygen`, `aliases edit`, `import-chasquid` or `init` in
    the service's directories must not leave files the unprivileged server cannot read.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = os.stat(path.parent)
    return st.st_uid, st.st_gid


def _give_owner(path: Path, owner: tuple[int, int], fd: int | None = None) -> None:
    """Make ``owner`` own ``path`` (through ``fd`` when given: the temporary file that is
    about to replace ``path``)."""
    if owner != (os.geteuid(), os.getegid()):
        # Not root: the file stays ours, as it would with any editor.
        with contextlib.suppress(PermissionError):
            if fd is not None:
                os.fchown(fd, *owner)
            else:
                os.chown(path, *owner, follow_symlinks=False)


def make_dirs(path: Path | str, mode: int = 0o750) -> list[Path]:
    """``mkdir -p`` for files the CLI writes: each directory it creates gets ``mode``
    (exactly, not narrowed by the umask) and the owner of the directory it is created in
    (the rule of :func:`owner_for`). Returns the directories created, outermost first."""
    path = Path(path)
    missing: list[Path] = []
    walk = path
    while not walk.exists():
        missing.append(walk)
        if walk.parent == walk:
            break
        walk = walk.parent
    created: list[Path] = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, left as it is
        created.append(directory)
        os.chmod(directory, mode)
        _give_owner(directory, owner_for(directory.parent))
        fsync_dir(directory.parent)
    return created


def atomic_write(
    path: Path | str, data: bytes | Sequence[bytes], mode: int = 0o600, sync_dir: bool = True,
    new_file: bool = False,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written in order) so readers see
    either the old or the new file, and a crash leaves no partial file under ``path``.

    The temporary file is created with ``mode`` from the start (no window where a
    secret is world-readable) and removed again if anything fails. Its name is
    ``.<name>.tmp<pid>``, so the leftovers of a dead process can be told apart.
    The file keeps the owner of the file it replaces; a new file gets the owner of its
    directory (:func:`owner_for`).
    ``new_file``: ``path`` does not exist yet and is the server's own (a queue file,
    written per message in its own data_dir), so ownership is not looked at, and the mode
    is left as the umask makes it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            if not new_file:
                os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
                _give_owner(path, owner_for(path), fd)
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
