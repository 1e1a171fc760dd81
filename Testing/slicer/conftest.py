"""Fixtures for testing PLBOptLib against real MRML nodes from the PyPI ``slicer-core`` wheel."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1] / "PLBOptSlicer"
for path in (HERE, MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import slicer  # noqa: E402
import vtk  # noqa: E402
from headless_slicer import create_headless_scene  # noqa: E402


@pytest.fixture
def scene():
    """A fresh headless scene; ``slicer.mrmlScene`` and ``slicer.modules`` point at it."""
    scene = create_headless_scene()
    yield scene
    scene.Clear(1)


def oblique_directions() -> np.ndarray:
    """A non-trivial IJK-to-RAS direction matrix (rotations about two axes, one axis flipped)."""
    a, b = math.radians(20), math.radians(-35)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx @ np.diag([1.0, -1.0, 1.0])


def add_volume(scene, name: str, array_kji: np.ndarray, spacing=(0.8, 0.7, 2.5), origin=(-30.0, 12.5, 40.0),
               directions: np.ndarray = None):
    """A scalar volume node holding ``array_kji`` on an oblique grid."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = vtk.vtkMatrix4x4()
    directions = oblique_directions() if directions is None else directions
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, directions[r, c])
    node.SetIJKToRASDirectionMatrix(matrix)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    node.CreateDefaultDisplayNodes()
    return node


def add_segmentation(scene, volume, masks: dict, colors: dict = None, name: str = None):
    """A segmentation drawn on ``volume`` with one segment per ``{name: mask_kji}``."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for segment_name, mask in masks.items():
        color = (colors or {}).get(segment_name, (0.5, 0.5, 0.5))
        segment_id = node.GetSegmentation().AddEmptySegment(segment_name, segment_name, list(color))
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, volume)
    return node


def phantom_case(shape=(12, 24, 28), seed=0):
    """(image, label) of a synthetic body with two organs: 1 = 'liver' ellipsoid, 2 = 'spleen' ball."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    shift = rng.uniform(-0.1, 0.1, 3)
    liver = ((x + 0.3 + shift[0]) / 0.45) ** 2 + ((y - shift[1]) / 0.5) ** 2 + (z / 0.8) ** 2 < 1
    spleen = ((x - 0.45 - shift[2]) / 0.25) ** 2 + ((y + 0.2) / 0.25) ** 2 + (z / 0.6) ** 2 < 1
    label = np.zeros(shape, np.uint8)
    label[liver] = 1
    label[spleen & ~liver] = 2
    body = (x / 0.95) ** 2 + (y / 0.9) ** 2 < 1
    image = np.where(body, 0.0, -1000.0) + np.choose(label, [0.0, 60.0, 120.0]) + rng.normal(0, 10, shape)
    return image.astype(np.float32), label


LAUNCHER_SCRIPT = '''#!{python}
"""Stand-in for Slicer's PythonSlicer, a CTK AppLauncher: it starts the real interpreter as a
child, forwards no signal (SIGTERM ends the launcher alone) and exits with the child's status."""
import subprocess, sys
sys.exit(subprocess.call([{python!r}, *sys.argv[1:]]))
'''


@pytest.fixture
def python_launcher(tmp_path) -> str:
    """Path of an executable launcher script that behaves like PythonSlicer (see LAUNCHER_SCRIPT)."""
    path = tmp_path / "PythonSlicer"
    path.write_text(LAUNCHER_SCRIPT.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def without_psutil(monkeypatch):
    """psutil not importable, as in a stock Slicer 5.6-5.12, which does not ship it (code that
    bound the module when it was imported sees None as well)."""
    monkeypatch.setitem(sys.modules, "psutil", None)
    from PLBOptLib import process

    monkeypatch.setattr(process, "psutil", None, raising=False)
    with pytest.raises(ImportError):
        import psutil  # noqa: F401


def _proc_stat(pid: int):
    """(state, parent PID) of a process from /proc, or None when it is gone. Tests observe
    processes through /proc because psutil is hidden from the code under test (and psutil itself
    stops working while ``sys.modules["psutil"]`` is None)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0], int(fields[1])


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent does not count)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendant_pids(pid: int):
    """PIDs of every process below ``pid`` now."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


requires_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="observes processes through /proc")


def save_to_disk(scene, folder: Path) -> None:
    """What Slicer's save dialog does: every modified data node written to ``folder`` with its
    storage node (not Slicer's built-in colour tables, which every scene has), then the scene file."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if not node.IsA("vtkMRMLStorableNode") or not node.GetModifiedSinceRead():
            continue
        if node.IsA("vtkMRMLColorTableNode") and node.GetType() != node.User:
            continue
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetID()}.{storage.GetDefaultWriteFileExtension()}"))
        assert storage.WriteData(node), node.GetName()
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()


def save_and_reopen(scene, folder: Path):
    """The scene as Slicer gives it back after *Save* and, in a new Slicer, *Load scene*: saved to
    ``folder``, then imported into a fresh headless scene (which ``slicer.mrmlScene`` then is)."""
    from headless_slicer import create_headless_scene

    save_to_disk(scene, folder)
    reopened = create_headless_scene()
    reopened.SetURL(str(folder / "scene.mrml"))
    assert reopened.Import()
    return reopened
