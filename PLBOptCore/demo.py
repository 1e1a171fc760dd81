"""``plbopt demo``: the whole pipeline on the embedded phantom dataset, sized for a 2-core CPU.

Generates the synthetic abdominal CT set (no download), trains the chosen preset with the CPU
schedule, predicts the held-out test cases, prints per-class Dice and writes a PNG montage of
image / ground truth / prediction.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .config import CPU_DEMO_OVERRIDES
from .data.phantom import DEMO_SPLIT
from .errors import ConfigError

logger = logging.getLogger(__name__)


def run_demo(out_dir: Path, preset: str = "plbopt", iterations: Optional[int] = None, device: str = "auto",
             overwrite: bool = False, seed: int = 0, n_labeled: int = DEMO_SPLIT["n_labeled"],
             n_unlabeled: int = DEMO_SPLIT["n_unlabeled"], n_validation: int = DEMO_SPLIT["n_validation"],
             n_test: int = DEMO_SPLIT["n_test"]) -> Dict[str, float]:
    """Run the demo in ``out_dir`` and return the per-class mean test Dice (plus ``mean``).

    ``n_labeled``/``n_unlabeled``/``n_validation``/``n_test`` set the phantom split (default
    :data:`~PLBOptCore.data.phantom.DEMO_SPLIT`: 2 labeled and 12 unlabeled, the paper's
    scarce-label regime, 2 validation and 4 test volumes).
    """
    if n_test < 1:
        raise ConfigError(f"the demo needs at least 1 test volume to score, got {n_test}")
    from .api import evaluate, predict, train
    from .data.dataset import load_dataset
    from .data.phantom import make_phantom_dataset
    from .evaluate import format_table

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out_dir}: demo folder is not empty; use --overwrite or another -o")
        shutil.rmtree(out_dir)
    started = time.perf_counter()
    data_dir = make_phantom_dataset(out_dir / "data", n_labeled=n_labeled, n_unlabeled=n_unlabeled,
                                    n_validation=n_validation, n_test=n_test, seed=seed)
    spec = load_dataset(data_dir)
    ratio = 100 * len(spec.training) / max(1, len(spec.training) + len(spec.unlabeled))
    logger.info(f"phantom dataset: {len(spec.training)} labeled, {len(spec.unlabeled)} unlabeled "
                f"({ratio:.0f} % labeled), {len(spec.validation)} validation, {len(spec.test)} test cases, "
                f"classes: {', '.join(n for c, n in spec.labels.items() if c)} -> {data_dir}")

    overrides = dict(CPU_DEMO_OVERRIDES, device=device, seed=seed)
    if iterations is not None:
        overrides["iterations"] = iterations
    run_dir = out_dir / "run"
    train(data_dir, run_dir, preset=preset, overrides=overrides, show_progress_bar=True)

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
    logger.info(f"test-case mean Dice over {len(spec.test)} cases: {summary['mean']:.3f}  "
          f"({time.perf_counter() - started:.0f} s in total; montage {montage})")
    return summary


def write_montage(spec, predictions_dir: Path, path: Path, max_cases: int = 4) -> Path:
    """Rows = test cases; columns = image, ground truth overlay, prediction overlay (middle slice)."""
    from matplotlib.colors import ListedColormap

    from .bench.plots import pyplot_agg, save_png
    from .data.io import case_name, read_image
    import SimpleITK as sitk

    cases = spec.test[:max_cases]
    colors = np.zeros((spec.num_classes, 4))
    for c in range(1, spec.num_classes):
        rgb = spec.colors.get(c, (255, 0, 0))
        colors[c] = [rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, 0.55]
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
