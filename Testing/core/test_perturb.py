"""Strong views (``unlabeled_strong_view``): the perturbation on hand-computed tensors, and the
trainer's targets from the clean patches with the losses on the perturbed ones."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch

from PLBOptCore.config import make_config, stored_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.method.perturb import CUTMIX_VOLUME, StrongView, adjust_intensity, cutmix_boxes, strong_view
from PLBOptCore.utils import step_generator

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=2, iterations=3, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2, unlabeled_strong_view=True)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=2, n_unlabeled=2, n_test=0,
                                n_validation=1, shape=(24, 48, 48), seed=3)


def test_intensity_is_brightness_then_contrast_around_the_patch_mean_then_noise():
    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(1, 1, 1, 1, 4)
    noise = torch.tensor([1.0, -1.0, 0.0, 2.0]).view(1, 1, 1, 1, 4)
    # ×1.5 → [0, 3, 6, 9], mean 4.5; (· − 4.5)·0.5 + 4.5 → [2.25, 3.75, 5.25, 6.75]; + 0.1·noise
    out = adjust_intensity(x, torch.tensor([1.5]), torch.tensor([0.5]), torch.tensor([0.1]), noise)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.35, 3.65, 5.25, 6.95]))
    # each patch its own draws: the second patch is left as it was
    two = adjust_intensity(torch.cat([x, x]), torch.tensor([1.5, 1.0]), torch.tensor([0.5, 1.0]),
                           torch.tensor([0.1, 0.0]), torch.cat([noise, noise]))
    torch.testing.assert_close(two[1], x[0])


def test_cutmix_boxes_are_one_cuboid_of_a_quarter_to_half_the_patch():
    generator = torch.Generator().manual_seed(0)
    shape = (16, 32, 32)
    boxes = cutmix_boxes(50, shape, generator)
    low, high = CUTMIX_VOLUME
    for box in boxes:
        extent = [box.any(dim=tuple(d for d in range(3) if d != axis)).nonzero().flatten() for axis in range(3)]
        sides = [int(e[-1] - e[0] + 1) for e in extent]
        assert int(box.sum()) == sides[0] * sides[1] * sides[2], "one solid cuboid"
        # each side is size·f^(1/3) rounded, so the volume is f·patch within the rounding
        assert 0.8 * low <= box.float().mean() <= 1.2 * high
    assert len({tuple(b.nonzero()[0].tolist()) for b in boxes}) > 10, "at random positions"


def test_mix_pastes_the_next_patch_inside_the_box_for_any_target():
    box = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    box[0, 0, 0, 0] = box[1, 0, 1, 1] = True
    labels = torch.stack([torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long)])
    view = StrongView(image=torch.zeros(2, 1, 1, 2, 2), box=box)
    mixed = view.mix(labels)
    assert mixed[0].flatten().tolist() == [1, 0, 0, 0], "patch 0 shows patch 1 inside its box"
    assert mixed[1].flatten().tolist() == [1, 1, 1, 0], "and patch 1 shows patch 0 (the next, cyclically)"
    probs = torch.stack([torch.tensor([0.9, 0.1]), torch.tensor([0.2, 0.8])]).view(2, 2, 1, 1, 1).expand(2, 2, 1, 2, 2)
    mixed_probs = view.mix(probs)  # a channel dimension between batch and space
    assert mixed_probs[0, :, 0, 0, 0].tolist() == pytest.approx([0.2, 0.8])
    assert mixed_probs[0, :, 0, 1, 1].tolist() == pytest.approx([0.9, 0.1])


def test_strong_view_is_the_jitter_cutmixed_and_a_single_patch_has_no_box():
    x = torch.randn(2, 1, 16, 32, 32)
    view = strong_view(x, torch.Generator().manual_seed(4))
    assert 0 < view.box[0].float().mean() < 1
    outside, inside = ~view.box[0], view.box[0]
    # outside the box the view is patch 0 jittered: an affine map of it plus noise, so still correlated
    assert torch.corrcoef(torch.stack([view.image[0, 0][outside], x[0, 0][outside]]))[0, 1] > 0.9
    assert torch.corrcoef(torch.stack([view.image[0, 0][inside], x[1, 0][inside]]))[0, 1] > 0.9
    single = strong_view(x[:1], torch.Generator().manual_seed(4))
    assert not single.box.any()
    assert not torch.allclose(single.image, x[:1])


class _Recorder:
    """Forward hooks that record what each subnet's forward saw and whether it kept gradients."""

    def __init__(self, models: List[torch.nn.Module]) -> None:
        self.calls: List[List[tuple]] = [[] for _ in models]
        for calls, model in zip(self.calls, models):
            model.register_forward_hook(lambda _m, inputs, _out, calls=calls:
                                        calls.append((inputs[0].detach().clone(), torch.is_grad_enabled())))


