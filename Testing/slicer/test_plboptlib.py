"""PLBOptLib (the PLBOpt module's logic) on real MRML nodes, headless."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from conftest import (MODULE_DIR, add_segmentation, add_volume, oblique_directions, phantom_case, process_running,
                      requires_proc)
import PLBOptLib
from PLBOptLib import (PLBOptSlicerError, Status, TrainSettings, WorkflowLogic, bundle, cases, dependencies, imageio,
                       review)
from PLBOptLib.events import EventsFollower, TrainingProgress, format_duration
from PLBOptLib.logic import TrainingJob
from PLBOptLib.process import STOP_FILE_NAME, JobProcess, train_command

COLORS = {"liver": (0.9, 0.4, 0.2), "spleen": (0.2, 0.5, 0.9)}


def add_phantom(scene, name, seed, labeled=True, segment_order=("liver", "spleen"), **grid):
    image, label = phantom_case(seed=seed)
    volume = add_volume(scene, name, image, **grid)
    if labeled:
        masks = {n: label == {"liver": 1, "spleen": 2}[n] for n in segment_order}
        add_segmentation(scene, volume, masks, COLORS)
    return volume, image, label


def expected_lps(volume):
    grid = imageio.volume_geometry(volume)
    flip = np.diag([-1.0, -1.0, 1.0])
    return np.asarray(grid.spacing), flip @ np.asarray(grid.origin), (flip @ grid.directions).ravel()


# ---- dataset export ---------------------------------------------------------------------------

def test_export_keeps_geometry_and_labels_voxel_exact(scene, tmp_path):
    first, image_a, label_a = add_phantom(scene, "patient A", seed=1)
    # Segment order differs between cases: classes are matched by name, not position.
    second, _, label_b = add_phantom(scene, "patient B", seed=2, segment_order=("spleen", "liver"),
                                     spacing=(0.9, 0.9, 3.0), origin=(5.0, -8.0, 1.5))
    third, image_c, _ = add_phantom(scene, "patient C", seed=3, labeled=False)

    logic = WorkflowLogic(scene, working_dir=tmp_path)
    assert [(c.name, c.status) for c in logic.cases()] == [
        ("patient_A", Status.LABELED), ("patient_B", Status.LABELED), ("patient_C", Status.UNLABELED)]
    exported = logic.export_dataset()

    manifest = json.loads((tmp_path / "dataset" / "dataset.json").read_text())
    assert manifest["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert manifest["colors"] == {"1": [230, 102, 51], "2": [51, 128, 230]}
    assert manifest["training"] == [{"image": "imagesTr/patient_A.nii.gz", "label": "labelsTr/patient_A.nii.gz"},
                                    {"image": "imagesTr/patient_B.nii.gz", "label": "labelsTr/patient_B.nii.gz"}]
    assert manifest["unlabeled"] == [{"image": "imagesUn/patient_C.nii.gz"}]
    assert exported.class_names == ["liver", "spleen"]

    for volume, name, folder, image, label in ((first, "patient_A", "Tr", image_a, label_a),
                                               (second, "patient_B", "Tr", None, label_b),
                                               (third, "patient_C", "Un", image_c, None)):
        written = sitk.ReadImage(str(tmp_path / "dataset" / f"images{folder}" / f"{name}.nii.gz"))
        spacing, origin, direction = expected_lps(volume)
        np.testing.assert_allclose(written.GetSpacing(), spacing, rtol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), origin, atol=1e-5)
        np.testing.assert_allclose(written.GetDirection(), direction, atol=1e-6)
        if image is not None:
            np.testing.assert_array_equal(sitk.GetArrayFromImage(written), image)
        if label is not None:
            written_label = sitk.ReadImage(str(tmp_path / "dataset" / "labelsTr" / f"{name}.nii.gz"))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(written_label), label)
            np.testing.assert_allclose(written_label.GetDirection(), direction, atol=1e-6)
    assert abs(np.linalg.det(oblique_directions()) + 1) < 1e-9  # the grid really is oblique and flipped


def test_case_names_keep_clear_of_plboptcore_suffixes(scene, tmp_path):
    for name in ("scan_0000", "map_confidence"):
        add_volume(scene, name, phantom_case(seed=1)[0])
    assert sorted(c.name for c in WorkflowLogic(scene, working_dir=tmp_path).cases()) == ["map_conf", "scan-0000"]


def test_mismatched_segment_names_are_rejected(scene, tmp_path):
    add_phantom(scene, "A", seed=1)
    volume, _, label = add_phantom(scene, "B", seed=2, labeled=False)
    add_segmentation(scene, volume, {"liver": label == 1, "kidney": label == 2}, name="B seg")
    with pytest.raises(PLBOptSlicerError, match=r"B seg: segment names differ .*missing: spleen; extra: kidney"):
        WorkflowLogic(scene, working_dir=tmp_path).export_dataset()
    assert not (tmp_path / "dataset" / "dataset.json").exists()


def test_segmentation_geometry_mismatch_is_rejected(scene, tmp_path):
    volume, _, label = add_phantom(scene, "A", seed=1, labeled=False)
    coarse = add_volume(scene, "coarse", np.zeros((6, 12, 14), np.float32), spacing=(1.6, 1.4, 5.0))
    segmentation = add_segmentation(scene, coarse, {"liver": np.ones((6, 12, 14), bool)}, name="drawn elsewhere")
    cases.set_case_segmentation(volume, segmentation, Status.LABELED)
    coarse.SetAttribute(cases.ROLE_ATTRIBUTE, "reference")  # not a case itself
    with pytest.raises(PLBOptSlicerError, match=r"drawn elsewhere .*geometry does not match.*size.*spacing"):
        WorkflowLogic(scene, working_dir=tmp_path).export_dataset()


# ---- review: predictions as segments ----------------------------------------------------------

def write_fake_run(tmp_path, volumes_and_labels):
    """A run folder with class names and a prediction folder with label + confidence files."""
    run_dir, out_dir = tmp_path / "runs" / "run-001", tmp_path / "predictions" / "run-001"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "colors": {"1": [200, 100, 50], "2": [20, 120, 220]}}))
    confidences = {}
    for name, (volume, label, low_box) in volumes_and_labels.items():
        grid = imageio.volume_geometry(volume)
        confidence = np.where(label > 0, 0.9, 0.99).astype(np.float32)
        confidence[low_box] = 0.4
        confidences[name] = confidence
        imageio.write_image(imageio.array_to_sitk(label, grid), out_dir / f"{name}.nii.gz")
        imageio.write_image(imageio.array_to_sitk(confidence, grid), out_dir / "confidence" / f"{name}.nii.gz")
    return run_dir, out_dir, confidences


def test_predictions_load_as_named_coloured_segments_voxel_exact(scene, tmp_path):
    add_phantom(scene, "labeled", seed=0)
    first, _, label_1 = add_phantom(scene, "U1", seed=1, labeled=False)
    second, _, label_2 = add_phantom(scene, "U2", seed=2, labeled=False)
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    slice_node.SetLayoutName("Red")
    small = (slice(5, 7), slice(10, 12), slice(8, 10))
    large = (slice(3, 9), slice(6, 14), slice(4, 12))
    run_dir, out_dir, confidences = write_fake_run(tmp_path, {"U1": (first, label_1, small), "U2": (second, label_2, large)})

    logic = WorkflowLogic(scene, working_dir=tmp_path)
    ranked = logic.load_predictions(run_dir, out_dir)

    assert [item.case_name for item in ranked] == ["U2", "U1"]  # larger uncertain region ranks first
    for name, volume, label in (("U1", first, label_1), ("U2", second, label_2)):
        case = cases.find_case(scene, name)
        assert case.status == Status.PSEUDO_LABELED
        segmentation = case.segmentation.GetSegmentation()
        assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["liver", "spleen"]
        np.testing.assert_allclose(segmentation.GetSegment("spleen").GetColor(), (20 / 255, 120 / 255, 220 / 255))
        for value, segment in ((1, "liver"), (2, "spleen")):
            array = slicer.util.arrayFromSegmentBinaryLabelmap(case.segmentation, segment, volume)
            np.testing.assert_array_equal(array, label == value)
        confidence_node = volume.GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(confidence_node), confidences[name])
        assert confidence_node.GetDisplayNode().GetColorNode().GetName() == "PLBOpt confidence"
        assert case.segmentation.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume

    ras = logic.jump_to_least_confident("U1")
    expected = review.voxel_to_ras(first, (5.5, 10.5, 8.5))  # centre of the low-confidence box
    assert np.linalg.norm(np.subtract(ras, expected)) < 1.0 * max(first.GetSpacing())
    np.testing.assert_allclose(slice_node.GetSliceToRAS().GetElement(0, 3), ras[0], atol=1e-3)
    assert len(cases.find_cases(scene)) == 3  # confidence maps are not cases

    # Loading again replaces the old pseudo label instead of piling up nodes.
    logic.load_predictions(run_dir, out_dir)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 3


def test_corrected_case_is_promoted_to_labeled(scene, tmp_path):
    add_phantom(scene, "labeled", seed=0)
    volume, _, label = add_phantom(scene, "U1", seed=1, labeled=False)
    run_dir, out_dir, _ = write_fake_run(tmp_path, {"U1": (volume, label, (slice(0, 1),) * 3)})
    logic = WorkflowLogic(scene, working_dir=tmp_path)
    logic.load_predictions(run_dir, out_dir)

    segmentation = logic.begin_correction("U1")
    assert cases.find_case(scene, "U1").status == Status.CORRECTED
    corrected = label.copy()
    corrected[:, :, :4] = 0  # the clinician erases part of the liver
    slicer.util.updateSegmentBinaryLabelmapFromArray((corrected == 1).astype(np.uint8), segmentation, "liver", volume)
    export_before = logic.export_dataset()
    assert export_before.unlabeled == ["U1"]  # not trusted until accepted

    saved = logic.accept_as_labeled("U1")
    assert saved == tmp_path / "corrected" / "U1.seg.nrrd" and saved.is_file()
    assert cases.find_case(scene, "U1").status == Status.LABELED
    exported = logic.export_dataset()
    assert exported.labeled == ["U1", "labeled"] and exported.unlabeled == []
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "dataset" / "labelsTr" / "U1.nii.gz")))
    np.testing.assert_array_equal(written, corrected)


def test_accept_rejects_renamed_segments(scene, tmp_path):
    add_phantom(scene, "labeled", seed=0)
    volume, _, label = add_phantom(scene, "U1", seed=1, labeled=False)
    segmentation = add_segmentation(scene, volume, {"Liver ": label == 1, "spleen": label == 2}, name="U1 edit")
    cases.set_case_segmentation(volume, segmentation, Status.CORRECTED)
    with pytest.raises(PLBOptSlicerError, match="U1 edit: segment names differ"):
        WorkflowLogic(scene, working_dir=tmp_path).accept_as_labeled("U1")
    assert cases.find_case(scene, "U1").status == Status.CORRECTED


def test_least_confident_voxel_prefers_region_over_single_voxel():
    label = np.ones((20, 20, 20), np.uint8)
    confidence = np.full(label.shape, 0.95, np.float32)
    confidence[2, 2, 2] = 0.0  # one noisy voxel
    confidence[12:16, 5:9, 10:14] = 0.5  # a real uncertain region
    centre = review.least_confident_voxel(label, confidence)
    assert np.abs(np.subtract(centre, (13.5, 6.5, 11.5))).max() <= 0.5
    assert review.uncertainty_score(label, confidence) == pytest.approx(float(np.mean(1 - confidence)))


# ---- events and processes ---------------------------------------------------------------------

def test_events_follower_waits_for_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "old"}\n')
    follower = EventsFollower.from_end(path)
    with open(path, "a") as stream:
        stream.write('{"type": "start", "total_steps": 10, "start_step": 0, "device": "cpu", "preset": "plbopt"}\n{"type": "tr')
    assert [r["type"] for r in follower.read_new()] == ["start"]
    with open(path, "a") as stream:
        stream.write('ain", "step": 4, "loss": 0.5, "eta_seconds": 75}\nnot json\n')
    records = follower.read_new()
    assert records == [{"type": "train", "step": 4, "loss": 0.5, "eta_seconds": 75}]

    progress = TrainingProgress()
    assert progress.summary() == "Starting (loading data, building the model)…"
    assert progress.update({"type": "preprocess", "case": "a", "index": 1, "total": 2, "seconds": 3.0}) is None
    assert progress.summary() == "Preparing data: case 1/2 (a)"
    assert progress.update({"type": "preprocess", "case": "b", "index": 2, "total": 2}) == "Prepared 2 cases for training"
    progress.update({"type": "start", "total_steps": 10, "start_step": 0, "device": "cpu", "preset": "plbopt"})
    progress.update(records[0])
    assert progress.fraction == pytest.approx(0.4)
    assert progress.summary() == "Step 4/10, loss 0.5000, ETA 1 min 15 s"
    line = progress.update({"type": "validation", "step": 5, "dice": {"liver": 0.8, "spleen": 0.6}, "mean_dice": 0.7})
    assert line == "Validation at step 5: mean Dice 0.700 (liver 0.800, spleen 0.600)"
    progress.update({"type": "end", "step": 6, "status": "interrupted", "message": "SIGTERM"})
    assert progress.finished and progress.summary() == "Step 6/10, loss 0.5000, val Dice 0.700, interrupted"
    assert format_duration(3725) == "1 h 02 min"


def test_train_command_follows_the_cli_contract(tmp_path):
    settings = TrainSettings(preset="dhc", iterations=4, patch_size=(16, 32, 32), device="cpu", base_filters=4,
                             overrides={"checkpoint_every": 2, "log_every": 1})
    command = train_command("py", tmp_path / "ds", tmp_path / "run", settings, init_from=tmp_path / "last.pt")
    assert command == ["py", "-m", "PLBOptCore", "train", str(tmp_path / "ds"), "-o", str(tmp_path / "run"),
                       "--preset", "dhc", "--iterations", "4", "--patch-size", "16", "32", "32", "--device", "cpu",
                       "--quiet", "--base-filters", "4", "--init-from", str(tmp_path / "last.pt"),
                       "--set", "checkpoint_every=2", "log_every=1"]
    with pytest.raises(ValueError, match="unknown preset"):
        train_command("py", tmp_path, tmp_path, TrainSettings(preset="nope"))
    cached = train_command("py", tmp_path / "ds", tmp_path / "run", TrainSettings(cache_dir=tmp_path / "cache"))
    assert cached[-2:] == ["--cache-dir", str(tmp_path / "cache")]


FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    run = sys.argv[1]; os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    events = open(os.path.join(run, "events.jsonl"), "a")
    def emit(**r): events.write(json.dumps(r) + "\\n"); events.flush()
    emit(type="start", total_steps=1000, start_step=0, preset="plbopt", device="cpu")
    print("fake trainer running", flush=True)
    for step in range(1, 1000):
        if stop:
            open(os.path.join(run, "checkpoints", "last.pt"), "w").write(str(step))
            emit(type="checkpoint", step=step, path="checkpoints/last.pt")
            emit(type="end", step=step, status="interrupted", message="SIGTERM")
            sys.exit(130)
        emit(type="train", step=step, loss=1.0 / step, eta_seconds=1000 - step)
        time.sleep(0.02)
""")


