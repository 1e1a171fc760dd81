"""Sliding-window inference with Gaussian blending, and the :class:`Predictor` used after training.

The ensemble is DHC's: softmax of the mean of subnet A's and B's logits. Windows overlap by
``overlap`` (fraction of the patch) and are blended with a Gaussian importance map (nnU-Net's
sigma = patch/8) so window borders, where a VNet sees least context, count least.

Memory: the probability volume is accumulated in float32 on the inference device, ``C × Z × Y × X × 4``
bytes (per reading of :func:`sliding_window_member_probabilities`) plus one volume for the weights, after preprocessing (body crop, optional resampling); a
volume whose accumulator does not fit in GPU memory is accumulated on the CPU instead. On CUDA the
subnets run under autocast (float16) and cuDNN autotunes its kernels for the fixed patch size.
Restoring a resampled prediction to the input grid adds about 14 bytes per input voxel (see
:func:`restore_prediction`).
"""

from __future__ import annotations

import itertools
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from ..config import CHECKPOINT_NAMES, SUBNETS, Config
from ..data.sampling import centred_padding, pad_to_patch
from ..errors import CheckpointError, ConfigError, PLBOptError
from ..nets.vnet import VNet
from ..utils import resolve_device
from .checkpoint import load_checkpoint

if TYPE_CHECKING:
    from ..data.preprocess import RestoreInfo

logger = logging.getLogger(__name__)


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """(Z,Y,X) weights peaking at the patch centre, normalised to max 1, strictly positive."""
    axes = []
    for size in patch_size:
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = weight / weight.max()
    return weight.clamp_min(1e-3)


def check_overlap(overlap: float) -> float:
    """``overlap`` as a float if it lies in [0, 1), else :class:`ConfigError`: a negative overlap
    spaces the windows more than a patch apart and leaves voxels that no window covers (confidence
    0, label background), and an overlap of 1 or more never advances the window."""
    try:
        value = float(overlap)
    except (TypeError, ValueError):
        raise ConfigError(f"overlap: must be a number in [0, 1), got {overlap!r}") from None
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ConfigError(f"overlap: must be in [0, 1) (the fraction of a patch that windows share), got {overlap!r}")
    return value


def window_starts(length: int, patch: int, overlap: float) -> List[int]:
    """Start offsets covering ``length`` with windows of ``patch`` and the requested overlap."""
    check_overlap(overlap)
    if length <= patch:
        return [0]
    stride = max(1, int(round(patch * (1.0 - overlap))))
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def sliding_window_probabilities(
    models: Sequence[torch.nn.Module],
    volume: torch.Tensor,
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    device: Optional[torch.device] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    amp: bool = True,
) -> torch.Tensor:
    """Blend softmax(mean of the models' logits) over overlapping windows.

    Args:
        volume: (Z, Y, X) float tensor, already preprocessed.
        amp: run the models under float16 autocast when ``device`` is CUDA (ignored elsewhere).
    Returns:
        (C, Z, Y, X) float32 probabilities on the CPU, summing to 1 over C.
    """
    return sliding_window_member_probabilities(models, {"all": range(len(models))}, volume, patch_size, num_classes,
                                               overlap, batch_size, device, should_stop, amp)["all"]


