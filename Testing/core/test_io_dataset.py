"""Image I/O and dataset.json loading/validation: every user mistake gives a DatasetError naming the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.data.dataset import Case, default_color, load_dataset, validate_dataset, write_dataset_json
from PLBOptCore.data.io import array_to_image, case_name, check_same_geometry, read_header, read_image, write_image
from PLBOptCore.errors import DatasetError

DICOM = Path("/work/shared/data/dicom-ct-3slice")
SPACING, ORIGIN = (0.8, 0.8, 2.0), (-10.0, 5.0, 100.0)  # (x, y, z)


def _image(array: np.ndarray, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _ct(seed: int = 0, shape=(6, 10, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, size=shape).astype(np.int16)


def _label(shape=(6, 10, 12), value: int = 1) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:4, 3:6, 4:8] = value
    return label


def _write(array: np.ndarray, path: Path, **kw) -> Path:
    write_image(_image(array, **kw), path)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two labeled cases, one unlabeled, one test; labels 0..2."""
    root = tmp_path / "ds"
    training = []
    for i in range(2):
        image = _write(_ct(i), root / "imagesTr" / f"c{i}.nii.gz")
        label = _write(_label(value=i + 1), root / "labelsTr" / f"c{i}.nii.gz")
        training.append(Case(f"c{i}", image, label))
    unlabeled = [Case("u0", _write(_ct(5), root / "imagesUn" / "u0.nii.gz"))]
    test = [Case("t0", _write(_ct(6), root / "imagesTs" / "t0.nii.gz"))]
    write_dataset_json(root, {0: "background", 1: "spleen", 2: "liver"}, training, unlabeled, test=test,
                       colors={1: (255, 0, 0)})
    return root


def _edit_json(root: Path, **changes) -> None:
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- io ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha"])
def test_read_write_roundtrip(tmp_path, suffix):
    array = _ct()
    path = _write(array, tmp_path / f"a{suffix}")
    image = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    assert image.GetSpacing() == pytest.approx(SPACING) and image.GetOrigin() == pytest.approx(ORIGIN)
    assert case_name(path) == "a"
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temporary behind


def test_case_name_of_folder(tmp_path):
    assert case_name(DICOM / "ct") == "ct"
    assert case_name(tmp_path / "x.y.nii") == "x.y"


def test_read_dicom_series_and_nrrd_labels_with_tolerance():
    image = read_image(DICOM / "ct")
    assert image.GetSize() == (512, 512, 3)
    for name in ("liver_spine_seg.nrrd", "heart_seg.nrrd"):
        label = read_image(DICOM / name)
        # z spacing 0.9999999999999929 (DICOM) vs 1.0 (NRRD): equal within the tolerance
        check_same_geometry(image, label, DICOM / "ct", DICOM / name)
        check_same_geometry(image, read_header(DICOM / name), DICOM / "ct", DICOM / name)


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_4d(path: Path) -> Path:
    write_image(sitk.JoinSeries([_image(_ct()), _image(_ct())]), path)
    return path


def _truncated(src: Path, dst: Path, n: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n])
    return dst


