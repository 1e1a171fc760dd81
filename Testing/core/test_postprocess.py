"""Postprocessing: the largest component per class, chosen on the validation cases and applied by predict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from PLBOptCore.config import make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.checkpoint import load_checkpoint, save_checkpoint
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.inference import Predictor
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.postprocess import (COMPONENT_STRUCTURE, keep_largest_component, largest_component_classes,
                                    largest_component_gain, postprocess_maps)

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=2, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000)


def _labels() -> np.ndarray:
    """(3, 4, 6): class 1 = a 3-voxel bar, a voxel touching its end at a corner, and a far island;
    class 2 = two blobs of two voxels each (a tie); class 3 = one voxel."""
    labels = np.zeros((3, 4, 6), dtype=np.int16)
    labels[0, 0, 0:3] = 1          # the bar
    labels[1, 1, 3] = 1            # corner-touching the bar's end (0, 0, 2): same component
    labels[2, 3, 5] = 1            # island
    labels[0, 3, 0:2] = 2          # first blob of 2
    labels[2, 0, 4:6] = 2          # second blob of 2
    labels[1, 3, 3] = 3
    return labels


def test_only_the_largest_26_connected_component_of_the_chosen_classes_stays():
    labels = _labels()
    kept = keep_largest_component(labels, [1, 3])
    expected = labels.copy()
    expected[2, 3, 5] = 0  # only the island goes; the corner neighbour belongs to the bar
    np.testing.assert_array_equal(kept, expected)
    assert labels[2, 3, 5] == 1  # the input is not changed
    # a tie keeps the component scipy numbers first (the first in C order); class 1's island goes too
    tie = keep_largest_component(labels, [2, 1])
    assert (tie == 2).sum() == 2 and (tie[0, 3, 0:2] == 2).all() and tie[2, 3, 5] == 0
    assert COMPONENT_STRUCTURE.sum() == 27
    np.testing.assert_array_equal(keep_largest_component(labels, []), labels)
    np.testing.assert_array_equal(keep_largest_component(labels, [0, 5]), labels)  # background and absent classes


def test_the_gain_is_the_dice_change_per_class_computed_by_hand():
    truth = np.zeros((3, 4, 6), dtype=np.int16)
    truth[0, 0, 0:3] = 1
    truth[1, 1, 3] = 1
    prediction = _labels()
    # class 1: prediction 5 voxels, truth 4, overlap 4 -> 8/9; kept: 4 voxels -> 1
    # class 2: truth has none: Dice 0 (2 predicted blobs) -> 0 (1 blob left); class 3: one component
    gain = largest_component_gain(prediction, truth, 4)
    assert gain == pytest.approx([1 - 8 / 9, 0.0, 0.0])
    # where nobody annotated, the island counts for no class, but components are still found on the whole map
    sparse_truth = truth.copy()
    sparse_truth[2] = -1
    assert largest_component_gain(prediction, sparse_truth, 4, unannotated=-1) == pytest.approx([0.0, 0.0, 0.0])


def test_classes_are_chosen_where_the_validation_gain_is_positive():
    chosen = largest_component_classes(torch.tensor([0.3, 0.01, 0.0, -0.2]))
    assert chosen.tolist() == [False, True, False, False]  # background never; a zero gain changes nothing
    assert largest_component_classes(None) is None


def test_a_removed_island_reads_as_uncertain_background():
    labels = _labels()
    confidence = np.full(labels.shape, 0.9, dtype=np.float32)
    confidence[2, 3, 5] = 0.7
    new_labels, new_confidence, removed = postprocess_maps(labels, confidence, [1])
    assert removed == 1 and new_labels[2, 3, 5] == 0
    assert new_confidence[2, 3, 5] == pytest.approx(0.3)  # 1 - p(class 1): the most any other class had
    assert (np.delete(new_confidence.ravel(), np.ravel_multi_index((2, 3, 5), labels.shape)) == 0.9).all()
    same_labels, same_confidence, none = postprocess_maps(labels, confidence, [3])
    assert none == 0 and same_labels is labels and same_confidence is confidence


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("postprocess")
    data = make_phantom_dataset(base / "data", n_labeled=2, n_unlabeled=1, n_test=1, n_validation=1,
                                shape=(24, 48, 48), seed=4)
    run = base / "run"
    trainer = Trainer(make_config("dhc", overrides=TINY), load_dataset(data), run)
    trainer.fit()
    return {"data": data, "run": run, "trainer": trainer, "base": base}


def test_validation_measures_the_gain_and_the_checkpoint_keeps_it(trained):
    run, trainer = trained["run"], trained["trainer"]
    record = [e for e in read_events(run) if e["type"] == "validation"][-1]
    names = [name for c, name in sorted(load_dataset(trained["data"]).labels.items()) if c > 0]
    assert list(record["largest_component_gain"]) == names
    assert trainer.largest_component_gain_validation.tolist() == pytest.approx(
        [0.0, *record["largest_component_gain"].values()])
    for name in ("best.pt", "last.pt"):
        torch.testing.assert_close(load_checkpoint(run / "checkpoints" / name)["largest_component_gain_validation"],
                                   trainer.largest_component_gain_validation)


def _predict(run: Path, checkpoint: Path, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "PLBOptCore", "predict", str(run), str(images), "-o", str(out),
           "--checkpoint", str(checkpoint), "--device", "cpu", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_predict_postprocesses_the_chosen_classes_unless_told_not_to(trained, tmp_path):
    run, data = trained["run"], trained["data"]
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    num_classes = len(state["labels"])
    chosen = tmp_path / "chosen.pt"  # every foreground class chosen: whatever the tiny run measured
    save_checkpoint(chosen, {**state, "largest_component_gain_validation": torch.tensor([0.0] + [0.1] * (num_classes - 1))})
    raw_run = _predict(run, chosen, data / "imagesTs", tmp_path / "raw", "--no-postprocessing")
    post_run = _predict(run, chosen, data / "imagesTs", tmp_path / "post")
    name = next((tmp_path / "raw").glob("*.nii.gz")).name
    read = lambda path: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # noqa: E731
    raw, post = read(tmp_path / "raw" / name), read(tmp_path / "post" / name)
    raw_confidence, post_confidence = read(tmp_path / "raw" / "confidence" / name), read(tmp_path / "post" / "confidence" / name)
    islands = sum(max(ndimage.label(raw == c, structure=COMPONENT_STRUCTURE)[1] - 1, 0) for c in range(1, num_classes))
    assert islands > 0  # a two-step network leaves islands: the test has something to remove
    np.testing.assert_array_equal(post, keep_largest_component(raw, range(1, num_classes)))
    removed = raw != post
    np.testing.assert_allclose(post_confidence[removed], 1 - raw_confidence[removed], atol=1e-6)
    np.testing.assert_array_equal(post_confidence[~removed], raw_confidence[~removed])
    assert f"{int(removed.sum())} voxels outside their class's largest component removed" in post_run.stdout
    assert "removed" not in raw_run.stdout
    # the run's own measurement decides by default; a checkpoint without one (older) removes nothing
    own = Predictor.from_run(run, device="cpu")
    gain = trained["trainer"].largest_component_gain_validation
    assert own.largest_component_classes == tuple(int(c) for c in torch.nonzero(gain > 0).flatten())
    older = tmp_path / "older.pt"
    save_checkpoint(older, {k: v for k, v in state.items() if k != "largest_component_gain_validation"})
    assert Predictor.from_checkpoint(older, device="cpu").largest_component_classes == ()


def test_a_malformed_measurement_in_a_checkpoint_is_a_checkpoint_error(trained, tmp_path):
    from PLBOptCore.errors import CheckpointError

    state = load_checkpoint(trained["run"] / "checkpoints" / "best.pt")
    for bad in (torch.ones(2), "liver"):
        path = tmp_path / "bad.pt"
        save_checkpoint(path, {**state, "largest_component_gain_validation": bad})
        with pytest.raises(CheckpointError, match=r"bad\.pt: malformed checkpoint metadata"):
            Predictor.from_checkpoint(path, device="cpu")
