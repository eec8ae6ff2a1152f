"""mailrelay: an SMTP submission and relay server for one person's own domains."""

__version__ = "0.1.0"
