"""``plbopt bench step`` and ``plbopt bench predict``: training and inference throughput on
whatever device they run on (steps/s, voxels/s, peak memory), written as JSON.

Both work without a dataset or a trained run: training uses the embedded phantom data, inference
a random volume and freshly initialised subnets (throughput does not depend on the weights). By
default the size is the preset's own (64×128×128 patches, 32 filters) on CUDA and the CPU demo
schedule elsewhere, so the first run on a GPU node gives the numbers to compare with nnU-Net/MONAI.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (tensors only, reset before timing) and
the process's peak resident memory elsewhere (since the process started, DataLoader workers excluded).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ..config import CPU_DEMO_OVERRIDES, Config, make_config
from ..utils import atomic_write, resolve_device

logger = logging.getLogger(__name__)


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_memory_bytes": int(rss), "peak_memory_kind": "process peak RSS"}


def _bench_config(preset: str, device: torch.device, small: Optional[bool], overrides: Optional[Dict[str, Any]]) -> Config:
    """The preset at its own size on CUDA, at the CPU demo size elsewhere (or as ``small`` says)."""
    small = device.type != "cuda" if small is None else small
    return make_config(preset, overrides={**(CPU_DEMO_OVERRIDES if small else {}), "device": str(device),
                                          **(overrides or {})})


def _write(out_dir: Path, name: str, result: Dict[str, Any]) -> Dict[str, Any]:
    with atomic_write(Path(out_dir) / name) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    gib = result["peak_memory_bytes"] / 2**30
    logger.info("%s on %s: %.2f %s/s, %.3g voxels/s, peak memory %.2f GiB (%s) -> %s", result["bench"],
                result["device"], result["per_second"], result["unit"], result["voxels_per_second"], gib,
                result["peak_memory_kind"], Path(out_dir) / name)
    return result


def run_step_bench_throughput(out_dir: Path, device: str = "auto", preset: str = "plbopt", steps: int = 20,
                              warmup: int = 3, small: Optional[bool] = None,
                              overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of ``preset``; writes ``OUT/step_throughput.json``.

    Voxels per step count every patch the subnets see: ``(batch_size + unlabeled batch) × prod(patch_size)``.
    ``overrides`` (e.g. ``num_workers``, ``amp``, ``batch_size``) apply on top of the size.
    """
    from ..data.dataset import load_dataset
    from ..data.phantom import make_phantom_dataset
    from ..engine.trainer import Trainer

    resolved = resolve_device(device)
    config = _bench_config(preset, resolved, small, dict(overrides or {}, iterations=warmup + steps,
                                                         validate_every=10**6, checkpoint_every=10**6))
    shape = tuple(max(p, s) for p, s in zip(config.patch_size, (48, 96, 96)))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_phantom_dataset(Path(tmp) / "data", n_labeled=2, n_unlabeled=2, n_test=0, shape=shape)
        trainer = Trainer(config, load_dataset(data_dir), Path(tmp) / "run")
        trainer.setup()
        try:
            for _ in range(warmup):
                trainer.train_step()
            _synchronize(trainer.device)
            _reset_peak_memory(trainer.device)
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            _synchronize(trainer.device)
            seconds = time.perf_counter() - started
        finally:
            trainer.loader.close()
            trainer.dist.close()
    patches = config.batch_size + (config.unlabeled_batch if config.uses_unlabeled else 0)
    voxels = patches * math.prod(config.patch_size) * steps
    return _write(out_dir, "step_throughput.json", {
        "bench": "train step", "device": str(trainer.device), "preset": preset, "steps": steps, "seconds": seconds,
        "per_second": steps / seconds, "unit": "steps", "voxels_per_second": voxels / seconds,
        **_peak_memory(trainer.device), "patch_size": list(config.patch_size), "base_filters": config.base_filters,
        "patches_per_step": patches, "amp": config.amp and trainer.device.type == "cuda",
        "num_workers": config.num_workers, "torch": torch.__version__})


def run_predict_bench(out_dir: Path, device: str = "auto", preset: str = "plbopt",
                      volume_shape: Sequence[int] = (128, 256, 256), num_classes: int = 14, repeats: int = 1,
                      small: Optional[bool] = None, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Time sliding-window inference of a random preprocessed ``volume_shape`` (Z, Y, X) volume with
    ``num_classes`` classes; writes ``OUT/predict_throughput.json``. One untimed window batch first
    lets cuDNN choose its kernels."""
    from ..engine.inference import Predictor, build_models

    resolved = resolve_device(device)
    config = _bench_config(preset, resolved, small, overrides)
    labels = {c: f"class{c}" for c in range(num_classes)}
    torch.manual_seed(0)
    states = [model.state_dict() for model in build_models(config, num_classes)]
    predictor = Predictor(config, labels, {}, states, device=str(resolved))
    volume = np.random.default_rng(0).random(tuple(volume_shape), dtype=np.float32)
    predictor.predict_probabilities(np.zeros(config.patch_size, dtype=np.float32))
    _synchronize(predictor.device)
    _reset_peak_memory(predictor.device)
    started = time.perf_counter()
    for _ in range(repeats):
        predictor.predict_probabilities(volume)
    _synchronize(predictor.device)
    seconds = (time.perf_counter() - started) / repeats
    return _write(out_dir, "predict_throughput.json", {
        "bench": "predict", "device": str(predictor.device), "preset": preset, "volume_shape": list(volume_shape),
        "num_classes": num_classes, "seconds_per_volume": seconds, "per_second": 1.0 / seconds, "unit": "volumes",
        "voxels_per_second": math.prod(volume_shape) / seconds, **_peak_memory(predictor.device),
        "patch_size": list(config.patch_size), "base_filters": config.base_filters, "overlap": config.sw_overlap,
        "sw_batch_size": config.sw_batch_size, "amp": config.amp and predictor.device.type == "cuda",
        "torch": torch.__version__})
