"""Small shared helpers: atomic file writes, device selection, seeding."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it over ``path`` only if the block succeeds.

    A crash mid-write leaves at most a ``.tmp-<pid>`` file, never a half-written file under the
    final name. The temporary keeps the final suffixes so that writers choosing a format by
    extension (SimpleITK, numpy) still work.

    A write that fails (:func:`write_failure`: a full disk, a quota, an I/O error, or the
    cryptic errors torch and ITK give for a short write) raises
    :class:`~PLBOptCore.errors.OutputError` naming ``path``, after the temporary is removed; the
    file under the final name, if any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        failure = write_failure(path, exc, also=(tmp,))
        if failure is None:
            raise
        raise failure from exc
    finally:
        if tmp.exists():
            tmp.unlink()


# errno values that mean the storage refused more bytes
NO_SPACE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO") if hasattr(errno, name))
# What writers raise instead of an OSError when the storage refuses bytes: torch's zip writer
# ("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598", "PytorchStreamWriter
# failed writing file ..."), SimpleITK's writers ("... ImageFileWriter_Execute: ... failed to write").
WRITE_FAILURE_MARKERS = ("unexpected pos", "PytorchStreamWriter failed", "failed writing file", "ImageFileWriter",
                         "failed to write", "file write failed")


def write_failure(path: Path, exc: BaseException, also: tuple = ()) -> Optional[Exception]:
    """The :class:`~PLBOptCore.errors.OutputError` to raise for ``exc``, raised while writing
    ``path`` (or one of the files ``also``, its temporaries), or None when ``exc`` is no write
    failure (it then propagates unchanged). The message is one line: the file, the reason, and
    "disk full?" when the storage refused bytes."""
    from .errors import OutputError

    if isinstance(exc, OSError):
        if exc.filename is not None and Path(exc.filename) not in (Path(path), *map(Path, also)):
            return None  # about another file (read inside the block): not this write
        reason = exc.strerror or str(exc) or type(exc).__name__
        hint = "; disk full?" if exc.errno in NO_SPACE_ERRNOS else ""
        return OutputError(f"{path}: cannot write ({reason}){hint}")
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(marker in text for marker in WRITE_FAILURE_MARKERS):
        return OutputError(f"{path}: the file could not be written completely ({_short(text)}); disk full?")
    return None


def _short(text: str, limit: int = 160) -> str:
    """The last non-empty line of an error message (ITK's and torch's first lines are locations), shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else text
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_output_folder(folder: Path) -> None:
    """Raise :class:`~PLBOptCore.errors.OutputError` unless files can be written in ``folder``.

    ``folder``, or where it does not exist yet its nearest existing parent (where it would be
    created), must be a folder this process may write. Commands call this before their first
    write, so a bad ``-o`` (a file, a read-only folder) is one line and leaves nothing behind.
    """
    from .errors import OutputError

    folder = Path(folder)
    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        needed = "" if existing == folder else f" (output folder {folder} would be created in it)"
        raise OutputError(f"{existing}: exists and is not a folder{needed}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{existing}: folder is not writable (read-only or no permission); choose another output")


def check_output_file(path: Path, overwrite: bool) -> None:
    """Raise :class:`~PLBOptCore.errors.OutputError` if writing ``path`` would replace something:
    a folder always, an existing file (or link) unless ``overwrite``."""
    from .errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; cannot write a file there")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{path}: exists; use --overwrite to replace it, or choose another output")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise ``torch.device(name)``, refused with a
    :class:`ConfigError` when this machine does not have it."""
    from .errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available (torch {torch.__version__})")
    return device


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed derived from (seed, step): every step's randomness is reproducible on resume."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step``'s own draws (a strong view, then triplet mining), seeded
    from :func:`step_seed`."""
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, step) % (2**62))


def seed_everything(seed: int, step: int = 0) -> None:
    value = step_seed(seed, step)
    torch.manual_seed(value)
    np.random.seed(value % (2**32))


@contextlib.contextmanager
def torch_backend_flags(deterministic: bool) -> Iterator[None]:
    """Within the block: with ``deterministic``, torch's deterministic algorithms (a warning names
    any op that has none) and cuDNN without autotuning; otherwise cuDNN autotuning, which pays off
    because training and sliding-window inference feed one fixed patch size. Restored on exit."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matrix products (read when CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> Dict[str, Optional[str]]:
    """``cpu_model`` (the first ``model name`` of ``cpuinfo``, else the platform's processor),
    ``cpu_capability`` (torch's, e.g. ``AVX512``) and ``cpu_flags_digest`` (12 hex digits of the
    sorted feature flags; None where ``cpuinfo`` is unreadable, as on macOS and Windows)."""
    model, flags = None, None
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and flags is None:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12] if flags else None
    return {"cpu_model": model or platform.processor() or platform.machine() or None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags_digest": digest}


def compute_setup(device: torch.device) -> Dict[str, Any]:
    """What decides a run's floating-point results besides code, data and seed: torch's thread
    count and the processor (:func:`cpu_identity`), and the device's name on CUDA. The same KBP run
    gave 0.6594 Dice with one thread and 0.6536 with two (docs/RESULTS.md)."""
    gpu = {"device_name": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {"torch_threads": torch.get_num_threads(), **cpu_identity(), **gpu, "torch": torch.__version__}
