"""The real PLBOptCore trainer driven from PLBOptLib: tiny CPU runs on a dataset exported from a synthetic scene."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import slicer
from conftest import add_segmentation, add_volume, descendant_pids, phantom_case, process_running, requires_proc
from PLBOptLib import Status, TrainSettings, WorkflowLogic, cases

TINY = TrainSettings(preset="plbopt", iterations=4, patch_size=(16, 32, 32), device="cpu", base_filters=4,
                     overrides={"checkpoint_every": 2, "validate_every": 1000, "log_every": 1})


def _trainer_available() -> bool:
    probe = "import PLBOptCore.engine.trainer, PLBOptCore.engine.inference"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _trainer_available(), reason="PLBOptCore trainer/inference not importable")


def make_logic(scene, tmp_path, python: str = sys.executable) -> WorkflowLogic:
    """Two labeled and two unlabeled phantom cases in ``scene``; jobs run with ``python``."""
    for index in range(2):
        image, label = phantom_case(shape=(20, 40, 40), seed=index)
        add_segmentation(scene, add_volume(scene, f"L{index}", image), {"liver": label == 1, "spleen": label == 2},
                         {"liver": (0.9, 0.4, 0.2), "spleen": (0.2, 0.5, 0.9)})
    for index in range(2):
        image, _ = phantom_case(shape=(20, 40, 40), seed=10 + index)
        add_volume(scene, f"U{index}", image)
    return WorkflowLogic(scene, working_dir=tmp_path, python=python, log_callback=lambda line: None)


@pytest.fixture
def logic(scene, tmp_path):
    return make_logic(scene, tmp_path)


def test_train_predict_review_accept_retrain(logic, tmp_path):
    job = logic.start_training(TINY)
    log = []
    progress = job.wait(timeout=180, log=log.append)
    assert job.process.returncode == 0, "\n".join(job.process.output)
    assert progress.status == "completed" and progress.step == progress.total_steps == 4
    assert progress.loss is not None and progress.fraction == 1.0
    assert job.checkpoint.is_file() and job.run_dir == tmp_path / "runs" / "run-001"
    assert any(line.startswith("Checkpoint at step 2") for line in log)

    prediction = logic.start_prediction()
    assert prediction.process.wait(timeout=180) == 0, "\n".join(prediction.process.output)
    ranked = logic.load_predictions(prediction.run_dir, prediction.out_dir)
    assert sorted(item.case_name for item in ranked) == ["U0", "U1"]
    assert ranked[0].prediction.uncertainty >= ranked[1].prediction.uncertainty
    case = cases.find_case(logic.scene, "U0")
    assert case.status == Status.PSEUDO_LABELED
    names = [case.segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == ["liver", "spleen"]
    confidence = slicer.util.arrayFromVolume(ranked[0].prediction.confidence)
    assert confidence.shape == (20, 40, 40) and 0 <= confidence.min() and confidence.max() <= 1 + 1e-6

    logic.begin_correction("U0")
    logic.accept_as_labeled("U0")
    retrain = logic.retrain(TINY)
    assert "--init-from" in retrain.process.args
    assert retrain.wait(timeout=180).status == "completed", "\n".join(retrain.process.output)
    assert retrain.run_dir.name == "run-002"
    assert "U0" in [c.name for c in cases.find_cases(logic.scene) if c.trains_supervised]


def wait_for_descendants(pid: int, timeout: float = 60) -> list:
    """The processes below ``pid`` once there are any (the launcher has started the interpreter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = descendant_pids(pid)
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} started no child process within {timeout} s")


