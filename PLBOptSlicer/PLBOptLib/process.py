"""Run PLBOptCore's CLI in a separate process so Slicer stays responsive.

The process's output lines are collected on a background thread and handed out by
:meth:`JobProcess.poll`, which the panel calls from a QTimer on the main thread. Nothing here
touches the MRML scene.

Every job runs in a process group of its own (a new session on POSIX, a new process group on
Windows), so Cancel reaches the launcher, the real interpreter below it and its workers without
psutil, which a stock Slicer 5.6-5.12 does not ship. ``slicer.util.launchConsoleProcess`` is not
used for jobs: it offers no way to start a process in its own group.
"""

from __future__ import annotations

import collections
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

PRESETS = ("supervised", "dhc", "plbopt", "plbopt-paper", "refine-only", "triplet-only", "mc-only")
DEVICES = ("auto", "cpu", "cuda")
EXIT_USER_ERROR = 2  # PLBOptCore printed one line saying what is wrong
EXIT_INTERRUPTED = 130  # cancelled; a resumable checkpoint was written
# PLBOptCore.engine.runcontrol.STOP_FILE_NAME (PLBOptLib never imports PLBOptCore; a test keeps them equal).
STOP_FILE_NAME = "stop-requested"
# Windows process creation flags (subprocess defines the names only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


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


def job_popen_options(windows: bool = os.name == "nt") -> Dict[str, object]:
    """``subprocess.Popen`` options for a job: its own process group (POSIX: a new session, whose
    id is the child's PID; Windows: a new process group), and no console window on Windows."""
    if windows:
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def hidden_console_options(windows: bool = os.name == "nt") -> Dict[str, object]:
    """``subprocess`` options for a short helper process: no console window flashing up on Windows."""
    return {"creationflags": CREATE_NO_WINDOW} if windows else {}


