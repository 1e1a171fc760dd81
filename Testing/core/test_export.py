"""``plbopt export``: torch.export/ONNX ensembles that predict exactly like the checkpoint they came from."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.cli import main
from PLBOptCore.config import make_config
from PLBOptCore.data.dataset import load_dataset
from PLBOptCore.data.phantom import make_phantom_dataset
from PLBOptCore.engine.inference import Predictor
from PLBOptCore.engine.trainer import Trainer
from PLBOptCore.errors import CheckpointError
from PLBOptCore.export import EnsembleModule, export_metadata, export_run, load_exported, predict_with_export

TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, iterations=1, device="cpu", log_every=1,
            checkpoint_every=1, validate_every=1000)


def _train(dataset: Path, run_dir: Path, preset: str) -> Path:
    Trainer(make_config(preset, overrides=TINY), load_dataset(dataset), run_dir).fit()
    return run_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 16×48×48: one window along Z, two along Y and X, so the Gaussian blending is exercised.
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_labeled=1, n_unlabeled=1, n_test=1,
                                n_validation=0, shape=(16, 48, 48), seed=5)


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory) -> Dict[str, Path]:
    """A dual-subnet (dhc) run exported to a .pt2 program through the CLI."""
    out = tmp_path_factory.mktemp("export")
    run = _train(dataset, out / "run", "dhc")
    assert main(["export", str(run), "-o", str(out / "model.pt2")]) == 0
    return {"run": run, "pt": out / "model.pt2", "json": out / "model.json"}


def _test_image(dataset: Path) -> sitk.Image:
    return sitk.ReadImage(str(load_dataset(dataset).test[0].image))


def test_pt2_export_predicts_the_same_labels_as_the_checkpoint(exported, dataset):
    image = _test_image(dataset)
    expected = Predictor.from_run(exported["run"], device="cpu").predict_image(image)
    label, confidence = predict_with_export(exported["pt"], image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(expected.label))
    np.testing.assert_allclose(sitk.GetArrayFromImage(confidence), sitk.GetArrayFromImage(expected.confidence),
                               rtol=0, atol=1e-6)
    for result in (label, confidence):
        assert result.GetSize() == image.GetSize()
        np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin())
        np.testing.assert_allclose(result.GetSpacing(), image.GetSpacing())


def test_metadata_is_embedded_and_in_the_sidecar(exported):
    module, metadata = load_exported(exported["pt"])
    assert json.loads(exported["json"].read_text()) == metadata
    config = json.loads((exported["run"] / "config.json").read_text())
    run_labels = json.loads((exported["run"] / "dataset.json").read_text())["labels"]
    assert metadata["labels"] == run_labels and set(metadata["colors"]) == set(run_labels)
    assert metadata["patch_size"] == list(config["patch_size"]) and metadata["overlap"] == config["sw_overlap"]
    assert metadata["preprocessing"]["clip_window"] == list(config["clip_window"])
    assert metadata["subnets"] == 2 and metadata["num_classes"] == len(run_labels)
    for batch in (1, 3):  # not the batch size of the export's example (2)
        probs = module(torch.rand([batch, 1] + metadata["patch_size"]))
        assert probs.shape == (batch, metadata["num_classes"], *metadata["patch_size"])
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(batch, *metadata["patch_size"]))


def test_the_pt2_program_loads_with_plain_torch_export(exported):
    extra = {"plbopt.json": ""}
    program = torch.export.load(str(exported["pt"]), extra_files=extra).module()
    assert json.loads(extra["plbopt.json"]) == json.loads(exported["json"].read_text())
    predictor = Predictor.from_run(exported["run"], device="cpu")
    patch = torch.rand([3, 1, *predictor.config.patch_size], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(program(patch), EnsembleModule(predictor.models).eval().mean_logits(patch))


def test_export_does_not_use_deprecated_torchscript(exported, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_run(exported["run"], tmp_path / "again.pt2")
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]


def test_onnx_export_matches_the_ensemble_with_a_dynamic_batch(exported, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert main(["export", str(exported["run"]), "-o", str(tmp_path / "model.pt2"), "--onnx", str(path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx", "model.pt2"]  # no .data, no temporaries
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert json.loads({p.key: p.value for p in model.metadata_props}["plbopt"])["format"] == "plbopt-export"
    predictor = Predictor.from_run(exported["run"], device="cpu")
    reference = EnsembleModule(predictor.models).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        patch = torch.rand([batch, 1, *predictor.config.patch_size], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(patch).numpy()
        (probs,) = session.run(None, {"image": patch.numpy()})
        np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)


def test_supervised_run_exports_its_single_subnet(dataset, tmp_path):
    run = _train(dataset, tmp_path / "run", "supervised")
    assert main(["export", str(run), "-o", str(tmp_path / "sup.pt2"), "--checkpoint", "last"]) == 0
    module, metadata = load_exported(tmp_path / "sup.pt2")
    assert metadata["subnets"] == 1 and metadata["preset"] == "supervised"
    assert not (tmp_path / "sup.onnx").exists()
    predictor = Predictor.from_run(run, "last", device="cpu")
    patch = torch.rand([1, 1, *predictor.config.patch_size], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.softmax(predictor.models[0](patch)[0], dim=1)
        assert torch.equal(module(patch), expected)


def _torchscript_v1(module: torch.nn.Module, inputs: Dict[str, torch.Tensor], path: Path, metadata: Dict) -> Path:
    """A TorchScript file as export format 1 (PLBOpt before torch.export) wrote it; ``inputs``:
    example input of each traced method."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated: only these legacy tests use it
        traced = torch.jit.trace_module(module, inputs, check_trace=False)
        archive = io.BytesIO()  # handed a file, torch's zip writer aborts the test run on a full disk
        torch.jit.save(traced, archive, _extra_files={"plbopt.json": json.dumps(metadata)})
    path.write_bytes(archive.getbuffer())
    return path


