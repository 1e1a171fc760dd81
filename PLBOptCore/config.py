"""One flat training configuration, presets, and loading from files and ``key=value`` overrides.

Defaults are DHC's (Synapse, 64×128×128 patches, 32 filters, SGD lr 0.03, CPS weight 0.1) so that
a GPU user gets the paper's setting. The PLBOpt authors published no code: every PLBOpt
hyper-parameter below is our choice, documented in ``docs/METHOD.md`` and exposed here.

Spatial tuples are always (Z, Y, X) = (slices, rows, columns), matching numpy arrays from
SimpleITK (``GetArrayFromImage``) and torch tensors ``(B, C, Z, Y, X)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

from .errors import ConfigError


@dataclass
class Config:
    # ---- method switches (set by presets) ---------------------------------------------------
    preset: str = "plbopt"
    dual_subnets: bool = True  # two VNets A and B (DHC); False = one supervised VNet
    supervised_subnets: str = "AB"  # "AB" as DHC; "B" as PLBOpt Algorithm 1 line 4 (see PRESETS)
    class_weighting: bool = True  # DHC DiffDW (A) / DistDW (B); False = unweighted CE + Dice
    cps_weight: float = 0.1  # DHC cross pseudo supervision weight (0 disables)
    refine: bool = True  # superpixel entropy-voting refinement of pseudo labels (eq. 1-2)
    triplet: bool = True  # confidence-level triplet loss with memory banks (eq. 3-8)
    mutual_correction: bool = True  # mutual correction loss (eq. 9-10)

    # ---- data ---------------------------------------------------------------------------------
    patch_size: Tuple[int, int, int] = (64, 128, 128)
    batch_size: int = 2  # labeled patches per step
    unlabeled_batch_size: Optional[int] = None  # None = same as batch_size
    # Preprocessing. `plbopt train` plans the keys of PLANNED_KEYS from the dataset's fingerprint
    # (data/plan.py) unless they are given explicitly; the defaults below are DHC's abdominal CT.
    target_spacing: Optional[Tuple[float, float, float]] = None  # mm (Z, Y, X); None = native
    clip_window: Optional[Tuple[float, float]] = (-75.0, 275.0)  # intensity window, e.g. DHC's HU window
    # "minmax": clip, then the window to [0, 1] (DHC); "zscore": clip if a window is set, then each
    # case's mean and std over its body; "ct": clip, then the dataset's foreground mean and std
    # (intensity_mean_std), nnU-Net's CTNormalization
    normalization: str = "minmax"
    intensity_mean_std: Optional[Tuple[float, float]] = None  # dataset foreground (mean, std), for "ct"
    crop_to_body: bool = True
    # The body is the largest connected region above this intensity (CT: -500 HU separates air
    # from tissue); None = above the image's minimum, the padding of an MRI or a cropped CT.
    body_threshold: Optional[float] = -500.0
    foreground_oversample: float = 0.67  # share of patches centred on a foreground class
    # Sparse annotation (an "ignore" label): each training case with ignore voxels also joins the
    # unlabeled cases (its image; its label unused there), so CPS, refinement, triplet and mutual
    # correction learn from its unannotated voxels (engine.trainer.dataset_for_training, applied
    # by the trainer). Only where the preset uses unlabeled data.
    sparse_as_unlabeled: bool = False
    augment: bool = True  # random intensity scale/shift, plus the geometric options below
    # Mirroring X swaps patient left and right, so left/right organs (kidneys, adrenals) become
    # ambiguous: off by default. DHC mirrors Y and X ("yx"); any of "zyx" can be chosen.
    flip_axes: str = ""
    rotate90: bool = False  # 90° rotations in the axial plane (square patches only)
    num_workers: int = 0  # DataLoader processes preparing patches ahead of the step (0 = in the training process)

    # ---- network ------------------------------------------------------------------------------
    base_filters: int = 32
    dropout: bool = True
    projection_dim: int = 0  # >0 adds a 1×1×1 projection head on features for the triplet loss

    # ---- optimisation -------------------------------------------------------------------------
    iterations: int = 6000
    optimizer: str = "sgd"  # "sgd" (DHC: nesterov, momentum 0.9) or "adamw"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    amp: bool = True  # only used on CUDA
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    deterministic: bool = False  # torch deterministic algorithms, no cuDNN autotuning (slower on GPU)

    # ---- schedule / logging -------------------------------------------------------------------
    log_every: int = 10
    checkpoint_every: int = 200
    validate_every: int = 500
    tensorboard: bool = False  # also write RUN_DIR/tensorboard/ (needs pip install "plbopt[tensorboard]")
    rampup_iterations: Optional[int] = None  # None = whole run (DHC ramps over all epochs)

    # ---- DHC class weighting ------------------------------------------------------------------
    distdw_momentum: float = 0.99
    diffdw_momentum: float = 0.98  # DHC accumulate_iters=50
    # Lowest class weight used in the losses (weights are in [0, C]; DistDW gives the most frequent
    # class, background, weight 0). 1 lifts that zero, a departure from DHC measured on the real
    # datasets; 0 = DHC's weights as they are (the paper configs, the phantom demo). docs/METHOD.md
    class_weight_floor: float = 1.0
    # DHC weights the CPS cross entropy with the class weights too. Weighted CE on pseudo labels
    # moves a subnet's probabilities to p_k ∝ w_k·q_k, and that argmax is the other subnet's target;
    # false keeps the weights on the supervised loss only. docs/METHOD.md
    weighted_cps: bool = True
    # Labeled and unlabeled patches pass through a subnet in separate forward passes, each
    # normalised by BatchNorm with its own batch statistics. DHC concatenates them into one batch;
    # on the phantoms that alone (no unlabeled loss at all) made the subnets predict 75 % of every
    # test volume as organ. docs/METHOD.md
    separate_batch_norm: bool = True
    # Mean teachers: with a decay d, the unlabeled patches' pseudo labels (CPS targets, refinement,
    # triplet levels) come from an exponential moving average of each subnet's weights
    # (method/teacher.py) instead of the subnet itself. None: DHC's own predictions, as published.
    teacher_ema_decay: Optional[float] = None
    # A strong view (method/perturb.py): the unlabeled patches' pseudo labels come from a pass on
    # the clean patches, and every unlabeled loss is learned on an intensity-jittered, CutMixed copy
    # (FixMatch, CPS + CutMix). false: targets and predictions from the same pass, as DHC.
    unlabeled_strong_view: bool = False
    # Bidirectional copy-paste (method/copypaste.py, BCP): each labeled patch is seen with a box of
    # an unlabeled one and each unlabeled patch with a box of a labeled one; every voxel keeps its
    # source's label or (clean, refined) pseudo label. false: patches seen whole, as DHC.
    labeled_copy_paste: bool = False

    # ---- PLBOpt: refinement (eq. 1-2) ---------------------------------------------------------
    superpixel_method: str = "slic"  # slic | slic3d | quickshift | felzenszwalb | watershed
    superpixel_divisor: int = 50  # n_segments = H*W/divisor per axial slice (paper: /50); see superpixel_area_mm2
    # Mean superpixel area in mm² (None = use superpixel_divisor pixels). A physical size does not
    # change with resampling; 112.5 mm² is the paper's 50 pixels at DHC's 1.5 mm in-plane grid.
    superpixel_area_mm2: Optional[float] = 112.5
    superpixel_compactness: float = 0.1  # SLIC compactness on [0,1] intensities
    refine_tau: float = 0.5  # entropy threshold in nats (binary entropy is at most ln 2 = 0.69)
    refine_entropy: str = "binary"  # "binary" (mask class vs rest) or "multiclass" (eq. 1 over C); docs/METHOD.md
    refine_start: float = 0.0  # fraction of the run before refinement starts (0 = Algorithm 1); docs/METHOD.md
    refine_mode: str = "safe"  # "safe" (never hands voxels to another organ) or "paper" (Algorithm 1 as published)
    # Refinement acts only in superpixels whose intensity std is at most this many times the
    # volume's noise level (0 = in every superpixel, as the paper). None: from the dataset's
    # modality when the run starts (data/plan.py: refine_homogeneity_for; 1.5 on CT, 0 otherwise).
    refine_homogeneity: Optional[float] = None
    # Each step, refine the labeled patches' predictions too, score the change per class against
    # their labels, and refine a class only while the running mean of that gain is >= 0.
    refine_self_check: bool = True

    # ---- PLBOpt: triplet (eq. 3-8) ------------------------------------------------------------
    triplet_levels: int = 3  # k confidence levels
    triplet_capacity: int = 4096  # memory-bank queue capacity C per level
    triplet_margin: float = 0.5  # alpha, on L2-normalised features
    triplet_max_anchors: int = 256  # anchors sampled per level and step
    triplet_max_candidates: int = 2048  # boundary/internal voxels sampled per level and step
    lambda_triplet: float = 0.1
    triplet_mining: str = "paper"  # "paper" = eq. 5-6 as written; "hardest" = batch-hard mining
    # "subnet": each subnet has its own 2k banks; "shared": A and B push to and mine from one set of
    # banks, as the paper's two banks (positive, negative) per level are written. docs/METHOD.md
    triplet_banks: str = "subnet"
    # Confidence that splits voxels into levels (eq. 3): "max" = the max softmax; "refined" = the
    # softmax of the refined pseudo label, so relabelled voxels fall into the low levels.
    triplet_confidence: str = "max"

    # ---- PLBOpt: mutual correction (eq. 9-10) -------------------------------------------------
    mc_tau: float = 0.8  # confidence threshold tau
    lambda_mc: float = 1.0
    mc_mode: str = "teacher"  # "teacher": the confident subnet teaches, detached; "paper": symmetric gradients
    # Eq. 10's sum divided by all voxels ("mean_voxels"), by the discrepant voxels as MCF does
    # ("mean_masked"), or by the batch size as written ("paper"). docs/METHOD.md
    mc_reduction: str = "mean_voxels"
    # What the confident subnet teaches ("teacher" mode only): its softmax ("probs") or its refined
    # pseudo label, one-hot ("refined"), as MCF corrects towards a label.
    mc_target: str = "probs"

    # ---- inference ----------------------------------------------------------------------------
    sw_overlap: float = 0.5
    sw_batch_size: int = 2

    extra: Dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the run

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        """Check every field's type and range; raise a one-line :class:`ConfigError` naming the key.

        Everything is checked here, before a run folder or cache exists, so a bad value fails at
        once instead of at the first validation or checkpoint hours later. Returns self.
        """
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))
        if len(self.patch_size) != 3 or any(p < 16 or p % 16 for p in self.patch_size):
            raise ConfigError(f"patch_size must be 3 multiples of 16 (4 VNet poolings), got {list(self.patch_size)}")
        if self.clip_window is not None and not self.clip_window[0] < self.clip_window[1]:
            raise ConfigError(f"clip_window must be [low, high] with low < high, got {list(self.clip_window)}")
        if min(self.batch_size, self.unlabeled_batch) == 1 and tuple(self.patch_size) == (16, 16, 16):
            # the bottleneck is then one voxel of one patch: BatchNorm has a single value per channel
            raise ConfigError("patch_size 16x16x16 needs batch_size (and unlabeled_batch_size) of at least 2")
        if self.intensity_mean_std is not None and not self.intensity_mean_std[1] > 0:
            raise ConfigError(f"intensity_mean_std must be [mean, std] with std > 0, got {list(self.intensity_mean_std)}")
        if not self.dual_subnets and (self.cps_weight or self.mutual_correction or self.refine or self.triplet):
            raise ConfigError("a single-subnet (supervised) run cannot use CPS, refinement, triplet or mutual correction")
        if self.mc_target == "refined" and self.mc_mode != "teacher":
            raise ConfigError("mc_target=refined needs mc_mode=teacher (a label carries no gradient to share)")
        if self.unlabeled_strong_view and self.labeled_copy_paste:
            raise ConfigError("unlabeled_strong_view and labeled_copy_paste each remake the unlabeled patches; choose one")
        if set(self.flip_axes) - set("zyx"):
            raise ConfigError(f"flip_axes may only contain z, y and x, got {self.flip_axes!r}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        return self

    @property
    def unlabeled_batch(self) -> int:
        return self.batch_size if self.unlabeled_batch_size is None else self.unlabeled_batch_size

    @property
    def uses_unlabeled(self) -> bool:
        return self.dual_subnets and bool(self.cps_weight or self.refine or self.triplet or self.mutual_correction)

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Config":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(key) for key in set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        cfg = cls()
        for key, value in data.items():
            setattr(cfg, key, _coerce(known[key], value))
        return cfg


SUPERPIXEL_METHODS = ("slic", "slic3d", "quickshift", "felzenszwalb", "watershed")
SUBNETS = ("both", "a", "b")  # what predicts: DHC's ensemble (logits averaged) or one subnet alone
CHECKPOINT_NAMES = ("best", "last")  # checkpoints/<name>.pt of a run: chosen on validation, final weights
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")

# Allowed values of the text fields (``preset``: the keys of PRESETS; ``flip_axes`` and ``device``: in validate).
CHOICES: Dict[str, Tuple[str, ...]] = {
    "supervised_subnets": ("AB", "B"),
    "normalization": ("minmax", "zscore", "ct"),
    "optimizer": ("sgd", "adamw"),
    "superpixel_method": SUPERPIXEL_METHODS,
    "refine_entropy": ("binary", "multiclass"),
    "triplet_mining": ("paper", "hardest"),
    "triplet_banks": ("subnet", "shared"),
    "triplet_confidence": ("max", "refined"),
    "mc_reduction": ("mean_voxels", "mean_masked", "paper"),
    "mc_target": ("probs", "refined"),
    "refine_mode": ("safe", "paper"),
    "mc_mode": ("teacher", "paper"),
}
# Inclusive (low, high) of the integer fields: counts are >= 1, sizes and seeds >= 0. The upper
# bounds are generous (beyond any GPU of today) but finite, so that a typo such as
# triplet_capacity=1e12 is refused at once instead of allocating terabytes hours later.
MAX_STEPS = 10_000_000
INT_RANGE: Dict[str, Tuple[int, int]] = {
    "batch_size": (1, 1024), "unlabeled_batch_size": (1, 1024), "base_filters": (1, 512),
    "iterations": (1, MAX_STEPS), "log_every": (1, MAX_STEPS), "checkpoint_every": (1, MAX_STEPS),
    "validate_every": (1, MAX_STEPS), "rampup_iterations": (0, MAX_STEPS), "triplet_levels": (1, 100),
    "triplet_capacity": (1, 1_048_576), "triplet_max_anchors": (1, 16_384), "triplet_max_candidates": (1, 262_144),
    "superpixel_divisor": (1, 100_000), "sw_batch_size": (1, 1024), "num_workers": (0, 256),
    "projection_dim": (0, 4096), "seed": (0, 2**32 - 1),  # numpy's legacy seed range
}
# The largest patch side: 512 voxels (DHC uses 64x128x128).
MAX_PATCH_SIDE = 512
# Intensities (HU, MR values) of windows, thresholds and statistics.
MAX_INTENSITY = 1e6
# Voxel spacing in mm that a medical volume can have: from 10 µm (pre-clinical micro-CT) to 100 mm.
# data/io.py refuses images outside it (a spacing written in metres); target_spacing must lie in it.
SPACING_RANGE_MM = (0.01, 100.0)
# (low, high, high included) of the float fields.
FLOAT_RANGE: Dict[str, Tuple[float, float, bool]] = {
    "lr": (0.0, 10.0, True), "momentum": (0.0, 1.0, False), "weight_decay": (0.0, 1.0, True),
    "poly_power": (0.0, 10.0, True), "cps_weight": (0.0, 100.0, True),
    "foreground_oversample": (0.0, 1.0, True), "distdw_momentum": (0.0, 1.0, False),
    "diffdw_momentum": (0.0, 1.0, False), "superpixel_compactness": (0.0, 1000.0, True),
    "refine_tau": (0.0, 10.0, True), "refine_start": (0.0, 1.0, False), "triplet_margin": (0.0, 10.0, True),
    "lambda_triplet": (0.0, 100.0, True), "mc_tau": (0.0, 1.0, True), "lambda_mc": (0.0, 100.0, True),
    "sw_overlap": (0.0, 1.0, False), "class_weight_floor": (0.0, 1000.0, True),
    "refine_homogeneity": (0.0, 1000.0, True), "superpixel_area_mm2": (0.0, 1e5, True),
    "body_threshold": (-MAX_INTENSITY, MAX_INTENSITY, True), "teacher_ema_decay": (0.0, 1.0, False),
}
# Fields that must be strictly above their lower bound (a zero learning rate never trains).
STRICTLY_POSITIVE = ("lr", "superpixel_compactness", "superpixel_area_mm2")
# Float tuples: (length, low, high), both included.
FLOAT_TUPLES: Dict[str, Tuple[int, float, float]] = {
    "target_spacing": (3, *SPACING_RANGE_MM), "clip_window": (2, -MAX_INTENSITY, MAX_INTENSITY),
    "intensity_mean_std": (2, -MAX_INTENSITY, MAX_INTENSITY)}

# Each preset is a set of overrides on the defaults. The single-component presets switch the other
# two PLBOpt components off but otherwise match `plbopt`, which is how the paper's Table V ablates.
# Algorithm 1 line 4 writes the supervised loss for subnet B only; with DHC's weighting that cannot
# work: DistDW gives B's background weight 0, so a B-only supervised pair never learns background
# (measured on the demo: test Dice 0.02, every body voxel foreground). PLBOpt is built on DHC,
# which supervises both subnets, so every dual preset does ("supervised_subnets=B" remains available).
PRESETS: Dict[str, Dict[str, Any]] = {
    "supervised": dict(dual_subnets=False, class_weighting=False, cps_weight=0.0, refine=False, triplet=False, mutual_correction=False),
    "dhc": dict(dual_subnets=True, supervised_subnets="AB", cps_weight=0.1, refine=False, triplet=False, mutual_correction=False),
    "plbopt": dict(dual_subnets=True, supervised_subnets="AB", cps_weight=0.1, refine=True, triplet=True, mutual_correction=True),
    # PLBOpt's components exactly as published (refinement rule, superpixel count, symmetric mutual
    # correction, eq. 5-6 mining) on the same healthy DHC base, to reproduce and compare the paper.
    "plbopt-paper": dict(dual_subnets=True, supervised_subnets="AB", cps_weight=0.1, refine=True, triplet=True,
                         mutual_correction=True, refine_mode="paper", refine_homogeneity=0.0, refine_self_check=False,
                         superpixel_area_mm2=None, mc_mode="paper", triplet_mining="paper"),
    "refine-only": dict(dual_subnets=True, supervised_subnets="AB", cps_weight=0.1, refine=True, triplet=False, mutual_correction=False),
    "triplet-only": dict(dual_subnets=True, supervised_subnets="AB", cps_weight=0.1, refine=False, triplet=True, mutual_correction=False),
    "mc-only": dict(dual_subnets=True, supervised_subnets="AB", cps_weight=0.1, refine=False, triplet=False, mutual_correction=True),
}

# CPU schedule used by `plbopt demo`, `plbopt train --small` and the benchmarks: 2 cores train
# ~4 PLBOpt steps per second. Measured on the phantom data: SGD at lr 0.03 barely moves in a few
# hundred steps, AdamW at 3e-3 learns every organ; Dropout3d(0.5) on 8-channel features removes
# too much of so small a network; 3 mm in-plane keeps the whole abdomen inside a 48×48 patch.
# The triplet banks hold four steps of candidates (a bank the size of one step's candidates held
# only the previous step).
CPU_SCHEDULE: Dict[str, Any] = dict(
    base_filters=8, batch_size=2, iterations=1200, optimizer="adamw", lr=0.003,
    dropout=False, checkpoint_every=200, validate_every=200, log_every=10,
    triplet_capacity=4096, triplet_max_anchors=128, triplet_max_candidates=1024,
)
# Patch voxels of each schedule: the budget within which data/plan.py chooses the patch size
# (and, on the CPU, the target spacing). GPU: DHC's 64×128×128; CPU: 16×48×48, measured above.
PATCH_BUDGET: Dict[str, int] = {"gpu": 64 * 128 * 128, "cpu": 16 * 48 * 48}
# The phantom's preprocessing, chosen and measured before planning existed (docs/RESULTS.md): the
# demo keeps it so its numbers stay comparable; the planned preprocessing of the phantom differs.
PHANTOM_PREPROCESSING: Dict[str, Any] = dict(
    patch_size=(16, 48, 48), target_spacing=(2.5, 3.0, 3.0), normalization="minmax", clip_window=(-75.0, 275.0),
    body_threshold=-500.0,
)
# The demo keeps DHC's class weights (floor 0): the floor moved the phantom's mean within the seed
# spread (docs/METHOD.md, item 3) and the shipped checkpoint and README's numbers were made with 0.
CPU_DEMO_OVERRIDES: Dict[str, Any] = dict(CPU_SCHEDULE, **PHANTOM_PREPROCESSING, class_weight_floor=0.0)
# The settings data/plan.py chooses from the dataset; a value given explicitly (--set, --config,
# --patch-size) wins over the plan.
PLANNED_KEYS = ("target_spacing", "patch_size", "normalization", "clip_window", "intensity_mean_std",
                "body_threshold")


# The settings each method switch gates: while the switch is off, they change nothing a run learns.
GATED_SETTINGS: Dict[str, Tuple[str, ...]] = {
    "class_weighting": ("distdw_momentum", "diffdw_momentum", "class_weight_floor", "weighted_cps"),
    "refine": ("superpixel_method", "superpixel_divisor", "superpixel_area_mm2", "superpixel_compactness",
               "refine_tau", "refine_entropy", "refine_start", "refine_mode", "refine_homogeneity", "refine_self_check"),
    "triplet": ("triplet_levels", "triplet_capacity", "triplet_margin", "triplet_max_anchors",
                "triplet_max_candidates", "lambda_triplet", "triplet_mining", "projection_dim",
                "triplet_banks", "triplet_confidence"),
    "mutual_correction": ("mc_tau", "lambda_mc", "mc_mode", "mc_reduction", "mc_target"),
    # a property, not a field: a dual preset with at least one unlabeled term
    "uses_unlabeled": ("sparse_as_unlabeled", "teacher_ema_decay", "unlabeled_strong_view", "labeled_copy_paste"),
}


def inert_settings(config: Config, keys: Iterable[str]) -> Dict[str, str]:
    """``{key: switch}`` for each of ``keys`` that has no effect in ``config`` because ``switch`` is off.

    >>> inert_settings(make_config("dhc"), ["lambda_mc", "lr"])
    {'lambda_mc': 'mutual_correction'}
    """
    return {key: switch for key in keys for switch, gated in GATED_SETTINGS.items()
            if key in gated and not getattr(config, switch)}


def make_config(preset: str = "plbopt", config_file: Optional[Path] = None,
                overrides: Optional[Dict[str, Any]] = None, small: bool = False) -> Config:
    """Defaults → preset → CPU schedule (``small``) → config file (YAML/JSON) → explicit overrides; validated.

    The schedule comes before the file, so a file's values (its ``lr``, say) win over ``--small``.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    data: Dict[str, Any] = dict(PRESETS[preset], preset=preset)
    if small:
        data.update(CPU_SCHEDULE)
    if config_file is not None:
        data.update(load_config_file(Path(config_file)))
    data.update(overrides or {})
    return Config.from_dict(data).validate()


