"""The running server: wires configuration, users, certificates, queue, delivery and listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from .aliases import Aliases
from .config import Config
from .delivery.local import Maildirs
from .delivery.manager import DeliveryManager, Schedule
from .delivery.remote import RemoteDelivery
from .dkim.keys import KeyRing
from .dnsresolver import make_resolver
from .errors import ConfigError
from .fsutil import atomic_write
from .headers import parse_headers
from .inbound import InboundPolicy
from .queue import Queue, QueueItem
from .router import Router
from .senders import SenderPolicy
from .signing import MessageSigner
from .smtp.listener import ConnectionLimits, Listeners
from .smtp.session import Port
from .srs import SRS, load_or_create_secrets
from .tls import CertificateStore
from .users import Users

log = logging.getLogger("mailrelay")

SHUTDOWN_GRACE = 30.0
PID_FILE = "mailrelay.pid"


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.queue = Queue(config.data_dir / "queue", max_items=config.limits.max_queue_items,
                           min_free_bytes=config.limits.min_free_space)
        self.users = Users.load(config)
        self.keyring, _ = self._load_keyring()
        self.aliases, _ = self._load_aliases(None)
        self.srs: SRS | None = None
        self.router = Router(config.is_local_domain, lambda: self.users, lambda: self.aliases,
                             None)
        self.signer = MessageSigner(lambda: self.keyring, config.is_local_domain)
        self.certificates = CertificateStore(config.tls, config.hostname,
                                             config.data_dir / "selfsigned")
        self.listeners: Listeners | None = None
        self.delivery: DeliveryManager | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._last_domain_stamp: tuple = ()

    async def start(self) -> None:
        """Load everything, resume the queue, then bind the listeners."""
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.srs = SRS(load_or_create_secrets(config.data_dir),
                       max_age_days=max(1, round(config.aliases.srs_max_age / 86400)))
        self.router.srs = self.srs
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
            default_domain=config.domains[0] if config.domains else None,
            pipe_timeout=config.delivery.pipe_timeout, local_mda=config.delivery.local_mda,
        )
        items = await asyncio.to_thread(self.queue.load)
        for item in items:
            self.delivery.schedule(item)
        if items:
            log.info("queue: resumed %d message(s)", len(items))
        self.delivery.start()

        policy = InboundPolicy(config, lambda: self.users, self.queue, self.delivery.schedule,
                               tls_context, SenderPolicy(config.senders, self.router.owners),
                               self.signer, self.router, self.srs)
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
        # For commands that ask the running server to reload (`mailrelay aliases edit`).
        atomic_write(self.pid_path, f"{os.getpid()}\n".encode(), mode=0o644)
        self._last_domain_stamp = self._domain_files_stamp()
        self._watch_task = asyncio.create_task(self._watch_files(), name="file-watcher")

    async def enqueue_generated(self, sender: str, recipients: list[str], data: bytes) -> QueueItem:
        """Queue a message we generate ourselves (DSNs), DKIM-signed like all our mail."""
        signature = await asyncio.to_thread(self.signer.signature, data, parse_headers(data),
                                            sender)
        # Through the router: a bounce of forwarded mail goes to our SRS address, which
        # stands for the original sender.
        expansion = self.router.expand(recipients, [{} for _ in recipients])
        item = await self.queue.put(sender, expansion.local + expansion.remote,
                                    [signature, data], {"generated": True})
        assert self.delivery is not None
        self.delivery.schedule(item)
        return item

    def _load_keyring(self) -> tuple[KeyRing, bool]:
        """DKIM keys of every domain; a broken key file is reported, the others sign."""
        keyring, errors = KeyRing.load(self.config)
        for error in errors:
            log.error("dkim: %s (this key does not sign; the domain's other keys do)", error)
        return keyring, not errors

    def _load_aliases(self, previous: Aliases | None) -> tuple[Aliases, bool]:
        """A broken aliases file keeps that domain's previous aliases (chasquid exits)."""
        aliases, errors = Aliases.load(self.config, previous)
        for error in errors:
            log.error("aliases: %s (keeping the last good aliases of that domain)", error)
        return aliases, not errors

    def reload(self) -> bool:
        """Re-read users, DKIM keys and certificates; a broken file keeps the last good state."""
        ok = True
        try:
            self.users = Users.load(self.config)
        except ConfigError as exc:
            log.error("reload: users not reloaded, keeping the previous ones: %s", exc)
            ok = False
        self.keyring, keys_ok = self._load_keyring()
        self.aliases, aliases_ok = self._load_aliases(self.aliases)
        ok = ok and keys_ok and aliases_ok
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
                if self._domain_files_changed():
                    log.info("users, aliases or DKIM key files changed on disk, reloading")
                    self.reload()
            except Exception:
                log.exception("file watcher")

    def _domain_files_changed(self) -> bool:
        stamp = self._domain_files_stamp()
        changed = self._last_domain_stamp != stamp
        self._last_domain_stamp = stamp
        return changed

    def _domain_files_stamp(self) -> tuple:
        """Identity of every users file and DKIM key, to notice edits by polling."""
        stamp = []
        for domain in self.config.domains:
            directory = self.config.domain_dir(domain)
            for path in [directory / "users", directory / "aliases",
                         *sorted(directory.glob("dkim:*.pem"))]:
                try:
                    st = path.stat()
                    stamp.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
                except FileNotFoundError:
                    stamp.append((str(path), None))
        return tuple(stamp)

    @property
    def pid_path(self) -> Path:
        return self.config.data_dir / PID_FILE

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let sessions and deliveries in flight finish (bounded)."""
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if int(self.pid_path.read_text()) == os.getpid():
                self.pid_path.unlink()
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
