"""The training loop: DHC's dual-subnet baseline plus PLBOpt's Algorithm 1, and optional mean
teachers and strong views.

One step (``Trainer.train_step``), with ``x = cat(x_labeled, x_unlabeled)`` as in DHC:

1. both subnets see ``x`` → logits, decoder features (with ``unlabeled_strong_view`` they see the
   unlabeled patches jittered and CutMixed, ``method/perturb.py``; with ``labeled_copy_paste`` each
   labeled patch with a box of an unlabeled one and each unlabeled patch with a box of a labeled
   one, ``method/copypaste.py``, and learn the labels wherever a labeled patch is seen);
2. class weights: DiffDW from A's labeled logits, DistDW from B's unlabeled argmax (DHC);
3. ``L_sup``: weighted CE + Dice on the labeled part of the supervised subnets (B, or A and B);
4. pseudo labels = argmax of each subnet (of its mean teacher on the unlabeled part with
   ``teacher_ema_decay``; of a pass on the clean patches with a strong view), refined on the
   unlabeled part by superpixel entropy voting (eq. 1-2) — the superpixels come precomputed from
   preprocessing — then mixed as the strong view's image, or moved to where copy-paste shows them
   (labels wherever a labeled patch is seen);
5. ``L_unsup``: cross pseudo supervision with the *other* subnet's (refined) pseudo labels (DHC);
6. ``L_tri``: confidence-level triplet loss on each subnet's features and refined pseudo labels;
7. ``L_MC``: mutual correction on the unlabeled softmax outputs (eq. 9-10);
8. ``L = L_sup + r(t)·(w_cps·L_unsup + λ_tri·L_tri + λ_MC·L_MC)`` with the sigmoid ramp r (eq. 11).

Every random draw of step ``t`` is seeded from ``(seed, t)``, so a run resumed from a checkpoint
reproduces an uninterrupted one exactly on the CPU.

Under ``torchrun`` every process trains on its own patches (sampler stream = rank) and the ranks
stay in lockstep through :mod:`.distributed`: averaged gradients and BatchNorm statistics, rank 0's
DHC class-weight state, memory banks fed by all ranks, and a stop flag reduced at every step.
Rank 0 alone writes files, logs and validates.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import Config
from ..data.dataset import Case, DatasetSpec, with_sparse_as_unlabeled
from ..data.loader import StepLoader
from ..data.plan import format_plan, refine_homogeneity_reason, with_modality_defaults
from ..data.preprocess import UNANNOTATED, Preprocessed, PreprocessParams, preprocess_case
from ..data.sampling import PatchSampler
from ..errors import CheckpointError, ConfigError, TrainingInterrupted
from ..method.copypaste import CopyPaste, copy_paste
from ..method.dhc import DiffDW, DistDW, weighted_ce_loss, weighted_dice_ce_loss
from ..method.mutual import mutual_correction_loss
from ..method.perturb import StrongView, strong_view
from ..method.rampup import sigmoid_rampup
from ..method.refine import homogeneous_superpixels, refine_pseudo_labels, refinement_gain
from ..method.teacher import teacher_decay, update_teacher
from ..method.triplet import ConfidenceTripletLoss
from ..metrics import annotated_only, dice
from ..postprocess import largest_component_gain
from ..utils import compute_setup, resolve_device, seed_everything, step_generator, torch_backend_flags
from .checkpoint import load_checkpoint, load_latest_good, save_checkpoint
from .distributed import init_from_env, rank_device, rank_seed
from .events import EventWriter
from .inference import (build_models, load_subnet_weights, refine_allowed_classes, refine_prediction,
                        sliding_window_member_probabilities)
from .runcontrol import RUN_LOCK_NAME, STOP_FILE_NAME, RunLock, stop_requested
from .tensorboard import TENSORBOARD_DIR, TensorBoardSink, require_tensorboard

logger = logging.getLogger(__name__)


def dataset_for_training(config: Config, dataset: DatasetSpec) -> DatasetSpec:
    """The cases training under ``config`` reads from ``dataset``: with ``sparse_as_unlabeled`` and a
    preset that uses unlabeled data, the sparsely annotated training cases also join the unlabeled
    ones (:func:`~PLBOptCore.data.dataset.with_sparse_as_unlabeled`, which reads the training
    labels; a spec that holds the copies already is returned as it is)."""
    if config.sparse_as_unlabeled and config.uses_unlabeled:
        return with_sparse_as_unlabeled(dataset)
    return dataset


def lacks_unlabeled_cases(config: Config, dataset: DatasetSpec) -> bool:
    """True when ``config`` trains on unlabeled cases and ``dataset`` gives it none (no unlabeled
    case listed, and none made of sparse labels where ``sparse_as_unlabeled`` asks for them)."""
    # (the sparse cases' labels are read only where no unlabeled case is listed)
    return config.uses_unlabeled and not dataset.unlabeled and not dataset_for_training(config, dataset).unlabeled


def check_training_inputs(config: Config, dataset: DatasetSpec, run_dir: Path,
                          init_from: Optional[Path]) -> Optional[Dict[str, Any]]:
    """Refuse, before anything is written (the plan's fingerprint, the run folder, the
    preprocessing cache), what would otherwise fail after they exist. Returns the stored
    configuration of the ``init_from`` checkpoint (None without one), so it is read once."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a folder; choose another run folder")
    if lacks_unlabeled_cases(config, dataset):
        raise ConfigError(f"{dataset.root}: preset {config.preset!r} needs unlabeled cases; "
                          "dataset.json has none" + (" and no training label holds the ignore label"
                                                     if config.sparse_as_unlabeled else "")
                          + " (use --preset supervised)")
    if config.tensorboard:
        require_tensorboard()
    if init_from is not None:
        state = load_checkpoint(init_from)
        load_subnet_weights(build_models(config, dataset.num_classes), state["models"], init_from)
        if not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{init_from}: checkpoint lacks its configuration; fine-tuning needs it")
        return state["config"]
    return None

