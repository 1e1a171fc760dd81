"""Accuracy benchmark: train / predict / evaluate presets × seeds on one dataset, like the paper's ablations.

``plbopt bench accuracy DATASET -o OUT`` trains every preset with every seed on the same budget
and split, predicts the dataset's ``test`` cases, scores them (Dice, ASD in mm) and writes:

- ``OUT/runs/<preset>[<key>=<value>]-seed<N>/`` one run folder per training (``api.train`` layout)
  plus ``predictions/`` (the network's labels), ``predictions-postprocessed/`` (what ``plbopt predict``
  writes), ``evaluation/metrics.{csv,json}`` and ``bench_metrics.json``; when the
  split keeps the labels of the unlabeled cases aside (``splits.json``), their pseudo labels are
  predicted and scored too (``predictions-unlabeled[-postprocessed]/``, ``predictions-pseudo-labels/``);
- ``OUT/reports/<call>/`` the report of one call, named after what it compares (presets,
  variants, ``--set`` settings, checkpoint; :func:`report_name`), so calls with other settings
  keep their reports apart and a repeated call updates its own:
  - ``results.json`` every run's scores, settings and wall times, and mean ± std over seeds;
  - ``RESULTS.md`` tables in the paper's format (Table V main ablation, VI superpixel methods,
    VII superpixel number, IX Gaussian-noise robustness), the command, dataset size and hardware;
  - ``plots/*.png`` per-organ Dice bars and training curves (:mod:`PLBOptCore.bench.plots`);
- ``OUT/RESULTS.md`` an index of the reports in ``OUT/reports/``, rebuilt by every call.

Re-running the same command resumes: a run whose ``bench_metrics.json`` exists is skipped, a run
with ``checkpoints/last.pt`` but no completed training continues with ``resume=True``, and a run
folder trained with other settings is refused (mixing budgets would make the table meaningless).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..api import evaluate, predict_readings, train
from ..convert.sparsify import effort_line, labeled_effort
from ..convert.splits import unlabeled_with_labels
from ..config import (CHECKPOINT_NAMES, CPU_SCHEDULE, PLANNED_KEYS, inert_settings, load_config_file, make_config,
                      stored_config)
from ..data.dataset import DatasetSpec, load_dataset
from ..data.plan import with_modality_defaults
from ..data.io import array_to_image, case_name, read_image, write_image
from ..engine.events import read_events
from ..engine.inference import Reading
from ..errors import ConfigError, DatasetError, TrainingInterrupted
from ..utils import atomic_write, compute_setup, resolve_device
from .plots import plot_dice_bars, plot_refine_gain, plot_training_curves

logger = logging.getLogger(__name__)

METRICS_FILE = "bench_metrics.json"
REPORT_NAME_MAX = 120  # characters of a report folder name; file systems allow 255 bytes
# Gaussian noise on the test images in HU (Table IX). The paper's weak noise is a colour jitter that
# has no meaning for CT, so both levels here are additive Gaussian noise of different strength.
NOISE_LEVELS: Dict[str, float] = {"weak": 10.0, "strong": 30.0}
NOISE_SEED = 20240
NOISE_PRESETS = ("supervised", "dhc", "plbopt")
# Variant sweeps over the full method, in the paper's row order; the value equal to the preset's
# own setting (SLIC, H*W/50) is the main `plbopt` run and is not trained twice.
PAPER_PIXEL_MM2 = 1.5 * 1.5  # one in-plane pixel of DHC's half-resolution Synapse grid
SWEEPS: Dict[str, Tuple[str, Tuple[Dict[str, Any], ...]]] = {
    "superpixel-methods": ("Table VI: superpixel methods", tuple(
        {"superpixel_method": m} for m in ("watershed", "felzenszwalb", "quickshift", "slic"))),
    # the paper's H×W/10, /50, /100 pixels at DHC's 1.5 mm grid, as areas (superpixel_area_mm2)
    "superpixel-number": ("Table VII: superpixel size", tuple(
        {"superpixel_area_mm2": PAPER_PIXEL_MM2 * d} for d in (10, 50, 100))),
}
VARIANTS = tuple(SWEEPS) + ("noise",)
PRESET_LABELS = {"supervised": "Supervised only (VNet)", "dhc": "Baseline (DHC)", "plbopt": "Full (PLBOpt)",
                 "plbopt-paper": "Full, the paper's rules (PLBOpt-paper)",
                 "refine-only": "Only Refinement", "triplet-only": "Only Triplet Loss",
                 "mc-only": "Only Mutual Correction"}
SUPERPIXEL_LABELS = {"slic": "SLIC", "slic3d": "SLIC 3D", "quickshift": "Quickshift",
                     "felzenszwalb": "Felzenszwalb", "watershed": "Compact Watershed"}
# A run scoring below this mean Dice (its ensemble or either subnet alone) counts as collapsed.
COLLAPSE_DICE = 0.60
# Paired comparisons reported when both presets ran: (better candidate, reference).
PAIRS = (("plbopt", "dhc"), ("dhc", "supervised"), ("plbopt", "supervised"), ("plbopt", "plbopt-paper"),
         ("refine-only", "dhc"), ("triplet-only", "dhc"), ("mc-only", "dhc"))
# Config keys that may differ between a stored run and a re-run without changing the experiment.
IGNORED_KEYS = ("device", "num_workers")


@dataclass(frozen=True)
class RunSpec:
    """One benchmark unit: a training (preset + variant settings + seed), or a noise evaluation of one."""

    preset: str
    seed: int
    variant: Tuple[Tuple[str, Any], ...] = ()  # config overrides on top of the common schedule
    noise: Optional[str] = None  # key of NOISE_LEVELS: evaluate the trained run on noisy test images

    @property
    def training_group(self) -> str:
        settings = ",".join(f"{key}={_override_text(value)}" for key, value in self.variant)
        return f"{self.preset}[{settings}]" if settings else self.preset

    @property
    def group(self) -> str:
        """Name shared by all seeds: the row of a table."""
        return self.training_group + (f"[noise={self.noise}]" if self.noise else "")

    @property
    def name(self) -> str:
        return f"{self.group}-seed{self.seed}"

    @property
    def run_name(self) -> str:
        """Folder of the training this unit uses (a noise unit reuses its trained run)."""
        return f"{self.training_group}-seed{self.seed}"


@dataclass
class BenchContext:
    """What every unit needs: dataset, folders and the common training overrides."""

    dataset_dir: Path
    out_dir: Path
    spec: DatasetSpec
    base_overrides: Dict[str, Any]
    device: str
    gt_dir: Path
    checkpoint: str = "best"  # which checkpoint of each run is scored: "best" (validation) or "last"
    small: bool = True  # CPU schedule: patches planned within the CPU budget
    # the unlabeled cases whose labels the split keeps aside: their pseudo labels are scored too
    unlabeled_images: Tuple[Path, ...] = ()

    def overrides(self, unit: RunSpec) -> Dict[str, Any]:
        return dict(self.base_overrides, seed=unit.seed, **dict(unit.variant))

    @property
    def unlabeled_gt_dir(self) -> Path:
        """The labels of :attr:`unlabeled_images`, named by case (the layout ``evaluate`` pairs by)."""
        return self.out_dir / "unlabeled_labels"

    def run_dir(self, unit: RunSpec) -> Path:
        return self.out_dir / "runs" / unit.run_name

    def work_dir(self, unit: RunSpec) -> Path:
        """Folder of a unit's predictions, evaluation and metrics: the run folder for ``best``,
        ``checkpoint-last/`` inside it for ``last``; noise units in ``noise-<level>/`` below that."""
        folder = self.run_dir(unit)
        if self.checkpoint != "best":
            folder = folder / f"checkpoint-{self.checkpoint}"
        return folder / f"noise-{unit.noise}" if unit.noise else folder


# ---------------------------------------------------------------------------------------- planning
DEFAULT_ITERATIONS = 300  # each run's budget when neither --iterations nor --config names one


def base_overrides(iterations: int, small: bool, device: str, extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The schedule shared by every run: the CPU schedule (if ``small``), ``extra`` (the config file's
    settings and the caller's), then the bench's budget and device, which the report states as every
    run's. Preprocessing is each run's plan (``api.train``), the same for every run of one dataset."""
    overrides = dict(CPU_SCHEDULE) if small else {}
    overrides.update(extra or {})
    overrides.update(iterations=int(iterations), device=device)
    return overrides


