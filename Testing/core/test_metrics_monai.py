"""The evaluation's option sets against MONAI's metrics, one set per metric (README, "Metrics").

Five cases built to hit every empty-mask situation: a class in both maps, only in the ground truth
(missed), only in the prediction (false positive), in neither, a mask on the image border, and a
case whose ground truth is all background. MONAI (``pip install monai``; it needs only torch and
numpy) scores the same arrays; its tests are skipped where it is not installed. The tests of the
averaging order and of ``--empty ignore-gt`` without MONAI always run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.cli import main
from PLBOptCore.evaluate import evaluate_folders, format_table

SHAPE = (12, 14, 16)  # (Z, Y, X)
SPACING = (2.0, 1.0, 0.8)  # (Z, Y, X) mm
CLASSES = {1: "a", 2: "b", 3: "c"}


def _ball(center, radius) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    cz, cy, cx = center
    return ((z - cz) * SPACING[0]) ** 2 + ((y - cy) * SPACING[1]) ** 2 + ((x - cx) * SPACING[2]) ** 2 <= radius ** 2


def _box(start, stop) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


def _labels(*masks) -> np.ndarray:
    """A label map with ``masks[k]`` painted as class ``k + 1`` (``None``: class absent)."""
    out = np.zeros(SHAPE, np.uint8)
    for k, mask in enumerate(masks):
        if mask is not None:
            out[mask] = k + 1
    return out


def _cases() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{case: (prediction, ground truth)}``."""
    rng = np.random.default_rng(0)
    noisy = _ball((6, 7, 8), 5.0) ^ (rng.random(SHAPE) < 0.03) & _ball((6, 7, 8), 7.0)
    return {
        # a and b in both (shifted, resized, noisy); c in neither
        "case0": (_labels(_ball((6, 5, 5), 4.0), _box((2, 8, 9), (7, 13, 15)), None),
                  _labels(_ball((5, 5, 6), 4.5), _box((3, 9, 10), (8, 13, 15)), None)),
        # a in both; b missed (GT only); c predicted where the GT has none
        "case1": (_labels(noisy, None, _box((1, 1, 12), (3, 3, 15))),
                  _labels(_ball((6, 7, 8), 5.0), _box((8, 1, 1), (11, 4, 4)), None)),
        # a on the image border (corner), b and c in both
        "case2": (_labels(_box((0, 0, 0), (4, 5, 6)), _ball((8, 9, 10), 3.0), _box((6, 1, 12), (9, 3, 16))),
                  _labels(_box((0, 0, 0), (3, 6, 6)), _ball((8, 10, 10), 3.5), _box((6, 1, 11), (9, 4, 16)))),
        # a predicted only; b in neither; c missed
        "case3": (_labels(_ball((3, 3, 3), 3.0), None, None),
                  _labels(None, None, _ball((8, 9, 10), 4.0))),
        # all-background ground truth; a predicted there
        "case4": (_labels(_box((4, 4, 4), (7, 8, 9)), None, None), _labels(None, None, None)),
    }


