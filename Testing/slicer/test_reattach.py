"""A training that outlives Slicer is found again through its run folder and can be cancelled
(issue 21, item 6), with psutil not importable as in a stock Slicer. The trainer is a stand-in that behaves like PLBOptCore's towards the panel:
run lock, events.jsonl, stop file; started in a session of its own by "an earlier Slicer".
The review of the earlier session comes back too: from the saved scene, or offered from the
prediction files when only the volumes were loaded again."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import slicer
from conftest import process_running, requires_proc, save_and_reopen
from headless_slicer import create_headless_scene
from PLBOptLib import Status, WorkflowLogic, panel
from PLBOptLib.process import STOP_FILE_NAME
from test_plboptlib import add_phantom, write_fake_run

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


SMALL_DOUBT = (slice(5, 7), slice(10, 12), slice(8, 10))  # U1: a small uncertain region
LARGE_DOUBT = (slice(3, 9), slice(6, 14), slice(4, 12))  # U2: a large one, so U2 ranks first


def predicted_session(scene, work):
    """An earlier Slicer session: a labeled case and U1, U2 exported, trained (run-001) and
    predicted; returns {case: (uncertainty, least confident RAS)} as that session showed them."""
    add_phantom(scene, "labeled", seed=0)
    first, _, label_1 = add_phantom(scene, "U1", seed=1, labeled=False)
    second, _, label_2 = add_phantom(scene, "U2", seed=2, labeled=False)
    logic = WorkflowLogic(scene, working_dir=work, log_callback=lambda line: None)
    logic.export_dataset()
    run_dir, out_dir, _ = write_fake_run(work, {"U1": (first, label_1, SMALL_DOUBT), "U2": (second, label_2, LARGE_DOUBT)})
    (run_dir / "checkpoints" / "last.pt").write_text("weights")
    shown = {item.case_name: (item.prediction.uncertainty, item.prediction.least_confident_ras)
             for item in logic.load_predictions(run_dir, out_dir)}
    return logic, shown


def never_asked(question):
    pytest.fail(f"nothing should be asked: {question}")


def segmentation_ids(scene):
    return sorted(scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode").GetID()
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")))


@requires_proc
def test_a_reopened_slicer_follows_the_training_and_gets_the_review_of_its_saved_scene_back(
        scene, tmp_path, orphans, without_psutil):
    work = tmp_path / "work"
    earlier, shown = predicted_session(scene, work)
    # The clinician was correcting U1 (one voxel added to the liver), then pressed Retrain (run-002)
    # and closed Slicer after saving the scene; the training kept running.
    edited = earlier.begin_correction("U1")
    volume = edited.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    liver = edited.GetSegmentation().GetSegmentIdBySegmentName("liver")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(edited, liver, volume)
    corner = tuple(int(v) for v in np.argwhere(mask == 0)[0])
    mask[corner] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, edited, liver, volume)
    retraining = work / "runs" / "run-002"
    orphans.append(start_orphan_trainer(retraining, "loop"))
    reopened = save_and_reopen(scene, tmp_path / "saved-scene")

    logic = WorkflowLogic(reopened, working_dir=work, log_callback=lambda line: None)  # module entered
    assert logic.review_items == {} and panel.training_to_reattach(logic, current_job=None) == retraining
    job = logic.reattach_training(retraining)
    nodes_before = segmentation_ids(reopened)
    restored = panel.restore_review(logic, confirm=never_asked, declined=set())

    assert [item.case_name for item in restored] == ["U2", "U1"]  # most uncertain first, as shown before
    for item in restored:
        assert item.prediction.uncertainty == shown[item.case_name][0]
        assert item.prediction.least_confident_ras == shown[item.case_name][1]
        assert item.prediction.confidence is not None  # the overlay of the saved scene is used again
    assert [(row.case_name, row.cells[3]) for row in panel.case_rows(logic)][:2] == [
        ("U2", f"{shown['U2'][0]:.3f}"), ("U1", f"{shown['U1'][0]:.3f}")]
    assert logic.jump_to_least_confident("U2") == shown["U2"][1]
    # Nothing was reloaded: the same nodes, and the correction in progress is intact.
    assert segmentation_ids(reopened) == nodes_before
    u1 = next(case for case in logic.cases() if case.name == "U1")
    assert u1.status == Status.CORRECTED
    # (compared on the reopened volume's grid: the NRRD round trip stores a left-handed grid with K reversed)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(u1.segmentation, liver, u1.volume),
                                  slicer.util.arrayFromSegmentBinaryLabelmap(edited, liver, u1.volume))
    assert panel.restore_review(logic, confirm=never_asked, declined=set()) == []  # entering again changes nothing

    job.cancel()
    assert job.wait(timeout=20).status == "interrupted"


def test_predictions_on_disk_are_offered_for_volumes_loaded_again_and_a_declined_offer_is_not_repeated(scene, tmp_path):
    work = tmp_path / "work"
    _, shown = predicted_session(scene, work)  # then Slicer was closed without saving the scene
    fresh = create_headless_scene()  # Slicer reopened, the same volumes loaded again
    add_phantom(fresh, "labeled", seed=0)
    add_phantom(fresh, "U1", seed=1, labeled=False)
    add_phantom(fresh, "U2", seed=2, labeled=False)
    logic = WorkflowLogic(fresh, working_dir=work, log_callback=lambda line: None)
    assert panel.training_to_reattach(logic, current_job=None) is None  # the training had finished

    questions, declined = [], set()
    no = lambda question: questions.append(question) or False  # noqa: E731
    assert panel.restore_review(logic, confirm=no, declined=declined) == []
    assert len(questions) == 1 and "U1, U2" in questions[0] and "run-001" in questions[0]
    assert declined == {work / "predictions" / "run-001"}
    assert [case.status for case in logic.cases()] == [Status.UNLABELED, Status.UNLABELED, Status.LABELED]
    assert panel.restore_review(logic, confirm=never_asked, declined=declined) == []  # not asked again

    restored = panel.restore_review(logic, confirm=lambda question: True, declined=set())  # the next session: Yes
    assert [item.case_name for item in restored] == ["U2", "U1"]
    for item in restored:
        assert item.prediction.uncertainty == pytest.approx(shown[item.case_name][0])
        np.testing.assert_allclose(item.prediction.least_confident_ras, shown[item.case_name][1])
    assert [case.status for case in logic.cases()] == [Status.PSEUDO_LABELED, Status.PSEUDO_LABELED, Status.LABELED]
    assert panel.restore_review(logic, confirm=never_asked, declined=set()) == []  # loaded: nothing left to offer


def test_predictions_of_a_run_whose_class_table_is_gone_are_not_offered(scene, tmp_path):
    work = tmp_path / "work"
    predicted_session(scene, work)
    fresh = create_headless_scene()
    add_phantom(fresh, "U1", seed=1, labeled=False)
    (work / "runs" / "run-001" / "dataset.json").unlink()
    logic = WorkflowLogic(fresh, working_dir=work, log_callback=lambda line: None)
    assert logic.unloaded_predictions() is None
    assert panel.restore_review(logic, confirm=never_asked, declined=set()) == []