def test_torchscript_exports_of_format_1_still_predict(exported, dataset, tmp_path):
    predictor = Predictor.from_run(exported["run"], device="cpu")
    metadata = dict(export_metadata(predictor, Path("best.pt")), version=1)
    example = torch.zeros([1, 1, *predictor.config.patch_size])
    legacy = _torchscript_v1(EnsembleModule(predictor.models).eval(), {"forward": example, "mean_logits": example},
                             tmp_path / "model.pt", metadata)
    image = _test_image(dataset)
    label, _ = predict_with_export(legacy, image)
    expected = predictor.predict_image(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(expected.label))


def test_export_on_a_full_disk_is_one_line_and_leaves_no_file(exported, tmp_path):
    """torch's zip writer, handed a file the disk cuts short, kills the process (SIGABRT) from its
    destructor; the export must end with exit 2 and one line instead. The full disk is a file-size
    limit below the archive's size, so that the write fails as it does on a full file system."""
    pytest.importorskip("resource")  # POSIX only
    limit = exported["pt"].stat().st_size // 2
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "from PLBOptCore.cli import main; sys.exit(main(sys.argv[1:]))")
    output = tmp_path / "model.pt2"
    result = subprocess.run([sys.executable, "-c", script, "export", str(exported["run"]), "-o", str(output)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{output}: " in lines[0] and "disk full?" in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_export_refuses_an_output_name_that_is_not_pt2(exported, tmp_path, capfd):
    assert main(["export", str(exported["run"]), "-o", str(tmp_path / "model.pt")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "name it *.pt2" in err
    assert not list(tmp_path.iterdir())


def test_load_exported_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    _torchscript_v1(torch.nn.Identity(), {"forward": torch.zeros(1)}, tmp_path / "other_script.pt", {"format": "other"})
    cases = {"foreign.pt": "not an exported model", "noise.pt": "not an exported model",
             "other_script.pt": "not a PLBOpt export", "missing.pt": "not found"}
    for name, problem in cases.items():
        with pytest.raises(CheckpointError, match=problem) as info:
            load_exported(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name))
    assert zipfile.is_zipfile(tmp_path / "foreign.pt")  # a torch file, still refused


def test_export_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "model.pt2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no best checkpoint" in err and str(tmp_path / "run") in err
    assert not (tmp_path / "model.pt2").exists() and not (tmp_path / "model.json").exists()


def test_an_export_postprocesses_as_its_checkpoint_does(exported, dataset, tmp_path):
    from PLBOptCore.engine.checkpoint import load_checkpoint, save_checkpoint
    from PLBOptCore.export import postprocessed_classes

    assert load_exported(exported["pt"])[1]["postprocessing"] == {"largest_component": []}  # nothing measured
    state = load_checkpoint(exported["run"] / "checkpoints" / "best.pt")
    classes = len(state["labels"])
    chosen = tmp_path / "chosen.pt"
    save_checkpoint(chosen, {**state, "largest_component_gain_validation": torch.tensor([0.0, 0.2] + [-0.1] * (classes - 2))})
    assert main(["export", str(exported["run"]), "-o", str(tmp_path / "model.pt2"), "--checkpoint", str(chosen)]) == 0
    metadata = load_exported(tmp_path / "model.pt2")[1]
    assert metadata["postprocessing"] == {"largest_component": [1]}
    image = _test_image(dataset)
    expected = Predictor.from_checkpoint(chosen, device="cpu").predict_image(image)
    label, confidence = predict_with_export(tmp_path / "model.pt2", image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(expected.label))
    np.testing.assert_allclose(sitk.GetArrayFromImage(confidence), sitk.GetArrayFromImage(expected.confidence),
                               rtol=0, atol=1e-6)
    assert postprocessed_classes(Path("old.pt2"), {"num_classes": 3}) == []  # exports before postprocessing
    for bad in ({"largest_component": [0]}, {"largest_component": [3]}, {"largest_component": "1"},
                {"largest_component": [True]}, ["largest_component"]):
        with pytest.raises(CheckpointError, match=r"^bad\.pt2: postprocessing\.largest_component"):
            postprocessed_classes(Path("bad.pt2"), {"num_classes": 3, "postprocessing": bad})
