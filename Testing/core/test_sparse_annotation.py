"""Sparse annotation with nnU-Net v2's ``ignore`` label (issue 23): data, losses, sampling, training
and evaluation. Unannotated voxels must add nothing to any supervised term or score, and ``ignore``
must never become a class (no output channel, no prediction, no evaluation row)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.config import make_config
from PLBOptCore.convert.sparsify import SparseSpec, sparsify_label_file
from PLBOptCore.data.dataset import Case, load_dataset, validate_dataset
from PLBOptCore.data.phantom import LABELS as PHANTOM_LABELS
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.data.plan import compute_fingerprint
from PLBOptCore.data.preprocess import UNANNOTATED, Preprocessed, PreprocessParams, RestoreInfo, preprocess_case
from PLBOptCore.data.sampling import PatchSampler, class_indices
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import DatasetError
from PLBOptCore.evaluate import evaluate_folders
from PLBOptCore.method.dhc import DiffDW, weighted_ce_loss, weighted_dice_ce_loss
from PLBOptCore.method.refine import refinement_gain

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=2, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2)
PHANTOM_IGNORE = max(PHANTOM_LABELS) + 1


def _write(array: np.ndarray, path: Path, spacing_xyz=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _nnunet_tree(root: Path, labels: dict, label_array: np.ndarray) -> Path:
    """One-case nnU-Net v2 dataset: a bright organ (the box of :func:`_organ_label_with_ignored_slices`)
    in a darker image, ``label_array`` as its label."""
    image = np.full(label_array.shape, 50, np.int16)
    image[:, 3:7, 3:7] = 200
    _write(image, root / "imagesTr" / "a_0000.nii.gz")
    _write(label_array.astype(np.uint8), root / "labelsTr" / "a.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


def _organ_label_with_ignored_slices() -> np.ndarray:
    """(8, 10, 10): an organ (1) in a background (0), annotated on slices 0 and 4 only (ignore = 2)."""
    label = np.zeros((8, 10, 10), np.uint8)
    label[:, 3:7, 3:7] = 1
    label[[1, 2, 3, 5, 6, 7]] = 2
    return label


# ---------------------------------------------------------------------------------------- data
def test_nnunet_ignore_label_is_no_class_and_its_voxels_are_valid(tmp_path):
    root = _nnunet_tree(tmp_path / "ds", {"background": 0, "organ": 1, "ignore": 2},
                        _organ_label_with_ignored_slices())
    spec = load_dataset(root)
    assert spec.labels == {0: "background", 1: "organ"}
    assert spec.num_classes == 2 and spec.ignore_label == 2
    assert set(spec.colors) == {0, 1}
    validate_dataset(spec, deep=True)  # the value 2 in the label file is allowed


def test_msd_ignore_label_is_read_the_same_way(tmp_path):
    root = _nnunet_tree(tmp_path / "ds", {"background": 0, "organ": 1, "ignore": 2},
                        _organ_label_with_ignored_slices())
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "organ", "2": "ignore"}, "colors": {"1": [255, 0, 0], "2": [9, 9, 9]},
        "training": [{"image": "imagesTr/a_0000.nii.gz", "label": "labelsTr/a.nii.gz"}]}))
    spec = load_dataset(root)
    assert (spec.labels, spec.ignore_label, spec.colors[1]) == ({0: "background", 1: "organ"}, 2, (255, 0, 0))
    validate_dataset(spec, deep=True)


@pytest.mark.parametrize("labels", [{"background": 0, "ignore": 1, "organ": 2},
                                    {"0": "background", "1": "ignore", "2": "organ"}])
def test_ignore_label_below_a_class_is_refused_in_one_line(tmp_path, labels):
    root = _nnunet_tree(tmp_path / "ds", {"background": 0, "organ": 1}, _organ_label_with_ignored_slices())
    data = json.loads((root / "dataset.json").read_text())
    if "0" in labels:  # MSD layout
        data = {"labels": labels, "training": [{"image": "imagesTr/a_0000.nii.gz", "label": "labelsTr/a.nii.gz"}]}
    else:
        data["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError) as error:
        load_dataset(root)
    message = str(error.value)
    assert message.startswith(str(root / "dataset.json") + ": ") and "\n" not in message
    assert "highest label value" in message


def test_label_values_beyond_ignore_are_refused_and_ignore_is_no_foreground(tmp_path):
    label = _organ_label_with_ignored_slices()
    label[0, 0, 0] = 3
    spec = load_dataset(_nnunet_tree(tmp_path / "bad", {"background": 0, "organ": 1, "ignore": 2}, label))
    with pytest.raises(DatasetError, match=r"label values \[3\] are not in dataset.json labels \(0..1, ignore 2\)"):
        validate_dataset(spec)
    only_ignore = np.where(_organ_label_with_ignored_slices() == 1, 2, 0)  # no annotated organ voxel
    spec = load_dataset(_nnunet_tree(tmp_path / "empty", {"background": 0, "organ": 1, "ignore": 2}, only_ignore))
    with pytest.raises(DatasetError, match="every training label is empty"):
        validate_dataset(spec)


def test_fingerprint_foreground_is_annotated_foreground_only(tmp_path):
    label = _organ_label_with_ignored_slices()
    spec = load_dataset(_nnunet_tree(tmp_path / "ds", {"background": 0, "organ": 1, "ignore": 2}, label))
    fingerprint = compute_fingerprint(spec, tmp_path / "cache")
    assert fingerprint["foreground"]["samples"] == int((label == 1).sum()) == 2 * 16
    assert fingerprint["foreground"]["mean"] == 200.0  # the ignored slices' darker voxels are no organ


# ---------------------------------------------------------------------------------- preprocessing
def _params(**changes) -> PreprocessParams:
    base = dict(target_spacing=None, clip_window=None, normalization="minmax", crop_to_body=False,
                superpixel_method="slic", superpixel_divisor=20, superpixel_compactness=0.1, body_threshold=None)
    return PreprocessParams(**{**base, **changes})


def test_resampling_keeps_the_ignore_label_as_the_unannotated_sentinel(tmp_path):
    label = np.zeros((8, 6, 6), np.uint8)
    label[:4] = 2  # slices 0-3 unannotated
    label[4:, 2:4, 2:4] = 1
    image = np.full(label.shape, 100, np.int16)
    case = Case("a", _write(image, tmp_path / "a.nii.gz", (1.0, 1.0, 2.0)),
                _write(label, tmp_path / "a_label.nii.gz", (1.0, 1.0, 2.0)))
    # z spacing 2 mm -> 1 mm: 16 slices, nearest neighbour
    pre = preprocess_case(case, _params(target_spacing=(1.0, 1.0, 1.0)), None, False, ignore_label=2)
    assert pre.label.shape == (16, 6, 6)
    assert set(np.unique(pre.label).tolist()) == {UNANNOTATED, 0, 1}
    assert (pre.label[:7] == UNANNOTATED).all() and (pre.label[9:] >= 0).all()
    assert (pre.label[9:15, 2:4, 2:4] == 1).all()  # slice 15 lies half a slice beyond the source: background


def test_unannotated_voxels_do_not_grow_the_body_crop_and_survive_it(tmp_path):
    image = np.zeros((16, 6, 6), np.int16)
    image[8:] = 100  # the body: slices 8-15, so the crop starts at 8 - BODY_MARGIN = 4
    label = np.zeros(image.shape, np.uint8)
    label[:6] = 2  # unannotated slices 0-5, partly outside the body
    label[10:, 2:4, 2:4] = 1
    case = Case("a", _write(image, tmp_path / "a.nii.gz"), _write(label, tmp_path / "a_label.nii.gz"))
    pre = preprocess_case(case, _params(crop_to_body=True), None, False, ignore_label=2)
    assert pre.info.crop_start == (4, 0, 0)  # as labeled foreground, the ignore voxels would have pulled it to 0
    np.testing.assert_array_equal(pre.label[:2], UNANNOTATED)  # slices 4 and 5
    assert (pre.label[2:] >= 0).all()


def test_the_cache_is_not_reused_when_the_ignore_label_changes(tmp_path):
    label = _organ_label_with_ignored_slices()
    case = Case("a", _write(np.where(label == 1, 200, 50).astype(np.int16), tmp_path / "a.nii.gz"),
                _write(label, tmp_path / "a_label.nii.gz"))
    assert preprocess_case(case, _params(), tmp_path / "cache", False).label.max() == 2
    sparse = preprocess_case(case, _params(), tmp_path / "cache", False, ignore_label=2)
    assert set(np.unique(sparse.label).tolist()) == {UNANNOTATED, 0, 1}


# ---------------------------------------------------------------------------------------- sampling
def _sparse_case(shape=(32, 16, 16)) -> Preprocessed:
    """Only slice 0 is annotated: background with a small organ; the rest is -1."""
    label = np.full(shape, UNANNOTATED, np.int16)
    label[0] = 0
    label[0, 6:10, 6:10] = 1
    info = RestoreInfo(size=shape[::-1], spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                       direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), resampled_size=shape[::-1], resampled_spacing=(1.0, 1.0, 1.0), crop_start=(0, 0, 0),
                       crop_stop=shape)
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return Preprocessed("a", image, label, None, info)


def test_labeled_patches_are_centred_on_annotated_voxels_only():
    case = _sparse_case()
    assert set(class_indices(case.label, 2)) == {1}  # the unannotated value is no class
    # no foreground oversampling: every patch is an "any voxel" patch, which must still hold annotation
    sampler = PatchSampler([case], (8, 8, 8), batch_size=4, num_classes=2, foreground_oversample=0.0,
                           augment=False, seed=0)
    for step in range(25):
        labels = sampler.sample(step)["label"]
        assert all((patch >= 0).any() for patch in labels), f"step {step}: a labeled patch holds no annotated voxel"


def test_fully_annotated_cases_are_sampled_as_before():
    case = _sparse_case()
    full = Preprocessed("a", case.image, np.zeros_like(case.label), None, case.info)
    sampler = PatchSampler([full], (8, 8, 8), batch_size=2, num_classes=2, foreground_oversample=0.0,
                           augment=False, seed=5)
    rng = np.random.default_rng([5, 3, 0])
    rng.integers(1, size=2)  # the case choice
    expected = []
    for _ in range(2):
        rng.random()
        expected.append(rng.integers(0, np.array(case.image.shape) - 8 + 1))
    batch = sampler.sample(3)
    for b, start in enumerate(expected):
        box = tuple(slice(s, s + 8) for s in start)
        np.testing.assert_array_equal(batch["image"][b, 0].numpy(), case.image[box])


# ---------------------------------------------------------------------------------------- losses
def _three_voxels() -> tuple:
    """Logits (1, 2, 1, 1, 3) and target (1, 1, 1, 3): voxel 0 logits [0, 0] target 0; voxel 1
    logits [0, ln 3] (softmax [1/4, 3/4]) target 1; voxel 2 logits [5, -5], not annotated."""
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, math.log(3.0), -5.0]]).reshape(1, 2, 1, 1, 3).requires_grad_(True)
    target = torch.tensor([0, 1, UNANNOTATED]).reshape(1, 1, 1, 3)
    return logits, target


def test_cross_entropy_leaves_unannotated_voxels_out():
    logits, target = _three_voxels()
    ce_0, ce_1 = math.log(2.0), -math.log(0.75)
    assert weighted_ce_loss(logits, target).item() == pytest.approx((ce_0 + ce_1) / 2, rel=1e-6)
    weighted = weighted_ce_loss(logits, target, torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((1 * ce_0 + 3 * ce_1) / (1 + 3), rel=1e-6)
    weighted.backward()
    assert torch.all(logits.grad[..., 2] == 0) and torch.any(logits.grad[..., :2] != 0)


def test_dice_and_ce_leave_unannotated_voxels_out():
    logits, target = _three_voxels()
    # soft Dice of class 1 on voxels 0-1 (smooth 1): TP = 3/4, FP = 1/2, FN = 1/4
    dice_1 = (2 * 0.75 + 1) / (2 * 0.75 + 0.5 + 0.25 + 1)
    ce = (math.log(2.0) - math.log(0.75)) / 2
    loss = weighted_dice_ce_loss(logits, target)
    assert loss.item() == pytest.approx(ce - dice_1, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[..., 2] == 0)
    weights = torch.tensor([1.0, 2.0])
    expected = (math.log(2.0) - 2 * math.log(0.75)) / 3 - 2 * dice_1
    assert weighted_dice_ce_loss(logits, target, weights).item() == pytest.approx(expected, rel=1e-6)


def test_diffdw_statistics_leave_unannotated_voxels_out():
    logits, target = _three_voxels()
    # argmax [0, 1, 0] against [0, 1, -]: both classes perfect on the annotated voxels, d = 1, so the
    # first update's dice_weight is m + (1 - m)(1 - d) = m; the unannotated voxel would make class 0
    # a false positive
    diffdw = DiffDW(2, momentum=0.9)
    diffdw.update(logits.detach(), target)
    torch.testing.assert_close(diffdw.dice_weight, torch.tensor([0.9, 0.9]))


def test_refinement_gain_is_scored_on_annotated_voxels_only():
    pseudo = torch.tensor([[1, 0, 0, 0]])
    refined = torch.tensor([[1, 1, 1, 1]])
    target = torch.tensor([[1, 1, UNANNOTATED, UNANNOTATED]])
    # class 1 on the first two voxels: Dice 2·1/(1+2) before, 2·2/(2+2) after
    gain = refinement_gain(pseudo, refined, target, 2)
    assert gain[1].item() == pytest.approx(1.0 - 2.0 / 3.0, rel=1e-6)


# ---------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def sparse_phantom(tmp_path_factory) -> Path:
    """The phantom with every 4th axial slice of its training and validation labels annotated, the
    rest marked ``ignore`` (value 7, the highest)."""
    root = make_phantom_dataset(tmp_path_factory.mktemp("sparse"), n_labeled=2, n_unlabeled=2, n_test=1,
                                n_validation=1, shape=(24, 48, 48), seed=3)
    spec = load_dataset(root)
    for case in spec.training + spec.validation:
        sparsify_label_file(case.label, case.label, PHANTOM_IGNORE, SparseSpec(every=4))
    data = json.loads((root / "dataset.json").read_text())
    data["labels"][str(PHANTOM_IGNORE)] = "ignore"
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def test_class_weights_count_annotated_voxels_only(sparse_phantom, tmp_path):
    spec = load_dataset(sparse_phantom)
    trainer = Trainer(make_config("dhc", overrides=TINY), spec, tmp_path / "run")
    trainer.setup()
    # the trainer's own preprocessed cases, read back from its cache
    prepared = [preprocess_case(case, PreprocessParams.from_config(trainer.config), trainer.cache_dir, False,
                                spec.ignore_label) for case in spec.training]
    annotated = np.concatenate([np.asarray(p.label)[np.asarray(p.label) >= 0] for p in prepared])
    assert (np.concatenate([np.asarray(p.label).ravel() for p in prepared]) == UNANNOTATED).mean() > 0.5
    expected = np.bincount(annotated, minlength=spec.num_classes)
    assert trainer.label_counts.shape == (spec.num_classes,) == (len(PHANTOM_LABELS),)
    np.testing.assert_array_equal(trainer.label_counts.numpy(), expected)


def test_every_4th_slice_dataset_trains_with_the_default_preset_without_an_ignore_class(sparse_phantom, tmp_path):
    from PLBOptCore.api import predict, train
    from PLBOptCore.engine.inference import Predictor

    run = train(sparse_phantom, tmp_path / "run", overrides=dict(TINY, validate_every=1))
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "plbopt"
    stored = json.loads((run / "dataset.json").read_text())
    assert stored["labels"] == {str(k): v for k, v in PHANTOM_LABELS.items()}
    assert stored["ignore_label"] == PHANTOM_IGNORE
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    train_records = [r for r in events if r["type"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(math.isfinite(r["loss_sup"]) and r["loss_sup"] != 0 for r in train_records)
    assert "ignore" not in train_records[-1]["class_weights"]["a"]
    validation = [r for r in events if r["type"] == "validation"]
    assert validation and "ignore" not in validation[-1]["dice"]

    predictor = Predictor.from_run(run, "last", "cpu")
    assert all(model.out_conv.out_channels == len(PHANTOM_LABELS) for model in predictor.models)
    spec = load_dataset(sparse_phantom)
    out = tmp_path / "predictions"
    written = predict(run, spec.test[0].image, out, checkpoint="last", device="cpu")
    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(written[0]))))
    assert set(values.tolist()) <= set(PHANTOM_LABELS)


# -------------------------------------------------------------------------------------- evaluation
# each of 2 slices, ignore = 2:    gt             pred
#                                  [1 1 2 2 0]    [1 0 1 1 0]
#                                  [0 1 2 2 0]    [1 1 0 1 1]
# annotated voxels (gt != 2), class 1, per slice: TP 2 (row 0 col 0, row 1 col 1), FP 2 (row 1 cols
# 0 and 4), FN 1 (row 0 col 1) -> nnU-Net Dice 2·4 / (2·4 + 4 + 2) = 4/7. Scored unmasked, the six
# organ voxels predicted where gt is "ignore" would be false positives: 8/20.
GT = np.array([[[1, 1, 2, 2, 0], [0, 1, 2, 2, 0]]] * 2, np.uint8)
PRED = np.array([[[1, 0, 1, 1, 0], [1, 1, 0, 1, 1]]] * 2, np.uint8)


def _eval_folders(tmp_path: Path, pred=PRED) -> tuple:
    _write(pred, tmp_path / "pred" / "a.nii.gz")
    _write(GT, tmp_path / "gt" / "a.nii.gz")
    return tmp_path / "pred", tmp_path / "gt"


@pytest.mark.parametrize("labels", [{"labels": {"background": 0, "organ": 1, "ignore": 2}},
                                    {"labels": {"0": "background", "1": "organ", "2": "ignore"}},
                                    {"labels": {"0": "background", "1": "organ"}, "ignore_label": 2}])
def test_evaluate_masks_ignore_voxels_as_nnunet_does(tmp_path, labels):
    pred_dir, gt_dir = _eval_folders(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps(labels))
    results = evaluate_folders(pred_dir, gt_dir, labels=tmp_path / "dataset.json")
    assert list(results["classes"]) == ["organ"] and results["labels"] == {"1": "organ"}
    assert results["cases"]["a"]["organ"]["dice"] == pytest.approx(4 / 7)
    assert results["mean"]["dice"] == pytest.approx(4 / 7)
    assert "ignore" not in (pred_dir / "metrics.csv").read_text()


def test_evaluate_refuses_an_ignore_label_below_a_class_and_an_ignore_prediction(tmp_path):
    pred_dir, gt_dir = _eval_folders(tmp_path)
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "ignore": 1, "organ": 2}}))
    with pytest.raises(DatasetError, match=r"^" + str(labels) + r": the \"ignore\" label must have the highest"):
        evaluate_folders(pred_dir, gt_dir, labels=labels)
    labels.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "ignore": 2}}))
    shutil.rmtree(pred_dir)
    pred_dir, _ = _eval_folders(tmp_path, pred=np.where(GT == 2, 2, PRED).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"label values \[2\] are not in the labels"):
        evaluate_folders(pred_dir, gt_dir, labels=labels)