def process_group_alive(group_id: int) -> bool:
    """Whether any process other than a zombie is left in POSIX process group ``group_id``.

    On Linux the processes are read from /proc, so a zombie whose new parent never reaps it (PID 1
    of some containers) does not keep a job running forever; elsewhere a null signal asks the group.
    """
    if os.path.isfile("/proc/self/stat"):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "stat"), "rb") as stream:
                    stat = stream.read().decode("ascii", "replace")
            except OSError:  # ended meanwhile
                continue
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 2 and int(fields[2]) == group_id and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(group_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member exists that we may not signal
        return True
    return True


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
    """``python -m PLBOptCore refine`` arguments: refined pseudo labels + confidence maps into ``out_dir``
    (the module's own folder per run: a new prediction of the same run replaces the last one)."""
    return [python, "-m", "PLBOptCore", "refine", str(run_dir), str(inputs), "-o", str(out_dir), "--overwrite",
            "--quiet"]


class _StopFileCancel:
    """``cancel()`` of :class:`JobProcess` and :class:`AttachedProcess`: the stop file when the
    trainer can read it, else SIGTERM to the job's process group (Windows: :meth:`kill`). The
    class using it has ``running``, ``_cancel_time``, ``stop_file``, ``kill()`` and ``_signal_group()``."""

    def cancel(self, graceful: bool = True) -> None:
        """Ask the job to stop (see the class description); whatever still runs
        ``kill_after_seconds`` later is killed by :meth:`poll`."""
        if not self.running or self._cancel_time is not None:
            return
        self._cancel_time = time.monotonic()
        if graceful and self.stop_file is not None and self.stop_file.parent.is_dir():
            self.stop_file.write_text("cancel requested by the PLBOpt module\n")
            return
        if os.name == "nt":
            self.kill()  # no SIGTERM on Windows
        else:
            self._signal_group(signal.SIGTERM)


class JobProcess(_StopFileCancel):
    """A child process whose output lines are read without blocking the caller.

    In Slicer the child is ``PythonSlicer``: a launcher that starts the real interpreter as *its*
    child and forwards no signal. The job is therefore started in a process group of its own
    (:func:`job_popen_options`) and stopped as a group:

    - ``cancel()`` with a ``stop_file`` whose folder exists (a trainer in its loop) creates the
      file: the trainer stops at its next step with a resumable checkpoint, the launcher relays
      its exit status (130). No signal is sent, so the launcher lives on to do that.
    - ``cancel(graceful=False)``, or without a stop file (a prediction, a trainer still preparing
      its data): the whole group is terminated now (POSIX: SIGTERM to the group, which a trainer
      in its loop handles like the stop file; Windows: ``taskkill /T /F``).
    - Whatever of the group still runs ``kill_after_seconds`` later is killed (see :meth:`poll`).

    The job counts as finished only when its output has been read to the end and no process of
    the group is left, so the last lines (often the error message) are never lost.
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
        self._group_gone = False  # once seen empty, the group is not asked again
        self._cancel_time: Optional[float] = None
        self._killed = False

    def start(self) -> "JobProcess":
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)  # a request left by an earlier job is not for this one
        self._proc = subprocess.Popen(self.args, cwd=str(self.cwd) if self.cwd else None, env=self.environment,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, errors="replace", **job_popen_options())
        threading.Thread(target=self._read_output, daemon=True).start()
        return self

    def _read_output(self) -> None:
        # The pipe ends when every process holding it has exited: the launcher and the interpreter below it.
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._exit_code = self._proc.wait()

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> Optional[int]:
        """Exit status, once the output is read to the end and no process of the group is left."""
        return self._exit_code if self._exit_code is not None and not self._group_alive() else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self.returncode is None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_time is not None

    def _group_alive(self) -> bool:
        """Whether a process of the job's group still runs (a worker that closed its output, say).
        On Windows the end of the output, which every process of the tree holds, stands for it."""
        if self._group_gone or os.name == "nt":
            return False
        self._group_gone = not process_group_alive(self._proc.pid)
        return not self._group_gone

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._proc.pid, signum)  # the session leader's PID is the group id
        except ProcessLookupError:  # the group has ended
            pass

    def _kill_windows_tree(self) -> None:
        """``taskkill /T /F``: the launcher and everything it started (the launcher waits for its
        child, so the tree is still linked through it)."""
        subprocess.run(["taskkill", "/PID", str(self._proc.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, **hidden_console_options())
        if self._proc.poll() is None:
            self._proc.kill()

    def poll(self) -> List[str]:
        """New output lines since the last call; escalates a pending cancel to a kill when overdue."""
        if self._cancel_time is not None and not self._killed and self.running \
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

    def kill(self) -> None:
        """End the child and every process of its group, immediately."""
        if self._proc is None:
            return
        self._killed = True
        if os.name == "nt":
            self._kill_windows_tree()
        else:
            self._signal_group(signal.SIGKILL)

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


def process_alive(pid: int, since: Optional[float] = None) -> bool:
    """Whether ``pid`` runs on this host (a zombie does not count) and, where the start time can
    be read (Linux /proc, or psutil), was started no later than ``since`` (a Unix time): a PID
    reused by another program since then is not the process that wrote ``since``."""
    try:
        import psutil  # not shipped with Slicer 5.6-5.12; used when present
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            process = psutil.Process(pid)
            return process.status() != psutil.STATUS_ZOMBIE and (since is None or process.create_time() <= since + 1.0)
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True
    if os.name == "nt":
        return _windows_process_alive(pid)
    if os.path.isfile("/proc/self/stat"):
        try:
            with open(f"/proc/{int(pid)}/stat", "rb") as stream:
                stat = stream.read().decode("ascii", "replace")
        except OSError:
            return False
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            return False
        return since is None or _linux_start_time(int(fields[19])) <= since + 1.0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _linux_start_time(start_ticks: int) -> float:
    """Unix time of a process start given in clock ticks after boot (/proc/PID/stat field 22)."""
    with open("/proc/stat") as stream:
        boot = next(float(line.split()[1]) for line in stream if line.startswith("btime "))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def _windows_process_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, int(pid))  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


EXIT_UNKNOWN = -1  # an attached job's exit status is not known: it was not started by this session


class AttachedProcess(_StopFileCancel):
    """A trainer started by an earlier Slicer session (Slicer was closed while it ran), found
    through its run folder's lock, which names the trainer's PID. It has the interface of
    :class:`JobProcess` that :class:`PLBOptLib.logic.TrainingJob` uses. Its output went to the
    earlier session; its progress comes from ``events.jsonl``.

    ``cancel()`` creates the stop file (a trainer in its loop stops with a checkpoint), or with
    ``graceful=False`` terminates the trainer's process group (POSIX) or tree (Windows ``taskkill``);
    whatever still runs ``kill_after_seconds`` later is killed by :meth:`poll`.
    """

    def __init__(self, pid: int, stop_file: Optional[Path] = None, kill_after_seconds: float = 120.0,
                 started: Optional[float] = None):
        self._pid = int(pid)
        self._started = started
        self.args = [f"trainer (pid {self._pid}) started by an earlier Slicer session"]
        self.stop_file = Path(stop_file) if stop_file else None
        self.kill_after_seconds = kill_after_seconds
        self.output: Deque[str] = collections.deque(maxlen=100)
        self._exit_code: Optional[int] = None
        self._cancel_time: Optional[float] = None
        self._killed = False
        try:
            self._group = os.getpgid(self._pid) if os.name != "nt" else None  # the launcher's group
        except ProcessLookupError:
            self._group = None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> Optional[int]:
        """Set by :meth:`poll` once the trainer is gone (so events read after it are complete)."""
        return self._exit_code

    @property
    def running(self) -> bool:
        return self._exit_code is None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_time is not None

    def poll(self) -> List[str]:
        if self._exit_code is None and not process_alive(self._pid, self._started):
            self._exit_code = EXIT_INTERRUPTED if self.cancel_requested else EXIT_UNKNOWN
        if self._cancel_time is not None and not self._killed and self.running \
                and time.monotonic() - self._cancel_time > self.kill_after_seconds:
            self.kill()
        return []

    def _signal_group(self, signum: int) -> None:
        try:
            if self._group is not None and self._group != os.getpgid(0):
                os.killpg(self._group, signum)
            else:
                os.kill(self._pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self._killed = True
        if os.name == "nt":
            subprocess.run(["taskkill", "/PID", str(self._pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, **hidden_console_options())
        else:
            self._signal_group(signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> Optional[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.args[0]}: still running after {timeout} s")
            time.sleep(interval)
        return self.returncode

    def failure_message(self) -> str:
        return f"the trainer (pid {self._pid}) ended without reporting how; see its run folder's events.jsonl"

