"""Crash safety of ``plbopt train``: SIGKILL, SIGTERM/SIGINT and corrupt checkpoints.

Training runs in a real subprocess (signals and kills need one); the uninterrupted reference run
is trained in-process with the same configuration. Everything uses one thread: the same float
reduction order in and out of process, and no oversubscription of a shared CI machine.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch

from PLBOptCore.api import train
from PLBOptCore.cli import main
from PLBOptCore.config import make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.checkpoint import load_checkpoint, save_checkpoint
from PLBOptCore.engine.events import read_events
from PLBOptCore.engine.trainer import Trainer

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, device="cpu", log_every=1, checkpoint_every=1,
            validate_every=1000, triplet_max_anchors=32, triplet_max_candidates=256, triplet_capacity=64,
            superpixel_divisor=20, mc_tau=0.2)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("crash"), n_labeled=2, n_unlabeled=2, n_test=0,
                                n_validation=0, shape=(24, 48, 48), seed=3)


def _train_command(dataset: Path, run: Path, iterations: int, *extra: str) -> List[str]:
    """``plbopt train`` with the TINY configuration as command-line overrides."""
    settings = [f"{key}={value}" for key, value in TINY.items() if key not in ("patch_size", "device")]
    return [sys.executable, "-m", "PLBOptCore", "train", str(dataset), "-o", str(run), "--preset", "plbopt",
            "--patch-size", *map(str, TINY["patch_size"]), "--device", "cpu", "--iterations", str(iterations),
            "-q", "--set", *settings, *extra]


def _start(dataset: Path, run: Path, iterations: int) -> subprocess.Popen:
    return subprocess.Popen(_train_command(dataset, run, iterations), env=ONE_THREAD, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_first_checkpoint(process: subprocess.Popen, run: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "last.pt").exists():
        assert process.poll() is None, f"training ended early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def _reference_models(dataset: Path, run: Path, iterations: int) -> List[Dict[str, torch.Tensor]]:
    """The uninterrupted run, trained as the CLI trains (api.train: the same preprocessing plan)."""
    train(dataset, run, preset="plbopt", overrides=dict(TINY, iterations=iterations))
    return load_checkpoint(run / "checkpoints" / "last.pt")["models"]


def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    iterations = 20
    delay = random.uniform(0.0, 0.5)
    run = tmp_path / "killed"
    process = _start(dataset, run, iterations)
    _wait_for_first_checkpoint(process, run)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    # whatever the moment of the kill, the file under the final name is complete
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 1 <= killed_at < iterations, f"killed {delay:.2f}s after the first checkpoint, at step {killed_at}"

    resumed = subprocess.run(_train_command(dataset, run, iterations, "--resume"), env=ONE_THREAD,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["step"] == iterations
    assert not list(run.rglob(".tmp-*")), "a temporary file survived the resume"

    reference = _reference_models(dataset, tmp_path / "reference", iterations)
    for index, (expected, got) in enumerate(zip(reference, final["models"])):
        for name, tensor in expected.items():
            assert torch.equal(tensor, got[name]), f"subnet {index} {name} differs (killed at step {killed_at})"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_a_step_boundary_with_a_resumable_checkpoint(signum, dataset, tmp_path):
    iterations = 200
    run = tmp_path / "run"
    process = _start(dataset, run, iterations)
    _wait_for_first_checkpoint(process, run)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 1 <= step < iterations
    end = read_events(run)[-1]
    assert end["type"] == "end" and end["status"] == "interrupted" and end["step"] == step


def test_a_kill_before_the_new_checkpoint_is_moved_in_leaves_the_old_one_under_its_name(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    replace = os.replace

    def killed_before_moving_in(source, target):
        if Path(target) == path:
            raise KeyboardInterrupt  # stands for SIGKILL at the last moment of the save
        replace(source, target)

    monkeypatch.setattr(os, "replace", killed_before_moving_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    # the final name was never without a file (the random-moment SIGKILL test once hit that gap)
    assert load_checkpoint(path)["step"] == 1 and load_checkpoint(path.with_name("last.pt.prev"))["step"] == 1
    save_checkpoint(path, {"step": 3})
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(path.with_name("last.pt.prev"))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.prev"]


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(make_config("plbopt", overrides=dict(TINY, iterations=2)), load_dataset(dataset), run).fit()
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    assert main(["train", str(dataset), "-o", str(run), "--resume", "--iterations", "3", "-q"]) == 0
    assert load_checkpoint(last)["step"] == 3

    for name in ("last.pt", "last.pt.prev"):
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:200])
    capsys.readouterr()
    assert main(["train", str(dataset), "-o", str(run), "--resume", "--iterations", "4", "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(last) in error and "corrupt" in error
