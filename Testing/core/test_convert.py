"""Synapse/AMOS converters and labeled-ratio splits, on tiny fake raw trees."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.convert import (
    add_convert_arguments,
    apply_labeled_ratio,
    convert_amos,
    convert_synapse,
    parse_labeled,
    select_labeled,
    split_synapse_cases,
    unlabeled_with_labels,
)
from PLBOptCore.convert.synapse import DHC_TEST_IDS
from PLBOptCore.errors import ConfigError, DatasetError

SYNAPSE_IDS = [f"{i:04d}" for i in [*range(1, 11), *range(21, 41)]]  # the real 30 Synapse training ids
SPACING = (0.75, 0.8, 3.0)
ORIGIN = (-120.5, 80.25, -310.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _write_pair(image_path: Path, label_path: Optional[Path], seed: int, num_labels: int) -> None:
    """A random 8×16×16 CT-like volume and a label with a box of each class, in a non-trivial geometry."""
    rng = np.random.default_rng(seed)
    volumes = [(image_path, sitk.GetImageFromArray(rng.integers(-1000, 1000, (8, 16, 16)).astype(np.int16)))]
    if label_path is not None:
        label = np.zeros((8, 16, 16), np.uint8)
        for c in range(1, num_labels):
            label[c % 8, c : c + 2, 2:5] = c
        volumes.append((label_path, sitk.GetImageFromArray(label)))
    for path, image in volumes:
        image.SetSpacing(SPACING)
        image.SetOrigin(ORIGIN)
        image.SetDirection(DIRECTION)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)


@pytest.fixture(scope="module")
def synapse_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("synapse") / "RawData"
    for k, case_id in enumerate(SYNAPSE_IDS):
        _write_pair(raw / "Training/img" / f"img{case_id}.nii.gz", raw / "Training/label" / f"label{case_id}.nii.gz", k, 14)
    return raw


AMOS_TRAIN = [1, 2, 3, 4, 5, 6, 7, 508]  # 508 is MRI
AMOS_VAL = [8, 9, 10, 540]  # 540 is MRI
AMOS_NAMES = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
              "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
              "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
              "15": "prostate/uterus"}


@pytest.fixture(scope="module")
def amos_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("amos") / "amos22"
    data: Dict[str, object] = {"name": "AMOS", "labels": AMOS_NAMES, "training": [], "validation": []}
    for role, ids, (img_dir, lab_dir) in (("training", AMOS_TRAIN, ("imagesTr", "labelsTr")),
                                          ("validation", AMOS_VAL, ("imagesVa", "labelsVa"))):
        for i in ids:
            name = f"amos_{i:04d}.nii.gz"
            _write_pair(raw / img_dir / name, raw / lab_dir / name, i, 16)
            data[role].append({"image": f"./{img_dir}/{name}", "label": f"./{lab_dir}/{name}"})
    (raw / "dataset.json").write_text(json.dumps(data))
    return raw


def _json(folder: Path, name: str = "dataset.json") -> dict:
    return json.loads((folder / name).read_text())


def _names(entries: Iterable[dict]) -> list:
    return sorted(Path(e["image"]).name.split(".")[0] for e in entries)


# --- parse_labeled / select_labeled -----------------------------------------------------------

@pytest.mark.parametrize("value, n, expected", [
    ("10%", 20, 2), ("0.1", 20, 2), (0.1, 20, 2), ("2", 20, 2), (2, 20, 2), ("20%", 20, 4), ("40%", 20, 8),
    ("2%", 216, 4), ("5%", 216, 10), ("10%", 216, 21),  # DHC's AMOS counts: rounded down
    ("1%", 20, 1), ("100%", 20, 20), (" 10% ", 20, 2), ("29%", 100, 29),
])
def test_parse_labeled(value, n, expected):
    assert parse_labeled(value, n) == expected


@pytest.mark.parametrize("value", ["abc", "", "0%", "150%", "-5%", "-1", "0", 0, "25", 25, 1.5, True, "nan", "10 %%"])
def test_parse_labeled_rejects(value):
    with pytest.raises(ConfigError, match="--labeled"):
        parse_labeled(value, 20)


def test_select_labeled_is_seeded_and_nested():
    names = [f"c{i:02d}" for i in range(20)]
    assert select_labeled(names, 2, 0) == select_labeled(list(reversed(names)), 2, 0)
    assert set(select_labeled(names, 2, 0)) <= set(select_labeled(names, 4, 0)) <= set(select_labeled(names, 8, 0))
    assert select_labeled(names, 4, 0) != select_labeled(names, 4, 1)


# --- Synapse ----------------------------------------------------------------------------------

def test_split_synapse_sizes_folds_and_reproducibility():
    tests = []
    for fold in range(3):
        split = split_synapse_cases(SYNAPSE_IDS, fold, seed=0)
        assert [len(split[k]) for k in ("train", "validation", "test")] == [20, 4, 6]
        assert sorted(split["train"] + split["validation"] + split["test"]) == SYNAPSE_IDS
        tests.append(set(split["test"]))
        assert split == split_synapse_cases(list(reversed(SYNAPSE_IDS)), fold, seed=0)
    assert tests[0] == set(DHC_TEST_IDS)
    assert not (tests[0] & tests[1]) and not (tests[0] & tests[2]) and not (tests[1] & tests[2])
    assert split_synapse_cases(SYNAPSE_IDS, 1, seed=0) != split_synapse_cases(SYNAPSE_IDS, 1, seed=1)
    with pytest.raises(ConfigError, match="--fold"):
        split_synapse_cases(SYNAPSE_IDS, 3)


def test_convert_synapse_fold0(synapse_raw, tmp_path):
    out = convert_synapse(synapse_raw, tmp_path / "ds", labeled="10%", fold=0, seed=0)
    data, splits = _json(out), _json(out, "splits.json")
    assert [len(data[k]) for k in ("training", "unlabeled", "validation", "test")] == [2, 18, 4, 6]
    assert data["labels"]["0"] == "background" and data["labels"]["13"] == "left adrenal gland"
    assert len(data["labels"]) == 14 and data["labels"]["10"] == "portal vein and splenic vein"
    assert _names(data["test"]) == [f"synapse_{i}" for i in DHC_TEST_IDS]
    assert data["training"][0]["image"].startswith("imagesTr/synapse_")
    assert data["training"][0]["label"].startswith("labelsTr/synapse_")
    assert all(set(e) == {"image"} and e["image"].startswith("imagesUn/") for e in data["unlabeled"])
    assert all(e["image"].startswith("imagesVal/") and e["label"].startswith("labelsVal/") for e in data["validation"])
    assert all(e["image"].startswith("imagesTs/") and e["label"].startswith("labelsTs/") for e in data["test"])
    for role in ("training", "validation", "test"):
        for entry in data[role]:
            assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()
    assert splits["seed"] == 0 and splits["fold"] == 0 and splits["dhc_test_ids"] is True
    assert splits["training"] == _names(data["training"]) and len(splits["unlabeled_with_labels"]) == 18
    assert all((out / e["label"]).is_file() for e in splits["unlabeled_with_labels"])
    # The labeled pair is the first of the seeded order of the training cases.
    assert splits["training"] == select_labeled(splits["training"] + splits["unlabeled"], 2, 0)
    assert not list(out.parent.glob(".*tmp*"))  # the temporary build folder is gone


def test_convert_synapse_geometry_preserved(synapse_raw, tmp_path):
    out = convert_synapse(synapse_raw, tmp_path / "ds", labeled=2, link=False)
    entry = _json(out)["training"][0]
    case_id = Path(entry["image"]).name[len("synapse_"):-len(".nii.gz")]
    for rel, src in ((entry["image"], f"Training/img/img{case_id}.nii.gz"),
                     (entry["label"], f"Training/label/label{case_id}.nii.gz")):
        a, b = sitk.ReadImage(str(out / rel)), sitk.ReadImage(str(synapse_raw / src))
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
        assert a.GetDirection() == b.GetDirection()
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_convert_synapse_folds_seeds_and_link(synapse_raw, tmp_path):
    splits = {}
    for fold in range(3):
        out = convert_synapse(synapse_raw, tmp_path / f"f{fold}", labeled="0.1", fold=fold, seed=0, link=True)
        s = _json(out, "splits.json")
        splits[fold] = s
        everything = s["training"] + s["unlabeled"] + s["validation"] + s["test"]
        assert sorted(everything) == [f"synapse_{i}" for i in SYNAPSE_IDS]
    assert not set(splits[0]["test"]) & set(splits[1]["test"])
    assert not set(splits[1]["test"]) & set(splits[2]["test"])
    image = _json(tmp_path / "f0")["training"][0]["image"]
    assert os.stat(tmp_path / "f0" / image).st_nlink >= 2  # hard link, not a copy
    again = _json(convert_synapse(synapse_raw, tmp_path / "again", "10%", fold=0, seed=0, link=True), "splits.json")
    other = _json(convert_synapse(synapse_raw, tmp_path / "other", "10%", fold=0, seed=7, link=True), "splits.json")
    roles = ("training", "unlabeled", "validation", "test")
    assert [again[r] for r in roles] == [splits[0][r] for r in roles]
    assert [other[r] for r in roles] != [splits[0][r] for r in roles]
    assert other["test"] == splits[0]["test"]  # fold 0 keeps DHC's test set whatever the seed


def test_convert_synapse_flat_layout_and_errors(synapse_raw, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(synapse_raw / "Training", flat)
    out = convert_synapse(flat, tmp_path / "ds", labeled="20%", fold=1, seed=3, link=True)
    assert len(_json(out)["training"]) == 4
    with pytest.raises(DatasetError, match="output folder exists and is not empty"):
        convert_synapse(flat, out, link=True)
    with pytest.raises(DatasetError, match=r"^.*nowhere: Synapse raw folder not found"):
        convert_synapse(tmp_path / "nowhere", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no Synapse image folder found"):
        convert_synapse(tmp_path / "empty", tmp_path / "y")
    (flat / "label" / "label0005.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"label0005\.nii\.gz: label file not found"):
        convert_synapse(flat, tmp_path / "z")
    shutil.rmtree(flat / "label")
    with pytest.raises(DatasetError, match=f"^{re.escape(str(flat / 'label'))}: Synapse label folder not found"):
        convert_synapse(flat, tmp_path / "z")
    assert not (tmp_path / "z").exists()


def test_convert_rejects_mismatched_label(synapse_raw, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(synapse_raw / "Training", flat)
    label = sitk.ReadImage(str(flat / "label/label0003.nii.gz"))
    label.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(label, str(flat / "label/label0003.nii.gz"))
    with pytest.raises(DatasetError, match=r"label0003\.nii\.gz: spacing"):
        convert_synapse(flat, tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))


# --- AMOS -------------------------------------------------------------------------------------

def test_convert_amos_ct_only(amos_raw, tmp_path):
    out = convert_amos(amos_raw, tmp_path / "amos", labeled="2%", seed=0)
    data, splits = _json(out), _json(out, "splits.json")
    everything = splits["training"] + splits["unlabeled"] + splits["validation"] + splits["test"]
    assert sorted(everything) == [f"amos_{i:04d}" for i in range(1, 11)]  # MRI 508 and 540 excluded
    assert [len(data[k]) for k in ("training", "unlabeled", "validation", "test")] == [1, 5, 1, 3]
    assert splits["test"] == ["amos_0008", "amos_0009", "amos_0010"]  # imagesVa CT cases
    assert data["labels"] == AMOS_NAMES  # names come from AMOS's own dataset.json
    assert data["test"][0]["label"] == "labelsTs/amos_0008.nii.gz"
    src, dst = sitk.ReadImage(str(amos_raw / "imagesVa/amos_0008.nii.gz")), sitk.ReadImage(str(out / data["test"][0]["image"]))
    assert (src.GetSpacing(), src.GetOrigin(), src.GetDirection()) == (dst.GetSpacing(), dst.GetOrigin(), dst.GetDirection())
    again = _json(convert_amos(amos_raw, tmp_path / "again", labeled="0.5", seed=0), "splits.json")
    assert again["validation"] == splits["validation"] and len(again["training"]) == 3
    assert set(splits["training"]) <= set(again["training"])


def test_convert_amos_without_dataset_json_and_errors(amos_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(amos_raw, raw)
    (raw / "dataset.json").unlink()
    out = convert_amos(raw, tmp_path / "amos", labeled=2, link=True)
    data = _json(out)
    assert data["labels"]["9"] == "postcava" and len(data["labels"]) == 16
    assert len(data["training"]) == 2 and len(data["test"]) == 3
    with pytest.raises(DatasetError, match="AMOS raw folder not found"):
        convert_amos(tmp_path / "nowhere", tmp_path / "x")
    shutil.rmtree(raw / "imagesTr")
    with pytest.raises(DatasetError, match=f"^{re.escape(str(raw / 'imagesTr'))}: AMOS image folder not found"):
        convert_amos(raw, tmp_path / "x")
    (raw / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/amos_0001.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"amos_0001\.nii\.gz: file not found"):
        convert_amos(raw, tmp_path / "x")


# --- apply_labeled_ratio ----------------------------------------------------------------------

def test_apply_labeled_ratio_in_place_is_reversible(synapse_raw, tmp_path):
    out = convert_synapse(synapse_raw, tmp_path / "ds", labeled="10%", link=True)
    original = _json(out)
    apply_labeled_ratio(out, "10%", seed=0)  # same ratio and seed as the converter: nothing changes
    assert _json(out)["training"] == original["training"] and _json(out)["unlabeled"] == original["unlabeled"]

    apply_labeled_ratio(out, "40%", seed=0)
    data, splits = _json(out), _json(out, "splits.json")
    assert [len(data[k]) for k in ("training", "unlabeled", "validation", "test")] == [8, 12, 4, 6]
    assert set(_names(original["training"])) <= set(_names(data["training"]))
    assert _json(out, "dataset.json.bak")["training"] == original["training"]
    assert splits["fold"] == 0 and splits["labeled"] == "40%" and len(splits["unlabeled_with_labels"]) == 12
    assert all((out / e["image"]).is_file() for e in data["training"] + data["unlabeled"])

    apply_labeled_ratio(out, "10%", seed=0)  # back down: the original partition again
    assert _names(_json(out)["training"]) == _names(original["training"])
    assert _names(_json(out)["unlabeled"]) == _names(original["unlabeled"])


def test_the_labels_kept_aside_are_those_of_cases_still_unlabeled(synapse_raw, tmp_path):
    out = convert_synapse(synapse_raw, tmp_path / "ds", labeled="10%", link=True)
    kept = unlabeled_with_labels(out)
    assert sorted(c.name for c in kept) == _names(_json(out)["unlabeled"]) and len(kept) == 18
    assert all(c.label.parent.name == "labelsUn" and c.label.is_file() for c in kept)
    apply_labeled_ratio(out, "40%", seed=0)  # six of them are labeled now: their labels are no longer aside
    assert sorted(c.name for c in unlabeled_with_labels(out)) == _names(_json(out)["unlabeled"])
    assert len(unlabeled_with_labels(out)) == 12
    (out / "splits.json").unlink()
    assert unlabeled_with_labels(out) == []


def test_apply_labeled_ratio_to_new_folder(synapse_raw, tmp_path):
    src = convert_synapse(synapse_raw, tmp_path / "ds", labeled="10%", link=True)
    before = (src / "dataset.json").read_text()
    out = apply_labeled_ratio(src, "20%", seed=1, out_dir=tmp_path / "new")
    data = _json(out)
    assert [len(data[k]) for k in ("training", "unlabeled", "validation", "test")] == [4, 16, 4, 6]
    assert all(e["image"].startswith("imagesTr/") for e in data["training"])
    assert all(e["image"].startswith("imagesUn/") for e in data["unlabeled"])
    assert (src / "dataset.json").read_text() == before and not (src / "dataset.json.bak").exists()
    assert _json(out, "splits.json")["seed"] == 1


def test_apply_labeled_ratio_plain_dataset(tmp_path):
    """A hand-made dataset without splits.json: label-less unlabeled cases stay unlabeled."""
    root = tmp_path / "plain"
    data: Dict[str, object] = {"name": "plain", "labels": {"0": "background", "1": "organ"}, "training": [], "unlabeled": []}
    for i in range(5):
        _write_pair(root / f"imagesTr/c{i}.nii.gz", root / f"labelsTr/c{i}.nii.gz", i, 2)
        data["training"].append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    for i in range(2):
        _write_pair(root / f"imagesUn/u{i}.nii.gz", None, 10 + i, 2)
        data["unlabeled"].append({"image": f"imagesUn/u{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(data))
    apply_labeled_ratio(root, "40%", seed=0)
    result = _json(root)
    assert len(result["training"]) == 2 and len(result["unlabeled"]) == 5
    assert {"u0", "u1"} <= set(_names(result["unlabeled"]))
    assert len(_json(root, "splits.json")["unlabeled_with_labels"]) == 3
    with pytest.raises(ConfigError, match="only 5 training cases"):
        apply_labeled_ratio(root, 6)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        apply_labeled_ratio(tmp_path / "nowhere", "10%")


def test_output_loads_with_dataset_module(synapse_raw, amos_raw, tmp_path):
    """The folders written here must satisfy the dataset loader's contract."""
    dataset = pytest.importorskip("PLBOptCore.data.dataset")
    for out in (convert_synapse(synapse_raw, tmp_path / "s", "10%", link=True),
                convert_amos(amos_raw, tmp_path / "a", "2%", link=True)):
        spec = dataset.load_dataset(out)
        data = _json(out)
        assert [len(getattr(spec, k)) for k in ("training", "unlabeled", "validation", "test")] == \
            [len(data[k]) for k in ("training", "unlabeled", "validation", "test")]
        assert spec.num_classes == len(data["labels"])
        assert all(c.label is None for c in spec.unlabeled) and all(c.label is not None for c in spec.test)
        dataset.validate_dataset(spec, deep=True)
        split = apply_labeled_ratio(out, 3, seed=2, out_dir=tmp_path / f"{out.name}-split")
        assert len(dataset.load_dataset(split).training) == 3