def _write(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING[::-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Tuple[Path, Path]:
    root = tmp_path_factory.mktemp("monai")
    for case, (pred, gt) in _cases().items():
        _write(root / "pred" / f"{case}.nii.gz", pred)
        _write(root / "gt" / f"{case}.nii.gz", gt)
    return root / "pred", root / "gt"


def _ours(folders, tmp_path, **options):
    return evaluate_folders(*folders, labels=CLASSES, out_dir=tmp_path, **options)


def test_average_cases_is_the_mean_over_cases_of_each_cases_class_mean(folders, tmp_path):
    by_class = _ours(folders, tmp_path)
    by_case = _ours(folders, tmp_path, average="cases")
    assert by_case["conventions"]["average"] == "cases" and by_class["conventions"]["average"] == "classes"
    for metric in ("dice", "asd"):
        table = np.array([[by_class["cases"][c][n][metric] for n in CLASSES.values()] for c in sorted(_cases())])
        rows = [np.nanmean(row) for row in table if not np.isnan(row).all()]
        assert by_case["mean"][metric] == pytest.approx(np.mean(rows))
        assert by_class["mean"][metric] == pytest.approx(np.mean(np.nanmean(table, axis=0)))
        # the per-class rows do not depend on the order
        assert by_case["classes"] == by_class["classes"]
    # case4 scores only a (Dice 0), case3 a and c (both 0): the orders differ on these cases
    assert by_case["mean"]["dice"] != pytest.approx(by_class["mean"]["dice"])
    assert by_case["case_means"]["case4"]["dice"] == 0.0
    assert "mean of cases" in format_table(by_case).splitlines()[-1]


def test_ignore_gt_leaves_out_a_class_predicted_where_the_gt_has_none(folders, tmp_path):
    ignore = _ours(folders, tmp_path)
    ignore_gt = _ours(folders, tmp_path, empty="ignore-gt", missing="inf")
    # c predicted in case1 without GT: Dice 0 under ignore (nnU-Net), not scored under ignore-gt
    assert ignore["cases"]["case1"]["c"]["dice"] == 0.0
    assert all(math.isnan(v) for k, v in ignore_gt["cases"]["case1"]["c"].items() if k != "empty")
    assert ignore_gt["cases"]["case1"]["c"]["empty"] == "ground_truth"
    # the missed class still scores Dice 0 and its distance under --missing
    assert ignore_gt["cases"]["case1"]["b"]["dice"] == 0.0 and ignore_gt["cases"]["case1"]["b"]["asd"] == math.inf
    # a case whose GT is all background scores nothing, so it is left out of a mean over cases
    assert math.isnan(_ours(folders, tmp_path, empty="ignore-gt", average="cases")["case_means"]["case4"]["dice"])


def test_cli_average_and_an_unknown_value(folders, tmp_path, capsys):
    assert main(["evaluate", *map(str, folders), "-o", str(tmp_path), "--average", "cases", "--empty", "ignore-gt"]) == 0
    out = capsys.readouterr().out
    assert "--average cases" in out and "--empty ignore-gt" in out
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *map(str, folders), "--average", "median"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------- MONAI
def _one_hot(arrays):
    import torch

    stacked = torch.as_tensor(np.stack(arrays).astype(np.int64))
    return torch.nn.functional.one_hot(stacked, len(CLASSES) + 1).permute(0, 4, 1, 2, 3).float()


def _monai_metric(name: str):
    metrics = pytest.importorskip("monai.metrics")
    return {"dice_ignore_empty": lambda: metrics.DiceMetric(include_background=False, ignore_empty=True),
            "dice_not_ignore_empty": lambda: metrics.DiceMetric(include_background=False, ignore_empty=False),
            "hd95": lambda: metrics.HausdorffDistanceMetric(include_background=False, percentile=95),
            "asd": lambda: metrics.SurfaceDistanceMetric(include_background=False, symmetric=False),
            "assd": lambda: metrics.SurfaceDistanceMetric(include_background=False, symmetric=True)}[name]


def _monai(name: str, reduction: str) -> np.ndarray:
    """MONAI's ``name`` over the cases (sorted), aggregated with ``reduction`` (a fresh metric each
    time: MONAI's reduction writes into its buffer)."""
    cases = _cases()
    pred = _one_hot([cases[c][0] for c in sorted(cases)])
    gt = _one_hot([cases[c][1] for c in sorted(cases)])
    metric = _monai_metric(name)()
    metric(y_pred=pred, y=gt, **({} if name.startswith("dice") else {"spacing": list(SPACING)}))
    return np.asarray(metric.aggregate(reduction=reduction), dtype=float)


# README's table: which option set gives which MONAI metric (include_background=False, default reduction)
MONAI_RECIPES = [
    ("dice_ignore_empty", "dice", {"empty": "ignore-gt"}),
    ("dice_not_ignore_empty", "dice", {"empty": "perfect"}),
    ("hd95", "hd95", {"empty": "ignore", "missing": "skip", "hd95": "max"}),
    ("asd", "asd", {"empty": "ignore", "missing": "inf"}),
    ("assd", "assd", {"empty": "ignore", "missing": "inf"}),
]


def _close(ours, theirs) -> bool:
    ours, theirs = np.asarray(ours, float).ravel(), np.asarray(theirs, float).ravel()  # MONAI's mean has shape (1,)
    if ours.shape != theirs.shape:
        return False
    same_special = np.array_equal(np.isnan(ours), np.isnan(theirs)) and np.array_equal(np.isinf(ours), np.isinf(theirs))
    finite = np.isfinite(ours) & np.isfinite(theirs)
    return same_special and np.allclose(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5) and bool(
        np.all(ours[np.isinf(ours)] == theirs[np.isinf(theirs)]))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("monai_name, metric, options", MONAI_RECIPES, ids=[r[0] for r in MONAI_RECIPES])
def test_each_option_set_reproduces_its_monai_metric(monai_name, metric, options, folders, tmp_path):
    ours = _ours(folders, tmp_path, average="cases", **options)
    names = list(CLASSES.values())
    per_case = np.array([[ours["cases"][c][n][metric] for n in names] for c in sorted(_cases())])
    assert _close(per_case, _monai(monai_name, "none")), (per_case, _monai(monai_name, "none"))
    # MONAI's default reduction ("mean") is --average cases ...
    assert _close(ours["mean"][metric], _monai(monai_name, "mean"))
    # ... and its per-class "mean_batch" the per-class rows (every class is scored in some case here)
    assert _close([ours["classes"][n][metric]["mean"] for n in names], _monai(monai_name, "mean_batch"))
    # the default order (--average classes) gives another number where some (case, class) is not
    # scored, and the same one where all are (--empty perfect)
    by_class = _ours(folders, tmp_path, **options)["mean"][metric]
    if math.isfinite(by_class):
        assert _close(by_class, _monai(monai_name, "mean")) == (not np.isnan(per_case).any())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_the_old_single_recipe_misses_monais_hd95_and_dice(folders, tmp_path):
    """``--empty ignore --missing inf --hd95 max`` (the README's recipe before) gives MONAI's ASD, but
    an infinite HD95 where MONAI's is NaN and finite, and a Dice that counts false-positive classes."""
    old = _ours(folders, tmp_path, empty="ignore", missing="inf", hd95="max", average="cases")
    assert old["mean"]["hd95"] == math.inf and math.isfinite(_monai("hd95", "mean").item())
    assert not _close(old["mean"]["dice"], _monai("dice_ignore_empty", "mean"))
    assert _close(old["mean"]["asd"], _monai("asd", "mean"))
