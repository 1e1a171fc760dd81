"""The dataset fingerprint and preprocessing plan: hand-computed rules, and the plan as the one
source of preprocessing for training, resume, fine-tuning, prediction and the fixed splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.api import predict, train
from PLBOptCore.config import CPU_DEMO_OVERRIDES, PATCH_BUDGET, make_config
from PLBOptCore.convert.splits import apply_split_file
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.plan import (compute_fingerprint, format_plan, plan_config, plan_patch_size, plan_preprocessing,
                                  plan_spacing, refine_homogeneity_for, refine_homogeneity_reason,
                                  with_modality_defaults)
from PLBOptCore.data.preprocess import PreprocessParams, body_mask, preprocess_image
from PLBOptCore.engine.inference import Predictor
from PLBOptCore.errors import ConfigError, DatasetError

TINY = dict(base_filters=4, batch_size=1, iterations=2, device="cpu", log_every=1, checkpoint_every=1,
            validate_every=1000)


def _write(array: np.ndarray, path: Path, spacing_xyz=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _nnunet_dataset(root: Path, modality: str, n_cases: int = 3, shape=(16, 24, 24), background: float = 0.0,
                    organ: float = 100.0, spacing_xyz=(1.0, 1.0, 1.0)) -> Path:
    """An nnU-Net v2 raw dataset of ``n_cases`` cases: a ``background`` volume with a cube of
    intensity ``organ + 10 * case`` labeled 1 (so the foreground statistics are known)."""
    for index in range(n_cases):
        image = np.full(shape, background, np.float32)
        label = np.zeros(shape, np.uint8)
        z, y, x = (s // 4 for s in shape)
        image[z:-z, y:-y, x:-x] = organ + 10 * index
        label[z:-z, y:-y, x:-x] = 1
        image[0, 0, 0] = background - 1  # the padding value (minimum) lies outside the body
        _write(image, root / "imagesTr" / f"case_{index}_0000.nii.gz", spacing_xyz)
        _write(label, root / "labelsTr" / f"case_{index}.nii.gz", spacing_xyz)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": modality}, "labels": {"background": 0, "organ": 1}, "numTraining": n_cases,
        "file_ending": ".nii.gz"}))
    return root


# --------------------------------------------------------------------------------- the rules
def test_spacing_is_the_median_and_an_anisotropic_axis_takes_its_10th_percentile():
    spacings = [[7.0, 1.0, 1.0], [8.0, 1.0, 1.0], [9.0, 1.2, 1.2], [10.0, 1.2, 1.2], [11.0, 1.2, 1.2]]
    boxes = [[10, 10, 10]] * 5
    spacing, reasons = plan_spacing(spacings, boxes, "gpu")
    # Z: 9 > 3 x 1.2, so its 10th percentile: 7 + 0.4 * (8 - 7) = 7.4; Y, X: the median 1.2
    assert spacing == (7.4, 1.2, 1.2)
    assert "anisotropic" in reasons[1]
    # isotropic data keeps the plain median
    assert plan_spacing([[1, 1, 1], [2, 2, 2], [3, 3, 3]], [[8, 8, 8]] * 3, "gpu")[0] == (2.0, 2.0, 2.0)


def test_cpu_schedule_coarsens_the_finer_axes_until_the_structures_fit_the_budget():
    limit = 8 * PATCH_BUDGET["cpu"]
    # 40 x 400 x 400 voxels of 5 x 1 x 1 mm around the structures: 6.4 M voxels, 21.7x the limit
    spacing, reasons = plan_spacing([[5.0, 1.0, 1.0]] * 3, [[40, 400, 400]] * 3, "cpu")
    assert spacing[0] == 5.0 and spacing[1] == spacing[2] > 1.0  # the coarse axis is kept
    voxels = 40 * (400 / spacing[1]) * (400 / spacing[2])
    assert voxels <= limit and 40 * (400 / (spacing[1] / 1.05)) ** 2 > limit  # no coarser than needed
    assert "coarsened" in reasons[-1]
    # the GPU schedule never coarsens, and a small box keeps the native grid on the CPU too
    assert plan_spacing([[5.0, 1.0, 1.0]] * 3, [[40, 400, 400]] * 3, "gpu")[0] == (5.0, 1.0, 1.0)
    assert plan_spacing([[1.0, 1.0, 1.0]] * 3, [[40, 60, 60]] * 3, "cpu")[0] == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("shape, spacing, budget, expected", [
    ([44, 71, 92], [1.25, 1.25, 1.25], 36864, (32, 32, 32)),  # isotropic: a cube (16x48x48 spans 20 mm in Z)
    ([36, 136, 136], [7.7, 2.36, 2.36], 36864, (16, 48, 48)),  # 7.7 mm slices: 123 x 113 x 113 mm
    ([10, 20, 20], [1.0, 1.0, 1.0], 36864, (16, 32, 32)),  # never beyond the case rounded up to 16
    ([100, 100, 100], [1.0, 1.0, 1.0], 1000, (16, 16, 16)),  # the smallest patch a VNet takes
])
def test_patch_size_gives_the_widest_view_within_the_budget(shape, spacing, budget, expected):
    assert plan_patch_size(shape, spacing, budget) == expected


def test_patch_size_is_planned_on_the_grid_the_run_trains_on():
    """A target spacing given explicitly (or None: each case's native grid) sizes the patch, not the planned one."""
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * 3, "cropped_shapes": [[40, 40, 40]] * 3,
                   "foreground_boxes": [[30, 30, 30]] * 3, "modality": "MRI", "foreground": {}}
    planned = plan_preprocessing(fingerprint, "cpu")
    assert planned["settings"]["patch_size"] == (32, 32, 32)  # 40 voxels a side at 1 mm
    assert planned["reasons"]["patch_size"].startswith("median cropped case 40x40x40 at the target spacing")
    # at 2.5 mm the case is 16 voxels a side: a 32-voxel patch would be half padding
    coarse = plan_preprocessing(fingerprint, "cpu", {"target_spacing": (2.5, 2.5, 2.5)})
    assert coarse["settings"]["patch_size"] == (16, 16, 16)
    assert coarse["settings"]["target_spacing"] == (1.0, 1.0, 1.0)  # the plan's own, recorded beside the given one
    assert coarse["reasons"]["patch_size"].startswith("median cropped case 16x16x16 at the given target spacing")
    # 4 mm slices: 10 x 40 x 40 voxels, so the patch widens in-plane within the same budget
    assert plan_preprocessing(fingerprint, "cpu", {"target_spacing": [4.0, 1.0, 1.0]})["settings"]["patch_size"] \
        == (16, 48, 48)
    native = plan_preprocessing(fingerprint, "cpu", {"target_spacing": None})
    assert native["settings"]["patch_size"] == (32, 32, 32)
    assert "at the native spacing" in native["reasons"]["patch_size"]


