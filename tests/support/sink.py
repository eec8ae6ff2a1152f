"""A real SMTP server (aiosmtpd) standing in for a remote MX host.

It records what it receives and can be told to answer with errors, per command, to
exercise retries and bounces. It runs in its own thread and event loop (aiosmtpd's
Controller), so the server under test talks to it over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    peer: str
    mail_options: list[str] = field(default_factory=list)
    login: str | None = None  # the user that logged in (a submission sink)


@dataclass
class SinkBehaviour:
    """Replies to use instead of 250; a callable gets the address (or None for DATA)."""

    mail: str | None = None
    rcpt: Callable[[str], str | None] | None = None
    data: str | None = None
    # Seconds to wait before answering DATA (a slow remote host).
    delay: float = 0.0
    # Answer STARTTLS with 220, then send garbage instead of a TLS handshake and hang up.
    break_tls: bool = False
    # Reply to RSET instead of 250 (e.g. "421 4.3.2 going away": a stale connection).
    rset: str | None = None


class _Handler:
    def __init__(self, sink: SinkBehaviourHolder):
        self.sink = sink

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.sink.behaviour.mail:
            return self.sink.behaviour.mail
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        rule = self.sink.behaviour.rcpt
        reply = rule(address) if rule else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server, session, envelope):
        return self.sink.behaviour.rset or "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.sink.behaviour.delay:
            await asyncio.sleep(self.sink.behaviour.delay)
        if self.sink.behaviour.data:
            return self.sink.behaviour.data
        self.sink.record(Received(
            sender=envelope.mail_from, recipients=list(envelope.rcpt_tos),
            data=envelope.original_content,
            tls=session.ssl is not None or self.sink.implicit_tls,
            peer=session.peer[0], mail_options=list(envelope.mail_options),
            login=session.auth_data.decode() if isinstance(session.auth_data, bytes) else None,
        ))
        return "250 2.0.0 OK sink"


@dataclass
class SinkBehaviourHolder:
    behaviour: SinkBehaviour = field(default_factory=SinkBehaviour)
    messages: list[Received] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)
    connections: int = 0  # TCP connections accepted so far
    # AUTH attempts of a submission sink: (user, whether the password was right, TLS up).
    logins: list[tuple[str, bool, bool]] = field(default_factory=list)
    implicit_tls: bool = False  # TLS from the first byte (aiosmtpd's session.ssl stays None)
    active: int = 0  # open right now
    max_active: int = 0  # the most open at once

    def record(self, message: Received) -> None:
        with self.lock:
            self.messages.append(message)
            self.lock.notify_all()

    def opened(self) -> None:
        with self.lock:
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def closed(self) -> None:
        with self.lock:
            self.active -= 1
            self.lock.notify_all()


class _SinkSMTP(AioSMTP):
    """aiosmtpd's SMTP, counting connections and able to break STARTTLS on purpose."""

    def __init__(self, handler, state: SinkBehaviourHolder, **kwargs):
        super().__init__(handler, **kwargs)
        self._state = state
        self._counted = False
        self._lost = False

    def connection_made(self, transport):
        # Called again after STARTTLS for the same connection: count it once.
        if not self._counted:
            self._counted = True
            self._state.opened()
        super().connection_made(transport)

    def connection_lost(self, error):
        if self._counted and not self._lost:
            self._lost = True
            self._state.closed()
        super().connection_lost(error)

    async def smtp_STARTTLS(self, arg):
        if self._state.behaviour.break_tls and not arg and self.tls_context:
            await self.push("220 Ready to start TLS")
            assert self.transport is not None
            self.transport.write(b"this is not a TLS handshake\r\n" * 8)
            self.transport.close()
            return
        await super().smtp_STARTTLS(arg)


class Sink:
    """``users`` makes it a submission server (a smarthost): AUTH required, offered only
    under TLS, and STARTTLS required before MAIL; with ``implicit_tls`` TLS starts at
    connect instead (port 465 style). ``smtputf8=False`` leaves SMTPUTF8 out of EHLO."""

    def __init__(self, host: str, port: int, tls_context: ssl.SSLContext | None = None,
                 hostname: str = "mx.remote.test", *, smtputf8: bool = True,
                 users: dict[str, str] | None = None, implicit_tls: bool = False,
                 auth_require_tls: bool = True, exclude_auth: tuple[str, ...] = (),
                 auth_failure: Callable[[LoginPassword], str] | None = None):
        self.host = host
        self.port = port
        self.state = SinkBehaviourHolder()
        handler = _Handler(self.state)
        tls = tls_context
        state = self.state
        state.implicit_tls = implicit_tls
        extra: dict = {}
        if users is not None:
            def authenticator(server, session, envelope, mechanism, auth_data):
                ok = (isinstance(auth_data, LoginPassword)
                      and users.get(auth_data.login.decode()) == auth_data.password.decode())
                user = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
                with state.lock:
                    state.logins.append((user, ok, session.ssl is not None or implicit_tls))
                # ``auth_failure`` writes the refusal (e.g. a hostile echo of what we sent).
                message = auth_failure(auth_data) if auth_failure and not ok else None
                return AuthResult(success=ok, handled=False, message=message,
                                  auth_data=auth_data.login if ok else None)

            # aiosmtpd counts only STARTTLS as TLS for AUTH: on implicit TLS it is there.
            extra = {"authenticator": authenticator, "auth_required": True,
                     "auth_require_tls": auth_require_tls and not implicit_tls,
                     "require_starttls": bool(tls) and not implicit_tls,
                     "auth_exclude_mechanism": exclude_auth}

        class _Controller(Controller):
            def factory(self):
                # AUTH without aiosmtpd's TLS requirement is on purpose here (implicit TLS,
                # or a relay that must not get our password in the clear): no warning.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
                    return _SinkSMTP(self.handler, state, hostname=hostname,
                                     tls_context=None if implicit_tls else tls,
                                     data_size_limit=None, enable_SMTPUTF8=smtputf8, **extra)

        self.controller = _Controller(handler, hostname=host, port=port,
                                      ssl_context=tls if implicit_tls else None)

    @property
    def messages(self) -> list[Received]:
        return self.state.messages

    @property
    def behaviour(self) -> SinkBehaviour:
        return self.state.behaviour

    @behaviour.setter
    def behaviour(self, value: SinkBehaviour) -> None:
        self.state.behaviour = value

    @property
    def logins(self) -> list[tuple[str, bool, bool]]:
        return self.state.logins

    @property
    def connections(self) -> int:
        """TCP connections accepted since start (or reset_counters)."""
        return self.state.connections

    @property
    def max_active(self) -> int:
        return self.state.max_active

    def reset_counters(self) -> None:
        with self.state.lock:
            self.state.connections = 0
            self.state.max_active = self.state.active

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no connection is open (e.g. the relay's pool was closed)."""
        deadline = time.monotonic() + timeout
        with self.state.lock:
            while self.state.active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink {self.host}: {self.state.active} connection(s) "
                                         f"still open after {timeout}s")
                self.state.lock.wait(left)

    def start(self) -> None:
        self.controller.start()
        # The Controller connects once itself to check the server is up: not a client.
        self.wait_idle()
        self.reset_counters()

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block (in a thread) until ``count`` messages arrived; returns them."""
        deadline = time.monotonic() + timeout
        with self.state.lock:
            while len(self.state.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"sink {self.host}: {len(self.state.messages)} of {count} messages "
                        f"after {timeout}s")
                self.state.lock.wait(left)
            return list(self.state.messages)

    async def until(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Async form of wait_for, for tests running in the event loop."""
        return await asyncio.to_thread(self.wait_for, count, timeout)
