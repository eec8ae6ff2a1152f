"""The control socket: ``mailrelay queue`` talks to the running server through it.

``<data_dir>/control.sock`` is a unix socket (mode 0600, so only the server's user, and
root, may use it). Each request is one JSON object on one line, and gets one JSON object
on one line back:

    {"cmd": "list"}                                -> {"ok": true, "messages": [...]}
    {"cmd": "show", "id": ID}                      -> {"ok": true, "message": {...}}
    {"cmd": "flush"} / {"cmd": "flush", "id": ID} / {"cmd": "flush", "domain": D}
        (+ "wait": seconds)                        -> {"ok": true, "flushed": N,
                                                       "messages": [{..., "ended": bool,
                                                                     "queued": bool}]}
    {"cmd": "remove", "id": ID, "bounce": false}   -> {"ok": true, "id": ID,
                                                       "bounced": [...], "dsn": ID|null}
    {"cmd": "auth_blocks"}                         -> {"ok": true, "blocks": [{"client":
                                                       K, "remaining": S, "failures": N}]}
    {"cmd": "auth_unblock", "ip": IP}              -> {"ok": true, "unblocked": K|null}
    {"cmd": "users", "domain": D}                  -> {"ok": true, "digest": HEX|null,
                                                       "error": TEXT|null}
    {"cmd": "aliases", "domain": D}                -> the same, for the aliases file

``flush`` waits up to ``wait`` seconds (default 0, at most MAX_FLUSH_WAIT) for the
attempts it started, and reports each message as it is then (``ended``: its attempt
finished; ``queued``: recipients are left). ``users`` makes the server load that
domain's users file now and says which version it uses (SHA-256 of the file's bytes);
``aliases`` does the same for the aliases files.

Anything wrong gets ``{"ok": false, "error": "one line"}`` and the connection stays open.
Requests are bounded: at most ``MAX_REQUEST`` bytes, JSON nested at most ``MAX_DEPTH``
deep (checked in one pass before parsing, so ``[[[[…`` is an error reply, not a
RecursionError), and a connection idle for ``IDLE_TIMEOUT`` is closed.
The client side (``request``) is plain blocking sockets: the CLI has no event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..address import AddressError, normalize_domain
from ..delivery.dsn import returned_headers
from ..errors import ConfigError, MailrelayError

if TYPE_CHECKING:
    from ..delivery.manager import DeliveryManager
    from ..queue import Queue, QueueItem
    from ..smtp.throttle import AuthThrottle

log = logging.getLogger("mailrelay.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024  # a request is a command and an id; anything longer is junk
MAX_DEPTH = 4  # requests are flat objects
IDLE_TIMEOUT = 60.0  # a client that sends nothing for this long is disconnected
MAX_CLIENTS = 16  # connections at once; more are told so and closed
MAX_HEADER_BYTES = 256 * 1024  # `show` reads this much of a message for its headers
MAX_FLUSH_WAIT = 600.0


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


# -- what list and show report (shared with the CLI's spool reading) -----------------

def describe(item: QueueItem, in_flight: bool | None = None) -> dict[str, Any]:
    """A queue item as plain JSON data. ``in_flight`` is None when no server was asked."""
    return {
        "id": item.id,
        "sender": item.sender,
        "created": item.created,
        "size": item.size,
        "attempts": item.attempts,
        "last_attempt": item.last_attempt,
        "next_attempt": item.next_attempt,
        "in_flight": in_flight,
        "meta": item.meta,
        "recipients": [asdict(r) for r in item.recipients],
    }


def read_headers(item: QueueItem, limit: int = MAX_HEADER_BYTES) -> str:
    """The message's header section (at most ``limit`` bytes), as text for display."""
    with open(item.path, "rb") as handle:
        handle.seek(item.body_offset)
        head = handle.read(limit)
    # Headers are ASCII or (SMTPUTF8) UTF-8; anything else still shows, replaced.
    return returned_headers(head).decode("utf-8", "replace")


# -- the server side ---------------------------------------------------------------------

