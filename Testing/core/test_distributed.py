"""Data-parallel training: two gloo processes on the CPU end every step with identical state.

The test launches this file under ``torch.distributed.run`` (torchrun); each rank trains a tiny
run through the Python API and dumps its own final state to ``RUN/rank<r>.pt``, which the test
compares with the other rank's and with rank 0's checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from PLBOptCore.config import make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.checkpoint import load_checkpoint
from PLBOptCore.engine.distributed import DistContext, rank_seed
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.trainer import Trainer

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=3, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256,
            triplet_capacity=64, superpixel_divisor=20, mc_tau=0.2)


def _train_and_dump(dataset: Path, run_dir: Path) -> None:
    """Rank entry point (run under torchrun): train, then save this rank's complete state."""
    trainer = Trainer(make_config("plbopt", overrides=TINY), load_dataset(dataset), run_dir)
    trainer.fit()
    state = trainer.state_dict()
    state["first_patch"] = trainer.labeled_sampler.sample(0)["image"]
    torch.save(state, run_dir / f"rank{os.environ['RANK']}.pt")


def test_two_gloo_ranks_train_in_lockstep(tmp_path):
    dataset = make_phantom_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=2, n_test=0, n_validation=1,
                                   shape=(24, 48, 48), seed=3)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks share the test machine's cores
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             __file__, str(dataset), str(run)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [torch.load(run / f"rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(ranks[0]["first_patch"], ranks[1]["first_patch"]), "ranks sampled the same patches"
    assert ranks[0]["step"] == ranks[1]["step"] == TINY["iterations"]
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    for key in ("models", "diffdw", "distdw", "triplet"):
        assert_same(ranks[0][key], ranks[1][key], key)
        assert_same(ranks[0][key], checkpoint[key], f"checkpoint {key}")
    assert len(ranks[0]["triplet"][0]["positive.0.features"]) > 0, "the memory banks stayed empty"

    events = read_events(run)
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2, "rank 1 wrote events"
    assert events[-1]["status"] == "completed"
    assert [e["step"] for e in events if e["type"] == "validation"] == [TINY["iterations"]]


def assert_same(a, b, where: str) -> None:
    """Nested dicts/lists of tensors are bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs between ranks"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    else:
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")


def test_a_single_process_is_rank_zero_of_a_plain_run():
    single = DistContext()
    assert not single.enabled and single.is_main
    assert rank_seed(1234, 0) == 1234 and rank_seed(1234, 1) != rank_seed(1234, 2)
    features, labels = torch.randn(5, 3), torch.arange(5)
    gathered = single.gather_rows(features, labels)
    assert gathered[0] is features and gathered[1] is labels
    assert single.any(True, torch.device("cpu")) and not single.any(False, torch.device("cpu"))


if __name__ == "__main__":
    _train_and_dump(Path(sys.argv[1]), Path(sys.argv[2]))
