"""Share of a PLBOpt training step spent on refinement and triplet mining (demo configuration).

Superpixels are computed once per unlabeled volume in preprocessing, so their cost is reported
per volume (one-off), not per step. The step timings come from ``Trainer.last_step_timings``
(phases: data, forward, losses_sup, refine, cps, triplet = mining + loss, backward = MC + backward pass).
The presets take their steps in turn and each phase is reported as its median, so a load that
comes and goes on the machine does not land on one preset only.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..config import CPU_DEMO_OVERRIDES, make_config
from ..utils import atomic_write

logger = logging.getLogger(__name__)

PHASES = ("data", "forward", "losses_sup", "refine", "cps", "triplet", "backward")


def run_step_bench(out_dir: Path, iterations: int = 20, warmup: int = 3, presets=("dhc", "plbopt")) -> Dict:
    """Time ``iterations`` steps of each preset, interleaved, on the phantom data (median per phase);
    write step_bench.json/.md."""
    from ..data.dataset import load_dataset
    from ..data.phantom import make_phantom_dataset
    from ..data.preprocess import PreprocessParams
    from ..engine.trainer import Trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_phantom_dataset(Path(tmp) / "data", n_labeled=2, n_unlabeled=2, n_test=0)
        spec = load_dataset(data_dir)
        trainers = {}
        for preset in presets:
            config = make_config(preset, overrides=dict(CPU_DEMO_OVERRIDES, iterations=warmup + iterations,
                                                        device="cpu", validate_every=10**6, checkpoint_every=10**6))
            trainer = Trainer(config, spec, Path(tmp) / f"run-{preset}")
            trainer.time_phases = True
            trainer.setup()
            trainers[preset] = trainer
        samples: Dict[str, List[Dict[str, float]]] = {preset: [] for preset in presets}
        # One step of each preset in turn, so that the machine's load and clock drift reach all
        # presets alike; the median of each phase ignores the odd step a background job slowed.
        for step in range(warmup + iterations):
            for preset, trainer in trainers.items():
                trainer.train_step()
                if step >= warmup:
                    samples[preset].append(dict(trainer.last_step_timings))
        for preset in presets:
            median = {phase: float(np.median([s.get(phase, 0.0) for s in samples[preset]]))
                      for phase in PHASES + ("total",)}
            results[preset] = {"median_seconds": median,
                               "share_refine_plus_triplet": (median["refine"] + median["triplet"]) / median["total"]}
        params = PreprocessParams.from_config(make_config("plbopt", overrides=dict(CPU_DEMO_OVERRIDES)))
        from ..data.preprocess import preprocess_image, superpixels_for
        from ..data.io import read_image

        volume, info = preprocess_image(read_image(spec.unlabeled[0].image), params)
        started = time.perf_counter()
        superpixels_for(volume, params, info)
        superpixel_seconds = time.perf_counter() - started

    share = results["plbopt"]["share_refine_plus_triplet"]
    overhead = results["plbopt"]["median_seconds"]["total"] / results["dhc"]["median_seconds"]["total"]
    summary = {
        "config": {k: CPU_DEMO_OVERRIDES[k] for k in ("patch_size", "base_filters", "batch_size")},
        "device": "cpu", "steps_timed": iterations, "presets": results,
        "plbopt_share_refine_plus_triplet": share, "plbopt_over_dhc_step_time": overhead,
        "superpixels_seconds_per_volume_once": superpixel_seconds, "superpixel_volume_shape": list(volume.shape),
        "target_share_max": 0.15,
    }
    lines = ["| preset | " + " | ".join(PHASES) + " | total (s) |", "|---" * (len(PHASES) + 2) + "|"]
    for preset, result in results.items():
        m = result["median_seconds"]
        lines.append(f"| {preset} | " + " | ".join(f"{m[p]:.3f}" for p in PHASES) + f" | {m['total']:.3f} |")
    lines += ["", f"PLBOpt refinement + triplet mining: {100 * share:.1f}% of the step (target <= 15%); "
              f"PLBOpt step / DHC step = {overhead:.2f}x; superpixels (once per volume, cached) "
              f"{superpixel_seconds:.2f} s for a {tuple(volume.shape)} volume."]
    table = "\n".join(lines)
    logger.info(table)
    with atomic_write(out_dir / "step_bench.json") as path:
        path.write_text(json.dumps(summary, indent=2))
    with atomic_write(out_dir / "step_bench.md") as path:
        path.write_text("# Training-step time by phase (CPU, demo configuration)\n\n"
                        f"Median seconds of {iterations} steps per preset, the presets' steps interleaved.\n\n"
                        + table + "\n")
    return summary
