"""``plbopt demo``: the whole pipeline on the embedded phantom dataset, sized for a 2-core CPU.

Generates the synthetic abdominal CT set (no download), predicts the held-out test cases, prints
per-class Dice, ASD, ASSD and HD95 and writes a PNG montage of image / ground truth / prediction.
The weights come from the checkpoint shipped in ``Resources/demo/`` (:data:`SHIPPED_CHECKPOINT`:
PLBOpt trained by ``plbopt demo --train`` itself, default split, seed 0, one thread; its weights
stored as float16, see :func:`ship_checkpoint`), so the first command takes under a minute;
``train=True`` (``--train``) trains the preset with the CPU schedule first, as the shipped
checkpoint was trained (about 10 minutes on a 2-core CPU). Another preset, split, seed or ``iterations`` trains, since
the shipped checkpoint is none of those.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .config import CPU_DEMO_OVERRIDES
from .data.phantom import DEMO_SPLIT
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# PLBOpt trained by ``plbopt demo --train`` (preset plbopt, DEMO_SPLIT, seed 0, OMP_NUM_THREADS=1),
# its best.pt reduced to what prediction needs by ship_checkpoint. Absent from a non-editable install
# (Resources/ is no package data): the demo then trains.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "Resources" / "demo" / "plbopt-demo.pt"
SHIPPED_PRESET, SHIPPED_SEED = "plbopt", 0
# Seconds per training step of the demo on the 2-core development machine, by thread count, for
# the time printed: 1 thread 0.48 s (the run that made the shipped checkpoint, 1200 steps in 575 s
# while two benchmarks ran), 2 threads 0.41 s (plbopt bench step, idle machine).
SECONDS_PER_STEP = {1: 0.5, 2: 0.4}


def expected_training_minutes(iterations: int, threads: int) -> str:
    """``"about N minutes"`` for ``iterations`` steps at :data:`SECONDS_PER_STEP` (1 thread's
    figure for 1, 2 threads' for more: the development machine has 2 cores)."""
    minutes = max(1, round(iterations * SECONDS_PER_STEP[1 if threads <= 1 else 2] / 60))
    return f"about {minutes} minute{'s' if minutes > 1 else ''}"


def ship_checkpoint(run_dir: Path, path: Path = SHIPPED_CHECKPOINT, test_dice: Optional[Dict[str, float]] = None,
                    threads: int = 1) -> Path:
    """Write the demo's shipped checkpoint ``path`` from the ``best.pt`` of a ``plbopt demo --train``
    run: the configuration, class names and colours, refinement gains and the subnets' weights
    (float16: half the size; no optimiser, class-weight or triplet-bank state, which only training
    needs), plus ``"demo"``: how it was made and the test Dice it gave before the rounding."""
    from .engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(Path(run_dir) / "checkpoints" / "best.pt")
    config = state["config"]
    kept: Dict[str, Any] = {key: state[key] for key in ("step", "best_metric", "config", "labels", "colors",
                                                        "refine_gain", "refine_gain_validation",
                                                        "largest_component_gain_validation") if key in state}
    kept["models"] = [{name: value.half() if value.is_floating_point() else value for name, value in model.items()}
                      for model in state["models"]]
    kept["demo"] = {"preset": config["preset"], "seed": config["seed"], "iterations": config["iterations"],
                    "split": dict(DEMO_SPLIT), "threads": threads, "torch": str(torch.__version__),
                    "weights": "float16", "test_dice_float32": dict(test_dice or {})}
    return save_checkpoint(Path(path), kept)


def _materialise_shipped_run(run_dir: Path, data_dir: Path) -> Path:
    """``run_dir`` as training would leave it for prediction: ``checkpoints/best.pt`` (the shipped
    weights back in float32), ``config.json`` and ``dataset.json``; ``plbopt predict``, ``refine``
    and ``export`` then work on it (``--resume`` does not: no optimiser state is shipped). The class
    colours are those of ``data_dir``'s dataset.json: the phantom's may be newer than the shipped file's."""
    from .engine.checkpoint import load_checkpoint, save_checkpoint
    from .utils import atomic_write

    state = load_checkpoint(SHIPPED_CHECKPOINT)
    state["models"] = [{name: value.float() if value.is_floating_point() else value for name, value in model.items()}
                       for model in state["models"]]
    colors = json.loads((Path(data_dir) / "dataset.json").read_text()).get("colors", {})
    state["colors"] = dict(state.get("colors", {}), **{str(k): list(v) for k, v in colors.items()})
    save_checkpoint(run_dir / "checkpoints" / "best.pt", state)
    with atomic_write(run_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(state["config"], indent=2))
    stored = {"labels": state["labels"], "colors": state["colors"], "source": str(data_dir)}
    with atomic_write(run_dir / "dataset.json") as tmp:
        tmp.write_text(json.dumps(stored, indent=2))
    return run_dir


def _why_train(train: bool, preset: str, iterations: Optional[int], seed: int, split: Dict[str, int]) -> Optional[str]:
    """Why the demo must train (None: the shipped checkpoint is this demo's)."""
    if train:
        return "--train"
    if preset != SHIPPED_PRESET:
        return f"the shipped checkpoint is {SHIPPED_PRESET}, not {preset}"
    if iterations is not None or seed != SHIPPED_SEED or split != DEMO_SPLIT:
        return "the shipped checkpoint was trained on the default split, seed and schedule"
    if not SHIPPED_CHECKPOINT.is_file():
        return f"no shipped checkpoint at {SHIPPED_CHECKPOINT} (an install without Resources/)"
    return None


def run_demo(out_dir: Path, preset: str = "plbopt", iterations: Optional[int] = None, device: str = "auto",
             overwrite: bool = False, seed: int = 0, n_labeled: int = DEMO_SPLIT["n_labeled"],
             n_unlabeled: int = DEMO_SPLIT["n_unlabeled"], n_validation: int = DEMO_SPLIT["n_validation"],
             n_test: int = DEMO_SPLIT["n_test"], train: bool = False) -> Dict[str, float]:
    """Run the demo in ``out_dir`` and return the per-class mean test Dice (plus ``mean``).

    ``n_labeled``/``n_unlabeled``/``n_validation``/``n_test`` set the phantom split (default
    :data:`~PLBOptCore.data.phantom.DEMO_SPLIT`: 2 labeled and 12 unlabeled, the paper's
    scarce-label regime, 2 validation and 4 test volumes). Without ``train`` the shipped
    checkpoint predicts, where it was trained for this demo (module docstring).
    """
    if n_test < 1:
        raise ConfigError(f"the demo needs at least 1 test volume to score, got {n_test}")
    from .api import evaluate, predict
    from .api import train as train_run
    from .data.dataset import load_dataset
    from .data.phantom import make_phantom_dataset
    from .evaluate import format_table

    split = dict(n_labeled=n_labeled, n_unlabeled=n_unlabeled, n_validation=n_validation, n_test=n_test)
    reason = _why_train(train, preset, iterations, seed, split)
    steps = iterations if iterations is not None else CPU_DEMO_OVERRIDES["iterations"]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out_dir}: demo folder is not empty; use --overwrite or another -o")
        shutil.rmtree(out_dir)
    if reason is None:
        logger.info(f"expected time: under 1 minute (phantom data, then the 4 test volumes predicted with the "
                    f"shipped checkpoint {SHIPPED_CHECKPOINT.name}: PLBOpt trained {steps} steps by "
                    f"'plbopt demo --train'; that command trains it again, "
                    f"{expected_training_minutes(steps, torch.get_num_threads())} here)")
    else:
        logger.info(f"expected time: {expected_training_minutes(steps, torch.get_num_threads())} to train {preset} "
                    f"for {steps} steps with {torch.get_num_threads()} thread(s) ({reason}); plain 'plbopt demo' "
                    f"predicts with the shipped checkpoint in under 1 minute")
    started = time.perf_counter()
    data_dir = make_phantom_dataset(out_dir / "data", n_labeled=n_labeled, n_unlabeled=n_unlabeled,
                                    n_validation=n_validation, n_test=n_test, seed=seed)
    spec = load_dataset(data_dir)
    ratio = 100 * len(spec.training) / max(1, len(spec.training) + len(spec.unlabeled))
    logger.info(f"phantom dataset: {len(spec.training)} labeled, {len(spec.unlabeled)} unlabeled "
                f"({ratio:.0f} % labeled), {len(spec.validation)} validation, {len(spec.test)} test cases, "
                f"classes: {', '.join(n for c, n in spec.labels.items() if c)} -> {data_dir}")

    run_dir = out_dir / "run"
    if reason is None:
        _materialise_shipped_run(run_dir, data_dir)
        made = load_shipped_info()
        logger.info(f"shipped checkpoint: {made['preset']}, {made['iterations']} steps, seed {made['seed']}, "
                    f"{made['threads']} thread(s), torch {made['torch']}, weights {made['weights']} -> {run_dir}")
    else:
        overrides = dict(CPU_DEMO_OVERRIDES, device=device, seed=seed)
        if iterations is not None:
            overrides["iterations"] = iterations
        train_run(data_dir, run_dir, preset=preset, overrides=overrides, show_progress_bar=True)

    predictions = out_dir / "predictions"
    test_images = [case.image for case in spec.test]
    predict(run_dir, test_images, predictions, device=device)
    gt_dir = out_dir / "test_labels"
    gt_dir.mkdir(exist_ok=True)
    for case in spec.test:
        shutil.copy2(case.label, gt_dir / case.label.name)
    results = evaluate(predictions, gt_dir, labels=data_dir / "dataset.json")
    logger.info(format_table(results))
    montage = write_montage(spec, predictions, out_dir / "montage.png")
    summary = {name: float(values["dice"]["mean"]) for name, values in results["classes"].items()}
    summary["mean"] = float(results["mean"]["dice"])
    source = "the shipped checkpoint" if reason is None else f"{preset} trained here"
    logger.info(f"test-case mean Dice over {len(spec.test)} cases ({source}): {summary['mean']:.3f}  "
                f"({time.perf_counter() - started:.0f} s in total; montage {montage})")
    return summary


