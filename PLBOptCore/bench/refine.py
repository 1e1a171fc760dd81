"""Benchmark of the superpixel entropy voting (eq. 1-2): vectorised vs a plain per-superpixel loop.

``refine_reference`` is the readable loop version of :func:`PLBOptCore.method.refine.refine_pseudo_labels`
(same rule, float64 numpy); the tests assert both give identical labels, and this benchmark asserts
it again on demo-sized inputs and reports the speed-up.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..method.refine import refine_pseudo_labels
from ..method.superpixels import compute_superpixels
from ..utils import atomic_write

logger = logging.getLogger(__name__)


def _entropy(prob_sum: np.ndarray, cls: int, mode: str) -> float:
    p = prob_sum / prob_sum.sum()
    if mode == "binary":
        p = np.array([p[cls], 1.0 - p[cls]])
    nonzero = p > 0
    return float(-(p[nonzero] * np.log(p[nonzero])).sum())


def refine_reference(probs: torch.Tensor, pseudo: torch.Tensor, superpixels: torch.Tensor,
                     tau: float, entropy: str = "binary") -> Tuple[torch.Tensor, float]:
    """Loop over batch items, superpixels and foreground classes; same contract as
    :func:`refine_pseudo_labels` (module docstring of ``method/refine.py`` states the rule)."""
    p_all = probs.detach().cpu().double().numpy()
    y_all = pseudo.cpu().numpy()
    s_all = superpixels.cpu().numpy()
    out = y_all.copy()
    num_classes = p_all.shape[1]
    changed = 0
    total = 0
    for b in range(y_all.shape[0]):
        sp, y, p = s_all[b].ravel(), y_all[b].ravel(), p_all[b].reshape(num_classes, -1)
        order = np.argsort(sp, kind="stable")  # group voxels by superpixel once, then loop
        ids, starts = np.unique(sp[order], return_index=True)
        for sid, voxels in zip(ids, np.split(order, starts[1:])):
            if sid < 0:
                continue
            labels = y[voxels]
            new = labels.copy()
            contract_to: Dict[int, int] = {}
            expanding: List[Tuple[float, int]] = []
            for c in range(1, num_classes):
                inside = labels == c
                if inside.all() or not inside.any():
                    continue  # an empty region has no entropy: no decision
                sum_int = p[:, voxels[inside]].sum(1)
                h_int = _entropy(sum_int, c, entropy)
                h_comp = _entropy(p[:, voxels[~inside]].sum(1), c, entropy)
                if h_int > tau and h_int > h_comp:
                    ranked = sum_int.copy()
                    ranked[c] = -1.0
                    contract_to[c] = int(np.argmax(ranked))
                elif h_comp > tau and h_comp > h_int:
                    expanding.append((h_int, c))
            if expanding:
                new[:] = min(expanding)[1]  # lowest H(int), then smallest class
            else:
                for c, target in contract_to.items():
                    new[labels == c] = target
            out[b].ravel()[voxels] = new
            changed += int((new != labels).sum())
            total += len(voxels)
    fraction = changed / total if total else 0.0
    return torch.from_numpy(out).to(pseudo.device), fraction


def _synthetic_case(batch: int, num_classes: int, shape: Sequence[int], seed: int, divisor: int):
    """Smooth organ-like blobs, an image of them, SLIC superpixels, and noisy softmax outputs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    probs, pseudo, spx = [], [], []
    for _ in range(batch):
        logits = np.zeros((num_classes,) + tuple(shape), dtype=np.float32)
        for c in range(1, num_classes):
            centre = rng.uniform(-0.6, 0.6, 3)
            radius = rng.uniform(0.2, 0.4)
            dist = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
            logits[c] = 6.0 * (radius - dist) / radius
        logits += rng.normal(0.0, 1.0, logits.shape).astype(np.float32)
        prob = torch.softmax(torch.from_numpy(logits), 0)
        image = (logits[1:].max(0) > 0) * 0.5 + 0.2 + rng.normal(0, 0.05, shape)
        probs.append(prob)
        pseudo.append(prob.argmax(0))
        spx.append(torch.from_numpy(compute_superpixels(np.clip(image, 0, 1), "slic", divisor, 0.1)).long())
    return torch.stack(probs), torch.stack(pseudo), torch.stack(spx)


SPEEDUP_TARGET = 20.0  # vectorised vs reference, issue target


def _median_seconds(fn: Callable[[], object], repeats: int, dev: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up call (CUDA-synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_refine_bench(out_dir: Path, sizes: Sequence[Tuple[int, int, int]] = ((32, 64, 64), (64, 128, 128)),
                     repeats: int = 15, reference_repeats: int = 3, batch: int = 2, num_classes: int = 6,
                     tau: float = 0.5, divisor: int = 50, device: Optional[str] = None) -> dict:
    """Time vectorised vs reference refinement, assert equal outputs, write JSON + Markdown.

    Returns ``{"device", "rows": [{"shape", "superpixels", "vectorised_s", "reference_s",
    "speedup", "changed_fraction"}], "target_speedup", "target_met"}``; times are medians over
    ``repeats`` (vectorised) and ``reference_repeats`` (reference) calls, each after a warm-up.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for shape in sizes:
        probs, pseudo, spx = _synthetic_case(batch, num_classes, shape, seed=0, divisor=divisor)
        probs, pseudo, spx = probs.to(dev), pseudo.to(dev), spx.to(dev)
        fast, fast_changed = refine_pseudo_labels(probs, pseudo, spx, tau)
        slow, slow_changed = refine_reference(probs, pseudo, spx, tau)
        if not torch.equal(fast.cpu(), slow.cpu()) or abs(fast_changed - slow_changed) > 1e-12:
            raise AssertionError(f"vectorised and reference refinement differ for shape {shape}")
        vectorised_s = _median_seconds(lambda: refine_pseudo_labels(probs, pseudo, spx, tau), repeats, dev)
        reference_s = _median_seconds(lambda: refine_reference(probs, pseudo, spx, tau), reference_repeats, dev)
        num_sp = int(sum(len(torch.unique(s)) for s in spx))
        rows.append(dict(shape=[batch, num_classes, *shape], superpixels=num_sp, vectorised_s=vectorised_s,
                         reference_s=reference_s, speedup=reference_s / vectorised_s,
                         changed_fraction=fast_changed))
    target_met = all(r["speedup"] >= SPEEDUP_TARGET for r in rows)
    result = dict(device=str(dev), torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), tau=tau, divisor=divisor, repeats=repeats,
                  reference_repeats=reference_repeats, rows=rows, target_speedup=SPEEDUP_TARGET,
                  target_met=target_met)
    lines = ["| B×C×Z×Y×X | superpixels | vectorised (s) | reference loop (s) | speed-up | changed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['superpixels']} | {r['vectorised_s']:.4f} | "
                     f"{r['reference_s']:.3f} | {r['speedup']:.1f}× | {r['changed_fraction']:.4f} |")
    verdict = (f"Speed-up target ≥ {SPEEDUP_TARGET:.0f}×: {'met' if target_met else 'NOT met'} "
               f"(medians of {repeats} vectorised and {reference_repeats} reference calls, outputs asserted equal).")
    table = "\n".join(lines)
    with atomic_write(out_dir / "refine_bench.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    with atomic_write(out_dir / "refine_bench.md") as tmp:
        tmp.write_text(f"# Refinement benchmark ({dev}, {torch.get_num_threads()} threads, τ={tau})\n\n"
                       f"{table}\n\n{verdict}\n")
    logger.info(table)
    logger.info(verdict)
    return result