@requires_proc
def test_cancel_through_a_launcher_stops_the_trainer_and_resume_continues(scene, tmp_path, python_launcher,
                                                                           without_psutil):
    """PythonSlicer forwards no signal and Slicer 5.6-5.12 have no psutil: Cancel must still reach
    the trainer below the launcher, not just the launcher."""
    logic = make_logic(scene, tmp_path, python=python_launcher)
    # "supervised" skips superpixel preprocessing: the quickest start, same checkpoint/cancel path.
    long_run = TrainSettings(**{**TINY.__dict__, "preset": "supervised", "iterations": 2000,
                                "overrides": {"checkpoint_every": 1000, "validate_every": 1000, "log_every": 1}})
    job = logic.start_training(long_run)
    deadline = time.monotonic() + 120
    while job.progress.step < 1 and not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.1)
    assert job.progress.status == "running", "\n".join(job.process.output)
    trainers = descendant_pids(job.process.pid)
    assert trainers, "the launcher started no child interpreter"
    job.cancel()
    progress = job.wait(timeout=120)
    assert job.process.returncode == 130, "\n".join(job.process.output)  # the launcher relays the trainer's status
    assert not [pid for pid in trainers if process_running(pid)], "a trainer survived"
    assert progress.status == "interrupted" and job.checkpoint.is_file()
    assert not (job.run_dir / "train.lock").exists() and not (job.run_dir / "stop-requested").exists()
    stopped_at = progress.step

    resumed = logic.resume_training(long_run)
    assert resumed.run_dir == job.run_dir and "--resume" in resumed.process.args
    while resumed.progress.step <= stopped_at and not resumed.finished and time.monotonic() < deadline + 60:
        resumed.poll()
        time.sleep(0.1)
    assert resumed.progress.start_step == stopped_at, "\n".join(resumed.process.output)
    assert resumed.progress.step > stopped_at  # it trains on from the checkpoint
    resumed.cancel()
    assert resumed.wait(timeout=120).status == "interrupted"


@requires_proc
def test_cancel_during_preprocessing_stops_the_trainer_below_a_launcher(scene, tmp_path, python_launcher,
                                                                        without_psutil):
    """While it prepares its data the trainer looks at no stop file: Cancel must end it there and
    then, not after preprocessing at its first step (or never, as without psutil before)."""
    logic = make_logic(scene, tmp_path, python=python_launcher)
    for index in range(4):  # large enough that preprocessing them takes seconds (superpixels)
        image, _ = phantom_case(shape=(48, 128, 128), seed=20 + index)
        add_volume(scene, f"big{index}", image)
    job = logic.start_training(TrainSettings(**{**TINY.__dict__, "iterations": 2000}))
    deadline = time.monotonic() + 120
    while not job.progress.preparing and not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.progress.preparing and job.progress.status == "waiting", "\n".join(job.process.output)
    trainers = descendant_pids(job.process.pid)
    assert trainers, "the launcher started no child interpreter"
    cancelled = time.monotonic()
    job.cancel()
    progress = job.wait(timeout=60)
    assert time.monotonic() - cancelled < 10
    assert not [pid for pid in trainers if process_running(pid)], "a trainer survived"
    records = [json.loads(line)["type"] for line in (job.run_dir / "events.jsonl").read_text().splitlines()]
    assert "start" not in records, "the trainer went on from preprocessing to training after Cancel"
    assert progress.status == "interrupted" and not job.checkpoint.exists()


@requires_proc
def test_cancel_stops_the_predictor_below_a_launcher(scene, tmp_path, python_launcher, without_psutil):
    """Prediction has no stop file: Cancel terminates the job's process group, the predictor below
    the launcher included, and nothing is written."""
    logic = make_logic(scene, tmp_path)
    trained = logic.start_training(TrainSettings(**{**TINY.__dict__, "preset": "supervised", "iterations": 2}))
    assert trained.wait(timeout=180).status == "completed", "\n".join(trained.process.output)

    logic.python = python_launcher
    prediction = logic.start_prediction()
    predictors = wait_for_descendants(prediction.process.pid)
    cancelled = time.monotonic()
    prediction.cancel()
    prediction.process.wait(timeout=60)
    assert time.monotonic() - cancelled < 10
    assert not [pid for pid in predictors if process_running(pid)], "a predictor survived"
    assert not list(prediction.out_dir.glob("*.nii.gz")), "the prediction ran on after Cancel"
