"""The durable on-disk queue (spool).

Each accepted message is one file ``<id>.msg``: a first line ``MAILRELAY1 <json envelope>``
followed by the message bytes exactly as received (plus our added headers). It is written
to a hidden temporary name, fsynced, renamed into place, and the directory is fsynced
before ``put`` returns, so a ``250`` given after ``put`` survives a crash or power loss.

Delivery progress lives in a separate small ``<id>.state`` file (atomically replaced after
each attempt), so the message file is never rewritten: the accept path costs one file write
and fsync plus a directory fsync, which concurrent sessions share (group commit).

The queue knows nothing of SMTP; it stores bytes and an envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .fsutil import atomic_write, fsync_dir

log = logging.getLogger("mailrelay.queue")

MAGIC = b"MAILRELAY1 "
MSG_SUFFIX = ".msg"
STATE_SUFFIX = ".state"

PENDING = "pending"
SENT = "sent"
FAILED = "failed"


class QueueFullError(Exception):
    """The queue refuses new messages (size cap or disk floor): tell the client 452."""


# Recipient kinds (also an alias target's): the one place they are defined.
EMAIL = "email"  # an address, remote (SMTP) or of a local user
MAILBOX = "mailbox"  # a local user's Maildir
PIPE = "pipe"  # a command, from an alias "| command"


@dataclass
class Recipient:
    address: str
    kind: str = EMAIL
    command: str | None = None  # for PIPE
    status: str = PENDING
    attempts: int = 0
    last_error: str = ""
    # Who gave last_error: the MX host, or the relay's name with last_via "relay".
    last_host: str = ""
    last_via: str = ""
    # Extra per-recipient data (e.g. ORCPT, NOTIFY) carried to DSNs.
    params: dict[str, str] = field(default_factory=dict)
    # The address the sender gave (RCPT TO) when an alias or the catch-all led here
    # instead; "" when it is ``address`` itself. For the mail log and `queue show`.
    original: str = ""


@dataclass
class QueueItem:
    id: str
    sender: str
    recipients: list[Recipient]
    created: float
    size: int
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0  # every attempt, flushed ones too
    # Attempts made on the retry schedule: the backoff step. `queue flush` adds attempts
    # without moving the schedule on.
    retries: int = 0
    next_attempt: float = 0.0
    last_attempt: float = 0.0
    body_offset: int = 0
    delay_warned: bool = False  # the sender was told once that the message is delayed
    has_state: bool = False  # a <id>.state file may exist (saved, or found at load)

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == PENDING]

    def read_data(self) -> bytes:
        """The message bytes (read from disk each time: the queue does not keep bodies in RAM)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.body_offset)
            return handle.read()

    def state_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "retries": self.retries,
            "next_attempt": self.next_attempt,
            "last_attempt": self.last_attempt,
            "delay_warned": self.delay_warned,
            "recipients": [asdict(r) for r in self.recipients],
        }