@torch.no_grad()
def sliding_window_member_probabilities(
    models: Sequence[torch.nn.Module],
    members: Mapping[str, Sequence[int]],
    volume: torch.Tensor,
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    device: Optional[torch.device] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    amp: bool = True,
) -> Dict[str, torch.Tensor]:
    """:func:`sliding_window_probabilities` of several ensembles of ``models`` from one pass of each.

    Each window goes through every model once; each member (a name and the indices of the models it
    averages: DHC's ensemble ``(0, 1)`` and each subnet alone ``(0,)``, ``(1,)``) gets the softmax of
    the mean of its models' logits, blended over windows. A member's probabilities are those of
    :func:`sliding_window_probabilities` with its models alone (bit for bit on the CPU, tested): a
    window's logits do not depend on what else is computed. Memory: one accumulator per member.

    Args:
        members: member name -> indices into ``models`` (each non-empty).
        volume: (Z, Y, X) float tensor, already preprocessed.
    Returns:
        member name -> (C, Z, Y, X) float32 probabilities on the CPU.
    """
    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    members = {name: [int(i) for i in indices] for name, indices in members.items()}
    used = sorted({i for indices in members.values() for i in indices})
    patch = [int(p) for p in patch_size]
    shape = list(volume.shape)
    padding = centred_padding(shape, patch)
    if any(before or after for before, after in padding):
        # the layout training crops include: centred, padded with the volume's minimum (air)
        volume = torch.from_numpy(pad_to_patch(volume.numpy(), patch, float(volume.min())))
    padded = list(volume.shape)
    accumulator_device = device
    probs: Dict[str, torch.Tensor] = {}
    try:  # on the device: no copy of every window's probabilities back to the host
        for name in members:
            probs[name] = torch.zeros([num_classes] + padded, dtype=torch.float32, device=device)
    except torch.cuda.OutOfMemoryError:
        logger.warning("probabilities of a %s volume do not fit in %s memory; accumulating on the CPU", padded, device)
        accumulator_device = torch.device("cpu")
        probs = {name: torch.zeros([num_classes] + padded, dtype=torch.float32) for name in members}
    weight_sum = torch.zeros(padded, dtype=torch.float32, device=accumulator_device)
    importance = gaussian_importance_map(patch).to(accumulator_device)
    volume = volume.to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()
    corners = list(itertools.product(*(window_starts(padded[d], patch[d], overlap) for d in range(3))))
    for first in range(0, len(corners), batch_size):
        if should_stop is not None and should_stop():
            from ..errors import TrainingInterrupted

            raise TrainingInterrupted("prediction cancelled")
        chunk = corners[first:first + batch_size]
        windows = torch.stack([volume[z:z + patch[0], y:y + patch[1], x:x + patch[2]] for z, y, x in chunk])
        windows = windows[:, None].to(device=device, dtype=torch.float32)
        with autocast:
            outputs = {i: models[i](windows)[0] for i in used}
        for name, indices in members.items():
            logits = sum(outputs[i].float() for i in indices) / len(indices)
            window_probs = torch.softmax(logits, dim=1).to(accumulator_device)
            for (z, y, x), window_prob in zip(chunk, window_probs):
                probs[name][:, z:z + patch[0], y:y + patch[1], x:x + patch[2]] += window_prob * importance
        for z, y, x in chunk:
            weight_sum[z:z + patch[0], y:y + patch[1], x:x + patch[2]] += importance
    (z0, _), (y0, _), (x0, _) = padding
    return {name: member.div_(weight_sum)[:, z0:z0 + shape[0], y0:y0 + shape[1], x0:x0 + shape[2]].contiguous().cpu()
            for name, member in probs.items()}


def build_models(config: Config, num_classes: int) -> List[VNet]:
    """The subnets a config trains: [A, B] for dual presets, [A] for `supervised`."""
    count = 2 if config.dual_subnets else 1
    projection_dim = config.projection_dim if config.triplet else 0  # the head only feeds the triplet loss
    return [VNet(1, num_classes, config.base_filters, config.dropout, projection_dim) for _ in range(count)]


def load_subnet_weights(models: Sequence[torch.nn.Module], states, source: Path) -> None:
    """Load per-subnet state dicts; any mismatch is a :class:`CheckpointError` naming ``source``."""
    if not isinstance(states, (list, tuple)) or len(states) != len(models):
        found = len(states) if isinstance(states, (list, tuple)) else 0
        raise CheckpointError(f"{source}: has {found} subnets, this configuration needs {len(models)}")
    for model, state in zip(models, states):
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{source}: weights do not fit this network "
                                  f"(different classes or base filters?): {first}") from None


def select_subnets(models: Sequence[torch.nn.Module], subnet: str, source: Path) -> List[torch.nn.Module]:
    """The models that predict: ``"both"`` (all, logits averaged), ``"a"`` or ``"b"`` alone."""
    if subnet not in SUBNETS:
        raise ConfigError(f"subnet must be one of {', '.join(SUBNETS)}, got {subnet!r}")
    if subnet == "both":
        return list(models)
    index = "ab".index(subnet)
    if index >= len(models):
        raise ConfigError(f"{source}: has no subnet {subnet!r} (a supervised run has subnet a only)")
    return [models[index]]


