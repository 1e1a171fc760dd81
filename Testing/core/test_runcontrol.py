"""One trainer per run folder (``train.lock``) and the stop file, for the API and the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from PLBOptCore.config import make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.checkpoint import load_checkpoint
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine import runcontrol
from PLBOptCore.engine.runcontrol import RUN_LOCK_NAME, STOP_FILE_NAME, RunLock, read_lock, request_stop
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import ConfigError, TrainingInterrupted

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=2, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("lock"), n_labeled=2, n_unlabeled=0, n_test=0,
                                n_validation=0, shape=(16, 32, 32), seed=5)


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    torch.set_num_threads(1)
    Trainer(make_config("supervised", overrides=TINY), load_dataset(dataset), run).fit()
    return run


@pytest.fixture
def live_holder():
    """A process that stays alive; its PID goes into lock files standing for a running trainer."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def write_lock(run: Path, pid: int, host: str = None) -> None:
    """A lock file as a trainer with ``pid`` on ``host`` (default: this host) writes it."""
    (run / RUN_LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "time": time.time()}))


def snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def plbopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "PLBOptCore", *args, "-q"], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=300)


def test_second_trainer_on_a_live_run_exits_2_and_writes_nothing(dataset, trained_run, live_holder):
    write_lock(trained_run, live_holder.pid)
    before = snapshot(trained_run)
    for extra in (["--resume", "--iterations", "3"], []):
        result = plbopt("train", str(dataset), "-o", str(trained_run), "--preset", "supervised", *extra)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(trained_run) in lines[0], lines
        assert f"pid {live_holder.pid}" in lines[0] and "another trainer" in lines[0]
        assert snapshot(trained_run) == before
    (trained_run / RUN_LOCK_NAME).unlink()


def test_stale_lock_of_a_dead_process_is_taken_over(dataset, trained_run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(trained_run, dead.pid)
    (trained_run / STOP_FILE_NAME).write_text("left by the dead trainer")
    result = plbopt("train", str(dataset), "-o", str(trained_run), "--resume", "--iterations", "3")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(trained_run / "checkpoints" / "last.pt")["step"] == 3  # not stopped by the old request
    assert not (trained_run / RUN_LOCK_NAME).exists() and not (trained_run / STOP_FILE_NAME).exists()


def test_lock_from_another_host_is_respected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_lock(run, 1, host="some-other-host")
    with pytest.raises(ConfigError, match=r"another trainer .*pid 1 on some-other-host.*delete"):
        RunLock(run).acquire()


def test_lock_is_held_while_training_and_per_process(dataset, tmp_path):
    run = tmp_path / "run"
    seen = []

    def progress(record: dict) -> None:
        seen.append(read_lock(run / RUN_LOCK_NAME))
        with pytest.raises(ConfigError, match="another trainer"):
            RunLock(run).acquire()  # a second trainer in the same process is refused too

    Trainer(make_config("supervised", overrides=TINY), load_dataset(dataset), run, progress=progress).fit()
    assert seen and all(holder["pid"] == os.getpid() for holder in seen)
    assert not (run / RUN_LOCK_NAME).exists()


def test_refused_resume_of_a_missing_run_leaves_no_folder(dataset, tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        Trainer(make_config("supervised", overrides=TINY), load_dataset(dataset), tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing").exists()


def test_stop_file_stops_at_a_step_boundary_with_a_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"

    def progress(record: dict) -> None:
        if record.get("step") == 2:  # preprocess records come first and carry no step
            request_stop(run)

    trainer = Trainer(make_config("supervised", overrides=dict(TINY, iterations=50, checkpoint_every=100)),
                      load_dataset(dataset), run, progress=progress)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        trainer.fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert read_events(run)[-1]["status"] == "interrupted"
    assert not (run / STOP_FILE_NAME).exists() and not (run / RUN_LOCK_NAME).exists()


class FakeKernel32:
    """kernel32 as ``runcontrol._windows_process_alive`` calls it, over a table of processes
    ``{pid: (exit_code, created_unix_time)}``; ``denied``: PIDs of other users' processes."""

    def __init__(self, processes: Dict[int, Tuple[int, float]], denied=()):
        self.processes, self.denied = processes, set(denied)
        self.last_error = 0
        self.open_handles = set()

    def OpenProcess(self, access, inherit, pid):
        if pid in self.denied:
            self.last_error = 5  # ERROR_ACCESS_DENIED
            return None
        if pid not in self.processes:
            self.last_error = 87  # ERROR_INVALID_PARAMETER: no process has this PID
            return None
        self.open_handles.add(pid + 1000)
        return pid + 1000

    def GetExitCodeProcess(self, handle, exit_code):
        exit_code._obj.value = self.processes[handle - 1000][0]
        return 1

    def GetProcessTimes(self, handle, created, exited, kernel, user):
        ticks = int(self.processes[handle - 1000][1] * 10_000_000) + 116444736000000000
        created._obj.dwLowDateTime, created._obj.dwHighDateTime = ticks & 0xFFFFFFFF, ticks >> 32
        return 1

    def CloseHandle(self, handle):
        self.open_handles.remove(handle)
        return 1


STILL_ACTIVE = 259


def windows_alive(kernel32: FakeKernel32):
    """The liveness check of Windows, asking ``kernel32``."""
    check = runcontrol._windows_process_alive
    return lambda pid, since: check(pid, since, kernel32, lambda: kernel32.last_error)


def test_windows_liveness_check_without_psutil():
    lock_time = time.time()
    kernel32 = FakeKernel32({10: (STILL_ACTIVE, lock_time - 60), 11: (0, lock_time - 60),
                             12: (STILL_ACTIVE, lock_time + 30)}, denied={13})
    alive = windows_alive(kernel32)
    assert alive(10, lock_time)  # the trainer that wrote the lock
    assert not alive(11, lock_time)  # ended (a handle somewhere keeps its record)
    assert not alive(12, lock_time)  # a program started after the lock reuses the PID
    assert alive(13, lock_time)  # another user's process cannot be judged: never taken over
    assert not alive(14, lock_time)  # no such process
    assert not kernel32.open_handles


class WindowsOs:
    """``os`` as ``runcontrol`` sees it on Windows (only ``name`` differs)."""

    name = "nt"

    def __getattr__(self, attribute):
        return getattr(os, attribute)


@pytest.mark.parametrize("running", [False, True])
def test_stale_lock_on_windows_without_psutil_is_taken_over_and_a_live_one_is_not(tmp_path, monkeypatch, running):
    """Slicer's Python has no psutil: on Windows the lock of a dead trainer was never taken over."""
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(runcontrol, "os", WindowsOs())
    lock_time = time.time()
    trainer_pid = 4242
    processes = {trainer_pid: (STILL_ACTIVE, lock_time - 5)} if running else {}
    monkeypatch.setattr(runcontrol, "_windows_process_alive", windows_alive(FakeKernel32(processes)), raising=False)
    run = tmp_path / "run"
    run.mkdir()
    write_lock(run, trainer_pid)
    if running:
        with pytest.raises(ConfigError, match=f"another trainer .*pid {trainer_pid}"):
            RunLock(run).acquire()
    else:
        lock = RunLock(run).acquire()
        assert lock.took_over["pid"] == trainer_pid and read_lock(run / RUN_LOCK_NAME)["pid"] == os.getpid()
        lock.release()