# What a resumed run may change: how it runs and reports, not what it learns.
RESUME_SAFE_KEYS = ("iterations", "device", "num_workers", "deterministic", "log_every", "validate_every",
                    "checkpoint_every", "tensorboard", "sw_overlap", "sw_batch_size")


# Keys added after runs existed whose default is what every earlier run did: a run that lacks one
# was trained with its default (teacher_ema_decay: None, no teacher, before the key existed).
ADDED_AS_BEFORE_KEYS = ("teacher_ema_decay", "unlabeled_strong_view", "labeled_copy_paste")


def stored_config(data: Dict[str, Any], source: Path) -> Config:
    """The configuration a run folder stored (``config.json``, read from ``source``).

    A key that changes what a run learns and is missing was added to :class:`Config` after the run
    was made: its default today need not be what the run was trained with (``class_weight_floor``
    was 0 before the key existed and is 1 now), so the run is refused rather than silently continued,
    or reused by a benchmark, as another experiment. Keys a resume may change anyway
    (:data:`RESUME_SAFE_KEYS`) and keys whose default is the earlier behaviour
    (:data:`ADDED_AS_BEFORE_KEYS`) take their defaults.
    """
    missing = sorted(f.name for f in fields(Config)
                     if f.name not in data and f.name not in RESUME_SAFE_KEYS + ADDED_AS_BEFORE_KEYS)
    if missing:
        raise ConfigError(f"{source}: written by an older PLBOpt, it lacks {', '.join(missing)}, whose defaults may "
                          f"differ from what this run was trained with; start a new run folder (--init-from "
                          f"{source.parent / 'checkpoints' / 'last.pt'} keeps its weights), or add the values the "
                          f"run used to {source.name}")
    return Config.from_dict(data)