def load_shipped_info() -> Dict[str, Any]:
    """The ``"demo"`` record of the shipped checkpoint (how it was made)."""
    from .engine.checkpoint import load_checkpoint

    info = load_checkpoint(SHIPPED_CHECKPOINT).get("demo")
    if not isinstance(info, dict):
        raise CheckpointError(f"{SHIPPED_CHECKPOINT}: not the demo's shipped checkpoint (no 'demo' record)")
    return info


MONTAGE_OPACITY = 0.55  # of the class colours over the CT slice


def montage_colors(spec) -> np.ndarray:
    """RGBA in 0..1 per class of ``spec`` as the montage draws its overlays: the dataset's class colours
    (the phantom's: :data:`~PLBOptCore.data.phantom.COLORS`) at :data:`MONTAGE_OPACITY`; background
    fully transparent, so the CT shows through it."""
    colors = np.zeros((spec.num_classes, 4))
    for c in range(1, spec.num_classes):
        rgb = spec.colors.get(c, (255, 0, 0))
        colors[c] = [rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, MONTAGE_OPACITY]
    return colors


def write_montage(spec, predictions_dir: Path, path: Path, max_cases: int = 4) -> Path:
    """Rows = test cases; columns = image, ground truth overlay, prediction overlay (on the slice
    with the most labelled voxels), colours from :func:`montage_colors`."""
    from matplotlib.colors import ListedColormap

    from .bench.plots import pyplot_agg, save_png
    from .data.io import case_name, read_image
    import SimpleITK as sitk

    cases = spec.test[:max_cases]
    colors = montage_colors(spec)
    cmap = ListedColormap(colors)
    from matplotlib.patches import Patch

    fig, axes = pyplot_agg().subplots(len(cases), 3, figsize=(9, 3 * len(cases) + 0.6), squeeze=False)
    for row, case in enumerate(cases):
        image = sitk.GetArrayFromImage(read_image(case.image))
        truth = sitk.GetArrayFromImage(read_image(case.label))
        prediction = sitk.GetArrayFromImage(read_image(predictions_dir / f"{case_name(case.image)}.nii.gz"))
        z = int(np.argmax((truth > 0).sum(axis=(1, 2))))
        for col, (title, overlay) in enumerate((("image", None), ("ground truth", truth), ("prediction", prediction))):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray", vmin=-160, vmax=240)
            if overlay is not None:
                ax.imshow(overlay[z], cmap=cmap, vmin=0, vmax=spec.num_classes - 1, interpolation="nearest")
            ax.set_title(f"{case.name}: {title}" if col == 0 else title, fontsize=9)
            ax.axis("off")
    legend = [Patch(facecolor=colors[c][:3], label=spec.labels[c]) for c in range(1, spec.num_classes)]
    fig.legend(handles=legend, loc="lower center", ncol=min(len(legend), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3 * len(cases) + 0.6), 1, 1))  # room for the class legend below
    return save_png(fig, path, dpi=90)
