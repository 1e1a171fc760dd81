"""Where a trained run's test errors lie, and so what PLBOpt's refinement could fix (``plbopt bench errors``).

Superpixel refinement relabels voxels of *homogeneous* superpixels (intensity std at most
``refine_homogeneity`` × the volume's noise) where the pseudo label is uncertain, which in practice is
next to a predicted boundary. So the errors it can fix lie within one voxel of a true boundary,
inside a homogeneous superpixel. Everything is measured on the preprocessed grid the network sees
(the run's stored plan), with the superpixels training would compute there:

* ``near_boundary``: within one voxel (26-neighbourhood) of a ground-truth class boundary;
* ``homogeneous``: inside a homogeneous superpixel;
* ``refinable``: both;
* ``confusion``: a voxel of one organ predicted as another organ (refinement in ``safe`` mode never
  hands voxels between organs), ``false_positive`` (background predicted as organ) and
  ``false_negative`` (organ predicted as background);
* ``island``: in a predicted component that is not its class's largest (26-connected), what the
  largest-component postprocessing (:mod:`PLBOptCore.postprocess`) turns into background when it
  chooses the class; it fixes such an error where the truth is background.

Each share is of all wrongly labelled voxels, pooled over the cases.

Sparse ground truth (the dataset's ``ignore`` label, issue 23) is scored as ``plbopt evaluate``
scores it: voxels nobody annotated (:data:`~PLBOptCore.data.preprocess.UNANNOTATED` after
preprocessing) are neither errors nor voxels, and the border of an annotated region with an
unannotated one is no class boundary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..data.dataset import Case, load_dataset
from ..data.preprocess import PreprocessParams, preprocess_case
from ..engine.inference import Predictor
from ..errors import DatasetError
from ..method.refine import homogeneous_superpixels
from ..postprocess import smaller_components
from ..utils import atomic_write

SHARES = ("near_boundary", "homogeneous", "refinable", "confusion", "false_positive", "false_negative", "island")


def boundary_band(label: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (26-neighbourhood) of a boundary between two classes of ``label``
    (Z, Y, X) integers; unannotated voxels (``label < 0``) belong to no class, so they make no
    boundary, and are never in the band themselves.

    >>> band = boundary_band(np.array([[[0, 0, 0, 1, 1, 1]]]))
    >>> band.astype(int).tolist()
    [[[0, 0, 1, 1, 0, 0]]]
    >>> boundary_band(np.array([[[0, 0, -1, 1, 1, 1]]])).astype(int).tolist()
    [[[0, 0, 0, 0, 0, 0]]]
    """
    structure = np.ones((3, 3, 3), bool)
    label = np.asarray(label, dtype=np.int64)
    annotated = label >= 0
    # an unannotated neighbour is below every class for the maximum and above every class for the
    # minimum, so it changes neither where the voxel itself is annotated
    highest = ndimage.maximum_filter(np.where(annotated, label, -1), footprint=structure, mode="nearest")
    above = int(label.max()) + 1 if label.size else 0
    lowest = ndimage.minimum_filter(np.where(annotated, label, above), footprint=structure, mode="nearest")
    return annotated & (highest != lowest)


def case_error_counts(predicted: np.ndarray, truth: np.ndarray, homogeneous: np.ndarray) -> Dict[str, int]:
    """Voxel counts of each kind of error of ``predicted`` against ``truth`` (same shape (Z, Y, X);
    see the module). Voxels where ``truth < 0`` (not annotated) count neither as errors nor in
    ``voxels``, the annotated voxels."""
    annotated = truth >= 0
    wrong = (predicted != truth) & annotated
    near = boundary_band(truth)
    island = smaller_components(predicted, range(1, int(predicted.max(initial=0)) + 1))
    counts = {
        "errors": int(wrong.sum()), "voxels": int(annotated.sum()),
        "near_boundary": int((wrong & near).sum()), "homogeneous": int((wrong & homogeneous).sum()),
        "refinable": int((wrong & near & homogeneous).sum()),
        "confusion": int((wrong & (predicted > 0) & (truth > 0)).sum()),
        "false_positive": int((wrong & (truth == 0)).sum()), "false_negative": int((wrong & (predicted == 0)).sum()),
        "island": int((wrong & island).sum()),
    }
    return counts


