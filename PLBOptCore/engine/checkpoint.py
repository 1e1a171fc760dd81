"""Atomic, tensor-only checkpoints loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so loading never
unpickles code. ``save_checkpoint`` writes to a temporary file, fsyncs, keeps the previous good
file as ``<name>.prev`` (a hard link, so the final name never disappears) and then
``os.replace``s: a kill at any moment leaves a loadable file under the final name.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict

import torch

from ..errors import CheckpointError
from ..utils import atomic_write

CHECKPOINT_FORMAT = "plbopt-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: Dict[str, Any]) -> Path:
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if path.exists():
            _keep_previous(path)
    return path


def _keep_previous(path: Path) -> None:
    """Make ``<name>.prev`` the current file without ever removing ``path``: renaming it away
    before the new file is moved in left a moment without a file under the final name, and a
    kill in that moment lost it (seen in CI)."""
    with atomic_write(path.with_name(path.name + ".prev")) as link:
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            shutil.copy2(path, link)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load and verify a PLBOpt checkpoint; :class:`CheckpointError` names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: contains objects other than tensors and plain data "
                              f"(only PLBOpt checkpoints are accepted) [{str(exc).splitlines()[0]}]") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a PLBOpt checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    version = state.get("version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: malformed checkpoint (version {version!r} is not a number)")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state['version']} is newer than this PLBOpt "
                              f"(supports {CHECKPOINT_VERSION}); upgrade PLBOpt")
    return state


def load_latest_good(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load ``path``; if it is corrupt, fall back to ``path.prev`` (kept by :func:`save_checkpoint`)."""
    try:
        return load_checkpoint(path, map_location)
    except CheckpointError as first:
        previous = Path(path).with_name(Path(path).name + ".prev")
        if previous.is_file():
            try:
                return load_checkpoint(previous, map_location)
            except CheckpointError:
                pass
        raise first