def new_id() -> str:
    """Sortable by arrival (millisecond clock), unique (random suffix)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


class GroupCommit:
    """Makes queue files durable in batches, one batch at a time in a thread.

    Each file is written to a temporary name, fsynced and renamed into place; then one
    fsync of the directory covers every file of the batch. Files handed in while a batch
    is being written form the next batch: with many sessions at once the disk sees a
    handful of directory fsyncs rather than one per message (bench/queue_bench.py).
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._pending: list[tuple[Path, list[bytes], asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def write(self, path: Path, chunks: list[bytes]) -> None:
        """Return once ``path`` holds ``chunks`` durably (or raise why it does not)."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((path, chunks, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        await done

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                errors = await asyncio.to_thread(
                    _write_batch, self.directory, [(path, chunks) for path, chunks, _ in batch])
            except Exception as exc:  # the whole batch failed: every writer hears why
                errors = [exc] * len(batch)
            except BaseException as exc:  # cancelled or exiting: tell them, then go on up
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                raise
            for (_, _, done), error in zip(batch, errors, strict=True):
                if done.done():  # the session went away meanwhile
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)


def _write_batch(
    directory: Path, files: list[tuple[Path, list[bytes]]]
) -> list[BaseException | None]:
    """Write every file (a failure is that file's alone), then one directory fsync."""
    errors: list[BaseException | None] = []
    for path, chunks in files:
        try:
            atomic_write(path, chunks, 0o600, sync_dir=False, new_file=True)
            errors.append(None)
        except OSError as exc:
            errors.append(exc)
    if any(error is None for error in errors):
        try:
            fsync_dir(directory)
        except OSError as exc:
            # Not durable, so not accepted: take them back rather than deliver messages
            # whose clients were told it failed.
            for path, _ in files:
                _unlink(path)
            errors = [exc] * len(files)
    return errors


class Queue:
    """The spool directory and the items in it, which only the queue adds and removes.

    ``put`` stores a message durably (the caller may answer 250 when it returns),
    ``save_state`` records delivery progress, ``remove`` drops a finished item, ``load``
    rebuilds everything from disk at start. Scheduling is the DeliveryManager's.
    """

    def __init__(self, directory: Path, max_items: int = 0, min_free_bytes: int = 0):
        self.directory = Path(directory)
        self.max_items = max_items
        self.min_free_bytes = min_free_bytes
        self._items: dict[str, QueueItem] = {}
        self._commit = GroupCommit(self.directory)

    @property
    def items(self) -> Mapping[str, QueueItem]:
        """The queued items by id (read-only: ``put`` and ``remove`` change it)."""
        return MappingProxyType(self._items)

    def get(self, item_id: str) -> QueueItem | None:
        return self._items.get(item_id)

    # -- start-up -------------------------------------------------------------

    def load(self) -> list[QueueItem]:
        """Load every committed item; remove leftovers of interrupted writes."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._items.clear()
        names = os.listdir(self.directory)
        for name in names:
            if name.startswith("."):  # a temporary file: its 250 was never sent
                _unlink(self.directory / name)
        for name in sorted(n for n in names if n.endswith(MSG_SUFFIX)):
            item = _read_or_move_aside(self.directory / name)
            if item is not None:
                self._items[item.id] = item
        for name in names:
            if name.endswith(STATE_SUFFIX) and name[: -len(STATE_SUFFIX)] not in self._items:
                _unlink(self.directory / name)  # delivery finished; the .msg went first
        return sorted(self._items.values(), key=lambda i: i.id)

    # -- accepting ------------------------------------------------------------

    def check_space(self) -> None:
        """Raise QueueFullError when a new message must not be accepted."""
        if self.max_items and len(self._items) >= self.max_items:
            raise QueueFullError("queue is full")
        if self.min_free_bytes:
            stats = os.statvfs(self.directory)
            if stats.f_bavail * stats.f_frsize < self.min_free_bytes:
                raise QueueFullError("not enough disk space")

    async def put(
        self,
        sender: str,
        recipients: Iterable[str | Recipient],
        data: bytes | list[bytes],
        meta: dict[str, Any] | None = None,
        item_id: str | None = None,
        reserve: bool = False,
    ) -> QueueItem:
        """Store a message durably; when this returns, the message survives a crash.

        ``data`` may be a list of chunks (e.g. added headers + the received body) so the
        body is written without being copied into one more buffer.

        ``reserve``: a message that must not be refused for want of room (a DSN: what
        it reports is dropped once it is stored) may go over ``max_items`` and into the
        ``min_free_bytes`` reserve; only a disk that is really full stops it (OSError).
        DSNs are few and small (one per message that failed), so they cannot flood it.
        """
        if not reserve:
            self.check_space()
        chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        rcpts = [r if isinstance(r, Recipient) else Recipient(r) for r in recipients]
        item = QueueItem(
            id=item_id or new_id(), sender=sender, recipients=rcpts, created=time.time(),
            size=sum(len(c) for c in chunks), path=Path(), meta=dict(meta or {}),
        )
        item.path = self.directory / f"{item.id}{MSG_SUFFIX}"
        header = MAGIC + json.dumps(_envelope_dict(item), separators=(",", ":")).encode() + b"\n"
        item.body_offset = len(header)
        await self._commit.write(item.path, [header, *chunks])
        self._items[item.id] = item
        return item

    # -- progress -------------------------------------------------------------

    async def save_state(self, item: QueueItem) -> None:
        """Persist per-recipient status after an attempt."""
        data = json.dumps(item.state_dict(), separators=(",", ":")).encode()
        item.has_state = True
        await asyncio.to_thread(atomic_write, self.state_path(item), data, 0o600)

    async def remove(self, item: QueueItem) -> None:
        """Delete a finished item (message file first, so a crash leaves at most a stale state).

        Two unlinks are cheaper than a thread hand-off, so they run here. The directory is
        not fsynced: if a crash undoes the removal, a delivered message is delivered once
        more, which the next attempt must tolerate anyway (a crash between the remote
        250 and the unlink has the same effect); nothing accepted can be lost by it.
        """
        self._items.pop(item.id, None)
        _unlink(item.path)
        if item.has_state:
            _unlink(self.state_path(item))

    def state_path(self, item: QueueItem) -> Path:
        return self.directory / f"{item.id}{STATE_SUFFIX}"


def scan(directory: Path) -> tuple[list[QueueItem], list[str]]:
    """Read the spool without touching it (for ``mailrelay queue`` when no server runs).

    Unlike ``Queue.load`` nothing is deleted or moved aside: a temporary or unreadable
    file is the server's to deal with. Returns the items (oldest first) and one line per
    file that could not be read.
    """
    items: list[QueueItem] = []
    problems: list[str] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return items, problems  # nothing was ever queued
    for name in names:
        if name.startswith(".") or not name.endswith(MSG_SUFFIX):
            continue
        path = Path(directory) / name
        try:
            items.append(_read_item(path))
        except FileNotFoundError:
            continue  # delivered and removed while we were reading
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    return items, problems


def _envelope_dict(item: QueueItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "sender": item.sender,
        "recipients": [_recipient_envelope(r) for r in item.recipients],
        "created": item.created,
        "meta": item.meta,
    }


def _recipient_envelope(rcpt: Recipient) -> dict[str, Any]:
    entry: dict[str, Any] = {"address": rcpt.address, "params": rcpt.params}
    if rcpt.kind != EMAIL:
        entry["kind"] = rcpt.kind
    if rcpt.command is not None:
        entry["command"] = rcpt.command
    if rcpt.original:
        entry["original"] = rcpt.original
    return entry


def _read_or_move_aside(path: Path) -> QueueItem | None:
    """The item, or None when it is gone or unreadable (then moved aside: kept for a
    human instead of deleting mail we may have accepted)."""
    try:
        return _read_item(path)
    except FileNotFoundError:
        return None  # delivered and removed meanwhile
    except (OSError, ValueError) as exc:
        log.error("queue: cannot read %s (%s); moved aside", path, exc)
        _move_aside(path)
        return None


def _read_item(path: Path) -> QueueItem:
    with open(path, "rb") as handle:
        first = handle.readline(1024 * 1024)
        size = os.fstat(handle.fileno()).st_size - len(first)
    if not first.startswith(MAGIC) or not first.endswith(b"\n"):
        raise ValueError("not a mailrelay queue file")
    env = json.loads(first[len(MAGIC):])
    recipients = [
        Recipient(r["address"], kind=r.get("kind", EMAIL), command=r.get("command"),
                  params=r.get("params", {}), original=r.get("original", ""))
        for r in env["recipients"]
    ]
    item = QueueItem(
        id=env["id"], sender=env["sender"], recipients=recipients, created=env["created"],
        size=size, path=path, meta=env.get("meta", {}), body_offset=len(first),
    )
    state_path = path.with_suffix(STATE_SUFFIX)
    try:
        state = json.loads(state_path.read_bytes())
    except FileNotFoundError:
        return item
    except ValueError:
        log.error("queue: unreadable state %s; delivery restarts for every recipient", state_path)
        item.has_state = True
        return item
    item.has_state = True
    item.attempts = state.get("attempts", 0)
    item.retries = state.get("retries", item.attempts)
    item.next_attempt = state.get("next_attempt", 0.0)
    item.last_attempt = state.get("last_attempt", 0.0)
    item.delay_warned = state.get("delay_warned", False)
    # The state lists the recipients in envelope order (the same address may appear
    # twice, e.g. as a mailbox and as a pipe), so match by position.
    for rcpt, saved in zip(item.recipients, state.get("recipients", []), strict=False):
        if saved.get("address") == rcpt.address:
            rcpt.status = saved.get("status", PENDING)
            rcpt.attempts = saved.get("attempts", 0)
            rcpt.last_error = saved.get("last_error", "")
            rcpt.last_host = saved.get("last_host", "")
            rcpt.last_via = saved.get("last_via", "")
    return item


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _move_aside(path: Path) -> None:
    aside = path.parent / "corrupt"
    try:
        aside.mkdir(exist_ok=True, mode=0o700)
        os.replace(path, aside / path.name)
    except OSError:
        pass