class ControlServer:
    """The unix socket ``mailrelay queue`` and ``mailrelay auth`` talk to: one JSON
    request per line, bounded in size, nesting and time; answers from the running
    queue, delivery and login throttle."""

    def __init__(self, path: Path, queue: Queue, delivery: DeliveryManager,
                 users: Callable[[str], dict[str, str | None]] | None = None,
                 aliases: Callable[[str], dict[str, str | None]] | None = None):
        self.path = Path(path)
        self.queue = queue
        self.delivery = delivery
        self.reload_users = users  # Server.reload_users
        self.reload_aliases = aliases  # Server.reload_aliases
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # The login throttle, for `mailrelay auth` (set once the listeners exist).
        self.throttle: AuthThrottle | None = None

    async def start(self) -> None:
        _clear_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            # Before listen(): nobody can connect while the mode is still the umask's.
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(self._handle, sock=sock,
                                                           limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("control socket %s", self.path)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None
        self._unlink()

    def _unlink(self) -> None:
        # Only our own socket: a newer server may have replaced it already.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CLIENTS:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_send(writer, _error("too many control connections")),
                                       5)
            writer.close()
            return
        self._writers.add(writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    # Too long to be a request; the rest of the line cannot be resynced.
                    await _send(writer, _error("request too long"))
                    return
                except TimeoutError:
                    await asyncio.wait_for(
                        _send(writer, _error(f"idle for {IDLE_TIMEOUT:g}s, closing")), 5)
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                await asyncio.wait_for(_send(writer, await self.dispatch(line)), IDLE_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or does not read; nothing to tell it
        finally:
            self._writers.discard(writer)
            writer.close()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """One request line to its response; never raises for bad input."""
        if len(line) > MAX_REQUEST:
            return _error("request too long")
        if json_depth(line) > MAX_DEPTH:
            return _error(f"bad request: JSON nested more than {MAX_DEPTH} deep")
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return _error("bad request: not JSON")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error('bad request: expected an object with "cmd"')
        command = request["cmd"]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            return _error(f"unknown command {command[:40]!r} (list, show, flush, remove, "
                          "users, auth_blocks, auth_unblock)")
        try:
            return {"ok": True, **await handler(request)}
        except _RequestError as exc:
            return _error(str(exc))
        except Exception as exc:  # a bug or a disk error: report it, keep serving
            log.exception("control: %s failed", command)
            return _error(f"{command} failed: {exc}")

    def _item(self, request: dict[str, Any]) -> QueueItem:
        item_id = request.get("id")
        if not isinstance(item_id, str) or not item_id:
            raise _RequestError('"id" is required')
        item = self.queue.get(item_id)
        if item is None:
            raise _RequestError(f"no message {item_id} in the queue")
        return item

    async def _cmd_list(self, request: dict[str, Any]) -> dict[str, Any]:
        items = sorted(self.queue.items.values(), key=lambda i: i.id)
        return {"messages": [describe(i, self.delivery.attempting(i.id)) for i in items]}

    async def _cmd_show(self, request: dict[str, Any]) -> dict[str, Any]:
        item = self._item(request)
        message = describe(item, self.delivery.attempting(item.id))
        try:
            message["headers"] = await asyncio.to_thread(read_headers, item)
        except FileNotFoundError:  # delivered while we were looking
            raise _RequestError(f"no message {item.id} in the queue") from None
        return {"message": message}

    async def _cmd_flush(self, request: dict[str, Any]) -> dict[str, Any]:
        ids = None
        if request.get("id") is not None:
            ids = [self._item(request).id]
        domain = request.get("domain")
        if domain is not None:
            if not isinstance(domain, str):
                raise _RequestError('"domain" must be a string')
            try:
                domain = normalize_domain(domain)
            except AddressError as exc:
                raise _RequestError(str(exc)) from None
        wait = request.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
            raise _RequestError('"wait" must be a number of seconds')
        results = await self.delivery.flush_and_wait(ids, domain, min(wait, MAX_FLUSH_WAIT))
        messages = []
        for item, ended in results:
            message = describe(item, self.delivery.attempting(item.id))
            message["ended"] = ended
            message["queued"] = self.queue.get(item.id) is not None
            messages.append(message)
        return {"flushed": len(results), "messages": messages}

    async def _cmd_users(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.reload_users is None:
            raise _RequestError("users: not served here")
        return self.reload_users(self._domain(request))

    async def _cmd_aliases(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.reload_aliases is None:
            raise _RequestError("aliases: not served here")
        return self.reload_aliases(self._domain(request))

    @staticmethod
    def _domain(request: dict[str, Any]) -> str:
        domain = request.get("domain")
        if not isinstance(domain, str):
            raise _RequestError('"domain" is required')
        try:
            return normalize_domain(domain)
        except AddressError as exc:
            raise _RequestError(str(exc)) from None

    async def _cmd_remove(self, request: dict[str, Any]) -> dict[str, Any]:
        item = self._item(request)
        bounce = request.get("bounce", False)
        if not isinstance(bounce, bool):
            raise _RequestError('"bounce" must be true or false')
        try:
            bounced, dsn_id = await self.delivery.remove(item.id, bounce)
        except KeyError:  # its attempt in flight delivered it
            raise _RequestError(f"no message {item.id} in the queue "
                                "(delivered while waiting for its attempt)") from None
        return {"id": item.id, "sender": item.sender, "bounced": bounced, "dsn": dsn_id}


    async def _cmd_auth_blocks(self, request: dict[str, Any]) -> dict[str, Any]:
        throttle = self._throttle()
        return {"blocks": [{"client": block.key, "remaining": round(block.remaining, 1),
                            "failures": block.failures} for block in throttle.blocks()]}

    async def _cmd_auth_unblock(self, request: dict[str, Any]) -> dict[str, Any]:
        throttle = self._throttle()
        ip = request.get("ip")
        if not isinstance(ip, str) or not ip:
            raise _RequestError('"ip" is required (an address, or an IPv6 /64)')
        try:
            ipaddress.ip_network(ip.strip(), strict=False)
        except ValueError:
            raise _RequestError(f"{ip[:60]!r} is not an IP address") from None
        key = throttle.unblock(ip.strip())
        if key is not None:
            log.info("control: login block of %s lifted", key)
        return {"unblocked": key}

    def _throttle(self) -> AuthThrottle:
        if self.throttle is None:
            raise _RequestError("the listeners are not running yet")
        return self.throttle


def json_depth(data: bytes) -> int:
    """How deep ``[`` and ``{`` nest in ``data`` (outside strings), in one pass: what
    json.loads would recurse into. Malformed input gets some number; json.loads then
    says what is wrong with it."""
    opening = data.count(b"[") + data.count(b"{")
    if opening <= MAX_DEPTH:
        return opening  # at most that deep, counted in C
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


class _RequestError(Exception):
    """A request that cannot be carried out; its text is the error response."""


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _clear_stale_socket(path: Path) -> None:
    """Remove the socket a crashed server left behind; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise ConfigError(f"another mailrelay is running on this data_dir ({path} answers)")


# -- the client side ---------------------------------------------------------------------

class ServerNotRunning(MailrelayError):
    """No server answers on the control socket."""


def request(data_dir: Path, payload: dict[str, Any], timeout: float | None = 30.0
            ) -> dict[str, Any]:
    """Send one request to the running server; its ``ok`` response without ``ok``.

    ServerNotRunning when nothing listens; MailrelayError (one line) for an error response.
    """
    path = socket_path(data_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ServerNotRunning(f"the server is not running (no control socket at {path})"
                                   ) from None
        except PermissionError:
            raise MailrelayError(f"{path}: permission denied (run this as the user the "
                                 "server runs as, or root)") from None
        except OSError as exc:  # e.g. a path too long for a unix socket: no server there
            raise ServerNotRunning(f"cannot reach the server through {path}: "
                                   f"{exc.strerror or exc}") from None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline()
    except TimeoutError:
        raise MailrelayError(f"the server did not answer within {timeout:.0f}s") from None
    finally:
        sock.close()
    if not line:
        raise MailrelayError("the server closed the control connection without an answer")
    try:
        response = json.loads(line)
    except ValueError:
        raise MailrelayError("the server's answer is not JSON") from None
    if not isinstance(response, dict):
        raise MailrelayError("the server's answer is not a JSON object")
    if not response.pop("ok", False):
        raise MailrelayError(str(response.get("error") or "the server refused the request"))
    return response
