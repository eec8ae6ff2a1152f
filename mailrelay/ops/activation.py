"""systemd socket activation: listening sockets handed over by systemd (sd_listen_fds(3)).

systemd opens the sockets of the ``.socket`` units that name our service and starts us
with them as file descriptors 3, 4, …, and with three environment variables:

- ``LISTEN_PID``: the process they are meant for. Another process (a child that
  inherited the environment) must ignore them.
- ``LISTEN_FDS``: how many descriptors, starting at 3.
- ``LISTEN_FDNAMES``: their names, separated by ``:``, from each unit's
  ``FileDescriptorName=``.

As ``sd_listen_fds(1)`` does, ``activated_sockets`` reads them once, unsets all three so
processes we start (SMTP workers, pipes, hooks) do not inherit them, and sets
close-on-exec on the descriptors.

Names are chasquid's, so the socket units of a chasquid installation work unchanged
(chasquid's ``etc/systemd/system/chasquid-*.socket``, used by Debian's package):

====================  ===================  ===============================
FileDescriptorName    listener kind        usual port
====================  ===================  ===============================
``smtp``              ``smtp``             25 (MX, STARTTLS)
``submission``        ``submission``       587 (STARTTLS, AUTH)
``submission_tls``    ``submission_tls``   465 (implicit TLS, AUTH)
====================  ===================  ===============================

The kinds are the values of ``mailrelay.smtp.session.Port``. A unit may pass several
sockets under one name (``ListenStream=`` twice, e.g. IPv4 and IPv6).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import MutableMapping

from ..errors import ConfigError

SD_LISTEN_FDS_START = 3
KINDS = ("smtp", "submission", "submission_tls")
# More than systemd would ever pass us; a bigger number is a broken environment.
MAX_FDS = 1024

_ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def activated_sockets(
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, list[socket.socket]]:
    """The sockets systemd passed us, by listener kind; ``{}`` when not socket-activated.

    ConfigError (one line: which descriptor, what is wrong, what to fix) for a broken
    environment, a name that is not a listener kind, or a descriptor that is not a
    listening TCP socket. The variables are unset in every case.
    """
    env = os.environ if environ is None else environ
    try:
        return _activated(env)
    finally:
        for name in _ENVIRONMENT:
            env.pop(name, None)


def _activated(env: MutableMapping[str, str]) -> dict[str, list[socket.socket]]:
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return {}
    if not re.fullmatch(r"[1-9][0-9]*", pid_text):
        raise ConfigError(f"systemd socket activation: LISTEN_PID={pid_text[:20]!r} is not a "
                          "process id")
    if int(pid_text) != os.getpid():
        return {}  # meant for another process (we inherited it)
    count_text = env.get("LISTEN_FDS")
    if count_text is None:
        return {}
    if not re.fullmatch(r"[0-9]+", count_text) or int(count_text) > MAX_FDS:
        raise ConfigError(f"systemd socket activation: LISTEN_FDS={count_text[:20]!r} is not "
                          "a number of descriptors")
    count = int(count_text)
    if count == 0:
        return {}
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        raise ConfigError(f"systemd socket activation: LISTEN_FDNAMES has {len(names)} "
                          f"names for LISTEN_FDS={count} descriptors")

    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds does
        except OSError as exc:
            raise ConfigError(f"systemd socket activation: descriptor {fd}: "
                              f"{exc.strerror}") from None

    result: dict[str, list[socket.socket]] = {}
    try:
        for fd, name in zip(fds, names, strict=True):
            if name not in KINDS:
                raise ConfigError(
                    f"systemd socket activation: descriptor {fd} is named {name[:40]!r}; "
                    f"set FileDescriptorName= to one of {', '.join(KINDS)} in its .socket "
                    "unit")
            sock = _listening_tcp_socket(fd, name)
            result.setdefault(name, []).append(sock)
    except BaseException:
        for socks in result.values():
            for sock in socks:
                sock.detach()  # leave the descriptors as systemd gave them
        raise
    return result


def _listening_tcp_socket(fd: int, name: str) -> socket.socket:
    where = f"systemd socket activation: descriptor {fd} ({name})"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"{where} is not a socket: {exc.strerror}") from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ConfigError(f"{where} is not an IPv4 or IPv6 socket (use ListenStream= "
                              "with a port or address:port)")
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"{where} is not a stream socket (use ListenStream=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"{where} is not listening (Accept=no is needed)")
        sock.setblocking(False)  # as mailrelay.smtp.listener.bind leaves its own sockets
    except BaseException:
        sock.detach()
        raise
    return sock
