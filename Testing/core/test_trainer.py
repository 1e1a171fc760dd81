"""Trainer, checkpoints, events, inference and CLI on a tiny phantom dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.config import PRESETS, make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.checkpoint import load_checkpoint, save_checkpoint
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.inference import Predictor
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import CheckpointError, ConfigError, TrainingInterrupted

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=2, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=2, n_unlabeled=2, n_test=1,
                                n_validation=1, shape=(24, 48, 48), seed=3)


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()  # a copy: cat of the parameters


EXPECTED_TERMS = {
    "supervised": set(),
    "dhc": {"loss_unsup"},
    "plbopt": {"loss_unsup", "loss_tri", "loss_mc"},
    "plbopt-paper": {"loss_unsup", "loss_tri", "loss_mc"},
    "refine-only": {"loss_unsup"},
    "triplet-only": {"loss_unsup", "loss_tri"},
    "mc-only": {"loss_unsup", "loss_mc"},
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_one_step_of_each_preset_updates_every_subnet_and_logs_its_terms(preset, tiny_dataset, tmp_path):
    trainer = Trainer(make_config(preset, overrides=dict(TINY, iterations=1)), load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    before = [_weights(m) for m in trainer.models]
    trainer.train_step()
    assert len(trainer.models) == (1 if preset == "supervised" else 2)
    for old, model in zip(before, trainer.models):
        assert not torch.equal(old, _weights(model)), "a subnet did not change"

    trainer = Trainer(make_config(preset, overrides=dict(TINY, iterations=1)), load_dataset(tiny_dataset),
                      tmp_path / "run2")
    trainer.fit()
    records = [r for r in read_events(tmp_path / "run2") if r["type"] == "train"]
    assert [r["step"] for r in records] == [1]
    record = records[0]
    for term in ("loss_unsup", "loss_tri", "loss_mc"):
        if term in EXPECTED_TERMS[preset]:
            assert record[term] > 0, f"{preset}: {term} should be active"
        else:
            assert record[term] == 0, f"{preset}: {term} should be off"
    assert record["loss_sup"] > 0
    assert (record["refine_changed_fraction"] >= 0) and (preset in ("plbopt", "plbopt-paper", "refine-only") or record["refine_changed_fraction"] == 0)
    for key in ("step", "loss", "loss_sup", "loss_unsup", "loss_tri", "loss_mc", "lr", "refine_changed_fraction", "seconds"):
        assert key in record


@pytest.mark.parametrize("overrides", [
    dict(triplet_banks="shared"), dict(triplet_confidence="refined"),
    dict(mc_reduction="mean_masked", mc_target="refined"), dict(projection_dim=8)])
def test_triplet_and_mutual_correction_variants_train(overrides, tiny_dataset, tmp_path):
    trainer = Trainer(make_config("plbopt", overrides=dict(TINY, iterations=2, **overrides)),
                      load_dataset(tiny_dataset), tmp_path / "run")
    trainer.setup()
    if overrides.get("triplet_banks") == "shared":
        assert trainer.triplet_losses[0] is trainer.triplet_losses[1]
    before = [_weights(m) for m in trainer.models]
    records = [trainer.train_step() for _ in range(2)]
    for old, model in zip(before, trainer.models):
        assert not torch.equal(old, _weights(model))
    assert records[-1]["loss_tri"] > 0 and records[-1]["loss_mc"] > 0
    if overrides.get("triplet_banks") == "shared":  # both subnets' candidates went to the one bank
        bank = trainer.triplet_losses[0].positive[0]
        assert len(bank) > 0
        # the checkpoint holds the one bank once, and a resumed trainer gets it back for both subnets
        state = trainer.state_dict()
        assert len(state["triplet"]) == 1
        resumed = Trainer(trainer.config, load_dataset(tiny_dataset), tmp_path / "resumed")
        resumed.setup()
        resumed.load_state_dict(state)
        assert resumed.triplet_losses[0] is resumed.triplet_losses[1]
        assert torch.equal(resumed.triplet_losses[1].positive[0].features(), bank.features())
    else:
        assert len(trainer.state_dict()["triplet"]) == len(trainer.models)


def test_mc_target_refined_needs_the_teacher_mode():
    with pytest.raises(ConfigError, match="mc_target"):
        make_config("plbopt", overrides=dict(mc_target="refined", mc_mode="paper"))


def test_refinement_starts_after_refine_start_of_the_run(tiny_dataset, tmp_path):
    trainer = Trainer(make_config("refine-only", overrides=dict(TINY, iterations=3, refine_start=0.5)),
                      load_dataset(tiny_dataset), tmp_path / "run")
    trainer.fit()
    changed = [r["refine_changed_fraction"] for r in read_events(tmp_path / "run") if r["type"] == "train"]
    assert changed[:2] == [0.0, 0.0] and changed[2] > 0  # steps 0 and 1 (< 1.5) skipped, step 2 refined
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="refine_start"):
            make_config("plbopt", overrides=dict(refine_start=bad))


@pytest.mark.parametrize("extra", [{}, {"teacher_ema_decay": 0.9}, {"unlabeled_strong_view": True, "batch_size": 2},
                                   {"labeled_copy_paste": True}],
                         ids=["plain", "mean-teachers", "strong-views", "copy-paste"])
def test_resume_reproduces_an_uninterrupted_run(tiny_dataset, tmp_path, extra):
    config = make_config("plbopt", overrides=dict(TINY, iterations=4, **extra))
    full = Trainer(config, load_dataset(tiny_dataset), tmp_path / "full")
    full.fit()

    stop_after = {"count": 0}

    def should_stop() -> bool:
        stop_after["count"] += 1
        return stop_after["count"] > 2  # polled before each step: stop after 2 steps

    first = Trainer(config, load_dataset(tiny_dataset), tmp_path / "cut", should_stop=should_stop)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        first.fit()
    checkpoint = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 2
    assert len(checkpoint.get("teachers", [])) == (2 if "teacher_ema_decay" in extra else 0)
    assert read_events(tmp_path / "cut")[-1]["status"] == "interrupted"

    resumed = Trainer(config, load_dataset(tiny_dataset), tmp_path / "cut", resume=True)
    resumed.fit()
    assert resumed.step == 4
    # the subnets and any mean teachers; a strong view's draws come from (seed, step), not from state
    for a, b in zip(full.models + full.teachers, resumed.models + resumed.teachers):
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), f"{name} differs after resume"


def test_run_folder_is_protected(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        Trainer(make_config("dhc", overrides=TINY), load_dataset(tiny_dataset), run)
    # the temporary through which another rank is writing the lock is not a run's output
    pending = tmp_path / "pending"
    pending.mkdir()
    (pending / ".tmp-lock-999999").write_text("rank 0 at work")
    Trainer(make_config("dhc", overrides=TINY), load_dataset(tiny_dataset), pending)
    assert not (pending / ".tmp-lock-999999").exists()  # and rank 0 clears such leftovers
    with pytest.raises(ConfigError, match="nothing to resume"):
        Trainer(make_config("dhc", overrides=TINY), load_dataset(tiny_dataset), tmp_path / "empty", resume=True)


def test_checkpoints_are_atomic_and_verified(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "models": []})
    save_checkpoint(path, {"step": 2, "models": []})
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(path.with_name("last.pt.prev"))["step"] == 1
    assert not list(tmp_path.glob(".tmp-*"))
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a PLBOpt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/plbopt-pwned"),))


def test_pickle_payload_is_not_executed(tmp_path):
    marker = Path("/tmp/plbopt-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"format": "plbopt-checkpoint", "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_prediction_is_written_in_the_input_geometry(tiny_dataset, tmp_path):
    from PLBOptCore.api import predict

    trainer = Trainer(make_config("dhc", overrides=dict(TINY, iterations=1)), load_dataset(tiny_dataset), tmp_path / "run")
    trainer.fit()
    spec = load_dataset(tiny_dataset)
    source = sitk.ReadImage(str(spec.test[0].image))
    # A non-trivial direction and origin must survive preprocessing and restoration.
    source.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    source.SetOrigin((12.5, -40.0, 3.25))
    image_path = tmp_path / "input" / "case_a.nrrd"
    image_path.parent.mkdir()
    sitk.WriteImage(source, str(image_path))
    written = predict(tmp_path / "run", image_path.parent, tmp_path / "out", device="cpu")
    # in the input's format; the confidence map in its own folder, so "out" holds label maps only
    assert [p.name for p in written] == ["case_a.nrrd"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_a.nrrd", "confidence"]
    for name in ("case_a.nrrd", "confidence/case_a.nrrd"):
        out = sitk.ReadImage(str(tmp_path / "out" / name))
        assert out.GetSize() == source.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), source.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(out.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(out.GetDirection(), source.GetDirection(), atol=1e-6)
    confidence = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "confidence" / "case_a.nrrd")))
    assert confidence.min() > 0 and confidence.max() <= 1.0 + 1e-5


def test_cli_reports_user_errors_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    result = subprocess.run([sys.executable, "-m", "PLBOptCore", "train", str(tmp_path / "data"), "-o", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "data") in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "Resources" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_sample_configs_are_valid(path):
    from PLBOptCore.config import load_config_file

    overrides = load_config_file(path)  # unknown keys or invalid values raise ConfigError
    applied = make_config("plbopt", overrides=overrides).to_dict()
    assert {key: applied[key] for key in overrides} == overrides
