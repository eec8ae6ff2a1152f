"""Inbound SMTP: listeners, sessions and their policy."""