@pytest.mark.parametrize("make, problem", [
    (lambda d: d / "missing.nii.gz", "file not found"),
    (lambda d: _bytes(d / "empty.nii.gz", b""), "empty (0 bytes)"),
    (lambda d: _truncated(_write(_ct(), d / "ok.nii.gz"), d / "t.nii.gz", 100), "truncated"),
    (lambda d: _truncated(_write(_ct(), d / "ok.nii.gz"), d / "t.nii.gz", -40), "truncated"),
    (lambda d: _truncated(_write(_ct(), d / "ok.nii"), d / "t.nii", -100), "truncated"),
    (lambda d: _truncated(_write(_ct(), d / "ok.nii"), d / "t.nii", 100), "truncated"),
    (lambda d: _truncated(_write(_ct(), d / "ok.nrrd"), d / "t.nrrd", -50), "truncated or corrupt"),
    (lambda d: _bytes(d / "text.nii.gz", b"hello"), "wrong magic"),
    (lambda d: _bytes(d / "a.nrrd", _write(_ct(), d / "ok.nii.gz").read_bytes()), "not a NRRD file"),
    (lambda d: _bytes(d / "g.nii.gz", gzip.compress(b"x" * 400)), "invalid header"),
    (lambda d: _bytes(d / "a.png", b"\x89PNG"), "unsupported file type"),
    (lambda d: (d / "folder").mkdir() or d / "folder", "no DICOM series"),
    (lambda d: _write(np.zeros((10, 12), np.int16), d / "flat.nii.gz"), "2D"),
    (lambda d: _write(np.zeros((1, 10, 12), np.int16), d / "one.nii.gz"), "2D"),
    (lambda d: _write_4d(d / "4d.nii.gz"), "4D"),
    (lambda d: _write(np.zeros((4, 5, 6, 3), np.uint8), d / "rgb.nrrd"), "3 components"),
    (lambda d: _write(np.where(_label() > 0, np.nan, 1.0).astype(np.float32), d / "nan.nrrd"), "24 NaN/Inf"),
    (lambda d: _write(np.full((4, 5, 6), np.inf, np.float32), d / "inf.mha"), "NaN/Inf"),
])
def test_read_image_errors_name_the_file(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(DatasetError) as err:
        read_image(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message, message


@pytest.mark.parametrize("change, what, values", [
    (lambda im: sitk.GetImageFromArray(np.zeros((6, 10, 13), np.uint8)), "size", "(13, 10, 6)"),
    (lambda im: im.SetSpacing((0.8, 0.8, 2.5)), "spacing", "(0.8, 0.8, 2.5)"),
    (lambda im: im.SetOrigin((-10.0, 5.0, 101.0)), "origin", "(-10, 5, 101)"),
    (lambda im: im.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction", "(-1, 0, 0"),
])
def test_geometry_mismatch_names_both_files_and_values(tmp_path, change, what, values):
    ref = _image(_label())
    other = _image(_label())
    other = change(other) or other
    with pytest.raises(DatasetError) as err:
        check_same_geometry(ref, other, Path("img.nii.gz"), Path("lab.nii.gz"))
    message = str(err.value)
    assert message.startswith("lab.nii.gz: ") and "img.nii.gz" in message and what in message and values in message


def test_geometry_within_tolerance_passes():
    ref = _image(_label())
    other = _image(_label(), spacing=(0.8, 0.8, 2.0000001), origin=(-10.0, 5.0, 100.00001))
    check_same_geometry(ref, other, Path("a"), Path("b"))


def test_array_to_image_copies_geometry():
    ref = _image(_ct())
    out = array_to_image(np.ones((6, 10, 12), bool), ref)
    assert out.GetSpacing() == ref.GetSpacing() and out.GetOrigin() == ref.GetOrigin()
    assert out.GetPixelID() == sitk.sitkUInt8


# ---- dataset.json --------------------------------------------------------------------------------

def test_load_and_validate_good_dataset(dataset):
    spec = load_dataset(dataset)
    assert spec.num_classes == 3 and spec.labels == {0: "background", 1: "spleen", 2: "liver"}
    assert [c.name for c in spec.training] == ["c0", "c1"] and spec.training[0].label.is_file()
    assert [c.name for c in spec.unlabeled] == ["u0"] and spec.unlabeled[0].label is None
    assert spec.test[0].label is None and spec.validation == []
    assert spec.colors[1] == (255, 0, 0) and spec.colors[2] == default_color(2)
    validate_dataset(spec, deep=True)
    validate_dataset(spec, deep=False)


def test_nnunet_v2_labels_and_msd_string_entries(dataset):
    _edit_json(dataset, labels={"background": 0, "spleen": 1, "liver": 2}, test=["imagesTs/t0.nii.gz"])
    spec = load_dataset(dataset)
    assert spec.labels[2] == "liver" and spec.test[0].name == "t0"


@pytest.mark.parametrize("changes, problem", [
    (dict(training=[{"image": "../outside.nii.gz", "label": "labelsTr/c0.nii.gz"}]), "outside the dataset folder"),
    (dict(unlabeled=[{"image": "imagesUn/../../x.nii.gz"}]), "outside the dataset folder"),
    (dict(unlabeled=[{"image": "/etc/passwd"}]), "must be relative"),
    (dict(training=[]), "no labeled case"),
    (dict(training=[{"image": "imagesTr/c0.nii.gz"}]), "has no \"label\""),
    (dict(unlabeled=[{"image": "imagesTr/c0.nii.gz", "label": "labelsTr/c0.nii.gz"}]), "has a \"label\""),
    (dict(unlabeled=[{"label": "x"}]), "needs an \"image\""),
    (dict(unlabeled={"image": "x"}), "must be a list"),
    (dict(labels={"0": "background", "2": "liver"}), "contiguous"),
    (dict(labels={"0": "background"}), "contiguous"),
    (dict(labels={"0": "background", "x": "liver"}), "not an integer"),
    (dict(labels={"0": "background", "1": "a", "2": "a"}), "duplicate label names"),
    (dict(labels=[]), "'labels' must be"),
    (dict(colors={"5": [1, 2, 3]}), "not in 'labels'"),
    (dict(colors={"1": [1, 2]}), "[r, g, b]"),
    (dict(test=[{"image": "imagesTr/c0.nii.gz"}]), "appears twice"),
])
def test_bad_dataset_json(dataset, changes, problem):
    _edit_json(dataset, **changes)
    with pytest.raises(DatasetError) as err:
        load_dataset(dataset)
    assert str(err.value).startswith(f"{dataset / 'dataset.json'}: ") and problem in str(err.value)


def test_missing_keys_invalid_json_and_missing_files(dataset, tmp_path):
    path = dataset / "dataset.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "labels"}))
    with pytest.raises(DatasetError, match=r"missing required keys \['labels'\]"):
        load_dataset(dataset)
    path.write_text('{"labels": {"0": "background",}')
    with pytest.raises(DatasetError, match="invalid JSON"):
        load_dataset(dataset)
    path.unlink()
    with pytest.raises(DatasetError, match="dataset.json not found"):
        load_dataset(dataset)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")
    path.write_text(json.dumps(data))
    (dataset / "labelsTr" / "c1.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(dataset)
    assert str(err.value).startswith(f"{dataset / 'labelsTr' / 'c1.nii.gz'}: file not found")
    assert load_dataset(dataset, check_files=False).training[1].name == "c1"


def _validate_error(root: Path, deep: bool = True) -> str:
    with pytest.raises(DatasetError) as err:
        validate_dataset(load_dataset(root), deep=deep)
    return str(err.value)


def test_validate_label_values_not_in_labels(dataset):
    label = _label(value=1)
    label[0, 0, :3] = (7, 9, 7)
    path = _write(label, dataset / "labelsTr" / "c0.nii.gz")
    message = _validate_error(dataset)
    assert message.startswith(f"{path}: ") and "[7, 9]" in message


def test_validate_float_label_with_fractions(dataset):
    path = _write(_label().astype(np.float32) * 0.5, dataset / "labelsTr" / "c0.nii.gz")
    assert _validate_error(dataset).startswith(f"{path}: label map has non-integer values (e.g. 0.5)")
    _write(_label().astype(np.float32), path)  # whole-numbered floats are fine
    validate_dataset(load_dataset(dataset))


def test_validate_geometry_mismatch_deep_and_header_only(dataset):
    path = _write(_label(), dataset / "labelsTr" / "c1.nii.gz", spacing=(0.8, 0.8, 3.0))
    for deep in (True, False):
        message = _validate_error(dataset, deep)
        assert message.startswith(f"{path}: spacing (0.8, 0.8, 3)") and "(0.8, 0.8, 2)" in message
        assert str(dataset / "imagesTr" / "c1.nii.gz") in message


def test_validate_constant_image_and_nan(dataset):
    path = _write(np.full((6, 10, 12), -1000, np.int16), dataset / "imagesUn" / "u0.nii.gz")
    assert _validate_error(dataset) == f"{path}: image is constant (every voxel = -1000)"
    array = _ct().astype(np.float32)
    array[1, 2, 3] = np.nan
    path = _write(array, dataset / "imagesUn" / "u0.nrrd")  # ITK's NIfTI writer drops NaN
    _edit_json(dataset, unlabeled=[{"image": "imagesUn/u0.nrrd"}])
    assert _validate_error(dataset) == f"{path}: image contains 1 NaN/Inf voxels"
    validate_dataset(load_dataset(dataset), deep=False)  # header-only: voxel values are not read


def test_validate_all_labels_empty(dataset):
    for i in range(2):
        _write(np.zeros((6, 10, 12), np.uint8), dataset / "labelsTr" / f"c{i}.nii.gz")
    assert "every training label is empty" in _validate_error(dataset)
    _write(_label(), dataset / "labelsTr" / "c1.nii.gz")  # one non-empty case is enough
    validate_dataset(load_dataset(dataset))


def test_validate_truncated_image(dataset):
    path = dataset / "imagesTr" / "c1.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    assert _validate_error(dataset).startswith(f"{path}: file is truncated")


def test_write_dataset_json_relative_paths_and_outside_error(tmp_path):
    root = tmp_path / "ds"
    image = _write(_ct(), root / "imagesTr" / "a.nii.gz")
    label = _write(_label(), root / "labelsTr" / "a.nii.gz")
    path = write_dataset_json(root, {0: "background", 1: "x"}, [Case("a", image, label)], [], name="n")
    data = json.loads(path.read_text())
    assert data["training"] == [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]
    assert data["labels"] == {"0": "background", "1": "x"} and data["name"] == "n" and "colors" not in data
    with pytest.raises(DatasetError, match="must be inside the dataset folder"):
        write_dataset_json(root, {0: "background", 1: "x"}, [Case("b", tmp_path / "b.nii.gz", label)], [])


def test_symlinked_images_are_allowed(dataset, tmp_path):
    outside = _write(_ct(9), tmp_path / "elsewhere" / "u1.nii.gz")
    (dataset / "imagesUn" / "u1.nii.gz").symlink_to(outside)
    _edit_json(dataset, unlabeled=[{"image": "imagesUn/u0.nii.gz"}, {"image": "./imagesUn/../imagesUn/u1.nii.gz"}])
    spec = load_dataset(dataset)
    assert spec.unlabeled[1].image == dataset / "imagesUn" / "u1.nii.gz"
    validate_dataset(spec)
