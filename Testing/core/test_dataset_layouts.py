"""Datasets as users bring them: nnU-Net v2 and MSD folders train, predict and evaluate in place,
from a read-only folder with the cache elsewhere."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest

from PLBOptCore.cli import main
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.events import read_events
from PLBOptCore.errors import DatasetError

TINY_TRAIN = ["--preset", "dhc", "--iterations", "2", "--patch-size", "16", "32", "32", "--base-filters", "4",
              "--batch-size", "1", "--device", "cpu", "-q",
              "--set", "log_every=1", "checkpoint_every=1", "validate_every=1000", "superpixel_divisor=20"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """MSD layout: imagesTr/labelsTr (2), imagesUn (2), imagesTs/labelsTs (1)."""
    return make_phantom_dataset(tmp_path_factory.mktemp("msd"), n_labeled=2, n_unlabeled=2, n_test=1,
                                n_validation=0, shape=(24, 48, 48), seed=3)


def _nnunet_v2_tree(msd: Path, root: Path, unlabeled_key: bool = True) -> Path:
    """The phantom rewritten as nnU-Net v2 lays it out: ``imagesTr/<case>_0000.nii.gz`` ↔
    ``labelsTr/<case>.nii.gz``, ``imagesTs``/``labelsTs``, labels name → id, no case lists."""
    spec = load_dataset(msd)
    for folder, cases in (("Tr", spec.training), ("Ts", spec.test)):
        for case in cases:
            (root / f"images{folder}").mkdir(parents=True, exist_ok=True)
            (root / f"labels{folder}").mkdir(parents=True, exist_ok=True)
            shutil.copy(case.image, root / f"images{folder}" / f"{case.name}_0000.nii.gz")
            shutil.copy(case.label, root / f"labels{folder}" / f"{case.name}.nii.gz")
    (root / "imagesUn").mkdir()
    for case in spec.unlabeled:
        shutil.copy(case.image, root / "imagesUn" / f"{case.name}_0000.nii.gz")
    data = {"channel_names": {"0": "CT"}, "labels": {name: index for index, name in spec.labels.items()},
            "numTraining": len(spec.training), "file_ending": ".nii.gz", "name": "Dataset042_Phantom"}
    if unlabeled_key:
        data["unlabeled"] = "imagesUn"
    (root / "dataset.json").write_text(json.dumps(data, indent=2))
    return root


def _edit(root: Path, **changes) -> None:
    data = json.loads((root / "dataset.json").read_text())
    data.update(changes)
    (root / "dataset.json").write_text(json.dumps(data))


def test_nnunet_v2_tree_is_read_in_place(phantom, tmp_path, monkeypatch):
    msd = load_dataset(phantom)
    root = _nnunet_v2_tree(phantom, tmp_path / "Dataset042_Phantom")
    spec = load_dataset(root)
    assert spec.labels == msd.labels
    assert [c.name for c in spec.training] == [c.name for c in msd.training]
    assert spec.training[0].image.name.endswith("_0000.nii.gz") and spec.training[0].label.parent.name == "labelsTr"
    assert [c.name for c in spec.unlabeled] == [c.name for c in msd.unlabeled]
    assert [(c.name, c.label is not None) for c in spec.test] == [(c.name, True) for c in msd.test]
    assert spec.validation == []

    # nnU-Net's explicit case list: paths relative to the folder or absolute, $VARS expanded
    first = spec.training[0]
    monkeypatch.setenv("PLBOPT_TEST_ROOT", str(root))
    _edit(root, numTraining=1, dataset={"first": {"images": ["$PLBOPT_TEST_ROOT/" + first.image.relative_to(root).as_posix()],
                                                  "label": str(first.label)}})
    listed = load_dataset(root)
    assert [(c.name, c.image, c.label) for c in listed.training] == [("first", first.image, first.label)]


@pytest.mark.parametrize("edit, problem", [
    (dict(numTraining=5), "numTraining is 5 but 2 training cases were found"),
    (dict(channel_names={"0": "T1", "1": "T2"}),
     "2 input channels in 'channel_names' (T1, T2); PLBOpt trains on single-channel"),
    (dict(labels={"background": 0, "whole": [1, 2]}), "region-based labels"),
    (dict(file_ending=".png"), "file_ending '.png' is not one of"),
    (dict(dataset={"a": {"images": ["imagesTr/x_0000.nii.gz", "imagesTr/x_0001.nii.gz"], "label": "l.nii.gz"}}),
     "case 'a' has 2 channels"),
    (dict(unlabeled=["imagesUn"]), "'unlabeled' must name a folder"),
])
def test_nnunet_v2_problems_name_dataset_json(phantom, tmp_path, edit, problem):
    root = _nnunet_v2_tree(phantom, tmp_path / "v2")
    _edit(root, **edit)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert str(err.value).startswith(f"{root / 'dataset.json'}: ") and problem in str(err.value)


def test_nnunet_v2_file_problems_name_the_file(phantom, tmp_path):
    root = _nnunet_v2_tree(phantom, tmp_path / "v2")
    label = sorted((root / "labelsTr").iterdir())[0]
    label.unlink()
    with pytest.raises(DatasetError, match=f"^{label}: file not found"):
        load_dataset(root)
    odd = root / "imagesTr" / "scan.nii.gz"
    shutil.copy(sorted((root / "imagesTr").iterdir())[0], odd)
    with pytest.raises(DatasetError, match=f"^{odd}: not named <case>_0000.nii.gz"):
        load_dataset(root)
    odd.unlink()
    second = root / "imagesTr" / "case_0001.nii.gz"
    shutil.copy(sorted((root / "imagesTr").iterdir())[0], second)
    with pytest.raises(DatasetError, match=f"^{second}: channel 1 of a multi-channel case"):
        load_dataset(root)


def test_multi_channel_dataset_is_refused_in_one_line(phantom, tmp_path):
    root = _nnunet_v2_tree(phantom, tmp_path / "v2")
    _edit(root, channel_names={"0": "CT", "1": "PET"})
    result = subprocess.run([sys.executable, "-m", "PLBOptCore", "train", str(root), "-o", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "single-channel" in result.stderr and str(root / "dataset.json") in result.stderr
    assert not (tmp_path / "run").exists()

    msd = tmp_path / "msd"
    shutil.copytree(phantom, msd)
    _edit(msd, modality={"0": "FLAIR", "1": "T1w"})
    with pytest.raises(DatasetError, match="2 input channels in 'modality'"):
        load_dataset(msd)


def test_unlabeled_folder_from_the_command_line(phantom, tmp_path):
    root = _nnunet_v2_tree(phantom, tmp_path / "v2", unlabeled_key=False)
    assert load_dataset(root).unlabeled == []
    spec = load_dataset(root, unlabeled_dir=root / "imagesUn")
    assert [c.name for c in spec.unlabeled] == [c.name for c in load_dataset(phantom).unlabeled]
    # also for MSD folders, next to the listed unlabeled cases; names must stay unique
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(load_dataset(phantom).test[0].image, extra / "extra_0000.nii.gz")
    assert [c.name for c in load_dataset(phantom, unlabeled_dir=extra).unlabeled][-1] == "extra"
    with pytest.raises(DatasetError, match="appears twice"):
        load_dataset(phantom, unlabeled_dir=phantom / "imagesUn")
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'nope'}: unlabeled image folder not found"):
        load_dataset(phantom, unlabeled_dir=tmp_path / "nope")


def _layout(phantom: Path, tmp_path: Path, layout: str) -> Tuple[Path, Path, Path, list]:
    """(dataset root, test images folder, test labels folder, extra train arguments)."""
    if layout == "msd":
        return phantom, phantom / "imagesTs", phantom / "labelsTs", []
    root = _nnunet_v2_tree(phantom, tmp_path / "Dataset042_Phantom", unlabeled_key=False)
    return root, root / "imagesTs", root / "labelsTs", ["--unlabeled", str(root / "imagesUn")]


@pytest.mark.parametrize("layout", ["nnunet_v2", "msd"])
def test_layout_trains_predicts_and_evaluates_without_conversion(phantom, tmp_path, layout, capsys):
    root, images_ts, labels_ts, extra = _layout(phantom, tmp_path, layout)
    run, preds = tmp_path / "run", tmp_path / "preds"
    cache = tmp_path / "cache"
    assert main(["train", str(root), "-o", str(run), "--cache-dir", str(cache), *TINY_TRAIN, *extra]) == 0
    start = next(r for r in read_events(run) if r["type"] == "start")
    assert (start["labeled"], start["unlabeled"]) == (2, 2)
    assert main(["predict", str(run), str(images_ts), "-o", str(preds), "--device", "cpu", "-q"]) == 0
    test_names = sorted(p.name for p in labels_ts.iterdir())
    # label maps only, named like the ground truth: the folder nnUNetv2_evaluate_simple accepts
    # (every prediction file has a reference file); the confidence maps are in their own folder
    assert sorted(p.name for p in preds.iterdir() if p.is_file()) == test_names
    assert sorted(p.name for p in (preds / "confidence").iterdir()) == test_names
    capsys.readouterr()
    assert main(["evaluate", str(preds), str(labels_ts), "--labels", str(root / "dataset.json")]) == 0
    table = capsys.readouterr().out
    assert "conventions: --empty ignore" in table and "liver" in table
    metrics = json.loads((preds / "metrics.json").read_text())
    assert sorted(metrics["cases"]) == [name[: -len(".nii.gz")] for name in test_names]


def _snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_read_only_dataset_trains_with_the_cache_elsewhere(phantom, tmp_path):
    from PLBOptCore.api import train

    dataset = tmp_path / "readonly"
    shutil.copytree(phantom, dataset)
    before = _snapshot(dataset)
    writable = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for path in [dataset, *dataset.rglob("*")]:
        path.chmod(path.stat().st_mode & ~writable)
    records = []
    try:
        train(dataset, tmp_path / "run", preset="dhc", cache_dir=tmp_path / "cache", progress=records.append,
              overrides=dict(iterations=1, patch_size=[16, 32, 32], base_filters=4, batch_size=1, device="cpu",
                             validate_every=1000))
    finally:
        for path in [dataset, *dataset.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    # nothing was written into the dataset folder (as root, chmod alone would not have stopped it)
    assert _snapshot(dataset) == before
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))
    assert cached.count("image.npy") == 4 and cached.count("label.npy") == 2 and cached.count("superpixels.npy") == 0

    # each case was reported while the cache was built, before training started
    preprocess = [r for r in records if r["type"] == "preprocess"]
    assert [(r["index"], r["total"]) for r in preprocess] == [(i, 4) for i in range(1, 5)]
    events = read_events(tmp_path / "run")
    kinds = [r["type"] for r in events]
    assert kinds[:5] == ["preprocess"] * 4 + ["start"]
    spec = load_dataset(dataset)
    assert {r["case"] for r in events[:4]} == {c.name for c in spec.training + spec.unlabeled}
    assert all(r["seconds"] >= 0 for r in events[:4])


def test_interrupted_run_names_its_unlabeled_folder_and_cache_in_the_resume_command(phantom, tmp_path):
    from PLBOptCore.api import train
    from PLBOptCore.errors import TrainingInterrupted

    root = _nnunet_v2_tree(phantom, tmp_path / "v2", unlabeled_key=False)
    run, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(root, run, preset="dhc", unlabeled_dir=root / "imagesUn", cache_dir=cache, should_stop=lambda: True,
              overrides=dict(iterations=1, patch_size=[16, 32, 32], base_filters=4, batch_size=1, device="cpu"))
    command = str(stopped.value).split("continue with: ")[1]
    assert command == f"plbopt train {root} -o {run} --unlabeled {root / 'imagesUn'} --cache-dir {cache} --resume"
    assert main(command.split()[1:] + ["-q"]) == 0  # the command minus "plbopt"
    assert read_events(run)[-1]["status"] == "completed"
