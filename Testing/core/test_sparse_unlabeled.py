"""Sparse annotation (issue 23): with ``sparse_as_unlabeled`` a sparsely annotated training case also
joins the unlabeled cases, so its unannotated voxels feed CPS, refinement, triplet and mutual
correction. The unlabeled sampler must draw from those cases, without their labels, and a run whose
only unlabeled data they are must learn."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.api import predict, train
from PLBOptCore.config import CPU_DEMO_OVERRIDES, inert_settings, make_config
from PLBOptCore.convert.sparsify import SparseSpec, sparsify_label_file
from PLBOptCore.data.dataset import (SPARSE_UNLABELED_SUFFIX, Case, load_dataset, sparse_training_cases,
                                     with_sparse_as_unlabeled)
from PLBOptCore.data.io import case_name
from PLBOptCore.data.phantom import LABELS as PHANTOM_LABELS
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import ConfigError, DatasetError
from PLBOptCore.metrics import dice

IGNORE = max(PHANTOM_LABELS) + 1
SHAPE = (24, 48, 48)


def _sparse_phantom(root: Path, n_labeled: int, n_unlabeled: int, sparse: int, seed: int = 3,
                    shape=SHAPE) -> Path:
    """The phantom whose first ``sparse`` training labels are annotated on every 4th axial slice only,
    the rest marked ``ignore`` (value IGNORE, the highest)."""
    root = make_phantom_dataset(root, n_labeled=n_labeled, n_unlabeled=n_unlabeled, n_test=1, n_validation=0,
                                shape=shape, seed=seed)
    spec = load_dataset(root)
    for case in spec.training[:sparse]:
        sparsify_label_file(case.label, case.label, IGNORE, SparseSpec(every=4))
    data = json.loads((root / "dataset.json").read_text())
    data["labels"][str(IGNORE)] = "ignore"
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def test_only_sparse_training_cases_join_the_unlabeled_cases_without_their_label(tmp_path):
    spec = load_dataset(_sparse_phantom(tmp_path / "data", n_labeled=3, n_unlabeled=1, sparse=2))
    assert [case.name for case in sparse_training_cases(spec)] == [case.name for case in spec.training[:2]]
    joined = with_sparse_as_unlabeled(spec)
    assert joined.training == spec.training  # still labeled cases too
    assert joined.unlabeled[:1] == spec.unlabeled
    assert joined.unlabeled[1:] == [Case(case.name + SPARSE_UNLABELED_SUFFIX, case.image, None)
                                    for case in spec.training[:2]]
    assert len(spec.unlabeled) == 1  # the loaded spec is left as it was
    assert with_sparse_as_unlabeled(joined) == joined  # applying it twice changes nothing
    # a fully annotated dataset (no ignore label) is unchanged
    full = dataclasses.replace(spec, ignore_label=None)
    assert sparse_training_cases(full) == [] and with_sparse_as_unlabeled(full) is full


def test_a_name_taken_by_another_case_is_refused(tmp_path):
    spec = load_dataset(_sparse_phantom(tmp_path / "data", n_labeled=1, n_unlabeled=1, sparse=1))
    taken = spec.training[0].name + SPARSE_UNLABELED_SUFFIX
    clash = dataclasses.replace(spec, unlabeled=[Case(taken, spec.unlabeled[0].image)])
    with pytest.raises(DatasetError, match="is taken"):
        with_sparse_as_unlabeled(clash)


def test_the_switch_does_nothing_without_unlabeled_terms():
    assert inert_settings(make_config("supervised"), ["sparse_as_unlabeled"]) == {
        "sparse_as_unlabeled": "uses_unlabeled"}
    assert inert_settings(make_config("plbopt"), ["sparse_as_unlabeled"]) == {}


def _crop_of(patch: np.ndarray, volume: np.ndarray) -> bool:
    """Whether ``patch`` (Z,Y,X) equals a crop of ``volume`` (Z,Y,X), brute force."""
    shape = np.array(volume.shape) - np.array(patch.shape) + 1
    return any(np.array_equal(volume[z:z + patch.shape[0], y:y + patch.shape[1], x:x + patch.shape[2]], patch)
               for z in range(shape[0]) for y in range(shape[1]) for x in range(shape[2]))


def test_the_unlabeled_sampler_draws_from_the_sparse_cases_without_labels(tmp_path):
    data = _sparse_phantom(tmp_path / "data", n_labeled=2, n_unlabeled=0, sparse=2)
    config = make_config("plbopt", overrides=dict(CPU_DEMO_OVERRIDES, patch_size=(16, 32, 32), augment=False,
                                                  device="cpu", unlabeled_batch_size=3, sparse_as_unlabeled=True))
    # a trainer built directly (not through api.train) honours the setting too
    trainer = Trainer(config, load_dataset(data), tmp_path / "run")
    trainer.setup()
    sampler = trainer.unlabeled_sampler
    labeled_images = [np.asarray(image) for image in trainer.labeled_sampler._images]
    assert len(sampler._images) == 2 and all(label is None for label in sampler._labels)
    assert all(np.array_equal(a, b) for a, b in zip(sampler._images, labeled_images))
    # superpixels were computed for them (refinement is on), unlike for the labeled cases here
    assert all(superpixels is not None for superpixels in sampler._superpixels)
    for step in range(2):
        batch = sampler.sample(step)
        assert (batch["label"] == 0).all()  # labels are not used there: no -1, no class
        for patch in batch["image"][:, 0].numpy():
            assert any(_crop_of(patch, image) for image in labeled_images)


SCHEDULE = dict(CPU_DEMO_OVERRIDES, iterations=150, device="cpu", log_every=10,
                checkpoint_every=1000, validate_every=1000)


def _test_dice(run: Path, spec, out: Path) -> float:
    predict(run, [case.image for case in spec.test], out, checkpoint="last", device="cpu")
    case = spec.test[0]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_name(case.image)}.nii.gz")))
    return float(np.mean([dice(pred == c, truth == c) for c in range(1, spec.num_classes)]))


def test_a_run_whose_only_unlabeled_data_are_sparse_cases_learns(tmp_path):
    data = _sparse_phantom(tmp_path / "data", n_labeled=2, n_unlabeled=0, sparse=2, seed=5, shape=(48, 96, 96))
    with pytest.raises(ConfigError, match="needs unlabeled cases"):  # without the switch there are none
        train(data, tmp_path / "refused", preset="plbopt", overrides=SCHEDULE)
    run = train(data, tmp_path / "run", preset="plbopt", overrides=dict(SCHEDULE, sparse_as_unlabeled=True))
    spec = load_dataset(data)
    cache = data / ".plbopt_cache"
    copies = {path.name for path in cache.glob(f"*/*{SPARSE_UNLABELED_SUFFIX}")}
    assert copies == {case.name + SPARSE_UNLABELED_SUFFIX for case in spec.training}
    records = [r for r in read_events(run) if r["type"] == "train"]
    assert all(r["loss_unsup"] > 0 and r["loss_mc"] >= 0 for r in records)  # unlabeled terms were computed
    losses = [r["loss_sup"] for r in records]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    # an untrained network of the same run (the first step at a vanishing learning rate) as the baseline
    untrained = train(data, tmp_path / "untrained", preset="plbopt",
                      overrides=dict(SCHEDULE, sparse_as_unlabeled=True, iterations=1, lr=1e-12))
    before, after = _test_dice(untrained, spec, tmp_path / "pred0"), _test_dice(run, spec, tmp_path / "pred")
    assert after > before + 0.15, (before, after)
