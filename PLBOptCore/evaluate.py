"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Files are paired by case name (file name without ``.nii.gz/.nii/.seg.nrrd/.nrrd/.mha/.mhd``);
``<case>_confidence.*`` maps written by ``plbopt predict`` are ignored. Every foreground class gets
Dice, ASD (one-sided, prediction → GT, as DHC reports), ASSD and HD95 in mm using the
ground-truth spacing; see :mod:`PLBOptCore.metrics` for the surface and empty-mask conventions.

Aggregation follows DHC: per class the mean (and population std) over cases, then the mean over
classes. Distances that are NaN (exactly one of prediction/GT empty) are left out of the means and
counted as ``n_missing``; their Dice of 0 stays in the Dice mean.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .data.io import case_name, image_files, read_image
from .errors import DatasetError
from .metrics import METRIC_NAMES, compute_case_metrics
from .utils import atomic_write

SPACING_TOLERANCE = 1e-3  # relative; files written by different tools round spacing differently

LabelsArg = Optional[Union[Dict[int, str], str, Path]]


def evaluate_folders(pred_dir: Union[str, Path], gt_dir: Union[str, Path], labels: LabelsArg = None,
                     out_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Score every prediction in ``pred_dir`` against its ground truth in ``gt_dir``.

    Args:
        pred_dir: folder of predicted label maps ``<case>.nii.gz`` (or .nii/.nrrd/.seg.nrrd/.mha/.mhd).
        gt_dir: folder of ground-truth label maps with the same case names.
        labels: ``{index: name}`` or the path of a ``dataset.json`` whose ``"labels"`` are used;
            index 0 (background) is not scored. Default: ``class_1 .. class_K`` with ``K`` the
            largest label value found.
        out_dir: where ``metrics.csv`` (one row per case × class) and ``metrics.json`` are written
            atomically; default ``pred_dir``.

    Returns:
        ``{"pred_dir", "gt_dir", "labels": {"1": name, ...},
        "cases": {case: {class_name: {"dice", "asd", "assd", "hd95"}}},
        "classes": {class_name: {"label", "n_cases", "n_missing", "dice": {"mean", "std"}, ...}},
        "mean": {"dice", "asd", "assd", "hd95"}}`` with NaN for undefined values (``null`` in JSON).

    Raises:
        DatasetError: missing folder, a prediction without GT or a GT without prediction (names
            the case), unreadable or non-3D files, size/spacing mismatch (names both files),
            non-integer or out-of-range label values.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    names = _resolve_labels(labels)
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

    per_case: Dict[str, Dict[int, Dict[str, float]]] = {}
    max_label = max(names) if names else 0
    for case in sorted(preds):
        pred, gt, spacing = _read_pair(preds[case], gts[case])
        if names is not None:
            _check_known_labels(pred, preds[case], names)
            _check_known_labels(gt, gts[case], names)
        found = int(max(pred.max(), gt.max()))
        max_label = max(max_label, found)
        per_case[case] = compute_case_metrics(pred, gt, found + 1, spacing)

    if names is None:
        names = {c: f"class_{c}" for c in range(1, max_label + 1)}
    # A class a case lacks in both prediction and GT was skipped above; by the empty-mask
    # convention it scores Dice 1 and distance 0.
    both_empty = {"dice": 1.0, "asd": 0.0, "assd": 0.0, "hd95": 0.0}
    cases = {case: {names[c]: dict(metrics.get(c, both_empty)) for c in sorted(names) if c > 0}
             for case, metrics in per_case.items()}
    results = {
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "labels": {str(c): n for c, n in sorted(names.items()) if c > 0},
        "cases": cases,
        **_aggregate(cases, {n: c for c, n in names.items() if c > 0}),
    }
    _write_outputs(results, Path(out_dir) if out_dir is not None else pred_dir)
    return results


def format_table(results: Dict[str, Any]) -> str:
    """Plain-text table: one row per class with Dice and ASD/ASSD/HD95 (mm) as mean±std, then the mean.

    ``missing`` counts the cases where exactly one of prediction and GT is empty for that class
    (distances undefined, left out of the distance means).
    """
    header = f"{'class':<20}{'Dice':>16}{'ASD (mm)':>16}{'ASSD (mm)':>16}{'HD95 (mm)':>16}{'missing':>9}"
    lines = [f"{len(results['cases'])} cases: {results['pred_dir']} vs {results['gt_dir']}", header,
             "-" * len(header)]
    for name, stats in results["classes"].items():
        cells = "".join(f"{_mean_std(stats[m]['mean'], stats[m]['std'], m):>16}" for m in METRIC_NAMES)
        lines.append(f"{name[:19]:<20}{cells}{stats['n_missing']:>9}")
    lines.append("-" * len(header))
    overall = "".join(f"{_fmt(results['mean'][m], m):>16}" for m in METRIC_NAMES)
    lines.append(f"{'mean':<20}{overall}")
    return "\n".join(lines)


def _fmt(value: float, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}" if metric == "dice" else f"{value:.2f}"


def _mean_std(mean: float, std: float, metric: str) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{_fmt(mean, metric)}±{_fmt(std, metric)}"


def _aggregate(cases: Dict[str, Dict[str, Dict[str, float]]], classes: Dict[str, int]) -> Dict[str, Any]:
    per_class: Dict[str, Any] = {}
    for name, label in sorted(classes.items(), key=lambda item: item[1]):
        values = {m: np.array([cases[c][name][m] for c in cases], dtype=float) for m in METRIC_NAMES}
        stats: Dict[str, Any] = {"label": label, "n_cases": len(cases),
                                 "n_missing": int(np.isnan(values["hd95"]).sum())}
        for m, v in values.items():
            finite = v[np.isfinite(v)]
            stats[m] = {"mean": float(finite.mean()) if finite.size else math.nan,
                        "std": float(finite.std()) if finite.size else math.nan}
        per_class[name] = stats
    overall = {}
    for m in METRIC_NAMES:
        means = np.array([s[m]["mean"] for s in per_class.values()], dtype=float)
        means = means[np.isfinite(means)]
        overall[m] = float(means.mean()) if means.size else math.nan
    return {"classes": per_class, "mean": overall}


def _write_outputs(results: Dict[str, Any], out_dir: Path) -> None:
    with atomic_write(out_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case", "label", "class", "dice", "asd_mm", "assd_mm", "hd95_mm"])
            labels = {name: int(c) for c, name in results["labels"].items()}
            for case, per_class in results["cases"].items():
                for name, metrics in per_class.items():
                    writer.writerow([case, labels[name], name]
                                    + ["" if math.isnan(metrics[m]) else repr(metrics[m]) for m in METRIC_NAMES])
    with atomic_write(out_dir / "metrics.json") as tmp:
        # NaN is not valid JSON: undefined values are written as null.
        tmp.write_text(json.dumps(_nan_to_none(results), indent=2, allow_nan=False) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
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


def _check_known_labels(array: np.ndarray, path: Path, names: Dict[int, str]) -> None:
    present = set(np.flatnonzero(np.bincount(array.ravel())).tolist())
    unknown = sorted(present - set(names) - {0})
    if unknown:
        raise DatasetError(f"{path}: label values {unknown} are not in the labels {sorted(names)}")


def _read_pair(pred_path: Path, gt_path: Path) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """Prediction and GT arrays ``(Z, Y, X)`` and the GT spacing reordered from SimpleITK's (x, y, z)."""
    pred, pred_image = _read_label_map(pred_path)
    gt, gt_image = _read_label_map(gt_path)
    if pred_image.GetSize() != gt_image.GetSize():
        raise DatasetError(f"{pred_path}: size {pred_image.GetSize()} differs from ground truth {gt_path} "
                           f"size {gt_image.GetSize()}")
    pred_spacing, gt_spacing = np.array(pred_image.GetSpacing()), np.array(gt_image.GetSpacing())
    if np.any(np.abs(pred_spacing - gt_spacing) > SPACING_TOLERANCE * gt_spacing):
        raise DatasetError(f"{pred_path}: spacing {tuple(pred_spacing)} differs from ground truth {gt_path} "
                           f"spacing {tuple(gt_spacing)}")
    return pred, gt, tuple(float(s) for s in gt_spacing[::-1])


def _resolve_labels(labels: LabelsArg) -> Optional[Dict[int, str]]:
    """``{index: name}`` from a dict or a dataset.json (MSD ``{"1": "spleen"}`` or nnU-Net v2
    ``{"spleen": 1}``); background 0 is kept here and skipped when scoring."""
    if labels is None:
        return None
    source: Union[str, Path] = "labels"
    if isinstance(labels, (str, Path)):
        source = Path(labels)
        try:
            labels = json.loads(source.read_text())["labels"]
        except FileNotFoundError:
            raise DatasetError(f"{source}: labels file not found") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{source}: cannot read \"labels\" ({exc!r})") from None
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
    return names
