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
import re
import shutil
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
from PLBOptCore.data.io import CASE_NAME_BYTES, check_case_name, read_header, read_image
from PLBOptCore.errors import DatasetError
from PLBOptCore.utils import atomic_write

SHAPE = (16, 32, 32)  # (Z, Y, X)
SPACING = (1.5, 1.5, 2.5)  # (x, y, z)
ORIGIN = (-20.0, 10.0, 300.0)
IMAGE, LABEL, UNLABELED = "imagesTr/case.nii.gz", "labelsTr/case.nii.gz", "imagesUn/other.nii.gz"
# The smallest training, for the few tests that need a run folder (and for old code that trained
# where it should have refused).
TINY_TRAIN = ["--preset", "supervised", "--iterations", "2", "--patch-size", "16", "32", "32", "--base-filters", "4",
              "--batch-size", "1", "--device", "cpu", "-q", "--set", "checkpoint_every=1", "validate_every=1000"]


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


def _make_dataset(root: Path) -> Path:
    _write(_ct(), root / IMAGE)
    _write(_organ().astype(np.uint8), root / LABEL)
    _write(_ct()[::-1].copy(), root / UNLABELED)
    _write_json(root, _valid_json())
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return _make_dataset(tmp_path / "data")


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


def _deeply_nested_json(root: Path) -> Tuple[Path, str]:
    (root / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)  # json.loads recurses per level
    return root / "dataset.json", "nested too deeply"


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


def _complex_image(root: Path) -> Tuple[Path, str]:
    return _write(_ct().astype(np.complex64) * (1 + 1j), root / IMAGE), "complex-valued voxels"


def _detached_header(root: Path, name: str, data_file_field: str) -> Path:
    """A MetaImage (.mhd) or NRRD header of the image whose voxels are wherever its data field says;
    listed as the training image in dataset.json."""
    header = root / "imagesTr" / name
    if name.endswith(".mhd"):
        header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 32 32 16\nElementType = MET_SHORT\n"
                          "ElementSpacing = 1.5 1.5 2.5\nOffset = -20 10 300\nBinaryData = True\n"
                          f"BinaryDataByteOrderMSB = False\nElementDataFile = {data_file_field}\n")
    else:
        header.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 32 32 16\nspacings: 1.5 1.5 2.5\n"
                          f"endian: little\nencoding: raw\ndata file: {data_file_field}\n")
    _write_json(root, {**_valid_json(), "training": [{"image": f"imagesTr/{name}", "label": LABEL}]})
    return header


def _secret(root: Path) -> Path:
    """A file outside the dataset that holds valid voxels: read, it would train without complaint."""
    path = root.parent / "secret.raw"
    path.write_bytes(_ct().astype("<i2").tobytes())
    return path


def _data_file_outside(root: Path) -> Tuple[Path, str]:
    _secret(root)
    return _detached_header(root, "case.mhd", "../../secret.raw"), "outside the folder of the header"


def _data_file_through_symlink(root: Path) -> Tuple[Path, str]:
    # the name stays in the folder; the link it names leads out of it
    (root / "imagesTr" / "case.raw").symlink_to(_secret(root))
    return _detached_header(root, "case.nrrd", "case.raw"), "outside the folder of the header"


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
        _no_unlabeled_cases, _complex_image, _data_file_outside, _data_file_through_symlink, _deeply_nested_json)
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


# ---- voxels read through a header: only from the header's own folder ---------------------------

@pytest.mark.parametrize("name, field", [("case.nrrd", "{secret}"),                  # absolute
                                         ("case.nrrd", "LIST\ncase.raw\n../../secret.raw"),
                                         ("case.mhd", "../../secret%d.raw 0 0 1"),  # printf pattern
                                         ("case.mhd", "sub/../../../secret.raw")])
