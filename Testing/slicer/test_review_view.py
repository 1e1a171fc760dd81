"""The review view: overlay colours and opacity, legend, terminology, subject hierarchy, what is
shown, 3D, the working folder field, and the module's self-test that needs no torch."""

from __future__ import annotations

import numpy as np
import pytest

import slicer
from conftest import add_segmentation, add_volume, phantom_case
from PLBOptLib import WorkflowLogic, cases, review, selftest, terminology


def test_self_test_review_loop_runs_without_torch(scene, tmp_path):
    result = selftest.run_review_self_test(scene, tmp_path)
    assert result.ranked == ["selftest_unlabeled"]
    assert np.linalg.norm(np.subtract(result.jumped_to, result.expected_jump)) < 2.0  # mm, within a voxel
    assert result.accepted == tmp_path / "corrected" / "selftest_unlabeled.seg.nrrd" and result.accepted.is_file()
    assert result.labeled_after_accept == ["selftest_labeled", "selftest_unlabeled"]


def test_confidence_colour_table_is_clear_above_the_threshold():
    rgba = review.confidence_rgba(threshold=0.9, count=101)  # entry i = confidence i/100
    assert np.all(rgba[90:, 3] == 0) and np.all(rgba[:90, 3] == 1)
    assert rgba[89, :3].tolist() == pytest.approx([1.0, 1.0, 0.0], abs=0.05)  # slight doubt: yellow
    assert rgba[50, :3].tolist() == [1.0, 0.0, 1.0] and rgba[10, :3].tolist() == [1.0, 0.0, 1.0]  # strong: magenta
    assert np.all(np.diff(rgba[50:90, 1]) >= 0)  # green fades out steadily as doubt grows


def test_slice_view_shows_the_ct_untouched_where_confident(scene):
    """Rendered through Slicer's slice logic, as the panel shows it: what a clinician sees."""
    from make_review_screenshot import render_slice_view

    grid = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=np.eye(3))
    ct = add_volume(scene, "ct", np.full((4, 32, 32), 40.0, np.float32), **grid)
    ct.GetDisplayNode().AutoWindowLevelOff()
    ct.GetDisplayNode().SetWindowLevelMinMax(-160.0, 240.0)  # the constant 40 HU shows as mid-grey
    confidence_map = np.full((4, 32, 32), 0.97, np.float32)
    confidence_map[:, :, 16:] = 0.6  # doubtful right half
    confidence = add_volume(scene, "confidence", confidence_map, **grid)
    display = confidence.GetDisplayNode()
    display.SetAndObserveColorNodeID(review.confidence_color_node(scene, 0.9).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    plain = render_slice_view(scene, ct, pixels=64).astype(int)
    overlaid = render_slice_view(scene, ct, foreground=confidence, pixels=64).astype(int)
    rows = slice(24, 40)
    left, right = slice(4, 20), slice(44, 60)  # columns well inside each half (RAS: I runs right to left)
    sides = {"a": (overlaid[rows, left, :3] - plain[rows, left, :3]), "b": (overlaid[rows, right, :3] - plain[rows, right, :3])}
    changed = {name: bool(np.abs(delta).max() > 10) for name, delta in sides.items()}
    assert sorted(changed.values()) == [False, True]  # one half untouched, the doubtful half tinted
    tinted = sides["a"] if changed["a"] else sides["b"]
    # 0.6 of the doubt colour (255, 0, 64) over grey 127: redder, much less green
    assert tinted[..., 0].mean() > 40 and tinted[..., 1].mean() < -40


def test_loaded_prediction_has_legend_terminology_hierarchy_and_threshold(scene, tmp_path):
    result = selftest.run_review_self_test(scene, tmp_path)
    volume = cases.find_case(scene, "selftest_unlabeled").volume
    confidence = volume.GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(confidence)
    assert legend is not None and legend.GetTitleText() == "Confidence"
    table = confidence.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    table.GetColor(240, rgba)
    assert rgba[3] == 0.0  # confidence 0.94 is above the default threshold: clear
    WorkflowLogic(scene, working_dir=tmp_path).set_confidence_threshold(0.95)
    table.GetColor(240, rgba)
    assert rgba[3] == 1.0 and table.GetAttribute(review.THRESHOLD_ATTRIBUTE) == "0.950"  # now it shows

    segmentation = cases.find_case(scene, "selftest_unlabeled").segmentation
    liver = segmentation.GetSegmentation().GetSegment("liver")
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = hierarchy.GetItemByDataNode(volume)
    for node in (segmentation, confidence):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == volume_item
    assert result.ranked


def test_threshold_chosen_before_loading_applies_to_loaded_maps(scene, tmp_path):
    logic = WorkflowLogic(scene, working_dir=tmp_path)
    logic.set_confidence_threshold(0.97)
    assert review.find_confidence_color_node(scene) is None  # nothing loaded: no table added to the scene
    image, label = selftest.synthetic_case(seed=3)
    volume = selftest.add_synthetic_volume(scene, "U", image)
    run_dir, out_dir = tmp_path / "runs" / "run-001", tmp_path / "predictions" / "run-001"
    selftest.write_synthetic_prediction(volume, "U", run_dir, out_dir, label)
    logic.load_predictions(run_dir, out_dir)
    assert review.find_confidence_color_node(scene).GetAttribute(review.THRESHOLD_ATTRIBUTE) == "0.970"


def test_terminology_names():
    assert terminology.terminology_entry("Kidney_Left") == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney"
        "~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")
    assert "~SCT^24028007^Right~" in terminology.terminology_entry("right adrenal gland")
    assert "SCT^28231008^Gallbladder" in terminology.terminology_entry("gall bladder")
    assert terminology.terminology_entry("tumour core") is None


def test_selecting_a_case_toggles_only_the_module_segmentations(scene, tmp_path):
    image, label = phantom_case(seed=1)
    first = add_volume(scene, "A", image)
    second = add_volume(scene, "B", image)
    seg_a = add_segmentation(scene, first, {"liver": label == 1})
    seg_b = add_segmentation(scene, second, {"liver": label == 1})
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's own")  # drawn on no case
    other.CreateDefaultDisplayNodes()
    logic = WorkflowLogic(scene, working_dir=tmp_path)
    logic.show_case("B")
    assert not seg_a.GetDisplayNode().GetVisibility() and seg_b.GetDisplayNode().GetVisibility()
    assert other.GetDisplayNode().GetVisibility()  # not the module's: left alone
    shown = logic.show_in_3d("A")
    assert shown is seg_a and seg_a.GetSegmentation().ContainsRepresentation("Closed surface")
    assert seg_a.GetDisplayNode().GetVisibility3D()


def test_cleared_working_folder_field_means_no_folder():
    assert WorkflowLogic.working_folder_from_text("") is None
    assert WorkflowLogic.working_folder_from_text(" . ") is None
    assert str(WorkflowLogic.working_folder_from_text("/data/work")) == "/data/work"
