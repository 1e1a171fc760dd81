"""Loading pseudo labels on every supported Slicer: terminology on 5.6/5.8 and 5.10+, and a failed
load that leaves the scene as it was."""

from __future__ import annotations

import pytest
import vtk

import slicer
from PLBOptLib import Status, WorkflowLogic, cases, review, terminology
from test_plboptlib import add_phantom, write_fake_run

LIVER = terminology.terminology_entry("liver")


def terminology_tag(segment) -> str:
    value = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)


class Slicer58Segment:
    """A vtkSegment as Slicer 5.6 and 5.8 have it: no ``SetTerminology`` (added in 5.10)."""

    def __init__(self, segment):
        self._segment = segment

    def __getattr__(self, name):
        if name == "SetTerminology":
            raise AttributeError(f"'vtkSegment' object has no attribute {name!r}")
        return getattr(self._segment, name)


def test_terminology_on_slicer_510_and_later_uses_set_terminology():
    segment = slicer.vtkSegment()
    review.set_segment_terminology(segment, LIVER)
    assert segment.GetTerminology() == LIVER


def test_terminology_on_slicer_56_and_58_goes_into_the_terminology_tag():
    segment = slicer.vtkSegment()
    old = Slicer58Segment(segment)
    assert not hasattr(old, "SetTerminology")
    review.set_segment_terminology(old, LIVER)
    assert terminology_tag(segment) == LIVER
    assert segment.GetTerminology() == LIVER  # Slicer 5.10+ reads what the older versions wrote


def scene_nodes(scene) -> list:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_a_failed_load_leaves_no_half_built_pseudo_label_and_keeps_the_previous_one(scene, tmp_path, monkeypatch):
    add_phantom(scene, "labeled", seed=0)
    volume, _, label = add_phantom(scene, "U1", seed=1, labeled=False)
    run_dir, out_dir, _ = write_fake_run(tmp_path, {"U1": (volume, label, (slice(0, 2),) * 3)})
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    logic.load_predictions(run_dir, out_dir)
    previous = cases.find_case(scene, "U1").segmentation
    before = scene_nodes(scene)

    def fail(name):  # where Slicer 5.6/5.8 failed: the segmentation node exists, segments are being added
        raise AttributeError("'vtkSegment' object has no attribute 'SetTerminology'")

    monkeypatch.setattr(terminology, "terminology_entry", fail)
    with pytest.raises(AttributeError):
        logic.load_predictions(run_dir, out_dir)
    assert scene_nodes(scene) == before  # nothing half-built left, nothing of the earlier load removed
    case = cases.find_case(scene, "U1")
    assert case.segmentation is previous and case.status == Status.PSEUDO_LABELED
    assert volume.GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE) is not None
