"""Equal-effort comparison of sparse annotation (issue 23): ``plbopt sparsify``, the split files'
``"sparse"`` field, the annotated slices ``plbopt bench accuracy`` reports, and the repository's
split files for the comparison."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.bench.accuracy import run_accuracy_bench
from PLBOptCore.cli import main
from PLBOptCore.convert.sparsify import (SparseSpec, annotation_effort, labeled_effort, parse_sparse,
                                         sparsify_array, sparsify_dataset)
from PLBOptCore.convert.splits import apply_split_file
from PLBOptCore.data.dataset import load_dataset, sparse_training_cases, validate_dataset
from PLBOptCore.data.phantom import LABELS, make_phantom_dataset
from PLBOptCore.errors import ConfigError, DatasetError

IGNORE = max(LABELS) + 1
SHAPE = (10, 24, 24)  # 10 axial slices: every 4th keeps 0, 4, 8
SPLITS = Path(__file__).parents[2] / "Resources" / "splits"
LA = Path(__file__).parents[3] / "shared" / "data" / "real" / "Dataset103_LA"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """phantom_000-002 training, 003 unlabeled, 004 validation, 005 test."""
    return make_phantom_dataset(tmp_path_factory.mktemp("src") / "ph", n_labeled=3, n_unlabeled=1, n_validation=1,
                                n_test=1, shape=SHAPE)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("plbopt: error: ") and err.count("\n") == 1
    return err[len("plbopt: error: "):].strip()


# ---------------------------------------------------------------------------------------- plbopt sparsify
def test_sparsify_keeps_every_4th_slice_and_marks_the_rest_ignore(phantom, tmp_path, capsys):
    out = tmp_path / "sparse"
    assert main(["sparsify", str(phantom), "-o", str(out), "--every", "4", "--cases", "phantom_000,phantom_001"]) == 0
    assert "2 sparse case(s), ignore label 7" in capsys.readouterr().out
    data = json.loads((out / "dataset.json").read_text())
    assert data["labels"]["ignore"] == IGNORE == max(data["labels"].values())  # nnU-Net v2: the highest id
    assert data["file_ending"] == ".nii.gz" and data["numTraining"] == 4  # 3 training + the validation case
    assert data["sparse"] == {"every": 4, "axis": "z", "offset": 0, "ignore": IGNORE,
                              "cases": ["phantom_000", "phantom_001"], "source": str(phantom.absolute())}
    spec = load_dataset(out)  # read as nnU-Net v2
    assert spec.ignore_label == IGNORE and spec.labels == LABELS
    assert sorted(c.name for c in spec.training) == ["phantom_000", "phantom_001", "phantom_002", "phantom_004"]
    assert [c.name for c in spec.unlabeled] == ["phantom_003"] and [c.name for c in spec.test] == ["phantom_005"]
    assert [c.name for c in sparse_training_cases(spec)] == ["phantom_000", "phantom_001"]  # loads as sparse
    validate_dataset(spec, deep=True)
    source = load_dataset(phantom)
    original = _array(source.training[0].label)
    sparse = _array(out / "labelsTr" / "phantom_000.nii.gz")
    assert np.array_equal(sparse[[0, 4, 8]], original[[0, 4, 8]])
    assert (sparse[[1, 2, 3, 5, 6, 7, 9]] == IGNORE).all()
    assert np.array_equal(_array(out / "labelsTr" / "phantom_002.nii.gz"), _array(source.training[2].label))
    assert np.array_equal(_array(out / "labelsTs" / "phantom_005.nii.gz"), _array(source.test[0].label))
    assert os.path.samefile(out / "imagesTr" / "phantom_000_0000.nii.gz", source.training[0].image)  # hard link
    effort = labeled_effort(spec)  # 2 sparse cases x 3 slices + 2 whole cases x 10 slices
    assert (effort["slices"], effort["slices_total"], effort["axis"], effort["sparse_cases"]) == (26, 40, "z", 2)
    assert effort["voxel_fraction"] == pytest.approx(26 / 40)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_rerun_refuses_to_overwrite_unless_asked(phantom, tmp_path, capsys):
    out = tmp_path / "sparse"
    assert main(["sparsify", str(phantom), "-o", str(out), "--every", "4"]) == 0
    capsys.readouterr()
    before = (out / "dataset.json").read_text()
    assert main(["sparsify", str(phantom), "-o", str(out), "--every", "2"]) == 2
    assert _one_error_line(capsys).startswith(f"{out.absolute()}: output folder exists and is not empty")
    assert (out / "dataset.json").read_text() == before  # nothing touched
    assert main(["sparsify", str(phantom), "-o", str(out), "--every", "2", "--offset", "1", "--overwrite"]) == 0
    effort = labeled_effort(load_dataset(out))  # 3 training cases sparse: slices 1, 3, 5, 7, 9; validation whole
    assert (effort["slices"], effort["slices_total"], effort["sparse_cases"]) == (3 * 5 + 10, 40, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args, start", [
    (["--every", "4", "--offset", "4"], "--every/--axis/--offset: 'offset' must be"),
    (["--every", "0"], "--every/--axis/--offset: 'every' must be"),
    (["--every", "4", "--cases", "phantom_005"], "{dataset}: case 'phantom_005' (--cases)"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(phantom, tmp_path, capsys, args, start):
    out = tmp_path / "sparse"
    assert main(["sparsify", str(phantom), "-o", str(out)] + args) == 2
    assert _one_error_line(capsys).startswith(start.format(dataset=phantom / "dataset.json"))
    assert not out.exists()
    assert main(["sparsify", str(tmp_path / "nowhere"), "-o", str(out), "--every", "4"]) == 2
    assert _one_error_line(capsys).startswith(f"{tmp_path / 'nowhere'}: dataset folder not found")
    with pytest.raises(DatasetError, match="must lie outside the source dataset"):
        sparsify_dataset(phantom, phantom / "inside", SparseSpec(4))


# ---------------------------------------------------------------------------------------- effort
def test_sparsify_array_and_annotation_effort_along_each_axis():
    label = np.zeros((6, 8, 5), np.uint8)
    label[2:4, 2:6, 1:3] = 1
    whole = annotation_effort(label, None)
    assert (whole["axis"], whole["slices"], whole["slices_total"], whole["foreground_slices"]) == ("z", 6, 6, 2)
    sparse = sparsify_array(label, 2, SparseSpec(3, "y", 1))  # y = numpy axis 1: rows 1, 4, 7 kept
    assert (sparse[:, [0, 2, 3, 5, 6]] == 2).all() and np.array_equal(sparse[:, [1, 4, 7]], label[:, [1, 4, 7]])
    effort = annotation_effort(sparse, 2)  # the slice-wise axis is found
    assert (effort["axis"], effort["slices"], effort["slices_total"], effort["foreground_slices"]) == ("y", 3, 8, 1)
    assert effort["voxels"] == 3 * 6 * 5 and effort["voxels_total"] == label.size
    scribble = np.full(label.shape, 2, np.uint8)
    scribble[1, 0, 0] = scribble[4, 3, 3] = 1  # no axis slice-wise: z slices with any annotated voxel
    assert annotation_effort(scribble, 2)["axis"] == "z" and annotation_effort(scribble, 2)["slices"] == 2
    assert sparsify_array(label, 300, SparseSpec(2)).dtype == np.uint16  # widened for the ignore id
    for bad in ({"every": 4, "axis": "w"}, {"every": "4"}, {"every": 4, "step": 1}, [4]):
        with pytest.raises(ConfigError, match=r"^split\.json: "):
            parse_sparse(bad, "split.json")


# ---------------------------------------------------------------------------------------- split files
def _split(path: Path, sparse=None) -> Path:
    data = {"labeled": ["phantom_000", "phantom_001"], "unlabeled": ["phantom_002", "phantom_003"],
            "validation": ["phantom_004"], "test": ["phantom_005"]}
    if sparse is not None:
        data["sparse"] = sparse
    path.write_text(json.dumps(data))
    return path


def test_a_split_files_sparse_field_makes_its_labeled_cases_sparse(phantom, tmp_path):
    split = _split(tmp_path / "split.json", {"every": 4, "axis": "z"})
    out = apply_split_file(split, phantom, tmp_path / "dataset")
    spec = load_dataset(out)
    assert spec.ignore_label == IGNORE and spec.labels == LABELS
    assert [c.name for c in sparse_training_cases(spec)] == ["phantom_000", "phantom_001"]
    assert labeled_effort(spec)["slices"] == 2 * 3
    source = load_dataset(phantom)
    assert np.array_equal(_array(spec.test[0].label), _array(source.test[0].label))  # scored labels stay whole
    assert np.array_equal(_array(spec.validation[0].label), _array(source.validation[0].label))
    assert json.loads((out / "splits.json").read_text())["sparse"] == {"every": 4, "axis": "z", "offset": 0,
                                                                        "ignore": IGNORE}
    assert apply_split_file(split, phantom, out) == out  # the same split: reused
    _split(split, {"every": 2, "axis": "z"})  # another sparsity is another dataset: not mixed in
    with pytest.raises(DatasetError, match="output folder exists and is not empty"):
        apply_split_file(split, phantom, out)
    _split(split, {"every": 4, "offset": 7})
    with pytest.raises(ConfigError, match=f"^{split}: 'offset' must be"):
        apply_split_file(split, phantom, tmp_path / "other")


def test_bench_accuracy_reports_the_annotated_slices_of_a_sparse_split(tmp_path):
    """A 2-step supervised run over a sparse split: the report states the labeled set's annotation."""
    dataset = make_phantom_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=1, n_test=1, n_validation=0,
                                   shape=(24, 48, 48))
    split = tmp_path / "sparse.json"
    split.write_text(json.dumps({"labeled": ["phantom_000", "phantom_001"], "unlabeled": ["phantom_002"],
                                 "test": ["phantom_003"], "sparse": {"every": 4, "axis": "z"}}))
    tiny = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, log_every=1, checkpoint_every=1)
    results = run_accuracy_bench(dataset, tmp_path / "out", presets=["supervised"], seeds=1, iterations=2,
                                 device="cpu", extra_overrides=tiny, split_file=split)
    annotation = json.loads((tmp_path / "out" / results["report_dir"] / "results.json").read_text())["annotation"]
    assert (annotation["slices"], annotation["slices_total"], annotation["axis"]) == (2 * 6, 2 * 24, "z")
    assert annotation["voxel_fraction"] == pytest.approx(0.25) and annotation["sparse_cases"] == 2
    assert annotation["sparse"] == {"every": 4, "axis": "z", "offset": 0, "ignore": IGNORE}
    assert set(annotation["per_case"]) == {"phantom_000", "phantom_001"}
    assert results["runs"][0]["mean_dice"] is not None
    markdown = (tmp_path / "out" / results["report_dir"] / "RESULTS.md").read_text()
    table_end = markdown.index("| Supervised only (VNet) |")
    assert "**12 annotated slices** (axis z) of 48 in 2 cases (2 sparse)" in markdown[table_end:table_end + 600]
    assert "25.0 % of the labeled voxels annotated" in markdown