def test_a_header_cannot_name_voxels_outside_its_folder(dataset, name, field):
    secret = _secret(dataset)
    shutil.copy(secret, dataset.parent / "secret0.raw")
    header = _detached_header(dataset, name, field.format(secret=secret))
    for read in (read_header, read_image):
        with pytest.raises(DatasetError, match=r"^" + re.escape(f"{header}: header reads its voxels from")):
            read(header)


def test_a_header_with_its_voxels_beside_it_is_read(dataset):
    """Control: detached data in the header's folder (or a subfolder) is read as before."""
    (dataset / "imagesTr" / "sub").mkdir()
    (dataset / "imagesTr" / "sub" / "case.raw").write_bytes(_ct().astype("<i2").tobytes())
    header = _detached_header(dataset, "case.mhd", "sub/case.raw")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(header)), _ct())
    validate_dataset(load_dataset(dataset), deep=True)


# ---- case names: one safe file name, wherever they come from -------------------------------------

def _nnunet_json(names: List[str]) -> dict:
    """nnU-Net v2 dataset.json whose explicit "dataset" key names the case(s)."""
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz",
            "numTraining": len(names), "unlabeled": "imagesUn",
            "dataset": {name: {"images": [IMAGE], "label": LABEL} for name in names}}


UNSAFE_NAMES = {"absolute": "{outside}/case", "parent": "../../case", "dotdot": "..", "dot": ".",
                "separator": "sub/case", "backslash": "sub\\case", "nul": "ca\x00se", "newline": "ca\nse",
                "hidden": ".tmp-1-case", "too_long": "c" * 231, "empty": ""}


@pytest.mark.parametrize("kind", sorted(UNSAFE_NAMES))
def test_train_refuses_a_case_name_that_is_no_safe_file_name(kind, dataset, tmp_path, capfd):
    """nnU-Net's "dataset" key names cases freely; the names become cache folders. Refused before
    anything is written, inside or outside the dataset (old code: exit 0, cache files anywhere)."""
    (tmp_path / "outside").mkdir()
    _write_json(dataset, _nnunet_json([UNSAFE_NAMES[kind].format(outside=tmp_path / "outside")]))
    before = _snapshot(tmp_path)
    code, err = _run_cli(["train", str(dataset), "-o", str(tmp_path / "run"), *TINY_TRAIN], False, capfd)
    _assert_one_line_error(code, err, dataset / "dataset.json", "case name")
    assert _snapshot(tmp_path) == before, "files were written"


def test_the_longest_case_name_still_fits_the_temporary_of_an_atomic_write(tmp_path):
    """The limit is the file system's: a name at the limit is written through its temporary."""
    name = "c" * CASE_NAME_BYTES
    assert check_case_name(name, tmp_path) == name
    with atomic_write(tmp_path / f"{name}.seg.nrrd") as tmp:
        tmp.write_bytes(b"x")
    with pytest.raises(DatasetError, match="bytes long"):
        check_case_name(name + "c", tmp_path)


def test_file_names_too_long_for_a_case_are_refused_with_their_folder(dataset, tmp_path, capfd):
    """Names made from file names (an --unlabeled folder, predict's inputs) pass the same check."""
    long_image = _write(_ct(), tmp_path / "extra" / ("u" * 240 + ".nii.gz"))
    code, err = _run_cli(["train", str(dataset), "-o", str(tmp_path / "run"), "--unlabeled", str(long_image.parent),
                          *TINY_TRAIN], False, capfd)
    _assert_one_line_error(code, err, long_image, "bytes long")
    code, err = _run_cli(["predict", str(tmp_path / "no-run"), str(long_image), "-o", str(tmp_path / "out")],
                         False, capfd)
    _assert_one_line_error(code, err, long_image, "bytes long")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


# ---- outputs: checked before the first byte, nothing existing replaced unasked -------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Tuple[Path, Path]:
    """(dataset, run folder) of a two-step supervised run on the unbroken dataset. Read only."""
    root = _make_dataset(tmp_path_factory.mktemp("trained") / "data")
    run = root.parent / "run"
    assert main(["train", str(root), "-o", str(run), "--cache-dir", str(root.parent / "cache"), *TINY_TRAIN]) == 0
    return root, run