def test_cancel_stops_child_which_leaves_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    process = JobProcess([sys.executable, "-c", FAKE_TRAINER, str(run_dir)]).start()
    job = TrainingJob(run_dir=run_dir, process=process, events=EventsFollower(run_dir / "events.jsonl"))
    log = []
    deadline = time.monotonic() + 20
    while job.progress.step < 3 and time.monotonic() < deadline:
        log += job.poll()
        time.sleep(0.05)
    assert job.progress.status == "running" and 0 < job.progress.fraction < 0.5
    job.cancel()
    progress = job.wait(timeout=20, log=log.append)
    assert process.returncode == 130
    assert progress.status == "interrupted" and progress.checkpoint == "checkpoints/last.pt"
    assert job.checkpoint.is_file() and job.finished
    assert "fake trainer running" in process.output


@requires_proc
def test_cancel_without_psutil_kills_the_tree_below_a_launcher_when_sigterm_is_ignored(tmp_path, python_launcher,
                                                                                       without_psutil):
    """A stock Slicer has no psutil: the job's own process group is what reaches the interpreter
    below PythonSlicer, which forwards no signal."""
    code = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', os.getpid(), flush=True); time.sleep(60)")
    process = JobProcess([python_launcher, "-c", code], kill_after_seconds=0.3).start()
    job = TrainingJob(run_dir=tmp_path, process=process, events=EventsFollower(tmp_path / "events.jsonl"))
    deadline = time.monotonic() + 20
    while not any(line.startswith("ready") for line in process.output) and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.02)
    child = int(next(line for line in process.output if line.startswith("ready")).split()[1])
    assert child != process.pid and os.getsid(child) == process.pid  # below the launcher, in the job's session
    started = time.monotonic()
    job.cancel()
    while process.running and time.monotonic() - started < 10:
        job.poll()
        time.sleep(0.05)
    assert not process_running(child), "the interpreter below the launcher survived Cancel"
    assert not process.running and time.monotonic() - started < 10
    job.poll()
    assert job.progress.status == "interrupted" and process.returncode != 0


