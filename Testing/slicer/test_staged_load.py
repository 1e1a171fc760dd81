"""Pseudo labels load without freezing Slicer (issue 21, item 5): a worker thread reads and checks
each case's files while the GUI thread adds one case's nodes per step, and a case the user changed
meanwhile is left as the user left it."""

from __future__ import annotations

import threading
import time

import pytest

from PLBOptLib import PLBOptSlicerError, Status, WorkflowLogic, cases, panel, review
from test_plboptlib import add_phantom, write_fake_run

GATE_WAIT_SECONDS = 5.0
LOW = (slice(0, 2),) * 3


def predicted_scene(scene, tmp_path, names):
    """One labeled case and unlabeled ones with predictions on disk: (run_dir, out_dir, volumes)."""
    add_phantom(scene, "labeled", seed=0)
    added = {name: add_phantom(scene, name, seed=index, labeled=False) for index, name in enumerate(names, 1)}
    run_dir, out_dir, _ = write_fake_run(tmp_path, {name: (volume, label, LOW) for name, (volume, _, label) in added.items()})
    return run_dir, out_dir, {name: volume for name, (volume, _, _) in added.items()}


def test_a_step_never_waits_for_the_files_and_cases_changed_meanwhile_are_skipped(scene, tmp_path, monkeypatch):
    run_dir, out_dir, volumes = predicted_scene(scene, tmp_path, ["U1", "U2", "U3", "U4", "U5"])
    gate = threading.Event()
    read_prediction = review.read_prediction
    on_worker = []

    def slow_disk(*args):
        on_worker.append(threading.current_thread() is not threading.main_thread())
        assert gate.wait(GATE_WAIT_SECONDS)
        return read_prediction(*args)

    monkeypatch.setattr(review, "read_prediction", slow_disk)
    log = []
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=log.append)
    staged = logic.staged_load_predictions(run_dir, out_dir)
    assert staged.total == 5

    started = time.monotonic()
    assert staged.advance() is False  # U1's files are still being read: the step returns at once
    assert time.monotonic() - started < 0.2
    assert staged.loaded == [] and cases.find_case(scene, "U1").segmentation is None

    scene.RemoveNode(volumes["U4"])  # queued, not yet read
    gate.set()
    assert staged.advance(wait=True) is False
    assert staged.loaded == ["U1"] and cases.find_case(scene, "U1").status == Status.PSEUDO_LABELED
    assert 0.0 < staged.fraction < 1.0 and "1/5" in staged.progress_text

    scene.RemoveNode(volumes["U2"])  # its files are being read now
    assert staged.advance(wait=True) is False
    # the user starts correcting U3 with a segmentation of their own while its files are read
    own = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "U3 by hand")
    cases.set_case_segmentation(volumes["U3"], own, Status.CORRECTED)
    while not staged.advance(wait=True):
        pass

    assert staged.loaded == ["U1", "U5"] and staged.skipped == ["U2", "U3", "U4"]
    assert staged.fraction == 1.0
    assert cases.find_case(scene, "U3").segmentation is own  # not overwritten
    assert cases.find_case(scene, "U3").status == Status.CORRECTED
    assert volumes["U3"].GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE) is None
    assert all(on_worker) and len(on_worker) == 4  # U1, U2, U3, U5: files never read on the GUI thread
    uncertainties = [item.prediction.uncertainty for item in staged.ranked]
    assert sorted(item.case_name for item in staged.ranked) == ["U1", "U5"]
    assert uncertainties == sorted(uncertainties, reverse=True)  # most uncertain first
    assert "Skipped the pseudo label of U3" in "\n".join(log)
    assert log[-1] == f"Loaded pseudo labels of 2 cases from {out_dir}"


def test_cancel_keeps_the_cases_loaded_and_a_bad_file_stops_with_its_name(scene, tmp_path):
    run_dir, out_dir, _ = predicted_scene(scene, tmp_path, ["U1", "U2", "U3"])
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    staged = logic.staged_load_predictions(run_dir, out_dir)
    assert staged.advance(wait=True) is False
    staged.cancel()
    assert staged.advance(wait=True) is True  # U2 was being read: it is added, U3 is not
    assert staged.loaded == ["U1", "U2"] and cases.find_case(scene, "U3").segmentation is None

    (out_dir / "confidence" / "U2.nii.gz").write_bytes(b"not an image")
    staged = logic.staged_load_predictions(run_dir, out_dir)
    assert staged.advance(wait=True) is False
    with pytest.raises(PLBOptSlicerError, match=r"U2.nii.gz: cannot be read"):
        staged.advance(wait=True)
    assert cases.find_case(scene, "U1").status == Status.PSEUDO_LABELED  # loaded before the bad file: kept
    assert staged.advance(wait=True) is True  # over after the failure


def test_loading_at_once_and_in_steps_give_the_same_review(scene, tmp_path):
    run_dir, out_dir, _ = predicted_scene(scene, tmp_path, ["U1", "U2"])
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    at_once = [(item.case_name, item.prediction.uncertainty, item.prediction.least_confident_ras)
               for item in logic.load_predictions(run_dir, out_dir)]
    staged = logic.staged_load_predictions(run_dir, out_dir)
    while not staged.advance(wait=True):
        pass
    in_steps = [(item.case_name, item.prediction.uncertainty, item.prediction.least_confident_ras)
                for item in staged.ranked]
    assert in_steps == at_once and len(at_once) == 2
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 3  # replaced, not piled up


def test_an_accepted_offer_goes_to_the_panels_loader(scene, tmp_path):
    """On entering the module, predictions on disk are offered; the panel loads them from its timer."""
    run_dir, out_dir, _ = predicted_scene(scene, tmp_path, ["U1"])
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    offered = []
    assert panel.restore_review(logic, confirm=lambda question: True, declined=set(),
                                load=lambda pending: offered.append(pending) or []) == []
    assert [(p.run_dir, p.out_dir, p.case_names) for p in offered] == [(run_dir, out_dir, ["U1"])]
    assert cases.find_case(scene, "U1").segmentation is None  # nothing loaded at once