def error_decomposition(run_dir: Path, cases: Sequence[Case], checkpoint: str = "best",
                        device: str = "cpu", ignore_label: Optional[int] = None) -> Dict[str, Any]:
    """Decompose ``run_dir``'s errors on ``cases`` (each with a label); returns per case counts and
    pooled shares. ``ignore_label``: the dataset's label of unannotated voxels, left out of every count."""
    from ..method.superpixels import noise_sigma

    predictor = Predictor.from_run(Path(run_dir), checkpoint, device)
    config = predictor.config
    params = PreprocessParams.from_config(config)
    per_case = {}
    for case in cases:
        if case.label is None:
            raise DatasetError(f"{case.image}: error decomposition needs a label for every case")
        prepared = preprocess_case(case, params, None, with_superpixels=True, ignore_label=ignore_label)
        image = np.asarray(prepared.image, dtype=np.float32)
        predicted = predictor.predict_probabilities(image).argmax(0).numpy()
        sigma = torch.tensor([noise_sigma(image)], dtype=torch.float64)
        factor = config.refine_homogeneity if config.refine_homogeneity > 0 else float("inf")
        kept = homogeneous_superpixels(torch.from_numpy(np.asarray(prepared.superpixels, dtype=np.int64))[None],
                                       torch.from_numpy(image)[None], sigma, factor)[0].numpy() >= 0
        per_case[case.name] = case_error_counts(predicted, np.asarray(prepared.label, dtype=np.int64), kept)
    pooled = {key: sum(c[key] for c in per_case.values()) for key in ("errors", "voxels", *SHARES)}
    shares = {key: pooled[key] / pooled["errors"] if pooled["errors"] else 0.0 for key in SHARES}
    return {"run_dir": str(run_dir), "checkpoint": checkpoint, "preset": config.preset,
            "refine_homogeneity": config.refine_homogeneity, "grid_spacing_zyx": list(config.target_spacing or []),
            "ignore_label": ignore_label, "cases": per_case, "pooled": pooled, "shares": shares,
            "error_rate": pooled["errors"] / pooled["voxels"] if pooled["voxels"] else 0.0}


def run_error_bench(run_dirs: Sequence[Path], dataset_dir: Path, out_dir: Path, checkpoint: str = "best",
                    device: str = "cpu") -> Dict[str, Any]:
    """Decompose the test errors of every run in ``run_dirs`` on ``dataset_dir``'s ``test`` cases;
    writes ``OUT/errors.json`` and ``OUT/ERRORS.md`` (one row per run, then the mean over runs). The
    dataset's ``ignore`` label, if any, marks ground-truth voxels left out (as ``plbopt evaluate`` does)."""
    spec = load_dataset(Path(dataset_dir))
    if not spec.test:
        raise DatasetError(f"{spec.json_path}: no 'test' cases to decompose the errors on")
    results = {"dataset": str(dataset_dir), "n_test": len(spec.test),
               "runs": [error_decomposition(run, spec.test, checkpoint, device, spec.ignore_label) for run in run_dirs]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "errors.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    lines = [f"# Where the test errors lie ({dataset_dir}, {len(spec.test)} test cases, `{checkpoint}.pt`)", "",
             "Shares of wrongly labelled voxels on the preprocessed grid (pooled over cases). *Refinable*: within "
             "one voxel of a true boundary and inside a homogeneous superpixel, what superpixel refinement can "
             "change; *confusion*: one organ predicted as another; *island*: in a predicted component that is "
             "not its class's largest, what the largest-component postprocessing removes."
             + (f" Ground-truth voxels labelled ignore ({spec.ignore_label}) are left out, as `plbopt evaluate` "
                "leaves them out." if spec.ignore_label is not None else ""), "",
             "| Run | error rate | near boundary | homogeneous | refinable | confusion | false pos. | false neg. | island |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        s = run["shares"]
        lines.append(f"| {Path(run['run_dir']).name} | {100 * run['error_rate']:.2f} % | "
                     + " | ".join(f"{100 * s[key]:.1f} %" for key in SHARES) + " |")
    if len(results["runs"]) > 1:
        mean = {key: float(np.mean([run["shares"][key] for run in results["runs"]])) for key in SHARES}
        rate = float(np.mean([run["error_rate"] for run in results["runs"]]))
        lines.append(f"| mean | {100 * rate:.2f} % | " + " | ".join(f"{100 * mean[key]:.1f} %" for key in SHARES) + " |")
        results["mean_shares"] = mean
    with atomic_write(out_dir / "ERRORS.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return results
