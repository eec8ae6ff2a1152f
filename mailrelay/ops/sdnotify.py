"""sd_notify(3) without libsystemd: tell systemd (``Type=notify``) how the service is doing.

systemd passes the address of its notification socket in ``$NOTIFY_SOCKET``: a path, or
an abstract socket name written with a leading ``@``. Each notification is one datagram
of ``KEY=value`` lines. Outside systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("mailrelay.sdnotify")


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:…, which we do not speak


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants in ``MONOTONIC_USEC=`` (v253+)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """One datagram socket to ``$NOTIFY_SOCKET``, kept for the life of the process."""

    def __init__(self, environ: dict[str, str] | None = None):
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self.address = _address(value) if value else None
        if value and self.address is None:
            log.warning("NOTIFY_SOCKET=%s: unsupported address, not notifying systemd", value)
        self._socket: socket.socket | None = None

    def notify(self, **fields: object) -> bool:
        """Send ``notify(READY=1, STATUS="…")``; True when sent. Never raises: systemd
        being gone must not take the mail server down with it."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Called on the event loop: a stuck systemd may delay us a little, not hang us.
                self._socket.settimeout(1.0)
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", " ".join(fields), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self, status: str = "reloading") -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 match this to the reload it asked for.
        return self.notify(RELOADING=1, STATUS=status, MONOTONIC_USEC=monotonic_usec())

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