# ---------------------------------------------------------------------------------------- repository files
EFFORT_FILES = ("phantom-effort-whole2", "phantom-effort-sparse8x4", "Dataset103_LA-effort-whole2",
                "Dataset103_LA-effort-sparse8x4")


@pytest.mark.parametrize("name", EFFORT_FILES)
def test_effort_split_files_are_disjoint_and_pair_up(name):
    split = json.loads((SPLITS / f"{name}.json").read_text())
    roles = ("labeled", "unlabeled", "validation", "test")
    names = [case for role in roles for case in split[role]]
    assert len(names) == len(set(names)) and split["counts"] == {role: len(split[role]) for role in roles}
    partner = name.replace("whole2", "sparse8x4") if "whole2" in name else name.replace("sparse8x4", "whole2")
    other = json.loads((SPLITS / f"{partner}.json").read_text())
    assert sorted(names) == sorted(c for role in roles for c in other[role])  # the same images in both arms
    assert split["validation"] == other["validation"] and split["test"] == other["test"]
    assert split["annotation"]["annotated_slices"] == other["annotation"]["annotated_slices"]  # equal effort
    if "sparse" in split:
        assert parse_sparse(split["sparse"], name) == SparseSpec(4, "z", 0) and len(split["labeled"]) == 8
        assert split["labeled"][:2] == other["labeled"]
    else:
        assert len(split["labeled"]) == 2