def test_cli_commands(synapse_raw, amos_raw, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="plbopt")
    add_convert_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", "synapse", str(synapse_raw), str(tmp_path / "s"), "--labeled", "20%",
                              "--fold", "2", "--seed", "4", "--link"])
    assert args.func(args) == 0
    assert _json(tmp_path / "s", "splits.json")["fold"] == 2 and len(_json(tmp_path / "s")["training"]) == 4
    assert "4 training, 16 unlabeled, 4 validation, 6 test" in capsys.readouterr().out
    args = parser.parse_args(["convert", "amos", str(amos_raw), str(tmp_path / "a"), "--link"])
    assert args.func(args) == 0 and len(_json(tmp_path / "a")["training"]) == 1
    args = parser.parse_args(["split", str(tmp_path / "s"), "--labeled", "2", "-o", str(tmp_path / "s2")])
    assert args.func(args) == 0 and len(_json(tmp_path / "s2")["training"]) == 2
    defaults = parser.parse_args(["convert", "synapse", "a", "b"])
    assert (defaults.labeled, defaults.fold, defaults.seed, defaults.link) == ("10%", 0, 0, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "synapse", "--help"])
    with pytest.raises(SystemExit):
        parser.parse_args(["split", str(tmp_path / "s")])  # --labeled is required
