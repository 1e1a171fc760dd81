"""The learning core's contracts: one layout for training and inference, the safe refinement rule,
its homogeneity test and self-check, mutual correction with a detached teacher, class-weight floor,
and per-subnet prediction/validation. Hand-computed tensors throughout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.config import make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.data.preprocess import Preprocessed
from PLBOptCore.data.sampling import PatchSampler, centred_padding, pad_to_patch
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.checkpoint import load_checkpoint
from PLBOptCore.api import predict, predict_readings
from PLBOptCore.engine.inference import (Predictor, Reading, build_models, refine_allowed_classes,
                                        sliding_window_member_probabilities, sliding_window_probabilities)
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import ConfigError
from PLBOptCore.method.mutual import mutual_correction_loss
from PLBOptCore.method.refine import homogeneous_superpixels, refinement_gain
from PLBOptCore.method.superpixels import noise_sigma
from PLBOptCore.metrics import dice

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=3, device="cpu", log_every=1,
            checkpoint_every=10, validate_every=2, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2)


# ---------------------------------------------------------------------------------------- layout
class _PositionSensitive(torch.nn.Module):
    """A conv net whose output depends on where the content sits (zero padding at its borders)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, num_classes, 5, padding=2)

    def forward(self, x):
        return self.conv(x), None


def test_small_volume_is_predicted_in_the_layout_training_crops_contain():
    rng = np.random.default_rng(0)
    volume = rng.random((10, 20, 30)).astype(np.float32)
    patch = (16, 32, 32)
    padding = centred_padding(volume.shape, patch)
    assert padding == [(3, 3), (6, 6), (1, 1)]
    centred = pad_to_patch(volume, patch, float(volume.min()))
    assert centred.shape == patch and centred[0, 0, 0] == volume.min()

    # inference: one window, the centred layout, cropped back
    model = _PositionSensitive().eval()
    probs = sliding_window_probabilities([model], torch.from_numpy(volume), patch, 3, device=torch.device("cpu"))
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(centred)[None, None])[0], 1)[0]
    expected = expected[:, 3:13, 6:26, 1:31]
    torch.testing.assert_close(probs, expected)

    # training: the sampler pads by the shortfall on both sides, so the crop starting at
    # m - m // 2 is exactly the centred layout; other starts translate the volume
    case = Preprocessed("small", volume, np.zeros(volume.shape, np.int16), None, None)
    sampler = PatchSampler([case], patch, 1, 3, 0.0, False, seed=0)
    padded = sampler._images[0]
    assert padded.shape == (22, 44, 34)
    np.testing.assert_array_equal(padded[3:19, 6:38, 1:33], centred)
    starts = {tuple(int(s) for s in sampler._start(0, np.random.default_rng([0, step]))) for step in range(200)}
    assert {s[1] for s in starts} == set(range(0, 13)) and {s[2] for s in starts} == {0, 1, 2}


# ------------------------------------------------------------- refinement: homogeneity, self-check
def test_homogeneous_superpixels_drop_those_that_straddle_an_edge():
    # superpixel 0: values 0.50 ± 0.01 (std 0.01); superpixel 1: 0.2 | 0.8 (std 0.3); noise 0.01
    image = torch.tensor([0.49, 0.51, 0.49, 0.51, 0.2, 0.2, 0.8, 0.8]).reshape(1, 1, 1, 1, 8)
    superpixels = torch.tensor([0, 0, 0, 0, 1, 1, 1, -1]).reshape(1, 1, 1, 8)
    out = homogeneous_superpixels(superpixels, image, torch.tensor([0.01]), factor=1.5)
    assert out.flatten().tolist() == [0, 0, 0, 0, -1, -1, -1, -1]
    # the threshold scales with each item's own noise level
    out = homogeneous_superpixels(superpixels, image, torch.tensor([0.25]), factor=1.5)
    assert out.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, -1]


