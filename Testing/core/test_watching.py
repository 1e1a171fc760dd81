"""Watching training: TensorBoard event files, ``plbopt plot``, log records through :mod:`logging`,
and the throughput benchmarks (``plbopt bench step|predict``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from PLBOptCore.cli import main
from PLBOptCore.config import make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.trainer import Trainer

TINY = ["patch_size=[16,32,32]", "base_filters=4", "batch_size=1", "iterations=4", "device=cpu", "log_every=2",
        "validate_every=2", "checkpoint_every=4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=1, n_unlabeled=1, n_test=0,
                                n_validation=1, shape=(16, 32, 32), seed=2)


def _scalars(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_logs_losses_lr_and_per_class_dice(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-o", str(run), "--preset", "dhc", "-q", "--tensorboard", "--set", *TINY]) == 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _scalars(run / "tensorboard")
    train = {r["step"]: r for r in read_events(run) if r["type"] == "train"}
    assert [step for step, _ in scalars["train/loss"]] == sorted(train) == [2, 4]
    for step, value in scalars["train/lr"]:
        assert value == pytest.approx(train[step]["lr"])
    classes = [name for c, name in load_dataset(dataset).labels.items() if c > 0]
    for name in classes + ["mean"]:
        assert f"validation/{'mean_dice' if name == 'mean' else 'dice_' + name}" in scalars
    assert "train/refine_changed_fraction" in scalars and "train/loss_unsup" in scalars
    assert "validation/mean_dice_subnet_a" in scalars and "validation/mean_dice_subnet_b" in scalars
    # DiffDW (a) and DistDW (b) class weights, in DHC's range [0, C]
    weights = {step: record["class_weights"] for step, record in train.items()}
    assert all(0.0 <= value <= len(classes) + 1 for w in weights.values() for value in [*w["a"].values(), *w["b"].values()])
    for subnet in ("a", "b"):
        for name in load_dataset(dataset).labels.values():
            assert scalars[f"train/class_weight_{subnet}_{name}"] == [
                (step, pytest.approx(weights[step][subnet][name])) for step in sorted(weights)]


def test_tensorboard_logs_the_refinement_self_check(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-o", str(run), "--preset", "plbopt", "-q", "--tensorboard", "--set", *TINY]) == 0
    scalars = _scalars(run / "tensorboard")
    gains = {r["step"]: r["refine_gain"] for r in read_events(run) if r["type"] == "train"}
    checked = {r["step"]: r["refine_gain"] for r in read_events(run) if r["type"] == "validation"}
    assert checked
    for name in (n for c, n in load_dataset(dataset).labels.items() if c > 0):
        assert [(step, pytest.approx(gains[step][name])) for step in sorted(gains)] == scalars[f"train/refine_gain_{name}"]
        assert [(step, pytest.approx(checked[step][name])) for step in sorted(checked)] == (
            scalars[f"validation/refine_gain_{name}"])
        kept = {r["step"]: r["largest_component_gain"] for r in read_events(run) if r["type"] == "validation"}
        assert [(step, pytest.approx(kept[step][name])) for step in sorted(kept)] == (
            scalars[f"validation/largest_component_gain_{name}"])


def test_missing_tensorboard_is_one_line_before_anything_is_written(dataset, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-o", str(run), "-q", "--tensorboard", "--set", *TINY]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "tensorboard" in err
    assert not run.exists()


def test_plot_writes_the_training_curves_png(dataset, tmp_path, capfd):
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-o", str(run), "--preset", "supervised", "-q", "--set", *TINY]) == 0
    assert main(["plot", str(run), "-o", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run)]) == 0 and (run / "training_curves.png").stat().st_size > 1000
    capfd.readouterr()
    assert main(["plot", str(dataset)]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no training events" in err


def test_training_is_logged_through_logging(dataset, tmp_path, caplog):
    config = make_config("supervised", overrides=dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1,
                                                      iterations=2, device="cpu", log_every=1, validate_every=2))
    with caplog.at_level(logging.DEBUG, logger="PLBOptCore"):
        Trainer(config, load_dataset(dataset), tmp_path / "run").fit()
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("PLBOptCore.engine.events", logging.INFO, "training supervised on cpu: steps 0..2") in messages
    assert any(level == logging.DEBUG and text.startswith("step 2/2 loss=") for _, level, text in messages)
    assert any(level == logging.INFO and text.startswith("validation at step 2: mean Dice") for _, level, text in messages)
    assert messages[-1][2] == "training completed (step 2)"


@pytest.mark.parametrize("bench", ["step", "predict"])
def test_throughput_bench_reports_rates_and_peak_memory(bench, tmp_path, capfd):
    shape_or_steps = ["--steps", "2"] if bench == "step" else ["--shape", "16", "48", "48", "--classes", "3"]
    assert main(["bench", bench, "-o", str(tmp_path), "--device", "cpu", "--preset", "dhc", *shape_or_steps,
                 "--set", "patch_size=[16,32,32]", "base_filters=4", "batch_size=1"]) == 0
    result = json.loads((tmp_path / f"{bench}_throughput.json").read_text())
    assert result["device"] == "cpu" and result["patch_size"] == [16, 32, 32]
    assert result["per_second"] > 0 and result["voxels_per_second"] > 0 and result["peak_memory_bytes"] > 2**20
    if bench == "step":
        assert result["patches_per_step"] == 2  # one labeled and one unlabeled patch
    assert "voxels/s" in capfd.readouterr().out
