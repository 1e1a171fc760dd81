"""Run PLBOptCore's CLI in a separate process so Slicer stays responsive.

The process's output lines are collected on a background thread (or, on Slicer 5.12+, by
``slicer.util.launchConsoleProcess(blocking=False)``) and handed out by :meth:`JobProcess.poll`,
which the panel calls from a QTimer on the main thread. Nothing here touches the MRML scene.
"""

from __future__ import annotations

import collections
import inspect
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import slicer

PRESETS = ("supervised", "dhc", "plbopt", "refine-only", "triplet-only", "mc-only")
DEVICES = ("auto", "cpu", "cuda")
EXIT_USER_ERROR = 2  # PLBOptCore printed one line saying what is wrong
EXIT_INTERRUPTED = 130  # cancelled; a resumable checkpoint was written


@dataclass
class TrainSettings:
    """The training choices the panel exposes (anything else goes through ``overrides``)."""

    preset: str = "plbopt"
    iterations: int = 2000
    patch_size: Tuple[int, int, int] = (48, 96, 96)  # (Z, Y, X) voxels
    device: str = "auto"
    base_filters: Optional[int] = None  # None: the preset's network width
    overrides: Dict[str, str] = field(default_factory=dict)  # --set key=value
    cache_dir: Optional[Path] = None  # preprocessing cache; None: inside the exported dataset folder


def in_slicer_application() -> bool:
    """True inside the Slicer application (the PyPI slicer-core wheel has no ``slicer.app``)."""
    return hasattr(slicer, "app")


def python_executable() -> str:
    """The interpreter that has PLBOptCore: PythonSlicer in Slicer, the current one elsewhere."""
    if in_slicer_application():
        executable = shutil.which("PythonSlicer")
        if not executable:
            raise RuntimeError("PythonSlicer executable not found on PATH")
        return executable
    return sys.executable


def train_command(python: str, dataset_dir: Path, run_dir: Path, settings: TrainSettings,
                  resume: bool = False, init_from: Optional[Path] = None) -> List[str]:
    """``python -m PLBOptCore train`` arguments for ``settings``."""
    if settings.preset not in PRESETS:
        raise ValueError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
    command = [python, "-m", "PLBOptCore", "train", str(dataset_dir), "-o", str(run_dir),
               "--preset", settings.preset, "--iterations", str(int(settings.iterations)),
               "--patch-size", *[str(int(v)) for v in settings.patch_size], "--device", settings.device,
               "--quiet"]  # the panel draws progress from events.jsonl; a text progress bar would flood the log
    if settings.base_filters:
        command += ["--base-filters", str(int(settings.base_filters))]
    if resume:
        command.append("--resume")
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    if settings.cache_dir is not None:
        command += ["--cache-dir", str(settings.cache_dir)]
    if settings.overrides:
        command += ["--set", *[f"{key}={value}" for key, value in settings.overrides.items()]]
    return command


def refine_command(python: str, run_dir: Path, inputs: Path, out_dir: Path) -> List[str]:
    """``python -m PLBOptCore refine`` arguments: refined pseudo labels + confidence maps into ``out_dir``."""
    return [python, "-m", "PLBOptCore", "refine", str(run_dir), str(inputs), "-o", str(out_dir), "--quiet"]


class JobProcess:
    """A child process whose output lines are read without blocking the caller.

    ``cancel()`` asks politely first (SIGTERM: PLBOptCore checkpoints at the next step boundary and
    exits 130) and kills the process tree only if it has not exited after ``kill_after_seconds``.
    """

    def __init__(self, args: Sequence[str], cwd: Optional[Path] = None, kill_after_seconds: float = 120.0,
                 max_kept_lines: int = 5000):
        self.args = [str(a) for a in args]
        self.cwd = Path(cwd) if cwd else None
        self.kill_after_seconds = kill_after_seconds
        self.output: Deque[str] = collections.deque(maxlen=max_kept_lines)
        self._lines: "queue.Queue[str]" = queue.Queue()
        self._proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None
        self._cancel_time: Optional[float] = None

    def start(self) -> "JobProcess":
        # Unbuffered so progress lines arrive as they are printed, not when a buffer fills.
        environment = {"PYTHONUNBUFFERED": "1"}
        if in_slicer_application():
            launch = slicer.util.launchConsoleProcess
            if "blocking" in inspect.signature(launch).parameters:  # Slicer 5.12+: reads output itself
                self._proc = launch(self.args, updateEnvironment=environment, cwd=self._cwd(), blocking=False,
                                    logCallback=self._lines.put, completedCallback=lambda returncode: None)
                return self
            self._proc = launch(self.args, updateEnvironment=environment, cwd=self._cwd())
        else:
            self._proc = subprocess.Popen(self.args, cwd=self._cwd(), env={**os.environ, **environment},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          errors="replace")
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        return self

    def _cwd(self) -> Optional[str]:
        return str(self.cwd) if self.cwd else None

    def _read_output(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\r\n"))

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_time is not None

    def poll(self) -> List[str]:
        """New output lines since the last call; escalates a pending cancel to a kill when overdue."""
        if self._proc is not None and self._proc.poll() is not None and self._reader is not None:
            self._reader.join(timeout=5)  # the pipe closes right after exit: take the last lines too
        if self.running and self._cancel_time is not None \
                and time.monotonic() - self._cancel_time > self.kill_after_seconds:
            self.kill()
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                break
        self.output.extend(lines)
        return lines

    def cancel(self) -> None:
        """Request a graceful stop (SIGTERM on POSIX; on Windows terminate() ends the process at once)."""
        if self.running and self._cancel_time is None:
            self._cancel_time = time.monotonic()
            self._proc.terminate()

    def kill(self) -> None:
        """Stop the process and any children it started, immediately."""
        if not self.running:
            return
        try:
            import psutil  # bundled with Slicer; optional elsewhere

            for child in psutil.Process(self._proc.pid).children(recursive=True):
                child.kill()
        except (ImportError, OSError):
            pass  # no psutil or the child already exited: killing the main process is what matters
        self._proc.kill()

    def wait(self, timeout: Optional[float] = None, on_lines: Optional[Callable[[List[str]], None]] = None,
             interval: float = 0.2) -> int:
        """Block until exit (for the Python console and tests), polling output meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            lines = self.poll()
            if on_lines and lines:
                on_lines(lines)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.args[:4])}… still running after {timeout} s")
            time.sleep(interval)
        lines = self.poll()
        if on_lines and lines:
            on_lines(lines)
        return self._proc.returncode

    def failure_message(self) -> str:
        """Why the process failed, for an error dialog: its last non-empty output line."""
        for line in reversed(self.output):
            if line.strip():
                return line.strip()
        return f"exited with status {self.returncode}"
