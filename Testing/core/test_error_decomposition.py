"""plbopt bench errors: the kinds of error counted on hand-made label maps, and a run decomposed end to end."""

from __future__ import annotations

import json

import numpy as np

from PLBOptCore.api import train
from PLBOptCore.bench.errors import boundary_band, case_error_counts, run_error_bench
from PLBOptCore.data.phantom import make_phantom_dataset


def test_boundary_band_marks_both_sides_of_every_class_change():
    truth = np.zeros((1, 1, 7), np.int64)
    truth[..., 3:5] = 1
    assert boundary_band(truth).astype(int).tolist() == [[[0, 0, 1, 1, 1, 1, 0]]]


def test_error_counts_by_kind():
    truth = np.array([[[0, 0, 0, 1, 1, 1, 2, 2]]])
    predicted = np.array([[[1, 0, 0, 0, 1, 2, 2, 2]]])  # a false positive far off, a false negative and
    homogeneous = np.array([[[1, 1, 1, 1, 0, 0, 0, 0]]], bool)  # a confusion at boundaries
    counts = case_error_counts(predicted, truth, homogeneous)
    assert counts["errors"] == 3 and counts["voxels"] == 8
    assert counts["false_positive"] == 1 and counts["false_negative"] == 1 and counts["confusion"] == 1
    # near a boundary: voxel 3 (0|1 at 2-3) and voxel 5 (1|2 at 5-6), not voxel 0
    assert counts["near_boundary"] == 2
    assert counts["homogeneous"] == 2 and counts["refinable"] == 1  # voxels 0 and 3; only 3 is both
    # class 1's two one-voxel components tie: voxel 0 (the first) is kept, so its error is no island
    assert counts["island"] == 0


def test_an_error_in_an_island_is_what_the_largest_component_removes():
    truth = np.array([[[0, 1, 1, 1, 0, 0, 0, 0]]])
    predicted = np.array([[[0, 1, 1, 1, 1, 0, 1, 1]]])  # the organ, a voxel too far, and a 2-voxel island
    counts = case_error_counts(predicted, truth, np.zeros(truth.shape, bool))
    assert counts["errors"] == 3 and counts["false_positive"] == 3
    assert counts["island"] == 2  # voxels 6, 7; voxel 4 is attached to the organ and stays


def test_error_bench_writes_json_and_markdown(tmp_path):
    data = make_phantom_dataset(tmp_path / "data", n_labeled=1, n_unlabeled=0, n_test=1, shape=(16, 32, 32), seed=1)
    run = tmp_path / "run"
    train(data, run, preset="supervised", small=True,
          overrides=dict(iterations=2, base_filters=4, batch_size=2, device="cpu", validate_every=1000))
    results = run_error_bench([run], data, tmp_path / "errors", checkpoint="last")
    shares = results["runs"][0]["shares"]
    assert set(shares) == {"near_boundary", "homogeneous", "refinable", "confusion", "false_positive", "false_negative",
                           "island"}
    assert all(0.0 <= value <= 1.0 for value in shares.values())
    assert shares["refinable"] <= min(shares["near_boundary"], shares["homogeneous"])
    stored = json.loads((tmp_path / "errors" / "errors.json").read_text())
    assert stored["runs"][0]["pooled"]["errors"] > 0 and (tmp_path / "errors" / "ERRORS.md").is_file()


def test_unannotated_truth_is_neither_an_error_nor_a_boundary():
    # truth -1 = not annotated (the ignore label after preprocessing): the organ predicted there is
    # no error, and the annotated/unannotated border (voxels 2|3 and 5|6) is no class boundary
    truth = np.array([[[0, 0, 0, -1, -1, -1, 1, 1]]])
    predicted = np.array([[[0, 1, 0, 1, 1, 0, 1, 0]]])
    band = boundary_band(truth)
    assert not band.any()
    counts = case_error_counts(predicted, truth, np.ones(truth.shape, bool))
    assert counts["voxels"] == 5 and counts["errors"] == 2
    assert counts["false_positive"] == 1 and counts["false_negative"] == 1 and counts["near_boundary"] == 0


def test_error_bench_leaves_the_ignore_label_out(tmp_path):
    import SimpleITK as sitk

    from PLBOptCore.data.dataset import load_dataset
    from PLBOptCore.data.phantom import LABELS

    data = make_phantom_dataset(tmp_path / "data", n_labeled=1, n_unlabeled=0, n_test=1, shape=(16, 32, 32), seed=1)
    run = tmp_path / "run"
    train(data, run, preset="supervised", small=True,
          overrides=dict(iterations=1, base_filters=4, batch_size=1, device="cpu", validate_every=1000,
                         crop_to_body=False, target_spacing=None))
    ignore = max(LABELS) + 1
    spec = load_dataset(data)
    image = sitk.ReadImage(str(spec.test[0].label))
    label = sitk.GetArrayFromImage(image)
    label[np.arange(label.shape[0]) % 4 != 0] = ignore  # every 4th axial slice annotated
    sparse = sitk.GetImageFromArray(label)
    sparse.CopyInformation(image)
    sitk.WriteImage(sparse, str(spec.test[0].label))
    dataset_json = json.loads((data / "dataset.json").read_text())
    dataset_json["labels"][str(ignore)] = "ignore"
    (data / "dataset.json").write_text(json.dumps(dataset_json))

    results = run_error_bench([run], data, tmp_path / "errors", checkpoint="last")
    pooled = results["runs"][0]["pooled"]
    # the network never predicts the ignore value: scored as a class, every ignore voxel was an error
    assert pooled["voxels"] == int((label != ignore).sum()) == label.size // 4
    assert pooled["errors"] <= pooled["voxels"]
    assert results["runs"][0]["ignore_label"] == ignore
    assert "ignore (%d) are left out" % ignore in (tmp_path / "errors" / "ERRORS.md").read_text()
