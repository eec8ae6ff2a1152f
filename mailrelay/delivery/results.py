"""What a delivery attempt comes to, whoever made it (an MX host, the relay, a mailbox,
a command); and the trust anchors outbound TLS is verified against.

Apart from remote.py so that the scheduler and the mail log know these without loading
the SMTP client (aiosmtplib, dnspython), which is loaded with the first remote delivery.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import ConfigError

VERIFIED = "verified"
UNVERIFIED = "unverified"
PLAIN = "plain"
NOT_CONNECTED = "-"  # the TLS state of a result from a host we never talked to

# How a recipient was reached (RecipientResult.via, the mail log's via=, the metrics' via).
MX = "mx"  # an MX host of the recipient's domain (remote_host names it)
RELAY = "relay"  # the smarthost of delivery.relay (remote_host names it)
LOCAL = "local"  # a local mailbox: its Maildir, or delivery.local_mda
COMMAND = "pipe"  # the command of an alias "| command"


class Outcome(Enum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome of one delivery attempt, whatever delivered it."""

    address: str
    outcome: Outcome
    reply: str  # the remote reply ("550 5.1.1 no such user") or our own reason
    remote_host: str | None = None  # the MX host or relay that answered; None: none did
    tls: str = PLAIN  # plain | unverified | verified (| "-": not connected)
    tls_version: str | None = None  # "TLSv1.3"; None in the clear
    via: str = MX  # MX | RELAY | LOCAL | COMMAND


def verifying_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Trust anchors from ``delivery.ca_file`` (or the system's), for MX hosts and MTA-STS
    policy hosts alike. create_default_context: CERT_REQUIRED and check_hostname."""
    try:
        if ca_file is None:
            return ssl.create_default_context()
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"delivery.ca_file {ca_file}: {exc}") from None