@dataclass
class Prediction:
    label: sitk.Image  # uint8/uint16 label map in the input's geometry
    confidence: sitk.Image  # float32 max softmax in the input's geometry
    refine_changed_fraction: float = 0.0
    postprocess_removed_voxels: int = 0  # voxels outside their class's largest component (postprocess.py)


@dataclass(frozen=True)
class Reading:
    """One prediction of an image (:meth:`Predictor.predict_image_readings`).

    ``subnet``: ``"a"`` or ``"b"`` alone, or None for the predictor's own models (DHC's ensemble
    unless it was built for one subnet); ``refine`` and ``postprocess`` as in
    :meth:`Predictor.predict_image`.
    """

    subnet: Optional[str] = None
    refine: bool = False
    postprocess: bool = True


class Predictor:
    """Loads a trained run and predicts label + confidence maps in the input image's geometry."""

    def __init__(self, config: Config, labels: Dict[int, str], colors: Dict[int, Tuple[int, int, int]],
                 model_states: List[Dict[str, torch.Tensor]], device: str = "auto", source: Path = Path("checkpoint"),
                 subnet: str = "both", refine_gain: Optional[torch.Tensor] = None,
                 refine_gain_validation: Optional[torch.Tensor] = None,
                 largest_component_gain_validation: Optional[torch.Tensor] = None) -> None:
        from ..postprocess import class_ids, largest_component_classes

        self.config = config
        # classes whose refinement the run's checks (labeled patches, validation cases) left on (None: all)
        self.refine_allowed = refine_allowed_classes(config, refine_gain, refine_gain_validation)
        # classes whose largest component alone scored better on the validation cases
        self.largest_component_classes = class_ids(largest_component_classes(largest_component_gain_validation))
        self.labels = labels
        self.colors = colors
        self.num_classes = len(labels)
        if self.largest_component_classes:
            logger.info("postprocessing (chosen on the validation cases): largest component only of %s",
                        ", ".join(labels.get(c, str(c)) for c in self.largest_component_classes))
        self.device = resolve_device(device)
        self.models = build_models(config, self.num_classes)
        load_subnet_weights(self.models, model_states, source)
        self.models = select_subnets(self.models, subnet, source)
        # the subnet each of self.models is, so that a Reading can ask for one of them alone
        self.subnet_names = list("ab"[:len(self.models)]) if subnet == "both" else [subnet]
        self.source = source
        for model in self.models:
            model.to(self.device).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every window has the patch size: tune the kernels once

    @classmethod
    def from_checkpoint(cls, path: Path, device: str = "auto", subnet: str = "both") -> "Predictor":
        state = load_checkpoint(path)
        try:
            config = Config.from_dict(state["config"])
            labels = {int(k): str(v) for k, v in state["labels"].items()}
            colors = {int(k): tuple(v) for k, v in state.get("colors", {}).items()}
            models = state["models"]
            refine_gain = state.get("refine_gain")
            refine_gain_validation = state.get("refine_gain_validation")  # absent without validation cases
            component_gain = state.get("largest_component_gain_validation")  # and from earlier checkpoints
            if component_gain is not None:
                component_gain = torch.as_tensor(component_gain, dtype=torch.float32)
                if component_gain.shape != (len(labels),):
                    raise ValueError(f"largest_component_gain_validation has shape {tuple(component_gain.shape)} "
                                     f"for {len(labels)} classes")
        except KeyError as exc:
            raise CheckpointError(f"{path}: checkpoint lacks {exc}") from None
        except (PLBOptError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: malformed checkpoint metadata ({exc})") from None
        return cls(config, labels, colors, models, device, source=path, subnet=subnet, refine_gain=refine_gain,
                   refine_gain_validation=refine_gain_validation, largest_component_gain_validation=component_gain)

    @classmethod
    def from_run(cls, run_dir: Path, checkpoint: str = "best", device: str = "auto", subnet: str = "both") -> "Predictor":
        return cls.from_checkpoint(resolve_checkpoint(run_dir, checkpoint), device, subnet)

    def predict_probabilities(self, volume_zyx: np.ndarray, should_stop=None) -> torch.Tensor:
        """(C, Z, Y, X) probabilities of a preprocessed (Z, Y, X) volume."""
        return sliding_window_probabilities(
            self.models, torch.from_numpy(np.ascontiguousarray(volume_zyx, dtype=np.float32)),
            self.config.patch_size, self.num_classes, self.config.sw_overlap, self.config.sw_batch_size,
            self.device, should_stop, amp=self.config.amp)

    def refine(self, volume_zyx: np.ndarray, probs: torch.Tensor,
               superpixels: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """Refine the argmax of ``probs`` as training refined pseudo labels (:func:`refine_prediction`),
        only the classes the run's checks left on."""
        from ..method.superpixels import noise_sigma

        sigma = noise_sigma(volume_zyx) if self.config.refine_homogeneity else 0.0  # None: refused below
        return refine_prediction(self.config, volume_zyx, probs, superpixels, sigma, self.refine_allowed)

    def predict_image(self, image: sitk.Image, refine: bool = False, should_stop=None,
                      postprocess: bool = True) -> Prediction:
        """Preprocess like training, predict, optionally refine with superpixels, restore geometry,
        then (``postprocess``) keep the largest component of the classes the run's validation chose
        (:attr:`largest_component_classes`, see :mod:`PLBOptCore.postprocess`)."""
        return self.predict_image_readings(image, [Reading(refine=refine, postprocess=postprocess)], should_stop)[0]

    def predict_image_readings(self, image: sitk.Image, readings: Sequence[Reading],
                               should_stop=None) -> List[Prediction]:
        """Several predictions of one image (:meth:`predict_image` for each reading) from one
        preprocessing and one sliding-window pass of each subnet: the ensemble, each subnet alone,
        refined or not, postprocessed or not. Each equals what :meth:`predict_image` of a predictor
        built for that subnet writes, bit for bit."""
        from ..data.preprocess import PreprocessParams, preprocess_image, superpixels_for

        members = {reading.subnet: self.check_reading(reading) for reading in readings}
        params = PreprocessParams.from_config(self.config)
        volume, info = preprocess_image(image, params)
        probabilities = sliding_window_member_probabilities(
            self.models, members, torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)),
            self.config.patch_size, self.num_classes, self.config.sw_overlap, self.config.sw_batch_size,
            self.device, should_stop, amp=self.config.amp)
        superpixels = None
        if any(reading.refine for reading in readings):
            superpixels = torch.from_numpy(superpixels_for(volume, params, info).astype(np.int64))
        predictions = []
        for reading in readings:
            probs = probabilities[reading.subnet]
            refined, changed = self.refine(volume, probs, superpixels) if reading.refine else (None, 0.0)
            label_image, confidence_image = restore_prediction(probs, info, self.num_classes, refined)
            removed = 0
            if reading.postprocess:
                label_image, confidence_image, removed = postprocess_images(label_image, confidence_image,
                                                                            self.largest_component_classes)
            predictions.append(Prediction(label_image, confidence_image, float(changed), removed))
        return predictions

    def check_reading(self, reading: Reading) -> List[int]:
        """Indices into :attr:`models` of ``reading``'s subnet (None: all of them); a subnet this
        predictor lacks is a :class:`ConfigError`."""
        if reading.subnet is None:
            return list(range(len(self.models)))
        if reading.subnet not in ("a", "b"):  # "both" is a predictor's choice (select_subnets), not a reading's
            raise ConfigError(f"a reading's subnet is None (the predictor's models), 'a' or 'b', "
                              f"got {reading.subnet!r}")
        if reading.subnet not in self.subnet_names:
            raise ConfigError(f"{self.source}: has no subnet {reading.subnet!r} "
                              f"(this predictor has {', '.join(self.subnet_names)}; a supervised run has subnet a only)")
        return [self.subnet_names.index(reading.subnet)]


