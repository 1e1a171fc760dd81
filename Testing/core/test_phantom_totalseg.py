"""Embedded phantom dataset and the TotalSegmentator importer (on the real example files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.data.dataset import load_dataset, validate_dataset
from PLBOptCore.data.phantom import COLORS, LABELS, ORIGIN_XYZ, SPACING_ZYX, make_phantom_case, make_phantom_dataset
from PLBOptCore.data.totalseg import import_totalsegmentator
from PLBOptCore.errors import DatasetError

TOTALSEG = Path("/work/shared/data/totalsegmentator-example")


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---- phantom ---------------------------------------------------------------------------------------

def test_phantom_dataset_layout_and_validity(tmp_path):
    root = make_phantom_dataset(tmp_path / "ph", n_labeled=2, n_unlabeled=2, n_test=1, n_validation=1,
                                shape=(16, 32, 32))
    spec = load_dataset(root)
    validate_dataset(spec)
    assert spec.labels == LABELS and spec.colors[1] == COLORS[1]
    assert [len(spec.training), len(spec.unlabeled), len(spec.validation), len(spec.test)] == [2, 2, 1, 1]
    assert spec.training[0].image.parent.name == "imagesTr" and spec.training[0].label.parent.name == "labelsTr"
    assert spec.unlabeled[0].image.parent.name == "imagesUn" and spec.unlabeled[0].label is None
    assert spec.validation[0].label.parent.name == "labelsVal" and spec.test[0].label.parent.name == "labelsTs"
    image = sitk.ReadImage(str(spec.training[0].image))
    assert image.GetSize() == (32, 32, 16) and image.GetPixelID() == sitk.sitkInt16
    assert image.GetSpacing() == tuple(reversed(SPACING_ZYX)) and image.GetOrigin() == ORIGIN_XYZ
    assert not (tmp_path / "ph" / "imagesVal").exists() or (tmp_path / "ph" / "labelsVal").exists()
    no_val = make_phantom_dataset(tmp_path / "ph2", 1, 0, 0, n_validation=0, shape=(16, 32, 32))
    assert not (no_val / "imagesVal").exists() and json.loads((no_val / "dataset.json").read_text())["validation"] == []


def test_phantom_is_deterministic(tmp_path):
    a = make_phantom_dataset(tmp_path / "a", 1, 1, 0, n_validation=0, shape=(12, 24, 24), seed=3)
    b = make_phantom_dataset(tmp_path / "b", 1, 1, 0, n_validation=0, shape=(12, 24, 24), seed=3)
    c = make_phantom_dataset(tmp_path / "c", 1, 1, 0, n_validation=0, shape=(12, 24, 24), seed=4)
    for rel in ("imagesTr/phantom_000.nii.gz", "labelsTr/phantom_000.nii.gz", "imagesUn/phantom_001.nii.gz"):
        np.testing.assert_array_equal(_array(a / rel), _array(b / rel))
    assert not np.array_equal(_array(a / "imagesTr/phantom_000.nii.gz"), _array(c / "imagesTr/phantom_000.nii.gz"))
    assert not np.array_equal(_array(a / "imagesTr/phantom_000.nii.gz"), _array(a / "imagesUn/phantom_001.nii.gz"))


def test_phantom_anatomy_is_realistic_and_varies():
    shape = (48, 96, 96)
    cases = [make_phantom_case(shape, np.random.default_rng([0, i])) for i in range(3)]
    for image, label in cases:
        counts = np.bincount(label.ravel(), minlength=7)
        assert (counts[1:] > 0).all(), counts  # every organ present
        assert counts[1] == counts[1:].max() and counts[6] < counts[1] / 10  # large liver, small gallbladder
        mean = {c: image[label == c].mean() for c in range(1, 7)}
        assert 80 < mean[1] < 130 and 90 < mean[2] < 140 and abs(mean[1] - mean[2]) < 30  # portal venous; liver/spleen overlap
        # organs stand out from the visceral fat/bowel mixture around them
        inner = (label == 0) & (image > -60) & (image < 60)
        assert mean[1] - image[inner].mean() > 60
        assert mean[3] > 100 and mean[4] > 100 and mean[5] > 120 and -20 < mean[6] < 50
        assert image[label == 0].min() < -900 and (image[label == 0] > 500).sum() > 100  # air; unlabeled bone
        assert 10 < image[label == 1].std() < 40  # noise and blur, not flat
        # patient right (small X) holds the liver, patient left the spleen
        assert np.nonzero(label == 1)[2].mean() < shape[2] / 2 < np.nonzero(label == 2)[2].mean()
    assert not np.array_equal(cases[0][1], cases[1][1])


# ---- TotalSegmentator ------------------------------------------------------------------------------

def test_import_totalsegmentator_example(tmp_path):
    classes = ["liver", "spleen", "kidney_left", "aorta"]
    root = import_totalsegmentator(TOTALSEG, tmp_path / "ts", classes)
    spec = load_dataset(root)
    validate_dataset(spec)
    assert spec.labels == {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "aorta"}
    assert [c.name for c in spec.training] == ["ct_small"]
    assert sorted(c.name for c in spec.unlabeled) == ["ct_unlabeled_3mm", "ct_unlabeled_crop_1p5mm"]
    source = _array(TOTALSEG / "labels_small.nii.gz")
    label = _array(spec.training[0].label)
    for new, old in ((1, 5), (2, 1), (3, 3), (4, 52)):
        assert (label == new).sum() == (source == old).sum() > 0
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    image, label_image = sitk.ReadImage(str(spec.training[0].image)), sitk.ReadImage(str(spec.training[0].label))
    assert image.GetOrigin() == label_image.GetOrigin() and image.GetDirection() == label_image.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), _array(TOTALSEG / "ct_small.nii.gz"))


@pytest.mark.parametrize("classes, problem", [
    (["liverr"], "did you mean liver"),
    (["brain_of_a_cat"], "valid names include spleen, kidney_right"),
    (["liver", "liver"], "chosen twice"),
    ([], "at least one class"),
])
def test_import_totalsegmentator_bad_classes(tmp_path, classes, problem):
    with pytest.raises(DatasetError) as err:
        import_totalsegmentator(TOTALSEG, tmp_path / "ts", classes)
    assert str(err.value).startswith(f"{TOTALSEG / 'classes_total_v2.json'}: ") and problem in str(err.value)
    assert not (tmp_path / "ts").exists()


def test_import_totalsegmentator_warns_for_absent_class_and_needs_labels(tmp_path):
    with pytest.warns(UserWarning, match="absent from every label map: esophagus"):
        import_totalsegmentator(TOTALSEG, tmp_path / "ts", ["liver", "esophagus"])
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TOTALSEG / "classes_total_v2.json", src)
    shutil.copy(TOTALSEG / "ct_small.nii.gz", src)
    with pytest.raises(DatasetError, match="no labeled CT"):
        import_totalsegmentator(src, tmp_path / "out", ["liver"])


def test_demo_data_only_writes_the_split_asked_for_and_refuses_bad_counts(tmp_path, capfd):
    from PLBOptCore.cli import main

    assert main(["demo", "--data-only", "-o", str(tmp_path / "ph"), "--labeled", "1", "--unlabeled", "2",
                 "--validation", "0", "--test", "3"]) == 0
    spec = load_dataset(tmp_path / "ph")
    assert [len(spec.training), len(spec.unlabeled), len(spec.validation), len(spec.test)] == [1, 2, 0, 3]
    # cases are numbered across the splits, so a longer test split extends the default one
    assert [case.name for case in spec.test] == ["phantom_003", "phantom_004", "phantom_005"]
    capfd.readouterr()
    assert main(["demo", "--data-only", "-o", str(tmp_path / "bad"), "--test", "-1"]) == 2
    assert capfd.readouterr().err.strip() == "plbopt: error: --test must be at least 0, got -1"
    assert main(["demo", "-o", str(tmp_path / "bad"), "--test", "0"]) == 2
    assert not (tmp_path / "bad").exists()


def test_demo_montage_is_a_png_written_in_place(tmp_path):
    from PLBOptCore.data.io import case_name
    from PLBOptCore.demo import write_montage

    spec = load_dataset(make_phantom_dataset(tmp_path / "data", n_labeled=1, n_unlabeled=0, n_test=2,
                                             n_validation=0, shape=(16, 32, 32)))
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for case in spec.test:  # the ground truth stands in for predictions
        shutil.copy(case.label, predictions / f"{case_name(case.image)}.nii.gz")
    path = write_montage(spec, predictions, tmp_path / "new" / "montage.png")
    assert path == tmp_path / "new" / "montage.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["montage.png"]  # no temporary left
