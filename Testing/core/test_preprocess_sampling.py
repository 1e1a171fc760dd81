"""Preprocessing (resample, crop, clip, normalise, cache, exact restore) and patch sampling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.config import Config
from PLBOptCore.data import preprocess as preprocess_module
from PLBOptCore.data.dataset import Case
from PLBOptCore.data.io import write_image
from PLBOptCore.data.preprocess import (BODY_MARGIN, Preprocessed, PreprocessParams, preprocess_case,
                                        preprocess_image, restore_to_original)
from PLBOptCore.data.sampling import PatchSampler, augment_batch, class_indices
from PLBOptCore.errors import DatasetError
from PLBOptCore.method.superpixels import noise_sigma

DICOM = Path("/work/shared/data/dicom-ct-3slice")
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated: restore must keep it


def _params(**kw) -> PreprocessParams:
    base = dict(target_spacing=None, clip_window=(-75.0, 275.0), normalization="minmax", crop_to_body=True,
                superpixel_method="slic", superpixel_divisor=50, superpixel_compactness=0.1)
    base.update(kw)
    return PreprocessParams(**base)


def _phantom(shape=(12, 40, 36)):
    """Air, a body box of soft tissue with an 'organ', a separate small couch blob; label of the organ."""
    hu = np.full(shape, -1000, np.int16)
    hu[2:10, 8:30, 6:28] = 40
    hu[4:8, 12:20, 10:16] = 200
    hu[2:4, 36:38, 30:34] = 100  # couch: a small component the crop must ignore
    label = np.zeros(shape, np.uint8)
    label[4:8, 12:20, 10:16] = 1
    return hu, label


def _image(array, spacing=(0.9, 0.8, 2.0), origin=(-20.0, 10.0, 55.0), direction=DIRECTION) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _case(tmp_path: Path, name="c0", label=True) -> Case:
    hu, lab = _phantom()
    image_path = tmp_path / "src" / f"{name}.nii.gz"
    write_image(_image(hu), image_path)
    label_path = None
    if label:
        label_path = tmp_path / "src" / f"{name}_label.nii.gz"
        write_image(_image(lab), label_path)
    return Case(name, image_path, label_path)


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            and a.GetDirection() == b.GetDirection())


# ---- parameters and intensities ------------------------------------------------------------------

def test_params_from_config_and_key():
    params = PreprocessParams.from_config(Config(target_spacing=(2, 1, 1)))
    assert params.target_spacing == (2.0, 1.0, 1.0) and params.clip_window == (-75.0, 275.0)
    assert params.key() == PreprocessParams.from_config(Config(target_spacing=(2, 1, 1))).key()
    assert params.key() != PreprocessParams.from_config(Config()).key()
    assert len(params.key()) == 12


def test_minmax_and_zscore_normalisation():
    hu, _ = _phantom()
    array, _ = preprocess_image(_image(hu), _params())
    assert array.dtype == np.float32 and array.min() == 0.0  # air clipped to the window floor
    assert np.isclose(array.max(), (200 + 75) / 350)  # the window bounds, not the volume's, set the scale
    array, _ = preprocess_image(_image(hu), _params(normalization="zscore", clip_window=None))
    # the mean and std are the body's (the box of tissue, -500 HU and up), not the air's around it
    body = array[array > array.min()]
    assert abs(body.mean()) < 1e-5 and abs(body.std() - 1) < 1e-4 and array.min() < -10


def test_crop_to_body_ignores_couch_and_keeps_label(tmp_path):
    hu, label = _phantom()
    array, info = preprocess_image(_image(hu), _params())
    m = BODY_MARGIN
    assert info.crop_start == (0, 8 - m, 6 - m) and info.crop_stop == (12, 30 + m, 28 + m)
    assert array.shape == tuple(np.subtract(info.crop_stop, info.crop_start))
    # foreground annotated outside the body (here: on the couch) must never be cropped away
    label[2:4, 36:38, 30:34] = 1
    write_image(_image(hu), tmp_path / "a.nii.gz")
    write_image(_image(label), tmp_path / "a_label.nii.gz")
    case = preprocess_case(Case("a", tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz"), _params(), None, False)
    assert case.label.dtype == np.int16 and case.label.sum() == label.sum()
    _, info = preprocess_image(_image(hu), _params(crop_to_body=False))
    assert info.crop_start == (0, 0, 0) and info.crop_stop == hu.shape


# ---- restore ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target_spacing", [None, (1.0, 0.4, 0.45)])  # native, and exactly 2× finer
def test_restore_label_is_exact_inverse(tmp_path, target_spacing):
    case = _case(tmp_path)
    pre = preprocess_case(case, _params(target_spacing=target_spacing), None, False)
    original = sitk.ReadImage(str(case.label))
    restored = restore_to_original(pre.label, pre.info, is_label=True)
    assert _same_geometry(restored, original)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(original))


def test_restore_float_map_after_coarse_resampling(tmp_path):
    case = _case(tmp_path)
    pre = preprocess_case(case, _params(target_spacing=(3.0, 1.3, 1.1)), None, False)
    assert pre.info.resampled and pre.image.shape[0] == 8  # 12 slices × 2 mm / 3 mm
    original = sitk.ReadImage(str(case.image))
    restored = restore_to_original(pre.image, pre.info, is_label=False, fill=-1.0)
    assert _same_geometry(restored, original) and restored.GetPixelID() == sitk.sitkFloat32
    array = sitk.GetArrayFromImage(restored)
    assert array[0, 0, 0] == -1.0  # outside the crop box
    assert np.isclose(array[5, 15, 12], (200 + 75) / 350, atol=0.05)  # inside the bright organ
    label = restore_to_original(pre.label, pre.info, is_label=True)
    overlap = (sitk.GetArrayFromImage(label) == sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))).mean()
    assert label.GetPixelID() == sitk.sitkInt16 and overlap > 0.97
    with pytest.raises(ValueError, match="crop box"):
        restore_to_original(pre.image[1:], pre.info, is_label=False)


def _sphere_probabilities(info, centre_mm, radius_mm, width_mm=1.0) -> torch.Tensor:
    """(2, Z, Y, X) softmax-like background/sphere probabilities on the preprocessed grid of
    ``info`` (identity direction, no crop), smooth across the sphere's surface."""
    zyx = np.indices(tuple(b - a for a, b in zip(info.crop_start, info.crop_stop)), dtype=np.float64)
    spacing, origin = info.resampled_spacing[::-1], info.origin[::-1]
    distance = np.sqrt(sum((origin[d] + zyx[d] * spacing[d] - centre_mm[d]) ** 2 for d in range(3)))
    inside = 1.0 / (1.0 + np.exp((distance - radius_mm) / width_mm))
    return torch.from_numpy(np.stack([1.0 - inside, inside]).astype(np.float32))