def _stated_effort(split_file: Path, source: Path, out: Path) -> None:
    split = json.loads(split_file.read_text())
    effort = labeled_effort(load_dataset(apply_split_file(split_file, source, out)))
    stated = split["annotation"]
    assert (effort["axis"], effort["slices"], effort["slices_total"], effort["foreground_slices"]) == (
        stated["axis"], stated["annotated_slices"], stated["slices_total"], stated["foreground_slices"])
    assert effort["voxel_fraction"] == pytest.approx(stated["voxel_fraction"])


def test_phantom_effort_files_state_their_slice_counts(tmp_path):
    # the demo's 20 volumes with labels on the first 8 (plbopt demo --data-only --labeled 8 --unlabeled 6)
    source = make_phantom_dataset(tmp_path / "phantom", n_labeled=8, n_unlabeled=6)
    for arm in ("whole2", "sparse8x4"):
        _stated_effort(SPLITS / f"phantom-effort-{arm}.json", source, tmp_path / arm)


@pytest.mark.skipif(not (LA / "dataset.json").is_file(), reason="needs ../shared/data/real/Dataset103_LA")
def test_la_effort_files_state_their_slice_counts(tmp_path):
    for arm in ("whole2", "sparse8x4"):
        _stated_effort(SPLITS / f"Dataset103_LA-effort-{arm}.json", LA, tmp_path / arm)
