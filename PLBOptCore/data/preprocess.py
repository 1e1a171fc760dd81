"""Preprocessing of one case: resample, crop to the body, clip, normalise; cached as ``.npy`` arrays.

Order of operations (why): resample first so every later step works on the training grid; crop on
the raw intensities (before clipping, so air and tissue are still separable); clip to the window;
then normalise. Which window, normalisation and body rule apply is the dataset's plan
(:mod:`.plan`), stored in the run's config. ``RestoreInfo`` records the crop and both grids, so that :func:`restore_to_original`
maps a prediction back to the original image exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import ConfigError, DatasetError
from ..utils import atomic_write
from .dataset import Case
from .io import check_same_geometry, read_image

# Bump when the preprocessing code changes what it produces: old caches then live in another folder.
CACHE_VERSION = 3  # 3: z-score over the body; 2: one folder of .npy arrays per case (memory-mapped)
# Voxels above this raw HU belong to the body of a CT (air is -1000, lung parenchyma about -850).
BODY_THRESHOLD_HU = -500.0
# Voxels of margin around the body box, on the resampled grid.
BODY_MARGIN = 4
# Preprocessed label value of a voxel nobody annotated (the dataset's ignore label, whatever its
# value in the files): negative, so it is no class index; losses and metrics leave out label < 0.
UNANNOTATED = -1


@dataclass(frozen=True)
class PreprocessParams:
    target_spacing: Optional[Tuple[float, float, float]]  # mm (Z, Y, X); None = native
    clip_window: Optional[Tuple[float, float]]  # HU
    normalization: str  # "minmax" | "zscore"
    crop_to_body: bool
    superpixel_method: str
    superpixel_divisor: int
    superpixel_compactness: float
    superpixel_area_mm2: Optional[float] = None
    intensity_mean_std: Optional[Tuple[float, float]] = None  # "ct": the dataset's foreground mean and std
    body_threshold: Optional[float] = BODY_THRESHOLD_HU  # None: the body is what lies above the image minimum

    def superpixel_pixels(self, spacing_zyx: Tuple[float, float, float]) -> int:
        """Mean superpixel size in pixels on a grid of ``spacing_zyx`` mm (the ``divisor``)."""
        if self.superpixel_area_mm2 is None:
            return self.superpixel_divisor
        return max(1, int(round(self.superpixel_area_mm2 / (float(spacing_zyx[1]) * float(spacing_zyx[2])))))

    @classmethod
    def from_config(cls, cfg: Any) -> "PreprocessParams":
        """The preprocessing of ``cfg``; :class:`ConfigError` if ``normalization`` is ``ct`` without
        its statistics (checked here, not in ``Config.validate``, because the plan fills them in
        after the user's settings are read)."""
        if cfg.normalization == "ct" and (cfg.clip_window is None or cfg.intensity_mean_std is None):
            raise ConfigError("normalization ct needs clip_window and intensity_mean_std (the dataset's foreground "
                              "percentiles, mean and std), which plbopt train plans for a CT dataset only")
        return cls(
            target_spacing=tuple(float(s) for s in cfg.target_spacing) if cfg.target_spacing else None,
            clip_window=tuple(float(c) for c in cfg.clip_window) if cfg.clip_window else None,
            normalization=cfg.normalization,
            crop_to_body=bool(cfg.crop_to_body),
            superpixel_method=cfg.superpixel_method,
            superpixel_divisor=int(cfg.superpixel_divisor),
            superpixel_compactness=float(cfg.superpixel_compactness),
            superpixel_area_mm2=float(cfg.superpixel_area_mm2) if cfg.superpixel_area_mm2 else None,
            intensity_mean_std=tuple(float(v) for v in cfg.intensity_mean_std) if cfg.intensity_mean_std else None,
            body_threshold=None if cfg.body_threshold is None else float(cfg.body_threshold),
        )

    def key(self) -> str:
        """Short hash of the parameters (and the code version): the cache folder name."""
        text = json.dumps([CACHE_VERSION, BODY_MARGIN, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class RestoreInfo:
    """Original geometry, resampled grid and crop box. Sizes/spacings/origins are SimpleITK (x, y, z)."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]
    resampled_size: Tuple[int, int, int]
    resampled_spacing: Tuple[float, float, float]
    crop_start: Tuple[int, int, int]  # (Z, Y, X) on the resampled grid
    crop_stop: Tuple[int, int, int]  # exclusive

    @property
    def resampled(self) -> bool:
        return tuple(self.resampled_size) != tuple(self.size) or tuple(self.resampled_spacing) != tuple(self.spacing)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RestoreInfo":
        return cls(**{k: tuple(v) for k, v in json.loads(text).items()})


@dataclass
class Preprocessed:
    name: str
    image: np.ndarray  # float32 (Z, Y, X), normalised
    label: Optional[np.ndarray]  # int16 (Z, Y, X), UNANNOTATED (-1) where not annotated; or None
    superpixels: Optional[np.ndarray]  # int32 (Z, Y, X), ids unique within the volume, or None
    info: RestoreInfo
    # image noise std (Immerkær), stored with the superpixels: the scale of refinement's homogeneity test
    noise_sigma: Optional[float] = None


def _resample(image: sitk.Image, size: Tuple[int, ...], spacing: Tuple[float, ...], origin: Tuple[float, ...],
              direction: Tuple[float, ...], is_label: bool, fill: float) -> sitk.Image:
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, [int(s) for s in size], sitk.Transform(), interpolator, origin, spacing,
                         direction, fill, image.GetPixelID())


def _target_grid(image: sitk.Image, target_spacing_zyx: Optional[Tuple[float, float, float]]):
    """Size and spacing (x, y, z) of the resampled grid covering the same extent as ``image``."""
    if target_spacing_zyx is None:
        return tuple(image.GetSize()), tuple(image.GetSpacing())
    spacing = tuple(float(s) for s in reversed(target_spacing_zyx))
    size = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing))
    return size, spacing


def _bbox(mask: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(start, stop) of the True voxels of ``mask``, or None if there are none."""
    if not mask.any():
        return None
    coords = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)]
    return np.array([c[0] for c in coords]), np.array([c[-1] + 1 for c in coords])


def body_mask(raw_zyx: np.ndarray, threshold: Optional[float]) -> np.ndarray:
    """The body: the largest connected region above ``threshold`` (None: above the image minimum,
    which is the padding of an MRI or of a CT cut to a region). All False if there is none.

    The couch and small artefacts are separate components and are dropped.
    """
    body = raw_zyx > (float(raw_zyx.min()) if threshold is None else threshold)
    components, n = ndimage.label(body)
    if n == 0:
        return body
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    return components == largest


def body_box(body: np.ndarray, label_zyx: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Crop box (start, stop) (Z, Y, X): the ``body`` mask's box plus a margin, grown to contain all
    labeled foreground (never crop away annotation). The full volume if the body is empty."""
    shape = np.array(body.shape)
    found = _bbox(body)
    if found is None:
        return np.zeros(3, int), shape
    start, stop = found
    start, stop = np.maximum(start - BODY_MARGIN, 0), np.minimum(stop + BODY_MARGIN, shape)
    if label_zyx is not None:
        fg = _bbox(label_zyx > 0)
        if fg is not None:
            start, stop = np.minimum(start, fg[0]), np.maximum(stop, fg[1])
    return start, stop


def _normalise(array: np.ndarray, params: PreprocessParams, body: np.ndarray) -> np.ndarray:
    """``array`` clipped and normalised as ``params`` say; ``body`` (same shape) selects the voxels
    whose statistics a per-case z-score uses (all voxels if it is empty)."""
    if params.clip_window is not None:
        low, high = params.clip_window
        array = np.clip(array, low, high)
    if params.normalization == "ct":
        mean, std = params.intensity_mean_std
        return ((array - mean) / std).astype(np.float32)
    if params.normalization == "zscore":
        values = array[body] if body.any() else array
        std = float(values.std())
        return ((array - float(values.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
    # minmax: the window bounds (DHC: clip then scale to [0, 1]) so all cases share one scale
    low, high = params.clip_window if params.clip_window is not None else (float(array.min()), float(array.max()))
    if high <= low:
        return np.zeros_like(array, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _prepare(image: sitk.Image, params: PreprocessParams, label: Optional[sitk.Image] = None,
             ignore_label: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray], RestoreInfo]:
    """Resample, crop, clip, normalise ``image`` (and resample/crop ``label`` identically, its
    ``ignore_label`` voxels becoming :data:`UNANNOTATED`)."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    size, spacing = _target_grid(image, params.target_spacing)
    info_kwargs = dict(size=tuple(image.GetSize()), spacing=tuple(image.GetSpacing()),
                       origin=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()),
                       resampled_size=tuple(size), resampled_spacing=tuple(spacing))
    if params.target_spacing is not None:
        air = float(sitk.GetArrayViewFromImage(image).min())  # outside the field of view: the padding value
        image = _resample(image, size, spacing, image.GetOrigin(), image.GetDirection(), False, air)
        if label is not None:
            label = _resample(label, size, spacing, label.GetOrigin(), label.GetDirection(), True, 0)
    raw = sitk.GetArrayFromImage(image)
    lab = sitk.GetArrayFromImage(label) if label is not None else None
    if lab is not None and ignore_label is not None:
        # after the nearest-neighbour resampling (which keeps the value) and before the crop, so
        # that unannotated voxels do not grow the crop box as labeled foreground would
        # (a signed sentinel: in a uint8 label a plain -1 would wrap to 255)
        lab = np.where(lab == ignore_label, np.int16(UNANNOTATED), lab)
    body = body_mask(raw, params.body_threshold)
    if params.crop_to_body:
        start, stop = body_box(body, lab)
    else:
        start, stop = np.zeros(3, int), np.array(raw.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    info = RestoreInfo(crop_start=tuple(int(v) for v in start), crop_stop=tuple(int(v) for v in stop), **info_kwargs)
    out_label = np.rint(lab[box]).astype(np.int16) if lab is not None else None
    return _normalise(raw[box], params, body[box]), out_label, info


def preprocess_image(image: sitk.Image, params: PreprocessParams) -> Tuple[np.ndarray, RestoreInfo]:
    """Preprocess an image for training or inference.

    Returns:
        float32 (Z, Y, X) normalised array on the resampled, cropped grid, and the ``RestoreInfo``
        that :func:`restore_to_original` needs to map an array on that grid back.
    """
    array, _, info = _prepare(image, params)
    return array, info


def restore_to_original(array_zyx: np.ndarray, info: RestoreInfo, is_label: bool, fill: float = 0.0) -> sitk.Image:
    """Inverse of crop + resample: ``array_zyx`` (shape of the preprocessed case) on the original grid.

    Voxels outside the crop box get ``fill`` (background for labels). Labels use nearest-neighbour
    interpolation and keep their integer type; float maps use linear interpolation (float32).
    The result has exactly the original size, spacing, origin and direction.
    """
    start, stop = np.array(info.crop_start), np.array(info.crop_stop)
    if tuple(array_zyx.shape) != tuple(stop - start):
        raise ValueError(f"array shape {array_zyx.shape} does not match the crop box {tuple(stop - start)}")
    dtype = array_zyx.dtype if is_label else np.float32
    full = np.full(tuple(reversed(info.resampled_size)), fill, dtype=dtype)
    full[tuple(slice(a, b) for a, b in zip(start, stop))] = array_zyx
    image = sitk.GetImageFromArray(full)
    image.SetSpacing(info.resampled_spacing)
    image.SetOrigin(info.origin)
    image.SetDirection(info.direction)
    if info.resampled:
        image = _resample(image, info.size, info.spacing, info.origin, info.direction, is_label, fill)
    return image


def _source_stamp(case: Case, ignore_label: Optional[int] = None) -> Dict[str, Any]:
    """Size and mtime of the case's source files (all files of a DICOM folder), and the ignore
    label's value when there is one (it changes label.npy): cache validity key."""
    stamp: Dict[str, Any] = {} if ignore_label is None else {"ignore_label": int(ignore_label)}
    for role, path in (("image", case.image), ("label", case.label)):
        if path is None:
            continue
        files = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else [Path(path)]
        stats = [f.stat() for f in files]
        stamp[role] = [str(path), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)]
    return stamp


CACHE_ARRAYS = ("image", "label", "superpixels")
CACHE_META = "meta.json"


def _load_cache(folder: Path, stamp: Dict[str, Any], name: str) -> Optional[Preprocessed]:
    """The cached case in ``folder`` if it was made from the same source files, else None.

    Arrays are memory-mapped read-only (``mmap_mode='r'``): the pages come from the OS file cache,
    so processes reading the same case (torchrun ranks, DataLoader workers) share one copy.
    """
    try:
        meta = json.loads((folder / CACHE_META).read_text())
        if meta["stamp"] != stamp:
            return None
        arrays = {key: np.load(folder / f"{key}.npy", mmap_mode="r", allow_pickle=False) for key in meta["arrays"]}
        return Preprocessed(name=name, image=arrays["image"], label=arrays.get("label"),
                            superpixels=arrays.get("superpixels"), info=RestoreInfo.from_json(meta["info"]),
                            noise_sigma=meta.get("noise_sigma"))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache yet, or an unreadable one (crash of an older version, disk full): rebuild it


def _save_cache(folder: Path, case: Preprocessed, stamp: Dict[str, Any], new_arrays: Sequence[str]) -> None:
    """Write the arrays named in ``new_arrays`` (each atomically), then ``meta.json``, whose presence
    marks the case complete: a reader never pairs a new meta file with missing arrays."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for key in new_arrays:
            with atomic_write(folder / f"{key}.npy") as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, getattr(case, key), allow_pickle=False)
        present = [key for key in CACHE_ARRAYS if getattr(case, key) is not None]
        with atomic_write(folder / CACHE_META) as tmp:
            tmp.write_text(json.dumps({"stamp": stamp, "info": case.info.to_json(), "arrays": present,
                                       "noise_sigma": case.noise_sigma}))
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot write the preprocessing cache ({exc.strerror or exc}); "
                           "give a writable folder with --cache-dir") from None


def superpixels_for(image: np.ndarray, params: PreprocessParams, info: RestoreInfo) -> np.ndarray:
    """Superpixel ids (Z,Y,X) of a preprocessed volume; the same call in training and inference."""
    from ..method.superpixels import compute_superpixels

    if params.normalization != "minmax":
        # superpixel compactness is calibrated for [0, 1] intensities
        low, high = float(image.min()), float(image.max())
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    spacing_zyx = tuple(reversed(info.resampled_spacing))
    return compute_superpixels(image, params.superpixel_method, params.superpixel_pixels(spacing_zyx),
                              params.superpixel_compactness)


def preprocess_case(case: Case, params: PreprocessParams, cache_dir: Optional[Path],
                    with_superpixels: bool, ignore_label: Optional[int] = None) -> Preprocessed:
    """Preprocess ``case`` (image, label if any, superpixels if asked), reusing the cache.

    ``ignore_label`` (the dataset's, see :class:`~PLBOptCore.data.dataset.DatasetSpec`): label
    voxels of this value become :data:`UNANNOTATED` (-1) in the preprocessed label.

    The cache of a case is the folder ``cache_dir/<params.key()>/<case.name>/`` holding
    ``image.npy`` (float32), ``label.npy`` (int16), ``superpixels.npy`` (int32), all (Z, Y, X), and
    ``meta.json`` (geometry, and the noise level that goes with the superpixels); it is reused when
    the source files have the same size and mtime, and superpixels are added to it when first
    needed. Cached arrays come back memory-mapped read-only. The label is checked to lie on the
    image grid and then given the image's exact geometry, so that tiny header differences (DICOM
    spacing 0.9999999999999929 vs 1.0) do not shift it.

    Raises:
        DatasetError: unreadable source files, or a cache folder that cannot be written.
    """
    stamp = _source_stamp(case, ignore_label if case.label is not None else None)
    folder = Path(cache_dir) / params.key() / case.name if cache_dir is not None else None
    cached = _load_cache(folder, stamp, case.name) if folder is not None else None
    if cached is not None and (not with_superpixels or (cached.superpixels is not None
                                                         and cached.noise_sigma is not None)):
        return cached
    new_arrays = ["superpixels"] if cached is not None and cached.superpixels is None else []
    if cached is None:
        image = read_image(case.image)
        label = None
        if case.label is not None:
            label = read_image(case.label)
            check_same_geometry(image, label, case.image, case.label)
            label.CopyInformation(image)
        array, label_array, info = _prepare(image, params, label, ignore_label)
        cached = Preprocessed(case.name, array, label_array, None, info)
        new_arrays = [key for key in ("image", "label") if getattr(cached, key) is not None]
    if with_superpixels:
        from ..method.superpixels import noise_sigma

        if cached.superpixels is None:
            cached.superpixels = superpixels_for(cached.image, params, cached.info)
            new_arrays.append("superpixels")
        cached.noise_sigma = noise_sigma(cached.image)  # also fills in a cache written before it was stored
    if folder is not None:
        _save_cache(folder, cached, stamp, new_arrays)
    return cached