def resume_config(stored: Config, overrides: Optional[Dict[str, Any]], source: Path) -> Config:
    """The configuration ``stored`` in a run folder (read from ``source``) with ``overrides`` applied.

    Overrides of :data:`RESUME_SAFE_KEYS` apply; any other key whose value differs from the stored
    one is refused with a :class:`ConfigError`, since a resumed run continues the same experiment.
    """
    merged = Config.from_dict({**stored.to_dict(), **(overrides or {})}).validate()
    changed = sorted(key for key in overrides or {}
                     if key not in RESUME_SAFE_KEYS and getattr(merged, key) != getattr(stored, key))
    if changed:
        raise ConfigError(f"{source}: --resume keeps the stored configuration; {', '.join(changed)} cannot change "
                          f"(only {', '.join(RESUME_SAFE_KEYS)} can); start a new run folder instead")
    return merged


def load_config_file(path: Path) -> Dict[str, Any]:
    """The mapping in a YAML or JSON file; :class:`ConfigError` naming the file (and the key) for
    anything else: a parse error, nesting too deep to parse, or a value that is not JSON data (a
    YAML date, a recursive alias), which config.json and checkpoints could not hold."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except RecursionError:  # both parsers recurse once per level of nesting
        raise ConfigError(f"{path}: cannot parse config (nested too deeply)") from None
    except Exception as exc:  # parse errors of either format
        raise ConfigError(f"{path}: cannot parse config ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config must be a mapping of key: value")
    where, what = _plain_data_problem(data)
    if where:
        raise ConfigError(f"{path}: {where.lstrip('.')}: not plain data (strings, finite numbers, true/false, null, "
                          f"lists, mappings with text keys): {what}")
    return data


def parse_override(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (numbers, lists, true/false, null); text that is
    no YAML stays text. A value that is not JSON data (a date, a recursive alias) is refused
    naming the key."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {_short_repr(text, 80)} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(raw)
    except RecursionError:
        raise ConfigError(f"{key}: value nested too deeply") from None
    except yaml.YAMLError:
        value = raw
    where, what = _plain_data_problem(value)
    if where or what:
        raise ConfigError(f"{key}{where}: not plain data (strings, finite numbers, true/false, null, lists, "
                          f"mappings with text keys): {what}")
    return key, value


def _one_line(exc: Exception) -> str:
    """An exception's message on one line (YAML's point at the error over several)."""
    return " ".join(str(exc).split())[:300]


OPTIONAL_FIELDS = ("unlabeled_batch_size", "target_spacing", "clip_window", "rampup_iterations", "superpixel_area_mm2",
                   "intensity_mean_std", "body_threshold", "refine_homogeneity", "teacher_ema_decay")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer with hundreds of digits is no float either
        return False


def _check_field(name: str, value: Any) -> None:
    """Type and range of one field; :class:`ConfigError` ``"<name> must be ..., got <value>"``."""
    if value is None and name in OPTIONAL_FIELDS:
        return
    default = Config.__dataclass_fields__[name].default
    problem = None
    if name in INT_RANGE:
        low, high = INT_RANGE[name]
        if not _is_int(value) or not low <= value <= high:
            problem = f"an integer in [{low}, {high}]"
    elif name in FLOAT_RANGE:
        low, high, high_included = FLOAT_RANGE[name]
        strict = name in STRICTLY_POSITIVE
        if not _is_number(value) or (value <= low if strict else value < low) or (
                value > high if high_included else value >= high):
            problem = f"a number in {'(' if strict else '['}{low}, {high}{']' if high_included else ')'}"
    elif name in FLOAT_TUPLES:
        length, low, high = FLOAT_TUPLES[name]
        if not isinstance(value, (tuple, list)) or len(value) != length or not all(_is_number(v) for v in value) \
                or not all(low <= v <= high for v in value):
            problem = f"a list of {length} numbers in [{low:g}, {high:g}]"
    elif name == "patch_size":
        if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
            problem = "a list of 3 integers"
        elif any(v > MAX_PATCH_SIDE for v in value):
            problem = f"a list of 3 integers of at most {MAX_PATCH_SIDE}"
    elif name == "preset" or name in CHOICES:
        choices = tuple(PRESETS) if name == "preset" else CHOICES[name]
        if value not in choices:
            problem = f"one of {', '.join(choices)}"
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            problem = "true or false"
    elif isinstance(default, str):
        if not isinstance(value, str):
            problem = "a string"
    elif name == "extra":
        if not isinstance(value, dict):
            problem = "a mapping"
        else:  # kept in config.json and every checkpoint: JSON data only
            where, what = _plain_data_problem(value)
            if where:
                raise ConfigError(f"{name}{where} must be plain data (strings, finite numbers, true/false, null, "
                                  f"lists, mappings with text keys), got {what}")
    if problem:
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{name} must be {problem}, got {_short_repr(shown)}")


def _short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message stays one readable line."""
    try:
        text = repr(value)
    except RecursionError:  # a self-containing list (a recursive YAML alias)
        text = f"a recursive {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


