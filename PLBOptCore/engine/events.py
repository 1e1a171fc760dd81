"""``events.jsonl``: one JSON object per line, the single source of training progress.

The trainer appends; the CLI progress bar, the Slicer module and the benchmark runner read. Each
line is flushed and fsynced on its own so a reader (or a crash) never sees more than one partial
line, which :func:`read_events` skips.

Every record is also logged on this module's logger (``start``, ``validation`` and ``end`` at INFO,
the frequent ones at DEBUG), so a script or the Slicer console sees the run through :mod:`logging`, and
passed to the writer's sinks (TensorBoard).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from ..utils import write_failure

EVENTS_FILE = "events.jsonl"
logger = logging.getLogger(__name__)
EventSink = Callable[[Dict[str, Any]], None]
INFO_EVENTS = ("start", "validation", "end")  # logged at INFO; the frequent records at DEBUG


class EventWriter:
    """Append-only writer of ``run_dir/events.jsonl``; ``enabled=False`` (ranks other than 0)
    writes, logs and forwards nothing but still returns the records."""

    def __init__(self, run_dir: Path, enabled: bool = True, sinks: Sequence[EventSink] = ()) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled
        self.sinks = list(sinks)

    def write(self, record_type: str, **fields: Any) -> Dict[str, Any]:
        record = {"type": record_type, "time": round(time.time(), 3), **fields}
        if self.enabled:
            try:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record, allow_nan=True) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:  # a full disk: one line naming the file (OutputError), not errno 28
                failure = write_failure(self.path, exc)
                if failure is None:
                    raise
                raise failure from exc
            logger.log(logging.INFO if record_type in INFO_EVENTS else logging.DEBUG, "%s", describe_event(record))
            for sink in self.sinks:
                sink(record)
        return record


def describe_event(record: Dict[str, Any]) -> str:
    """One human-readable line for an event record."""
    kind = record.get("type")
    if kind == "start":
        return (f"training {record.get('preset')} on {record.get('device')}: steps {record.get('start_step')}"
                f"..{record.get('total_steps')}")
    if kind == "train":
        losses = " ".join(f"{key}={record[key]:.4f}" for key in ("loss", "loss_sup", "loss_unsup", "loss_tri", "loss_mc")
                          if isinstance(record.get(key), (int, float)))
        return f"step {record.get('step')}/{record.get('total_steps')} {losses} lr={record.get('lr', 0.0):.3g}"
    if kind == "validation":
        per_class = ", ".join(f"{name} {value:.3f}" for name, value in record.get("dice", {}).items())
        return f"validation at step {record.get('step')}: mean Dice {record.get('mean_dice', 0.0):.3f} ({per_class})"
    if kind == "checkpoint":
        return f"checkpoint at step {record.get('step')}: {record.get('path')}"
    if kind == "end":
        return f"{record.get('message')} (step {record.get('step')})"
    return json.dumps(record)


def read_events(path: Path) -> List[Dict[str, Any]]:
    """All complete records (JSON objects) of an events file; a missing file or torn last line is
    tolerated, and a line that is not UTF-8, not JSON or not an object is skipped: the file may
    have been edited, concatenated or damaged, and its readers (plots, progress) expect records."""
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # being written right now
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
