"""Who trains a run folder, and how to ask it to stop.

- ``train.lock``: one trainer per run folder. The trainer creates it atomically (PID, host, time)
  before it changes anything in the folder and removes it when it ends. A second ``plbopt train``
  or ``--resume`` on a live run is refused with a :class:`ConfigError` naming the folder (CLI:
  exit 2) and writes nothing. A lock left by a process that no longer runs on this host (killed,
  crashed, power loss) is taken over, with or without psutil (Windows: ``OpenProcess`` through
  ctypes). A lock from another host is never taken over: its process
  cannot be checked from here, so the message says which file to delete once that run is gone.
- ``stop-requested``: any program (the Slicer module's Cancel) may create this file; the trainer
  looks for it at every step boundary and stops there with a resumable checkpoint, as on SIGTERM.
  Unlike a signal it reaches the trainer through launchers that forward no signals, and it gives
  Windows, which has no SIGTERM, the same clean stop. The trainer removes it when it ends.
"""

from __future__ import annotations

import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Dict, Optional, Set

from ..errors import ConfigError

RUN_LOCK_NAME = "train.lock"
STOP_FILE_NAME = "stop-requested"

# Locks held by this process (resolved paths): a lock carrying our own PID is live only if listed.
_HELD_HERE: Set[str] = set()


def stop_file(run_dir: Path) -> Path:
    return Path(run_dir) / STOP_FILE_NAME


def request_stop(run_dir: Path) -> Path:
    """Ask the trainer of ``run_dir`` to stop at its next step boundary; returns the stop file."""
    path = stop_file(run_dir)
    path.write_text(f"stop requested by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return path


def stop_requested(run_dir: Path) -> bool:
    return stop_file(run_dir).exists()


def read_lock(path: Path) -> Optional[Dict[str, object]]:
    """The lock's ``{"pid", "host", "time"}``, or None when it is gone or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# Windows API values used by _windows_process_alive.
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_ERROR_ACCESS_DENIED = 5
_ERROR_INVALID_PARAMETER = 87  # what OpenProcess reports for a PID no process has
_STILL_ACTIVE = 259
_FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns units since 1601-01-01


def _windows_process_alive(pid: int, since: float, kernel32=None, get_last_error=None) -> bool:
    """Whether ``pid`` runs on this Windows host and existed when the lock was written at ``since``
    (through kernel32 with ctypes, so Slicer's Python, which has no psutil, can take a stale lock
    over). ``kernel32``/``get_last_error`` replace the real ones in tests."""
    import ctypes
    from ctypes import wintypes

    if kernel32 is None:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        get_last_error = ctypes.get_last_error
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, int(pid))
    if not handle:
        # Access denied: a process of another user holds the PID; it cannot be judged, so it lives.
        return get_last_error() != _ERROR_INVALID_PARAMETER
    try:
        exit_code = wintypes.DWORD()
        if kernel32.GetExitCodeProcess(handle, ctypes.byref(exit_code)) and exit_code.value != _STILL_ACTIVE:
            return False  # ended; only an open handle somewhere keeps its record
        created, exited, kernel, user = (wintypes.FILETIME() for _ in range(4))
        if kernel32.GetProcessTimes(handle, ctypes.byref(created), ctypes.byref(exited), ctypes.byref(kernel),
                                    ctypes.byref(user)):
            ticks = (created.dwHighDateTime << 32) | created.dwLowDateTime
            # A process created after the lock was written is another program that reuses the PID.
            return (ticks - _FILETIME_UNIX_EPOCH) / 1e7 <= since + 1.0
        return True
    finally:
        kernel32.CloseHandle(handle)


def _process_alive(pid: int, since: float) -> bool:
    """Whether ``pid`` is a process on this host that existed when the lock was written at ``since``."""
    try:
        import psutil  # with it PID reuse is detected on every system; Slicer 5.6-5.12 do not ship it
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            # A process created after the lock was written is another program that reuses the PID.
            return psutil.Process(pid).create_time() <= since + 1.0
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True  # exists but cannot be inspected: assume it is the trainer
    if os.name == "nt":
        return _windows_process_alive(pid, since)  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_alive(holder: Dict[str, object], lock: Path) -> bool:
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    if pid == os.getpid():
        return str(lock.resolve()) in _HELD_HERE
    return _process_alive(pid, float(holder.get("time", 0.0)))


class RunLock:
    """The ``train.lock`` of one run folder; ``acquire()`` it before writing into the folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_LOCK_NAME
        self.took_over: Optional[Dict[str, object]] = None  # the dead holder's record, when taken over
        self._created_dir = False
        self._held = False
        self._finalizer: Optional[weakref.finalize] = None

    def acquire(self) -> "RunLock":
        """Create the lock or raise :class:`ConfigError` naming the run folder and the live holder."""
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self._created_dir = True
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
        temporary = self.run_dir / f".tmp-lock-{os.getpid()}"
        temporary.write_text(record)
        try:
            for _attempt in range(2):
                try:
                    os.link(temporary, self.path)  # atomic "create with this content unless it exists"
                    break
                except FileExistsError:
                    holder = read_lock(self.path)
                    if holder is None and self.path.exists():
                        holder = {"pid": "?", "host": "?"}  # unreadable: never remove what we cannot judge
                    if holder is not None and _holder_alive(holder, self.path):
                        self._undo_dir()
                        raise ConfigError(
                            f"{self.run_dir}: another trainer is using this run folder (pid {holder.get('pid')} on "
                            f"{holder.get('host')}); wait for it or cancel it; if it is gone, delete {self.path}")
                    self.took_over = holder
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
            else:
                raise ConfigError(f"{self.run_dir}: could not take over the lock {self.path}; try again")
        finally:
            temporary.unlink()
        if self.took_over is not None:
            # The dead trainer cannot have served a stop request it left behind.
            stop_file(self.run_dir).unlink(missing_ok=True)
        self._held = True
        _HELD_HERE.add(str(self.path.resolve()))
        self._finalizer = weakref.finalize(self, _release_path, self.path)
        return self

    def _undo_dir(self) -> None:
        if self._created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock (and a stop request it has served); a no-op when not held."""
        if not self._held:
            return
        self._held = False
        if self._finalizer is not None:
            self._finalizer.detach()
        _release_path(self.path)
        if self._created_dir and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # refused before anything was written: leave no empty folder behind


def _release_path(path: Path) -> None:
    _HELD_HERE.discard(str(path.resolve()))
    stop_file(path.parent).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