def test_resampled_prediction_is_restored_from_probabilities(tmp_path):
    from PLBOptCore.engine.inference import restore_prediction

    shape, spacing_zyx, origin_zyx = (24, 48, 44), (1.5, 0.5, 0.6), (3.0, -8.0, 12.0)
    image = sitk.GetImageFromArray(np.zeros(shape, np.int16))
    image.SetSpacing(spacing_zyx[::-1])
    image.SetOrigin(origin_zyx[::-1])
    _, info = preprocess_image(image, _params(target_spacing=(3.0, 2.0, 2.1), crop_to_body=False))
    assert info.resampled
    centre, radius = (20.0, 4.0, 25.0), 7.3
    probs = _sphere_probabilities(info, centre, radius)

    label_image, confidence_image = restore_prediction(probs, info, num_classes=2)
    assert _same_geometry(label_image, image) and _same_geometry(confidence_image, image)
    label = sitk.GetArrayFromImage(label_image)
    # the same argmax as restoring all class maps at once and comparing them (what the running max avoids)
    stacked = np.stack([sitk.GetArrayFromImage(restore_to_original(probs[c].numpy(), info, False, fill=float(c == 0)))
                        for c in range(2)])
    np.testing.assert_array_equal(label, stacked.argmax(axis=0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(confidence_image), stacked.max(axis=0))

    # closer to the true sphere on the input grid than nearest-neighbour resampling of coarse labels
    zyx = np.indices(shape, dtype=np.float64)
    distance = np.sqrt(sum((origin_zyx[d] + zyx[d] * spacing_zyx[d] - centre[d]) ** 2 for d in range(3)))
    truth = distance < radius
    blocky = sitk.GetArrayFromImage(restore_to_original(probs.argmax(0).numpy().astype(np.uint8), info, True)) == 1
    smooth_dice = 2 * (truth & (label == 1)).sum() / (truth.sum() + (label == 1).sum())
    blocky_dice = 2 * (truth & blocky).sum() / (truth.sum() + blocky.sum())
    print(f"Dice with the true sphere: probabilities restored {smooth_dice:.4f}, nearest labels {blocky_dice:.4f}")
    assert smooth_dice > blocky_dice + 0.02, (smooth_dice, blocky_dice)

    # refined labels that change nothing restore to exactly the unrefined labels (restoring one-hot
    # label maps instead moves every boundary: ties at the midpoints go to background)
    unchanged_image, unchanged_confidence = restore_prediction(probs, info, 2, refined=probs.argmax(0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(unchanged_image), label)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(unchanged_confidence), sitk.GetArrayFromImage(confidence_image))

    # refinement removed the left half of the sphere: gone there, untouched away from the cut
    refined = probs.argmax(0)
    cut = refined.shape[2] // 2
    refined[:, :, :cut] = 0
    refined_image, refined_confidence = restore_prediction(probs, info, 2, refined=refined)
    refined_label = sitk.GetArrayFromImage(refined_image)
    x_mm = origin_zyx[2] + np.arange(shape[2]) * spacing_zyx[2]
    coarse_x = info.resampled_spacing[0]  # SimpleITK order: x first
    cut_mm = info.origin[0] + (info.crop_start[2] + cut - 0.5) * coarse_x
    left, right = x_mm < cut_mm - coarse_x, x_mm > cut_mm + coarse_x  # beyond the interpolation's reach
    assert (label[:, :, left] == 1).any() and not (refined_label[:, :, left] == 1).any()
    np.testing.assert_array_equal(refined_label[:, :, right], label[:, :, right])
    confidence, refined_confidence = (sitk.GetArrayFromImage(image) for image in (confidence_image, refined_confidence))
    np.testing.assert_array_equal(refined_confidence[:, :, right], confidence[:, :, right])


def test_unresampled_prediction_is_pasted_back(tmp_path):
    from PLBOptCore.engine.inference import restore_prediction

    hu, _ = _phantom()
    image = _image(hu)
    _, info = preprocess_image(image, _params())
    assert not info.resampled and info.crop_start != (0, 0, 0)
    probs = torch.softmax(torch.randn((3,) + tuple(b - a for a, b in zip(info.crop_start, info.crop_stop)),
                                      generator=torch.Generator().manual_seed(0)), dim=0)
    label_image, confidence_image = restore_prediction(probs, info, num_classes=3)
    assert _same_geometry(label_image, image) and label_image.GetPixelID() == sitk.sitkUInt8
    box = tuple(slice(a, b) for a, b in zip(info.crop_start, info.crop_stop))
    label, confidence = sitk.GetArrayFromImage(label_image), sitk.GetArrayFromImage(confidence_image)
    np.testing.assert_array_equal(label[box], probs.argmax(0).numpy())
    np.testing.assert_allclose(confidence[box], probs.max(0).values.numpy())
    outside = np.ones(label.shape, bool)
    outside[box] = False
    assert (label[outside] == 0).all() and (confidence[outside] == 1.0).all()


def test_real_dicom_series_with_nrrd_label():
    case = Case("ct", DICOM / "ct", DICOM / "liver_spine_seg.nrrd")
    pre = preprocess_case(case, _params(), None, False)
    assert set(np.unique(pre.label)) == {0, 1, 2} and pre.image.shape[1] < 512  # cropped to the body
    restored = restore_to_original(pre.label, pre.info, is_label=True)
    reference = sitk.ReadImage(str(DICOM / "liver_spine_seg.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(reference))
    assert restored.GetSize() == reference.GetSize()


# ---- cache -----------------------------------------------------------------------------------------

def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    case = _case(tmp_path)
    params, cache = _params(), tmp_path / "cache"
    first = preprocess_case(case, params, cache, with_superpixels=False)
    case_dir = cache / params.key() / "c0"
    assert sorted(p.name for p in case_dir.iterdir()) == ["image.npy", "label.npy", "meta.json"]
    assert first.superpixels is None

    def no_read(path):
        raise AssertionError(f"{path} read although cached")

    monkeypatch.setattr(preprocess_module, "read_image", no_read)
    again = preprocess_case(case, params, cache, with_superpixels=False)
    np.testing.assert_array_equal(again.image, first.image)
    np.testing.assert_array_equal(again.label, first.label)
    assert again.info == first.info
    # memory-mapped read-only: processes reading the case share the OS page cache
    assert isinstance(again.image, np.memmap) and isinstance(again.label, np.memmap)
    assert not again.image.flags.writeable

    # superpixels are added to the cached case without re-reading the source
    with_sp = preprocess_case(case, params, cache, with_superpixels=True)
    assert with_sp.superpixels.dtype == np.int32 and with_sp.superpixels.shape == first.image.shape
    assert with_sp.superpixels.min() >= 0
    np.testing.assert_array_equal(preprocess_case(case, params, cache, True).superpixels, with_sp.superpixels)
    # the noise level of refinement's homogeneity test is stored with them
    assert with_sp.noise_sigma == noise_sigma(with_sp.image)
    assert json.loads((case_dir / "meta.json").read_text())["noise_sigma"] == with_sp.noise_sigma
    assert preprocess_case(case, params, cache, True).noise_sigma == with_sp.noise_sigma
    # a cache written before the noise level was stored gets it without recomputing the superpixels
    meta = json.loads((case_dir / "meta.json").read_text())
    (case_dir / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "noise_sigma"}))
    monkeypatch.setattr(preprocess_module, "superpixels_for", lambda *a: pytest.fail("superpixels recomputed"))
    assert preprocess_case(case, params, cache, True).noise_sigma == with_sp.noise_sigma
    assert json.loads((case_dir / "meta.json").read_text())["noise_sigma"] == with_sp.noise_sigma

    # a changed source file (new mtime) is read again
    monkeypatch.undo()
    stat = case.image.stat()
    os.utime(case.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    monkeypatch.setattr(preprocess_module, "read_image", no_read)
    with pytest.raises(AssertionError, match="read although cached"):
        preprocess_case(case, params, cache, with_superpixels=False)


def test_corrupt_cache_is_rebuilt(tmp_path):
    case = _case(tmp_path, label=False)
    params, cache = _params(), tmp_path / "cache"
    preprocess_case(case, params, cache, with_superpixels=False)
    image_file = cache / params.key() / "c0" / "image.npy"
    image_file.write_bytes(b"\x93NUMPYgarbage")
    pre = preprocess_case(case, params, cache, with_superpixels=False)
    assert pre.label is None and pre.image.ndim == 3 and not isinstance(pre.image, np.memmap)
    assert isinstance(preprocess_case(case, params, cache, False).image, np.memmap)
    (cache / params.key() / "c0" / "meta.json").write_text("{not json")
    assert preprocess_case(case, params, cache, False).image.shape == pre.image.shape


def test_unwritable_cache_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(DatasetError) as err:
        preprocess_case(_case(tmp_path), _params(), blocker / "cache", with_superpixels=False)
    assert str(err.value).startswith(str(blocker / "cache")) and "--cache-dir" in str(err.value)


# ---- sampling --------------------------------------------------------------------------------------

def _sample_case(shape=(24, 40, 40), small_class=True, seed=0) -> Preprocessed:
    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32)
    label = np.zeros(shape, np.int16)
    label[:, : shape[1] // 2] = 1  # a large class
    if small_class:
        label[20:22, 34:36, 34:36] = 2  # 8 voxels in a corner
    superpixels = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    return Preprocessed("s", image, label, superpixels, info=None)


def test_sampler_is_deterministic_in_seed_and_step():
    cases = [_sample_case(seed=0), _sample_case(seed=1)]
    sampler = PatchSampler(cases, (16, 16, 16), 3, 3, 0.5, augment=True, seed=7)
    a, b = sampler.sample(5), PatchSampler(cases, (16, 16, 16), 3, 3, 0.5, True, seed=7).sample(5)
    assert a["image"].shape == (3, 1, 16, 16, 16) and a["image"].dtype == torch.float32
    assert a["label"].shape == (3, 16, 16, 16) and a["label"].dtype == torch.int64
    assert a["superpixels"].dtype == torch.int64
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["image"], sampler.sample(6)["image"])
    assert not torch.equal(a["image"], PatchSampler(cases, (16, 16, 16), 3, 3, 0.5, True, seed=8).sample(5)["image"])
    other_stream = PatchSampler(cases, (16, 16, 16), 3, 3, 0.5, True, seed=7, stream=1).sample(5)
    assert not torch.equal(a["image"], other_stream["image"])


def test_padding_of_small_volumes_and_unlabeled_defaults():
    labeled = _sample_case(shape=(6, 10, 12))
    unlabeled = Preprocessed("u", np.full((6, 10, 12), 0.25, np.float32), None, None, None)
    for case, label_value in ((labeled, None), (unlabeled, 0)):
        batch = PatchSampler([case], (8, 16, 16), 2, 3, 1.0, augment=False, seed=0).sample(0)
        image, label, sp = batch["image"][0, 0], batch["label"][0], batch["superpixels"][0]
        assert image.shape == (8, 16, 16)
        assert (image == float(case.image.min())).sum() >= 8 * 16 * 16 - 6 * 10 * 12
        if case.label is not None:
            assert int((sp >= 0).sum()) == 6 * 10 * 12 and int((sp == -1).sum()) == 8 * 16 * 16 - 6 * 10 * 12
            assert int(label.sum()) == int(case.label.sum())  # whole volume fits: every label voxel is in
        else:
            assert int(label.abs().sum()) == 0 and bool((sp == -1).all())


def _hits(foreground_oversample: float) -> float:
    sampler = PatchSampler([_sample_case()], (8, 8, 8), 8, 3, foreground_oversample, augment=False, seed=0)
    return float(np.mean([(sampler.sample(s)["label"] == 2).flatten(1).any(1).float().mean() for s in range(40)]))


def test_class_aware_oversampling_finds_tiny_class():
    uniform, oversampled = _hits(0.0), _hits(1.0)
    # the tiny class is one of two present classes: about half the oversampled patches contain it
    assert oversampled > 0.4 and uniform < 0.1 and oversampled > 5 * uniform


def test_class_indices_are_bounded_and_correct():
    label = _sample_case().label
    indices = class_indices(label, 3, max_per_class=100)
    assert set(indices) == {1, 2} and len(indices[2]) == 8 and len(indices[1]) == 100
    assert (label.ravel()[indices[1]] == 1).all() and (label.ravel()[indices[2]] == 2).all()
    assert class_indices(label, 2).keys() == {1}  # values >= num_classes are ignored


def _aligned_batch(shape=(2, 6, 8, 8)):
    superpixels = torch.arange(int(np.prod(shape))).reshape(shape)
    label = superpixels % 5
    image = (superpixels.float() * 1e-3)[:, None]
    return {"image": image, "label": label, "superpixels": superpixels, "other": torch.ones(3)}


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_image_label_superpixels_aligned(seed):
    batch = _aligned_batch()
    out = augment_batch(batch, torch.Generator().manual_seed(seed))
    assert torch.equal(out["label"], out["superpixels"] % 5)  # same geometric transform
    assert torch.equal(out["other"], batch["other"]) and torch.equal(batch["label"], batch["superpixels"] % 5)
    for b in range(2):
        sp, image = out["superpixels"][b].double() * 1e-3, out["image"][b, 0].double()
        # image = scale * original + shift, with scale in [0.9, 1.1] and shift in [-0.1, 0.1]
        scale = (image.flatten()[1] - image.flatten()[0]) / (sp.flatten()[1] - sp.flatten()[0])
        shift = image.flatten()[0] - scale * sp.flatten()[0]
        assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1
        assert torch.allclose(image, scale * sp + shift, atol=1e-4)
        assert sorted(out["superpixels"][b].flatten().tolist()) == sorted(batch["superpixels"][b].flatten().tolist())


def test_augmentation_uses_flips_and_rotations():
    batch = _aligned_batch()
    seen = set()
    for seed in range(40):
        out = augment_batch(batch, torch.Generator().manual_seed(seed))["superpixels"][0]
        corner = out[0, 0, 0].item()
        seen.add((corner, out[0, 0, 1].item() - corner))  # which corner came first, and its row/column step
    # 8 corners × 2 in-plane orientations are reachable with flips + 90° turns; flips alone give 8
    assert len(seen) == 16
    non_square = {"image": torch.zeros(1, 1, 4, 6, 8), "label": torch.zeros(1, 4, 6, 8, dtype=torch.long),
                  "superpixels": torch.zeros(1, 4, 6, 8, dtype=torch.long)}
    assert augment_batch(non_square, torch.Generator().manual_seed(0))["label"].shape == (1, 4, 6, 8)
