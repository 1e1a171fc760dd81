"""Hostile inputs through the CLI: one line naming the file and the problem, exit 2, nothing written.

Every case starts from one small valid dataset (one labeled and one unlabeled 16×32×32 case) and
breaks one thing.
Most run through ``PLBOptCore.cli.main`` for speed; a few run ``python -m PLBOptCore`` in a
subprocess to prove that a real process prints no traceback; ``capfd`` (not ``capsys``) also
catches what ITK prints from C++. All of them fail before training: "nothing written" means no
run/output folder and no file added to the dataset folder (in particular no ``.plbopt_cache``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.cli import main
from PLBOptCore.data.dataset import load_dataset, validate_dataset

SHAPE = (16, 32, 32)  # (Z, Y, X)
SPACING = (1.5, 1.5, 2.5)  # (x, y, z)
ORIGIN = (-20.0, 10.0, 300.0)
IMAGE, LABEL, UNLABELED = "imagesTr/case.nii.gz", "labelsTr/case.nii.gz", "imagesUn/other.nii.gz"


def _ct() -> np.ndarray:
    """Air around a soft-tissue body holding a brighter organ (int16 HU, like a scanner writes)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    ct = np.where(y ** 2 + x ** 2 < 0.8, 40.0, -1000.0) + np.random.default_rng(0).normal(0, 10, SHAPE)
    ct[_organ()] = 150.0
    return ct.astype(np.int16)


def _organ() -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    return z ** 2 + y ** 2 + x ** 2 < 0.25


def _write(array: np.ndarray, path: Path, spacing=SPACING, origin=ORIGIN, direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        if direction is not None:
            image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def _write_json(root: Path, data: dict) -> Path:
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def _valid_json() -> dict:
    return {"name": "hostile", "labels": {"0": "background", "1": "organ"},
            "training": [{"image": IMAGE, "label": LABEL}], "unlabeled": [{"image": UNLABELED}]}


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    _write(_ct(), root / IMAGE)
    _write(_organ().astype(np.uint8), root / LABEL)
    _write(_ct()[::-1].copy(), root / UNLABELED)
    _write_json(root, _valid_json())
    return root


def test_the_unbroken_dataset_is_valid(dataset):
    """Control: every failure below comes from the one thing each case breaks."""
    validate_dataset(load_dataset(dataset), deep=True)


# ---- the cases: each breaks the dataset and returns (file to be named, problem) -------------------

def _truncated_nifti(root: Path) -> Tuple[Path, str]:
    path = root / IMAGE
    path.write_bytes(path.read_bytes()[:-200])
    return path, "truncated"


def _wrong_magic(root: Path) -> Tuple[Path, str]:
    path = root / IMAGE
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    return path, "wrong magic bytes"


def _image_2d(root: Path) -> Tuple[Path, str]:
    return _write(_ct()[8], root / IMAGE), "image is 2D"


def _image_4d(root: Path) -> Tuple[Path, str]:
    # JoinSeries: GetImageFromArray would read a 4D array as a 3D image of X-component vectors.
    frame = sitk.GetImageFromArray(_ct())
    path = root / IMAGE
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    return path, "image is 4D (size 32×32×16×2)"


def _image_vector(root: Path) -> Tuple[Path, str]:
    path = root / IMAGE
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([_ct()] * 3, axis=-1), isVector=True), str(path))
    return path, "3 components per voxel"


def _label_value_not_in_json(root: Path) -> Tuple[Path, str]:
    return _write(_organ().astype(np.uint8) * 5, root / LABEL), "label values [5] are not in dataset.json"


def _label_negative(root: Path) -> Tuple[Path, str]:
    return _write(-_organ().astype(np.int16), root / LABEL), "label values [-1] are not in dataset.json"


def _float_label(root: Path) -> Tuple[Path, str]:
    return _write(_organ().astype(np.float32) * 0.5, root / LABEL), "non-integer values (e.g. 0.5)"


def _size_mismatch(root: Path) -> Tuple[Path, str]:
    return _write(_organ()[:, :, :30].astype(np.uint8), root / LABEL), "size (30, 32, 16)"


def _spacing_mismatch(root: Path) -> Tuple[Path, str]:
    return _write(_organ().astype(np.uint8), root / LABEL, spacing=(1.5, 1.5, 5.0)), "spacing (1.5, 1.5, 5)"


