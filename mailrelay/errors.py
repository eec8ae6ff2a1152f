"""Exceptions shared across mailrelay."""

from __future__ import annotations

from pathlib import Path


class MailrelayError(Exception):
    """Base class: an error that is reported to the user as one line."""


class ConfigError(MailrelayError):
    """A problem in a configuration file, located by file and line when known."""

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"
