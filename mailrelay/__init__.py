"""mailrelay: an SMTP submission and relay server for one person's own domains."""

from pathlib import Path

__version__ = "0.1.0"
DEFAULT_CONFIG_DIR = Path("/etc/mailrelay")