# Plain data nests at most this deep and holds at most this many values; deeper is a structure
# that contains itself (a recursive YAML alias) or an attack, and a walk over aliases repeated
# inside aliases ("billion laughs") would never end without the count.
MAX_DATA_DEPTH = 64
MAX_DATA_VALUES = 100_000


def _plain_data_problem(value: Any) -> Tuple[str, str]:
    """``("", "")`` if ``value`` is JSON data (str, int, finite float, bool, None, lists and mappings
    with text keys, at most :data:`MAX_DATA_DEPTH` deep and :data:`MAX_DATA_VALUES` values);
    otherwise ``(where, what)``: the path of the first offending value (``.key`` / ``[index]``)
    and what it is. Iterative, so depth cannot exhaust Python's stack."""
    stack = [(value, "", 0)]
    seen = 0
    while stack:
        item, where, depth = stack.pop()
        where = where if len(where) <= 80 else where[:80] + "..."  # a recursive alias's path never ends
        seen += 1
        if seen > MAX_DATA_VALUES:
            return where or ".", f"more than {MAX_DATA_VALUES} values (aliases repeated inside aliases?)"
        if depth > MAX_DATA_DEPTH:
            return where, f"values nested more than {MAX_DATA_DEPTH} deep (or a YAML alias that contains itself)"
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return f"{where}.{key!r}", f"a key of type {type(key).__name__} (keys must be text)"
                stack.append((child, f"{where}.{key}", depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{where}[{index}]", depth + 1) for index, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return where, f"{item!r} (not a finite number)"
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            return where, f"{_short_repr(item, 60)}, a {type(item).__name__} (quote it to keep it as text)"
    return "", ""


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a value read from YAML/JSON to the field's type (lists → tuples, 3 → 3.0 for floats,
    2.0 → 2 for integers); anything else is left for :func:`_check_field` to name."""
    if value is None:
        return None
    if f.name in FLOAT_TUPLES or f.name == "patch_size":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{f.name} must be a list, got {value!r}")
        return tuple(_coerce_number(f.name, v, as_int=f.name == "patch_size") for v in value)
    if f.name in INT_RANGE or f.name in FLOAT_RANGE:
        return _coerce_number(f.name, value, as_int=f.name in INT_RANGE)
    return value


NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce_number(name: str, value: Any, as_int: bool) -> Any:
    """``value`` as int (if ``as_int``, only from whole numbers) or float; non-numbers unchanged.

    Text in scientific notation is a number too: YAML 1.1 reads ``1e-3`` (no dot, no exponent
    sign) as a string, and ``--set lr=1e-3`` means a number."""
    if isinstance(value, str) and NUMBER_TEXT.fullmatch(value.strip()):
        value = float(value)
    if not _is_number(value):
        return value
    if as_int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)