ProgressCallback = Callable[[Dict[str, Any]], None]
INIT_STREAM = 2**40  # seed stream of the weight initialisation, beyond any step number
# EMA momentum of the refinement self-check: a gain must stay negative over ~20 steps to switch a
# class off, so a single unlucky patch does not.
SELF_CHECK_MOMENTUM = 0.95


def _is_run_output(path: Path) -> bool:
    """Whether ``path`` in a run folder is something a run wrote, not run control (the lock, a stop
    request) or the temporary of an atomic write, which is never read. Rank 0 writes its lock through
    such a temporary while the other ranks judge the folder, so counting it failed torchrun jobs."""
    return path.name not in (RUN_LOCK_NAME, STOP_FILE_NAME) and not path.name.startswith(".tmp-")


class Trainer:
    """Trains one run folder. ``fit()`` returns the path of the final checkpoint.

    Args:
        config: validated :class:`Config`.
        dataset: validated :class:`DatasetSpec` (labeled ``training``, ``unlabeled``, ``validation``).
        run_dir: output folder (config.json, dataset.json, events.jsonl, checkpoints/).
        resume: continue from ``run_dir/checkpoints/last.pt``.
        overwrite: allow a non-empty ``run_dir`` without resuming (its old outputs are removed).
        init_from: checkpoint whose subnet weights initialise this run (fine-tuning, e.g. retrain
            after the clinician corrected pseudo labels). Step and optimiser start fresh.
        progress: called with every ``preprocess``/``train``/``validation`` event record.
        should_stop: polled at every step boundary; True stops with a resumable checkpoint.
        cache_dir: preprocessing cache (default ``<dataset>/.plbopt_cache``).
        plan: the preprocessing plan (:func:`PLBOptCore.data.plan.plan_config`) whose values
            ``config`` holds: logged and written to ``plan.json`` (None on resume: it is there).

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), the constructor joins the process group and
    ``fit()`` leaves it; ``progress`` and the progress bar are used on rank 0 only.
    """

    def __init__(self, config: Config, dataset: DatasetSpec, run_dir: Path, resume: bool = False,
                 overwrite: bool = False, init_from: Optional[Path] = None,
                 progress: Optional[ProgressCallback] = None, should_stop: Optional[Callable[[], bool]] = None,
                 cache_dir: Optional[Path] = None, show_progress_bar: bool = False,
                 plan: Optional[Dict[str, Any]] = None) -> None:
        self.plan = plan
        # here, not in api.train, so that every way of building a trainer honours the setting
        self.dataset = dataset = dataset_for_training(config, dataset)
        # settings left to the modality are decided before config.json is written: every consumer reads them there
        self.modality_decided = config.refine_homogeneity is None
        self.config = config = with_modality_defaults(config, dataset.modality)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.init_from = Path(init_from) if init_from else None
        self.should_stop = should_stop
        self.cache_dir = Path(cache_dir) if cache_dir else Path(dataset.root) / ".plbopt_cache"
        self._stop_signal: Optional[str] = None
        self._run_lock: Optional[RunLock] = None
        self.last_step_timings: Dict[str, float] = {}
        self.time_phases = False  # True: last_step_timings are exact on CUDA too (synchronises every phase)
        device = resolve_device(config.device)
        self.dist = init_from_env(device)
        try:
            self.device = rank_device(device, self.dist)
            self._check_inputs()
            if self.dist.is_main:  # one trainer per run folder: taken before anything in it changes
                self._run_lock = RunLock(self.run_dir).acquire()
            self._prepare_run_dir(overwrite)
        except BaseException:
            if self._run_lock is not None:
                self._run_lock.release()
            self.dist.close()
            raise
        self.progress = progress if self.dist.is_main else None
        self.show_progress_bar = show_progress_bar and self.dist.is_main
        self.num_classes = dataset.num_classes
        sinks = [TensorBoardSink(self.run_dir / TENSORBOARD_DIR)] if config.tensorboard and self.dist.is_main else []
        self.events = EventWriter(self.run_dir, enabled=self.dist.is_main, sinks=sinks)

    # ------------------------------------------------------------------ set-up
    def _check_inputs(self) -> None:
        check_training_inputs(self.config, self.dataset, self.run_dir, self.init_from)

    def _prepare_run_dir(self, overwrite: bool) -> None:
        run_dir = self.run_dir
        if run_dir.resolve() == Path(self.dataset.root).resolve():
            raise ConfigError(f"{run_dir}: the run folder must not be the dataset folder")
        existing = run_dir.exists() and any(_is_run_output(p) for p in run_dir.iterdir())
        if self.resume:
            if not (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "checkpoints" / "last.pt.prev").exists():
                raise ConfigError(f"{run_dir}: nothing to resume (no checkpoints/last.pt)")
        elif existing and not overwrite:
            raise ConfigError(f"{run_dir}: run folder is not empty; use --resume to continue it or --overwrite to start again")
        # Every rank has judged the folder above; none may look at it while rank 0 changes it.
        self.dist.barrier()
        if not self.dist.is_main:
            return
        if existing and not self.resume:
            for name in ("events.jsonl", "checkpoints", "config.json", "dataset.json", "plan.json", TENSORBOARD_DIR):
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        # A killed run may leave the temporaries of an unfinished atomic write; they are never
        # read (final names are only ever os.replace'd into place), so they can go.
        for folder in (run_dir, run_dir / "checkpoints"):
            for stale in folder.glob(".tmp-*") if folder.is_dir() else ():
                stale.unlink()
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    def _write_run_files(self) -> None:
        from ..utils import atomic_write

        with atomic_write(self.run_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(self.config.to_dict(), indent=2))
        labels = {str(k): v for k, v in self.dataset.labels.items()}
        colors = {str(k): list(v) for k, v in self.dataset.colors.items()}
        stored: Dict[str, Any] = {"labels": labels, "colors": colors, "source": str(self.dataset.root)}
        if self.dataset.ignore_label is not None:
            # the network's classes only; the value of unannotated voxels in the dataset's labels,
            # for plbopt evaluate --labels RUN/dataset.json
            stored["ignore_label"] = self.dataset.ignore_label
        with atomic_write(self.run_dir / "dataset.json") as tmp:
            tmp.write_text(json.dumps(stored, indent=2))
        if self.plan is not None:
            with atomic_write(self.run_dir / "plan.json") as tmp:
                tmp.write_text(json.dumps(self.plan, indent=2))
            for line in format_plan(self.plan, self.config):
                logger.info(line)
        if self.modality_decided and self.config.refine:
            logger.info(f"refine_homogeneity = {self.config.refine_homogeneity:g}  "
                        f"({refine_homogeneity_reason(self.dataset.modality)})")

    def _preprocess(self, jobs: List[Tuple[Case, bool]]) -> List[Preprocessed]:
        """Preprocess (or read from the cache) each ``(case, with_superpixels)``; every case is
        reported as a ``preprocess`` record (events.jsonl, ``progress``) and on the progress bar,
        because building the cache of a large dataset takes minutes a GUI would otherwise be silent."""
        params = PreprocessParams.from_config(self.config)
        bar = None
        if self.show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="preprocess", unit="case", dynamic_ncols=True)
        prepared = []
        try:
            for index, (case, with_superpixels) in enumerate(jobs, start=1):
                started = time.perf_counter()
                prepared.append(preprocess_case(case, params, self.cache_dir, with_superpixels,
                                                self.dataset.ignore_label))
                record = self.events.write("preprocess", case=case.name, index=index, total=len(jobs),
                                           seconds=round(time.perf_counter() - started, 3))
                if self.progress:
                    self.progress(record)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return prepared

    def _load_data(self) -> None:
        cfg = self.config
        validation = [case for case in self.dataset.validation if case.label is not None]
        unlabeled_cases = self.dataset.unlabeled if cfg.uses_unlabeled else []
        self_check = cfg.refine and cfg.refine_self_check  # refinement is also tried where labels are known
        # every run checks on its validation cases what `plbopt refine` would do to its predictions,
        # also a run that never refines in training (DHC, supervised): the gate of its pseudo labels
        prepared = self._preprocess([(case, self_check) for case in self.dataset.training]
                                    + [(case, cfg.refine_self_check) for case in validation]
                                    + [(case, cfg.refine) for case in unlabeled_cases])
        n_labeled, n_validation = len(self.dataset.training), len(validation)
        labeled = prepared[:n_labeled]
        self.validation_cases = prepared[n_labeled:n_labeled + n_validation]
        # stream = rank: each process draws its own patches; rank 0 draws those of a plain run
        self.labeled_sampler = PatchSampler(labeled, cfg.patch_size, cfg.batch_size, self.num_classes,
                                            cfg.foreground_oversample, cfg.augment, cfg.seed, stream=self.dist.rank,
                                            flip_axes=cfg.flip_axes, rotate90=cfg.rotate90)
        self.unlabeled_sampler = None
        if cfg.uses_unlabeled:
            unlabeled = prepared[n_labeled + n_validation:]
            # A different stream from the labeled sampler: unlabeled crops are not labeled crops' twins.
            self.unlabeled_sampler = PatchSampler(unlabeled, cfg.patch_size, cfg.unlabeled_batch, self.num_classes,
                                                  0.0, cfg.augment, cfg.seed + 7919, stream=self.dist.rank,
                                                  flip_axes=cfg.flip_axes, rotate90=cfg.rotate90)
        self.loader = StepLoader(self.labeled_sampler, self.unlabeled_sampler, cfg.iterations, cfg.num_workers,
                                 pin_memory=self.device.type == "cuda")
        counts = torch.zeros(self.num_classes, dtype=torch.float64)
        for case in labeled:
            annotated = case.label[case.label >= 0]  # DistDW's initial weights count annotated voxels only
            counts += torch.bincount(torch.from_numpy(annotated.astype(np.int64)),
                                     minlength=self.num_classes)[: self.num_classes].double()
        self.label_counts = counts.float()

    def _build(self) -> None:
        cfg = self.config
        seed_everything(cfg.seed, INIT_STREAM)  # two independent Kaiming inits, reproducible
        self.models = [m.to(self.device) for m in build_models(cfg, self.num_classes)]
        self.optimizers = [self._make_optimizer(m) for m in self.models]
        use_amp = cfg.amp and self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.diffdw = DiffDW(self.num_classes, cfg.diffdw_momentum)
        self.distdw = DistDW(self.num_classes, cfg.distdw_momentum)
        self.distdw.init_weights(self.label_counts)
        feature_dim = cfg.projection_dim or cfg.base_filters
        # banks receive every rank's candidates, so they hold the same entries on every rank
        share = self.dist.gather_rows if self.dist.enabled else None
        self.triplet_banks = [ConfidenceTripletLoss(cfg.triplet_levels, cfg.triplet_capacity, feature_dim,
                                                    cfg.triplet_margin, cfg.triplet_max_anchors,
                                                    cfg.triplet_max_candidates, mining=cfg.triplet_mining, share=share)
                              for _ in range(1 if cfg.triplet_banks == "shared" else len(self.models))]
        # with shared banks both subnets use the one instance: each mines what both pushed
        self.triplet_losses = [self.triplet_banks[i % len(self.triplet_banks)] for i in range(len(self.models))]
        # running mean of refinement's per-class Dice gain on labeled patches (the self-check), and
        # its gain on the validation cases at the latest validation (None until measured)
        self.refine_gain = torch.zeros(self.num_classes)
        self.refine_gain_validation: Optional[torch.Tensor] = None
        # per class, the validation Dice gain of keeping only its largest component (postprocess.py)
        self.largest_component_gain_validation: Optional[torch.Tensor] = None
        self.step = 0
        self.best_metric = -math.inf
        if self.init_from is not None:
            load_subnet_weights(self.models, load_checkpoint(self.init_from)["models"], self.init_from)
        # each subnet's mean teacher (teacher_ema_decay), which labels the unlabeled patches
        self.teachers = ([copy.deepcopy(m).requires_grad_(False) for m in self.models]
                         if cfg.teacher_ema_decay is not None and cfg.uses_unlabeled else [])

    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=True)
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "best_metric": self.best_metric,
            "config": self.config.to_dict(),
            "labels": {str(k): v for k, v in self.dataset.labels.items()},
            "colors": {str(k): list(v) for k, v in self.dataset.colors.items()},
            "models": [m.state_dict() for m in self.models],
            **({"teachers": [t.state_dict() for t in self.teachers]} if self.teachers else {}),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "diffdw": self.diffdw.state_dict(),
            "distdw": self.distdw.state_dict(),
            "triplet": [bank.state_dict() for bank in self.triplet_banks],  # a shared bank once
            "refine_gain": self.refine_gain.clone(),
            **({} if self.refine_gain_validation is None
               else {"refine_gain_validation": self.refine_gain_validation.clone()}),
            **({} if self.largest_component_gain_validation is None
               else {"largest_component_gain_validation": self.largest_component_gain_validation.clone()}),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for model, weights in zip(self.models, state["models"]):
            model.load_state_dict(weights)
        for teacher, weights in zip(self.teachers, state["teachers"] if self.teachers else []):
            teacher.load_state_dict(weights)
        for optimizer, opt_state in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(opt_state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.diffdw.load_state_dict(state["diffdw"])
        self.distdw.load_state_dict(state["distdw"])
        # zip: a shared bank saved once per subnet (before it was saved once) loads from its first copy
        for bank, bank_state in zip(self.triplet_banks, state["triplet"]):
            bank.load_state_dict(bank_state)
        if "refine_gain" in state:  # absent from checkpoints of earlier versions
            self.refine_gain = state["refine_gain"].float().cpu()
        if "refine_gain_validation" in state:
            self.refine_gain_validation = state["refine_gain_validation"].float().cpu()
        if "largest_component_gain_validation" in state:
            self.largest_component_gain_validation = state["largest_component_gain_validation"].float().cpu()
        self.step = int(state["step"])
        self.best_metric = float(state["best_metric"])

    def save(self, name: str = "last.pt") -> Path:
        """Write ``checkpoints/<name>`` (rank 0 only: the ranks hold identical state)."""
        path = self.run_dir / "checkpoints" / name
        if self.dist.is_main:
            save_checkpoint(path, self.state_dict())
            self.events.write("checkpoint", step=self.step, path=str(path))
        return path

    # ------------------------------------------------------------------ one step
    def learning_rate(self, step: int) -> float:
        return self.config.lr * (1.0 - step / self.config.iterations) ** self.config.poly_power

    def train_step(self) -> Dict[str, float]:
        """Run step ``self.step`` (0-based) and return its loss record."""
        cfg, step = self.config, self.step
        timings: Dict[str, float] = {}
        self._lap_time = time.perf_counter()
        own_seed = rank_seed(cfg.seed, self.dist.rank)
        seed_everything(own_seed, step)  # dropout masks and mining draws of this step
        batch = self.loader.batch(step)
        labeled = batch["labeled"]
        x_l = labeled["image"].to(self.device, non_blocking=True)
        y_l = labeled["label"].to(self.device, non_blocking=True)
        n_l = x_l.shape[0]
        # the step's own draws (strong view or copy-paste boxes, then triplet mining), reproducible on resume
        generator = step_generator(own_seed, step)
        view: Optional[StrongView] = None
        paste: Optional[CopyPaste] = None
        if self.unlabeled_sampler is not None:
            unlabeled = batch["unlabeled"]
            x = torch.cat([x_l, unlabeled["image"].to(self.device, non_blocking=True)])
            if cfg.unlabeled_strong_view and cfg.uses_unlabeled:
                view = strong_view(x[n_l:], generator)
            elif cfg.labeled_copy_paste and cfg.uses_unlabeled:
                paste = copy_paste(n_l, x.shape[0] - n_l, tuple(x.shape[2:]), generator)
        else:
            x = x_l
        # what the subnets see, and the labels of it: the labeled patches, the strong view of the
        # unlabeled ones, or both kinds copy-pasted (labeled wherever a labeled patch is seen)
        x_seen, y_seen = x, y_l
        if view is not None:
            x_seen = torch.cat([x_l, view.image])
        elif paste is not None:
            x_seen = paste.mix(x_l, x[n_l:])
            y_seen = paste.mix(y_l, y_l.new_full((x.shape[0] - n_l,) + tuple(y_l.shape[1:]), UNANNOTATED))
        timings["data"] = self._lap()

        lr = self.learning_rate(step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        for model in self.models + self.teachers:
            model.train()

        with self.autocast():
            outputs = [self._forward(model, x_seen, n_l) for model in self.models]
        logits = [out[0].float() for out in outputs]
        features = [out[1].float() for out in outputs]
        timings["forward"] = self._lap()

        record = dict.fromkeys(("loss_sup", "loss_unsup", "loss_tri", "loss_mc"), x.new_zeros(()))
        changed_fraction, gain = 0.0, None
        ramp = sigmoid_rampup(step, cfg.rampup_iterations if cfg.rampup_iterations is not None else cfg.iterations)
        has_unlabeled = x.shape[0] > n_l
        if cfg.class_weighting:
            self.diffdw.update(logits[0][:y_seen.shape[0]].detach(), y_seen)
            if cfg.dual_subnets and has_unlabeled:
                self.distdw.update(logits[1][n_l:].detach())
            self._share_class_weights()
        weights = self.class_loss_weights() if cfg.class_weighting else (None, None)
        record["loss_sup"] = self._supervised_loss(logits, y_seen, weights)
        if cfg.dual_subnets:
            probs = [torch.softmax(lg, dim=1) for lg in logits]
            target_probs = self._target_probabilities(probs, x, n_l, separate_pass=view is not None or paste is not None)
            confidence, pseudo = map(list, zip(*(p.detach().max(dim=1) for p in target_probs)))
            timings["losses_sup"] = self._lap()
            if cfg.refine and self.unlabeled_sampler is not None and step >= cfg.refine_start * cfg.iterations:
                changed_fraction, gain = self._refine_pseudo_labels(target_probs, pseudo, batch, y_seen[:n_l],
                                                                    None if paste is None else paste.box[:n_l])
            if view is not None:  # targets of the clean patches, refined there, mixed as the image
                for targets in (target_probs, confidence, pseudo):
                    for i, t in enumerate(targets):
                        targets[i] = torch.cat([t[:n_l], view.mix(t[n_l:])])
            elif paste is not None:
                self._paste_targets(paste, y_seen, probs, target_probs, confidence, pseudo)
            timings["refine"] = self._lap()
            if cfg.cps_weight > 0:
                cps_a, cps_b = weights if cfg.weighted_cps else (None, None)
                record["loss_unsup"] = (weighted_ce_loss(logits[0], pseudo[1], cps_a)
                                        + weighted_ce_loss(logits[1], pseudo[0], cps_b))
            timings["cps"] = self._lap()
            if cfg.triplet and has_unlabeled:
                if cfg.triplet_confidence == "refined":
                    confidence = [p.detach().gather(1, label.unsqueeze(1)).squeeze(1)
                                  for p, label in zip(target_probs, pseudo)]
                record["loss_tri"] = sum(
                    triplet(features[i][n_l:], pseudo[i][n_l:], confidence[i][n_l:], generator)
                    for i, triplet in enumerate(self.triplet_losses))
            timings["triplet"] = self._lap()
            if cfg.mutual_correction and has_unlabeled:
                targets = (pseudo[0][n_l:], pseudo[1][n_l:]) if cfg.mc_target == "refined" else None
                record["loss_mc"] = mutual_correction_loss(probs[0][n_l:], probs[1][n_l:], cfg.mc_tau,
                                                           reduction=cfg.mc_reduction,
                                                           teacher=cfg.mc_mode == "teacher", targets=targets)

        loss = record["loss_sup"] + ramp * (cfg.cps_weight * record["loss_unsup"] + cfg.lambda_triplet * record["loss_tri"]
                                            + cfg.lambda_mc * record["loss_mc"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate (--set lr=...)")
        self._update(loss)
        for teacher, model in zip(self.teachers, self.models):
            update_teacher(teacher, model, teacher_decay(cfg.teacher_ema_decay, step))
        timings["backward"] = self._lap()
        timings["total"] = sum(timings.values())
        self.last_step_timings = timings
        self.step += 1
        values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in record.items()},
                  "refine_changed_fraction": changed_fraction}
        if gain is not None:
            values.update({f"refine_gain/{c}": float(g) for c, g in enumerate(gain.tolist())})
        values = self.dist.mean_values(values, self.device)
        if gain is not None:  # one {class name: gain} entry in the log record
            values["refine_gain"] = {self.dataset.labels[c]: values.pop(f"refine_gain/{c}")
                                     for c in range(1, self.num_classes)}
            values.pop("refine_gain/0")
        if cfg.class_weighting:  # identical on every rank (_share_class_weights)
            names = [self.dataset.labels[c] for c in range(self.num_classes)]
            values["class_weights"] = {subnet: dict(zip(names, w.tolist())) for subnet, w in zip(("a", "b"), weights)}
        return {**values, "lr": lr, "ramp": ramp}

    def class_loss_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(C,) class weights of subnet A's (DiffDW) and B's (DistDW) losses, at least ``class_weight_floor``."""
        floor = self.config.class_weight_floor
        return self.diffdw.weights.clamp_min(floor), self.distdw.weights.clamp_min(floor)

    def _supervised_loss(self, logits: List[torch.Tensor], target: torch.Tensor,
                         weights: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]) -> torch.Tensor:
        """DHC's weighted Dice + CE on the labeled part: subnet B with B's weights, plus subnet A with
        A's when ``supervised_subnets`` is ``AB``; a single subnet with its own weights.

        Args:
            logits: per subnet (B, C, Z, Y, X), labeled patches first; target: (B_l, Z, Y, X) labels.
            weights: (C,) class weights of A and B, or ``(None, None)`` without class weighting.
        """
        n_l = target.shape[0]
        if not self.config.dual_subnets:
            return weighted_dice_ce_loss(logits[0][:n_l], target, weights[0])
        loss = weighted_dice_ce_loss(logits[1][:n_l], target, weights[1])
        if self.config.supervised_subnets == "AB":
            loss = loss + weighted_dice_ce_loss(logits[0][:n_l], target, weights[0])
        return loss

    def _refine_pseudo_labels(self, probs: List[torch.Tensor], pseudo: List[torch.Tensor],
                              batch: Dict[str, Dict[str, torch.Tensor]], target: torch.Tensor,
                              pasted: Optional[torch.Tensor] = None) -> Tuple[float, Optional[torch.Tensor]]:
        """Refine both subnets' unlabeled pseudo labels in place (``pseudo[i][B_l:]``), only the
        classes whose refinement gain is ≥ 0 on the labeled patches (the self-check, updated first).

        Args:
            probs: per subnet (B, C, Z, Y, X) softmax, labeled patches first; pseudo: per subnet
                (B, Z, Y, X) argmax; batch: the step's batch; target: (B_l, Z, Y, X) labels.
            pasted: (B_l, Z, Y, X) bool, the labeled patches' voxels that showed another patch
                (copy-paste): the self-check's superpixels leave them out (its target does too).

        Returns:
            the fraction of unlabeled voxels with a superpixel that changed, and the (C,) self-check
            gain of refinement as applied this step (None without the self-check).
        """
        cfg, n_l = self.config, target.shape[0]
        allowed = gain = None
        if cfg.refine_self_check:
            superpixels = self._refinable(batch["labeled"])
            if pasted is not None:
                superpixels = superpixels.masked_fill(pasted.to(superpixels.device), -1)
            gain = self._self_check([p[:n_l].detach() for p in probs], [p[:n_l] for p in pseudo], superpixels, target)
            allowed = refine_allowed_classes(cfg, self.refine_gain)
            gain = gain * allowed
        superpixels = self._refinable(batch["unlabeled"])
        # both subnets in one call (batch items never mix); both halves have the same
        # superpixels, so the joint changed fraction is the mean of the two
        refined, changed_fraction = refine_pseudo_labels(
            torch.cat([p[n_l:].detach() for p in probs]), torch.cat([p[n_l:] for p in pseudo]),
            torch.cat([superpixels, superpixels]), cfg.refine_tau, cfg.refine_entropy, cfg.refine_mode, allowed)
        pseudo[0][n_l:], pseudo[1][n_l:] = refined.chunk(2)
        return changed_fraction, gain

    def _paste_targets(self, paste: CopyPaste, y_seen: torch.Tensor, probs: List[torch.Tensor],
                       target_probs: List[torch.Tensor], confidence: List[torch.Tensor],
                       pseudo: List[torch.Tensor]) -> None:
        """Replace each subnet's targets in place by those of the copy-pasted patches it saw
        (:meth:`CopyPaste.targets`): a label is a one-hot probability of confidence 1; the unlabeled
        patches' values come from the clean pass, refined.

        Args:
            paste: the step's copy-paste; y_seen: (B, Z, Y, X) labels of the seen patches (-1 none);
            probs: per subnet (B, C, Z, Y, X) softmax of the seen patches; target_probs, confidence,
            pseudo: per subnet (B, C, Z, Y, X), (B, Z, Y, X), (B, Z, Y, X), the unlabeled part from
            the clean pass.
        """
        n_l, annotated = paste.n_labeled, y_seen >= 0
        label = y_seen.clamp_min(0)
        one_hot = torch.nn.functional.one_hot(label, self.num_classes).movedim(-1, 1)
        for i, seen in enumerate(probs):
            seen = seen.detach()
            seen_confidence, seen_label = seen.max(dim=1)
            target_probs[i] = paste.targets(one_hot.to(seen.dtype), seen, target_probs[i][n_l:], annotated)
            confidence[i] = paste.targets(torch.ones_like(seen_confidence), seen_confidence, confidence[i][n_l:],
                                          annotated)
            pseudo[i] = paste.targets(label, seen_label, pseudo[i][n_l:], annotated)

    def _target_probabilities(self, probs: List[torch.Tensor], x: torch.Tensor, n_labeled: int,
                              separate_pass: bool = False) -> List[torch.Tensor]:
        """Per subnet the (B, C, Z, Y, X) softmax that pseudo labels come from: the subnet's own
        (``probs``); with mean teachers its teacher's on the unlabeled patches; with
        ``separate_pass`` (a strong view) a pass without gradients of the teacher, or else of the
        subnet, on the clean patches ``x``. The labeled patches keep the subnet's, which
        refinement's self-check scores against their labels."""
        if not (self.teachers or separate_pass) or x.shape[0] == n_labeled:
            return probs
        with torch.no_grad(), self.autocast():
            logits = [net(x[n_labeled:])[0].float() for net in self.teachers or self.models]
        return [torch.cat([p[:n_labeled].detach(), torch.softmax(lg, dim=1)]) for p, lg in zip(probs, logits)]

    def _update(self, loss: torch.Tensor) -> None:
        """Backward pass and one optimiser step of every subnet (gradients and BatchNorm statistics
        averaged over the ranks of a torchrun job)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for model in self.models:
            self.dist.average_gradients(model)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for model in self.models:
            self.dist.average_buffers(model)

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, n_labeled: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of ``x`` = labeled then unlabeled patches (B, 1, Z, Y, X).

        With ``separate_batch_norm`` the two parts go through the subnet in two passes, so that
        BatchNorm normalises each with its own batch statistics (DHC concatenates them; see
        docs/METHOD.md for why that made every test prediction mostly organ here).
        """
        if not self.config.separate_batch_norm or x.shape[0] == n_labeled:
            return model(x)
        labeled, unlabeled = model(x[:n_labeled]), model(x[n_labeled:])
        return torch.cat([labeled[0], unlabeled[0]]), torch.cat([labeled[1], unlabeled[1]])

    def _refinable(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, Z, Y, X) superpixel ids of a sampled batch on the device, the heterogeneous ones set
        to -1 (none) when ``refine_homogeneity`` restricts refinement to homogeneous superpixels."""
        superpixels = batch["superpixels"].to(self.device, non_blocking=True)
        if self.config.refine_homogeneity > 0:
            superpixels = homogeneous_superpixels(superpixels, batch["image"].to(self.device), batch["noise_sigma"],
                                                  self.config.refine_homogeneity)
        return superpixels

    @torch.no_grad()
    def _self_check(self, probs: List[torch.Tensor], pseudo: List[torch.Tensor], superpixels: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        """Refine both subnets' predictions of the labeled patches with every class allowed, score
        the change per class against the labels, and update the running mean that gates each class.

        Args:
            probs: per subnet (B_l, C, Z, Y, X) softmax; pseudo: per subnet (B_l, Z, Y, X) argmax;
            superpixels: (B_l, Z, Y, X) ids of the labeled patches; target: (B_l, Z, Y, X) labels.

        Returns:
            (C,) this step's per-class gain (CPU float32; background always 0).
        """
        cfg = self.config
        before = torch.cat(pseudo)
        refined, _ = refine_pseudo_labels(torch.cat(probs), before, torch.cat([superpixels] * len(probs)),
                                          cfg.refine_tau, cfg.refine_entropy, cfg.refine_mode)
        gain = refinement_gain(before, refined, torch.cat([target] * len(probs)), self.num_classes).cpu()
        gain[0] = 0.0
        gain = self.dist.mean_tensor(gain.to(self.device)).cpu()
        self.refine_gain = SELF_CHECK_MOMENTUM * self.refine_gain + (1 - SELF_CHECK_MOMENTUM) * gain
        return gain

    def _share_class_weights(self) -> None:
        """Give every rank rank 0's DiffDW/DistDW state, so all ranks weight the losses alike.

        Each rank updated its trackers from its own patches; their EMAs (momentum 0.98-0.99)
        average over many steps, so following one rank's statistics loses little.
        """
        if not self.dist.enabled:
            return
        for tracker in (self.diffdw, self.distdw):
            state = {key: value.to(self.device) for key, value in tracker.state_dict().items()}
            self.dist.broadcast_tensors(list(state.values()))
            tracker.load_state_dict(state)

    def _lap(self) -> float:
        """Seconds since the previous lap. CUDA runs asynchronously, so only with ``time_phases``
        (the benchmarks) does it synchronise to make the phase times real; training does not wait."""
        if self.time_phases and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self._lap_time = now - self._lap_time, now
        return elapsed

    # ------------------------------------------------------------------ validation
    def validate(self) -> Optional[Dict[str, Any]]:
        """Validate on rank 0 while the other ranks wait; the record on rank 0, else None."""
        record = self._validate() if self.dist.is_main else None
        self.dist.barrier()
        return record

    def _validation_refine_gain(self, case: Preprocessed, probs: torch.Tensor,
                                unrefined_dice: List[float]) -> List[float]:
        """Per foreground class, the Dice change refinement with every class allowed makes to the
        ensemble's prediction of a validation case: what ``plbopt refine`` would do to it. Kept with
        the checkpoint, it gates refinement at inference only: as a gate of the training pseudo
        labels it did not earn its place (docs/METHOD.md).

        Args:
            case: the validation case; probs: (C, Z, Y, X) the ensemble's softmax of it;
            unrefined_dice: per foreground class 1..C-1, the Dice of ``probs``' argmax (as validated).
        """
        sigma = case.noise_sigma if case.noise_sigma is not None else 0.0
        refined, _ = refine_prediction(self.config, case.image, probs,
                                       torch.from_numpy(case.superpixels.astype(np.int64)), sigma)
        refined, label = annotated_only(refined.cpu().numpy(), case.label, UNANNOTATED)
        return [dice(refined == c, label == c) - before for c, before in enumerate(unrefined_dice, 1)]

    @torch.no_grad()
    def _validate(self) -> Optional[Dict[str, Any]]:
        if not self.validation_cases:
            return None
        for model in self.models:
            model.eval()
        # the ensemble decides best.pt; each subnet alone shows whether one of them is failing
        members = {"both": range(len(self.models))}
        if len(self.models) == 2:
            members.update(a=[0], b=[1])
        per_class = {member: {name: [] for c, name in self.dataset.labels.items() if c > 0} for member in members}
        refine_gains, component_gains = [], []
        for case in self.validation_cases:
            volume = torch.from_numpy(np.array(case.image))  # a copy: cached volumes are read-only memory maps
            # one pass of each subnet gives the ensemble's and each subnet's probabilities
            member_probs = sliding_window_member_probabilities(self.models, members, volume, self.config.patch_size,
                                                               self.num_classes, self.config.sw_overlap,
                                                               self.config.sw_batch_size, self.device,
                                                               amp=self.config.amp)
            for member, probs in member_probs.items():
                full_prediction = probs.argmax(0).numpy()
                prediction, label = annotated_only(full_prediction, case.label, UNANNOTATED)
                case_dice = [dice(prediction == c, label == c) for c in range(1, self.num_classes)]
                for name, value in zip(per_class[member], case_dice):
                    per_class[member][name].append(value)
                if member == "both":
                    component_gains.append(largest_component_gain(full_prediction, case.label, self.num_classes,
                                                                  UNANNOTATED))
                    if self.config.refine_self_check:
                        refine_gains.append(self._validation_refine_gain(case, probs, case_dice))
        scores = {member: {name: float(np.mean(values)) for name, values in classes.items()}
                  for member, classes in per_class.items()}
        means = {member: float(np.mean(list(s.values()))) if s else 0.0 for member, s in scores.items()}
        mean_dice = means["both"]
        subnets = {member: {"mean_dice": means[member], "dice": scores[member]}
                   for member in members if member != "both"}
        extra: Dict[str, Any] = {"subnets": subnets} if subnets else {}
        if refine_gains:
            gain = np.mean(refine_gains, axis=0)
            self.refine_gain_validation = torch.from_numpy(np.concatenate([[0.0], gain])).float()
            extra["refine_gain"] = {self.dataset.labels[c]: float(g) for c, g in enumerate(gain, 1)}
        # saved with best.pt below: the predictor postprocesses as this checkpoint's validation says
        gain = np.mean(component_gains, axis=0)
        self.largest_component_gain_validation = torch.from_numpy(np.concatenate([[0.0], gain])).float()
        extra["largest_component_gain"] = {self.dataset.labels[c]: float(g) for c, g in enumerate(gain, 1)}
        record = self.events.write("validation", step=self.step, dice=scores["both"], mean_dice=mean_dice, **extra)
        if self.progress:
            self.progress(record)
        if mean_dice > self.best_metric:
            self.best_metric = mean_dice
            save_checkpoint(self.run_dir / "checkpoints" / "best.pt", self.state_dict())
        return record

    # ------------------------------------------------------------------ loop
    def setup(self) -> None:
        """Write the run files, preprocess the data, build subnets and losses, restore on resume."""
        if self.dist.is_main:
            self._write_run_files()
        self._load_data()
        self._build()
        if self.resume:  # every rank reads the same file, falling back to last.pt.prev alike
            self.load_state_dict(load_latest_good(self.run_dir / "checkpoints" / "last.pt"))
        for model in self.models:  # as DDP does: one identical starting point whatever happened above
            self.dist.broadcast_module(model)

    def fit(self) -> Path:
        """Train to ``config.iterations``; returns the final checkpoint's path."""
        try:
            with torch_backend_flags(self.config.deterministic):
                return self._fit()
        finally:
            if self._run_lock is not None:
                self._run_lock.release()
            self.dist.close()

    def _fit(self) -> Path:
        cfg = self.config
        self.setup()
        self.events.write("start", total_steps=cfg.iterations, start_step=self.step, preset=cfg.preset,
                          device=str(self.device), num_classes=self.num_classes,
                          labeled=len(self.dataset.training), unlabeled=len(self.dataset.unlabeled),
                          world_size=self.dist.world_size,
                          setup=compute_setup(self.device))  # same code and seed, other threads: other numbers
        restore_handlers = self._install_signal_handlers()
        bar = self._progress_bar()
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < cfg.iterations:
                # reduced over ranks: a signal reaching one process stops them all at the same step
                if self.dist.any(self._stop_requested(), self.device):
                    self._interrupt(bar)
                values = self.train_step()
                window_steps += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                    seconds = (time.perf_counter() - window_start) / window_steps
                    record = self.events.write("train", step=self.step, **values, seconds=seconds,
                                               eta_seconds=seconds * (cfg.iterations - self.step),
                                               total_steps=cfg.iterations)
                    window_start, window_steps = time.perf_counter(), 0
                    if self.progress:
                        self.progress(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.3f}", sup=f"{values['loss_sup']:.3f}")
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.validate_every == 0 and self.step < cfg.iterations:
                    self.validate()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                    self.save()
            validated = self.validate()
            if self.dist.is_main and (validated is None or not (self.run_dir / "checkpoints" / "best.pt").exists()):
                # Without validation cases the final weights are the best we know.
                save_checkpoint(self.run_dir / "checkpoints" / "best.pt", self.state_dict())
            final = self.save()
            self.events.write("end", step=self.step, status="completed", message="training completed")
            self.dist.barrier()  # no rank leaves (and tears the job down) before rank 0 has written
            return final
        except TrainingInterrupted:
            raise
        except Exception as exc:
            try:
                self.events.write("end", step=self.step, status="failed", message=f"{type(exc).__name__}: {exc}")
            except Exception as log_error:  # e.g. the same full disk: keep the error that names the checkpoint
                logger.debug(f"could not record the failure in events.jsonl: {log_error}")
            raise
        finally:
            if bar is not None:
                bar.close()
            restore_handlers()
            self.loader.close()

    def _stop_requested(self) -> bool:
        return (self._stop_signal is not None or bool(self.should_stop and self.should_stop())
                or stop_requested(self.run_dir))

    def _interrupt(self, bar) -> None:
        path = self.save()
        reason = self._stop_signal or "cancel requested"
        launcher = (f"torchrun --nproc_per_node {self.dist.world_size} -m PLBOptCore train" if self.dist.enabled
                    else "plbopt train")
        extra = "".join(f" --unlabeled {folder}" for folder in self.dataset.unlabeled_dirs)
        if self.cache_dir != Path(self.dataset.root) / ".plbopt_cache":
            extra += f" --cache-dir {self.cache_dir}"
        message = (f"training stopped at step {self.step}/{self.config.iterations} ({reason}); checkpoint {path}; "
                   f"continue with: {launcher} {self.dataset.root} -o {self.run_dir}{extra} --resume")
        self.events.write("end", step=self.step, status="interrupted", message=message)
        self.dist.barrier()  # the checkpoint is complete before any rank exits
        raise TrainingInterrupted(message)

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT/SIGTERM stop at the next step boundary (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _progress_bar(self):
        if not self.show_progress_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.iterations, initial=self.step, desc=f"train {self.config.preset}",
                    unit="step", dynamic_ncols=True)
