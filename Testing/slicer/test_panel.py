"""Decisions of the panel (PLBOptLib.panel) and the run folders they act on, against real MRML nodes."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np

import slicer

from conftest import add_volume, save_to_disk
from PLBOptLib import Status, WorkflowLogic, cases, panel
from PLBOptLib.events import EventsFollower
from PLBOptLib.logic import TrainingJob
from PLBOptLib.process import TrainSettings
from test_plboptlib import add_phantom, write_fake_run


def pseudo_labeled_scene(scene, tmp_path):
    """A labeled case and U1, U2 exported, predicted and loaded as pseudo labels."""
    add_phantom(scene, "labeled", seed=0)
    first, _, label_1 = add_phantom(scene, "U1", seed=1, labeled=False)
    second, _, label_2 = add_phantom(scene, "U2", seed=2, labeled=False)
    WorkflowLogic(scene, working_dir=tmp_path).export_dataset()  # as Start does: case names are recorded
    box = (slice(0, 2),) * 3
    run_dir, out_dir, _ = write_fake_run(tmp_path, {"U1": (first, label_1, box), "U2": (second, label_2, box)})
    WorkflowLogic(scene, working_dir=tmp_path).load_predictions(run_dir, out_dir)
    return first, second


def test_accept_after_a_scene_change_acts_on_the_case_on_screen(scene, tmp_path):
    """Every node added rebuilds and re-sorts the table: Accept must act on the case the slice
    views show, not on whichever case has moved into the highlighted row."""
    pseudo_labeled_scene(scene, tmp_path)
    # The module was reloaded (or the scene reopened): no ranking in memory, the table is in name order.
    logic = WorkflowLogic(scene, working_dir=tmp_path)
    selection = panel.CaseSelection()
    rows = panel.case_rows(logic)
    clicked_row = [row.case_name for row in rows].index("U2")
    selection.select(rows[clicked_row].volume_id)  # the user clicks U2
    shown = selection.case(logic).volume  # what the panel puts in the slice views
    assert shown.GetName() == "U2"

    image = np.zeros((12, 24, 28), np.float32)
    add_volume(scene, "A new scan", image)  # sorts first by name
    again = add_volume(scene, "U2", image)  # the same series loaded again

    rows = panel.case_rows(logic)
    assert rows[clicked_row].volume_id != shown.GetID()  # the row number now names another case
    assert rows[selection.row_in(rows)].volume_id == shown.GetID()  # the selection follows the case
    saved = panel.accept_selected(logic, selection)

    assert saved.name == "U2.seg.nrrd"
    assert shown.GetAttribute(cases.STATUS_ATTRIBUTE) == Status.LABELED.value
    assert {case.volume.GetID(): case.status for case in logic.cases()}[again.GetID()] == Status.UNLABELED
    assert cases.find_case(scene, "U1").status == Status.PSEUDO_LABELED


def test_selection_is_dropped_when_its_volume_leaves_the_scene(scene, tmp_path):
    first, _ = pseudo_labeled_scene(scene, tmp_path)
    logic = WorkflowLogic(scene, working_dir=tmp_path)
    selection = panel.CaseSelection()
    selection.select(first.GetID())
    scene.RemoveNode(first)
    assert selection.row_in(panel.case_rows(logic)) is None and selection.case(logic) is None


def test_a_volume_added_under_an_exported_name_does_not_take_the_case_over(scene, tmp_path):
    """Predictions and the corrected file are found by case name; a volume loaded later under the
    same name must not inherit it, even when its node ID sorts first as text
    (``vtkMRMLScalarVolumeNode12`` < ``vtkMRMLScalarVolumeNode3``)."""
    add_phantom(scene, "labeled", seed=0)
    exported, _, _ = add_phantom(scene, "scan", seed=1, labeled=False)
    WorkflowLogic(scene, working_dir=tmp_path).export_dataset()
    image = np.zeros((12, 24, 28), np.float32)
    later = add_volume(scene, "scan", image)
    while not later.GetID() < exported.GetID():  # until the new ID sorts first as text
        later = add_volume(scene, "scan", image)
    assert cases.find_case(scene, "scan").volume is exported
    assert cases.find_case(scene, "scan_2").volume is not exported


def make_runs(tmp_path):
    """run-001 trained (best.pt, last.pt); run-002 cancelled before its first checkpoint."""
    good, broken = tmp_path / "runs" / "run-001", tmp_path / "runs" / "run-002"
    (good / "checkpoints").mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        (good / "checkpoints" / name).write_text("weights")
    broken.mkdir()
    (broken / "events.jsonl").write_text('{"type": "preprocess", "case": "L0", "index": 1, "total": 4}\n')
    (broken / "train.lock").write_text('{"pid": 1, "host": "gone", "time": 0}')
    return good, broken


def test_a_run_without_checkpoint_does_not_block_predict_retrain_or_resume(scene, tmp_path, monkeypatch):
    add_phantom(scene, "labeled", seed=0)
    add_phantom(scene, "U1", seed=1, labeled=False)
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    logic.export_dataset()
    good, broken = make_runs(tmp_path)
    commands = []
    monkeypatch.setattr(logic, "_start_job", lambda command, **options: commands.append(command)
                        or types.SimpleNamespace(args=command))

    assert logic.has_trained_run()
    prediction = logic.start_prediction()
    assert prediction.run_dir == good and commands[-1][4] == str(good)
    resumed = logic.resume_training(TrainSettings())
    assert resumed.run_dir == good and "--resume" in commands[-1]
    retrained = logic.retrain(TrainSettings())
    assert commands[-1][commands[-1].index("--init-from") + 1] == str(good / "checkpoints" / "last.pt")
    assert retrained.run_dir == tmp_path / "runs" / "run-003"  # a new run; the broken one keeps its number


def test_panel_says_checkpoint_kept_only_when_it_exists(tmp_path):
    good, broken = make_runs(tmp_path)
    for run_dir, kept in ((good, True), (broken, False)):
        job = TrainingJob(run_dir=run_dir, process=types.SimpleNamespace(), events=EventsFollower(run_dir / "events.jsonl"))
        job.progress.status = "interrupted"
        kind, message = panel.training_finished_message(job)
        assert kind == "info" and ("checkpoint kept" in message) == kept, message
        assert kept or "nothing to resume" in message


REASONS = ["numpy 1.26.4 -> 2.1.0"]


def test_restart_asks_to_save_unsaved_segment_editor_work_first(scene, tmp_path):
    fresh = panel.restart_question(scene, REASONS)
    assert fresh.unsaved == () and [c for c, _ in fresh.choices] == [panel.RestartChoice.RESTART,
                                                                       panel.RestartChoice.CANCEL]
    assert "numpy 1.26.4 -> 2.1.0" in fresh.text

    volume, _, label = add_phantom(scene, "patient", seed=0)
    save_to_disk(scene, tmp_path / "saved")
    assert panel.unsaved_data(scene) == []  # everything saved: nothing to lose
    segmentation = next(case.segmentation for case in cases.find_cases(scene))
    liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, liver, volume)
    mask[0, 0, 0] = 1  # a stroke in Segment Editor
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, liver, volume)

    question = panel.restart_question(scene, REASONS)
    assert question.unsaved == (segmentation.GetName(),)
    assert [c for c, _ in question.choices] == [panel.RestartChoice.SAVE, panel.RestartChoice.RESTART,
                                                panel.RestartChoice.CANCEL]
    assert segmentation.GetName() in question.text and "numpy" in question.text
    assert dict(question.choices)[panel.RestartChoice.RESTART] == "Restart without saving"

    save_to_disk(scene, tmp_path / "saved")  # the user pressed Save and saved everything
    assert panel.after_restart_choice(panel.RestartChoice.SAVE, True, panel.unsaved_data(scene)) == panel.RestartStep.RESTART


def test_a_restart_follows_only_a_save_that_left_nothing_unsaved():
    step, choice = panel.RestartStep, panel.RestartChoice
    assert panel.after_restart_choice(choice.SAVE, saved=False) == step.STAY  # save dialog cancelled
    assert panel.after_restart_choice(choice.SAVE, saved=True, still_unsaved=["seg"]) == step.ASK_AGAIN
    assert panel.after_restart_choice(choice.SAVE, saved=True, still_unsaved=[]) == step.RESTART
    assert panel.after_restart_choice(choice.CANCEL) == step.STAY
    assert panel.after_restart_choice(choice.RESTART) == step.RESTART


def test_unsaved_data_lists_visible_data_then_a_changed_scene(scene, tmp_path):
    image = np.zeros((4, 5, 6), np.float32)
    add_volume(scene, "made in Slicer", image)
    helper = add_volume(scene, "helper", image)
    helper.SetHideFromEditors(True)  # not shown to the user: not named either
    assert panel.unsaved_data(scene) == ["made in Slicer"]
    save_to_disk(scene, tmp_path / "saved")
    assert panel.unsaved_data(scene) == []
    helper.SetName("renamed")  # only the scene file changed
    assert panel.unsaved_data(scene) == ["the scene (views, layout and node settings)"]


def test_the_scene_is_watched_only_while_the_module_is_shown(scene, tmp_path):
    changed, imported, added = [], [], []
    scene.AddObserver(scene.NodeAddedEvent, lambda caller, event: added.append(event))  # what Slicer sends
    watch = panel.SceneWatch(scene, lambda: changed.append("nodes"), lambda: imported.append("scene"))
    image = np.zeros((4, 5, 6), np.float32)
    other = add_volume(scene, "loaded while the module is closed", image)
    assert changed == [] and not watch.active

    watch.start()  # enter
    watch.start()  # entered again without an exit: still one observer per event
    added.clear()
    add_volume(scene, "loaded while it is shown", image)
    assert len(added) > 0 and changed == ["nodes"] * len(added)
    scene.RemoveNode(other)
    assert len(changed) == len(added) + 1
    saved = tmp_path / "elsewhere"
    save_to_disk(scene, saved)
    scene.SetURL(str(saved / "scene.mrml"))
    assert scene.Import() and imported == ["scene"]

    watch.stop()  # exit
    before = len(changed)
    late = add_volume(scene, "loaded after the module was closed", image)
    scene.RemoveNode(late)
    assert scene.Import()
    assert len(changed) == before and imported == ["scene"]


def test_a_scene_change_reads_nothing_from_the_working_folder(scene, tmp_path, monkeypatch):
    """The table is rebuilt after every burst of node additions; what it shows from the working
    folder (class order of the last export, whether a trained run exists) is read once."""
    add_phantom(scene, "labeled", seed=0, segment_order=("spleen", "liver"))
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    logic.export_dataset()  # class order: spleen, liver
    make_runs(tmp_path)
    shown = (panel.case_rows(logic), logic.class_names(), logic.has_trained_run())  # on entry

    reads = []

    def recording(method):
        def read(path, *args, **kwargs):
            if str(path).startswith(str(tmp_path)):
                reads.append((method.__name__, str(path)))
            return method(path, *args, **kwargs)
        return read

    for name in ("stat", "open", "iterdir"):
        monkeypatch.setattr(Path, name, recording(getattr(Path, name)))
    add_phantom(scene, "another labeled", seed=1, segment_order=("liver", "spleen"))  # a node burst
    rebuilt = (panel.case_rows(logic), logic.class_names(), logic.has_trained_run())
    assert reads == []
    assert rebuilt[1:] == (["spleen", "liver"], True) and len(rebuilt[0]) == len(shown[0]) + 1

    logic.forget_folder_facts()  # Refresh, entry, a job's end: the folder is read again
    assert logic.has_trained_run() and reads
    logic.working_dir = tmp_path / "another folder"  # nothing there, and nothing kept from the old one
    assert not logic.has_trained_run() and logic.class_names() == ["liver", "spleen"]