def test_plan_config_sizes_the_patch_on_an_explicit_spacing(tmp_path):
    root = _nnunet_dataset(tmp_path / "mr", "T2", shape=(16, 48, 48), background=0.0, organ=300.0)
    explicit = {"target_spacing": (3.0, 3.0, 3.0)}
    config = make_config("dhc", overrides=dict(TINY, batch_size=2, **explicit))  # a 16³ patch needs 2 per batch
    planned, plan = plan_config(config, load_dataset(root), explicit, True, None)
    assert planned.target_spacing == (3.0, 3.0, 3.0) and planned.patch_size == (16, 16, 16)
    assert plan_config(make_config("dhc", overrides=TINY), load_dataset(root), {}, True, None)[0].patch_size \
        == (16, 48, 48)
    assert "at the given target spacing" in "\n".join(format_plan(plan, planned))


def test_fingerprint_and_plan_of_a_ct_dataset(tmp_path):
    root = _nnunet_dataset(tmp_path / "ct", "CT", background=-1000.0, organ=40.0)
    spec = load_dataset(root)
    fingerprint = compute_fingerprint(spec, tmp_path / "cache")
    values = np.concatenate([np.full(8 * 12 * 12, 40.0 + 10 * i) for i in range(3)])  # the cubes' voxels
    foreground = fingerprint["foreground"]
    assert foreground["mean"] == pytest.approx(values.mean()) and foreground["std"] == pytest.approx(values.std())
    assert foreground["percentile_00_5"] == pytest.approx(np.percentile(values, 0.5))
    assert fingerprint["spacings"] == [[1.0, 1.0, 1.0]] * 3
    # the body (above -500 HU) is the cube; the crop adds a 4-voxel margin: 8+8, 12+8, 12+8
    assert fingerprint["cropped_shapes"] == [[16, 20, 20]] * 3
    # cached: a second call reads the file instead of the images
    assert list((tmp_path / "cache").glob("fingerprint-*.json"))
    assert compute_fingerprint(spec, tmp_path / "cache") == fingerprint

    settings = plan_preprocessing(fingerprint, "cpu")["settings"]
    assert settings["normalization"] == "ct" and settings["body_threshold"] == -500.0
    assert settings["clip_window"] == (pytest.approx(np.percentile(values, 0.5), abs=1e-3),
                                       pytest.approx(np.percentile(values, 99.5), abs=1e-3))
    assert settings["intensity_mean_std"] == (pytest.approx(values.mean(), abs=1e-3),
                                              pytest.approx(values.std(), abs=1e-3))


