"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Files are paired by case name (file name without ``.nii.gz/.nii/.seg.nrrd/.nrrd/.mha/.mhd``);
subfolders (the ``confidence/`` maps of ``plbopt predict``) are ignored, and each pair must share
its full geometry (size, spacing, origin, direction). Every foreground class gets Dice, ASD
(one-sided, prediction → GT, as DHC reports), ASSD and HD95 in mm using the ground-truth spacing.

Conventions (options ``empty``, ``missing``, ``hd95``, ``average``; see :mod:`PLBOptCore.metrics`),
recorded in ``metrics.json`` and printed above every table:

- ``empty="ignore"`` (default): a class absent from both prediction and GT is left out of the
  means (nnU-Net v2); ``"perfect"`` counts it as Dice 1 / distance 0; ``"ignore-gt"`` also leaves
  out a class predicted where the GT has none (MONAI ``DiceMetric(ignore_empty=True)``).
- ``missing="diagonal"`` (default): a class in exactly one of them has Dice 0 and distance = the
  image diagonal (mm); ``"inf"`` as MONAI's ASD/ASSD; ``"skip"`` leaves the distance out of the
  means (as MONAI's HD95, which is NaN there).
- ``hd95="pooled"`` (default; medpy, DHC-style tables): 95th percentile of both directions'
  distances together; ``"max"``: the larger directed 95th percentile (MONAI).
- ``average="classes"`` (default; nnU-Net v2, DHC): each class's mean over the cases that score it,
  then the mean over classes; ``"cases"``: each case's mean over the classes it scores, then the
  mean over cases (MONAI's default ``reduction="mean"``). The per-class rows are the same.

Sparse ground truth: when the labels (``--labels dataset.json``) have nnU-Net v2's ``"ignore"`` label
(the highest value), or a run's dataset.json gives ``"ignore_label"``, GT voxels of that value are
left out of every class's TP, FP and FN, as nnU-Net's ``compute_metrics`` does
(:func:`PLBOptCore.metrics.annotated_only`); ``ignore`` is never scored as a class, and a prediction
holding its value is refused.

``--empty perfect --missing skip`` reproduces earlier PLBOpt tables (and docs/RESULTS.md). No
single option set gives all of MONAI's metrics (``include_background=False``, default
``reduction="mean"``), one set per metric does (tested against MONAI in
``Testing/core/test_metrics_monai.py``):

- ``DiceMetric(ignore_empty=True)``: Dice of ``--empty ignore-gt --average cases``;
  ``DiceMetric(ignore_empty=False)``: Dice of ``--empty perfect --average cases``;
- ``HausdorffDistanceMetric(percentile=95)``: HD95 of ``--empty ignore --missing skip --hd95 max
  --average cases``;
- ``SurfaceDistanceMetric(symmetric=False/True)``: ASD/ASSD of ``--empty ignore --missing inf
  --average cases``.

Per class (``reduction="mean_batch"``) the same sets with any ``--average``. NaN (not scored) is
left out of every mean, infinity is kept; the per-class std is the population std.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .data.dataset import IGNORE_NAME
from .data.io import case_name, check_same_geometry, image_files, read_image
from .errors import ConfigError, DatasetError
from .metrics import (AVERAGE_CONVENTIONS, EMPTY_CONVENTIONS, HD95_CONVENTIONS, METRIC_NAMES, MISSING_CONVENTIONS,
                      annotated_only, both_empty_metrics, compute_case_metrics)
from .utils import atomic_write

LabelsArg = Optional[Union[Dict[int, str], str, Path]]

CONVENTION_TEXT = {
    "empty": {"ignore": "class absent from prediction and GT: not scored",
              "perfect": "class absent from prediction and GT: Dice 1, distance 0",
              "ignore-gt": "class absent from GT: not scored, even where predicted"},
    "missing": {"diagonal": "class in only one of them: Dice 0, distance = image diagonal",
                "inf": "class in only one of them: Dice 0, distance inf",
                "skip": "class in only one of them: Dice 0, distance left out"},
    "hd95": {"pooled": "95th percentile of both directions together, as medpy",
             "max": "larger directed 95th percentile, as MONAI"},
    "average": {"classes": "mean row = mean over classes of each class's mean over cases",
                "cases": "mean row = mean over cases of each case's mean over classes, as MONAI"},
}


def check_conventions(empty: str, missing: str, hd95: str, average: str = "classes") -> Dict[str, str]:
    """The conventions as a dict; an unknown value raises ``ConfigError`` naming the option."""
    for option, value, allowed in (("empty", empty, EMPTY_CONVENTIONS), ("missing", missing, MISSING_CONVENTIONS),
                                   ("hd95", hd95, HD95_CONVENTIONS), ("average", average, AVERAGE_CONVENTIONS)):
        if value not in allowed:
            raise ConfigError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
    return {"empty": empty, "missing": missing, "hd95": hd95, "average": average}


def evaluate_folders(pred_dir: Union[str, Path], gt_dir: Union[str, Path], labels: LabelsArg = None,
                     out_dir: Optional[Union[str, Path]] = None, empty: str = "ignore", missing: str = "diagonal",
                     hd95: str = "pooled", average: str = "classes") -> Dict[str, Any]:
    """Score every prediction in ``pred_dir`` against its ground truth in ``gt_dir``.

    Args:
        pred_dir: folder of predicted label maps ``<case>.nii.gz`` (or .nii/.nrrd/.seg.nrrd/.mha/.mhd).
        gt_dir: folder of ground-truth label maps with the same case names.
        labels: ``{index: name}`` or the path of a ``dataset.json`` whose ``"labels"`` are used;
            index 0 (background) is not scored; a label named ``"ignore"`` (the highest index) or
            a dataset.json's ``"ignore_label"`` marks unannotated GT voxels (module docstring).
            Default: ``class_1 .. class_K`` with ``K`` the largest label value found.
        out_dir: where ``metrics.csv`` (one row per case × class) and ``metrics.json`` are written
            atomically; default ``pred_dir``.
        empty, missing, hd95, average: the conventions of the module docstring.

    Returns:
        ``{"pred_dir", "gt_dir", "conventions": {"empty", "missing", "hd95", "average"},
        "labels": {"1": name, ...}, "cases": {case: {class_name: {"dice", "asd", "assd", "hd95", "empty"}}},
        "classes": {class_name: {"label", "n_cases", "n_missing", "n_absent", "dice": {"mean", "std"}, ...}},
        "case_means": {case: {"dice", ...}}, "mean": {"dice", "asd", "assd", "hd95"}}`` (``mean``
        averaged in the order ``average``) with NaN for values not scored (``null`` in
        JSON) and infinity as ``"inf"`` in JSON. ``"empty"`` is one of ``none``, ``both``,
        ``prediction``, ``ground_truth`` (the empty side); ``n_missing`` counts cases with exactly
        one side empty, ``n_absent`` cases with both.

    Raises:
        DatasetError: missing folder, a prediction without GT or a GT without prediction (names
            the case), unreadable or non-3D files, geometry mismatch (names both files),
            non-integer or out-of-range label values.
        ConfigError: an unknown convention.
    """
    conventions = check_conventions(empty, missing, hd95, average)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    names, ignore = _resolve_labels(labels)
    preds = _list_cases(pred_dir, "prediction")
    gts = _list_cases(gt_dir, "ground-truth")
    if not preds:
        raise DatasetError(f"{pred_dir}: no label maps found (expected <case>.nii.gz, .nrrd or .mha)")
    for case, path in preds.items():
        if case not in gts:
            raise DatasetError(f"{path}: no ground truth for case {case!r} in {gt_dir}")
    for case, path in gts.items():
        if case not in preds:
            raise DatasetError(f"{path}: no prediction for case {case!r} in {pred_dir}")

    per_case: Dict[str, Dict[int, Dict[str, Any]]] = {}
    max_label = max(names) if names else 0
    for case in sorted(preds):
        pred, gt, spacing = _read_pair(preds[case], gts[case])
        values = [_label_values(pred, preds[case], names), _label_values(gt, gts[case], names, ignore)]
        if ignore is not None:
            pred, gt = annotated_only(pred, gt, ignore)
            values[1] = values[1][values[1] != ignore]
        # Scored on the classes present, numbered 1..K: a label map's values may be sparse
        # (FreeSurfer-like tables), and every class number costs a pass over the volume.
        present = np.union1d(np.union1d(*values), [0])
        compact = compute_case_metrics(np.searchsorted(present, pred), np.searchsorted(present, gt), len(present),
                                       spacing, empty, missing, hd95)
        per_case[case] = {int(present[k]): metrics for k, metrics in compact.items()}
        max_label = max(max_label, int(present[-1]))

    if names is None:
        names = {c: f"class_{c}" for c in range(1, max_label + 1)}
    # Classes above a case's largest label value were skipped above: absent from both.
    cases = {case: {names[c]: dict(metrics.get(c, both_empty_metrics(empty))) for c in sorted(names) if c > 0}
             for case, metrics in per_case.items()}
    results = {
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "conventions": conventions,
        "labels": {str(c): n for c, n in sorted(names.items()) if c > 0},
        "cases": cases,
        **_aggregate(cases, {n: c for c, n in names.items() if c > 0}, average),
    }
    _write_outputs(results, Path(out_dir) if out_dir is not None else pred_dir)
    return results


def format_table(results: Dict[str, Any]) -> str:
    """Plain-text table: the conventions used, one row per class with Dice and ASD/ASSD/HD95 (mm)
    as mean±std, then the mean over classes.

    ``missing`` counts the cases where exactly one of prediction and GT holds the class, ``absent``
    those where neither does.
    """
    conventions = results["conventions"]
    header = (f"{'class':<20}{'Dice':>16}{'ASD (mm)':>16}{'ASSD (mm)':>16}{'HD95 (mm)':>16}"
              f"{'missing':>9}{'absent':>8}")
    lines = [f"{len(results['cases'])} cases: {results['pred_dir']} vs {results['gt_dir']}",
             "conventions: " + "; ".join(f"--{key} {value} ({CONVENTION_TEXT[key][value]})"
                                         for key, value in conventions.items()),
             header, "-" * len(header)]
    for name, stats in results["classes"].items():
        cells = "".join(f"{_mean_std(stats[m]['mean'], stats[m]['std'], m):>16}" for m in METRIC_NAMES)
        lines.append(f"{name[:19]:<20}{cells}{stats['n_missing']:>9}{stats['n_absent']:>8}")
    lines.append("-" * len(header))
    overall = "".join(f"{_fmt(results['mean'][m], m):>16}" for m in METRIC_NAMES)
    lines.append(f"{'mean of ' + conventions.get('average', 'classes'):<20}{overall}")
    return "\n".join(lines)


def _fmt(value: float, metric: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if metric == "dice" else f"{value:.2f}"


def _mean_std(mean: float, std: float, metric: str) -> str:
    if mean is None or not math.isfinite(mean):
        return _fmt(mean, metric)
    return f"{_fmt(mean, metric)}±{_fmt(std, metric)}"


def _mean_std_of(values: np.ndarray) -> Dict[str, float]:
    """Mean and population std of the scored values (NaN = not scored is left out; inf is kept,
    and makes the mean inf and the std undefined)."""
    scored = values[~np.isnan(values)]
    if not scored.size:
        return {"mean": math.nan, "std": math.nan}
    if np.isinf(scored).any():
        return {"mean": float(scored.mean()), "std": math.nan}
    return {"mean": float(scored.mean()), "std": float(scored.std())}


def _aggregate(cases: Dict[str, Dict[str, Dict[str, Any]]], classes: Dict[str, int],
               average: str = "classes") -> Dict[str, Any]:
    per_class: Dict[str, Any] = {}
    for name, label in sorted(classes.items(), key=lambda item: item[1]):
        statuses = [cases[c][name]["empty"] for c in cases]
        stats: Dict[str, Any] = {"label": label, "n_cases": len(cases),
                                 "n_missing": sum(s in ("prediction", "ground_truth") for s in statuses),
                                 "n_absent": statuses.count("both")}
        for m in METRIC_NAMES:
            stats[m] = _mean_std_of(np.array([cases[c][name][m] for c in cases], dtype=float))
        per_class[name] = stats
    # each case's mean over the classes it scores (NaN where it scores none)
    case_means = {case: {m: _mean_std_of(np.array([scores[name][m] for name in per_class], dtype=float))["mean"]
                         for m in METRIC_NAMES} for case, scores in cases.items()}
    means = ([s[m]["mean"] for s in per_class.values()] if average == "classes" else
             [c[m] for c in case_means.values()] for m in METRIC_NAMES)
    overall = {m: _mean_std_of(np.array(values, dtype=float))["mean"] for m, values in zip(METRIC_NAMES, means)}
    return {"classes": per_class, "case_means": case_means, "mean": overall}


def _write_outputs(results: Dict[str, Any], out_dir: Path) -> None:
    with atomic_write(out_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case", "label", "class", "dice", "asd_mm", "assd_mm", "hd95_mm", "empty"])
            labels = {name: int(c) for c, name in results["labels"].items()}
            for case, per_class in results["cases"].items():
                for name, metrics in per_class.items():
                    writer.writerow([case, labels[name], name]
                                    + ["" if math.isnan(metrics[m]) else repr(metrics[m]) for m in METRIC_NAMES]
                                    + [metrics["empty"]])
    with atomic_write(out_dir / "metrics.json") as tmp:
        # NaN and infinity are not valid JSON: not-scored values are written as null, infinity as "inf".
        tmp.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):  # distances are never negative
        return "inf"
    return value


def _list_cases(folder: Path, role: str) -> Dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {role} folder not found")
    cases: Dict[str, Path] = {}
    for path in image_files(folder):
        name = case_name(path)
        if name in cases:
            raise DatasetError(f"{path}: case {name!r} is also given by {cases[name].name}")
        cases[name] = path
    return cases


def _read_label_map(path: Path) -> Tuple[np.ndarray, sitk.Image]:
    image = read_image(path)  # DatasetError for missing, corrupt, non-3D, NaN/Inf files
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X)
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise DatasetError(f"{path}: not a label map (non-integer values)")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise DatasetError(f"{path}: negative label value {int(array.min())}")
    return array, image


# Without class names, classes are named class_1..class_K up to the largest value found; a larger
# value is more likely a corrupt or non-label file than a label map, and would make K names.
MAX_UNNAMED_LABEL = 1000


def _label_values(array: np.ndarray, path: Path, names: Optional[Dict[int, str]],
                  ignore: Optional[int] = None) -> np.ndarray:
    """The sorted label values of ``array``, refused with ``DatasetError`` when not in ``names``
    (``ignore`` allowed: ground truth only) or, without names, above :data:`MAX_UNNAMED_LABEL`
    (np.unique: no table as long as the largest value)."""
    values = np.unique(array)
    if names is not None:
        unknown = sorted(set(values.tolist()) - set(names) - {0, ignore})
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise DatasetError(f"{path}: label values [{shown}] are not in the labels {sorted(names)[:20]}")
    elif values.size and values[-1] > MAX_UNNAMED_LABEL:
        raise DatasetError(f"{path}: label value {int(values[-1])} is above {MAX_UNNAMED_LABEL}; "
                           "give the class names (--labels dataset.json) to score such label maps")
    return values


def _read_pair(pred_path: Path, gt_path: Path) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """Prediction and GT arrays ``(Z, Y, X)`` on the same grid (size, spacing, origin, direction),
    and the GT spacing reordered from SimpleITK's (x, y, z)."""
    pred, pred_image = _read_label_map(pred_path)
    gt, gt_image = _read_label_map(gt_path)
    check_same_geometry(gt_image, pred_image, gt_path, pred_path)
    return pred, gt, tuple(float(s) for s in gt_image.GetSpacing()[::-1])


def _resolve_labels(labels: LabelsArg) -> Tuple[Optional[Dict[int, str]], Optional[int]]:
    """``({index: name}, ignore index or None)`` from a dict or a dataset.json (MSD ``{"1": "spleen"}``
    or nnU-Net v2 ``{"spleen": 1}``); background 0 is kept here and skipped when scoring. The ignore
    index is that of a label named ``"ignore"`` (which must be the highest, as nnU-Net v2 requires)
    or a dataset.json's ``"ignore_label"`` (a run's: its labels are the network's classes)."""
    if labels is None:
        return None, None
    source: Union[str, Path] = "labels"
    ignore: Optional[int] = None
    if isinstance(labels, (str, Path)):
        source = Path(labels)
        try:
            data = json.loads(source.read_text())
            labels = data["labels"]
            ignore = data.get("ignore_label")
        except FileNotFoundError:
            raise DatasetError(f"{source}: labels file not found") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{source}: cannot read \"labels\" ({exc!r})") from None
        except RecursionError:  # json recurses once per level of nesting
            raise DatasetError(f"{source}: cannot read \"labels\" (JSON nested too deeply)") from None
    try:
        items: List[Tuple[int, str]] = []
        for key, value in dict(labels).items():
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"unsupported entry {key!r}: {value!r}")
            if isinstance(value, int):  # nnU-Net v2: name → index
                items.append((value, str(key)))
            else:
                items.append((int(key), value))
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{source}: labels must map integer indices to names ({exc})") from None
    names = dict(items)
    if len(names) != len(items) or any(c < 0 for c in names):
        raise DatasetError(f"{source}: labels have duplicate or negative indices")
    foreground = [n for c, n in names.items() if c > 0]
    if not foreground:
        raise DatasetError(f"{source}: labels have no foreground class")
    if len(set(foreground)) != len(foreground):
        raise DatasetError(f"{source}: labels have duplicate class names")
    named_ignore = [c for c, n in names.items() if n == IGNORE_NAME]
    if named_ignore:
        if named_ignore[0] != max(names):
            raise DatasetError(f"{source}: the \"ignore\" label must have the highest label value (as nnU-Net v2 "
                               f"requires), but it is {named_ignore[0]} and the highest is {max(names)}")
        ignore = named_ignore[0]
        del names[ignore]
        if not any(c > 0 for c in names):
            raise DatasetError(f"{source}: labels have no foreground class besides \"ignore\"")
    elif ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int) or ignore <= 0
                                 or ignore in names):
        raise DatasetError(f"{source}: \"ignore_label\" must be a positive label value that is no class, "
                           f"got {ignore!r}")
    return names, ignore