def test_stop_file_alone_stops_a_trainer_that_gets_no_signal(tmp_path):
    """The Windows path (and any launcher that blocks signals): Cancel's stop file is enough."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = textwrap.dedent("""
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.02)
        print("stopped by the stop file", flush=True)
        sys.exit(130)
    """)
    stop_file = run_dir / STOP_FILE_NAME
    process = JobProcess([sys.executable, "-c", code, str(stop_file)], stop_file=stop_file, kill_after_seconds=30).start()
    while "ready" not in process.output:
        process.poll()
        time.sleep(0.02)
    process.cancel()
    assert process.wait(timeout=20) == 130 and "stopped by the stop file" in process.output


def test_failed_process_reports_its_last_line(tmp_path):
    code = "import sys; print('starting'); sys.stderr.write('dataset.json: no labeled case\\n'); sys.exit(2)"
    job = TrainingJob(run_dir=tmp_path, process=JobProcess([sys.executable, "-c", code]).start(),
                      events=EventsFollower(tmp_path / "events.jsonl"))
    progress = job.wait(timeout=20)
    assert progress.status == "failed" and progress.message == "dataset.json: no labeled case"


# ---- dependencies -----------------------------------------------------------------------------

def test_dependency_check_lists_only_missing_packages():
    installed = {"torch": "2.1.2+cu121", "numpy": "1.26.0", "scipy": "1.12", "SimpleITK": "2.3.1"}
    status = dependencies.check_dependencies(installed.get)
    assert not status.ready and not status.torch_ok  # 2.1.2 is older than the minimum
    assert status.missing_light == ["scikit-image>=0.21", "tqdm>=4.60", "pyyaml>=6", "matplotlib>=3.6"]
    text = status.install_description(Path("/ext/PLBOptCore"))
    assert f"torch>={dependencies.TORCH_MINIMUM},<{dependencies.TORCH_INSTALL_BELOW}, replacing torch 2.1.2+cu121" in text
    assert "PLBOptCore comes with the extension (/ext/PLBOptCore) and is not downloaded" in text
    assert dependencies.protected_constraints(installed.get) == ["torch==2.1.2+cu121", "SimpleITK==2.3.1"]
    assert dependencies.check_dependencies({**installed, "torch": "2.13.0", "scikit-image": "0.22", "tqdm": "4.6",
                                            "pyyaml": "6.0", "matplotlib": "3.8"}.get).ready
    assert dependencies.device_message({"cuda": False, "torch": "2.3"}).startswith("No CUDA GPU")
    # Restart only when a package Slicer has imported changed version.
    before, after = {"scikit-image": "0.21", "scipy": "1.10"}, {"scikit-image": "0.24", "scipy": "1.10"}
    assert dependencies.restart_reasons(before, after, imported={"skimage"}) == ["scikit-image 0.21 -> 0.24"]
    assert dependencies.restart_reasons(before, after, imported={"scipy"}) == []


PLBOPT_REQUIREMENT = re.compile(r"^\s*plbopt\s*(\[|@|[<>=!~])", re.IGNORECASE)  # a bare "plbopt" is the preset


def test_no_code_path_installs_plbopt_from_an_index(monkeypatch):
    """PLBOptCore ships with the extension; a bare ``plbopt`` from an index could be anyone's code."""
    requested = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements, **kwargs: requested.append(requirements),
                        raising=False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension: torch from PyPI
    nothing = dependencies.check_dependencies(lambda name: None)
    dependencies.install_torch(lambda line: None)
    dependencies.install_light(nothing.missing_light, lambda line: None)
    names = [dependencies.requirement_name(r) for call in requested for r in ([call] if isinstance(call, str) else call)
             if not r.startswith("-") and not r.endswith(".txt")]
    assert names == ["torch", *[dependencies.requirement_name(r) for r in dependencies.LIGHT_REQUIREMENTS]]
    # No string literal anywhere in the module's code is a requirement on plbopt.
    for path in [MODULE_DIR / "PLBOpt.py", *sorted((MODULE_DIR / "PLBOptLib").glob("*.py"))]:
        literals = [node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
                    and isinstance(node.value, str)]
        assert not [text for text in literals if PLBOPT_REQUIREMENT.match(text)], path


