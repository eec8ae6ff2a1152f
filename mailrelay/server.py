"""The running server: wires configuration, users, certificates, queue, delivery and listeners."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, load_config
from .delivery.local import Maildirs
from .delivery.manager import DeliveryManager, Schedule
from .delivery.results import verifying_tls_context
from .errors import ConfigError
from .fsutil import atomic_write
from .intake import Intake
from .message.dkim.keys import KeyRing
from .message.dkim.outgoing import MessageSigner
from .message.filters import Filters
from .ops import memory
from .ops.activation import activated_sockets
from .ops.control import ControlServer, socket_path
from .ops.events import Events
from .ops.metrics import MetricsServer
from .ops.sdnotify import Notifier
from .policy.aliases import Aliases
from .policy.backend import PolicyBackend
from .policy.router import Router
from .policy.senders import SenderPolicy
from .policy.srs import SRS, load_or_create_secrets
from .policy.users import Users
from .queue import Queue, QueueItem
from .smtp.listener import (
    ConnectionLimits,
    Listeners,
    ListeningSocket,
    bind_all,
    open_files_budget,
)
from .smtp.session import Port
from .smtp.stream import DataBudget
from .smtp.tls import CertificateStore

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.resolver

    from .delivery.mta_sts import MTASTS
    from .delivery.remote import RemoteDelivery

log = logging.getLogger("mailrelay")

SHUTDOWN_GRACE = 30.0
PID_FILE = "mailrelay.pid"
LOCK_FILE = "mailrelay.lock"  # held (flock) by the server that owns data_dir
# Message bytes, or messages, received after which the heap is given back once all is
# quiet (the 256 KiB buffers of TLS connections stay in the heap: ops/memory.py).
BULK_BYTES = 32 * 1024 * 1024
BULK_MESSAGES = 200


class Server:
    """The running server, wired in one place: the configuration and what it loads
    (users, aliases, DKIM keys, certificates), the queue and its delivery, the listeners
    with the policy behind them and the intake, the control socket and metrics. It
    reloads on SIGHUP and when files change, and stops in order (listeners, sessions in
    flight, delivery)."""

    def __init__(self, config: Config,
                 activated: dict[str, list[socket.socket]] | None = None):
        """``activated``: listening sockets from systemd by listener kind (those kinds
        are not bound from ``listen``)."""
        self.config = config
        self.activated = activated or {}
        self.queue = Queue(config.data_dir / "queue", max_items=config.limits.max_queue_items,
                           min_free_bytes=config.limits.min_free_space)
        # A broken users or aliases file stops the start (file:line), as `check` says:
        # running without them would refuse (550) mail for those users and aliases.
        self.users = Users.load(config)
        self.keyring, _ = self._load_keyring()
        self.aliases, alias_errors = Aliases.load(config)
        if alias_errors:
            raise alias_errors[0]
        self.srs: SRS | None = None
        self.router = Router(self.is_local_domain, lambda: self.users, lambda: self.aliases,
                             None)
        # Mail log and metrics; a registry per server (tests run several in one process).
        self.events = Events()
        self.events.watch_queue(self.queue)
        self.metrics: MetricsServer | None = None
        self.signer = MessageSigner(lambda: self.keyring, self.is_local_domain, self.events)
        # chasquid's hooks and rspamd, after DATA (rebuilt at every reload).
        self.filters = Filters.from_config(config, self.events)
        # sign -> route -> put -> schedule, for SMTP sessions and for our own DSNs
        self.intake = Intake(self.queue, self.router, self.signer, lambda: self.srs,
                             lambda: self.config.primary_domain,
                             config.hostname, config.dns, self._schedule)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._verify_context: ssl.SSLContext | None = None
        self.certificates = CertificateStore(config.tls, config.hostname,
                                             config.data_dir / "selfsigned")
        self.listeners: Listeners | None = None
        self._at_trim = (0, 0)  # the data budget's bytes taken and messages at the last trim
        self.delivery: DeliveryManager | None = None
        self.mta_sts: MTASTS | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.control: ControlServer | None = None
        self._claim: int | None = None  # the locked data_dir/mailrelay.lock, while ours
        self._bound: list[ListeningSocket] = []
        self._last_domain_stamp: tuple = ()
        # The mailrelay.yaml last read: a setting that needs a restart is reported once
        # when it changes, not again at every later reload (the file watcher's included).
        self._last_read = config

    async def start(self) -> None:
        """Load everything, resume the queue, then bind the listeners."""
        config = self.config
        for warning in config.warnings:
            log.warning("%s", warning)
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._claim = claim_data_dir(config.data_dir)
        try:
            await self._start_claimed(config)
        except BaseException:
            self._release_claim()
            raise

    async def _start_claimed(self, config: Config) -> None:
        self.srs = SRS(load_or_create_secrets(config.data_dir),
                       max_age_days=max(1, round(config.aliases.srs_max_age / 86400)))
        self.router.srs = self.srs
        self.certificates.load()
        tls_context = self.certificates.server_context()

        # A bad delivery.ca_file stops the start (ConfigError), as check says; so does a
        # policy cache the client made at the first remote delivery could not use.
        self._verify_context = verifying_tls_context(config.delivery.ca_file)
        if config.delivery.mta_sts:
            try:
                (config.data_dir / "mta-sts").mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the MTA-STS policy cache: "
                                  f"{exc.strerror or exc}", config.data_dir / "mta-sts"
                                  ) from None
        self.delivery = DeliveryManager(
            self.queue, self._outbound, Maildirs(config.data_dir / "mail"), self.is_local_domain,
            local_mailbox=self._local_mailbox,
            enqueue=self.intake.generated,
            schedule=Schedule(tuple(config.delivery.retry_intervals),
                              config.delivery.give_up_after,
                              delay_warning_after=config.delivery.delay_warning_after),
            reporting_mta=config.hostname, concurrency=config.delivery.concurrency,
            default_domain=config.primary_domain,
            pipe_timeout=config.delivery.pipe_timeout, local_mda=config.delivery.local_mda,
            events=self.events,
        )
        # For `mailrelay queue`. Without it mail still flows; a second server on this
        # data_dir was stopped by the claim above already.
        self.control = ControlServer(socket_path(config.data_dir), self.queue, self.delivery,
                                     users=self.reload_users, aliases=self.reload_aliases)
        try:
            await self.control.start()
        except ConfigError:
            self.control = None
            await self.stop()
            raise
        except OSError as exc:
            self.control = None
            log.error("control socket %s: %s; `mailrelay queue` cannot reach this server",
                      socket_path(config.data_dir), exc.strerror or exc)
        items = await asyncio.to_thread(self.queue.load)
        for item in items:
            self.delivery.schedule(item)
        if items:
            log.info("queue: resumed %d message(s)", len(items))
        try:
            await self._start_listeners(tls_context)
        except OSError as exc:
            await self.stop()
            raise ConfigError(exc.strerror or str(exc)) from None
        except BaseException:
            await self.stop()
            raise
        self.delivery.start()  # once the start cannot fail any more
        for host, number in self.listening_addresses():
            log.info("listening on %s:%d", host, number)
        if config.metrics.listen:
            await self._start_metrics(*config.metrics.listen)
        # For commands that ask the running server to reload (`mailrelay aliases edit`).
        atomic_write(self.pid_path, f"{os.getpid()}\n".encode(), mode=0o644)
        self._last_domain_stamp = self._domain_files_stamp()
        self._watch_task = asyncio.create_task(self._watch_files(), name="file-watcher")

    def resolver(self) -> dns.asyncresolver.Resolver:
        """The server's one caching resolver, made (dnspython loaded) at first use."""
        if self._resolver is None:
            from .dnsresolver import make_resolver

            self._resolver = make_resolver(self.config.dns)
        return self._resolver

    def blocking_resolver(self) -> dns.resolver.Resolver:
        """The same resolver and cache, for the checks of inbound mail (in threads)."""
        from .dnsresolver import blocking_twin

        return blocking_twin(self.resolver())

    def _outbound(self) -> RemoteDelivery:
        """The SMTP client side, made for the first remote delivery (aiosmtplib,
        dnspython and MTA-STS are loaded then, not at start)."""
        from .delivery.mta_sts import MTASTS
        from .delivery.relay import relay_from_config
        from .delivery.remote import RemoteDelivery

        config = self.config
        verify_context = self._verify_context or verifying_tls_context(config.delivery.ca_file)
        resolver = self.resolver()
        if config.delivery.mta_sts and self.mta_sts is None:
            # MX hosts and MTA-STS policy hosts (RFC 8461 3.3) are checked against one
            # store.
            self.mta_sts = MTASTS(resolver, config.data_dir / "mta-sts", verify_context,
                                  port=config.delivery.mta_sts_port)
            self.mta_sts.start()
        return RemoteDelivery(
            config.hostname, resolver, smtp_port=config.delivery.smtp_port,
            max_mx_hosts=config.delivery.max_mx_hosts,
            connect_timeout=config.delivery.connect_timeout,
            command_timeout=config.delivery.command_timeout,
            max_connections=config.delivery.max_connections,
            max_connections_per_domain=config.delivery.max_connections_per_domain,
            connection_idle_time=config.delivery.connection_idle_time,
            tls_fallback_plain=config.delivery.tls_fallback_plain,
            verify_context=verify_context,
            policies=self.mta_sts,
            relay=relay_from_config(config, verify_context),
            source_ipv4=config.delivery.source_ipv4, source_ipv6=config.delivery.source_ipv6,
            ip_families=config.delivery.ip_families,
        )

    def is_local_domain(self, domain: str) -> bool:
        """Against the domains of now: a reload may add or remove some."""
        return self.config.is_local_domain(domain)

    def _local_mailbox(self, address: str) -> str | None:
        mailbox = self.users.mailbox_for(address)
        if mailbox is None and self.config.auth.dovecot:
            # Queued for a mailbox and no user of ours: dovecot's (checked at RCPT).
            _, _, domain = address.rpartition("@")
            if self.is_local_domain(domain):
                return address
        return mailbox

    def _schedule(self, item: QueueItem) -> None:
        assert self.delivery is not None
        self.delivery.schedule(item)

    async def _start_listeners(self, tls_context: ssl.SSLContext | None) -> None:
        config = self.config
        listen = config.listen
        # Kinds systemd passed sockets for use them; the others are bound from listen.
        self._bound = [ListeningSocket(Port(kind), sock)
                       for kind, socks in self.activated.items() for sock in socks]
        self._bound += bind_all([
            (port, host, number)
            for port, pairs in ((Port.SMTP, listen.smtp), (Port.SUBMISSION, listen.submission),
                                (Port.SUBMISSION_TLS, listen.submission_tls))
            if port.value not in self.activated
            for host, number in pairs])
        backend = PolicyBackend(config, self.is_local_domain, lambda: self.users, self.queue,
                                self.intake,
                                tls_context, SenderPolicy(config.senders, self.router.owners),
                                self.router, self.blocking_resolver, events=self.events,
                                filters=lambda: self.filters)
        backend.primary_domain_of = lambda: self.config.primary_domain
        await backend.start()
        self.router.also_user = backend.dovecot_users  # recipients dovecot knows
        if self.control is not None:
            self.control.throttle = backend.throttle  # for `mailrelay auth`
        limits = config.limits
        self.listeners = Listeners(
            backend,
            ConnectionLimits({port: limits.connection_limits(port.value)[0] for port in Port},
                             {port: limits.connection_limits(port.value)[1] for port in Port}),
            proxy_networks={port: config.proxy_protocol.trusted(port.value) for port in Port},
            proxy_timeout=config.proxy_protocol.timeout,
            tls_handshake_timeout=limits.tls_handshake_timeout,
            data_budget=DataBudget(limits.data_in_flight),
            max_open=open_files_budget(config.delivery.max_connections))
        for listening in self._bound:
            await self.listeners.start(listening.port, listening.sock)

    def listening_addresses(self) -> list[tuple[str, int]]:
        return [listening.sock.getsockname()[:2] for listening in self._bound]

    async def _start_metrics(self, host: str, number: int) -> None:
        # Mail flows without metrics: a port in use is logged, not fatal.
        metrics = MetricsServer(self.events.registry, host, number)
        try:
            await metrics.start()
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d: %s", host, number, exc.strerror or exc)
            return
        self.metrics = metrics
        log.info("metrics on http://%s:%d/metrics", host, number)

    def _load_keyring(self) -> tuple[KeyRing, bool]:
        """DKIM keys of every domain; a broken key file is reported, the others sign."""
        keyring, errors = KeyRing.load(self.config)
        for error in errors:
            log.error("dkim: %s (this key does not sign; the domain's other keys do)", error)
        return keyring, not errors

    def _load_aliases(self) -> list[ConfigError]:
        """A broken aliases file keeps that domain's previous aliases (chasquid exits)."""
        self.aliases, errors = Aliases.load(self.config, self.aliases)
        for error in errors:
            log.error("aliases: %s (keeping the last good aliases of that domain)", error)
        return errors

    def reload(self) -> bool:
        """Re-read mailrelay.yaml (domains apply, other changes are reported), users, DKIM
        keys, aliases and certificates; a broken file keeps the last good state."""
        ok = self._reload_config()
        # What this reload reads is what the file watcher has seen: after a SIGHUP (as
        # `aliases edit` sends) it must not reload the same change a second time.
        self._last_domain_stamp = self._domain_files_stamp()
        ok = not self._load_users() and ok
        self.keyring, keys_ok = self._load_keyring()
        aliases_ok = not self._load_aliases()
        self.filters = Filters.from_config(self.config, self.events,  # hooks added, chmod +x
                                           self.filters.slots)
        ok = ok and keys_ok and aliases_ok
        if not self.certificates.reload():
            ok = False
        log.info("reload: %s", "done" if ok else "done with errors (see above)")
        return ok

    def _load_users(self, only: str | None = None) -> list[ConfigError]:
        """Each domain's users file on its own (``only``: one domain's): a broken one
        keeps that domain's last good users, the other domains take their changes."""
        self.users, errors = Users.reload(self.config, self.users, only)
        for error in errors:
            log.error("users: %s (keeping the last good users of that domain)", error)
        return errors

    def reload_users(self, domain: str) -> dict[str, str | None]:
        """For `mailrelay user` after it changed a users file: load that domain's file
        now, and say which version of it the server uses (``digest``, of the file's
        bytes) and, if it could not take the file, why (``error``)."""
        if domain not in self.config.domains:
            self._reload_config()  # a domain created since: pick it up first
        if domain not in self.config.domains:
            return {"digest": None, "error": f"{domain} is not a domain of the running server"}
        errors = self._load_users(only=domain)
        self._seen(self.config.domain_dir(domain) / "users")
        db = self.users.domain(domain)
        return {"digest": db.digest if db is not None else None,
                "error": str(errors[0]) if errors else None}

    def reload_aliases(self, domain: str) -> dict[str, str | None]:
        """For `mailrelay aliases` after it changed an aliases file: load the aliases now,
        and say which version of ``domain``'s file the server uses and, if it could not
        take it, why (as reload_users)."""
        if domain not in self.config.domains:
            self._reload_config()
        if domain not in self.config.domains:
            return {"digest": None, "error": f"{domain} is not a domain of the running server"}
        errors = self._load_aliases()
        self._seen(self.config.domain_dir(domain) / "aliases")
        path = str(self.config.domain_dir(domain) / "aliases")
        mine = [error for error in errors if str(error.path) == path]
        return {"digest": self.aliases.digests.get(domain),
                "error": str(mine[0]) if mine else None}

    def _reload_config(self) -> bool:
        """New and removed domain directories take effect now; every other setting is read
        once at start (listeners, limits, delivery), so a change is only reported."""
        try:
            fresh = load_config(self.config.config_dir)
        except ConfigError as exc:
            log.error("reload: %s (keeping the running configuration)", exc)
            return False
        changed = changed_settings(self.config, fresh)
        if set(changed) & set(changed_settings(self._last_read, fresh)):
            log.warning("reload: changed settings need a restart to take effect: %s",
                        ", ".join(changed))
        self._last_read = fresh
        if fresh.domains != self.config.domains:
            added = sorted(set(fresh.domains) - set(self.config.domains))
            removed = sorted(set(self.config.domains) - set(fresh.domains))
            log.info("reload: domains added: %s; removed: %s",
                     ", ".join(added) or "none", ", ".join(removed) or "none")
            # Before users, aliases and keys are loaded for them. Whoever needs the live
            # domains asks self.is_local_domain.
            self.config = dataclasses.replace(self.config, domains=fresh.domains)
        self.config = dataclasses.replace(self.config, filters=fresh.filters)  # live, too
        return True

    async def _watch_files(self) -> None:
        # Cheap polling: acme.sh renewals and `user add` take effect without a signal.
        last_error, last_logged = "", 0.0
        while True:
            await asyncio.sleep(2.0)
            try:
                self._trim_after_bulk()
                if self.certificates.changed_on_disk():
                    log.info("certificates changed on disk, reloading")
                    self.certificates.reload()
                if self._domain_files_changed():
                    log.info("users, aliases or DKIM key files changed on disk, reloading")
                    self.reload()
            except OSError as exc:  # out of descriptors, say: one line, no traceback
                if str(exc) != last_error or time.monotonic() - last_logged > 60:
                    log.error("file watcher: %s", exc)
                    last_error, last_logged = str(exc), time.monotonic()
            except Exception:
                log.exception("file watcher")

    def _trim_after_bulk(self) -> None:
        """After BULK_BYTES or BULK_MESSAGES, once no message is being received or
        delivered: give the memory they took back (outside eyes: 20 messages of 10 MB
        left the idle server at 87 MiB instead of 40)."""
        budget = self.listeners.data_budget if self.listeners is not None else None
        if (budget is None or budget.used
                or (self.delivery is not None and self.delivery.attempts_in_flight)):
            return
        taken, messages = self._at_trim
        if budget.taken - taken < BULK_BYTES and budget.messages - messages < BULK_MESSAGES:
            return
        self._at_trim = (budget.taken, budget.messages)
        memory.trim(full=True)

    def _domain_files_changed(self) -> bool:
        stamp = self._domain_files_stamp()
        changed = self._last_domain_stamp != stamp
        self._last_domain_stamp = stamp
        return changed

    def _seen(self, path: Path) -> None:
        """A command had ``path`` loaded just now: the file watcher need not reload for
        it again (its other files it still watches as they were)."""
        fresh = {entry[0]: entry for entry in self._domain_files_stamp()}
        self._last_domain_stamp = tuple(fresh.get(entry[0], entry) if entry[0] == str(path)
                                        else entry for entry in self._last_domain_stamp)

    def _domain_files_stamp(self) -> tuple:
        """Identity of every users file and DKIM key, to notice edits by polling."""
        stamp: list[tuple] = [("domains", self._domain_dir_names())]
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

    def _domain_dir_names(self) -> tuple[str, ...]:
        """A new domain directory is noticed by polling too (the reload validates it)."""
        try:
            return tuple(sorted(e.name for e in self.config.domains_dir.iterdir()
                                if e.is_dir() and not e.name.startswith(".")))
        except OSError:
            return ()

    @property
    def pid_path(self) -> Path:
        return self.config.data_dir / PID_FILE

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let sessions and deliveries in flight finish (bounded)."""
        if self._watch_task:
            self._watch_task.cancel()
        if self.metrics:
            await self.metrics.stop()
            self.metrics = None
        # Sessions and delivery attempts in flight finish side by side, within one grace.
        draining = []
        if self.listeners:
            self.listeners.close()
            draining.append(self.listeners.drain(grace))
        if self.delivery:
            draining.append(self.delivery.stop(grace))
        await asyncio.gather(*draining)
        for listening in self._bound:
            listening.sock.close()
        self._bound = []
        if self.mta_sts:
            # After delivery: attempts still finishing may be waiting for a policy.
            await self.mta_sts.stop()
        # Last: while they are there, a second server refuses this data_dir (it finds the
        # control socket answering) and `mailrelay queue` reaches this one, which may
        # still be delivering.
        if self.control:
            await self.control.stop()
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if int(self.pid_path.read_text()) == os.getpid():
                self.pid_path.unlink()
        self._release_claim()

    def _release_claim(self) -> None:
        if self._claim is not None:
            os.close(self._claim)  # and with it the lock
            self._claim = None


def claim_data_dir(data_dir: Path) -> int:
    """Lock ``data_dir/mailrelay.lock`` for this process's life (the kernel lets go when it
    exits, even by SIGKILL); ConfigError if another server holds it. Two servers on one
    queue would each deliver it."""
    path = data_dir / LOCK_FILE
    try:
        # Read-only is enough for flock; 0644, so that a lock file a root run left behind
        # does not keep the service user out (data_dir itself is 0700).
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file: {exc.strerror or exc}", path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"another mailrelay is running on this data_dir (it holds {path})"
                          ) from None
    return fd


# users: the CLI's rules for new passwords, nothing the server holds; filters: rebuilt at
# each reload.
_LIVE_SETTINGS = frozenset({"config_dir", "domains", "warnings", "users", "filters"})


def changed_settings(running: Config, fresh: Config) -> list[str]:
    """Dotted names (``listen.smtp``) of settings that differ, apart from the live ones."""
    changed = []
    for item in dataclasses.fields(running):
        if item.name in _LIVE_SETTINGS:
            continue
        old, new = getattr(running, item.name), getattr(fresh, item.name)
        if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
            changed += [f"{item.name}.{sub.name}" for sub in dataclasses.fields(old)
                        if getattr(old, sub.name) != getattr(new, sub.name)]
        elif old != new:
            changed.append(item.name)
    return changed


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads.

    Under systemd (``Type=notify``) it says ``READY=1`` once the listeners are bound,
    ``RELOADING=1`` … ``READY=1`` around a reload and ``STOPPING=1`` when told to stop.
    """
    notifier = Notifier()
    memory.give_back_big_buffers()
    if os.geteuid() == 0:
        log.warning("running as root: pipe targets in aliases, hooks and delivery.local_mda "
                    "run as root too, and any flaw in the server is root's. Run it under "
                    "systemd (systemd/mailrelay.service: the service user, with only "
                    "CAP_NET_BIND_SERVICE for ports below 1024), or as the service user "
                    "(README, \"Running without systemd\": setpriv --reuid=mailrelay "
                    "--regid=mailrelay --init-groups --inh-caps=+net_bind_service "
                    "--ambient-caps=+net_bind_service mailrelay serve)")
    try:
        activated = activated_sockets()
    except ConfigError as exc:
        notifier.status(f"failed to start: {exc}")
        raise
    if activated:
        log.info("systemd passed sockets for %s", ", ".join(sorted(activated)))
    server = Server(config, activated)
    try:
        await server.start()
    except ConfigError as exc:
        notifier.status(f"failed to start: {exc}")  # shown by `systemctl status`
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    listening = len(server.listening_addresses())
    running_status = f"accepting mail on {listening} address(es)"

    def on_stop() -> None:
        if not stop.is_set():
            notifier.stopping("stopping: finishing sessions and deliveries in flight")
        stop.set()

    def on_reload() -> None:
        if stop.is_set():
            return  # stopping: systemd has heard STOPPING=1 and expects nothing else
        notifier.reloading()
        ok = False
        try:
            ok = server.reload()
        except Exception:  # keep serving on the previous state; systemd must hear READY
            log.exception("reload failed")
        finally:
            notifier.ready(running_status if ok else running_status
                           + "; last reload had errors, see the log")

    loop.add_signal_handler(signal.SIGTERM, on_stop)
    loop.add_signal_handler(signal.SIGINT, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    log.info("mailrelay ready (%s)", config.hostname)
    notifier.ready(running_status)
    await stop.wait()
    started = time.monotonic()
    log.info("stopping: no new connections, finishing sessions and deliveries in flight")
    await server.stop()
    log.info("stopped in %.1fs", time.monotonic() - started)
    notifier.close()
    return 0
