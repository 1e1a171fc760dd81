"""Bidirectional copy-paste (``labeled_copy_paste``, BCP): the boxes and the mixing on hand-computed
tensors, and the trainer's labels and pseudo labels of the copy-pasted patches."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch

from PLBOptCore.config import make_config, stored_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import ConfigError
from PLBOptCore.method.copypaste import CopyPaste, copy_paste, copy_paste_boxes
from PLBOptCore.utils import step_generator

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=2, iterations=3, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2, labeled_copy_paste=True)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=2, n_unlabeled=2, n_test=0,
                                n_validation=1, shape=(24, 48, 48), seed=3)


def _pair_case() -> CopyPaste:
    """Two labeled patches and one unlabeled patch of 1x1x3 voxels; boxes: labeled 0 its first
    voxel, labeled 1 its last, unlabeled 0 its middle one."""
    box = torch.tensor([[True, False, False], [False, False, True], [False, True, False]]).view(3, 1, 1, 3)
    return CopyPaste(n_labeled=2, box=box)


def test_boxes_are_two_thirds_of_every_side_at_random_positions():
    boxes = copy_paste_boxes(40, (12, 30, 33), torch.Generator().manual_seed(0))
    for box in boxes:
        extent = [box.any(dim=tuple(d for d in range(3) if d != axis)).nonzero().flatten() for axis in range(3)]
        sides = [int(e[-1] - e[0] + 1) for e in extent]
        assert sides == [8, 20, 22]
        assert int(box.sum()) == 8 * 20 * 22, "one solid cuboid"
    assert len({tuple(b.nonzero()[0].tolist()) for b in boxes}) > 10, "at random positions"


def test_mix_pastes_each_partner_inside_the_box_cyclically():
    paste = _pair_case()
    labeled = torch.tensor([[1, 2, 3], [4, 5, 6]]).view(2, 1, 1, 3)
    unlabeled = torch.tensor([7, 8, 9]).view(1, 1, 1, 3)
    mixed = paste.mix(labeled, unlabeled)
    # labeled 0 and 1 both show unlabeled 0 (0 mod 1, 1 mod 1); unlabeled 0 shows labeled 0
    assert mixed.view(3, 3).tolist() == [[7, 2, 3], [4, 5, 9], [7, 2, 9]]
    assert paste.from_labeled().view(3, 3).tolist() == [[False, True, True], [True, True, False],
                                                       [False, True, False]]
    # a channel dimension between batch and space moves with its voxel
    probs = torch.stack([labeled, 10 * labeled], dim=1).float()  # (2, 2, 1, 1, 3)
    mixed_probs = paste.mix(probs, torch.stack([unlabeled, 10 * unlabeled], dim=1).float())
    assert mixed_probs[2, :, 0, 0, 1].tolist() == [2.0, 20.0]


def test_targets_are_labels_then_the_seen_prediction_then_the_clean_pseudo_label_moved():
    paste = _pair_case()
    truth = torch.tensor([[-1, 1, 1], [2, -1, -1], [-1, 1, -1]]).view(3, 1, 1, 3)  # as mix() places it
    annotated = truth >= 0  # labeled 1's middle voxel carries no label (sparse annotation)
    seen = torch.tensor([[50, 51, 52], [53, 54, 55], [56, 57, 58]]).view(3, 1, 1, 3)
    clean = torch.tensor([[90, 91, 92]]).view(1, 1, 1, 3)
    targets = paste.targets(truth.clamp_min(0), seen, clean, annotated)
    # labeled 0: pasted voxel 0 ← clean 90, voxels 1-2 labeled. labeled 1: voxel 0 labeled, voxel 1
    # unannotated → its seen prediction 54, pasted voxel 2 ← clean 92. unlabeled 0: voxels 0 and 2
    # its own clean 90 and 92, pasted voxel 1 labeled 0's label 1
    assert targets.view(3, 3).tolist() == [[90, 1, 1], [2, 54, 92], [90, 1, 92]]


def test_a_step_draws_one_box_per_seen_patch():
    paste = copy_paste(2, 3, (16, 32, 32), torch.Generator().manual_seed(1))
    assert paste.n_labeled == 2 and paste.box.shape == (5, 16, 32, 32)
    assert paste.box.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([11 * 21 * 21 / (16 * 32 * 32)] * 5)


def test_subnets_learn_on_the_pasted_patches_and_take_targets_from_the_clean_ones(tiny_dataset, tmp_path,
                                                                                  monkeypatch):
    config = make_config("dhc", overrides=TINY)
    trainer = Trainer(config, load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    calls: List[List[tuple]] = [[] for _ in trainer.models]
    for seen_by, model in zip(calls, trainer.models):
        model.register_forward_hook(lambda _m, inputs, out, seen_by=seen_by: seen_by.append(
            (inputs[0].detach().clone(), torch.is_grad_enabled(), out[0].detach().clone())))
    import PLBOptCore.engine.trainer as trainer_module
    supervised_targets, cps_targets = [], []
    dice_ce, ce = trainer_module.weighted_dice_ce_loss, trainer_module.weighted_ce_loss
    monkeypatch.setattr(trainer_module, "weighted_dice_ce_loss",
                        lambda logits, target, weights=None: supervised_targets.append(target.clone())
                        or dice_ce(logits, target, weights))
    monkeypatch.setattr(trainer_module, "weighted_ce_loss",
                        lambda logits, target, weights=None: cps_targets.append(target.clone())
                        or ce(logits, target, weights))
    batch = trainer.loader.batch(0)
    x_l, y_l, x_u = batch["labeled"]["image"], batch["labeled"]["label"].long(), batch["unlabeled"]["image"]
    trainer.train_step()
    paste = copy_paste(2, 2, tuple(x_l.shape[2:]), step_generator(config.seed, 0))
    y_seen = paste.mix(y_l, torch.full_like(y_l, -1))
    for seen_by in calls:
        (labeled, grad_l, _), (unlabeled, grad_u, _), (target, grad_t, _) = seen_by  # separate BatchNorm passes
        assert grad_l and grad_u and not grad_t
        assert torch.equal(torch.cat([labeled, unlabeled]), paste.mix(x_l, x_u)), "both kinds are seen pasted"
        assert torch.equal(target, x_u), "the pseudo labels come from the clean unlabeled patches"
    assert (y_seen[2:] >= 0).any() and (y_seen[:2] < 0).any()
    for target in supervised_targets:  # subnet B's supervised loss (DHC), over every seen patch
        assert torch.equal(target, y_seen), "labels wherever a labeled patch is seen, nothing elsewhere"
    # A learns B's targets and B learns A's: labels, the seen prediction of nothing (dense labels),
    # the clean pass's argmax moved to where its voxels are seen
    for target, seen_by in zip(cps_targets, reversed(calls)):
        seen_logits = torch.cat([seen_by[0][2], seen_by[1][2]])
        expected = paste.targets(y_seen.clamp_min(0), seen_logits.argmax(dim=1), seen_by[2][2].argmax(dim=1),
                                 y_seen >= 0)
        assert torch.equal(target, expected)
        assert not torch.equal(target[2:], seen_by[2][2].argmax(dim=1)), "labels replaced some pseudo labels"


def test_the_refinement_self_check_leaves_out_what_the_labeled_patches_were_pasted(tiny_dataset, tmp_path,
                                                                                  monkeypatch):
    config = make_config("plbopt", overrides=dict(TINY, refine_homogeneity=0.0))
    trainer = Trainer(config, load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    checked = []
    original = trainer._self_check
    monkeypatch.setattr(trainer, "_self_check", lambda probs, pseudo, superpixels, target: checked.append(
        (superpixels.clone(), target.clone())) or original(probs, pseudo, superpixels, target))
    batch = trainer.loader.batch(0)
    trainer.train_step()
    box = copy_paste(2, 2, tuple(batch["labeled"]["image"].shape[2:]), step_generator(config.seed, 0)).box[:2]
    (superpixels, target), = checked
    assert (superpixels[box] == -1).all() and (target[box] == -1).all(), "the pasted voxels are not scored"
    assert torch.equal(superpixels[~box], batch["labeled"]["superpixels"].long()[~box])
    assert torch.equal(target[~box], batch["labeled"]["label"].long()[~box])


def test_copy_paste_and_strong_views_are_refused_together():
    with pytest.raises(ConfigError, match="choose one"):
        make_config("dhc", overrides=dict(labeled_copy_paste=True, unlabeled_strong_view=True))


def test_a_run_stored_before_the_key_existed_had_no_copy_paste(tmp_path):
    data = make_config("dhc").to_dict()
    del data["labeled_copy_paste"]
    assert stored_config(data, tmp_path / "config.json").labeled_copy_paste is False