def test_plan_of_an_mri_dataset_uses_zscore_and_no_hu_threshold(tmp_path):
    spec = load_dataset(_nnunet_dataset(tmp_path / "mr", "T2", background=0.0, organ=300.0))
    settings = plan_preprocessing(compute_fingerprint(spec, None), "gpu")["settings"]
    assert settings["normalization"] == "zscore" and settings["clip_window"] is None
    assert settings["intensity_mean_std"] is None and settings["body_threshold"] is None


# --------------------------------------------------------------------------------- preprocessing
def _params(**changes) -> PreprocessParams:
    base = dict(target_spacing=None, clip_window=None, normalization="zscore", crop_to_body=False,
                superpixel_method="slic", superpixel_divisor=50, superpixel_compactness=0.1, body_threshold=None)
    return PreprocessParams(**{**base, **changes})


def test_body_of_an_mri_is_above_its_minimum_and_of_a_ct_above_minus_500():
    mri = np.zeros((4, 4, 4), np.float32)
    mri[1:3, 1:3, 1:3] = 50.0  # dark but above the padding value 0
    assert body_mask(mri, None).sum() == 8
    assert body_mask(mri, -500.0).all()  # the HU rule would call the whole MRI body


def test_zscore_uses_the_body_voxels_and_ct_the_dataset_statistics():
    array = np.zeros((4, 4, 4), np.float32)
    array[1:3, 1:3, 1:3] = [[[10, 20], [30, 40]], [[10, 20], [30, 40]]]
    image = sitk.GetImageFromArray(array)
    normalised, _ = preprocess_image(image, _params())
    body = array[1:3, 1:3, 1:3]  # mean 25, std sqrt(125)
    assert normalised[1, 1, 1] == pytest.approx((10 - 25) / np.sqrt(125))
    assert normalised[0, 0, 0] == pytest.approx((0 - 25) / np.sqrt(125))  # outside: same transform
    ct, _ = preprocess_image(image, _params(normalization="ct", clip_window=(15.0, 35.0), intensity_mean_std=(20.0, 5.0)))
    # clip to [15, 35], then (x - 20) / 5
    assert ct[1, 1, 1] == pytest.approx(-1.0) and ct[1, 2, 2] == pytest.approx(3.0) and ct[1, 1, 2] == 0.0
    assert body.mean() == 25


def test_a_single_voxel_bottleneck_is_refused_before_training():
    with pytest.raises(ConfigError, match="patch_size 16x16x16 needs batch_size"):
        make_config("dhc", overrides={"patch_size": [16, 16, 16], "batch_size": 1})
    make_config("dhc", overrides={"patch_size": [16, 16, 16], "batch_size": 2})