class _CountingModel(_PositionSensitive):
    """:class:`_PositionSensitive` with its own weights that counts the windows it sees."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv.reset_parameters()
        self.windows = 0

    def forward(self, x):
        self.windows += x.shape[0]
        return super().forward(x)


def test_one_pass_of_each_model_gives_the_ensemble_and_each_model_alone():
    volume = torch.from_numpy(np.random.default_rng(1).random((12, 40, 45)).astype(np.float32))
    patch = (8, 16, 16)
    a, b = _CountingModel(1).eval(), _CountingModel(2).eval()
    with torch.no_grad():
        alone = {name: sliding_window_probabilities(models, volume, patch, 3, overlap=0.5, device=torch.device("cpu"))
                 for name, models in (("both", [a, b]), ("a", [a]), ("b", [b]))}
        windows_of_one_pass = b.windows  # b slid over the volume twice above: ensemble and alone
        assert windows_of_one_pass % 2 == 0
        windows_of_one_pass //= 2
        a.windows = b.windows = 0
        members = sliding_window_member_probabilities([a, b], {"both": (0, 1), "a": (0,), "b": (1,)}, volume,
                                                      patch, 3, overlap=0.5, device=torch.device("cpu"))
    assert a.windows == b.windows == windows_of_one_pass  # once over the volume each, not twice
    for name in ("both", "a", "b"):
        assert torch.equal(members[name], alone[name])  # bit for bit
    # by hand at one voxel seen by a single window: the ensemble is softmax of the mean logit
    with torch.no_grad():
        corner = volume[None, None, :8, :16, :16]
        logits = (a.conv(corner) + b.conv(corner)) / 2
    expected = torch.softmax(logits[0, :, 0, 0, 0], 0)
    torch.testing.assert_close(members["both"][:, 0, 0, 0], expected)



def test_noise_sigma_recovers_known_noise_on_a_ramp_with_edges_and_clipping():
    rng = np.random.default_rng(1)
    z, y, x = np.meshgrid(np.arange(8), np.arange(64), np.arange(64), indexing="ij")
    volume = 0.2 + 0.004 * x + 0.003 * y + 0.3 * (x > 40) + rng.normal(0, 0.02, (8, 64, 64))
    volume[:, :8] = 0.0  # clipped air: no noise, must not pull the estimate down
    assert noise_sigma(np.clip(volume, 0.0, None)) == pytest.approx(0.02, rel=0.1)


def _uncertain_edge_case(step: float):
    """(volume, probs, superpixels) of a (2, 16, 16) grid: superpixel 0 (x < 8) is confident class 1
    except two columns (x = 6, 7) that lean to background (p = 0.5 / 0.45), which the safe rule
    expands into class 1 there; superpixel 1 (x >= 8) is confident background. ``step`` is an
    intensity edge between x < 6 and x >= 6."""
    rng = np.random.default_rng(2)
    volume = (0.5 + rng.normal(0, 0.01, (2, 16, 16))).astype(np.float32)
    volume[:, :, 6:] += step
    probs = torch.tensor([0.02, 0.96, 0.02]).view(3, 1, 1, 1).repeat(1, 2, 16, 16)
    probs[:, :, :, 6:8] = torch.tensor([0.5, 0.45, 0.05]).view(3, 1, 1, 1)
    probs[:, :, :, 8:] = torch.tensor([0.96, 0.02, 0.02]).view(3, 1, 1, 1)
    superpixels = torch.zeros(2, 16, 16, dtype=torch.long)
    superpixels[:, :, 8:] = 1
    return volume, probs, superpixels


def test_inference_refinement_applies_the_homogeneity_test_and_the_self_check():
    undecided = make_config("plbopt", overrides=dict(TINY))  # as no run stores it: decided when a run starts
    states = [m.state_dict() for m in build_models(undecided, 3)]
    labels = {0: "background", 1: "a", 2: "b"}
    with pytest.raises(ConfigError, match="refine_homogeneity is not decided"):
        Predictor(undecided, labels, {}, states, device="cpu").refine(*_uncertain_edge_case(step=0.0))
    config = make_config("plbopt", overrides=dict(TINY, refine_homogeneity=1.5))  # a CT run's
    predictor = Predictor(config, labels, {}, states, device="cpu")
    volume, probs, superpixels = _uncertain_edge_case(step=0.0)
    refined, changed = predictor.refine(volume, probs, superpixels)
    assert refined[:, :, :8].unique().tolist() == [1] and changed == pytest.approx(64 / 512)  # expanded
    volume, probs, superpixels = _uncertain_edge_case(step=0.3)  # superpixel 0 now straddles an edge
    refined, changed = predictor.refine(volume, probs, superpixels)
    assert torch.equal(refined, probs.argmax(0)) and changed == 0.0
    # a class whose self-check gain ended negative is not refined at inference either
    gated = Predictor(config, labels, {}, states, device="cpu", refine_gain=torch.tensor([0.0, -0.01, 0.02]))
    volume, probs, superpixels = _uncertain_edge_case(step=0.0)
    assert torch.equal(gated.refine(volume, probs, superpixels)[0], probs.argmax(0))
    # and neither is one whose gain on the validation cases was negative
    gated = Predictor(config, labels, {}, states, device="cpu", refine_gain=torch.tensor([0.0, 0.01, 0.02]),
                      refine_gain_validation=torch.tensor([0.0, -0.2, 0.1]))
    assert torch.equal(gated.refine(volume, probs, superpixels)[0], probs.argmax(0))


def test_refinement_gate_needs_a_gain_of_at_least_zero_wherever_it_was_measured():
    config = make_config("plbopt")
    labeled, validation = torch.tensor([0.0, -0.01, 0.02, 0.0, 0.3]), torch.tensor([0.0, 0.5, -0.1, 0.0, 0.0])
    assert refine_allowed_classes(config, labeled, validation).tolist() == [True, False, False, True, True]
    assert refine_allowed_classes(config, labeled, None).tolist() == [True, False, True, True, True]
    assert refine_allowed_classes(config, None, None) is None
    assert refine_allowed_classes(make_config("plbopt-paper"), labeled, validation) is None  # the paper: no check


def test_validation_refine_gain_is_the_dice_change_refinement_makes():
    volume, probs, superpixels = _uncertain_edge_case(step=0.0)
    label = np.zeros(volume.shape, np.int16)
    label[:, :, :8] = 1  # truth: class 1 up to the superpixel edge, where refinement expands it to
    case = Preprocessed("val", volume, label, superpixels.numpy().astype(np.int32), None, noise_sigma(volume))
    trainer = type("TrainerView", (), {"config": make_config("plbopt", overrides=dict(TINY, refine_homogeneity=1.5)), "num_classes": 3})()
    unrefined = [dice(probs.argmax(0).numpy() == c, label == c) for c in (1, 2)]  # as _validate scores it
    gain = Trainer._validation_refine_gain(trainer, case, probs, unrefined)
    # before: class 1 on x < 6, Dice 2·192 / (192 + 256) = 6/7; after: exact; class 2 absent everywhere
    assert gain == pytest.approx([1 - 6 / 7, 0.0])


def test_refinement_gain_is_the_per_class_dice_change():
    target = torch.tensor([[1, 1, 1, 1, 0, 0, 2, 2]])
    before = torch.tensor([[1, 1, 0, 0, 0, 0, 2, 2]])  # class 1 Dice 2·2/(2+4) = 2/3
    after = torch.tensor([[1, 1, 1, 0, 0, 0, 2, 0]])  # class 1: 2·3/(3+4) = 6/7; class 2: 2/3
    gain = refinement_gain(before, after, target, 4)
    # background: 4 predicted, 2 right, before and after (2·2/6 both); class 3 absent everywhere: 0
    expected = torch.tensor([0.0, 6 / 7 - 2 / 3, 2 / 3 - 1.0, 0.0])
    torch.testing.assert_close(gain, expected)


# ------------------------------------------------------------------------------- mutual correction
def test_mutual_correction_teacher_mode_only_moves_the_unsure_subnet():
    # voxel 0: A confident (0.9), B not (0.6): mask on. voxel 1: both confident: mask off.
    a = torch.tensor([[0.9, 0.1], [0.95, 0.05]]).T.reshape(1, 2, 2).requires_grad_()
    b = torch.tensor([[0.6, 0.4], [0.9, 0.1]]).T.reshape(1, 2, 2).requires_grad_()
    symmetric = mutual_correction_loss(a, b, tau=0.8)
    teacher = mutual_correction_loss(a, b, tau=0.8, teacher=True)
    assert symmetric.item() == pytest.approx(teacher.item()) and teacher.item() == pytest.approx(2 * 0.3 ** 2 / 2)
    teacher.backward()
    assert torch.all(a.grad == 0)  # the confident teacher is not pulled towards the unsure student
    assert b.grad[0, 0, 0].item() == pytest.approx(-2 * 0.3 / 2) and b.grad[0, 0, 1].item() == 0.0


# ----------------------------------------------------------------------- trainer and prediction
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=2, n_unlabeled=2, n_test=1,
                                n_validation=1, shape=(24, 48, 48), seed=5)


def test_class_weight_floor_is_applied_to_both_subnets_weights(small_dataset, tmp_path):
    assert make_config("dhc").class_weight_floor == 1.0  # DistDW's zero background weight lifted, by default
    with pytest.raises(ConfigError):
        make_config("dhc", overrides=dict(class_weight_floor=-1.0))
    trainer = Trainer(make_config("dhc", overrides=dict(TINY, class_weight_floor=2.5)), load_dataset(small_dataset),
                      tmp_path / "run")
    trainer.setup()
    assert trainer.distdw.weights[0] == 0  # DistDW: background is the most frequent class
    w_a, w_b = trainer.class_loss_weights()
    assert torch.all(w_a >= 2.5) and torch.all(w_b >= 2.5) and w_b[0] == 2.5


def test_plbopt_run_logs_self_check_and_per_subnet_validation(small_dataset, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(make_config("plbopt", overrides=TINY), load_dataset(small_dataset), run)
    trainer.fit()
    events = read_events(run)
    train = [e for e in events if e["type"] == "train"]
    assert all(set(e["refine_gain"]) == {"liver", "spleen", "kidney_right", "kidney_left", "aorta", "gallbladder"}
               for e in train)
    validation = [e for e in events if e["type"] == "validation"]
    assert validation and all(set(e["subnets"]) == {"a", "b"} for e in validation)
    record = validation[-1]
    assert set(record["subnets"]["a"]["dice"]) == set(record["dice"])
    assert trainer.refine_gain.shape == (7,) and trainer.refine_gain[0] == 0
    # refinement also checked on the validation case, and that gate kept with the checkpoint
    assert all(set(e["refine_gain"]) == set(record["dice"]) for e in validation)
    assert trainer.refine_gain_validation.tolist() == pytest.approx([0.0, *record["refine_gain"].values()])
    torch.testing.assert_close(load_checkpoint(run / "checkpoints" / "last.pt")["refine_gain_validation"],
                               trainer.refine_gain_validation)

    # predict with each subnet alone and both; a supervised run has no subnet b
    out = {}
    for subnet in ("a", "b", "both"):
        cmd = [sys.executable, "-m", "PLBOptCore", "predict", str(run), str(small_dataset / "imagesTs"),
               "-o", str(tmp_path / subnet), "--subnet", subnet, "-q", "--device", "cpu"]
        assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
        out[subnet] = next((tmp_path / subnet).glob("*[0-9].nii.gz"))
    assert len(Predictor.from_run(run, subnet="a", device="cpu").models) == 1
    assert len(Predictor.from_run(run, subnet="both", device="cpu").models) == 2


def test_several_readings_at_once_write_what_predict_writes_for_each(small_dataset, tmp_path):
    # refinement unchecked, so that the refined readings differ from the network's
    run = tmp_path / "run"
    Trainer(make_config("plbopt", overrides={**TINY, "refine_self_check": False}), load_dataset(small_dataset),
            run).fit()
    images = sorted((small_dataset / "imagesTs").glob("*.nii.gz"))
    asked = {"ensemble": dict(postprocess=False), "a": dict(subnet="a", postprocess=False),
             "b": dict(subnet="b", refine=True), "refined": dict(refine=True, postprocess=False),
             "handed-back": dict(refine=True), "postprocessed": dict()}
    written = predict_readings(run, images, {tmp_path / "all" / name: Reading(**kwargs)
                                             for name, kwargs in asked.items()}, device="cpu")
    assert {folder.name for folder in written} == set(asked)
    arrays = {}
    for name, kwargs in asked.items():
        subnet = kwargs.pop("subnet", "both")
        [alone] = predict(run, images, tmp_path / "alone" / name, device="cpu", subnet=subnet, **kwargs)
        [together] = written[tmp_path / "all" / name]
        for file in (Path("."), Path("confidence")):
            first = sitk.ReadImage(str(alone.parent / file / alone.name))
            second = sitk.ReadImage(str(together.parent / file / together.name))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(first), sitk.GetArrayFromImage(second))
            assert first.GetSpacing() == second.GetSpacing() and first.GetOrigin() == second.GetOrigin()
        arrays[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(together)))
    assert (arrays["refined"] != arrays["ensemble"]).any()  # the readings differ: each went its own way
    assert (arrays["a"] != arrays["ensemble"]).any()
    # a subnet the run lacks is refused before anything is written
    supervised = tmp_path / "supervised"
    Trainer(make_config("supervised", overrides=TINY), load_dataset(small_dataset), supervised).fit()
    with pytest.raises(ConfigError, match="has no subnet 'b'"):
        predict_readings(supervised, images, {tmp_path / "s-a": Reading(subnet="a"),
                                              tmp_path / "s-b": Reading(subnet="b")}, device="cpu")
    with pytest.raises(ConfigError, match="a reading's subnet is None .* got 'both'"):  # a predictor's word
        predict_readings(supervised, images, {tmp_path / "s-a": Reading(subnet="both")}, device="cpu")
    assert not (tmp_path / "s-a").exists()


@pytest.mark.parametrize("preset", ["dhc", "supervised"])
def test_a_run_that_never_refines_checks_on_validation_what_refine_would_do(small_dataset, preset, tmp_path):
    # `plbopt refine` and the Slicer panel refine the pseudo labels of any run: a DHC or supervised run
    # must gate them by its validation cases as a PLBOpt run does, not refine every class unchecked
    run = tmp_path / preset
    trainer = Trainer(make_config(preset, overrides=TINY), load_dataset(small_dataset), run)
    trainer.fit()
    assert not trainer.config.refine and not [e for e in read_events(run) if e["type"] == "train" and "refine_gain" in e]
    validation = [e for e in read_events(run) if e["type"] == "validation"]
    assert validation and all(set(e["refine_gain"]) == set(e["dice"]) for e in validation)
    stored = load_checkpoint(run / "checkpoints" / "last.pt")["refine_gain_validation"]
    assert stored.tolist() == pytest.approx([0.0, *validation[-1]["refine_gain"].values()])
    predictor = Predictor.from_run(run, "last", "cpu")
    assert predictor.refine_allowed.tolist() == stored.ge(0).tolist()
    # the paper's rules refine unchecked: nothing is measured for them
    unchecked = tmp_path / f"{preset}-unchecked"
    Trainer(make_config(preset, overrides=dict(TINY, refine_self_check=False)), load_dataset(small_dataset),
            unchecked).fit()
    assert "refine_gain_validation" not in load_checkpoint(unchecked / "checkpoints" / "last.pt")
    assert Predictor.from_run(unchecked, "last", "cpu").refine_allowed is None


def test_subnet_b_of_a_supervised_run_is_a_one_line_error(small_dataset, tmp_path):
    run = tmp_path / "sup"
    Trainer(make_config("supervised", overrides=dict(TINY, iterations=1)), load_dataset(small_dataset), run).fit()
    result = subprocess.run([sys.executable, "-m", "PLBOptCore", "predict", str(run), str(small_dataset / "imagesTs"),
                             "-o", str(tmp_path / "out"), "--subnet", "b", "-q"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no subnet 'b'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_paper_preset_keeps_the_published_rule():
    cfg = make_config("plbopt-paper")
    assert (cfg.refine_mode, cfg.refine_homogeneity, cfg.refine_self_check, cfg.superpixel_area_mm2,
            cfg.mc_mode, cfg.triplet_mining) == ("paper", 0.0, False, None, "paper", "paper")
    assert make_config("plbopt").refine_mode == "safe"