def test_versions_and_stop_file_name_agree_with_plboptcore():
    import PLBOptCore
    import PLBOptLib
    from PLBOptCore.engine import runcontrol

    pyproject = (MODULE_DIR.parent / "pyproject.toml").read_text()
    assert PLBOptLib.__version__ == PLBOptCore.__version__
    assert f'version = "{PLBOptCore.__version__}"' in pyproject
    assert STOP_FILE_NAME == runcontrol.STOP_FILE_NAME


def run_checked(root, environment_root, cwd):
    """``python -m PLBOptCore --version`` as a job runs it (through run_bundled_core.py)."""
    command = bundle.checked_core_command([sys.executable, "-m", "PLBOptCore", "--version"], root)
    result = subprocess.run(command, cwd=cwd, env=bundle.job_environment(environment_root, os.environ),
                            capture_output=True, text=True, timeout=120)
    return result.returncode, (result.stdout + result.stderr).strip().splitlines()[-1]


def test_jobs_run_the_bundled_core_and_refuse_another(tmp_path):
    root = bundle.core_root()
    assert root == MODULE_DIR.parent and bundle.bundled_core_version(root) == PLBOptLib.__version__
    environment = bundle.job_environment(root, {"PYTHONPATH": "/elsewhere"})
    assert environment["PYTHONPATH"].split(os.pathsep) == [str(root), "/elsewhere"]
    assert run_checked(root, root, tmp_path) == (0, f"plbopt {PLBOptLib.__version__}")

    stale = tmp_path / "updated" / "PLBOptCore"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text('__version__ = "9.9.9"\n')
    code, line = run_checked(stale.parent, stale.parent, tmp_path)
    assert code == 2 and re.search(r"PLBOptCore 9.9.9 does not match the PLBOpt module .*restart Slicer", line)
    # The job's interpreter imports some other PLBOptCore (here: the checkout) instead of the bundled one.
    code, line = run_checked(stale.parent, root, tmp_path)
    assert code == 2 and "instead of the one in the extension" in line
    # A PLBOptCore in the working folder comes first on sys.path, as with python -m.
    work = tmp_path / "work"
    (work / "PLBOptCore").mkdir(parents=True)
    (work / "PLBOptCore" / "__init__.py").write_text(f'__version__ = "{PLBOptLib.__version__}"\n')
    code, line = run_checked(root, root, work)
    assert code == 2 and line.startswith(str((work / "PLBOptCore").resolve())) and "working folder" in line
    with pytest.raises(ValueError, match="not a PLBOptCore command"):
        bundle.checked_core_command([sys.executable, "-c", "pass"], root)
    with pytest.raises(PLBOptSlicerError, match="PLBOptCore is missing next to the module"):
        bundle.core_root(tmp_path / "empty" / "module")


def test_plboptlib_does_not_import_torch_or_qt():
    code = ("import sys; sys.path.insert(0, %r); import PLBOptLib; "
            "bad = [m for m in ('torch', 'qt', 'ctk', 'PLBOptCore') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
            % str(MODULE_DIR))
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_panel_offers_exactly_the_core_presets():
    """PLBOptLib keeps its own list (it loads without torch); it must not drift from the core's."""
    from PLBOptCore.config import PRESETS as CORE_PRESETS

    assert PLBOptLib.PRESETS == tuple(CORE_PRESETS)