def _effective_variant(preset: str, base: Dict[str, Any], variant: Dict[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    """Variant settings that differ from the base config (validated) and act in this preset, so equal
    settings share a run and a setting the preset switches off (``lambda_mc`` on ``dhc``) trains nothing."""
    plain = make_config(preset, overrides=base)
    changed = make_config(preset, overrides={**base, **variant})
    inert = inert_settings(changed, variant)
    return tuple((key, value) for key, value in variant.items()
                 if getattr(changed, key) != getattr(plain, key) and key not in inert)


Tables = Dict[str, List[Dict[str, str]]]  # table name -> rows {"group", "label"}


def _row(unit: RunSpec, label_from: Optional[RunSpec] = None) -> Dict[str, str]:
    return {"group": unit.group, "label": method_label(label_from or unit)}


def plan_runs(presets: Sequence[str], seeds: int, variants: Sequence[str],
              base: Dict[str, Any], settings: Sequence[Dict[str, Any]] = ()) -> Tuple[List[RunSpec], Tables]:
    """Units in execution order (trainings seed-major so an interrupted bench already compares all
    presets, then ``settings`` variants, then sweeps, then noise evaluations) and the tables' rows.

    ``settings``: config overrides (``--set``), each a variant of every preset trained with every
    seed beside the preset's own runs; the table ``settings`` lists each preset, then its variants.
    A setting equal to a preset's own value is that preset's run.

    Raises ConfigError for an unknown preset or variant, ``seeds < 1``, or an invalid setting.
    """
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for preset in presets:
        make_config(preset, overrides=base)  # fail before hours of training, not in the middle
    main = list(dict.fromkeys(presets))
    tables: Tables = {"main": [_row(RunSpec(preset, 0)) for preset in main]}
    swept: List[RunSpec] = []  # seed-0 unit of each variant training not already a main run
    for variant in variants:
        if variant == "noise":
            continue
        rows = [_row(RunSpec("dhc", 0))] if "dhc" in main else []  # the paper lists the DHC baseline first
        for sweep_setting in SWEEPS[variant][1]:
            unit = RunSpec("plbopt", 0, _effective_variant("plbopt", base, sweep_setting))
            is_main_run = not unit.variant and "plbopt" in main
            if unit not in swept and not is_main_run:
                swept.append(unit)
            # labelled by the requested setting: the `plbopt` run is the SLIC and the H*W/50 row
            rows.append(_row(unit, RunSpec("plbopt", 0, tuple(sweep_setting.items()))))
        tables[variant] = rows
    set_units: List[RunSpec] = []  # seed-0 unit of each --set variant of each preset
    if settings:
        tables["settings"] = []
        for preset in main:
            tables["settings"].append(_row(RunSpec(preset, 0)))
            for setting in settings:
                unit = RunSpec(preset, 0, _effective_variant(preset, base, setting))
                if unit.variant and unit not in set_units:
                    set_units.append(unit)
                    tables["settings"].append(_row(unit))
    units = [RunSpec(preset, seed) for seed in range(seeds) for preset in main]
    units += [RunSpec(u.preset, seed, u.variant) for seed in range(seeds) for u in set_units]
    units += [RunSpec(u.preset, seed, u.variant) for seed in range(seeds) for u in swept if u not in set_units]
    if "noise" in variants:
        noise_presets = [p for p in NOISE_PRESETS if p in main]
        tables["noise"] = [_row(RunSpec(p, 0, noise=level)) for p in noise_presets for level in NOISE_LEVELS]
        units += [RunSpec(p, seed, noise=level) for seed in range(seeds) for p in noise_presets for level in NOISE_LEVELS]
    return units, tables


def without_runs_lacking_unlabeled_cases(units: Sequence[RunSpec], base: Dict[str, Any], spec: DatasetSpec
                                         ) -> Tuple[List[RunSpec], Dict[str, str]]:
    """``units`` less the trainings that need unlabeled cases where ``spec`` has none, and why each
    such group is not run. A floor or ceiling split (``Resources/splits/*-labeled-only.json``,
    ``*-all-labeled.json``) trains DHC's losses on labeled cases alone (``--set cps_weight=0``);
    DHC's own runs there are left out and named in the report, not failed one by one. A call that
    leaves nothing to train is a ``ConfigError``, before any run folder is written."""
    from ..engine.trainer import lacks_unlabeled_cases

    # one check per training group, not per seed: with sparse_as_unlabeled the check reads the labels
    groups = {unit.training_group: unit for unit in units}
    lacking = {group for group, unit in groups.items()
               if lacks_unlabeled_cases(make_config(unit.preset, overrides={**base, **dict(unit.variant)}), spec)}
    if not lacking:
        return list(units), {}
    kept = [unit for unit in units if unit.training_group not in lacking]
    if not kept:
        raise ConfigError(f"{spec.json_path}: lists no unlabeled cases, which {', '.join(sorted(lacking))} train on; "
                          "use --presets supervised, or --set cps_weight=0 for DHC's losses on the labeled cases alone")
    reason = "needs unlabeled cases; this dataset has none"
    return kept, {group: reason for group in sorted(lacking)}


# ---------------------------------------------------------------------------------------- run folders
def training_state(run_dir: Path) -> str:
    """``complete`` (last start/end event is a completed end), ``partial`` (a checkpoint to resume),
    or ``fresh``."""
    marks = [e for e in read_events(run_dir) if e.get("type") in ("start", "end")]
    if marks and marks[-1]["type"] == "end" and marks[-1].get("status") == "completed" \
            and (run_dir / "checkpoints" / "best.pt").is_file():
        return "complete"
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last.pt").is_file() or (checkpoints / "last.pt.prev").is_file():
        return "partial"
    return "fresh"


def training_setups(events: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The distinct compute set-ups (threads, processor: ``utils.compute_setup``) a run trained
    on, from the start events of its ``events.jsonl`` (``read_events``), in order; a resumed run
    may have several; empty for runs from before the trainer recorded them."""
    setups: List[Dict[str, Any]] = []
    for event in events:
        if event.get("type") == "start" and event.get("setup") and event["setup"] not in setups:
            setups.append(event["setup"])
    return setups


def check_same_config(run_dir: Path, preset: str, overrides: Dict[str, Any], modality: str) -> None:
    """Refuse to reuse a run folder trained with other settings than this bench asks for (planned
    preprocessing aside: the plan is the dataset's, stored in the run; and settings that a switch
    left off, such as refinement's in a DHC run); settings left to the dataset's ``modality`` are
    compared as a run on it decides them."""
    stored_path = run_dir / "config.json"
    if not stored_path.is_file():
        return
    stored = stored_config(load_config_file(stored_path), stored_path).to_dict()  # as a resume reads it
    wanted = with_modality_defaults(make_config(preset, overrides=overrides), modality)
    expected = wanted.to_dict()
    ignored = set(IGNORED_KEYS) | (set(PLANNED_KEYS) - set(overrides))
    differing = [k for k in expected if k not in ignored and stored.get(k) != expected[k]]
    inert = inert_settings(wanted, differing)  # a switch differing itself is not inert: it is in differing
    differing = sorted(k for k in differing if k not in inert)
    if differing:
        details = ", ".join(f"{k}: {stored.get(k)!r} there, {expected[k]!r} now" for k in differing)
        raise ConfigError(f"{stored_path}: run was trained with other settings ({details}); "
                          f"use another output folder or delete {run_dir}")


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        # NaN is not JSON: undefined distances are null
        tmp.write_text(json.dumps(_nan_to_none(data), indent=2, allow_nan=False) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summarise(results: Dict[str, Any]) -> Dict[str, Any]:
    """Per-class and class-mean Dice/ASD of one evaluation (``evaluate_folders`` result)."""
    classes = results["classes"]
    return {"mean_dice": results["mean"]["dice"], "mean_asd": results["mean"]["asd"],
            "dice": {name: stats["dice"]["mean"] for name, stats in classes.items()},
            "asd": {name: stats["asd"]["mean"] for name, stats in classes.items()},
            "n_missing": {name: stats["n_missing"] for name, stats in classes.items()}}


def prepare_ground_truth(labels: Sequence[Path], gt_dir: Path) -> None:
    """Copy ``labels`` into one folder named by case, the layout ``evaluate`` pairs by."""
    gt_dir.mkdir(parents=True, exist_ok=True)
    for label in labels:
        suffix = label.name[len(case_name(label)):]
        target = gt_dir / f"{case_name(label)}{suffix}"
        if not target.exists():
            shutil.copy2(label, target)


def noisy_test_images(spec: DatasetSpec, out_dir: Path, level: str) -> List[Path]:
    """Copies of the test images with seeded Gaussian noise of ``NOISE_LEVELS[level]`` HU (cached)."""
    sigma = NOISE_LEVELS[level]
    folder = out_dir / "noisy" / f"{level}-sigma{sigma:g}"
    paths = []
    for index, case in enumerate(spec.test):
        path = folder / f"{case.name}.nii.gz"
        if not path.exists():
            image = read_image(case.image)
            array = sitk.GetArrayFromImage(image).astype(np.float32)
            rng = np.random.default_rng([NOISE_SEED, int(sigma * 1000), index])
            array += rng.normal(0.0, sigma, size=array.shape).astype(np.float32)
            write_image(array_to_image(array, image), path)
        paths.append(path)
    return paths


def _predict_and_score(ctx: BenchContext, run_dir: Path, images: Sequence[Path], work_dir: Path,
                       readings: Dict[str, Reading], gt_dir: Optional[Path] = None
                       ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, float]]:
    """Predict ``images`` with the run's ``ctx.checkpoint`` as each reading (suffix -> what
    ``plbopt predict`` with that subnet, refinement and postprocessing writes) into
    ``work_dir/predictions<suffix>``, one pass of each subnet for all of them, and score each
    against ``gt_dir`` (default: the test labels). Returns (suffix -> scores, seconds of
    ``predict`` and ``evaluate``)."""
    started = time.perf_counter()
    predict_readings(run_dir, list(images), {work_dir / f"predictions{suffix}": reading
                                             for suffix, reading in readings.items()},
                     checkpoint=ctx.checkpoint, device=ctx.device,
                     overwrite=True)  # a unit interrupted before its metrics predicts again
    predicted = time.perf_counter()
    scores = {suffix: _score(ctx, work_dir, suffix, gt_dir) for suffix in readings}
    return scores, {"predict": predicted - started, "evaluate": time.perf_counter() - predicted}


def _score(ctx: BenchContext, work_dir: Path, suffix: str, gt_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Score ``work_dir/predictions<suffix>`` against ``gt_dir`` (default: the test labels) into
    ``work_dir/evaluation<suffix>``."""
    # The conventions of the tables in docs/RESULTS.md (made before --empty/--missing existed), so
    # that a rerun reproduces them: absent-from-both counts as perfect, a missing organ's ASD is
    # left out and counted in n_missing.
    results = evaluate(work_dir / f"predictions{suffix}", gt_dir or ctx.gt_dir, labels=ctx.spec.json_path,
                       out_dir=work_dir / f"evaluation{suffix}", empty="perfect", missing="skip")
    return _summarise(results)


def _postprocessed_classes(ctx: BenchContext, run_dir: Path) -> List[str]:
    """The classes whose largest component alone ``plbopt predict`` keeps for the run's
    ``ctx.checkpoint`` (:mod:`PLBOptCore.postprocess`: chosen on its validation cases)."""
    from ..engine.inference import Predictor

    predictor = Predictor.from_run(run_dir, ctx.checkpoint, "cpu")
    return [predictor.labels[c] for c in predictor.largest_component_classes]


def _score_pseudo_labels(ctx: BenchContext, run_dir: Path, work_dir: Path) -> Optional[Dict[str, Any]]:
    """The unlabeled cases' pseudo labels scored against the labels the split keeps aside: the
    network's labels (``plbopt predict --no-postprocessing``, into ``predictions-unlabeled``), those
    postprocessed (``plbopt predict``, ``predictions-unlabeled-postprocessed``) and what the Slicer
    panel hands back for review (``plbopt refine``: refined, then postprocessed, into
    ``predictions-pseudo-labels``). None when the split keeps no such labels."""
    if not ctx.unlabeled_images:
        return None
    readings = {"-unlabeled": Reading(postprocess=False), "-unlabeled-postprocessed": Reading(),
                "-pseudo-labels": Reading(refine=True)}
    summaries, seconds = _predict_and_score(ctx, run_dir, ctx.unlabeled_images, work_dir, readings,
                                            ctx.unlabeled_gt_dir)
    scores = {key: {name: summaries[suffix][name] for name in ("mean_dice", "dice")}
              for key, suffix in (("network", "-unlabeled"), ("postprocessed", "-unlabeled-postprocessed"),
                                  ("handed_back", "-pseudo-labels"))}
    return {"cases": len(ctx.unlabeled_images), **scores, "seconds": seconds}


def mean_refine_gain(events: Sequence[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """Per class, refinement's self-check gain averaged over the logged steps of a run's
    ``events.jsonl`` (``read_events``); None if not logged."""
    logged = [r["refine_gain"] for r in events if r.get("type") == "train" and r.get("refine_gain")]
    if not logged:
        return None
    return {name: float(np.mean([gains[name] for gains in logged])) for name in logged[0]}


def run_unit(ctx: BenchContext, unit: RunSpec) -> Tuple[str, Dict[str, Any]]:
    """Train (or resume), predict and score one unit; returns ``(outcome, record)``.

    ``outcome`` is ``skipped`` (metrics already there), ``trained``, ``resumed``, ``evaluated``
    (training was complete, a noise unit, or a record from before the unlabeled cases were scored),
    or ``missing`` (a noise unit whose run is not trained).
    """
    run_dir = ctx.run_dir(unit)
    overrides = ctx.overrides(unit)
    work_dir = ctx.work_dir(unit)
    metrics_path = work_dir / METRICS_FILE
    if metrics_path.is_file():
        record = json.loads(metrics_path.read_text())
        record.setdefault("trained_on", training_setups(read_events(run_dir)))  # records from before the field
        if unit.noise or "pseudo_labels" in record or not ctx.unlabeled_images:
            return "skipped", record
        # a record from before the unlabeled cases were scored: its run only predicts them
        record["pseudo_labels"] = _score_pseudo_labels(ctx, run_dir, work_dir)
        _write_json(metrics_path, record)
        return "evaluated", _nan_to_none(record)

    state = training_state(run_dir)
    seconds: Dict[str, float] = {"train": 0.0}
    if unit.noise:
        if state != "complete":
            return "missing", {}
        images = noisy_test_images(ctx.spec, ctx.out_dir, unit.noise)
        outcome = "evaluated"
    else:
        images = [case.image for case in ctx.spec.test]
        outcome = {"complete": "evaluated", "partial": "resumed", "fresh": "trained"}[state]
        if state != "complete":
            started = time.perf_counter()
            # a fresh run folder may hold leftovers of a crash before the first checkpoint
            train(ctx.dataset_dir, run_dir, preset=unit.preset, overrides=overrides, resume=state == "partial",
                  overwrite=state == "fresh", small=ctx.small)
            seconds["train"] = time.perf_counter() - started
    config = make_config(unit.preset, overrides=overrides)
    readings = {"": Reading(postprocess=False)}  # the network's labels
    if not unit.noise:  # a noise unit scores the network's labels alone
        readings["-postprocessed"] = Reading()  # what `plbopt predict` writes by default
        if config.dual_subnets:
            # each subnet alone: a dual run whose ensemble looks fine can hide one failing subnet
            readings.update({f"-{name}": Reading(subnet=name, postprocess=False) for name in ("a", "b")})
        if config.refine:  # what a user of `plbopt refine` (and the Slicer panel's pseudo labels) gets
            readings["-refined"] = Reading(refine=True, postprocess=False)
    summaries, predict_seconds = _predict_and_score(ctx, run_dir, images, work_dir, readings)
    seconds.update(predict_seconds)
    scores = summaries[""]
    subnets = ({name: summaries[f"-{name}"]["mean_dice"] for name in ("a", "b")} if "-a" in summaries
               else {"a": scores["mean_dice"]})
    refined = ({key: summaries["-refined"][key] for key in ("mean_dice", "dice")} if "-refined" in summaries
               else None)
    postprocessed = ({"classes": _postprocessed_classes(ctx, run_dir),
                      **{key: summaries["-postprocessed"][key] for key in ("mean_dice", "dice", "mean_asd")}}
                     if "-postprocessed" in summaries else None)
    pseudo_labels = None if unit.noise else _score_pseudo_labels(ctx, run_dir, work_dir)
    seconds["total"] = sum(seconds.values())
    events = read_events(run_dir)
    record = {"name": unit.name, "group": unit.group, "preset": unit.preset, "seed": unit.seed,
              "variant": dict(unit.variant), "noise": ({"level": unit.noise, "sigma_hu": NOISE_LEVELS[unit.noise]}
                                                       if unit.noise else None),
              "run_dir": os.path.relpath(run_dir, ctx.out_dir), "checkpoint": ctx.checkpoint, "overrides": overrides,
              "trained_as": outcome, "seconds": seconds, "subnets": subnets, "refined": refined,
              "postprocessed": postprocessed, "pseudo_labels": pseudo_labels, "trained_on": training_setups(events),
              "refine_gain": None if unit.noise else mean_refine_gain(events), **scores}
    _write_json(metrics_path, record)
    return outcome, _nan_to_none(record)


# ---------------------------------------------------------------------------------------- aggregation
def _stats(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Mean and sample std (ddof=1) over the finite values; std is None for fewer than 2 values."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return {"mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else None, "n": int(finite.size)}


def aggregate(records: Sequence[Dict[str, Any]], class_names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Mean ± std over seeds per group (preset + variant): class-mean and per-class Dice and ASD."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["group"], []).append(record)
    out: Dict[str, Dict[str, Any]] = {}
    for group, runs in groups.items():
        first = runs[0]
        out[group] = {
            "preset": first["preset"], "variant": first["variant"], "noise": first["noise"],
            "seeds": [r["seed"] for r in runs], "n_seeds": len(runs),
            "mean_dice": _stats([r["mean_dice"] for r in runs]), "mean_asd": _stats([r["mean_asd"] for r in runs]),
            "classes": {name: {"dice": _stats([r["dice"].get(name) for r in runs]),
                               "asd": _stats([r["asd"].get(name) for r in runs])} for name in class_names},
            "train_seconds": _stats([r["seconds"]["train"] for r in runs]),
            "subnets": {name: _stats([r["subnets"].get(name) for r in runs]) for name in first["subnets"]},
            "collapsed": sum(1 for r in runs if collapsed(r)),
        }
    return out


def collapsed(record: Dict[str, Any]) -> bool:
    """The run's ensemble or one of its subnets scores below :data:`COLLAPSE_DICE`."""
    scores = [record["mean_dice"]] + list(record["subnets"].values())
    return any(score is None or score < COLLAPSE_DICE for score in scores)


def paired_differences(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean Dice differences on the seeds both sides ran: the preset pairs of :data:`PAIRS`, then
    every variant (``--set``, sweeps) against its own preset (no noise evaluations).

    Returns rows ``{"better", "reference", "seeds", "differences", "mean", "std", "min", "wins"}``,
    ``better`` and ``reference`` being group names.
    """
    scores = {(r["group"], r["seed"]): r["mean_dice"] for r in records
              if not r["noise"] and r["mean_dice"] is not None}
    pairs = list(PAIRS) + list(dict.fromkeys((r["group"], r["preset"]) for r in records
                                             if r["variant"] and not r["noise"]))
    rows = []
    for better, reference in pairs:
        seeds = sorted(seed for group, seed in scores if group == better and (reference, seed) in scores)
        if not seeds:
            continue
        differences = [scores[(better, s)] - scores[(reference, s)] for s in seeds]
        rows.append({"better": better, "reference": reference, "seeds": seeds, "differences": differences,
                     **_stats(differences), "min": min(differences), "wins": sum(d > 0 for d in differences)})
    return rows


# ---------------------------------------------------------------------------------------- report
def method_label(unit: RunSpec) -> str:
    """Row title in the paper's wording."""
    label = PRESET_LABELS.get(unit.preset, unit.preset)
    settings = dict(unit.variant)
    if "superpixel_method" in settings:
        label = SUPERPIXEL_LABELS.get(settings.pop("superpixel_method"), label)
    if "superpixel_area_mm2" in settings:
        area = settings.pop("superpixel_area_mm2")
        label = f"{area:g} mm² (H×W/{area / PAPER_PIXEL_MM2:g} at 1.5 mm)"
    if settings:
        label += " (" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"
    if unit.noise:
        label += f", {unit.noise} noise (σ={NOISE_LEVELS[unit.noise]:g} HU)"
    return label


def _cell(stats: Dict[str, Any], scale: float, digits: int, bold: bool = False, signed: bool = False) -> str:
    """``mean ± std`` of ``stats`` times ``scale`` (``n/a`` without a mean; a sign with ``signed``)."""
    if stats["mean"] is None:
        return "n/a"
    text = f"{scale * stats['mean']:{'+' if signed else ''}.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {scale * stats['std']:.{digits}f}"
    return f"**{text}**" if bold else text


def markdown_table(rows: Sequence[Dict[str, str]], aggregates: Dict[str, Dict[str, Any]],
                   class_names: Sequence[str]) -> str:
    """``Method | Avg. Dice ↑ | Avg. ASD ↓ | <class>...`` with the best average in bold, as the paper."""
    header = ["Method", "Avg. Dice ↑", "Avg. ASD ↓"] + list(class_names)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    present = [row["group"] for row in rows if row["group"] in aggregates]
    dice_means = [aggregates[g]["mean_dice"]["mean"] for g in present if aggregates[g]["mean_dice"]["mean"] is not None]
    asd_means = [aggregates[g]["mean_asd"]["mean"] for g in present if aggregates[g]["mean_asd"]["mean"] is not None]
    for row in rows:
        group, label = row["group"], row["label"]
        if group not in aggregates:
            lines.append(f"| {label} | " + " | ".join(["not run"] * (len(header) - 1)) + " |")
            continue
        entry = aggregates[group]
        best_dice = len(present) > 1 and entry["mean_dice"]["mean"] == max(dice_means, default=None)
        best_asd = len(present) > 1 and entry["mean_asd"]["mean"] == min(asd_means, default=None)
        cells = [label, _cell(entry["mean_dice"], 100, 1, best_dice), _cell(entry["mean_asd"], 1, 2, best_asd)]
        cells += [_cell(entry["classes"][name]["dice"], 100, 1) for name in class_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLE_TITLES = {"main": "Table V: main ablation", "noise": "Table IX: Gaussian-noise robustness (no retraining)",
                "settings": "Settings against each preset's default (`--set`)",
                **{name: title for name, (title, _) in SWEEPS.items()}}


def render_markdown(results: Dict[str, Any], plots: Dict[str, str]) -> str:
    """RESULTS.md: setup, one table per ablation, plots, every run with its wall time, failures."""
    settings, data, hardware = results["settings"], results["dataset"], results["hardware"]
    class_names = data["classes"]
    calls = results["this_call"]
    lines = [
        "# PLBOpt accuracy benchmark", "",
        f"Command: `{results['command']}`", "",
        f"- Dataset: `{data['path']}`" + (f" split by `{data['split_file']}`" if data.get("split_file") else "")
        + f": {data['n_labeled']} labeled, {data['n_unlabeled']} unlabeled "
        f"(labeled ratio {labeled_ratio(data)}), {data.get('n_validation', 0)} validation (chooses best.pt), "
        f"{data['n_test']} test cases; classes: {', '.join(class_names)}",
        f"- Budget, identical for every run: {settings['iterations']} iterations, "
        f"{'CPU schedule (CPU_SCHEDULE, patches planned within the CPU budget)' if settings['small'] else 'preset network size'}, "
        f"seeds 0..{settings['seeds'] - 1}; extra overrides: {settings['extra_overrides'] or 'none'}",
        "- Scored checkpoint: " + ("`last.pt`, the final weights of each run" if settings.get("checkpoint") == "last"
                                   else "`best.pt`, chosen on the validation cases (what `plbopt predict` uses)"),
        f"- Hardware: {hardware['cpu_count']} CPUs (torch threads {hardware['torch_threads']}), device "
        f"{hardware['device']}, {hardware['platform']}{cpu_text(hardware)}",
        setup_line(results["runs"]),
        *(f"- Not run: {group} ({reason})" for group, reason in results.get("not_run", {}).items()),
        f"- Wall time of this call: {results['total_seconds'] / 60:.1f} min; trained {len(calls['trained'])}, "
        f"resumed {len(calls['resumed'])}, evaluated only {len(calls['evaluated'])}, skipped (already done) "
        f"{len(calls['skipped'])}, failed {len(calls['failed'])}", "",
        "Dice ×100 and ASD (mm, prediction → ground truth as DHC reports) on the test cases; per run the mean over "
        "test cases and classes, then mean ± sample std over seeds (no ± with one seed). Per-class columns are Dice. "
        "Best average in bold. Metric conventions `--empty perfect --missing skip`: ASD leaves out organs missing "
        "from the prediction (counted as `n_missing` in results.json), so read it together with Dice.", "",
    ]
    for table, rows in results["tables"].items():
        lines += [f"## {TABLE_TITLES.get(table, table)}", "",
                  markdown_table(rows, results["aggregates"], class_names), ""]
        if results.get("annotation"):
            lines += [effort_line(results["annotation"]), ""]
        if table == "noise":
            lines += ["Noise: additive Gaussian noise on the HU test images, seeded; the paper's weak noise is a "
                      "hue/saturation/contrast jitter that has no CT equivalent.", ""]
        if table in plots:
            lines += [f"![Dice per organ, {table}]({plots[table]})", ""]
    lines += subnet_section(results) + paired_section(results) + self_check_section(results, plots)
    lines += refined_section(results) + postprocessed_section(results) + pseudo_labels_section(results)
    if "training_curves" in plots:
        lines += ["## Training curves", "", f"![training curves]({plots['training_curves']})", ""]
    lines += ["## Runs", "", "| Run | This call | Train (s) | Predict test cases (s) | Avg. Dice | Avg. ASD (mm) |",
              "|---|---|---|---|---|---|"]
    outcome_of = {name: outcome for outcome, names in calls.items() for name in names}
    for record in results["runs"]:
        s = record["seconds"]
        asd = "n/a" if record["mean_asd"] is None else f"{record['mean_asd']:.2f}"
        lines.append(f"| {record['name']} | {outcome_of.get(record['name'], '')} | {s['train']:.0f} | "
                     f"{s['predict']:.1f} | {100 * record['mean_dice']:.1f} | {asd} |")
    if calls["failed"]:
        lines += ["", "## Failed runs", ""] + [f"- {name}: {message}" for name, message in results["failures"].items()]
    return "\n".join(lines) + "\n"


def cpu_text(hardware: Dict[str, Any]) -> str:
    """``", CPU AMD EPYC (AVX512, flags 0123456789ab)"``; empty for records older than the CPU fields."""
    if not hardware.get("cpu_model"):
        return ""
    details = [hardware.get("cpu_capability")] + ([f"flags {hardware['cpu_flags_digest']}"]
                                                 if hardware.get("cpu_flags_digest") else [])
    return f", CPU {hardware['cpu_model']} ({', '.join(d for d in details if d)})"


def setup_text(setup: Dict[str, Any]) -> str:
    """``"1 torch thread, CPU AMD EPYC (AVX512, flags 0123456789ab), torch 2.13.0+cpu"``."""
    threads = setup.get("torch_threads")
    where = f", {setup['device_name']}" if setup.get("device_name") else cpu_text(setup)
    return f"{threads} torch thread{'s' if threads != 1 else ''}{where}, torch {setup.get('torch')}"


def setup_line(runs: Sequence[Dict[str, Any]]) -> str:
    """What the runs were trained on: one set-up, or a warning naming each set-up's runs (the same
    code and seed give other numbers on another, so their paired differences mix two sources)."""
    by_setup: Dict[str, List[str]] = {}
    unknown = []
    for record in runs:
        setups = record.get("trained_on") or []
        if not setups:
            unknown.append(record["name"])
        for setup in setups:
            by_setup.setdefault(setup_text(setup), []).append(record["name"])
    older = (f"; {len(unknown)} run{' predates' if len(unknown) == 1 else 's predate'} this record "
             f"({', '.join(unknown)})" if unknown else "")
    if len(by_setup) <= 1:
        return f"- Trained with: {next(iter(by_setup), 'not recorded')}{older}"
    parts = "; ".join(f"{text}: {', '.join(names)}" for text, names in by_setup.items())
    return (f"- **Trained on {len(by_setup)} set-ups** (the same code and seed give other numbers with another "
            f"thread count or processor, so differences between these runs mix both): {parts}{older}")


def labeled_ratio(data: Dict[str, Any]) -> str:
    """``"2/14 = 14 %"``: labeled cases among the training cases (labeled + unlabeled)."""
    total = data["n_labeled"] + data["n_unlabeled"]
    return f"{data['n_labeled']}/{total} = {100 * data['n_labeled'] / max(total, 1):.0f} %"


def subnet_section(results: Dict[str, Any]) -> List[str]:
    """Per seed: the ensemble's and each subnet's mean Dice ×100, and the collapse count per preset."""
    main = [row["group"] for row in results["tables"].get("main", []) if row["group"] in results["aggregates"]]
    if not main:
        return []
    by_group: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for record in results["runs"]:
        by_group.setdefault(record["group"], {})[record["seed"]] = record
    seeds = sorted({seed for group in main for seed in by_group.get(group, {})})
    lines = ["## Each subnet on its own", "",
             f"Mean Dice ×100 per seed as ensemble / subnet A / subnet B (supervised: one network). A run is "
             f"*collapsed* when any of them is below {100 * COLLAPSE_DICE:.0f}.", "",
             "| Method | " + " | ".join(f"seed {s}" for s in seeds) + " | Subnet A | Subnet B | Collapsed |",
             "|" + "---|" * (len(seeds) + 4)]
    for group in main:
        entry, cells = results["aggregates"][group], []
        for seed in seeds:
            record = by_group[group].get(seed)
            cells.append("" if record is None else " / ".join(
                f"{100 * v:.1f}" for v in [record["mean_dice"]] + list(record["subnets"].values())))
        subnets = entry["subnets"]
        cells += [_cell(subnets["a"], 100, 1), _cell(subnets["b"], 100, 1) if "b" in subnets else "–",
                  f"{entry['collapsed']}/{entry['n_seeds']}"]
        lines.append(f"| {PRESET_LABELS.get(entry['preset'], group)} | " + " | ".join(cells) + " |")
    return lines + [""]


def paired_section(results: Dict[str, Any]) -> List[str]:
    """Paired mean-Dice differences over seeds (same seed = same initialisation and patches)."""
    rows = paired_differences(results["runs"])
    if not rows:
        return []
    return ["## Paired differences", "",
            "Mean Dice difference ×100 on each seed both presets ran; mean ± sample std, the worst seed, and on "
            "how many seeds the first preset was better.", ""] + paired_table(rows) + [""]


def paired_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The Markdown table of :func:`paired_differences` rows: per seed, mean ± std, worst, better on."""
    lines = ["| Comparison | Per seed | Mean ± std | Worst | Better on |", "|---|---|---|---|---|"]
    for row in rows:
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in row["differences"])
        spread = f"{100 * row['mean']:+.1f}" + (f" ± {100 * row['std']:.1f}" if row["std"] is not None else "")
        lines.append(f"| {row['better']} − {row['reference']} | {per_seed} | {spread} | {100 * row['min']:+.1f} | "
                     f"{row['wins']}/{len(row['seeds'])} |")
    return lines


def self_check_section(results: Dict[str, Any], plots: Dict[str, str]) -> List[str]:
    """Refinement's self-check: per class, the run-averaged Dice gain on labeled patches."""
    class_names = results["dataset"]["classes"]
    groups: Dict[str, List[Dict[str, float]]] = {}
    for record in results["runs"]:
        if record.get("refine_gain"):
            groups.setdefault(record["group"], []).append(record["refine_gain"])
    if not groups:
        return []
    lines = ["## Refinement self-check", "",
             "Each step the refinement is also applied to the labeled patches' predictions and scored against "
             "their labels; a class is refined only while the running mean of its gain is ≥ 0 (at inference, "
             "also only while its gain on the validation cases was). Dice gain ×100 of refinement as applied "
             "on the labeled patches, averaged over the logged steps of each run, then over seeds.", "",
             "| Method | " + " | ".join(class_names) + " |", "|" + "---|" * (len(class_names) + 1)]
    for group, gains in groups.items():
        cells = [f"{100 * np.mean([g[name] for g in gains]):+.2f}" for name in class_names]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines.append("")
    if "refine_gain" in plots:
        lines += [f"![refinement self-check]({plots['refine_gain']})", ""]
    return lines


def _groups_of_runs_with(results: Dict[str, Any], key: str) -> Dict[str, List[Dict[str, Any]]]:
    """The records (no noise evaluations) that carry ``key``, by group in the order of the runs."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for record in results["runs"]:
        if record.get(key) and not record["noise"]:
            groups.setdefault(record["group"], []).append(record)
    return groups


def _section_head(title: str, text: str, columns: Sequence[str]) -> List[str]:
    """A report section's title, its text and the head of its table."""
    return [f"## {title}", "", text, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _paired_lines(groups: Dict[str, List[Dict[str, Any]]], score: Callable[[Dict[str, Any]], float],
                  title: str) -> List[str]:
    """``title`` over the :func:`paired_table` of the runs of ``groups`` scored by ``score`` (nothing
    when no preset pair ran)."""
    rows = paired_differences([{**record, "mean_dice": score(record)}
                               for members in groups.values() for record in members])
    return ["", title, ""] + paired_table(rows) if rows else []


def _spread(values: Sequence[float], digits: int = 1, signed: bool = False) -> str:
    """``mean ± sample std`` of ``values`` ×100 (no ± for one value)."""
    stats = _stats([100 * v for v in values])
    text = f"{stats['mean']:{'+' if signed else ''}.{digits}f}"
    return text + (f" ± {stats['std']:.{digits}f}" if stats["std"] is not None else "")


def refined_section(results: Dict[str, Any]) -> List[str]:
    """Refined against unrefined predictions of the same runs (``plbopt refine`` vs ``plbopt predict``)."""
    class_names = results["dataset"]["classes"]
    groups = _groups_of_runs_with(results, "refined")
    if not groups:
        return []
    lines = _section_head(
        "Refined predictions (`plbopt refine`)",
        "Dice ×100 of each run's refined test predictions minus its unrefined ones (what `plbopt refine` and "
        "the Slicer panel's pseudo labels add to `plbopt predict`): mean ± sample std over seeds, and on how "
        "many seeds refinement raised the mean Dice.", ["Method", "Avg. Dice", "Better on", *class_names])
    for group, runs in groups.items():
        mean_change = [r["refined"]["mean_dice"] - r["mean_dice"] for r in runs]
        per_class = [_spread([r["refined"]["dice"][name] - r["dice"][name] for r in runs], 2, signed=True)
                     for name in class_names]
        lines.append(f"| {group} | {_spread(mean_change, 2, signed=True)} | {sum(d > 0 for d in mean_change)}/{len(runs)} | "
                     + " | ".join(per_class) + " |")
    return lines + [""]


def postprocessed_section(results: Dict[str, Any]) -> List[str]:
    """The ensemble with and without postprocessing (``plbopt predict`` against ``--no-postprocessing``),
    and the preset pairs compared after it."""
    class_names = results["dataset"]["classes"]
    groups = _groups_of_runs_with(results, "postprocessed")
    if not groups:
        return []
    lines = _section_head(
        "Postprocessed predictions (largest component)",
        "What `plbopt predict` writes by default: each class the checkpoint's validation cases chose keeps "
        "only its largest connected component. Dice ×100 postprocessed, its change against the tables above "
        "(the network's labels, `--no-postprocessing`), on how many seeds it was better, and how many runs "
        "chose each class.", ["Method", "Avg. Dice", "Change", "Better on", *class_names])
    for group, members in groups.items():
        change = [r["postprocessed"]["mean_dice"] - r["mean_dice"] for r in members]
        per_class = [f"{_spread([r['postprocessed']['dice'][n] - r['dice'][n] for r in members], signed=True)} "
                     f"({sum(n in r['postprocessed']['classes'] for r in members)}/{len(members)})" for n in class_names]
        lines.append(f"| {group} | {_spread([r['postprocessed']['mean_dice'] for r in members])} | "
                     f"{_spread(change, signed=True)} | {sum(d > 0 for d in change)}/{len(members)} | "
                     + " | ".join(per_class) + " |")
    lines += _paired_lines(groups, lambda r: r["postprocessed"]["mean_dice"],
                           "Paired differences of the postprocessed predictions, as in \"Paired differences\":")
    return lines + [""]


def pseudo_labels_section(results: Dict[str, Any]) -> List[str]:
    """The unlabeled cases' pseudo labels (what a user reviews in Slicer) against the labels the split
    keeps aside, per group, and the preset pairs compared on them."""
    class_names = results["dataset"]["classes"]
    groups = _groups_of_runs_with(results, "pseudo_labels")
    if not groups:
        return []
    cases = next(iter(groups.values()))[0]["pseudo_labels"]["cases"]
    lines = _section_head(
        "Pseudo labels of the unlabeled cases",
        f"The {cases} unlabeled training cases scored against their labels, which the split keeps aside and no "
        "run trains on: what semi-supervision hands back. The semi-supervised runs trained on these images "
        "without their labels; the supervised ones never saw them. Dice ×100 of the network's labels (`plbopt "
        "predict --no-postprocessing`), of those postprocessed (`plbopt predict`) and of what the Slicer panel "
        "hands back for review (`plbopt refine`: refined, then postprocessed), mean ± sample std over seeds; "
        "per class, what is handed back.", ["Method", "Network", "Postprocessed", "Handed back", *class_names])
    for group, members in groups.items():
        columns = [_spread([r["pseudo_labels"][key]["mean_dice"] for r in members])
                   for key in ("network", "postprocessed", "handed_back")]
        per_class = [_spread([r["pseudo_labels"]["handed_back"]["dice"][n] for r in members]) for n in class_names]
        lines.append(f"| {group} | " + " | ".join(columns + per_class) + " |")
    for key, what in (("handed_back", "handed back"), ("postprocessed", "postprocessed"),
                      ("network", "the network's labels")):
        lines += _paired_lines(groups, lambda r: r["pseudo_labels"][key]["mean_dice"],
                               f"Paired differences on the unlabeled cases, {what}:")
    return lines + [""]


def write_plots(results: Dict[str, Any], units: Sequence[RunSpec], out_dir: Path,
                report_dir: Path) -> Dict[str, str]:
    """Dice bars per table and training curves of the trained groups (runs in ``out_dir/runs``)
    into ``report_dir/plots``; returns name → path relative to ``report_dir``."""
    plots: Dict[str, str] = {}
    aggregates, class_names = results["aggregates"], results["dataset"]["classes"]
    for table, rows in results["tables"].items():
        labels = {row["group"]: row["label"] for row in rows if row["group"] in aggregates}
        if labels:
            path = plot_dice_bars(aggregates, list(labels), labels, class_names,
                                  report_dir / "plots" / f"dice_{table}.png", TABLE_TITLES.get(table, table))
            plots[table] = os.path.relpath(path, report_dir)
    trained = [u for u in units if not u.noise]
    curves: Dict[str, List[Path]] = {}
    for unit in trained:
        curves.setdefault(unit.group, []).append(out_dir / "runs" / unit.run_name)
    if curves:
        labels = {u.group: method_label(u) for u in trained}
        path = plot_training_curves(curves, labels, report_dir / "plots" / "training_curves.png")
        plots["training_curves"] = os.path.relpath(path, report_dir)
        path = plot_refine_gain(curves, labels, report_dir / "plots" / "refine_self_check.png")
        if path is not None:
            plots["refine_gain"] = os.path.relpath(path, report_dir)
    return plots


def report_name(presets: Sequence[str], variants: Sequence[str] = (), settings: Sequence[Dict[str, Any]] = (),
                checkpoint: str = "best") -> str:
    """Folder name of a call's report under ``OUT/reports/``: what the call compares, e.g.
    ``dhc+plbopt`` or ``dhc+plbopt_set-class_weight_floor=1_last``. Characters a file system may
    refuse become ``_``; a name too long for one gets a hash of its full text instead of its tail."""
    parts = ["+".join(presets)]
    if variants:
        parts.append("variants-" + "+".join(variants))
    for setting in settings:
        parts.append("set-" + ",".join(f"{key}={_override_text(value)}" for key, value in setting.items()))
    if checkpoint != "best":
        parts.append(checkpoint)
    name = "".join(c if c.isalnum() or c in "+-=,.[]" else "_" for c in "_".join(parts))
    if len(name) > REPORT_NAME_MAX:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:REPORT_NAME_MAX - 11]}-{digest}"
    return name


def write_report_index(out_dir: Path) -> None:
    """``OUT/RESULTS.md``: one row per report in ``OUT/reports/``, newest first. Rebuilt from the
    reports on disk, so two calls finishing side by side both end up listed."""
    rows = []
    for path in (out_dir / "reports").glob("*/results.json"):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):  # a report another call is replacing right now: listed by that call
            continue
        rows.append((path.stat().st_mtime, path.parent.name, results))
    lines = ["# PLBOpt accuracy benchmark: reports", "",
             "One report per call, named after what it compares; the runs are shared in `runs/`.", "",
             "| Report | Runs | Written | Command |", "|---|---|---|---|"]
    for mtime, name, results in sorted(rows, key=lambda row: row[0], reverse=True):
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))
        lines.append(f"| [{name}](reports/{name}/RESULTS.md) | {len(results.get('runs', []))} | {written} | "
                     f"`{results.get('command', '')}` |")
    with atomic_write(out_dir / "RESULTS.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def cli_command(dataset_dir: Path, out_dir: Path, presets: Sequence[str], seeds: int, iterations: int,
                variants: Sequence[str], small: bool, device: str, settings: Sequence[Dict[str, Any]] = (),
                checkpoint: str = "best", split_file: Optional[Path] = None, config_file: Optional[Path] = None) -> str:
    """The ``plbopt bench accuracy`` command that reproduces this call (``extra_overrides`` aside)."""
    args = ["plbopt", "bench", "accuracy", str(dataset_dir), "-o", str(out_dir), "--presets", ",".join(presets),
            "--seeds", str(seeds), "--iterations", str(iterations)]
    if split_file is not None:
        args += ["--split", str(split_file)]
    if config_file is not None:
        args += ["--config", str(config_file)]
    if variants:
        args += ["--variants", ",".join(variants)]
    for setting in settings:
        args += ["--set"] + [f"{key}={_override_text(value)}" for key, value in setting.items()]
    if checkpoint != "best":
        args += ["--checkpoint", checkpoint]
    if not small:
        args.append("--full-size")
    if device != "auto":
        args += ["--device", device]
    return " ".join(shlex.quote(a) for a in args)


def _override_text(value: Any) -> str:
    """A config value as ``--set`` parses it back (YAML): text as is, anything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def hardware_note(device: str) -> Dict[str, Any]:
    """CPU count, torch threads and device for the report: CPU timings depend on them. The CPU's
    model, torch's kernel level (``cpu_capability``) and a digest of the CPU's feature flags tell
    whether two records ran on the same kind of processor: the same code, seed and thread count
    give other numbers on another one (the kernels oneDNN picks differ)."""
    resolved = resolve_device(device)
    setup = compute_setup(resolved)  # names a CUDA device (device_name)
    name = setup.get("device_name") or platform.processor() or "cpu"
    return {"cpu_count": os.cpu_count(), "device": f"{resolved} ({name})", "platform": platform.platform(),
            "python": platform.python_version(), **setup}


def _log(out_dir: Path, message: str) -> None:
    """Log and append to ``OUT/bench.log`` so an unattended bench leaves its history."""
    logger.info(message)
    with open(out_dir / "bench.log", "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _progress_line(index: int, total: int, unit: RunSpec, outcome: str, record: Dict[str, Any]) -> str:
    if outcome == "skipped":
        return f"[{index}/{total}] {unit.name}: skipped (metrics exist: {record['run_dir']})"
    s = record["seconds"]
    asd = "n/a" if record["mean_asd"] is None else f"{record['mean_asd']:.2f} mm"
    return (f"[{index}/{total}] {unit.name}: {outcome}; train {s['train']:.0f} s, predict {s['predict']:.1f} s, "
            f"evaluate {s['evaluate']:.1f} s; mean Dice {100 * record['mean_dice']:.1f}, ASD {asd}")


# ---------------------------------------------------------------------------------------- entry point
def run_accuracy_bench(dataset_dir: Path, out_dir: Path, presets: Sequence[str], seeds: int = 3,
                       iterations: Optional[int] = None, variants: Sequence[str] = (), small: bool = True,
                       device: Optional[str] = None, extra_overrides: Optional[Dict[str, Any]] = None,
                       settings: Sequence[Dict[str, Any]] = (), checkpoint: str = "best",
                       split_file: Optional[Path] = None, config_file: Optional[Path] = None) -> Dict[str, Any]:
    """Run the benchmark (resumable) and return the ``results.json`` content.

    Args:
        dataset_dir: dataset folder; its ``test`` cases (with labels) are scored.
        out_dir: benchmark folder (runs/, reports/<call>/{results.json,RESULTS.md,plots/}, the
            index RESULTS.md, bench.log).
        presets: rows of the main table, e.g. ``["supervised", "dhc", "plbopt"]``.
        seeds: seeds ``0..seeds-1`` per preset.
        iterations: training steps of every run; ``None``: the config file's ``iterations``, else
            ``DEFAULT_ITERATIONS``.
        variants: any of ``superpixel-methods``, ``superpixel-number``, ``noise``.
        small: use ``CPU_SCHEDULE`` (8 filters, AdamW) and patches planned within the CPU budget.
        device: ``auto``, ``cpu``, ``cuda``...; ``None``: the config file's ``device``, else ``auto``.
        extra_overrides: config overrides applied to every run after the schedule (variant
            settings still win); recorded in results.json but not expressible on the CLI.
        settings: variants (``--set KEY=VALUE ...``, one dict each) of every preset, trained with
            every seed and compared with the preset's own runs, paired by seed.
        checkpoint: ``best`` (chosen on the validation cases, what ``plbopt predict`` uses) or
            ``last`` (the final weights, free of the selection's noise); each is scored and stored
            separately, so a second call with the other one only predicts.
        config_file: a YAML/JSON file of settings for every run (``--config``), applied like
            ``extra_overrides`` (which win over it) and named in the reproducing command.
        split_file: a fixed split (``Resources/splits/<dataset>.json``) of ``dataset_dir``, a
            labelled dataset in any layout; the split's folder is built in ``OUT/dataset`` (hard
            links) and benchmarked, and the split is stated in the report.

    The returned dict has ``command``, ``argv``, ``settings``, ``dataset``, ``hardware``,
    ``total_seconds``, ``annotation`` (the labeled set's annotated slices and voxels,
    :func:`~PLBOptCore.convert.sparsify.labeled_effort`, plus the split's ``sparse`` spec if any),
    ``runs`` (one record per finished unit), ``aggregates`` (per group, mean/std/n
    over seeds of ``mean_dice``, ``mean_asd`` and per class ``dice``/``asd``), ``tables`` (table →
    rows ``{"group", "label"}``), ``this_call`` (outcome → unit names, including ``skipped``), ``failures``,
    ``plots`` and ``report_dir`` (relative to ``out_dir``).
    """
    started = time.perf_counter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    presets, variants = list(presets), list(variants)
    file_settings = load_config_file(Path(config_file)) if config_file is not None else {}
    # the bench's own flags win over the file (as the file wins over a preset); without them the
    # file's budget and device apply, so the report states the budget every run trained with
    iterations = int(iterations if iterations is not None else file_settings.get("iterations", DEFAULT_ITERATIONS))
    device = str(device or file_settings.get("device", "auto"))
    resolve_device(device)  # a GPU recipe on a machine without CUDA: refused before anything is written
    source_dir = dataset_dir
    if split_file is not None:
        from ..convert.splits import apply_split_file

        dataset_dir = apply_split_file(Path(split_file), source_dir, out_dir / "dataset")
    spec = load_dataset(dataset_dir)
    if not spec.test or any(case.label is None for case in spec.test):
        raise DatasetError(f"{spec.json_path}: the accuracy benchmark needs 'test' cases that all have a label")
    extra_overrides = {**file_settings, **(extra_overrides or {})}
    base = base_overrides(iterations, small, device, extra_overrides)
    settings = [dict(setting) for setting in settings]
    units, tables = plan_runs(presets, seeds, variants, base, settings)
    units, not_run = without_runs_lacking_unlabeled_cases(units, base, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint not in CHECKPOINT_NAMES:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    unlabeled = unlabeled_with_labels(dataset_dir)
    ctx = BenchContext(dataset_dir, out_dir, spec, base, device, out_dir / "test_labels", checkpoint, small,
                       tuple(case.image for case in unlabeled))
    for unit in units:  # before any training: a folder from other settings would mix budgets
        check_same_config(ctx.run_dir(unit), unit.preset, ctx.overrides(unit), spec.modality)
    prepare_ground_truth([case.label for case in spec.test], ctx.gt_dir)
    if unlabeled:
        prepare_ground_truth([case.label for case in unlabeled], ctx.unlabeled_gt_dir)
    class_names = [name for label, name in sorted(spec.labels.items()) if label > 0]
    annotation = labeled_effort(spec)  # the labeled set's annotated slices: equal-effort comparisons
    # the sparse rule of the split file, or of a `plbopt sparsify` folder's dataset.json
    made_by = dataset_dir / "splits.json" if split_file is not None else spec.json_path
    annotation["sparse"] = json.loads(made_by.read_text()).get("sparse")
    results: Dict[str, Any] = {
        "command": cli_command(source_dir, out_dir, presets, seeds, iterations, variants, small, device, settings,
                               checkpoint, split_file, config_file),
        "argv": " ".join(shlex.quote(a) for a in sys.argv),
        "settings": {"presets": presets, "seeds": seeds, "iterations": iterations, "variants": variants,
                     "set": settings, "checkpoint": checkpoint,
                     "small": small, "device": device, "extra_overrides": extra_overrides or {},
                     "base_overrides": base, "noise_levels_hu": NOISE_LEVELS, "noise_seed": NOISE_SEED},
        "dataset": {"path": str(source_dir), "split_file": str(split_file) if split_file else None,
                    "split": ({role: [c.name for c in getattr(spec, role)] for role in
                               ("training", "unlabeled", "validation", "test")} if split_file else None),
                    "n_labeled": len(spec.training), "n_unlabeled": len(spec.unlabeled),
                    "n_validation": len(spec.validation), "n_test": len(spec.test), "classes": class_names},
        "annotation": annotation,
        "hardware": hardware_note(device),
        "tables": tables,
        "this_call": {outcome: [] for outcome in ("trained", "resumed", "evaluated", "skipped", "missing", "failed")},
        "failures": {},
        "not_run": not_run,
        "report_dir": str(Path("reports") / report_name(presets, variants, settings, checkpoint)),
    }
    _log(out_dir, f"accuracy bench: {len(units)} units -> {out_dir}  ({results['command']})")
    records: List[Dict[str, Any]] = []
    for index, unit in enumerate(units, 1):
        try:
            outcome, record = run_unit(ctx, unit)
        except (TrainingInterrupted, KeyboardInterrupt):
            _log(out_dir, f"[{index}/{len(units)}] {unit.name}: interrupted; re-run the same command to resume")
            raise
        except Exception as exc:  # one diverging run must not cost the rest of an unattended bench
            outcome, record = "failed", {}
            results["failures"][unit.name] = f"{type(exc).__name__}: {exc}"
            _log(out_dir, f"[{index}/{len(units)}] {unit.name}: FAILED {type(exc).__name__}: {exc}")
        results["this_call"][outcome].append(unit.name)
        if outcome == "missing":
            _log(out_dir, f"[{index}/{len(units)}] {unit.name}: not evaluated, its run {unit.run_name} is not trained")
        elif record:
            records.append(record)
            _log(out_dir, _progress_line(index, len(units), unit, outcome, record))
        results.update(runs=records, aggregates=aggregate(records, class_names),
                       paired=paired_differences(records), total_seconds=time.perf_counter() - started, plots={})
        _write_reports(results, out_dir, with_plots=False)  # partial results survive a crash
    results["plots"] = write_plots(results, units, out_dir, out_dir / results["report_dir"])
    results["total_seconds"] = time.perf_counter() - started
    markdown = _write_reports(results, out_dir, with_plots=True)
    logger.info(markdown)
    return results


def _write_reports(results: Dict[str, Any], out_dir: Path, with_plots: bool) -> str:
    """Write the call's results.json and RESULTS.md atomically, then the index; returns the Markdown."""
    report_dir = out_dir / results["report_dir"]
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_json(report_dir / "results.json", results)
    markdown = render_markdown(results, results["plots"] if with_plots else {})
    with atomic_write(report_dir / "RESULTS.md") as tmp:
        tmp.write_text(markdown)
    write_report_index(out_dir)
    return markdown