def _origin_mismatch(root: Path) -> Tuple[Path, str]:
    return _write(_organ().astype(np.uint8), root / LABEL, origin=(-20.0, 40.0, 300.0)), "origin (-20, 40, 300)"


def _direction_mismatch(root: Path) -> Tuple[Path, str]:
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return _write(_organ().astype(np.uint8), root / LABEL, direction=flipped), "direction (-1, 0, 0"


def _nan_voxels(root: Path) -> Tuple[Path, str]:
    # NRRD, not NIfTI: SimpleITK's NIfTI writer may apply scaling that does not keep NaN reliably.
    ct = _ct().astype(np.float32)
    ct[3, 4, 5] = ct[6, 7, 8] = np.nan
    _write_json(root, {**_valid_json(), "training": [{"image": "imagesTr/case.nrrd", "label": LABEL}]})
    return _write(ct, root / "imagesTr/case.nrrd"), "2 NaN/Inf voxels"


def _inf_voxels(root: Path) -> Tuple[Path, str]:
    ct = _ct().astype(np.float32)
    ct[0, 0, 0] = np.inf
    _write_json(root, {**_valid_json(), "training": [{"image": "imagesTr/case.mha", "label": LABEL}]})
    return _write(ct, root / "imagesTr/case.mha"), "1 NaN/Inf voxels"


def _constant_image(root: Path) -> Tuple[Path, str]:
    return _write(np.full(SHAPE, -1000, np.int16), root / IMAGE), "image is constant (every voxel = -1000)"


def _empty_labels(root: Path) -> Tuple[Path, str]:
    _write(np.zeros(SHAPE, np.uint8), root / LABEL)
    return root / "dataset.json", "every training label is empty"


def _missing_keys(root: Path) -> Tuple[Path, str]:
    data = _valid_json()
    del data["labels"]
    return _write_json(root, data), "missing required keys ['labels']"


def _invalid_json(root: Path) -> Tuple[Path, str]:
    (root / "dataset.json").write_text('{"labels": {"0": "background",')
    return root / "dataset.json", "invalid JSON"


def _labels_not_a_mapping(root: Path) -> Tuple[Path, str]:
    return _write_json(root, {**_valid_json(), "labels": ["background", "organ"]}), "'labels' must be a non-empty mapping"


def _path_traversal(root: Path) -> Tuple[Path, str]:
    _write(_ct(), root.parent / "outside.nii.gz")  # exists: refused for where it is, not for being missing
    data = {**_valid_json(), "training": [{"image": "imagesTr/../../outside.nii.gz", "label": LABEL}]}
    return _write_json(root, data), "points outside the dataset folder"


def _absolute_path(root: Path) -> Tuple[Path, str]:
    data = {**_valid_json(), "training": [{"image": str((root / IMAGE).resolve()), "label": LABEL}]}
    return _write_json(root, data), "must be relative to the dataset folder"


def _missing_file(root: Path) -> Tuple[Path, str]:
    (root / LABEL).unlink()
    return root / LABEL, "file not found"


def _label_is_a_folder(root: Path) -> Tuple[Path, str]:
    (root / "labelsTr/empty").mkdir()
    data = {**_valid_json(), "training": [{"image": IMAGE, "label": "labelsTr/empty"}]}
    _write_json(root, data)
    return root / "labelsTr/empty", "folder contains no DICOM series"


def _no_unlabeled_cases(root: Path) -> Tuple[Path, str]:
    # The default preset (plbopt) is semi-supervised: refused before the run folder or cache exist.
    _write_json(root, {**_valid_json(), "unlabeled": []})
    return root, "preset 'plbopt' needs unlabeled cases"


TRAIN_CASES: Dict[str, Callable[[Path], Tuple[Path, str]]] = {
    f.__name__.lstrip("_"): f for f in (
        _truncated_nifti, _wrong_magic, _image_2d, _image_4d, _image_vector, _label_value_not_in_json,
        _label_negative, _float_label, _size_mismatch, _spacing_mismatch, _origin_mismatch, _direction_mismatch,
        _nan_voxels, _inf_voxels, _constant_image, _empty_labels, _missing_keys, _invalid_json,
        _labels_not_a_mapping, _path_traversal, _absolute_path, _missing_file, _label_is_a_folder,
        _no_unlabeled_cases)
}
# Run as real processes: a corrupt file, a JSON problem and a path attack.
SUBPROCESS_CASES = {"truncated_nifti", "invalid_json", "path_traversal"}