def test_predict_replaces_no_existing_file_unless_asked(trained_run, tmp_path, capfd):
    """An existing file among the outputs (here the second case's confidence map) refuses the
    whole prediction before the first case is written; --overwrite replaces them."""
    root, run = trained_run
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a", "b"):
        shutil.copy(root / IMAGE, inputs / f"{name}.nii.gz")
    out = tmp_path / "out"
    mine = _write(np.full(SHAPE, 7, np.uint8), out / "confidence" / "b.nii.gz")
    before = _snapshot(tmp_path)
    code, err = _run_cli(["predict", str(run), str(inputs), "-o", str(out), "--device", "cpu", "-q"], False, capfd)
    _assert_one_line_error(code, err, mine, "exists; use --overwrite")
    assert _snapshot(tmp_path) == before, "something was written although an output exists"
    assert main(["predict", str(run), str(inputs), "-o", str(out), "--device", "cpu", "-q", "--overwrite"]) == 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(mine))).max() <= 1.0, "the confidence map was not replaced"
    # label maps alone in the output folder, confidence maps apart: nnU-Net's evaluation reads it
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "confidence"]


@pytest.mark.parametrize("overlap", ["-0.5", "1", "1.5", "nan"])
def test_predict_refuses_an_overlap_outside_0_to_1_before_reading_anything(overlap, dataset, tmp_path, capfd):
    code, err = _run_cli(["predict", str(tmp_path / "no-run"), str(dataset / IMAGE), "-o", str(tmp_path / "out"),
                          f"--overlap={overlap}"], False, capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "overlap: must be in [0, 1)" in err, err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_an_output_folder_that_is_a_file(dataset, tmp_path, capfd):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out in (notes, notes / "sub"):
        code, err = _run_cli(["predict", str(tmp_path / "no-run"), str(dataset / IMAGE), "-o", str(out)], False, capfd)
        _assert_one_line_error(code, err, notes, "exists and is not a folder")
    assert notes.read_text() == "mine"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where nobody may create files")
def test_an_output_folder_the_system_refuses_is_one_line(trained_run, tmp_path, capfd):
    """/proc passes the permission check even for root; the refused mkdir is still one line, exit 2."""
    root, run = trained_run
    out = Path("/proc/plbopt-no-such-folder")
    code, err = _run_cli(["predict", str(run), str(root / IMAGE), "-o", str(out), "--device", "cpu", "-q"], True, capfd)
    _assert_one_line_error(code, err, out, "")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_refuses_a_read_only_output_folder(dataset, tmp_path, capfd):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = _run_cli(["predict", str(tmp_path / "no-run"), str(dataset / IMAGE), "-o", str(locked / "out")],
                         False, capfd)
    _assert_one_line_error(code, err, locked, "not writable")


def test_export_never_writes_over_the_run_folders_files(trained_run, tmp_path, capfd):
    """`-o RUN/config.pt2` would put the sidecar over RUN/config.json (the run could not be
    resumed): refused even with --overwrite; other existing outputs only without it."""
    root, run = trained_run
    before = _snapshot(run)
    for extra in ([], ["--overwrite"]):
        code, err = _run_cli(["export", str(run), "-o", str(run / "config.pt2"), *extra], False, capfd)
        _assert_one_line_error(code, err, run / "config.json", "belongs to the run folder")
        code, err = _run_cli(["export", str(run), "-o", str(run / "checkpoints" / "model.pt2"), *extra], False, capfd)
        _assert_one_line_error(code, err, run / "checkpoints" / "model.pt2", "belongs to the run folder")
    assert _snapshot(run) == before
    sidecar = tmp_path / "model.json"
    sidecar.write_text("my notes")
    code, err = _run_cli(["export", str(run), "-o", str(tmp_path / "model.pt2")], False, capfd)
    _assert_one_line_error(code, err, sidecar, "exists; use --overwrite")
    assert sidecar.read_text() == "my notes" and not (tmp_path / "model.pt2").exists()


def test_evaluate_refuses_absurd_label_values_without_allocating_for_them(tmp_path, capfd):
    """One voxel of 2·10⁹: np.bincount would allocate 16 GB, and class_1..class_K names and
    passes over the volume would never end. Refused in one line; label values named in
    --labels may be sparse and large."""
    gt = _organ().astype(np.int32)
    _write(gt, tmp_path / "gt" / "case.nii.gz")
    absurd = gt.copy()
    absurd[0, 0, 0] = 2_000_000_000
    _write(absurd, tmp_path / "pred" / "case.nii.gz")
    code, err = _run_cli(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")], False, capfd)
    _assert_one_line_error(code, err, tmp_path / "pred" / "case.nii.gz", "label value 2000000000 is above 1000")
    labels = _write_json(tmp_path, {"labels": {"0": "background", "1": "organ"}})
    code, err = _run_cli(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", str(labels)],
                         False, capfd)
    _assert_one_line_error(code, err, tmp_path / "pred" / "case.nii.gz", "label values [2000000000] are not in")
    sparse = np.where(gt > 0, 5000, 0).astype(np.int32)  # FreeSurfer-like label numbers
    for folder in ("pred", "gt"):
        _write(sparse, tmp_path / folder / "case.nii.gz")
    labels = _write_json(tmp_path, {"labels": {"0": "background", "5000": "organ"}})
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", str(labels)]) == 0
    assert json.loads((tmp_path / "pred" / "metrics.json").read_text())["classes"]["organ"]["dice"]["mean"] == 1.0


def test_plot_skips_events_lines_that_are_no_records(tmp_path, capfd):
    """events.jsonl edited or damaged: lines that are not UTF-8, not objects, or carry values of
    the wrong type are left out of the curves instead of ending `plbopt plot` in a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    good = [{"type": "train", "step": step, "loss": 1.0 / step, "refine_gain": {"organ": 0.01}} for step in (1, 2, 3)]
    bad = [b"\xff\xfe not utf-8\n", b"[1, 2]\n", b'"text"\n', b"null\n", b"[" * 50_000 + b"\n",
           b'{"type": "train", "step": "two", "loss": 0.5}\n', b'{"type": "train", "step": 4, "loss": "high"}\n',
           b'{"type": "train", "step": 5, "loss": 0.1, "refine_gain": [0.1]}\n',
           b'{"type": "train", "step": 6, "loss": 0.1, "refine_gain": {"organ": "up"}}\n']
    lines = [json.dumps(record).encode() + b"\n" for record in good]
    (run / "events.jsonl").write_bytes(b"".join(lines[:2] + bad + lines[2:]))
    assert main(["plot", str(run), "-o", str(tmp_path / "curves.png")]) == 0, capfd.readouterr().err
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    from PLBOptCore.bench.plots import mean_curve, refine_gain_curves
    steps, values = mean_curve([run], "train", "loss")
    assert steps.tolist() == [1, 2, 3, 5, 6] and values[:3].tolist() == pytest.approx([1, 0.5, 1 / 3])
    assert refine_gain_curves([run])["organ"][0].tolist() == [1, 2, 3]


# ---- voxel spacings no medical image has --------------------------------------------------------

@pytest.mark.parametrize("spacing", [(0.0015, 0.0015, 0.0025),  # metres: old code trained a one-class volume
                                     (1.5, 1.5, 250.0), (1.5, 0.004, 2.5)])
def test_an_implausible_voxel_spacing_is_refused_naming_the_file(spacing, dataset, tmp_path, capfd):
    # image and label alike, so that only the spacing is left to refuse them
    image = _write(_ct(), dataset / IMAGE, spacing=spacing)
    _write(_organ().astype(np.uint8), dataset / LABEL, spacing=spacing)
    before = _snapshot(tmp_path)
    code, err = _run_cli(["train", str(dataset), "-o", str(tmp_path / "run"), *TINY_TRAIN], False, capfd)
    _assert_one_line_error(code, err, image, "is not that of a medical image")
    code, err = _run_cli(["predict", str(tmp_path / "no-run"), str(image), "-o", str(tmp_path / "out")], False, capfd)
    _assert_one_line_error(code, err, image, "is not that of a medical image")
    assert _snapshot(tmp_path) == before


# ---- a DICOM series whose slices share one position --------------------------------------------

DICOM_SERIES = Path("/work/shared/data/dicom-ct-3slice/ct")  # 3 real CT slices, 1 mm apart


@pytest.mark.skipif(not DICOM_SERIES.is_dir(), reason="needs the 3-slice DICOM sample")
def test_a_dicom_series_with_slices_at_one_position_is_refused(dataset, tmp_path, capfd):
    """ITK stacks such slices with an invented spacing of 1 mm; refused naming the folder and the
    slices, by every command that reads an image (here predict, before it looks for the run)."""
    series = tmp_path / "series"
    series.mkdir()
    for index, source in enumerate(sorted(DICOM_SERIES.glob("*.dcm"))):
        data = source.read_bytes()
        # ImagePositionPatient and SliceLocation of every slice become the first one's (same length)
        for z in (b"-127.690002", b"-128.690002"):
            data = data.replace(z, b"-126.690002")
        (series / source.name).write_bytes(data)
    assert read_image(DICOM_SERIES).GetSpacing()[2] == pytest.approx(1.0)  # control: the series as it is
    for read in (read_image, read_header):
        with pytest.raises(DatasetError, match=re.escape(f"{series}: slices 01.dcm and 02.dcm lie at one position")):
            read(series)
    code, err = _run_cli(["predict", str(tmp_path / "no-run"), str(series), "-o", str(tmp_path / "out")], False, capfd)
    _assert_one_line_error(code, err, series, "the slice spacing is 0")
    assert not (tmp_path / "out").exists()


# ---- config files and settings that are no plain data -------------------------------------------

CONFIG_FILES = {  # name: (text, problem)
    "date.yaml": ("extra:\n  when: 2020-01-01\n", "extra.when: not plain data"),
    "recursive-alias.yaml": ("extra: &loop\n  again: *loop\n", "nested more than 64 deep"),
    "billion-laughs.yaml": ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
                            + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
                                      for p, n in zip("abcd", "bcde")).replace("e: &e", "extra: &e"),
                            "more than 100000 values"),
    "key-not-text.yaml": ("1: 2\n", "a key of type int"),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "deep-extra.json": ('{"extra": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    "deep.yaml": ("extra: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    "nan.yaml": ("lr: .nan\n", "lr: not plain data"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_train_refuses_a_config_file_that_is_no_plain_data(name, dataset, tmp_path, capfd):
    """Old code: TypeError (date), RecursionError (recursive alias, from to_dict) or an endless walk."""
    text, problem = CONFIG_FILES[name]
    config = tmp_path / name
    config.write_text(text)
    before = _snapshot(tmp_path)
    code, err = _run_cli(["train", str(dataset), "-o", str(tmp_path / "run"), "--config", str(config)],
                         name == "date.yaml", capfd)
    _assert_one_line_error(code, err, config, problem)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("setting, named, problem", [
    ("extra={when: 2020-01-01}", "extra.when", "a date (quote it to keep it as text)"),
    ("extra=&loop {again: *loop}", "extra.again.again", "nested more than 64 deep"),
    ("extra=" + "[" * 100_000, "extra", "nested too deeply"),
    ("extra={a: " + "[" * 100_000 + "]" * 100_000 + "}", "extra", "nested too deeply"),
    ("seed=2020-01-01", "seed", "a date"),
    ("triplet_capacity=1e12", "triplet_capacity must be an integer in [1, 1048576]", "got 1000000000000"),
])
def test_train_refuses_a_setting_that_is_no_plain_data_or_out_of_range(setting, named, problem, dataset, tmp_path,
                                                                        capfd):
    before = _snapshot(tmp_path)
    code, err = _run_cli(["train", str(dataset), "-o", str(tmp_path / "run"), "--set", setting], False, capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"plbopt: error: {named}") and problem in err, err
    assert _snapshot(tmp_path) == before


# ---- --resume: what it cannot honour is refused before the run folder changes ------------------

@pytest.fixture
def resumable(trained_run, tmp_path) -> Tuple[Path, Path, Path]:
    """(dataset, cache, a copy of the trained run) that a test may resume or break."""
    root, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return root, root.parent / "cache", copy


def _resume(root: Path, run: Path, cache: Path, *extra: str) -> List[str]:
    return ["train", str(root), "-o", str(run), "--cache-dir", str(cache), "--resume", "--device", "cpu", "-q", *extra]


@pytest.mark.parametrize("extra, named, problem", [
    (["--preset", "dhc"], "config.json", "preset cannot change"),  # old code: trained on, silently
    (["--small"], "config.json", "base_filters, batch_size, dropout, lr, optimizer"),
    (["--init-from", "{run}/checkpoints/best.pt"], "checkpoints/best.pt", "use one or the other"),
])
def test_resume_refuses_a_request_it_cannot_honour(extra, named, problem, resumable, capfd):
    root, cache, run = resumable
    before = _snapshot(run)
    code, err = _run_cli(_resume(root, run, cache, *[a.format(run=run) for a in extra]), False, capfd)
    _assert_one_line_error(code, err, run / named, problem)
    assert _snapshot(run) == before, "the run folder changed"


def test_resume_refuses_a_dataset_with_other_classes_before_rewriting_the_runs_dataset_json(resumable, tmp_path,
                                                                                             capfd):
    """Old code rewrote RUN/dataset.json (the Slicer module's class names) with the new labels,
    then failed with a traceback."""
    root, cache, run = resumable
    other = tmp_path / "other"
    shutil.copytree(root, other)
    _write_json(other, {**_valid_json(), "labels": {"0": "background", "1": "organ", "2": "tumour"}})
    before = _snapshot(run)
    code, err = _run_cli(_resume(other, run, cache), False, capfd)
    _assert_one_line_error(code, err, run / "dataset.json", "the run was trained on the classes {0 background, 1 organ}")
    assert "{0 background, 1 organ, 2 tumour}" in err
    assert _snapshot(run) == before, "the run folder changed"


def test_resume_refuses_a_truncated_checkpoint_without_prev_before_writing(resumable, capfd):
    root, cache, run = resumable
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    (run / "checkpoints" / "last.pt.prev").unlink(missing_ok=True)
    before = _snapshot(run)
    code, err = _run_cli(_resume(root, run, cache), False, capfd)
    _assert_one_line_error(code, err, last, "corrupt or truncated checkpoint")
    assert _snapshot(run) == before, "the run folder changed (events.jsonl, config.json or dataset.json)"


# ---- a cache folder that cannot be one ----------------------------------------------------------

@pytest.mark.parametrize("resume", [False, True])
def test_a_cache_dir_that_is_a_file_is_refused_before_the_run_folder_is_written(resume, resumable, tmp_path, capfd):
    root, _, run = resumable
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    if not resume:
        shutil.rmtree(run)
    before = _snapshot(tmp_path)
    for cache in (notes, notes / "cache"):
        args = (_resume(root, run, cache) if resume
                else ["train", str(root), "-o", str(run), "--cache-dir", str(cache), *TINY_TRAIN])
        code, err = _run_cli(args, False, capfd)
        _assert_one_line_error(code, err, notes, "exists and is not a folder")
    assert _snapshot(tmp_path) == before and notes.read_text() == "mine"
