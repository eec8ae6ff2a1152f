"""Printing a bench's results: a readable table, then JSON (also to a file if asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], table_text: str, json_path: Path | None) -> None:
    print(table_text)
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
