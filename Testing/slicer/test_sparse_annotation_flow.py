"""Sparse annotation in the Slicer module (issue 23), headless on real MRML nodes: mark which slices
of a case are annotated, export with the ``ignore`` label, train and predict with the bundled
PLBOptCore, review the pseudo label that completes the case, accept it: the case is fully annotated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from conftest import add_segmentation, add_volume, phantom_case
from PLBOptLib import PLBOptSlicerError, Status, WorkflowLogic, cases, panel, review, sparse
from test_plboptlib import COLORS, add_phantom

CLASSES = {"liver": 1, "spleen": 2}
IGNORE = 3  # after the highest class


def _nifti(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _segment_array(segmentation, volume, names=CLASSES) -> np.ndarray:
    label = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    for name, value in names.items():
        label[slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, name, volume) > 0] = value
    return label


def _paint_slices(scene, name: str, seed: int, axial_slices, directions=None):
    """A phantom volume whose segmentation holds its organs on the axial (K) slices ``axial_slices`` only."""
    image, label = phantom_case(seed=seed)
    painted = np.zeros_like(label)
    painted[list(axial_slices)] = label[list(axial_slices)]
    volume = add_volume(scene, name, image, directions=np.eye(3) if directions is None else directions)
    segmentation = add_segmentation(scene, volume, {n: painted == v for n, v in CLASSES.items()}, COLORS)
    return volume, segmentation, label, painted


def test_the_slicer_axis_of_each_orientation_follows_the_volume_directions(scene):
    image, _ = phantom_case()
    plain = add_volume(scene, "plain", image, directions=np.eye(3))
    assert [sparse.array_axis(plain, axis) for axis in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    # voxel axes I -> A, J -> S, K -> R (columns): axial slices are normal to J, the middle array axis
    turned = add_volume(scene, "turned", image, directions=np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]))
    assert [sparse.array_axis(turned, axis) for axis in ("axial", "coronal", "sagittal")] == [1, 2, 0]
    with pytest.raises(PLBOptSlicerError, match="unknown slice orientation"):
        sparse.array_axis(plain, "oblique")


def test_slice_numbers_are_stored_as_ranges_and_read_back():
    assert sparse.encode_indices([8, 0, 1, 2, 3, 10, 11]) == "0-3,8,10-11"
    assert sparse.decode_indices("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    for bad in ("3-1", "a", "1,,2", "-1"):
        with pytest.raises(ValueError):
            sparse.decode_indices(bad)


def test_sparse_case_from_marking_to_fully_annotated(scene, tmp_path):
    from PLBOptCore.api import predict, train
    from PLBOptCore.data.dataset import load_dataset, validate_dataset

    add_phantom(scene, "full", seed=0)
    volume, own_segmentation, truth, painted = _paint_slices(scene, "sparse", seed=1, axial_slices=(0, 4, 8))
    add_phantom(scene, "U1", seed=2, labeled=False)
    logic = WorkflowLogic(scene, working_dir=tmp_path)
    tracker = sparse.EditTracker()

    # 1. mark: slice 0 holds no organ of this phantom, so slices 4 and 8 are the annotated ones
    case = cases.find_case(scene, "sparse")
    assert sparse.apply_marking(case, "segments", "axial", tracker) == "sparse: annotated 2/12 axial slices (17 %)"
    assert volume.GetAttribute(sparse.ANNOTATED_SLICES_ATTRIBUTE) == "axial:0:4,8"
    table = {row.case_name: row.cells[5] for row in panel.case_rows(logic)}
    assert table == {"full": "all", "sparse": "2/12 axial slices (17 %)", "U1": ""}

    # 2. export: ignore (3, the highest label) outside slices 4 and 8; the image where Predict reads
    exported = logic.export_dataset()
    assert exported.labeled == ["full", "sparse"] and exported.unlabeled == ["U1"]
    root = tmp_path / "dataset"
    data = json.loads((root / "dataset.json").read_text())
    assert data["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "ignore"}
    assert {"image": "imagesUn/sparse.nii.gz", "label": "labelsTr/sparse.nii.gz"} in data["training"]
    assert data["unlabeled"] == [{"image": "imagesUn/U1.nii.gz"}]
    written = _nifti(root / "labelsTr" / "sparse.nii.gz")
    expected = np.full(truth.shape, IGNORE, np.uint8)
    expected[[4, 8]] = truth[[4, 8]]
    np.testing.assert_array_equal(written, expected)
    assert IGNORE not in np.unique(_nifti(root / "labelsTr" / "full.nii.gz"))
    spec = load_dataset(root)  # PLBOptCore reads it as a sparse dataset
    validate_dataset(spec)
    assert spec.ignore_label == IGNORE and spec.num_classes == 3

    # 3. a tiny training and a prediction of imagesUn, as the panel's Start and Predict run them
    run_dir, out_dir = tmp_path / "runs" / "run-001", tmp_path / "predictions" / "run-001"
    train(root, run_dir, preset="supervised", small=True,
          overrides=dict(iterations=2, base_filters=4, batch_size=1, patch_size=(16, 32, 32), device="cpu",
                         validate_every=1000))
    predict(run_dir, root / "imagesUn", out_dir, checkpoint="last", device="cpu")
    predicted = _nifti(out_dir / "sparse.nii.gz")

    # 4. review: the pseudo label keeps the user's slices 4 and 8 and takes the prediction elsewhere
    ranked = logic.load_predictions(run_dir, out_dir)
    assert sorted(item.case_name for item in ranked) == ["U1", "sparse"]
    case = cases.find_case(scene, "sparse")
    assert case.status == Status.LABELED and sparse.is_pseudo_label(case.segmentation) and sparse.can_accept(case)
    assert case.segmentation is not own_segmentation and own_segmentation.GetDisplayNode().GetVisibility() == 0
    completed = _segment_array(case.segmentation, volume)
    np.testing.assert_array_equal(completed[[4, 8]], truth[[4, 8]])
    others = [k for k in range(truth.shape[0]) if k not in (4, 8)]
    np.testing.assert_array_equal(completed[others], predicted[others])
    confidence = slicer.util.arrayFromVolume(volume.GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE))
    assert (confidence[[4, 8]] == 1.0).all()
    assert {row.case_name: row.cells[5] for row in panel.case_rows(logic)}["sparse"] == \
        "2/12 axial slices (17 %) + pseudo label"
    # until accepted, training sees the same sparse label as before
    logic.export_dataset()
    np.testing.assert_array_equal(_nifti(root / "labelsTr" / "sparse.nii.gz"), expected)

    # 5. correct and accept: the case is fully annotated, exported to imagesTr without ignore
    segmentation = logic.begin_correction("sparse")
    corrected = completed.copy()
    corrected[6] = truth[6]  # the clinician fixes slice 6
    for name, value in CLASSES.items():
        slicer.util.updateSegmentBinaryLabelmapFromArray((corrected == value).astype(np.uint8), segmentation, name,
                                                         volume)
    logic.accept_as_labeled("sparse")
    case = cases.find_case(scene, "sparse")
    assert case.status == Status.LABELED and sparse.annotated_slices(volume) is None
    assert {row.case_name: row.cells[5] for row in panel.case_rows(logic)}["sparse"] == "all"
    exported = logic.export_dataset()
    data = json.loads((root / "dataset.json").read_text())
    assert "3" not in data["labels"]  # no sparse case left: no ignore label
    assert {"image": "imagesTr/sparse.nii.gz", "label": "labelsTr/sparse.nii.gz"} in data["training"]
    np.testing.assert_array_equal(_nifti(root / "labelsTr" / "sparse.nii.gz"), corrected)
    assert not (root / "imagesUn" / "sparse.nii.gz").exists()
    # a new prediction no longer touches the accepted case
    before = case.segmentation
    logic.load_predictions(run_dir, out_dir)
    assert cases.find_case(scene, "sparse").segmentation is before


def test_slices_touched_in_segment_editor_are_the_annotated_ones(scene, tmp_path):
    image, truth = phantom_case(seed=3)
    volume = add_volume(scene, "edited", image)  # oblique: axial slices are normal to its closest voxel axis
    add_phantom(scene, "full", seed=0)
    tracker = sparse.EditTracker()
    case = cases.find_case(scene, "edited")
    with pytest.raises(PLBOptSlicerError, match="not tracked"):
        sparse.apply_marking(case, "edited", "axial", tracker)
    assert "tracking edits" in sparse.apply_marking(case, "track", "axial", tracker)  # no segmentation yet

    axis = sparse.array_axis(volume, "axial")
    edited = np.zeros_like(truth)
    picked = [slice(None)] * 3
    picked[axis] = [5, 7]
    edited[tuple(picked)] = truth[tuple(picked)]  # the clinician paints two slices of that axis
    add_segmentation(scene, volume, {n: edited == v for n, v in CLASSES.items()}, COLORS)
    case = cases.find_case(scene, "edited")
    assert sparse.apply_marking(case, "edited", "axial", tracker).startswith("edited: annotated 2/")
    assert sparse.annotated_slices(volume).indices == (5, 7)

    # erasing is an edit too, and slices marked before in the same orientation stay marked
    sparse.apply_marking(case, "track", "axial", tracker)
    erased = edited.copy()
    picked[axis] = [5]
    erased[tuple(picked)] = 0  # slice 5 erased
    picked[axis] = [9]
    erased[tuple(picked)] = truth[tuple(picked)]  # slice 9 painted
    for name, value in CLASSES.items():
        slicer.util.updateSegmentBinaryLabelmapFromArray((erased == value).astype(np.uint8), case.segmentation,
                                                         name, volume)
    sparse.apply_marking(case, "edited", "axial", tracker)
    assert sparse.annotated_slices(volume).indices == (5, 7, 9)
    sparse.apply_marking(case, "track", "axial", tracker)
    with pytest.raises(PLBOptSlicerError, match="no slice was edited"):
        sparse.apply_marking(case, "edited", "axial", tracker)

    # the export writes ignore on the other slices of that axis
    WorkflowLogic(scene, working_dir=tmp_path).export_dataset()
    written = np.moveaxis(_nifti(tmp_path / "dataset" / "labelsTr" / "edited.nii.gz"), axis, 0)
    assert (written[[k for k in range(written.shape[0]) if k not in (5, 7, 9)]] == IGNORE).all()
    np.testing.assert_array_equal(written[[5, 7, 9]], np.moveaxis(erased, axis, 0)[[5, 7, 9]])

    assert sparse.apply_marking(case, "all", "axial", tracker) == "edited: every slice annotated"
    assert sparse.annotated_slices(volume) is None and not tracker.tracking(case)


def test_a_segment_named_ignore_is_refused_and_a_run_table_has_no_ignore_class(scene, tmp_path):
    image, label = phantom_case(seed=0)
    volume = add_volume(scene, "c", image)
    add_segmentation(scene, volume, {"liver": label == 1, "Ignore": label == 2})
    with pytest.raises(PLBOptSlicerError, match="'Ignore' is reserved"):
        WorkflowLogic(scene, working_dir=tmp_path).export_dataset()
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "ignore"}}))
    assert cases.read_class_table(path)[0] == {0: "background", 1: "liver"}


def test_marking_a_case_without_segments_says_what_to_do(scene):
    image, _ = phantom_case()
    add_volume(scene, "empty", image)
    case = cases.find_case(scene, "empty")
    with pytest.raises(PLBOptSlicerError, match="has no segment; paint some slices first"):
        sparse.apply_marking(case, "segments", "axial", sparse.EditTracker())


def test_the_panel_has_the_widgets_the_module_uses_and_a_column_per_cell(scene, tmp_path):
    import re
    import xml.etree.ElementTree as ElementTree

    from conftest import MODULE_DIR

    ui = ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "PLBOpt.ui")
    widgets = {node.get("name") for node in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "PLBOpt.py").read_text()))
    assert {"annotatedAxisComboBox", "markSegmentSlicesButton", "trackEditsButton", "markEditedSlicesButton",
            "fullyAnnotatedButton"} <= used
    assert used <= widgets, sorted(used - widgets)
    table = next(node for node in ui.iter("widget") if node.get("name") == "casesTable")
    headers = [column.find("property/string").text for column in table.findall("column")]
    add_phantom(scene, "full", seed=0)
    row = panel.case_rows(WorkflowLogic(scene, working_dir=tmp_path))[0]
    assert len(headers) == len(row.cells) and headers[4] == "Why (not) used" and headers[5] == "Annotated"