# ---- running the CLI and checking the outcome ---------------------------------------------------

def _snapshot(folder: Path) -> Set[str]:
    """Every file and folder below ``folder`` (hidden ones included) with its size and mtime."""
    return {f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in folder.rglob("*")}


def _run_cli(args: List[str], in_subprocess: bool, capfd) -> Tuple[int, str]:
    """Exit code and stderr of ``plbopt ARGS``."""
    if not in_subprocess:
        code = main(args)
        return code, capfd.readouterr().err
    # Repository root on the path so the subprocess imports this checkout, wherever pytest runs from.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "PLBOptCore", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    return result.returncode, result.stderr


def _assert_one_line_error(code: int, err: str, named: Path, problem: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"plbopt: error: {named}: "), err
    assert problem in lines[0], err


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_train_refuses_hostile_dataset(name, dataset, tmp_path, capfd):
    named, problem = TRAIN_CASES[name](dataset)
    before = _snapshot(tmp_path)
    run_dir = tmp_path / "run"
    code, err = _run_cli(["train", str(dataset), "-o", str(run_dir)], name in SUBPROCESS_CASES, capfd)
    _assert_one_line_error(code, err, named, problem)
    assert not run_dir.exists(), "the run folder was created"
    assert _snapshot(tmp_path) == before, "files were written next to or into the dataset"


def test_train_refuses_a_run_folder_that_is_a_file(dataset, tmp_path, capfd):
    run_file = tmp_path / "run"
    run_file.write_text("my notes")
    before = _snapshot(tmp_path)
    code, err = _run_cli(["train", str(dataset), "-o", str(run_file)], False, capfd)
    _assert_one_line_error(code, err, run_file, "exists and is not a folder")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("content, problem", [({"weights": torch.ones(2)}, "not a PLBOpt checkpoint"),
                                              ({"format": "plbopt-checkpoint", "models": [{}]}, "has 1 subnets")])
def test_train_refuses_a_bad_init_from_checkpoint(content, problem, dataset, tmp_path, capfd):
    checkpoint = tmp_path / "init.pt"
    torch.save(content, checkpoint)
    before = _snapshot(tmp_path)
    code, err = _run_cli(["train", str(dataset), "-o", str(tmp_path / "run"), "--init-from", str(checkpoint)],
                         False, capfd)
    _assert_one_line_error(code, err, checkpoint, problem)
    assert _snapshot(tmp_path) == before


# ---- checkpoints that are not ours ------------------------------------------------------------

class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: proof that code would have run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _predict_with_checkpoint(dataset: Path, tmp_path: Path, payload: object, in_subprocess: bool,
                             capfd) -> Tuple[int, str, Path]:
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(payload, checkpoint)
    args = ["predict", str(tmp_path / "run"), str(dataset / IMAGE), "-o", str(tmp_path / "out")]
    code, err = _run_cli(args, in_subprocess, capfd)
    assert not (tmp_path / "out").exists(), "the output folder was created"
    return code, err, checkpoint


def test_predict_refuses_a_foreign_checkpoint(dataset, tmp_path, capfd):
    code, err, checkpoint = _predict_with_checkpoint(dataset, tmp_path, {"state_dict": {"w": torch.ones(3)}},
                                                     False, capfd)
    _assert_one_line_error(code, err, checkpoint, "not a PLBOpt checkpoint")


def test_predict_never_executes_a_pickle_payload(dataset, tmp_path, capfd):
    marker = tmp_path / "payload-ran"
    payload = {"format": "plbopt-checkpoint", "version": 1, "models": _Payload(marker)}
    # Control: the payload is live, an unsafe torch.load would run it.
    torch.save(payload, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    code, err, checkpoint = _predict_with_checkpoint(dataset, tmp_path, payload, True, capfd)
    _assert_one_line_error(code, err, checkpoint, "refused to load")
    assert not marker.exists(), "the pickle payload was executed"
