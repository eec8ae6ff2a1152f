"""Delivery scheduling: attempts, retries with backoff, give-up and bounces."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import shlex
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..address import domain_of
from ..ops.events import Events
from ..queue import (
    FAILED,
    MAILBOX,
    PENDING,
    PIPE,
    SENT,
    Queue,
    QueueFullError,
    QueueItem,
    Recipient,
)
from .dsn import FailedRecipient, build_dsn, is_auto_generated
from .local import Maildirs
from .pipe import SpooledMessage, run_pipe
from .results import COMMAND, LOCAL, MX, RELAY, Outcome, RecipientResult

if TYPE_CHECKING:
    from .remote import RemoteDelivery

log = logging.getLogger("mailrelay.delivery")

# A DSN goes through the intake (signed, routed, queued) like any message we create; None
# when no recipient was left.
EnqueueFn = Callable[[str, list[str], bytes], Awaitable[QueueItem | None]]


@dataclass(frozen=True)
class Schedule:
    retry_intervals: tuple[float, ...]
    give_up_after: float
    jitter: float = 0.1
    # Tell the sender once that the message is still queued after this long (0: never).
    delay_warning_after: float = 0.0

    def next_delay(self, attempts: int) -> float:
        base = self.retry_intervals[min(max(attempts, 1), len(self.retry_intervals)) - 1]
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def _enhanced_status(reply: str, default: str) -> str:
    parts = reply.split()
    if len(parts) > 1 and parts[1].count(".") == 2 and parts[1][0] in "245":
        return parts[1]
    if parts and parts[0].isdigit() and len(parts[0]) == 3:
        return f"{parts[0][0]}.0.0"
    return default


class DeliveryManager:
    """Decides when each queued message is tried, tries it, and records what happened.

    A heap of due times feeds at most ``concurrency`` attempts at once. One attempt
    sends every pending recipient of a message its way (SMTP per domain, local
    mailboxes, pipes) and records each result: sent, retried on the schedule, or failed
    for good with a DSN to the sender. A DSN is stored in the queue before the failure
    it reports is recorded, so a crash or a refusing queue can repeat a DSN but never
    lose one. ``flush`` and ``remove`` serve ``mailrelay queue``.
    """

    def __init__(
        self,
        queue: Queue,
        remote: Callable[[], RemoteDelivery],
        maildirs: Maildirs,
        is_local_domain: Callable[[str], bool],
        local_mailbox: Callable[[str], str | None],
        enqueue: EnqueueFn,
        schedule: Schedule,
        reporting_mta: str,
        concurrency: int = 20,
        default_domain: str | None = None,
        pipe_timeout: float = 60.0,
        local_mda: str | None = None,
        events: Events | None = None,
    ):
        self.queue = queue
        self.events = events if events is not None else Events()
        # The SMTP client (aiosmtplib, dnspython, MTA-STS) is made for the first remote
        # delivery: a server that has delivered only locally, or nothing yet, does not
        # carry it.
        self._make_remote = remote
        self._remote: RemoteDelivery | None = None
        self.maildirs = maildirs
        self.is_local_domain = is_local_domain
        self.local_mailbox = local_mailbox
        self.enqueue = enqueue
        self.schedule_policy = schedule
        self.reporting_mta = reporting_mta
        self.default_domain = default_domain or reporting_mta
        self.pipe_timeout = pipe_timeout
        self.local_mda = local_mda
        self.concurrency = concurrency
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._seq = itertools.count()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._removing: set[str] = set()  # being taken out by `mailrelay queue remove`
        self._flushed: set[str] = set()  # next attempt comes from `queue flush`
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}  # flushes awaiting an end
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def attempts_in_flight(self) -> int:
        """Delivery attempts running now (each may hold its message in memory)."""
        return len(self._active)

    # -- scheduling -----------------------------------------------------------

    def schedule(self, item: QueueItem, when: float | None = None) -> None:
        when = item.next_attempt if when is None else when
        self._due[item.id] = when
        heapq.heappush(self._heap, (when, next(self._seq), item.id))
        self._wakeup.set()

    def flush(self, ids: list[str] | None = None, domain: str | None = None
              ) -> list[QueueItem]:
        """Retry now: all items, the given ones, or those with a pending recipient at
        ``domain``; returns them. An item whose attempt is in flight counts too: it is
        being retried right now. A flushed attempt that fails leaves the retry schedule
        as it was (see ``_record``)."""
        wanted = ids if ids is not None else list(self.queue.items)
        items = [item for i in wanted
                 if (item := self.queue.get(i)) is not None and i not in self._removing]
        if domain is not None:
            items = [item for item in items if _has_pending_at(item, domain)]
        for item in items:
            if item.id not in self._active:
                self._flushed.add(item.id)
                self.schedule(item, 0.0)
        return items

    async def flush_and_wait(self, ids: list[str] | None = None, domain: str | None = None,
                             timeout: float = 30.0) -> list[tuple[QueueItem, bool]]:
        """``flush``, then wait (at most ``timeout`` seconds) for each of those attempts
        to end: (item, whether its attempt ended) per item; the item shows the results."""
        items = self.flush(ids, domain)
        loop = asyncio.get_running_loop()
        waiting = {}
        for item in items:
            waiting[item.id] = future = loop.create_future()
            self._waiters.setdefault(item.id, []).append(future)
        if waiting and timeout > 0:
            await asyncio.wait(list(waiting.values()), timeout=timeout)
        for item_id, future in waiting.items():
            if not future.done():
                future.cancel()
                self._waiters[item_id].remove(future)
                if not self._waiters[item_id]:
                    del self._waiters[item_id]
        return [(item, not waiting[item.id].cancelled()) for item in items]

    def attempting(self, item_id: str) -> bool:
        """Whether a delivery attempt of this item is in flight."""
        return item_id in self._active

    async def remove(self, item_id: str, bounce: bool = False) -> tuple[list[str], str | None]:
        """Take a message out of the queue (``mailrelay queue remove``).

        An attempt in flight is waited for first rather than refused or cut off: stopping
        it halfway could deliver a message we then report as failed. With ``bounce`` the
        sender gets a DSN (5.0.0) for the recipients still pending, through ``_bounce``, so
        a <> sender, NOTIFY and auto-generated mail are respected.
        Returns the pending recipients reported and the DSN's queue id (None: no DSN).
        Raises KeyError when the id is not queued (or was delivered meanwhile).
        """
        while (task := self._active.get(item_id)) is not None:
            await asyncio.wait([task])
        item = self.queue.get(item_id)
        if item is None or item_id in self._removing:
            raise KeyError(item_id)
        # Out of the scheduler's sight before any await: no attempt may start meanwhile.
        self._removing.add(item_id)
        try:
            return await self._remove(item, bounce)
        finally:
            self._removing.discard(item_id)

    async def _remove(self, item: QueueItem, bounce: bool) -> tuple[list[str], str | None]:
        pending = item.pending if bounce else []
        dsn_id = None
        if pending:
            failed = [FailedRecipient(
                address=rcpt.address, status="5.0.0",
                diagnostic="x-mailrelay; removed by the administrator"
                           + (f" (last attempt: {rcpt.last_error})" if rcpt.last_error else ""),
                original_recipient=rcpt.params.get("ORCPT"),
            ) for rcpt in pending]
            try:
                bounce = await self._bounce(item, failed)
            except BaseException:
                # Not bounced (e.g. the queue is full), so not removed either.
                self.schedule(item)
                raise
            dsn_id = bounce.id if bounce else None
        await self.queue.remove(item)
        self.events.removed(item, dsn_id)
        return [rcpt.address for rcpt in pending], dsn_id

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="delivery-scheduler")

    def remote(self) -> RemoteDelivery:
        if self._remote is None:
            self._remote = self._make_remote()
        return self._remote

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop starting attempts; wait (bounded) for attempts in flight, then close the
        idle outbound connections."""
        self._stopping = True
        self._wakeup.set()
        if self._runner:
            await self._runner
        if self._active:
            _, pending = await asyncio.wait(list(self._active.values()), timeout=timeout)
            if pending:
                # Cancelled, an attempt kills its command and leaves the message queued.
                log.warning("stopping: %d delivery attempt(s) still running after %gs cut "
                            "off; their messages stay queued", len(pending), timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._remote is not None:
            await self._remote.close()

    async def _run(self) -> None:
        while not self._stopping:
            now = time.time()
            while self._heap and self._heap[0][0] <= now and len(self._active) < self.concurrency:
                when, _, item_id = heapq.heappop(self._heap)
                if self._due.get(item_id) != when or item_id in self._active:
                    continue  # superseded by a newer schedule, or already running
                item = self.queue.get(item_id)
                del self._due[item_id]
                flushed = item_id in self._flushed
                self._flushed.discard(item_id)
                if item is None or item_id in self._removing:
                    continue
                task = asyncio.create_task(self._attempt(item, flushed),
                                           name=f"deliver-{item_id}")
                self._active[item_id] = task
                task.add_done_callback(lambda t, i=item_id: self._finished(i, t))
            self._wakeup.clear()
            timeout = None
            if self._heap and len(self._active) < self.concurrency:
                timeout = max(0.0, self._heap[0][0] - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _finished(self, item_id: str, task: asyncio.Task[None]) -> None:
        self._active.pop(item_id, None)
        if not task.cancelled() and task.exception() is not None:
            # Recording the results failed (the deliveries themselves are guarded).
            log.error("delivery of %s failed unexpectedly", item_id, exc_info=task.exception())
            item = self.queue.get(item_id)
            if item is not None and not self._stopping:
                self.schedule(item, time.time() + self.schedule_policy.next_delay(item.retries))
        for waiter in self._waiters.pop(item_id, []):
            if not waiter.done():
                waiter.set_result(None)
        self._wakeup.set()

    # -- one attempt ----------------------------------------------------------

    async def _attempt(self, item: QueueItem, flushed: bool = False) -> None:
        pending = item.pending
        if not pending:
            await self.queue.remove(item)
            return
        try:
            pairs = await self._deliver(item, pending)
        except Exception as exc:
            pairs = [(rcpt, result) for rcpt in pending
                     for result in _unexpected(item, exc, [rcpt.address], _via_of(rcpt))]
        await self._record(item, pairs, flushed)

    async def _deliver(self, item: QueueItem, pending: list[Recipient]
                       ) -> list[tuple[Recipient, RecipientResult]]:
        """One attempt at every pending recipient: their results, in pairs."""
        local: list[Recipient] = []
        pipes: list[Recipient] = []
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for rcpt in pending:
            if rcpt.kind == PIPE:
                pipes.append(rcpt)
            elif rcpt.kind == MAILBOX or self.is_local_domain(domain_of(rcpt.address)):
                local.append(rcpt)
            else:
                by_domain[domain_of(rcpt.address)].append(rcpt)

        # Commands read the message straight from the queue file; only SMTP and Maildir
        # delivery need its bytes in memory.
        spooled = SpooledMessage(item.path, item.body_offset)
        data = b""
        if by_domain or (local and not self.local_mda):
            data = await asyncio.to_thread(item.read_data)
        # Each job adds a result per recipient to its list in ``so_far``, in order, so
        # results pair up by position; local and command jobs one recipient after
        # another, a remote one when its transaction ends. A stop that cuts the attempt
        # therefore still knows what was delivered.
        batches: list[list[Recipient]] = []
        so_far: list[list[RecipientResult]] = []
        jobs = []
        for domain, rcpts in by_domain.items():
            batches.append(rcpts)
            so_far.append([])
            jobs.append(self._deliver_remote(item, domain, [r.address for r in rcpts], data,
                                             so_far[-1]))
        if local:
            batches.append(local)
            so_far.append([])
            jobs.append(self._deliver_local(item, [r.address for r in local], data, spooled,
                                            so_far[-1]))
        if pipes:
            batches.append(pipes)
            so_far.append([])
            jobs.append(self._deliver_pipes(item, pipes, spooled, so_far[-1]))
        try:
            # One job (the usual case) is awaited as it is: gather would make it a task.
            if len(jobs) == 1:
                await jobs[0]
            else:
                await asyncio.gather(*jobs)
        except asyncio.CancelledError:  # the server stops
            delivered = [(rcpt, result) for rcpts, results in zip(batches, so_far, strict=True)
                         for rcpt, result in zip(rcpts, results, strict=False)  # cut short
                         if result.outcome is Outcome.SENT]
            if delivered:  # recorded, or the next start delivers to them again
                await asyncio.shield(self._record(item, delivered))
            raise
        return [pair for rcpts, results in zip(batches, so_far, strict=True)
                for pair in zip(rcpts, results, strict=True)]

    # Each job below answers, in ``results``, for every recipient it was given even when
    # something unexpected (a bug) raises: a result for each, so the attempt counts and
    # the message ends (gives up, bounces) instead of being retried forever; and one
    # recipient's trouble does not undo what the others' deliveries did.

    async def _deliver_remote(self, item: QueueItem, domain: str, addresses: list[str],
                              data: bytes, results: list[RecipientResult]) -> None:
        try:
            results += await self.remote().deliver(domain, item.sender, addresses, data)
        except Exception as exc:
            results += _unexpected(item, exc, addresses, MX)

    async def _deliver_pipes(
        self, item: QueueItem, rcpts: list[Recipient], message: SpooledMessage,
        results: list[RecipientResult],
    ) -> None:
        for rcpt in rcpts:
            try:
                delivered, reply = await run_pipe(rcpt.command or "", message,
                                                  sender=item.sender, recipient=rcpt.address,
                                                  timeout=self.pipe_timeout)
            except Exception as exc:
                results += _unexpected(item, exc, [rcpt.address], COMMAND)
                continue
            outcome = _command_outcome(delivered)
            results.append(RecipientResult(rcpt.address, outcome, reply, via=COMMAND))

    async def _deliver_local(
        self, item: QueueItem, addresses: list[str], data: bytes, message: SpooledMessage,
        results: list[RecipientResult],
    ) -> None:
        """To each local mailbox: through the local MDA (reading ``message``) when one is
        configured, else into its Maildir (``data``); each result added to ``results``."""
        for address in addresses:
            try:
                results.append(await self._deliver_mailbox(item.sender, address, data,
                                                           message))
            except Exception as exc:
                results += _unexpected(item, exc, [address], LOCAL)

    async def _deliver_mailbox(self, sender: str, address: str, data: bytes,
                               message: SpooledMessage) -> RecipientResult:
        mailbox = self.local_mailbox(address)
        if mailbox is None:  # removed since the message was accepted
            return RecipientResult(address, Outcome.PERMANENT, "550 5.1.1 no such user here",
                                   via=LOCAL)
        if self.local_mda:
            delivered, reply = await run_pipe(
                mda_command(self.local_mda, mailbox), message, sender=sender,
                recipient=mailbox, timeout=self.pipe_timeout)
            return RecipientResult(address, _command_outcome(delivered), reply, via=LOCAL)
        try:
            await asyncio.to_thread(self.maildirs.deliver, mailbox, sender, data, address)
        except OSError as exc:
            return RecipientResult(address, Outcome.TEMPORARY,
                                   f"451 4.3.0 mailbox write failed: {exc.strerror}",
                                   via=LOCAL)
        return RecipientResult(address, Outcome.SENT, "250 2.0.0 delivered", via=LOCAL)

    async def _record(
        self, item: QueueItem, results: list[tuple[Recipient, RecipientResult]],
        flushed: bool = False,
    ) -> None:
        now = time.time()
        item.attempts += 1
        item.last_attempt = now
        give_up = now - item.created >= self.schedule_policy.give_up_after
        failed: list[FailedRecipient] = []
        failing: set[int] = set()  # id() of the recipients in ``failed``
        for rcpt, result in results:
            rcpt.attempts += 1
            rcpt.last_error = "" if result.outcome is Outcome.SENT else result.reply
            rcpt.last_host = result.remote_host or ""
            rcpt.last_via = result.via
            if result.outcome is Outcome.SENT:
                rcpt.status = SENT
            elif result.outcome is Outcome.PERMANENT or give_up:
                failed.append(self._failure(rcpt, result))
                failing.add(id(rcpt))
        # The DSN first: only once it is stored may the failures it reports be recorded
        # (and the message dropped). If it cannot be stored, they stay pending and are
        # tried again on the schedule, and so is the DSN.
        told = not failed or await self._bounce_stored(item, failed)
        for rcpt, result in results:
            if told and id(rcpt) in failing:
                rcpt.status = FAILED
            self.events.delivery_attempt(item, rcpt, result, final=rcpt.status != PENDING)
        if not any(r.status == PENDING for r in item.recipients):
            await self.queue.remove(item)
            log.debug("queue %s: done", item.id)  # the mail log has each recipient's result
            return
        # An attempt from `queue flush` before its time comes on top of the schedule:
        # the next retry stays where it was, and so does the backoff.
        if not (flushed and item.next_attempt > now):
            item.retries += 1
            item.next_attempt = now + self.schedule_policy.next_delay(item.retries)
        # Recipients that failed for good but whose DSN is not stored yet are not delayed.
        delayed = [rcpt for rcpt in item.pending if id(rcpt) not in failing]
        if delayed and self._delay_warning_due(item, now):
            # Flagged only once the warning is stored: a crash in between may send it
            # twice, a refusing queue cannot make it lost.
            item.delay_warned = await self._warn_delayed(
                item, delayed, {rcpt.address: result for rcpt, result in results})
        try:
            await self.queue.save_state(item)
        except OSError as exc:
            # Progress is kept in memory; after a crash the message is tried again.
            log.error("queue %s: cannot save its delivery state: %s", item.id,
                      exc.strerror or exc)
        if not self._stopping:
            self.schedule(item)

    def _failure(self, rcpt: Recipient, result: RecipientResult) -> FailedRecipient:
        """What a DSN says of a recipient that failed for good (or was given up)."""
        reply = result.reply
        status = _enhanced_status(reply, "5.0.0")
        if result.outcome is Outcome.TEMPORARY:
            status = "4.4.7"
            reply = f"{reply} (gave up after {self.schedule_policy.give_up_after:.0f}s)"
        return FailedRecipient(
            address=rcpt.address, status=status, diagnostic=f"smtp; {reply}",
            remote_mta=result.remote_host, original_recipient=rcpt.params.get("ORCPT"),
            relay=result.via == RELAY,
        )

    async def _bounce_stored(self, item: QueueItem, failed: list[FailedRecipient],
                             notify: str = "FAILURE") -> bool:
        """``_bounce``; False (and one log line) when the queue could not store the DSN."""
        try:
            await self._bounce(item, failed, notify)
        except (QueueFullError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            what = "delay warning" if notify == "DELAY" else "DSN"
            log.error("queue %s: the %s for %s could not be stored (%s); kept queued, "
                      "tried again at the next attempt", item.id, what,
                      ", ".join(f"<{f.address}>" for f in failed), reason)
            return False
        return True

    def _delay_warning_due(self, item: QueueItem, now: float) -> bool:
        after = self.schedule_policy.delay_warning_after
        return (bool(after) and not item.delay_warned and now - item.created >= after
                and not item.meta.get("generated"))

    async def _warn_delayed(self, item: QueueItem, pending: list[Recipient],
                            results: dict[str, RecipientResult]) -> bool:
        """RFC 3464 "delayed" report for the recipients still pending (once per message);
        whether it was stored (or was not wanted)."""
        delayed = []
        for rcpt in pending:
            result = results.get(rcpt.address)
            reply = result.reply if result else rcpt.last_error
            delayed.append(FailedRecipient(
                address=rcpt.address, status=_enhanced_status(reply, "4.0.0"),
                diagnostic=f"smtp; {reply}", action="delayed",
                remote_mta=result.remote_host if result else None,
                original_recipient=rcpt.params.get("ORCPT"),
                relay=bool(result and result.via == RELAY),
            ))
        return await self._bounce_stored(item, delayed, notify="DELAY")

    def _bounce_domain(self, sender: str) -> str:
        """MAILER-DAEMON@ one of our domains, so the DSN carries an aligned DKIM signature:
        the sender's own domain when it is ours (our users' bounces), else our first."""
        domain = domain_of(sender)
        return domain if self.is_local_domain(domain) else self.default_domain

    async def _bounce(
        self, item: QueueItem, failed: list[FailedRecipient], notify: str = "FAILURE"
    ) -> QueueItem | None:
        """Tell the sender, unless that could loop (null sender, auto-generated mail);
        returns the queued DSN, if any. Raises (QueueFullError, OSError) when the DSN
        could not be stored."""
        wanted = [f for f in failed if _notify_wanted(item, f.address, notify)]
        if not item.sender or not wanted:
            log.info("queue %s: %d recipient(s) failed, no DSN (sender <%s>)", item.id,
                     len(failed), item.sender)
            return None
        data = await asyncio.to_thread(item.read_data)
        if is_auto_generated(data):
            log.info("queue %s: failed auto-generated message, no DSN", item.id)
            return None
        full = item.meta.get("ret") == "FULL" and notify == "FAILURE"
        withheld = full and not content_returnable(item)
        dsn = build_dsn(
            reporting_mta=self.reporting_mta, original_sender=item.sender,
            original_message=data, recipients=wanted, arrival_date=item.created,
            envid=item.meta.get("envid"),
            # A delay warning returns headers only: the message is still on its way.
            return_full=full and not withheld,
            from_domain=self._bounce_domain(item.sender),
            note=WITHHELD_NOTE if withheld else None,
        )
        bounce = await self.enqueue("", [item.sender], dsn)
        if bounce is None:
            log.warning("queue %s: no DSN, nowhere to send it (<%s>)", item.id, item.sender)
            return None
        self.events.dsn_generated(bounce.id, item.id, item.sender,
                                  [f.address for f in wanted], kind=wanted[0].action)
        return bounce


WITHHELD_NOTE = ("Only the headers of your message are attached: its sender address could "
                 "not be verified (no SPF or DMARC pass), and a forged one must not get "
                 "the content of mail it never sent.")


def content_returnable(item: QueueItem) -> bool:
    """Whether a DSN may return the message itself (RET=FULL), not only its headers.

    Backscatter: mail from outside can carry a forged sender, and a DSN with its content
    would deliver that content (spam, say) to the forged address, from our IP and with our
    signature. So content goes back only to our own users (who submitted it) and to
    senders the inbound checks verified (``sender_verified``, set by the intake).
    """
    return bool(item.meta.get("user") or item.meta.get("sender_verified"))


def _via_of(rcpt: Recipient) -> str:
    """How ``rcpt`` would be reached, for a result that no delivery produced."""
    return COMMAND if rcpt.kind == PIPE else LOCAL if rcpt.kind == MAILBOX else MX


def _unexpected(item: QueueItem, exc: Exception, addresses: list[str],
                via: str) -> list[RecipientResult]:
    """Temporary results for a delivery that raised (a bug): logged, and counted as an
    attempt like any other, so the message gives up and bounces in the end."""
    log.error("queue %s: delivery to %s failed unexpectedly", item.id,
              ", ".join(f"<{a}>" for a in addresses), exc_info=exc)
    reply = f"451 4.3.0 internal error in delivery ({type(exc).__name__}), see the log"
    return [RecipientResult(address, Outcome.TEMPORARY, reply, via=via)
            for address in addresses]


def _command_outcome(delivered: bool | None) -> Outcome:
    """run_pipe's answer: True delivered, None retry later, False failed for good."""
    if delivered is None:
        return Outcome.TEMPORARY
    return Outcome.SENT if delivered else Outcome.PERMANENT


def _has_pending_at(item: QueueItem, domain: str) -> bool:
    for rcpt in item.pending:
        with contextlib.suppress(ValueError):  # AddressError: an odd local recipient
            if domain_of(rcpt.address) == domain:
                return True
    return False


def mda_command(template: str, address: str) -> str:
    """The local MDA command line for one mailbox (each value shell-quoted).

    ``{address}`` and ``{domain}`` have the domain in Unicode (U-labels: ``ñoños.example``),
    as chasquid's ``%to%`` and ``%to_domain%`` do; ``{address_ascii}`` and
    ``{domain_ascii}`` in ASCII (A-labels: ``xn--oos-6mab.example``); ``{user}`` is the
    local part. The configuration refuses any other placeholder (MDA_PLACEHOLDERS).
    """
    user, _, ascii_domain = address.rpartition("@")
    domain = _u_labels(ascii_domain)
    values = {"user": user, "domain": domain, "address": f"{user}@{domain}",
              "domain_ascii": ascii_domain, "address_ascii": address}
    return template.format(**{name: shlex.quote(value) for name, value in values.items()})


def _u_labels(domain: str) -> str:
    """``xn--oos-6mab.example`` as ``ñoños.example``; unchanged when it does not decode."""
    try:
        return domain.encode("ascii").decode("idna")
    except UnicodeError:
        return domain


def _notify_wanted(item: QueueItem, address: str, event: str) -> bool:
    """RFC 3461 NOTIFY: without the parameter, failures and delays are both reported."""
    for rcpt in item.recipients:
        if rcpt.address == address:
            notify = rcpt.params.get("NOTIFY")
            return notify is None or event in notify.upper().split(",")
    return True

