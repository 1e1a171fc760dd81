"""Follow a PLBOptCore run's ``events.jsonl`` and summarise progress for the panel.

The trainer appends one JSON object per line and flushes after each, so a reader may see a
half-written last line; it is kept and completed on the next read rather than reported as an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional


class EventsFollower:
    """Incrementally read new complete records from an events file that another process appends to."""

    def __init__(self, path: Path, start_offset: int = 0):
        self.path = Path(path)
        self._offset = start_offset
        self._partial = b""

    @classmethod
    def from_end(cls, path: Path) -> "EventsFollower":
        """Follow only records written from now on (a resumed run appends to the old run's file)."""
        path = Path(path)
        return cls(path, path.stat().st_size if path.exists() else 0)

    def read_new(self) -> List[dict]:
        """Records completed since the last call; malformed complete lines are skipped."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as stream:
            stream.seek(self._offset)
            chunk = stream.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


@dataclass
class TrainingProgress:
    """Latest state of a training run, updated record by record."""

    total_steps: int = 0
    start_step: int = 0
    step: int = 0
    device: str = ""
    preset: str = ""
    loss: Optional[float] = None
    eta_seconds: Optional[float] = None
    dice: Dict[str, float] = field(default_factory=dict)
    mean_dice: Optional[float] = None
    checkpoint: Optional[str] = None
    status: str = "waiting"  # waiting | running | completed | interrupted | failed
    message: str = ""
    preparing: str = ""  # while waiting: which case the preprocessing cache is being built for


    def update(self, record: dict) -> Optional[str]:
        """Apply one events.jsonl record; return a log line worth showing, if any."""
        kind = record.get("type")
        if kind == "preprocess":
            index, total = record.get("index"), record.get("total")
            self.preparing = f"Preparing data: case {index}/{total} ({record.get('case', '?')})"
            return f"Prepared {total} cases for training" if index == total else None
        if kind == "start":
            self.total_steps = int(record.get("total_steps", 0))
            self.start_step = self.step = int(record.get("start_step", 0))
            self.device, self.preset = str(record.get("device", "")), str(record.get("preset", ""))
            self.status = "running"
            return f"Training started: {self.preset or 'preset ?'} on {self.device or 'device ?'}, " \
                   f"steps {self.start_step}/{self.total_steps}"
        if kind == "train":
            self.step = int(record.get("step", self.step))
            self.loss = _float_or_none(record.get("loss"))
            self.eta_seconds = _float_or_none(record.get("eta_seconds"))
            self.status = "running"
            return None  # shown in the progress text, too frequent for the log
        if kind == "validation":
            self.dice = {str(k): float(v) for k, v in (record.get("dice") or {}).items()}
            self.mean_dice = _float_or_none(record.get("mean_dice"))
            per_class = ", ".join(f"{k} {v:.3f}" for k, v in self.dice.items())
            return f"Validation at step {record.get('step')}: mean Dice {_fmt(self.mean_dice)} ({per_class})"
        if kind == "checkpoint":
            self.checkpoint = str(record.get("path", ""))
            return f"Checkpoint at step {record.get('step')}: {self.checkpoint}"
        if kind == "end":
            self.status = str(record.get("status", "failed"))
            self.message = str(record.get("message", ""))
            self.step = int(record.get("step", self.step))
            return f"Training {self.status}" + (f": {self.message}" if self.message else "")
        return None

    @property
    def fraction(self) -> float:
        """Share of the requested steps done, 0..1."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "interrupted", "failed")

    def summary(self) -> str:
        """One line for the panel: step, loss, ETA and the last validation Dice."""
        if self.status == "waiting":
            return self.preparing or "Starting (loading data, building the model)…"
        parts = [f"Step {self.step}/{self.total_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.mean_dice is not None:
            parts.append(f"val Dice {self.mean_dice:.3f}")
        if self.finished:
            parts.append(self.status)
        elif self.eta_seconds is not None:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``; ``3725`` -> ``1 h 02 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _float_or_none(value) -> Optional[float]:
    return None if value is None else float(value)


def _fmt(value: Optional[float]) -> str:
    return "?" if value is None else f"{value:.3f}"
