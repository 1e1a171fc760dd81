"""Training on the embedded phantom data must measurably learn."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from PLBOptCore.api import predict
from PLBOptCore.config import CPU_DEMO_OVERRIDES, make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.io import case_name
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.metrics import dice

# The demo's CPU schedule, shortened.
SCHEDULE = dict(CPU_DEMO_OVERRIDES, iterations=200, device="cpu", log_every=10, checkpoint_every=1000,
                validate_every=1000)


def _mean_test_dice(run_dir, spec, out_dir) -> float:
    predict(run_dir, [c.image for c in spec.test], out_dir, checkpoint="last", device="cpu")
    scores = []
    for case in spec.test:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{case_name(case.image)}.nii.gz")))
        scores += [dice(pred == c, truth == c) for c in range(1, spec.num_classes)]
    return float(np.mean(scores))


def test_plbopt_training_lowers_the_loss_and_beats_an_untrained_network(tmp_path):
    data = make_phantom_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=2, n_test=1, n_validation=0, seed=5)
    spec = load_dataset(data)

    untrained = Trainer(make_config("plbopt", overrides=dict(SCHEDULE, iterations=1, lr=1e-12)), spec, tmp_path / "untrained")
    untrained.fit()
    trained = Trainer(make_config("plbopt", overrides=SCHEDULE), spec, tmp_path / "trained")
    trained.fit()

    losses = [r["loss_sup"] for r in read_events(tmp_path / "trained") if r["type"] == "train"]
    # DHC's Dice term is -mean(w_c * dice_c) with weights of order C: the loss goes negative as Dice grows
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses

    before = _mean_test_dice(tmp_path / "untrained", spec, tmp_path / "pred-untrained")
    after = _mean_test_dice(tmp_path / "trained", spec, tmp_path / "pred-trained")
    assert after > before + 0.15, (before, after)