def postprocess_images(label: sitk.Image, confidence: sitk.Image,
                       classes: Sequence[int]) -> Tuple[sitk.Image, sitk.Image, int]:
    """:func:`PLBOptCore.postprocess.postprocess_maps` on a label and confidence image pair (same
    geometry kept); returns the images and the number of voxels removed."""
    from ..postprocess import postprocess_maps

    labels, confidences, removed = postprocess_maps(sitk.GetArrayViewFromImage(label),
                                                    sitk.GetArrayViewFromImage(confidence), classes)
    if not removed:
        return label, confidence, 0
    images = []
    for array, reference in ((labels, label), (confidences, confidence)):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        images.append(image)
    return images[0], images[1], removed


def refine_prediction(config: Config, volume_zyx: np.ndarray, probs: torch.Tensor, superpixels: torch.Tensor,
                      noise_sigma: float, allowed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, float]:
    """Refine the argmax of a whole volume's probabilities with training's rule: ``config``'s
    τ, entropy and mode, only in homogeneous superpixels (``refine_homogeneity`` × ``noise_sigma``).

    Args:
        volume_zyx: (Z, Y, X) preprocessed volume; probs: (C, Z, Y, X) softmax on the same grid;
        superpixels: (Z, Y, X) long ids; noise_sigma: the volume's noise level (unused when
        ``refine_homogeneity`` is 0); allowed: (C,) bool classes that may be refined (None = all).

    Returns:
        (Z, Y, X) long refined labels and the fraction of voxels with a superpixel that changed.
    """
    from ..method.refine import homogeneous_superpixels, refine_pseudo_labels

    superpixels = superpixels.to(probs.device)[None]
    if config.refine_homogeneity is None:
        raise ConfigError("refine_homogeneity is not decided: a run decides it from its dataset's modality "
                          "(data/plan.py: with_modality_defaults) and stores it with its checkpoints")
    if config.refine_homogeneity > 0:
        # a copy: cached volumes are read-only memory maps
        image = torch.from_numpy(np.array(volume_zyx, dtype=np.float32))[None].to(probs.device)
        superpixels = homogeneous_superpixels(superpixels, image, torch.tensor([noise_sigma], dtype=torch.float32),
                                              config.refine_homogeneity)
    refined, changed = refine_pseudo_labels(probs[None], probs.argmax(dim=0)[None], superpixels, config.refine_tau,
                                            config.refine_entropy, config.refine_mode, allowed)
    return refined[0], changed


