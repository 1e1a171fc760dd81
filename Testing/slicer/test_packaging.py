"""The packaged extension works on its own: configure and install the extension's CMake with a
stand-in for Slicer's CMake package, then train and predict using the installed tree only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import HERE, MODULE_DIR

REPO = MODULE_DIR.parent
MODULES_SUBDIR = Path("lib/Slicer-5.12/qt-scripted-modules")  # Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR of the stand-in



def find_cmake() -> str:
    """cmake on PATH, else the one the ``test`` extra's cmake wheel put next to this interpreter
    (a venv used without activating it, as in .ci/run), else ""."""
    beside = Path(sys.executable).with_name("cmake")
    return shutil.which("cmake") or (str(beside) if beside.is_file() else "")


CMAKE = find_cmake()
pytestmark = pytest.mark.skipif(not CMAKE, reason="cmake is not installed: cannot build the extension")

# Runs in a child whose only PYTHONPATH entry is the installed module folder, from a folder
# outside the checkout: the real workflow logic, jobs included, on the installed files.
WORKFLOW = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import PLBOptLib
    from PLBOptLib import TrainSettings, WorkflowLogic, bundle

    work = Path(sys.argv[1])
    logic = WorkflowLogic(scene=object(), working_dir=work, python=sys.executable, log_callback=print)
    settings = TrainSettings(preset="plbopt", iterations=4, patch_size=(16, 32, 32), device="cpu", base_filters=4,
                             overrides={"checkpoint_every": 2, "validate_every": 1000, "log_every": 1})
    training = logic.start_training(settings, export=False)
    progress = training.wait(timeout=300)
    prediction = logic.start_prediction()
    prediction_status = prediction.process.wait(timeout=300)
    print(json.dumps({"module": PLBOptLib.__file__, "core_root": str(bundle.core_root()),
                      "training": [progress.status, progress.step, training.process.returncode],
                      "prediction": prediction_status, "outputs": sorted(p.name for p in prediction.out_dir.iterdir())}))
""")


def installed_environment(module_dir: Path) -> dict:
    """The environment without the checkout: the installed module folder is the only PYTHONPATH
    entry (the venv's editable install of the checkout is a meta-path finder that path entries
    take precedence over; the assertions below check which copy was imported)."""
    return {**os.environ, "PYTHONPATH": str(module_dir), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Prefix into which the extension was installed by its own CMake."""
    root = tmp_path_factory.mktemp("package")
    run = dict(capture_output=True, text=True, timeout=300)
    configure = subprocess.run([CMAKE, "-S", str(REPO), "-B", str(root / "build"), "-DBUILD_TESTING=OFF",
                                f"-DSlicer_DIR={HERE / 'slicer_cmake_standin'}"], **run)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    install = subprocess.run([CMAKE, "--install", str(root / "build"), "--prefix", str(root / "prefix")], **run)
    assert install.returncode == 0, install.stdout + install.stderr
    return root / "prefix"


def test_every_core_and_module_file_is_installed(installed):
    module_dir = installed / MODULES_SUBDIR
    for source_dir, installed_dir in ((REPO / "PLBOptCore", module_dir / "PLBOptCore"),
                                      (MODULE_DIR / "PLBOptLib", module_dir / "PLBOptLib")):
        sources = {p.relative_to(source_dir) for p in source_dir.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
        copies = {p.relative_to(installed_dir) for p in installed_dir.rglob("*") if p.is_file()}
        assert sources and sources == copies, f"not installed: {sorted(map(str, sources - copies))}"
    for name in ("PLBOpt.py", "Resources/UI/PLBOpt.ui", "Resources/Icons/PLBOpt.png"):
        assert (module_dir / name).is_file(), name


def test_installed_extension_trains_and_predicts_on_its_own(installed, tmp_path):
    from PLBOptCore.data.phantom import make_phantom_dataset

    module_dir = installed / MODULES_SUBDIR
    work = tmp_path / "work"
    make_phantom_dataset(work / "dataset", n_labeled=2, n_unlabeled=1, n_test=0, n_validation=0, shape=(16, 32, 32), seed=2)
    environment = installed_environment(module_dir)
    where = subprocess.run([sys.executable, "-c", "import PLBOptCore; print(PLBOptCore.__file__)"], cwd=tmp_path,
                           env=environment, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout + where.stderr

    result = subprocess.run([sys.executable, "-c", WORKFLOW, str(work)], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["module"]).is_relative_to(installed) and Path(report["core_root"]) == module_dir
    assert report["training"] == ["completed", 4, 0], result.stdout[-3000:]
    assert report["prediction"] == 0 and len(report["outputs"]) == 2  # label + confidence of the unlabeled case
    # Jobs started through run_bundled_core.py, which checked that they import the installed core.
    assert f"Running: {sys.executable} -m PLBOptCore train" in result.stdout