def test_ct_normalisation_needs_its_statistics():
    with pytest.raises(ConfigError, match="normalization ct needs clip_window and intensity_mean_std"):
        PreprocessParams.from_config(make_config("plbopt", overrides={"normalization": "ct", "clip_window": None}))
    with pytest.raises(ConfigError, match="intensity_mean_std must be"):
        make_config("plbopt", overrides={"intensity_mean_std": [0, 0]})


# --------------------------------------------------------------------------------- the plan in a run
@pytest.fixture(scope="module")
def mri_dataset(tmp_path_factory) -> Path:
    root = _nnunet_dataset(tmp_path_factory.mktemp("mri"), "MRI", n_cases=3, shape=(16, 40, 40), organ=300.0,
                           spacing_xyz=(1.0, 1.0, 3.0))
    (root / "imagesUn").mkdir()
    for index in range(2):
        array = np.full((16, 40, 40), 0.0, np.float32)
        array[4:12, 10:30, 10:30] = 280.0 + 15 * index
        _write(array, root / "imagesUn" / f"un_{index}_0000.nii.gz", (1.0, 1.0, 3.0))
    data = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**data, "unlabeled": "imagesUn"}))
    return root


def test_train_plans_prints_and_stores_the_plan_and_predict_uses_it(mri_dataset, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="PLBOptCore"):
        train(mri_dataset, run, preset="dhc", overrides=dict(TINY), small=True, cache_dir=tmp_path / "cache")
    printed = "\n".join(r.getMessage() for r in caplog.records)
    assert "preprocessing plan (CPU schedule, MRI" in printed and "normalization = zscore" in printed
    stored = json.loads((run / "config.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    assert stored["normalization"] == "zscore" and stored["body_threshold"] is None
    # 3 mm slices are not 3x the 1 mm in-plane spacing: the median spacing, unchanged
    assert stored["target_spacing"] == [3.0, 1.0, 1.0] == list(plan["settings"]["target_spacing"])
    assert stored["patch_size"] == list(plan["settings"]["patch_size"])
    assert stored["base_filters"] == 4  # the CPU schedule and then the overrides
    # the predictor reads the same preprocessing from the run: the same cache key as training's
    predictor = Predictor.from_run(run, "last", "cpu")
    assert PreprocessParams.from_config(predictor.config) == PreprocessParams.from_config(make_config(
        "dhc", overrides={k: v for k, v in stored.items() if k != "preset"}))
    written = predict(run, mri_dataset / "imagesTr" / "case_0_0000.nii.gz", tmp_path / "pred", checkpoint="last",
                      device="cpu")
    assert sitk.ReadImage(str(written[0])).GetSize() == (40, 40, 16)


def test_refinement_homogeneity_is_decided_by_the_modality_unless_given(mri_dataset, tmp_path, caplog):
    assert [refine_homogeneity_for(m) for m in ("CT", "ct ", "MRI", "T2", "")] == [1.5, 1.5, 0.0, 0.0, 0.0]
    assert make_config("plbopt").refine_homogeneity is None
    assert with_modality_defaults(make_config("plbopt"), "CT").refine_homogeneity == 1.5
    assert with_modality_defaults(make_config("plbopt"), "MRI").refine_homogeneity == 0.0
    given = make_config("plbopt", overrides={"refine_homogeneity": 2.0})
    assert with_modality_defaults(given, "MRI").refine_homogeneity == 2.0
    assert with_modality_defaults(make_config("plbopt-paper"), "CT").refine_homogeneity == 0.0  # the paper's rule
    assert refine_homogeneity_reason("CT").startswith("CT: refine only in superpixels")  # the modality named once
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="PLBOptCore"):
        train(mri_dataset, run, preset="plbopt", overrides=dict(TINY), small=True, cache_dir=tmp_path / "cache")
    printed = "\n".join(r.getMessage() for r in caplog.records)
    assert "refine_homogeneity = 0  (MRI: not CT: refine in every superpixel" in printed
    assert json.loads((run / "config.json").read_text())["refine_homogeneity"] == 0.0  # stored, read by predict
    assert Predictor.from_run(run, "last", "cpu").config.refine_homogeneity == 0.0


def test_explicit_values_win_over_the_plan_and_a_config_file_over_small(mri_dataset, tmp_path):
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("lr: 0.0123\npatch_size: [16, 16, 32]\n")
    run = tmp_path / "run"
    train(mri_dataset, run, preset="dhc", config_file=config_file,
          overrides=dict(TINY, normalization="minmax", clip_window=[0, 400]), small=True, cache_dir=tmp_path / "cache")
    stored = json.loads((run / "config.json").read_text())
    assert stored["lr"] == 0.0123  # --small's lr 0.003 does not override the file
    assert stored["patch_size"] == [16, 16, 32] and stored["normalization"] == "minmax"
    assert stored["clip_window"] == [0, 400]
    plan = json.loads((run / "plan.json").read_text())
    assert set(plan["explicit"]) == {"patch_size", "normalization", "clip_window"}
    assert "patch_size" not in plan["applied"] and plan["applied"]["body_threshold"] is None


def test_resume_keeps_the_stored_plan_and_fine_tuning_inherits_it(mri_dataset, tmp_path):
    first = tmp_path / "first"
    train(mri_dataset, first, preset="dhc", overrides=dict(TINY, patch_size=[16, 16, 32]), small=True,
          cache_dir=tmp_path / "cache")
    train(mri_dataset, first, resume=True, overrides={"iterations": 3}, cache_dir=tmp_path / "cache")
    assert json.loads((first / "config.json").read_text())["patch_size"] == [16, 16, 32]
    tuned = tmp_path / "tuned"
    train(mri_dataset, tuned, preset="dhc", overrides=dict(TINY), small=True, cache_dir=tmp_path / "cache",
          init_from=first / "checkpoints" / "last.pt")
    assert json.loads((tuned / "config.json").read_text())["patch_size"] == [16, 16, 32]
    assert "patch_size" in json.loads((tuned / "plan.json").read_text())["inherited"]


def test_plan_config_refuses_ct_statistics_for_an_mri(mri_dataset):
    config = make_config("dhc", overrides=dict(TINY, normalization="ct"))
    with pytest.raises(ConfigError, match="normalization ct needs"):
        plan_config(config, load_dataset(mri_dataset), {"normalization": "ct"}, True, None)


def test_explicit_ct_normalisation_of_a_ct_dataset_gets_the_planned_statistics(tmp_path):
    root = _nnunet_dataset(tmp_path / "ct", "CT", background=-1000.0, organ=40.0)
    config = make_config("dhc", overrides=dict(TINY, normalization="ct"))
    planned, _ = plan_config(config, load_dataset(root), {"normalization": "ct"}, True, None)
    assert planned.normalization == "ct" and planned.intensity_mean_std[0] == pytest.approx(50.0)


def test_printed_plan_states_only_the_values_the_run_uses(tmp_path):
    """A window given explicitly is printed as given, and no line names the fingerprint's window instead."""
    root = _nnunet_dataset(tmp_path / "ct", "CT", background=-1000.0, organ=40.0)
    explicit = {"clip_window": (-100.0, 200.0), "intensity_mean_std": (10.0, 20.0)}
    config = make_config("dhc", overrides=dict(TINY, **explicit))
    planned, plan = plan_config(config, load_dataset(root), explicit, True, None)
    planned_window = plan["settings"]["clip_window"]
    text = "\n".join(format_plan(plan, planned))
    assert "clip_window = [-100.0, 200.0]  (given explicitly)" in text
    assert "intensity_mean_std = [10.0, 20.0]  (given explicitly)" in text
    assert f"{planned_window[0]:.1f}" not in text and f"{planned_window[1]:.1f}" not in text
    planned_default, plan_default = plan_config(make_config("dhc", overrides=TINY), load_dataset(root), {}, True, None)
    lines = format_plan(plan_default, planned_default)
    assert any(line.startswith(f"  clip_window = {list(planned_window)}") and "percentiles" in line for line in lines)


# --------------------------------------------------------------------------------- fixed splits
def test_split_file_builds_a_dataset_folder_once_and_refuses_unknown_cases(mri_dataset, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"labeled": ["case_0"], "unlabeled": ["case_1", "un_0"], "validation": [],
                                 "test": ["case_2"]}))
    out = apply_split_file(split, mri_dataset, tmp_path / "dataset")
    spec = load_dataset(out)
    assert [c.name for c in spec.training] == ["case_0"] and [c.name for c in spec.test] == ["case_2"]
    assert sorted(c.name for c in spec.unlabeled) == ["case_1", "un_0"]
    assert spec.modality == "MRI" and all(c.label is None for c in spec.unlabeled)
    assert apply_split_file(split, mri_dataset, out) == out  # the same split again: reused as it is
    split.write_text(json.dumps({"labeled": ["case_0"], "test": ["nobody"]}))
    with pytest.raises(DatasetError, match="case 'nobody' of 'test' is not in"):
        apply_split_file(split, mri_dataset, tmp_path / "other")


