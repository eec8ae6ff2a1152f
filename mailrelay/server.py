"""The running server: wires configuration, users, certificates, queue, delivery and listeners."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from .config import Config
from .delivery.local import Maildirs
from .delivery.manager import DeliveryManager, Schedule
from .delivery.remote import RemoteDelivery
from .dnsresolver import make_resolver
from .errors import ConfigError
from .inbound import InboundPolicy
from .queue import Queue, QueueItem
from .smtp.listener import ConnectionLimits, Listeners
from .smtp.session import Port
from .tls import CertificateStore
from .users import Users

log = logging.getLogger("mailrelay")

SHUTDOWN_GRACE = 30.0


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.queue = Queue(config.data_dir / "queue")
        self.users = Users.load(config)
        self.certificates = CertificateStore(config.tls, config.hostname,
                                             config.data_dir / "selfsigned")
        self.listeners: Listeners | None = None
        self.delivery: DeliveryManager | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._last_users_stamp: tuple = ()

    async def start(self) -> None:
        """Load everything, resume the queue, then bind the listeners."""
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.certificates.load()
        tls_context = self.certificates.server_context()

        resolver = make_resolver(config.dns)
        remote = RemoteDelivery(
            config.hostname, resolver, smtp_port=config.delivery.smtp_port,
            max_mx_hosts=config.delivery.max_mx_hosts,
            connect_timeout=config.delivery.connect_timeout,
            command_timeout=config.delivery.command_timeout,
        )
        self.delivery = DeliveryManager(
            self.queue, remote, Maildirs(config.data_dir / "mail"), config.is_local_domain,
            local_mailbox=lambda address: self.users.mailbox_for(address),
            enqueue=self.enqueue_generated,
            schedule=Schedule(tuple(config.delivery.retry_intervals),
                              config.delivery.give_up_after),
            reporting_mta=config.hostname, concurrency=config.delivery.concurrency,
        )
        items = await asyncio.to_thread(self.queue.load)
        for item in items:
            self.delivery.schedule(item)
        if items:
            log.info("queue: resumed %d message(s)", len(items))
        self.delivery.start()

        policy = InboundPolicy(config, lambda: self.users, self.queue, self.delivery.schedule,
                               tls_context)
        self.listeners = Listeners(policy, ConnectionLimits(
            config.limits.max_connections, config.limits.max_connections_per_ip))
        kinds = ((Port.SMTP, config.listen.smtp), (Port.SUBMISSION, config.listen.submission),
                 (Port.SUBMISSION_TLS, config.listen.submission_tls))
        try:
            for port, addresses in kinds:
                for host, number in addresses:
                    await self.listeners.start(port, host, number)
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on {host}:{number}: {exc.strerror}") from None
        for host, number in self.listeners.addresses():
            log.info("listening on %s:%d", host, number)
        self._last_users_stamp = self._users_stamp()
        self._watch_task = asyncio.create_task(self._watch_files(), name="file-watcher")

    async def enqueue_generated(self, sender: str, recipients: list[str], data: bytes) -> QueueItem:
        """Queue a message we generate ourselves (DSNs) and schedule it."""
        item = await self.queue.put(sender, recipients, data, {"generated": True})
        assert self.delivery is not None
        self.delivery.schedule(item)
        return item

    def reload(self) -> bool:
        """Re-read users and certificates; a broken file keeps the last good state."""
        ok = True
        try:
            self.users = Users.load(self.config)
        except ConfigError as exc:
            log.error("reload: users not reloaded, keeping the previous ones: %s", exc)
            ok = False
        if not self.certificates.reload():
            ok = False
        log.info("reload: %s", "done" if ok else "done with errors (see above)")
        return ok

    async def _watch_files(self) -> None:
        # Cheap polling: acme.sh renewals and `user add` take effect without a signal.
        while True:
            await asyncio.sleep(2.0)
            try:
                if self.certificates.changed_on_disk():
                    log.info("certificates changed on disk, reloading")
                    self.certificates.reload()
                if self._users_changed():
                    log.info("users files changed on disk, reloading")
                    self.reload()
            except Exception:
                log.exception("file watcher")

    def _users_changed(self) -> bool:
        stamp = self._users_stamp()
        changed = self._last_users_stamp != stamp
        self._last_users_stamp = stamp
        return changed

    def _users_stamp(self) -> tuple:
        stamp = []
        for domain in self.config.domains:
            path = self.config.domain_dir(domain) / "users"
            try:
                st = path.stat()
                stamp.append((domain, st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                stamp.append((domain, None))
        return tuple(stamp)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let sessions and deliveries in flight finish (bounded)."""
        if self._watch_task:
            self._watch_task.cancel()
        if self.listeners:
            self.listeners.close()
            await self.listeners.drain(grace)
        if self.delivery:
            await self.delivery.stop(grace)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads."""
    server = Server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    log.info("mailrelay ready (%s)", config.hostname)
    await stop.wait()
    started = time.monotonic()
    log.info("stopping: no new connections, finishing sessions in flight")
    await server.stop()
    log.info("stopped in %.1fs", time.monotonic() - started)
    return 0
