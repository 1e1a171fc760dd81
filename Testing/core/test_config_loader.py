"""Configs that fail early (one line naming the key, exit 2, nothing written), resume overrides,
and the DataLoader that prepares training batches in worker processes."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import pytest
import torch

from PLBOptCore.cli import main
from PLBOptCore.config import (CPU_DEMO_OVERRIDES, RESUME_SAFE_KEYS, Config, inert_settings, make_config, resume_config,
                               stored_config)
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.inference import build_models
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import ConfigError

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=2, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2)

# (override, the start of the one-line message): every kind of check, each field kind at least once.
BAD_VALUES = [
    ({"clip_window": [1]}, "clip_window must be a list of 2 numbers"),
    ({"clip_window": [300, -100]}, "clip_window must be [low, high] with low < high"),
    ({"target_spacing": [1, 1]}, "target_spacing must be a list of 3 numbers in [0.01, 100]"),
    ({"target_spacing": [1, 0, 1]}, "target_spacing must be a list of 3 numbers in [0.01, 100]"),
    ({"target_spacing": "1mm"}, "target_spacing must be a list"),
    ({"patch_size": [16, 32]}, "patch_size must be 3 multiples of 16"),
    ({"patch_size": [16.5, 32, 32]}, "patch_size must be an integer"),
    ({"sw_batch_size": 0}, "sw_batch_size must be an integer in [1, 1024]"),
    ({"log_every": 0}, "log_every must be an integer in [1, 10000000]"),
    ({"validate_every": 0}, "validate_every must be an integer in [1, 10000000]"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an integer in [1, 10000000]"),
    ({"iterations": 2.5}, "iterations must be an integer"),
    ({"batch_size": True}, "batch_size must be an integer in [1, 1024]"),
    ({"unlabeled_batch_size": 0}, "unlabeled_batch_size must be an integer in [1, 1024]"),
    ({"num_workers": -1}, "num_workers must be an integer in [0, 256]"),
    ({"seed": -3}, "seed must be an integer in [0, 4294967295]"),
    ({"lr": -0.01}, "lr must be a number in (0.0, 10.0]"),
    ({"lr": 0}, "lr must be a number in (0.0, 10.0]"),
    ({"lr": float("nan")}, "lr must be a number in (0.0, 10.0]"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"momentum": 1.0}, "momentum must be a number in [0.0, 1.0)"),
    ({"weight_decay": -1e-5}, "weight_decay must be a number in [0.0, 1.0]"),
    ({"foreground_oversample": 1.5}, "foreground_oversample must be a number in [0.0, 1.0]"),
    ({"mc_tau": -0.1}, "mc_tau must be a number in [0.0, 1.0]"),
    ({"sw_overlap": 1.0}, "sw_overlap must be a number in [0.0, 1.0)"),
    ({"refine_start": 1.0}, "refine_start must be a number in [0.0, 1.0)"),
    ({"distdw_momentum": 1.2}, "distdw_momentum must be a number in [0.0, 1.0)"),
    ({"lambda_mc": -1}, "lambda_mc must be a number in [0.0, 100.0]"),
    ({"device": 0}, "device must be a string, got 0"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
    ({"optimizer": "adam"}, "optimizer must be one of sgd, adamw"),
    ({"normalization": "hu"}, "normalization must be one of minmax, zscore, ct"),
    ({"amp": "yes"}, "amp must be true or false"),
    ({"deterministic": 1}, "deterministic must be true or false"),
    ({"flip_axes": "xw"}, "flip_axes may only contain z, y and x"),
    ({"extra": [1]}, "extra must be a mapping"),
    # upper bounds: a typo of a few digits is refused, not allocated
    ({"triplet_capacity": 10**12}, "triplet_capacity must be an integer in [1, 1048576]"),
    ({"triplet_capacity": "1e12"}, "triplet_capacity must be an integer in [1, 1048576], got 1000000000000"),
    ({"iterations": 10**9}, "iterations must be an integer in [1, 10000000]"),
    ({"base_filters": 4096}, "base_filters must be an integer in [1, 512]"),
    ({"batch_size": 100_000}, "batch_size must be an integer in [1, 1024]"),
    ({"sw_batch_size": 5000}, "sw_batch_size must be an integer in [1, 1024]"),
    ({"num_workers": 1000}, "num_workers must be an integer in [0, 256]"),
    ({"seed": 10**400}, "seed must be an integer in [0, 4294967295]"),
    ({"patch_size": [16, 1024, 32]}, "patch_size must be a list of 3 integers of at most 512"),
    ({"lr": 1e6}, "lr must be a number in (0.0, 10.0]"),
    ({"lambda_triplet": 1e9}, "lambda_triplet must be a number in [0.0, 100.0]"),
    ({"cps_weight": 1e300}, "cps_weight must be a number in [0.0, 100.0]"),
    ({"target_spacing": [0.0015, 1, 1]}, "target_spacing must be a list of 3 numbers in [0.01, 100]"),
    ({"clip_window": [-1e30, 100]}, "clip_window must be a list of 2 numbers in [-1e+06, 1e+06]"),
    # what config.json and checkpoints cannot hold, named by its path in extra
    ({"extra": {"when": datetime.date(2020, 1, 1)}}, "extra.when must be plain data"),
    ({"extra": {"a": [1, {"b": float("inf")}]}}, "extra.a[1].b must be plain data"),
    ({"extra": {3: "x"}}, "extra.3 must be plain data"),
    ({"extra": {"set": {1, 2}}}, "extra.set must be plain data"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=lambda v: str(v)[:40])
def test_make_config_refuses_bad_values_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        make_config("dhc", overrides=override)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_every_field_is_checked():
    """A field added without a rule would accept anything: each must refuse a value of another type."""
    for name in Config.__dataclass_fields__:
        with pytest.raises(ConfigError, match=f"^{name} "):
            Config.from_dict({name: [["not valid"]]}).validate()


def test_every_numeric_setting_has_an_upper_bound():
    """A number far beyond any machine is refused for each numeric field (found by its type, so a
    field added without a range fails here), in one line naming the field."""
    numeric = {name: f.type for name, f in Config.__dataclass_fields__.items()
               if re.search(r"\b(int|float)\b", str(f.type)) and name != "extra"}
    assert {"triplet_capacity", "iterations", "lr", "patch_size", "target_spacing", "seed"} <= set(numeric)
    for name, kind in numeric.items():
        huge = 10**15 if "int" in kind else 1e15
        value = [huge] * (kind.count(",") + 1) if "Tuple" in kind else huge
        with pytest.raises(ConfigError, match=f"^{name} must be .*(in|at most)") as info:
            Config.from_dict({name: value}).validate()
        assert "\n" not in str(info.value)


def test_scientific_notation_is_a_number_for_numeric_settings():
    """YAML 1.1 reads 1e-3 as text; a numeric setting takes it as the number it means."""
    assert make_config("dhc", overrides={"lr": "1e-3", "iterations": "2e3"}).lr == 0.001
    assert make_config("dhc", overrides={"iterations": "2e3"}).iterations == 2000
    assert make_config("dhc", overrides={"extra": {"note": "1e-3"}}).extra == {"note": "1e-3"}  # text stays text


def test_valid_values_pass_unchanged():
    config = make_config("plbopt", overrides=dict(CPU_DEMO_OVERRIDES, clip_window=None, target_spacing=[1, 2, 3.5],
                                                  device="cuda:1", unlabeled_batch_size=None, num_workers=2))
    assert config.target_spacing == (1.0, 2.0, 3.5) and config.clip_window is None and config.device == "cuda:1"
    assert isinstance(config.lr, float) and config.patch_size == tuple(CPU_DEMO_OVERRIDES["patch_size"])


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=2, n_unlabeled=2, n_test=0,
                                n_validation=0, shape=(24, 48, 48), seed=3)


@pytest.mark.parametrize("setting", ["clip_window=[1]", "target_spacing=[1,1]", "sw_batch_size=0", "log_every=0",
                                     "validate_every=0", "checkpoint_every=0", "lr=-1", "device=0"])
def test_cli_refuses_a_bad_setting_in_one_line_before_writing(setting, tiny_dataset, tmp_path, capfd):
    run = tmp_path / "run"
    assert main(["train", str(tiny_dataset), "-o", str(run), "--set", setting, "-q"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"plbopt: error: {setting.split('=')[0]} must be"), err
    assert not run.exists()
    assert not (tiny_dataset / ".plbopt_cache").exists()


def test_cli_refuses_a_missing_cuda_device(tiny_dataset, tmp_path, capfd):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "run"), "--device", "cuda:0", "-q"]) == 2
    assert "CUDA is not available" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_applies_safe_overrides_and_refuses_the_others(tmp_path):
    stored = make_config("dhc", overrides=TINY)
    source = tmp_path / "config.json"
    resumed = resume_config(stored, {"iterations": 9, "log_every": 3, "num_workers": 2, "sw_batch_size": 4,
                                     "lr": stored.lr}, source)  # an unchanged value of another key is fine
    assert (resumed.iterations, resumed.log_every, resumed.num_workers, resumed.sw_batch_size) == (9, 3, 2, 4)
    with pytest.raises(ConfigError, match=r"config.json: --resume keeps the stored configuration; base_filters, lr "):
        resume_config(stored, {"lr": 0.5, "base_filters": 8, "iterations": 9}, source)
    with pytest.raises(ConfigError, match="log_every must be"):
        resume_config(stored, {"log_every": 0}, source)
    assert "iterations" in RESUME_SAFE_KEYS and "lr" not in RESUME_SAFE_KEYS


def test_cli_resume_refuses_a_changed_learning_setting(tiny_dataset, tmp_path, capfd):
    run = tmp_path / "run"
    overrides = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY.items()]
    assert main(["train", str(tiny_dataset), "-o", str(run), "--preset", "dhc", "-q", "--set", *overrides]) == 0
    events_before = (run / "events.jsonl").read_text()
    capfd.readouterr()
    assert main(["train", str(tiny_dataset), "-o", str(run), "--resume", "-q", "--set", "lr=0.5"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr cannot change" in err
    assert (run / "events.jsonl").read_text() == events_before
    assert main(["train", str(tiny_dataset), "-o", str(run), "--resume", "-q", "--iterations", "3",
                 "--set", "log_every=3"]) == 0
    assert json.loads((run / "config.json").read_text())["log_every"] == 3

    # a config.json written before class_weight_floor existed (it was 0 then; the default is 1 now)
    stored = json.loads((run / "config.json").read_text())
    del stored["class_weight_floor"], stored["sw_batch_size"]
    (run / "config.json").write_text(json.dumps(stored))
    events_before = (run / "events.jsonl").read_text()
    capfd.readouterr()
    assert main(["train", str(tiny_dataset), "-o", str(run), "--resume", "-q", "--iterations", "4"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / "config.json") in err
    assert "lacks class_weight_floor," in err and "sw_batch_size" not in err
    assert (run / "events.jsonl").read_text() == events_before
    (run / "config.json").write_text(json.dumps({**stored, "class_weight_floor": 0}))  # the value the run used
    assert main(["train", str(tiny_dataset), "-o", str(run), "--resume", "-q", "--iterations", "4"]) == 0
    assert json.loads((run / "config.json").read_text())["class_weight_floor"] == 0


def test_a_stored_config_lacking_a_learning_key_is_refused_and_a_resume_safe_one_takes_its_default(tmp_path):
    source = tmp_path / "run" / "config.json"
    full = make_config("dhc").to_dict()
    assert stored_config(full, source) == make_config("dhc")
    without_safe = {k: v for k, v in full.items() if k != "sw_batch_size"}
    assert stored_config(without_safe, source).sw_batch_size == Config().sw_batch_size
    without_learning = {k: v for k, v in full.items() if k not in ("class_weight_floor", "lr")}
    with pytest.raises(ConfigError, match=r"config.json: written by an older PLBOpt, it lacks class_weight_floor, lr, "
                                          r".*--init-from .*last.pt keeps its weights"):
        stored_config(without_learning, source)


def test_inert_settings_name_the_switch_that_is_off():
    keys = ["lambda_mc", "refine_tau", "triplet_mining", "class_weight_floor", "lr"]
    assert inert_settings(make_config("plbopt"), keys) == {}
    assert inert_settings(make_config("dhc"), keys) == {"lambda_mc": "mutual_correction", "refine_tau": "refine",
                                                         "triplet_mining": "triplet"}
    assert inert_settings(make_config("supervised"), ["class_weight_floor"]) == {"class_weight_floor": "class_weighting"}


def test_projection_head_is_built_only_for_the_triplet_loss():
    # the head only feeds the triplet loss: without it a run must be the one without the setting
    dhc = make_config("dhc", overrides={"projection_dim": 16})
    assert inert_settings(dhc, ["projection_dim"]) == {"projection_dim": "triplet"}
    assert all(model.projection is None for model in build_models(dhc, 3))
    assert all(model.feature_dim == 16 for model in build_models(make_config("plbopt", overrides={"projection_dim": 16}), 3))


def test_cli_warns_once_per_setting_the_preset_switches_off(tiny_dataset, tmp_path, capfd):
    overrides = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY.items()]
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "run"), "--preset", "dhc", "-q",
                 "--set", *overrides, "class_weight_floor=1"]) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert "plbopt: warning: mc_tau has no effect on training: mutual_correction is off in preset dhc" in warnings
    warned = {line.split()[2] for line in warnings}
    assert warned == {"triplet_max_anchors", "triplet_max_candidates", "triplet_capacity", "superpixel_divisor", "mc_tau"}


def test_zero_and_two_workers_train_bit_identical_weights(tiny_dataset, tmp_path):
    weights = []
    for workers in (0, 2):
        config = make_config("dhc", overrides=dict(TINY, iterations=20, checkpoint_every=100, log_every=10,
                                                   num_workers=workers))
        trainer = Trainer(config, load_dataset(tiny_dataset), tmp_path / f"run{workers}")
        trainer.fit()
        weights.append([p.detach().clone() for m in trainer.models for p in m.state_dict().values()])
    assert len(weights[0]) == len(weights[1])
    for a, b in zip(*weights):
        assert torch.equal(a, b)


def test_loader_restarts_at_any_step_with_the_same_batches(tiny_dataset, tmp_path):
    trainer = Trainer(make_config("dhc", overrides=dict(TINY, iterations=6, num_workers=1)), load_dataset(tiny_dataset),
                      tmp_path / "run")
    trainer.setup()
    in_order = [trainer.loader.batch(step) for step in range(6)]
    jumped = trainer.loader.batch(4)  # as a resumed run does
    trainer.loader.close()
    samplers = {"labeled": trainer.labeled_sampler, "unlabeled": trainer.unlabeled_sampler}
    for key, sampler in samplers.items():
        for field in ("image", "label", "superpixels"):
            assert torch.equal(jumped[key][field], in_order[4][key][field])
            assert torch.equal(in_order[4][key][field], sampler.sample(4)[field])


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_sets_the_torch_flags_while_training_only(deterministic, tiny_dataset, tmp_path):
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    during = []

    def progress(_record: dict) -> None:
        during.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                       torch.backends.cudnn.benchmark))

    Trainer(make_config("dhc", overrides=dict(TINY, deterministic=deterministic)), load_dataset(tiny_dataset),
            tmp_path / "run", progress=progress).fit()
    assert during and set(during) == {(deterministic, deterministic, not deterministic)}
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