@pytest.mark.parametrize("name", ["Dataset101_OpenKBP", "Dataset102_CHAOST2", "Dataset103_LA"])
def test_repository_split_files_are_disjoint_and_state_their_counts(name):
    split = json.loads((Path(__file__).parents[2] / "Resources" / "splits" / f"{name}.json").read_text())
    roles = ("labeled", "unlabeled", "validation", "test")
    names = [case for role in roles for case in split[role]]
    assert len(names) == len(set(names))
    assert split["counts"] == {role: len(split[role]) for role in roles}
    assert {"Dataset103_LA": 8, "Dataset101_OpenKBP": 6, "Dataset102_CHAOST2": 2}[name] == len(split["labeled"])


@pytest.mark.parametrize("name", ["Dataset101_OpenKBP", "Dataset102_CHAOST2", "Dataset103_LA"])
def test_floor_and_ceiling_splits_differ_from_their_split_only_in_the_unlabeled_cases(name):
    splits = Path(__file__).parents[2] / "Resources" / "splits"
    split = json.loads((splits / f"{name}.json").read_text())
    floor = json.loads((splits / f"{name}-labeled-only.json").read_text())
    ceiling = json.loads((splits / f"{name}-all-labeled.json").read_text())
    assert floor["labeled"] == split["labeled"] and floor["unlabeled"] == []
    assert ceiling["labeled"] == split["labeled"] + split["unlabeled"] and ceiling["unlabeled"] == []
    for derived in (floor, ceiling):
        assert derived["validation"] == split["validation"] and derived["test"] == split["test"]
        assert derived["counts"] == {role: len(derived[role]) for role in ("labeled", "unlabeled", "validation", "test")}


@pytest.mark.parametrize("config_file", sorted((Path(__file__).parents[2] / "Resources" / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_repository_configs_load(config_file):
    config = make_config("plbopt", config_file)
    if "synapse" in config_file.name or "amos" in config_file.name:  # the paper's setting stays DHC's
        assert config.normalization == "minmax" and config.clip_window == (-75.0, 275.0)
        assert config.class_weight_floor == 0.0
    if "phantom" in config_file.name:  # the phantom tables were measured with DHC's class weights
        assert config.class_weight_floor == 0.0 == make_config("plbopt", overrides=CPU_DEMO_OVERRIDES).class_weight_floor


def test_phantom_config_is_the_demo_preprocessing():
    from PLBOptCore.config import PHANTOM_PREPROCESSING

    config = make_config("plbopt", Path(__file__).parents[2] / "Resources" / "configs" / "phantom-cpu.yaml")
    assert {key: getattr(config, key) for key in PHANTOM_PREPROCESSING} == {
        key: tuple(value) if isinstance(value, (list, tuple)) else value for key, value in PHANTOM_PREPROCESSING.items()}
