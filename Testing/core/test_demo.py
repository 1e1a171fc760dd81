"""``plbopt demo``: predicts with the shipped checkpoint unless it must train, prints the expected
time first, and the shipped checkpoint is a faithful, smaller copy of a run's ``best.pt``.

A two-step run with the demo's preprocessing stands in for the shipped checkpoint (monkeypatched
``SHIPPED_CHECKPOINT``), so these tests do not depend on the file in Resources/demo; the last test
checks that file where it is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore import demo
from PLBOptCore.cli import main
from PLBOptCore.config import CPU_DEMO_OVERRIDES
from PLBOptCore.data.phantom import DEMO_SPLIT, make_phantom_dataset
from PLBOptCore.engine.checkpoint import load_checkpoint

TINY = ["--preset", "plbopt", "--iterations", "2", "--base-filters", "4", "--batch-size", "1", "--device", "cpu",
        "-q", "--set", "checkpoint_every=1", "validate_every=1000"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A two-step plbopt run with the demo's preprocessing on a small phantom."""
    base = tmp_path_factory.mktemp("demo")
    data = make_phantom_dataset(base / "data", n_labeled=1, n_unlabeled=1, n_test=1, n_validation=0,
                                shape=(24, 48, 48), seed=11)
    preprocessing = [f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"
                     for key, value in CPU_DEMO_OVERRIDES.items()
                     if key in ("target_spacing", "normalization", "clip_window", "body_threshold")]
    run = base / "run"
    assert main(["train", str(data), "-o", str(run), "--cache-dir", str(base / "cache"), "--patch-size", "16", "32",
                 "32", *TINY, *preprocessing]) == 0
    return run


def test_ship_checkpoint_keeps_what_prediction_needs_in_half_the_size(tiny_run, tmp_path):
    shipped = demo.ship_checkpoint(tiny_run, tmp_path / "shipped.pt", test_dice={"mean": 0.5})
    full, small = load_checkpoint(tiny_run / "checkpoints" / "best.pt"), load_checkpoint(shipped)
    assert set(small) == {"format", "version", "step", "best_metric", "config", "labels", "colors", "refine_gain",
                          "models", "demo"} | ({"refine_gain_validation", "largest_component_gain_validation"} & set(full))
    assert small["config"] == full["config"] and small["labels"] == full["labels"]
    for ours, theirs in zip(small["models"], full["models"]):
        assert ours.keys() == theirs.keys()
        for name, value in ours.items():
            assert value.dtype == (torch.float16 if theirs[name].is_floating_point() else theirs[name].dtype)
            assert torch.allclose(value.float(), theirs[name].float(), rtol=1e-3, atol=1e-4)
    assert small["demo"]["weights"] == "float16" and small["demo"]["test_dice_float32"] == {"mean": 0.5}
    weights = sum(v.numel() * v.element_size() for m in full["models"] for v in m.values())
    assert shipped.stat().st_size < 0.6 * weights  # no optimiser state, half-size weights


def test_demo_predicts_with_the_shipped_checkpoint_and_says_so_first(tiny_run, tmp_path, monkeypatch, capsys):
    shipped = demo.ship_checkpoint(tiny_run, tmp_path / "shipped.pt")
    monkeypatch.setattr(demo, "SHIPPED_CHECKPOINT", shipped)

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained although the shipped checkpoint applies")

    monkeypatch.setattr("PLBOptCore.api.train", no_training)
    out = tmp_path / "plbopt-demo"
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("expected time: under 1 minute") and "shipped checkpoint" in printed[0]
    assert "(the shipped checkpoint):" in printed[-1] and (out / "montage.png").is_file()
    # the run folder holds the shipped weights back in float32: plbopt predict works on it
    restored = load_checkpoint(out / "run" / "checkpoints" / "best.pt")
    original = load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    for ours, theirs in zip(restored["models"], original["models"]):
        for name, value in ours.items():
            assert value.dtype == theirs[name].dtype
            assert torch.allclose(value.float(), theirs[name].float(), rtol=1e-3, atol=1e-4)
    assert json.loads((out / "run" / "config.json").read_text()) == original["config"]
    test_cases = sorted(p.name for p in (out / "data" / "labelsTs").iterdir())
    assert sorted(p.name for p in (out / "predictions").iterdir() if p.name.endswith(".nii.gz")) == test_cases
    assert len(test_cases) == DEMO_SPLIT["n_test"]
    # the rounding to float16 changes (almost) no voxel against the float32 weights
    again = tmp_path / "again"
    assert main(["predict", str(tiny_run), str(out / "data" / "imagesTs"), "-o", str(again), "--device", "cpu",
                 "-q"]) == 0
    for name in test_cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(again / name)))
        assert np.mean(a == b) > 0.999


@pytest.mark.parametrize("kwargs, reason", [
    (dict(train=True), "--train"),
    (dict(preset="dhc"), "not dhc"),
    (dict(iterations=300), "default split, seed and schedule"),
    (dict(seed=1), "default split, seed and schedule"),
    (dict(split=dict(DEMO_SPLIT, n_test=20)), "default split, seed and schedule"),
])
def test_the_demo_trains_whenever_the_shipped_checkpoint_is_not_its_own(kwargs, reason, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SHIPPED_CHECKPOINT", tmp_path / "present.pt")
    (tmp_path / "present.pt").write_bytes(b"x")
    arguments = {**dict(train=False, preset="plbopt", iterations=None, seed=0, split=dict(DEMO_SPLIT)), **kwargs}
    assert reason in demo._why_train(**arguments)
    assert demo._why_train(False, "plbopt", None, 0, dict(DEMO_SPLIT)) is None
    (tmp_path / "present.pt").unlink()  # an install without Resources/ trains
    assert "no shipped checkpoint" in demo._why_train(False, "plbopt", None, 0, dict(DEMO_SPLIT))


def test_the_expected_training_time_follows_the_thread_count():
    assert demo.expected_training_minutes(1200, 1) == "about 10 minutes"
    assert demo.expected_training_minutes(1200, 2) == "about 8 minutes"
    assert demo.expected_training_minutes(1200, 16) == "about 8 minutes"
    assert demo.expected_training_minutes(10, 2) == "about 1 minute"


@pytest.mark.skipif(not demo.SHIPPED_CHECKPOINT.is_file(), reason="no shipped checkpoint in this checkout")
def test_the_shipped_checkpoint_is_the_demos_and_small():
    state = load_checkpoint(demo.SHIPPED_CHECKPOINT)
    made = state["demo"]
    assert (made["preset"], made["seed"], made["split"]) == ("plbopt", 0, DEMO_SPLIT)
    assert made["iterations"] == CPU_DEMO_OVERRIDES["iterations"] == state["config"]["iterations"]
    for key in ("base_filters", "target_spacing", "normalization", "clip_window", "patch_size"):
        expected = CPU_DEMO_OVERRIDES[key]
        assert state["config"][key] == (list(expected) if isinstance(expected, tuple) else expected), key
    assert "optimizers" not in state and demo.SHIPPED_CHECKPOINT.stat().st_size < 12e6
