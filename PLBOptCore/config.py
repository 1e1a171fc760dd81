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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

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
    target_spacing: Optional[Tuple[float, float, float]] = None  # mm (Z, Y, X); None = native
    clip_window: Optional[Tuple[float, float]] = (-75.0, 275.0)  # HU, DHC's abdominal window
    normalization: str = "minmax"  # "minmax" after clipping (DHC) or "zscore"
    crop_to_body: bool = True
    foreground_oversample: float = 0.67  # share of patches centred on a foreground class
    augment: bool = True  # random intensity scale/shift, plus the geometric options below
    # Mirroring X swaps patient left and right, so left/right organs (kidneys, adrenals) become
    # ambiguous: off by default. DHC mirrors Y and X ("yx"); any of "zyx" can be chosen.
    flip_axes: str = ""
    rotate90: bool = False  # 90° rotations in the axial plane (square patches only)
    num_workers: int = 0

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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch deterministic algorithms (slower on GPU)

    # ---- schedule / logging -------------------------------------------------------------------
    log_every: int = 10
    checkpoint_every: int = 200
    validate_every: int = 500
    rampup_iterations: Optional[int] = None  # None = whole run (DHC ramps over all epochs)

    # ---- DHC class weighting ------------------------------------------------------------------
    distdw_momentum: float = 0.99
    diffdw_momentum: float = 0.98  # DHC accumulate_iters=50
    # Lowest class weight used in the losses (weights are in [0, C]). DHC's DistDW gives the most
    # frequent class (background) weight 0, so subnet B never learns background on unlabeled
    # patches and predicts most of them as organ; 0 restores DHC's literal weights. docs/METHOD.md
    class_weight_floor: float = 1.0
    # DHC also weights the CPS cross entropy. On pseudo labels that feeds back: weighted CE moves a
    # subnet's probabilities to p_k ∝ w_k·q_k, its argmax becomes the other subnet's target, and
    # the organs (weights up to C) grow over the unlabeled background step after step. The class
    # weights act on the supervised loss only unless this is true (DHC's literal loss). docs/METHOD.md
    weighted_cps: bool = False

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
    # volume's noise level (0 = in every superpixel, as the paper).
    refine_homogeneity: float = 1.5
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

    # ---- PLBOpt: mutual correction (eq. 9-10) -------------------------------------------------
    mc_tau: float = 0.8  # confidence threshold tau
    lambda_mc: float = 1.0
    mc_mode: str = "teacher"  # "teacher": the confident subnet teaches, detached; "paper": symmetric gradients

    # ---- inference ----------------------------------------------------------------------------
    sw_overlap: float = 0.5
    sw_batch_size: int = 2

    extra: Dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the run

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        """Raise :class:`ConfigError` on inconsistent values; return self."""
        if len(self.patch_size) != 3 or any(int(p) < 16 or int(p) % 16 for p in self.patch_size):
            raise ConfigError(f"patch_size must be 3 multiples of 16 (4 VNet poolings), got {self.patch_size}")
        if self.supervised_subnets not in ("AB", "B"):
            raise ConfigError(f"supervised_subnets must be 'AB' or 'B', got {self.supervised_subnets!r}")
        if not self.dual_subnets and (self.cps_weight or self.mutual_correction or self.refine or self.triplet):
            raise ConfigError("a single-subnet (supervised) run cannot use CPS, refinement, triplet or mutual correction")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.normalization not in ("minmax", "zscore"):
            raise ConfigError(f"normalization must be 'minmax' or 'zscore', got {self.normalization!r}")
        if self.superpixel_method not in SUPERPIXEL_METHODS:
            raise ConfigError(f"superpixel_method must be one of {SUPERPIXEL_METHODS}, got {self.superpixel_method!r}")
        for name in ("iterations", "batch_size", "base_filters", "triplet_levels", "triplet_capacity", "superpixel_divisor"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.refine_start < 1.0:
            raise ConfigError(f"refine_start must be a fraction of the run in [0, 1), got {self.refine_start}")
        if self.refine_mode not in ("safe", "paper"):
            raise ConfigError(f"refine_mode must be 'safe' or 'paper', got {self.refine_mode!r}")
        if self.mc_mode not in ("teacher", "paper"):
            raise ConfigError(f"mc_mode must be 'teacher' or 'paper', got {self.mc_mode!r}")
        if self.refine_homogeneity < 0 or self.class_weight_floor < 0:
            raise ConfigError("refine_homogeneity and class_weight_floor must be >= 0")
        if self.superpixel_area_mm2 is not None and not self.superpixel_area_mm2 > 0:
            raise ConfigError(f"superpixel_area_mm2 must be > 0 or null, got {self.superpixel_area_mm2}")
        if self.refine_entropy not in ("binary", "multiclass"):
            raise ConfigError(f"refine_entropy must be 'binary' or 'multiclass', got {self.refine_entropy!r}")
        if set(self.flip_axes) - set("zyx"):
            raise ConfigError(f"flip_axes may only contain z, y and x, got {self.flip_axes!r}")
        if self.triplet_mining not in ("paper", "hardest"):
            raise ConfigError(f"triplet_mining must be 'paper' or 'hardest', got {self.triplet_mining!r}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ConfigError(f"sw_overlap must be in [0, 1), got {self.sw_overlap}")
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
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        cfg = cls()
        for key, value in data.items():
            setattr(cfg, key, _coerce(known[key], value))
        return cfg


SUPERPIXEL_METHODS = ("slic", "slic3d", "quickshift", "felzenszwalb", "watershed")
SUBNETS = ("both", "a", "b")  # what predicts: DHC's ensemble (logits averaged) or one subnet alone

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
CPU_DEMO_OVERRIDES: Dict[str, Any] = dict(
    patch_size=(16, 48, 48), base_filters=8, batch_size=2, iterations=1200, optimizer="adamw", lr=0.003,
    dropout=False, target_spacing=(2.5, 3.0, 3.0), checkpoint_every=200, validate_every=200, log_every=10,
    triplet_capacity=1024, triplet_max_anchors=128, triplet_max_candidates=1024,
)


def make_config(preset: str = "plbopt", config_file: Optional[Path] = None,
                overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Defaults → preset → config file (YAML/JSON) → explicit overrides; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    data: Dict[str, Any] = dict(PRESETS[preset], preset=preset)
    if config_file is not None:
        data.update(load_config_file(Path(config_file)))
    data.update(overrides or {})
    return Config.from_dict(data).validate()


def load_config_file(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # parse errors of either format
        raise ConfigError(f"{path}: cannot parse config ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config must be a mapping of key: value")
    return data


def parse_override(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (numbers, lists, true/false, null)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().replace("-", "_"), value


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    if value is None:
        return None
    if isinstance(default, tuple) or "Tuple" in str(f.type):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{f.name} must be a list, got {value!r}")
        cast = float if "float" in str(f.type) else int
        return tuple(cast(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        return value
    try:
        if isinstance(default, int) or "int" in str(f.type) and "float" not in str(f.type):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float) or "float" in str(f.type):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}: cannot use {value!r}") from None
    return value
