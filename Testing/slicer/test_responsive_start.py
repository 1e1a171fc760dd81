"""Start, Retrain and Predict leave Slicer's GUI thread free (issue 21, item 5): the check of the
bundled PLBOptCore runs inside the job, and the dataset export reads the scene on the main thread,
one case per step, while a worker thread writes the NIfTI files."""

from __future__ import annotations

import sys
import threading
import time

import pytest

import slicer
from PLBOptLib import PLBOptSlicerError, TrainSettings, WorkflowLogic, imageio, panel
from test_plboptlib import add_phantom

SETTINGS = TrainSettings(preset="supervised", iterations=2, patch_size=(8, 16, 16), device="cpu", base_filters=4)
GATE_WAIT_SECONDS = 5.0

GATED_LAUNCHER = '''#!{python}
"""Stand-in for a PythonSlicer that is slow to start: it runs the interpreter only once the test
opens the gate (a file), and gives up after {wait} s."""
import os, subprocess, sys, time
deadline = time.monotonic() + {wait}
while not os.path.exists({gate!r}):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.02)
sys.exit(subprocess.call([{python!r}, *sys.argv[1:]]))
'''


@pytest.fixture
def gated_python(tmp_path):
    """(launcher path, gate path): the launcher's interpreter starts once the gate file exists."""
    gate = tmp_path / "gate-open"
    launcher = tmp_path / "SlowPythonSlicer"
    launcher.write_text(GATED_LAUNCHER.format(python=sys.executable, gate=str(gate), wait=GATE_WAIT_SECONDS))
    launcher.chmod(0o755)
    return str(launcher), gate


def stale_core(tmp_path):
    """A bundled PLBOptCore at another version: an extension updated while Slicer runs."""
    package = tmp_path / "updated-extension" / "PLBOptCore"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "9.9.9"\n')
    return package.parent


def two_case_scene(scene):
    add_phantom(scene, "labeled", seed=0)
    add_phantom(scene, "unlabeled", seed=1, labeled=False)


def test_training_starts_without_waiting_for_the_interpreter_and_a_stale_core_fails_the_job(scene, tmp_path,
                                                                                            gated_python):
    """Start returns while the job's interpreter has not even started (the old check ran it on the
    GUI thread first, up to 120 s); the version check then fails the job itself, and the panel
    shows why."""
    launcher, gate = gated_python
    two_case_scene(scene)
    logic = WorkflowLogic(scene, working_dir=tmp_path / "work", python=launcher, core_root=stale_core(tmp_path),
                          log_callback=lambda line: None)
    logic.export_dataset()

    began = time.monotonic()
    job = logic.start_training(SETTINGS, export=False)
    assert time.monotonic() - began < 1.0
    assert job.process.running and not gate.exists()

    gate.touch()
    progress = job.wait(timeout=60)
    assert job.process.returncode == 2
    assert progress.status == "failed"
    kind, message = panel.training_finished_message(job)
    assert kind == "error"
    assert "PLBOptCore 9.9.9 does not match the PLBOpt module" in message and "restart Slicer" in message


def test_prediction_starts_without_waiting_for_the_interpreter(scene, tmp_path, gated_python):
    launcher, gate = gated_python
    two_case_scene(scene)
    work = tmp_path / "work"
    logic = WorkflowLogic(scene, working_dir=work, python=launcher, core_root=stale_core(tmp_path),
                          log_callback=lambda line: None)
    logic.export_dataset()
    (work / "runs" / "run-001" / "checkpoints").mkdir(parents=True)
    (work / "runs" / "run-001" / "checkpoints" / "best.pt").write_bytes(b"")

    began = time.monotonic()
    prediction = logic.start_prediction()
    assert time.monotonic() - began < 1.0
    assert prediction.process.running and not gate.exists()
    gate.touch()
    assert prediction.process.wait(timeout=60) == 2
    assert "PLBOptCore 9.9.9 does not match the PLBOpt module" in prediction.process.failure_message()


def test_staged_start_reads_the_scene_on_the_main_thread_and_writes_on_a_worker(scene, tmp_path, monkeypatch):
    """While a file is being written, each step returns at once; only two cases wait in memory;
    the job starts once every file and dataset.json are written."""
    add_phantom(scene, "labeled", seed=0)
    for index in range(3):
        add_phantom(scene, f"U{index}", seed=index + 1, labeled=False)
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)

    release, reader_threads, writer_threads = threading.Event(), set(), set()
    array_from_volume, write_image = slicer.util.arrayFromVolume, imageio.write_image

    def recording_array_from_volume(node):
        reader_threads.add(threading.current_thread())
        return array_from_volume(node)

    def slow_write_image(image, path):
        writer_threads.add(threading.current_thread())
        assert release.wait(30), "the test never released the writer"
        write_image(image, path)

    monkeypatch.setattr(slicer.util, "arrayFromVolume", recording_array_from_volume)
    monkeypatch.setattr(imageio, "write_image", slow_write_image)
    launched = []
    monkeypatch.setattr(logic, "_launch_training", lambda settings, **options: launched.append(
        sorted(p.name for p in (tmp_path / "dataset").rglob("*.*"))) or "job")

    staged = logic.staged_training(SETTINGS)
    for _ in range(10):
        began = time.monotonic()
        assert staged.advance() is False
        assert time.monotonic() - began < 0.2
    assert (staged.export.read_count, staged.export.written_count) == (2, 0)  # one being written, one waiting
    assert not launched

    release.set()
    deadline = time.monotonic() + 60
    while not staged.advance():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reader_threads == {threading.main_thread()}
    assert writer_threads and threading.main_thread() not in writer_threads
    assert staged.job == "job"
    assert launched == [["U0.nii.gz", "U1.nii.gz", "U2.nii.gz", "dataset.json", "labeled.nii.gz", "labeled.nii.gz"]]
    assert staged.progress_text == "Exporting the dataset: 4/4 cases written" and staged.fraction == 1.0
    assert staged.exported.unlabeled == ["U0", "U1", "U2"]


def test_cancel_during_the_export_starts_no_job(scene, tmp_path, monkeypatch):
    two_case_scene(scene)
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    monkeypatch.setattr(logic, "_launch_training", lambda settings, **options: pytest.fail("a job was started"))
    staged = logic.staged_training(SETTINGS)
    staged.advance()
    staged.cancel()
    deadline = time.monotonic() + 30
    with pytest.raises(PLBOptSlicerError, match="export cancelled"):
        while not staged.advance():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert staged.job is None and not (tmp_path / "dataset" / "dataset.json").exists()


def test_a_failed_write_is_reported_and_starts_no_job(scene, tmp_path, monkeypatch):
    two_case_scene(scene)
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    monkeypatch.setattr(logic, "_launch_training", lambda settings, **options: pytest.fail("a job was started"))

    def full_disk(image, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio, "write_image", full_disk)
    staged = logic.staged_training(SETTINGS)
    deadline = time.monotonic() + 30
    with pytest.raises(PLBOptSlicerError, match="dataset export failed: .*No space left on device"):
        while not staged.advance():
            assert time.monotonic() < deadline
            time.sleep(0.01)
