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
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import slicer

try:
    import psutil  # bundled with Slicer (and in the test extra)
except ImportError:  # without it only the direct child can be signalled: a launcher's child would survive
    psutil = None

PRESETS = ("supervised", "dhc", "plbopt", "plbopt-paper", "refine-only", "triplet-only", "mc-only")
DEVICES = ("auto", "cpu", "cuda")
EXIT_USER_ERROR = 2  # PLBOptCore printed one line saying what is wrong
EXIT_INTERRUPTED = 130  # cancelled; a resumable checkpoint was written
# PLBOptCore.engine.runcontrol.STOP_FILE_NAME (PLBOptLib never imports PLBOptCore; a test keeps them equal).
STOP_FILE_NAME = "stop-requested"


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

    In Slicer the child is ``PythonSlicer``: a launcher that starts the real interpreter as *its*
    child and forwards no signal. So ``cancel()`` never signals the launcher alone; it

    1. creates ``stop_file`` when given (the trainer stops at its next step boundary with a
       resumable checkpoint; this is also the clean stop on Windows, which has no SIGTERM);
    2. on POSIX sends SIGTERM to every process of the tree below the launcher (the trainer handles
       it like the stop file; a prediction simply ends), or to the child itself when it has none;
    3. kills the whole tree if it has not ended ``kill_after_seconds`` later (see :meth:`poll`).

    The job counts as finished only when its output has been read to the end and every process
    of the tree is gone, so the last lines (often the error message) are never lost.
    """

    def __init__(self, args: Sequence[str], cwd: Optional[Path] = None, environment: Optional[Mapping[str, str]] = None,
                 stop_file: Optional[Path] = None, kill_after_seconds: float = 120.0, max_kept_lines: int = 5000):
        self.args = [str(a) for a in args]
        self.cwd = Path(cwd) if cwd else None
        self.environment = dict(environment) if environment is not None else {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.stop_file = Path(stop_file) if stop_file else None
        self.kill_after_seconds = kill_after_seconds
        self.output: Deque[str] = collections.deque(maxlen=max_kept_lines)
        self._lines: "queue.Queue[str]" = queue.Queue()
        self._proc: Optional[subprocess.Popen] = None
        self._exit_code: Optional[int] = None  # set once the output is drained and the child has exited
        self._tree: List = []  # psutil.Process of every descendant seen when cancelling
        self._cancel_time: Optional[float] = None

    def start(self) -> "JobProcess":
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)  # a request left by an earlier job is not for this one
        if in_slicer_application():
            launch = slicer.util.launchConsoleProcess
            if "blocking" in inspect.signature(launch).parameters:
                # Slicer 5.12+: it reads the output itself; completedCallback comes after the last line.
                self._proc = launch(self.args, updateEnvironment=self.environment, cwd=self._cwd(), blocking=False,
                                    logCallback=self._lines.put, completedCallback=self._completed)
                return self
            self._proc = launch(self.args, updateEnvironment=self.environment, cwd=self._cwd())
        else:
            self._proc = subprocess.Popen(self.args, cwd=self._cwd(), env=self.environment, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, errors="replace")
        threading.Thread(target=self._read_output, daemon=True).start()
        return self

    def _cwd(self) -> Optional[str]:
        return str(self.cwd) if self.cwd else None

    def _read_output(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._completed(self._proc.wait())

    def _completed(self, returncode: int) -> None:
        self._exit_code = returncode

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> Optional[int]:
        """Exit status, once the output is read to the end and no process of the tree is left."""
        return self._exit_code if self._exit_code is not None and not self._tree_alive() else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self.returncode is None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_time is not None

    def _tree_alive(self) -> bool:
        return bool(self._live_tree())

    def _live_tree(self) -> List:
        alive = []
        for process in self._tree:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.Error:  # ended meanwhile
                continue
        return alive

    def _collect_tree(self) -> List:
        """The child's descendants now (PythonSlicer's real interpreter, its workers), remembered
        so the job is not over while one of them lives; empty without psutil."""
        if psutil is None:
            return []
        try:
            found = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.Error:
            found = []
        known = {process.pid for process in self._tree}
        self._tree += [process for process in found if process.pid not in known]
        return self._live_tree()

    def poll(self) -> List[str]:
        """New output lines since the last call; escalates a pending cancel to a kill when overdue."""
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
        """Ask the job to stop: stop file, SIGTERM to the tree below the launcher (POSIX), and a
        kill of the whole tree if it is still running ``kill_after_seconds`` later."""
        if not self.running or self._cancel_time is not None:
            return
        self._cancel_time = time.monotonic()
        # No run folder yet: the trainer has not started, so there is nothing to save either.
        stop_file_written = self.stop_file is not None and self.stop_file.parent.is_dir()
        if stop_file_written:
            self.stop_file.write_text("cancel requested by the PLBOpt module\n")
        if os.name == "nt":
            if not stop_file_written:
                self.kill()  # no SIGTERM on Windows, and nothing to save: end it now
            return
        descendants = self._collect_tree()
        if not descendants:
            self._proc.send_signal(signal.SIGTERM)  # a plain interpreter: no launcher in between
        for process in descendants:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:  # ended meanwhile
                continue

    def kill(self) -> None:
        """End the child and every process below it, immediately."""
        for process in self._collect_tree():
            try:
                process.kill()
            except psutil.Error:  # already gone
                continue
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def wait(self, timeout: Optional[float] = None, on_lines: Optional[Callable[[List[str]], None]] = None,
             interval: float = 0.2) -> int:
        """Block until the job is over (for the Python console and tests), polling output meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            lines = self.poll()
            if on_lines and lines:
                on_lines(lines)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.args[:4])}… still running after {timeout} s")
            if in_slicer_application():
                slicer.app.processEvents()  # Slicer 5.12 hands output and completion over on the Qt event loop
            time.sleep(interval)
        lines = self.poll()
        if on_lines and lines:
            on_lines(lines)
        return self.returncode

    def failure_message(self) -> str:
        """Why the process failed, for an error dialog: its last non-empty output line."""
        for line in reversed(self.output):
            if line.strip():
                return line.strip()
        return f"exited with status {self.returncode}"
