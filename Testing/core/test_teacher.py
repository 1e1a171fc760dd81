"""Mean teachers (``teacher_ema_decay``): the update on hand-computed tensors, and the trainer's
pseudo labels and checkpoint with them (resume: test_trainer.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from PLBOptCore.config import make_config, stored_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import ConfigError
from PLBOptCore.method.teacher import teacher_decay, update_teacher

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=3, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2, teacher_ema_decay=0.9)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=2, n_unlabeled=2, n_test=0,
                                n_validation=1, shape=(24, 48, 48), seed=3)


def _parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()  # a copy: cat of the parameters


def test_the_decay_warms_up_from_the_subnet_itself():
    # min(d, 1 - 1/(t + 1)): 0 after step 0 (the teacher is the subnet), 1/2, 2/3, 3/4, then d
    assert [teacher_decay(0.7, t) for t in range(5)] == [0.0, 0.5, pytest.approx(2 / 3), 0.7, 0.7]
    assert teacher_decay(0.0, 10) == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="teacher decay"):
            teacher_decay(bad, 0)


def test_update_is_the_moving_average_of_the_weights_and_copies_the_statistics():
    student, teacher = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)), nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
        teacher[0].bias.fill_(4.0)
        student[0].weight.copy_(torch.tensor([[3.0, 2.0]]))
        student[0].bias.fill_(0.0)
        student[1].running_mean.fill_(5.0)
        student[1].num_batches_tracked.fill_(7)
    update_teacher(teacher, student, 0.75)
    # 0.75·teacher + 0.25·student
    assert torch.equal(teacher[0].weight, torch.tensor([[1.5, -1.0]]))
    assert torch.equal(teacher[0].bias, torch.tensor([3.0]))
    assert torch.equal(teacher[1].running_mean, torch.tensor([5.0])) and int(teacher[1].num_batches_tracked) == 7
    assert torch.equal(student[0].weight, torch.tensor([[3.0, 2.0]])), "the student is left as it was"


def test_the_teachers_average_the_subnets_over_the_steps(tiny_dataset, tmp_path):
    trainer = Trainer(make_config("plbopt", overrides=TINY), load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    assert len(trainer.teachers) == 2 and not any(p.requires_grad for t in trainer.teachers for p in t.parameters())
    trainer.train_step()
    after_first = [_parameters(m) for m in trainer.models]
    for teacher, weights in zip(trainer.teachers, after_first):
        assert torch.equal(_parameters(teacher), weights), "after step 0 the teacher is the subnet"
    record = trainer.train_step()
    assert record["loss_unsup"] > 0 and record["loss_tri"] > 0 and record["loss_mc"] > 0
    for teacher, model, first in zip(trainer.teachers, trainer.models, after_first):
        # decay 1/2 after step 1: the mean of the subnet after steps 0 and 1
        torch.testing.assert_close(_parameters(teacher), (first + _parameters(model)) / 2, rtol=0, atol=1e-7)
        assert not torch.equal(_parameters(teacher), _parameters(model))


def test_pseudo_labels_of_unlabeled_patches_come_from_the_teachers(tiny_dataset, tmp_path):
    trainer = Trainer(make_config("dhc", overrides=TINY), load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    for _ in range(2):
        trainer.train_step()
    x = torch.rand(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    own = [torch.softmax(m(x)[0], dim=1).detach() for m in trainer.models]
    torch.manual_seed(1)  # the same dropout masks (training mode) in both teacher passes
    targets = trainer._target_probabilities(own, x, n_labeled=1)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = [torch.softmax(teacher(x[1:])[0], dim=1) for teacher in trainer.teachers]
    for target, subnet, teacher_probs in zip(targets, own, expected):
        assert torch.equal(target[:1], subnet[:1]), "the labeled patch keeps the subnet's own prediction"
        torch.testing.assert_close(target[1:], teacher_probs, rtol=0, atol=1e-6)
        assert not torch.allclose(target[1:], subnet[1:], atol=1e-4)


def test_without_the_key_or_without_unlabeled_terms_there_is_no_teacher(tiny_dataset, tmp_path):
    plain = Trainer(make_config("dhc", overrides=dict(TINY, teacher_ema_decay=None)), load_dataset(tiny_dataset),
                    tmp_path / "dhc")
    plain.setup()
    assert plain.teachers == [] and "teachers" not in plain.state_dict()
    supervised = Trainer(make_config("supervised", overrides=TINY), load_dataset(tiny_dataset), tmp_path / "sup")
    supervised.setup()
    assert supervised.teachers == []
    with pytest.raises(ConfigError, match="teacher_ema_decay"):
        make_config("dhc", overrides=dict(teacher_ema_decay=1.0))


def test_a_run_stored_before_the_key_existed_had_no_teacher(tmp_path):
    data = make_config("dhc").to_dict()
    del data["teacher_ema_decay"]
    assert stored_config(data, tmp_path / "config.json").teacher_ema_decay is None
    del data["class_weight_floor"]  # a key whose default changed is still refused
    with pytest.raises(ConfigError, match="class_weight_floor"):
        stored_config(data, tmp_path / "config.json")
