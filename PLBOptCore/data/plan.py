"""The dataset's fingerprint and preprocessing plan, as nnU-Net v2 plans an experiment.

A *fingerprint* summarises the labeled cases once (spacings, shapes before and after the body crop,
foreground intensities) and is cached next to the preprocessed arrays. The *plan* turns it into the
preprocessing settings of :data:`~PLBOptCore.config.PLANNED_KEYS`:

* **normalisation from the modality** (``channel_names`` / ``modality`` in ``dataset.json``): CT is
  clipped to the foreground's 0.5–99.5 percentiles and z-scored with the foreground's mean and std
  (nnU-Net's CTNormalization); any other image is z-scored per case over its body, and its body is
  what lies above the image's minimum instead of above -500 HU;
* **target spacing** = the median spacing, with the coarse axis of anisotropic data (one spacing more
  than 3× another, e.g. 7.7 mm MRI slices) at its 10th percentile, as nnU-Net does; on the CPU
  schedule the finer axes are then coarsened until the box around a median case's labeled
  structures fits in :data:`CPU_PATCHES_PER_CASE` patches, so that a patch of the small CPU budget
  still sees the structures' context (nnU-Net's 3d_lowres idea; the box, not the body, so that small
  structures in a large body, as in head-and-neck CT, keep their resolution);
* **patch size**: within the schedule's voxel budget (:data:`~PLBOptCore.config.PATCH_BUDGET`) and
  the median cropped case, the multiples of 16 that give the widest view in every direction.

The plan is computed once when a run starts, printed, stored in the run (``plan.json``, and its
values in ``config.json``), and every consumer (trainer, predictor, export, the Slicer module) reads
it from there unchanged. Values given explicitly (``--set``, ``--config``) win over the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..config import PATCH_BUDGET, PLANNED_KEYS
from ..errors import DatasetError
from ..utils import atomic_write
from .dataset import DatasetSpec
from .io import read_image
from .preprocess import BODY_THRESHOLD_HU, PreprocessParams, _source_stamp, body_box, body_mask

FINGERPRINT_VERSION = 1
# Foreground voxels kept per case for the intensity statistics (nnU-Net samples 10,000 too).
FOREGROUND_SAMPLES = 10_000
# nnU-Net's anisotropy rule: an axis whose spacing is more than 3× the finest one is the coarse axis.
ANISOTROPY_RATIO = 3.0
# CPU schedule: the box around a median case's labeled structures spans at most this many patches
# of the 16×48×48 budget (295k voxels). Measured boxes: LA 46×62×106 mm (native 1.25 mm kept),
# OpenKBP 233×211×181 mm (native kept), CHAOS 243×187×278 mm (in-plane 1.25 mm coarsened).
CPU_PATCHES_PER_CASE = 8
PATCH_MULTIPLE = 16  # 4 VNet poolings
# Refinement's homogeneity test (superpixel std <= factor x the volume's noise) on CT. On other
# modalities the factor is 0 (refine in every superpixel): MRI texture and bias fields make the
# noise-scaled test reject nearly every superpixel, so refinement did nothing there; measured in
# docs/RESULTS.md ("With the floor"), on the validation cases as well as on the test cases.
CT_REFINE_HOMOGENEITY = 1.5


def is_ct(modality: str) -> bool:
    """Whether ``modality`` (a ``channel_names`` value) is CT, as nnU-Net decides: the name "CT"."""
    return modality.strip().upper() == "CT"


def refine_homogeneity_for(modality: str) -> float:
    """``refine_homogeneity`` of a run that does not set it: :data:`CT_REFINE_HOMOGENEITY` on CT, 0 otherwise."""
    return CT_REFINE_HOMOGENEITY if is_ct(modality) else 0.0


def refine_homogeneity_reason(modality: str) -> str:
    """Why :func:`refine_homogeneity_for` gives ``modality`` its value (logged when a run starts)."""
    rule = ("refine only in superpixels whose std is within that many times the noise" if is_ct(modality)
            else "not CT: refine in every superpixel, the noise-scaled test rejects MRI texture")
    return f"{modality or 'modality not given'}: {rule}"


def with_modality_defaults(config: Any, modality: str) -> Any:
    """``config`` with the settings left to the modality (None) decided: ``refine_homogeneity``."""
    if config.refine_homogeneity is not None:
        return config
    return dataclasses.replace(config, refine_homogeneity=refine_homogeneity_for(modality))


def body_threshold_for(modality: str) -> Optional[float]:
    """The body rule of :func:`~PLBOptCore.data.preprocess.body_mask`: -500 HU for CT, else the image minimum."""
    return BODY_THRESHOLD_HU if is_ct(modality) else None


# ------------------------------------------------------------------------------------ fingerprint
def compute_fingerprint(spec: DatasetSpec, cache_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Fingerprint of ``spec``'s labeled cases, read from or written to ``cache_dir``.

    Returns ``{"modality", "cases", "spacings" [(Z, Y, X) mm], "shapes" [(Z, Y, X)], "cropped_shapes"
    (after the body crop, native grid), "foreground_boxes" (the box around the labeled voxels plus
    the crop margin), "foreground" {mean, std, percentile_00_5, percentile_99_5,
    median, min, max, samples}}``. The cache file ``fingerprint-<hash>.json`` is keyed by the
    modality and the labeled files' names, sizes and modification times.
    """
    stamps = [_source_stamp(case, spec.ignore_label) for case in spec.training]
    key = hashlib.sha1(json.dumps([FINGERPRINT_VERSION, spec.modality, stamps], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"fingerprint-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # unreadable (a crash of an older version): compute it again
    threshold = body_threshold_for(spec.modality)
    spacings, shapes, cropped, foreground_boxes, samples = [], [], [], [], []
    for index, case in enumerate(spec.training):
        image = read_image(case.image)
        raw = sitk.GetArrayFromImage(image).astype(np.float32)
        label = sitk.GetArrayFromImage(read_image(case.label))
        if spec.ignore_label is not None:  # annotated voxels only: unannotated ones are no foreground
            label = np.where(label == spec.ignore_label, 0, label)
        start, stop = body_box(body_mask(raw, threshold), label)
        spacings.append([float(s) for s in reversed(image.GetSpacing())])
        shapes.append([int(n) for n in raw.shape])
        cropped.append([int(b - a) for a, b in zip(start, stop)])
        fg_start, fg_stop = body_box(label > 0, None)
        foreground_boxes.append([int(b - a) for a, b in zip(fg_start, fg_stop)])
        foreground = raw[label > 0]
        if foreground.size > FOREGROUND_SAMPLES:  # seeded: the same fingerprint on every machine
            foreground = np.random.default_rng(index).choice(foreground, FOREGROUND_SAMPLES, replace=False)
        samples.append(foreground)
    values = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if values.size == 0:
        raise DatasetError(f"{spec.json_path}: the labeled cases have no foreground voxel; nothing to plan from")
    fingerprint = {
        "version": FINGERPRINT_VERSION, "modality": spec.modality, "cases": [case.name for case in spec.training],
        "spacings": spacings, "shapes": shapes, "cropped_shapes": cropped, "foreground_boxes": foreground_boxes,
        "foreground": {"mean": float(values.mean()), "std": float(values.std()),
                       "percentile_00_5": float(np.percentile(values, 0.5)),
                       "percentile_99_5": float(np.percentile(values, 99.5)),
                       "median": float(np.median(values)), "min": float(values.min()), "max": float(values.max()),
                       "samples": int(values.size)},
    }
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps(fingerprint, indent=1))
        except OSError as exc:
            raise DatasetError(f"{path.parent}: cannot write the dataset fingerprint ({exc.strerror or exc}); "
                               "give a writable folder with --cache-dir") from None
    return fingerprint


# ------------------------------------------------------------------------------------ planning
def _median(rows: Sequence[Sequence[float]]) -> np.ndarray:
    return np.median(np.asarray(rows, dtype=np.float64), axis=0)


def plan_spacing(spacings: Sequence[Sequence[float]], foreground_boxes: Sequence[Sequence[int]],
                 schedule: str) -> Tuple[Tuple[float, float, float], List[str]]:
    """Target spacing (Z, Y, X) mm and the reasons, from the cases' spacings and foreground boxes.

    >>> plan_spacing([[7.7, 1.25, 1.25]] * 3, [[36, 200, 200]] * 3, "gpu")[0]
    (7.7, 1.25, 1.25)
    """
    all_spacings = np.asarray(spacings, dtype=np.float64)
    target = _median(all_spacings)
    reasons = [f"median spacing {_mm(target)}"]
    coarse = int(np.argmax(target))
    if target[coarse] > ANISOTROPY_RATIO * target.min():
        target[coarse] = float(np.percentile(all_spacings[:, coarse], 10))
        reasons.append(f"anisotropic ({'ZYX'[coarse]} more than {ANISOTROPY_RATIO:g}x the finest): "
                       f"{'ZYX'[coarse]} at its 10th percentile, {target[coarse]:.3g} mm")
    if schedule == "cpu":
        extent = _median(np.asarray(foreground_boxes) * all_spacings)  # mm of a median case's structures
        limit = CPU_PATCHES_PER_CASE * PATCH_BUDGET["cpu"]
        coarsened = False
        while np.prod(extent / target) > limit:
            finest = target < target.max() - 1e-9  # the finer axes first, up to the coarsest; then all
            target = np.where(finest, np.minimum(target * 1.05, target.max()), target) if finest.any() else target * 1.05
            coarsened = True
        if coarsened:
            reasons.append(f"coarsened for the CPU schedule: the labeled structures' box ({_mm(extent)}) "
                           f"within {CPU_PATCHES_PER_CASE} patches ({limit} voxels)")
    return tuple(float(round(s, 4)) for s in target), reasons


def plan_patch_size(median_shape: Sequence[float], spacing: Sequence[float], budget: int) -> Tuple[int, int, int]:
    """Patch (Z, Y, X) in multiples of 16, at most the median case's shape rounded up, with at most
    ``budget`` voxels: of those, the one whose narrowest side spans the most millimetres (the widest
    view in every direction), then the one with the most voxels.

    >>> plan_patch_size([36, 136, 136], [7.7, 2.36, 2.36], 16 * 48 * 48)
    (16, 48, 48)
    >>> plan_patch_size([44, 71, 92], [1.25, 1.25, 1.25], 16 * 48 * 48)
    (32, 32, 32)
    """
    limits = [max(PATCH_MULTIPLE, int(math.ceil(n / PATCH_MULTIPLE)) * PATCH_MULTIPLE) for n in median_shape]
    candidates = itertools.product(*(range(PATCH_MULTIPLE, limit + 1, PATCH_MULTIPLE) for limit in limits))
    fitting = [patch for patch in candidates if int(np.prod(patch)) <= budget]
    if not fitting:  # a budget below 16³ still gets the smallest patch a VNet takes
        return (PATCH_MULTIPLE,) * 3
    best = max(fitting, key=lambda patch: (min(n * s for n, s in zip(patch, spacing)), int(np.prod(patch)), patch))
    return tuple(int(n) for n in best)


def plan_preprocessing(fingerprint: Dict[str, Any], schedule: str,
                       explicit: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The plan for ``schedule`` (``"cpu"``: ``--small``; ``"gpu"``: the full network):
    ``{"settings": {key: value for PLANNED_KEYS}, "reasons": {key: text}, "median_shape", ...}``.

    A ``target_spacing`` in ``explicit`` (a spacing, or None for each case's native grid) is the grid
    the patch is sized on: the patch has to cover the same millimetres on the grid the run trains on.
    """
    if schedule not in PATCH_BUDGET:
        raise ValueError(f"schedule must be one of {', '.join(PATCH_BUDGET)}, got {schedule!r}")
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    cropped_shapes = np.asarray(fingerprint["cropped_shapes"], dtype=np.float64)
    spacing, spacing_reasons = plan_spacing(fingerprint["spacings"], fingerprint["foreground_boxes"], schedule)
    explicit = explicit or {}
    trained_spacing = explicit.get("target_spacing", spacing)
    if trained_spacing is None:  # each case keeps its own grid
        grid, grid_name, median_shape = _median(spacings), "the native spacing", _median(cropped_shapes)
    else:
        grid = np.asarray(trained_spacing, dtype=np.float64)
        grid_name = "the given target spacing" if "target_spacing" in explicit else "the target spacing"
        median_shape = _median(cropped_shapes * spacings / grid)  # the median cropped case on that grid
    budget = PATCH_BUDGET[schedule]
    patch = plan_patch_size(median_shape, grid, budget)
    modality, fg = fingerprint["modality"], fingerprint["foreground"]
    reasons = {"target_spacing": "; ".join(spacing_reasons),
               "patch_size": f"median cropped case {_voxels(median_shape)} at {grid_name}, "
                             f"within the {schedule.upper()} budget of {budget} voxels"}
    if is_ct(modality):
        low, high = fg["percentile_00_5"], fg["percentile_99_5"]
        settings = dict(normalization="ct", clip_window=(round(low, 4), round(high, 4)),
                        intensity_mean_std=(round(fg["mean"], 4), round(max(fg["std"], 1e-6), 4)),
                        body_threshold=BODY_THRESHOLD_HU)
        # the numbers go with their own keys, so that a window given explicitly is not contradicted
        reasons.update(normalization=f"CT: clip to the foreground's intensity window, z-score with its mean and std; "
                                     f"body above {BODY_THRESHOLD_HU:g} HU",
                       clip_window="the labeled foreground's 0.5-99.5 percentiles",
                       intensity_mean_std="the labeled foreground's mean and std")
    else:
        settings = dict(normalization="zscore", clip_window=None, intensity_mean_std=None, body_threshold=None)
        reasons["normalization"] = (f"{modality or 'modality not given'} (not CT): z-score each case over its body; "
                                    "body above the image minimum")
    settings.update(target_spacing=spacing, patch_size=patch)
    assert set(settings) == set(PLANNED_KEYS)
    return {"schedule": schedule, "patch_budget": budget, "modality": modality,
            "median_spacing": [round(float(s), 4) for s in _median(spacings)],
            "median_shape": [round(float(s), 1) for s in median_shape],
            "settings": settings, "reasons": reasons}


def resolve_plan(plan: Dict[str, Any], explicit: Dict[str, Any]) -> Dict[str, Any]:
    """``plan`` with the given values recorded: ``plan["applied"]`` holds the planned values that
    are used, ``plan["explicit"]`` the values given instead (which win)."""
    given = {key: explicit[key] for key in PLANNED_KEYS if key in explicit}
    applied = {key: value for key, value in plan["settings"].items() if key not in given}
    return {**plan, "applied": applied, "explicit": given}


def format_plan(plan: Dict[str, Any], config: Any) -> List[str]:
    """Lines describing the plan as it applies to ``config`` (printed when training starts)."""
    lines = [f"preprocessing plan ({plan['schedule'].upper()} schedule, {plan['modality'] or 'modality not given'}; "
             f"median spacing {_mm(plan['median_spacing'])}):"]
    for key in PLANNED_KEYS:
        value = getattr(config, key)
        shown = list(value) if isinstance(value, tuple) else value
        if key in plan.get("inherited", {}):
            lines.append(f"  {key} = {shown}  (from the run fine-tuned)")
        elif key in plan.get("explicit", {}):
            lines.append(f"  {key} = {shown}  (given explicitly)")
        else:
            reason = plan["reasons"].get(key)
            lines.append(f"  {key} = {shown}" + (f"  ({reason})" if reason else ""))
    return lines


def _mm(values: Iterable[float]) -> str:
    return "x".join(f"{float(v):.3g}" for v in values) + " mm"


def _voxels(values: Iterable[float]) -> str:
    return "x".join(str(int(round(float(v)))) for v in values)


def plan_config(config: Any, spec: DatasetSpec, explicit: Dict[str, Any], small: bool, cache_dir: Optional[Path],
                inherited: Optional[Dict[str, Any]] = None) -> Tuple[Any, Dict[str, Any]]:
    """``config`` with the planned preprocessing applied, and the plan (for ``plan.json``).

    ``explicit`` holds the settings the user gave (``--set``, ``--config``): they win. ``inherited``
    holds the preprocessing of a run being fine-tuned (``--init-from``): its network was trained on
    that input, so it wins over the plan too.
    """
    from ..config import Config

    given = {**(inherited or {}), **explicit}
    plan = resolve_plan(plan_preprocessing(compute_fingerprint(spec, cache_dir), "cpu" if small else "gpu", given), given)
    if inherited:
        plan["inherited"] = {key: value for key, value in inherited.items() if key not in explicit}
    planned = Config.from_dict({**config.to_dict(), **plan.get("inherited", {}), **plan["applied"]}).validate()
    PreprocessParams.from_config(planned)  # e.g. normalization ct asked for an MRI: refused before any write
    return planned, plan
