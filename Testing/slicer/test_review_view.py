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


def test_confidence_overlay_is_transparent_where_confident():
    rgba = review.confidence_rgba(threshold=0.9, count=101)  # entry i = confidence i/100
    assert np.all(rgba[90:, 3] == 0)  # confident: the CT shows through untouched
    assert np.all(rgba[:51, 3] == 1)  # at most 0.5: opaque
    assert np.all(np.diff(rgba[50:91, 3]) <= 0) and 0 < rgba[70, 3] < 1  # ramps with uncertainty
    assert review.confidence_alpha(np.array([0.95, 0.7]), threshold=0.98).tolist() == pytest.approx([0.0625, 0.5833], abs=1e-3)


def test_loaded_prediction_has_legend_terminology_hierarchy_and_threshold(scene, tmp_path):
    result = selftest.run_review_self_test(scene, tmp_path)
    volume = cases.find_case(scene, "selftest_unlabeled").volume
    confidence = volume.GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(confidence)
    assert legend is not None and legend.GetTitleText() == "Confidence"
    table = confidence.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    table.GetColor(255, rgba)
    assert rgba[3] == 0.0  # confidence 1.0: transparent
    WorkflowLogic(scene, working_dir=tmp_path).set_confidence_threshold(1.0)
    table.GetColor(240, rgba)
    assert 0.0 < rgba[3] < 1.0  # confidence 0.94 now shows, faintly

    segmentation = cases.find_case(scene, "selftest_unlabeled").segmentation
    liver = segmentation.GetSegmentation().GetSegment("liver")
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = hierarchy.GetItemByDataNode(volume)
    for node in (segmentation, confidence):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == volume_item
    assert result.ranked


def test_terminology_names():
    assert "SCT^18639004^Left kidney" in terminology.terminology_entry("Kidney_Left")
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
