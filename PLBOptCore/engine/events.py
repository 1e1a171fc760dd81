"""``events.jsonl``: one JSON object per line, the single source of training progress.

The trainer appends; the CLI progress bar, the Slicer module and the benchmark runner read. Each
line is flushed and fsynced on its own so a reader (or a crash) never sees more than one partial
line, which :func:`read_events` skips.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

EVENTS_FILE = "events.jsonl"


class EventWriter:
    """Append-only writer of ``run_dir/events.jsonl``."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled

    def write(self, record_type: str, **fields: Any) -> Dict[str, Any]:
        record = {"type": record_type, "time": round(time.time(), 3), **fields}
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        return record


def read_events(path: Path) -> List[Dict[str, Any]]:
    """All complete records of an events file; a missing file or torn last line is tolerated."""
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # being written right now
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
