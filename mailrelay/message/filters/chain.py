"""The filters a configuration asks for, run on one message after DATA, before queueing.

Order: rspamd first (mail from outside; users' mail only with ``filters.rspamd.
submission``), then chasquid's post-data hook (every message, as chasquid runs it), which
sees the message with rspamd's changes. The first refusal ends it: its reply is the
answer to DATA, and nothing is queued. Fields the filters add go at the top of the
message, the hook's first (chasquid puts the hook's output above everything); rspamd's
Subject rewrite and field removals apply to the message the client sent.

Large messages are joined and rewritten in a thread: nothing here holds the event loop
for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .hooks import ALIAS_RESOLVE, POST_DATA, AliasTarget, Hooks
from .rspamd import RspamdClient
from .verdict import FilterInput, Verdict, apply_verdict

if TYPE_CHECKING:
    from ...config import Config
    from ...ops.events import Events

RSPAMD = "rspamd"
# Messages in the filters at once: each holds a hook process with its three pipes, or an
# rspamd connection. More wait their turn (at most SLOT_WAIT, then 451): a crowd of
# port-25 clients must not start a process each, nor take the descriptors of the rest.
MAX_CHECKING = 32
SLOT_WAIT = 60.0
BUSY_REPLY = "451 4.3.0 Too many messages being checked, try again later"
# Joining or rewriting more bytes than this happens in a thread.
OFF_LOOP_BYTES = 256 * 1024


@dataclass
class Outcome:
    """What the filters made of a message: a refusal, or the message to queue."""

    reply: str | None  # the whole SMTP reply when refused (5xx or 4xx); None: accepted
    top: bytes = b""  # header fields to put above everything, our trace included
    message: bytes = b""  # the client's message, as the filters changed it


async def _maybe_in_thread(size: int, function: Callable[..., Any], *args: Any) -> Any:
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(function, *args)
    return function(*args)


class Filters:
    """One configuration's filters (rebuilt at start and at every reload): chasquid's
    hooks (post-data, alias-resolve) and rspamd."""

    def __init__(self, hooks: Hooks, rspamd: RspamdClient | None = None,
                 events: Events | None = None, slots: asyncio.Semaphore | None = None):
        self.hooks = hooks
        self.rspamd = rspamd
        self.events = events
        # Shared by the Filters of one server across reloads (from_config's caller
        # passes the previous one's), so a reload does not open the gate wider.
        self.slots = slots if slots is not None else asyncio.Semaphore(MAX_CHECKING)

    @classmethod
    def from_config(cls, config: Config, events: Events | None = None,
                    slots: asyncio.Semaphore | None = None) -> Filters:
        return cls(Hooks.from_config(config), RspamdClient.from_settings(config.filters.rspamd),
                   events, slots)

    def _count(self, name: str, verdict: Verdict) -> None:
        if self.events is not None:
            self.events.filter_checked(name, verdict.action, verdict.error)

    async def check(self, inp: FilterInput, trace: bytes, message: bytes) -> Outcome:
        """Run the filters on ``message`` (what the client sent, with our additions to
        it), which travels below ``trace`` (our Received: and Authentication-Results)."""
        rspamd = self.rspamd is not None and self.rspamd.applies_to(inp)
        if not rspamd and self.hooks.post_data is None:
            return Outcome(None, b"", message)
        try:
            async with asyncio.timeout(SLOT_WAIT):
                await self.slots.acquire()
        except TimeoutError:
            return Outcome(BUSY_REPLY)
        try:
            return await self._check(inp, trace, message, rspamd)
        finally:
            self.slots.release()

    async def _check(self, inp: FilterInput, trace: bytes, message: bytes,
                     rspamd: bool) -> Outcome:
        top: list[bytes] = []
        if rspamd:
            assert self.rspamd is not None
            whole = await _maybe_in_thread(len(message), b"".join, [trace, message])
            verdict = await self.rspamd.check(inp, whole)
            del whole
            self._count(RSPAMD, verdict)
            if not verdict.accepted:
                return Outcome(verdict.reply)
            if verdict.subject is not None or verdict.remove_headers:
                changes = Verdict("accept", subject=verdict.subject,
                                  remove_headers=verdict.remove_headers)
                message = await _maybe_in_thread(len(message), apply_verdict, message, changes)
            top = verdict.headers
        if self.hooks.post_data is not None:
            whole = await _maybe_in_thread(len(message), b"".join, [*top, trace, message])
            verdict = await self.hooks.check(inp, whole)
            del whole
            self._count(POST_DATA, verdict)
            if not verdict.accepted:
                return Outcome(verdict.reply)
            top = [*verdict.headers, *top]
        return Outcome(None, b"".join(top), message)

    async def resolve(self, address: str) -> list[AliasTarget] | None:
        """The alias-resolve hook's targets for ``address`` ([] without a hook or when it
        knows none; None when it failed: the caller answers 451)."""
        if self.hooks.alias_resolve is None:
            return []
        targets = await self.hooks.resolve(address)
        if self.events is not None:
            action = "tempfail" if targets is None else "accept" if targets else "reject"
            self.events.filter_checked(ALIAS_RESOLVE, action,
                                       "failed" if targets is None else None)
        return targets
