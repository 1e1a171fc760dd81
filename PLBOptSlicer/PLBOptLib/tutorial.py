"""The data of the tutorial (``PLBOptSlicer/TUTORIAL.md``): PLBOptCore's synthetic abdominal CT
phantom, written by the bundled PLBOptCore in a child process and loaded into the scene.

:func:`write_phantom` runs ``PLBOptCore demo --data-only`` the way every job runs the core (PythonSlicer,
through ``run_bundled_core.py``), so PLBOptLib still never imports PLBOptCore or torch, and adds a
Slicer colour table of the classes (:data:`COLOR_TABLE_NAME`). :func:`load_phantom` loads it as the
tutorial's by-hand route does: each image as a volume, each label map of ``labelsTr`` as a
segmentation whose segments are named and coloured by that colour table (Slicer's *Add data*,
description *Segmentation*, option *Color node*), then given its volume as reference geometry (what
Segment Editor's *Specify geometry* does), which is how the module knows the two belong together.

Folder written (``plbopt demo --data-only`` with no validation and no test volumes)::

    dataset.json, phantom-classes.ctbl
    imagesTr/phantom_000.nii.gz, phantom_001.nii.gz     labeled volumes
    labelsTr/phantom_000.nii.gz, phantom_001.nii.gz     their label maps (classes of dataset.json)
    imagesUn/phantom_002.nii.gz ... phantom_013.nii.gz  unlabeled volumes
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import slicer

from . import bundle
from .errors import PLBOptSlicerError
from .process import hidden_console_options, in_slicer_application, python_executable

PHANTOM_LABELED = 2
PHANTOM_UNLABELED = 12
COLOR_TABLE_NAME = "phantom-classes.ctbl"
LABELS_SUFFIX = " labels"  # the segmentation of case "phantom_000" is "phantom_000 labels"


def phantom_command(python: str, out_dir: Path, unlabeled: int = PHANTOM_UNLABELED,
                    root: Optional[Path] = None) -> List[str]:
    """The job command that writes the phantom folder: ``PLBOptCore demo --data-only`` with
    :data:`PHANTOM_LABELED` labeled and ``unlabeled`` unlabeled volumes, none for validation or test."""
    return bundle.checked_core_command(
        [python, "-m", bundle.CORE_PACKAGE, "demo", "--data-only", "-o", str(out_dir),
         "--labeled", str(PHANTOM_LABELED), "--unlabeled", str(int(unlabeled)), "--validation", "0", "--test", "0"],
        root if root is not None else bundle.core_root())


def write_phantom(out_dir: Path, unlabeled: int = PHANTOM_UNLABELED, python: Optional[str] = None,
                  timeout: float = 600.0) -> Path:
    """Write the tutorial's phantom folder (see the module docstring) and return it. Waits for the
    child process (a few seconds); it needs the dependencies the module installs (numpy, scipy,
    torch; SimpleITK comes with Slicer)."""
    out_dir = Path(out_dir).expanduser().resolve()
    root = bundle.core_root()
    command = phantom_command(python or python_executable(), out_dir, unlabeled, root)
    try:
        result = subprocess.run(command, env=bundle.job_environment(root, os.environ), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                timeout=timeout, **hidden_console_options())
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PLBOptSlicerError(f"{out_dir}: the phantom could not be written ({error})") from error
    if result.returncode != 0:
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        raise PLBOptSlicerError(f"{out_dir}: the phantom could not be written: "
                                f"{lines[-1] if lines else f'exit status {result.returncode}'}")
    write_color_table(out_dir)
    return out_dir


def class_table(dataset_dir: Path) -> Tuple[Dict[int, str], Dict[int, Tuple[int, int, int]]]:
    """Class names and 0-255 colours by label value from ``dataset_dir/dataset.json``."""
    path = Path(dataset_dir) / "dataset.json"
    try:
        data = json.loads(path.read_text())
        labels = {int(value): str(name) for value, name in data["labels"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise PLBOptSlicerError(f"{path}: cannot read class names ({error})") from error
    colors = {int(value): tuple(int(c) for c in rgb[:3]) for value, rgb in (data.get("colors") or {}).items()}
    return labels, colors


def write_color_table(dataset_dir: Path) -> Path:
    """``dataset_dir/phantom-classes.ctbl``: the classes of dataset.json in Slicer's colour table
    text format (``value name R G B A`` per line), which names and colours the segments of a label
    map loaded as a segmentation."""
    labels, colors = class_table(dataset_dir)
    lines = ["# PLBOpt phantom classes (from dataset.json): value name R G B A"]
    for value in sorted(labels):
        red, green, blue = (0, 0, 0) if value == 0 else colors.get(value, (128, 128, 128))
        lines.append(f"{value} {labels[value].replace(' ', '_')} {red} {green} {blue} {0 if value == 0 else 255}")
    path = Path(dataset_dir) / COLOR_TABLE_NAME
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_color_table(scene, path: Path):
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLColorTableStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        raise PLBOptSlicerError(f"{path}: Slicer cannot read this colour table")
    return node


def load_phantom(dataset_dir: Path, scene=None) -> List[str]:
    """Load the phantom folder into ``scene`` (default ``slicer.mrmlScene``): every volume of
    ``imagesTr`` and ``imagesUn`` named by its file, and each label map of ``labelsTr`` as the
    segmentation ``"<case> labels"`` of its volume, segments named by the colour table. Returns the
    names of the volumes loaded, labeled first."""
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    scene = scene or slicer.mrmlScene
    data = json.loads((dataset_dir / "dataset.json").read_text())
    color_table_path = dataset_dir / COLOR_TABLE_NAME
    if not color_table_path.is_file():
        write_color_table(dataset_dir)
    color_node = _read_color_table(scene, color_table_path)
    volumes_logic = slicer.modules.volumes.logic()
    segmentations_logic = slicer.modules.segmentations.logic()
    loaded, shown = [], None
    for entry in list(data.get("training", [])) + list(data.get("unlabeled", [])):
        image = dataset_dir / entry["image"]
        name = image.name[: -len(".nii.gz")] if image.name.endswith(".nii.gz") else image.stem
        volume = volumes_logic.AddArchetypeVolume(str(image), name, 0)
        if volume is None:
            raise PLBOptSlicerError(f"{image}: Slicer cannot read this volume")
        volume.SetName(name)
        loaded.append(name)
        if entry.get("label"):
            label = dataset_dir / entry["label"]
            segmentation = segmentations_logic.LoadSegmentationFromFile(str(label), True, name + LABELS_SUFFIX,
                                                                        color_node)
            if segmentation is None:
                raise PLBOptSlicerError(f"{label}: Slicer cannot read this label map as a segmentation")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            shown = shown or volume
    if in_slicer_application() and shown is not None:  # the first labeled case in the slice views
        slicer.util.setSliceViewerLayers(background=shown, fit=True)
    return loaded
