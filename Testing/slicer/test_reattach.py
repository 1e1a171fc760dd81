"""A training that outlives Slicer is found again through its run folder and can be cancelled
(issue 21, item 6), with psutil not importable as in a stock Slicer. The trainer is a stand-in that behaves like PLBOptCore's towards the panel:
run lock, events.jsonl, stop file; started in a session of its own by "an earlier Slicer"."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import process_running, requires_proc
from PLBOptLib import WorkflowLogic, panel
from PLBOptLib.process import STOP_FILE_NAME

TRAINER = '''
import json, os, signal, socket, sys, time
from pathlib import Path
run_dir, watch_stop_file = Path(sys.argv[1]), sys.argv[2] == "loop"
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}))
events = open(run_dir / "events.jsonl", "a")
def record(**fields):
    events.write(json.dumps(fields) + "\\n"); events.flush()
def stop(status):
    record(type="end", step=3, status=status, message="")
    (run_dir / "train.lock").unlink()
    sys.exit(130)
if watch_stop_file:
    record(type="start", total_steps=100, start_step=0, preset="plbopt", device="cpu", time=time.time())
    record(type="train", step=3, loss=0.5, eta_seconds=60)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"checkpoint")
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # preparing data: reads no stop file, needs the kill
    record(type="preprocess", case="U0", index=1, total=4, seconds=0.1)
print("ready", flush=True)
while True:
    if watch_stop_file and (run_dir / "stop-requested").exists():
        stop("interrupted")
    time.sleep(0.05)
'''


def start_orphan_trainer(run_dir, mode):
    """A trainer started by an earlier Slicer session: its own session, no parent in this test's
    control once started (its output goes nowhere)."""
    process = subprocess.Popen([sys.executable, "-c", TRAINER, str(run_dir), mode], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    assert process.stdout.readline().strip() == "ready"
    return process


@pytest.fixture
def orphans():
    started = []
    yield started
    for process in started:  # only what this test started, by its own handle
        if process.poll() is None:
            process.kill()
        process.wait()


@requires_proc
def test_a_reopened_panel_finds_a_running_training_follows_it_and_cancels_it(scene, tmp_path, orphans, without_psutil):
    work = tmp_path / "work"
    finished = work / "runs" / "run-001"
    finished.mkdir(parents=True)
    (finished / "events.jsonl").write_text(json.dumps({"type": "end", "step": 10, "status": "completed"}) + "\n")
    running = work / "runs" / "run-002"
    trainer = start_orphan_trainer(running, "loop")
    orphans.append(trainer)

    logic = WorkflowLogic(scene, working_dir=work, log_callback=lambda line: None)  # Slicer reopened
    assert logic.running_trainings() == [running]
    assert panel.training_to_reattach(logic, current_job=None) == running
    job = logic.reattach_training(running)
    assert (job.progress.status, job.progress.step, job.progress.total_steps) == ("running", 3, 100)
    assert job.process.running and panel.exit_question(job) is not None

    job.cancel()  # the Cancel button
    assert (running / STOP_FILE_NAME).exists() and panel.exit_question(job) is None
    progress = job.wait(timeout=20)
    assert progress.status == "interrupted"
    assert trainer.wait(timeout=5) == 130 and not process_running(trainer.pid)
    kind, message = panel.training_finished_message(job)
    assert kind == "info" and "checkpoint kept for Resume" in message
    assert logic.running_trainings() == []


@requires_proc
def test_cancel_of_a_reattached_trainer_that_reads_no_stop_file_kills_its_process_group(scene, tmp_path, orphans, without_psutil):
    running = tmp_path / "runs" / "run-001"
    trainer = start_orphan_trainer(running, "preparing")
    orphans.append(trainer)
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    job = logic.reattach_training(running)
    assert job.progress.status == "waiting" and job.progress.preparing.startswith("Preparing data: case 1/4")
    job.process.kill_after_seconds = 1.0
    job.cancel()  # SIGTERM to the group, which this trainer ignores; killed a second later
    progress = job.wait(timeout=20)
    assert progress.status == "interrupted"
    assert trainer.wait(timeout=5) == -9


def test_dead_foreign_and_reused_locks_are_no_running_training(scene, tmp_path, without_psutil):
    runs = tmp_path / "runs"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    locks = {
        "run-001": {"pid": int(finished.stdout), "host": socket.gethostname(), "time": time.time()},  # killed trainer
        "run-002": {"pid": 1, "host": "another-host", "time": time.time()},  # not signallable from here
        "run-003": {"pid": 1, "host": socket.gethostname(), "time": 0.0},  # PID now held by a process started later
        "run-004": "not a lock",
    }
    for name, holder in locks.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "train.lock").write_text(json.dumps(holder) if isinstance(holder, dict) else holder)
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    assert logic.running_trainings() == []
    assert panel.training_to_reattach(logic, current_job=None) is None


def test_nothing_is_asked_at_exit_without_a_running_training():
    assert panel.exit_question(None) is None
