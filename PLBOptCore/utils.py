"""Small shared helpers: atomic file writes, device selection, seeding."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it over ``path`` only if the block succeeds.

    A crash mid-write leaves at most a ``.tmp-<pid>`` file, never a half-written file under the
    final name. The temporary keeps the final suffixes so that writers choosing a format by
    extension (SimpleITK, numpy) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise ``torch.device(name)`` (validated)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
    return device


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed derived from (seed, step): every step's randomness is reproducible on resume."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int, step: int = 0) -> None:
    value = step_seed(seed, step)
    torch.manual_seed(value)
    np.random.seed(value % (2**32))
