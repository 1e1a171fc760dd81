"""nnU-Net v2 compatibility: a ``plbopt predict`` folder is what ``nnUNetv2_evaluate_simple`` reads,
and a stray file in ``imagesTs`` (which nnU-Net never trains on) does not stop training.

The format test runs everywhere: it lists the folders with nnU-Net v2's own rules
(``compute_metrics_on_folder_simple``: the file ending is that of the first reference file as
``os.path.splitext`` gives it, so ``.gz`` for ``.nii.gz``; the prediction folder's plain files with
that ending are the predictions, each must have a reference of the same name, and with
``chill=False`` every reference a prediction). Where nnU-Net v2 is importable
(``pip install nnunetv2``; its evaluation module also imports with ``--no-deps`` plus
batchgenerators, nibabel, acvl-utils, blosc2 (msgpack, ndindex, httpx) and
dynamic-network-architectures), its ``compute_metrics_on_folder_simple`` scores the folder and
its Dice must equal ``plbopt evaluate``'s.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.cli import main
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.evaluate import evaluate_folders

TINY_TRAIN = ["--preset", "supervised", "--iterations", "2", "--patch-size", "16", "32", "32", "--base-filters", "4",
              "--batch-size", "1", "--device", "cpu", "-q", "--set", "checkpoint_every=1", "validate_every=1000"]


def _nnunet_v2_tree(root: Path, ending: str = ".nii.gz") -> Path:
    """A small phantom as nnU-Net v2 lays it out (``imagesTr/<case>_0000<ending>`` ↔
    ``labelsTr/<case><ending>``, ``imagesTs``/``labelsTs``)."""
    msd = make_phantom_dataset(root.parent / f"{root.name}-msd", n_labeled=2, n_unlabeled=0, n_test=2,
                               n_validation=0, shape=(24, 48, 48), seed=5)
    spec = load_dataset(msd)
    for folder, cases in (("Tr", spec.training), ("Ts", spec.test)):
        for case in cases:
            (root / f"images{folder}").mkdir(parents=True, exist_ok=True)
            (root / f"labels{folder}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.ReadImage(str(case.image)), str(root / f"images{folder}" / f"{case.name}_0000{ending}"))
            sitk.WriteImage(sitk.ReadImage(str(case.label)), str(root / f"labels{folder}" / f"{case.name}{ending}"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {name: index for index, name in spec.labels.items()},
        "numTraining": len(spec.training), "file_ending": ending, "name": "Dataset043_Phantom"}))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Tuple[Path, Path]:
    """(nnU-Net v2 dataset, run folder) of a two-step supervised run. Read only."""
    base = tmp_path_factory.mktemp("nnunet")
    root = _nnunet_v2_tree(base / "Dataset043_Phantom")
    run = base / "run"
    assert main(["train", str(root), "-o", str(run), "--cache-dir", str(base / "cache"), *TINY_TRAIN]) == 0
    return root, run


def _predict(trained, tmp_path, ending: str) -> Tuple[Path, Path, Path]:
    """(predictions, reference labels, dataset.json) for the test cases written with ``ending``."""
    root, run = trained
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    for source, target, suffix in ((root / "imagesTs", images, "_0000"), (root / "labelsTs", labels, "")):
        target.mkdir()
        for path in sorted(source.iterdir()):
            case = path.name[: -len(".nii.gz")].removesuffix(suffix)
            sitk.WriteImage(sitk.ReadImage(str(path)), str(target / f"{case}{suffix}{ending}"))
    preds = tmp_path / "preds"
    assert main(["predict", str(run), str(images), "-o", str(preds), "--device", "cpu", "-q"]) == 0
    return preds, labels, root / "dataset.json"


def _nnunet_file_lists(folder_ref: Path, folder_pred: Path) -> Tuple[str, List[str], List[str]]:
    """nnU-Net v2's choice of files (compute_metrics_on_folder_simple → compute_metrics_on_folder):
    ``subfiles`` = plain files, sorted, with the suffix."""
    def subfiles(folder: Path, suffix: str) -> List[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))

    example = sorted(p for p in folder_ref.iterdir() if p.is_file())[0]
    ending = os.path.splitext(example)[-1]
    return ending, subfiles(folder_pred, ending), subfiles(folder_ref, ending)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".nrrd"])
def test_predict_folder_has_the_format_nnunet_evaluate_simple_reads(trained, tmp_path, ending):
    preds, labels, dataset_json = _predict(trained, tmp_path, ending)
    # plbopt evaluate writes its metrics.csv/json into the prediction folder: they must not count
    assert main(["evaluate", str(preds), str(labels), "--labels", str(dataset_json)]) == 0
    suffix, pred_files, ref_files = _nnunet_file_lists(labels, preds)
    assert suffix == os.path.splitext("case" + ending)[-1]
    assert pred_files == ref_files == sorted(p.name for p in labels.iterdir())  # every file has its partner
    for name in pred_files:
        pred, ref = sitk.ReadImage(str(preds / name)), sitk.ReadImage(str(labels / name))
        assert pred.GetSize() == ref.GetSize() and pred.GetNumberOfComponentsPerPixel() == 1
        assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())
        assert np.allclose(pred.GetDirection(), ref.GetDirection())
        assert np.issubdtype(sitk.GetArrayViewFromImage(pred).dtype, np.integer)
    assert (preds / "confidence").is_dir()  # the confidence maps are beside, not among, the label maps


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_nnunet_v2_evaluate_simple_accepts_a_predict_folder_and_agrees_on_dice(trained, tmp_path, ending):
    nnunet = pytest.importorskip("nnunetv2.evaluation.evaluate_predictions")
    preds, labels, dataset_json = _predict(trained, tmp_path, ending)
    classes = {index: name for name, index in json.loads(dataset_json.read_text())["labels"].items() if index}
    summary = tmp_path / "summary.json"
    # chill=False: nnU-Net asserts that every reference has a prediction; it reads every prediction
    nnunet.compute_metrics_on_folder_simple(str(labels), str(preds), sorted(classes), output_file=str(summary),
                                            num_processes=1, chill=False)
    theirs = json.loads(summary.read_text())
    ours = evaluate_folders(preds, labels, labels=dataset_json, out_dir=tmp_path)
    assert len(theirs["metric_per_case"]) == len(ours["cases"]) == 2
    for result in theirs["metric_per_case"]:
        case = Path(result["prediction_file"]).name[: -len(ending)]
        for index, name in classes.items():
            dice_theirs, dice_ours = result["metrics"][str(index)]["Dice"], ours["cases"][case][name]["dice"]
            assert (math.isnan(dice_theirs) and math.isnan(dice_ours)) or dice_theirs == pytest.approx(dice_ours)
    for index, name in classes.items():
        mean_theirs, mean_ours = theirs["mean"][str(index)]["Dice"], ours["classes"][name]["dice"]["mean"]
        assert (math.isnan(mean_theirs) and math.isnan(mean_ours)) or mean_theirs == pytest.approx(mean_ours)
    if math.isfinite(theirs["foreground_mean"]["Dice"]):
        assert theirs["foreground_mean"]["Dice"] == pytest.approx(ours["mean"]["dice"])


def test_a_stray_file_in_imagests_is_left_out_with_one_warning_and_training_runs(trained, tmp_path, capfd):
    """nnU-Net never reads imagesTs for training: a file there that is not ``<case>_0000<ending>``
    (notes saved beside the scans, another channel) costs one warning line each, not the training.
    The same file in imagesTr still refuses it (test_dataset_layouts)."""
    root = tmp_path / "Dataset043_Phantom"
    shutil.copytree(trained[0], root)
    image = sorted((root / "imagesTs").iterdir())[0]
    strays = [root / "imagesTs" / "scan notes.nii.gz", root / "imagesTs" / f"{image.name[:-len('_0000.nii.gz')]}_0001.nii.gz"]
    for stray in strays:
        shutil.copy(image, stray)
    (root / "imagesTs" / "README.txt").write_text("not an image: ignored without a word\n")
    run = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", str(root), "-o", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN]) == 0
    out, err = capfd.readouterr()
    warnings = [line for line in (out + err).splitlines() if "warning" in line]
    assert len(warnings) == len(strays), warnings
    for stray, line in zip(sorted(strays), warnings):
        assert line.startswith(f"plbopt: warning: {stray}: ") and "left out of the test cases" in line
    assert "README" not in out + err
    spec = load_dataset(root)
    assert sorted(c.image.name for c in spec.test) == sorted(p.name for p in (trained[0] / "imagesTs").iterdir())
    assert (run / "checkpoints" / "best.pt").is_file()