def test_subnets_learn_on_the_strong_view_and_take_targets_from_the_clean_patches(tiny_dataset, tmp_path):
    trainer = Trainer(make_config("plbopt", overrides=TINY), load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    recorder = _Recorder(trainer.models)
    batch = trainer.loader.batch(0)
    clean = batch["unlabeled"]["image"]
    trainer.train_step()
    expected = strong_view(clean, step_generator(trainer.config.seed, 0))
    for calls in recorder.calls:
        (labeled, grad_l), (seen, grad_s), (target, grad_t) = calls  # separate BatchNorm passes, then the targets'
        assert torch.equal(labeled, batch["labeled"]["image"]) and grad_l
        torch.testing.assert_close(seen, expected.image, msg="the unlabeled loss is learned on the strong view")
        assert grad_s
        assert torch.equal(target, clean) and not grad_t, "targets come from the clean patches, without gradients"


def test_without_the_key_the_subnets_see_the_clean_patches_once(tiny_dataset, tmp_path):
    trainer = Trainer(make_config("plbopt", overrides=dict(TINY, unlabeled_strong_view=False)),
                      load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    recorder = _Recorder(trainer.models)
    clean = trainer.loader.batch(0)["unlabeled"]["image"]
    trainer.train_step()
    for calls in recorder.calls:
        assert len(calls) == 2 and torch.equal(calls[1][0], clean)


def test_cps_targets_are_the_clean_pseudo_labels_mixed_as_the_image(tiny_dataset, tmp_path, monkeypatch):
    config = make_config("dhc", overrides=TINY)
    trainer = Trainer(config, load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    outputs: List[List[torch.Tensor]] = [[] for _ in trainer.models]
    for out, model in zip(outputs, trainer.models):
        model.register_forward_hook(lambda _m, _in, result, out=out: out.append(result[0].detach().clone()))
    targets = []
    import PLBOptCore.engine.trainer as trainer_module
    original = trainer_module.weighted_ce_loss

    def recording_ce(logits, target, weights=None):
        targets.append(target.clone())
        return original(logits, target, weights)

    monkeypatch.setattr(trainer_module, "weighted_ce_loss", recording_ce)
    clean = trainer.loader.batch(0)["unlabeled"]["image"]
    view = strong_view(clean, step_generator(config.seed, 0))
    trainer.train_step()
    n_labeled = config.batch_size
    # A learns B's pseudo labels and B learns A's: the labeled part from the pass that learns, the
    # unlabeled part from the clean pass (each subnet's third forward), mixed as the image
    for target, (labeled, _seen, clean_logits) in zip(targets, reversed(outputs)):
        assert torch.equal(target[:n_labeled], labeled.argmax(dim=1))
        assert torch.equal(target[n_labeled:], view.mix(clean_logits.argmax(dim=1)))
        assert not torch.equal(target[n_labeled:], clean_logits.argmax(dim=1)), "the box moved some labels"


def test_a_run_stored_before_the_key_existed_had_no_strong_view(tmp_path):
    data = make_config("dhc").to_dict()
    del data["unlabeled_strong_view"]
    assert stored_config(data, tmp_path / "config.json").unlabeled_strong_view is False
