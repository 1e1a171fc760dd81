"""A full disk during checkpoint and output writes: one line naming the file and "disk full?",
exit 2, the file under its final name untouched, no temporary left behind.

The failures are simulated as the writers report them on a full file system (seen on a 256 kB
tmpfs): torch.save raises ``RuntimeError("[enforce fail at inline_container.cc:672] . unexpected
pos ...")``, the NRRD and MetaImage writers raise ITK errors, plain writes ``OSError(ENOSPC)``, and
ITK's NIfTI writer raises nothing but leaves a 0-byte or truncated file that reads back as zeros.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.cli import main
from PLBOptCore.data import io
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine import checkpoint, events
from PLBOptCore.engine.checkpoint import load_checkpoint
from PLBOptCore.errors import OutputError
from PLBOptCore.utils import atomic_write

TINY_TRAIN = ["--preset", "supervised", "--iterations", "2", "--patch-size", "16", "32", "32", "--base-filters", "4",
              "--batch-size", "1", "--device", "cpu", "-q", "--set", "checkpoint_every=1", "validate_every=1000"]
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 169792 vs 169688"
NRRD_SHORT_WRITE = ("Exception thrown in SimpleITK ImageFileWriter_Execute: /src/itkNrrdImageIO.cxx:1121:\n"
                    "ITK ERROR: NrrdImageIO(0x55): Write: Error writing /x/.tmp-1-a.nrrd:\n"
                    "[nrrd] _nrrdGzClose: failed to flush pending data")


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError(TORCH_SHORT_WRITE),
    RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
    RuntimeError(NRRD_SHORT_WRITE),
], ids=["ENOSPC", "EDQUOT", "torch-unexpected-pos", "torch-stream-writer", "itk-nrrd"])
def test_a_write_cut_short_is_one_line_naming_the_file_and_the_old_file_stays(failure, tmp_path):
    target = tmp_path / "out" / "last.pt"
    target.parent.mkdir()
    target.write_bytes(b"the previous good file")
    with pytest.raises(OutputError) as err:
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half of it")
            raise failure
    message = str(err.value)
    assert message.startswith(f"{target}: ") and message.endswith("disk full?") and "\n" not in message
    assert target.read_bytes() == b"the previous good file"
    assert os.listdir(target.parent) == ["last.pt"]


@pytest.mark.parametrize("failure", [ValueError("a bug"), RuntimeError("CUDA out of memory"),
                                     KeyError("x"), OSError(errno.ENOENT, "No such file", "/elsewhere/input.nii")])
def test_other_errors_inside_an_atomic_write_pass_unchanged(failure, tmp_path):
    with pytest.raises(type(failure)) as err:
        with atomic_write(tmp_path / "a.json"):
            raise failure
    assert err.value is failure
    assert os.listdir(tmp_path) == []


def test_a_refused_write_that_is_no_full_disk_names_the_file_without_guessing(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(OutputError, match=rf"^{target}: cannot write \(Permission denied\)$"):
        with atomic_write(target) as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("full") / "data", n_labeled=1, n_unlabeled=0, n_test=1,
                                n_validation=0, shape=(24, 48, 48), seed=7)


def _one_line(capfd, named: Path) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"plbopt: error: {named}: ") and err[0].endswith("disk full?"), err
    return err[0]


def test_train_on_a_full_disk_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch, capfd):
    """The second checkpoint write fails as torch.save fails on a full disk: exit 2, one line
    naming last.pt, and last.pt is still the first checkpoint (resumable)."""
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 first bytes only")
            raise RuntimeError(TORCH_SHORT_WRITE)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    run = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", str(dataset), "-o", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN]) == 2
    line = _one_line(capfd, run / "checkpoints" / "last.pt")
    assert "unexpected pos" in line and "Traceback" not in line
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]


def test_a_full_disk_that_also_refuses_the_failure_event_still_names_the_checkpoint(dataset, tmp_path, monkeypatch,
                                                                                     capfd):
    """The trainer records a failure in events.jsonl; on the same full disk that write fails too,
    and the line must still name the checkpoint that could not be written, not events.jsonl."""
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError(TORCH_SHORT_WRITE)
        return real_save(obj, f, *args, **kwargs)

    real_write = events.EventWriter.write

    def write_unless_full(self, record_type, **fields):
        if calls and len(calls) >= 2:
            raise OutputError(f"{self.path}: cannot write (No space left on device); disk full?")
        return real_write(self, record_type, **fields)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    monkeypatch.setattr(events.EventWriter, "write", write_unless_full)
    run = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", str(dataset), "-o", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN]) == 2
    _one_line(capfd, run / "checkpoints" / "last.pt")


@pytest.mark.parametrize("cut", [0, 0.5], ids=["0-bytes", "truncated"])
def test_predict_notices_the_short_file_itks_nifti_writer_leaves_without_an_error(cut, dataset, tmp_path, monkeypatch,
                                                                                  capfd):
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-o", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN]) == 0
    real_write = sitk.WriteImage

    def write_on_a_full_disk(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        with open(path, "r+b") as f:  # what the NIfTI writer leaves when the disk fills: no error
            f.truncate(int(os.path.getsize(path) * cut))

    monkeypatch.setattr(io.sitk, "WriteImage", write_on_a_full_disk)
    out = tmp_path / "preds"
    capfd.readouterr()
    assert main(["predict", str(run), str(dataset / "imagesTs"), "-o", str(out), "--device", "cpu", "-q"]) == 2
    first = sorted((dataset / "imagesTs").iterdir())[0].name
    _one_line(capfd, out / first)
    assert not (out / first).exists() and not [p for p in out.rglob("*") if p.is_file()]


def test_events_on_a_full_disk_name_events_jsonl(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(events.os, "fsync", no_space)
    with pytest.raises(OutputError, match=rf"^{tmp_path / 'events.jsonl'}: cannot write \(No space left on device\); "
                                          r"disk full\?$"):
        events.EventWriter(tmp_path).write("start", step=0)


def test_a_complete_nifti_passes_the_check(tmp_path):
    image = sitk.GetImageFromArray(np.arange(24 * 48 * 48, dtype=np.int32).reshape(24, 48, 48) % 7)
    for name in ("a.nii.gz", "a.nii", "a.nrrd"):
        io.write_image(image, tmp_path / name)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))),
                              sitk.GetArrayFromImage(image))