def refine_allowed_classes(config: Config, labeled_gain: Optional[torch.Tensor],
                           validation_gain: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """(C,) bool classes refinement may change: those whose gain is ≥ 0 on the labeled patches
    (running mean of the self-check) and, where given, on the validation cases (inference: the
    run's last check of them). None = all (``refine_self_check`` off, or nothing measured)."""
    if not config.refine_self_check:
        return None
    gains = [g for g in (labeled_gain, validation_gain) if g is not None]
    return torch.stack(gains).ge(0).all(dim=0) if gains else None


def restore_prediction(probs: torch.Tensor, info: RestoreInfo, num_classes: int,
                       refined: Optional[torch.Tensor] = None) -> Tuple[sitk.Image, sitk.Image]:
    """Label and confidence maps of a preprocessed volume as images in the input's geometry.

    Args:
        probs: (C, Z, Y, X) float softmax probabilities on the preprocessed grid.
        info: the :class:`RestoreInfo` from ``preprocess_image``.
        num_classes: C; labels are written as uint8, or uint16 above 255 classes.
        refined: optional (Z, Y, X) long class ids of superpixel refinement, used instead of the
            argmax of ``probs``.

    Returns:
        (label image, float32 confidence image = max probability; with resampling, the maximum of
        the restored class maps, so refined labels that change nothing give the unrefined maps).
        Outside the body crop the network is certain of background, not unsure, so the confidence
        there is 1.

    When preprocessing resampled the image (``target_spacing``), each class map is resampled back
    linearly and the label is the argmax on the input grid, as nnU-Net does: boundaries follow the
    input's voxels instead of the coarse grid's blocks that nearest-neighbour label resampling
    gives. Refined labels are restored through the probabilities too: at a voxel refinement
    changed, the probabilities of the predicted and the new class trade places, so the new class
    wins there with the network's own confidence, and where refinement changed nothing the label
    is exactly the unrefined one. (Restoring one-hot maps of the labels ties at every boundary
    midpoint of a 2× resampling, where ``argmax`` gives each tie to the lower class: background
    took the rim of every organ: -4.7 Dice points against the unrefined labels on the phantom test
    set. One-hot vectors only at the changed voxels still cost 0.3: more certain than their
    neighbours, they spread their class past the voxel. Swapped: -0.04; docs/METHOD.md.)
    Classes are restored one at a time against a running maximum, so this needs about 14 bytes per
    input voxel (running max, one restored class and its SimpleITK image, label, comparison mask)
    plus 8 per resampled voxel, not C float maps of the input's size. Without resampling the argmax
    is taken on the preprocessed grid and pasted back, which gives the same labels.
    """
    from ..data.preprocess import restore_to_original

    dtype = np.uint8 if num_classes <= 255 else np.uint16
    probs = probs.cpu()
    if info.resampled and refined is None:
        return _argmax_in_input_geometry(lambda c: probs[c].numpy(), num_classes, info, dtype)
    confidence, label = probs.max(dim=0)
    if info.resampled:  # refined: the network's probabilities, the old and new class's swapped where it changed
        refined = refined.cpu()
        changed = refined != label
        new_class_probability = probs.gather(0, refined[None])[0]

        def refined_class_map(c: int) -> np.ndarray:
            swapped = torch.where(refined == c, confidence, torch.where(label == c, new_class_probability, probs[c]))
            return torch.where(changed, swapped, probs[c]).numpy()

        return _argmax_in_input_geometry(refined_class_map, num_classes, info, dtype)
    if refined is not None:
        label = refined.cpu()
    confidence_image = restore_to_original(confidence.numpy().astype(np.float32), info, is_label=False, fill=1.0)
    return restore_to_original(label.numpy().astype(dtype), info, is_label=True), confidence_image


def _argmax_in_input_geometry(class_map: Callable[[int], np.ndarray], num_classes: int, info: RestoreInfo,
                              dtype: type) -> Tuple[sitk.Image, sitk.Image]:
    """(argmax label image, max value image) over the class maps ``class_map(c)`` (Z, Y, X) on the
    preprocessed grid, each restored linearly to the input grid (background 1 outside the crop).
    Ties go to the lower class, as ``argmax`` does."""
    from ..data.preprocess import restore_to_original

    best = label = None
    for c in range(num_classes):
        restored = restore_to_original(class_map(c), info, is_label=False, fill=1.0 if c == 0 else 0.0)
        values = sitk.GetArrayViewFromImage(restored)
        if best is None:
            best, label = values.copy(), np.zeros(values.shape, dtype)
            continue
        better = values > best
        label[better] = c
        np.maximum(best, values, out=best)
    images = []
    for array in (label, best):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(info.spacing)
        image.SetOrigin(info.origin)
        image.SetDirection(info.direction)
        images.append(image)
    return images[0], images[1]


def resolve_checkpoint(run_dir: Path, checkpoint: str = "best") -> Path:
    """``best`` (falls back to ``last``), ``last``, or an explicit path."""
    run_dir = Path(run_dir)
    if checkpoint in CHECKPOINT_NAMES:
        folder = run_dir / "checkpoints"
        candidates = [folder / f"{checkpoint}.pt"] + ([folder / "last.pt"] if checkpoint == "best" else [])
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{run_dir}: no {checkpoint} checkpoint in {folder} (was training run here?)")
    return Path(checkpoint)


def run_labels(run_dir: Path) -> Dict[int, str]:
    """Class names of a run (from its dataset.json copy)."""
    data = json.loads((Path(run_dir) / "dataset.json").read_text())
    return {int(k): v for k, v in data["labels"].items()}
