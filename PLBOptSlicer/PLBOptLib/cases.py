"""Cases in the scene (volume + optional segmentation + status) and their export as a PLBOptCore dataset.

A case is a scalar volume. Its segmentation is the one the module linked to it (node reference
``PLBOptSegmentation``), otherwise the segmentation whose reference geometry is that volume, which
is what Segment Editor creates. The status lives in the volume's ``PLBOpt.Status`` attribute so it
is saved with the scene.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import vtk

import slicer

from . import imageio
from .errors import PLBOptSlicerError

STATUS_ATTRIBUTE = "PLBOpt.Status"
CASE_NAME_ATTRIBUTE = "PLBOpt.CaseName"
ROLE_ATTRIBUTE = "PLBOpt.Role"  # marks module-created volumes (confidence maps) that are not cases
SEGMENTATION_REFERENCE_ROLE = "PLBOptSegmentation"
BACKGROUND_NAME = "background"


class Status(str, Enum):
    """Where a case is in the semi-supervised loop."""

    LABELED = "labeled"  # trusted label: trains the supervised loss
    UNLABELED = "unlabeled"  # image only: trains the unsupervised losses, gets a pseudo label
    PSEUDO_LABELED = "pseudo-labeled"  # holds a model prediction, not yet checked
    CORRECTED = "corrected"  # a clinician is editing the pseudo label; becomes labeled on accept


@dataclass
class SceneCase:
    """One volume of the scene and what the module knows about it."""

    name: str  # file-safe case name used in the dataset folder
    volume: "slicer.vtkMRMLScalarVolumeNode"
    segmentation: Optional["slicer.vtkMRMLSegmentationNode"]
    status: Status

    @property
    def trains_supervised(self) -> bool:
        return self.status == Status.LABELED


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "case"
    # PLBOptCore reads a trailing "_0000" as nnU-Net's channel suffix and drops it from case names,
    # so the prediction of "scan_0000" would come back as "scan".
    if name.endswith("_0000"):
        name = name[: -len("_0000")] + "-0000"
    # "_confidence" is the suffix of PLBOptCore's confidence maps in the same folder.
    return name[: -len("_confidence")] + "_conf" if name.endswith("_confidence") else name


def _node_number(node_id: str) -> Tuple[str, int]:
    """Sort key of a node ID in creation order: ``vtkMRMLScalarVolumeNode9`` before ``...Node10``."""
    match = re.fullmatch(r"(.*?)(\d*)", node_id or "")
    return match.group(1), int(match.group(2) or 0)


def _segment_names(segmentation_node) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName().strip() for i in range(segmentation.GetNumberOfSegments())]


def linked_segmentation(volume_node) -> Optional["slicer.vtkMRMLSegmentationNode"]:
    """The segmentation of a case: the module's explicit link first, else one drawn on this volume."""
    linked = volume_node.GetNodeReference(SEGMENTATION_REFERENCE_ROLE)
    if linked is not None:
        return linked
    scene = volume_node.GetScene()
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if node.GetNodeReference(role) is volume_node:
            return node
    return None


def set_case_segmentation(volume_node, segmentation_node, status: Status) -> None:
    """Link a segmentation to a case and record its status (both saved with the scene)."""
    volume_node.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentation_node.GetID() if segmentation_node else None)
    volume_node.SetAttribute(STATUS_ATTRIBUTE, status.value)


def set_status(volume_node, status: Status) -> None:
    volume_node.SetAttribute(STATUS_ATTRIBUTE, status.value)


def find_cases(scene) -> List[SceneCase]:
    """All case volumes of the scene, sorted by name, with unique file-safe case names.

    Label maps, hidden helper volumes and module-made confidence maps are not cases. Without a
    stored status a case is labeled when it has a segmentation with at least one segment.
    """
    volumes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetHideFromEditors() or node.GetAttribute(ROLE_ATTRIBUTE):
            continue
        if node.GetImageData() is None:
            continue
        volumes.append(node)
    volumes.sort(key=lambda node: (node.GetName() or "", _node_number(node.GetID())))

    # Exported cases are named first: their files and predictions carry that name, and a volume
    # added later under the same name must not take it over (it becomes "<name>_2").
    names, used = {}, set()
    for volume in sorted(volumes, key=lambda node: not node.GetAttribute(CASE_NAME_ATTRIBUTE)):
        name = volume.GetAttribute(CASE_NAME_ATTRIBUTE) or _safe_name(volume.GetName() or "case")
        unique, counter = name, 2
        while unique in used:
            unique, counter = f"{name}_{counter}", counter + 1
        used.add(unique)
        names[volume.GetID()] = unique

    cases = []
    for volume in volumes:
        unique = names[volume.GetID()]
        segmentation = linked_segmentation(volume)
        stored = volume.GetAttribute(STATUS_ATTRIBUTE)
        if stored:
            status = Status(stored)
        else:
            has_segments = segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0
            status = Status.LABELED if has_segments else Status.UNLABELED
        cases.append(SceneCase(name=unique, volume=volume, segmentation=segmentation, status=status))
    return cases


def find_case(scene, name: str) -> SceneCase:
    """The case called ``name``; a clear error listing the known cases otherwise."""
    cases = find_cases(scene)
    for case in cases:
        if case.name == name:
            return case
    raise PLBOptSlicerError(f"no case named {name!r}; cases: {', '.join(c.name for c in cases) or 'none'}")


def class_names(cases: Sequence[SceneCase], preferred_order: Sequence[str] = ()) -> List[str]:
    """Foreground class names shared by every labeled case (segment named "background" is ignored).

    The order (class index 1..N) follows ``preferred_order`` when it has the same names, so a
    fine-tuned model keeps its output channels, else the first labeled case's segment order.
    Raises when labeled cases disagree, naming the case and the missing/extra names.
    """
    labeled = [case for case in cases if case.trains_supervised]
    if not labeled:
        raise PLBOptSlicerError("no labeled case: segment at least one volume (Segment Editor) so the model "
                                "learns the class names")
    reference_case, reference_names = None, None
    for case in labeled:
        if case.segmentation is None:
            raise PLBOptSlicerError(f"{case.volume.GetName()}: marked labeled but has no segmentation")
        names = [n for n in _segment_names(case.segmentation) if n.lower() != BACKGROUND_NAME]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PLBOptSlicerError(f"{case.segmentation.GetName()}: segment names used twice: {', '.join(duplicates)}")
        if not names:
            raise PLBOptSlicerError(f"{case.segmentation.GetName()}: marked labeled but has no segments")
        if reference_names is None:
            reference_case, reference_names = case, names
        elif set(names) != set(reference_names):
            missing = sorted(set(reference_names) - set(names))
            extra = sorted(set(names) - set(reference_names))
            raise PLBOptSlicerError(
                f"{case.segmentation.GetName()}: segment names differ from {reference_case.segmentation.GetName()}"
                f" (missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'}); "
                "rename segments so every labeled case uses the same class names")
    if set(preferred_order) == set(reference_names):
        return list(preferred_order)
    return reference_names


def class_colors(case: SceneCase, names: Sequence[str]) -> Dict[str, Tuple[int, int, int]]:
    """Segment colours of a labeled case as 0-255 RGB per class name."""
    segmentation = case.segmentation.GetSegmentation()
    colors = {}
    for name in names:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        colors[name] = tuple(int(round(255 * c)) for c in segment.GetColor())
    return colors


def check_segmentation_geometry(case: SceneCase) -> None:
    """Reject a segmentation whose voxel grid differs from its volume's.

    Export would otherwise resample it silently onto the volume grid, moving label boundaries.
    The segmentation's reference geometry is compared when set; else each segment's labelmap grid
    must share the volume's spacing and axes and lie on its lattice.
    """
    imageio.check_not_transformed(case.volume)
    imageio.check_not_transformed(case.segmentation)
    volume_grid = imageio.volume_geometry(case.volume)
    segmentation = case.segmentation.GetSegmentation()
    reference = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    where = f"{case.segmentation.GetName()} (segmentation of {case.volume.GetName()})"
    if reference:
        grid = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(reference, grid)
        problems = imageio.oriented_image_geometry(grid).differences(volume_grid)
        if problems:
            raise PLBOptSlicerError(f"{where}: geometry does not match the volume: {'; '.join(problems)}; "
                                    "resample the segmentation onto the volume (Segmentations module: "
                                    "export to a labelmap with the volume as reference) and reload it")
        return
    for index in range(segmentation.GetNumberOfSegments()):
        labelmap = case.segmentation.GetBinaryLabelmapInternalRepresentation(segmentation.GetNthSegmentID(index))
        if labelmap is None or labelmap.IsEmpty():
            continue
        grid = imageio.oriented_image_geometry(labelmap)
        problems = [p for p in grid.differences(volume_grid) if not p.startswith(("size", "origin"))]
        offset_mm = np.linalg.solve(volume_grid.directions, np.subtract(grid.origin, volume_grid.origin))
        offset_voxels = offset_mm / np.asarray(volume_grid.spacing)
        if not np.allclose(offset_voxels, np.round(offset_voxels), atol=1e-3):
            problems.append("voxels are not on the volume's grid")
        if problems:
            raise PLBOptSlicerError(f"{where}: geometry does not match the volume: {'; '.join(problems)}")


def label_array(case: SceneCase, names: Sequence[str]) -> np.ndarray:
    """Class-index label map (K, J, I) of a labeled case on its volume's grid (0 = background).

    Segments are matched by name, so segment order in each case does not matter; where segments
    overlap the later class wins.
    """
    check_segmentation_geometry(case)
    segmentation = case.segmentation.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    for name in names:
        segment_ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(name))
    scene = case.volume.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__PLBOpt_export__")
    try:
        # Label value = position in segment_ids + 1, i.e. the class index.
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                case.segmentation, segment_ids, labelmap, case.volume):
            raise PLBOptSlicerError(f"{case.segmentation.GetName()}: export to a labelmap failed")
        labels = slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        if labelmap.GetDisplayNode() is not None:
            scene.RemoveNode(labelmap.GetDisplayNode())
        scene.RemoveNode(labelmap)
    return labels.astype(np.uint8 if len(names) < 255 else np.int16)


@dataclass
class ExportedDataset:
    """What :func:`export_dataset` wrote."""

    root: Path
    class_names: List[str]  # index 1..N
    labeled: List[str]
    unlabeled: List[str]

    @property
    def unlabeled_dir(self) -> Path:
        return self.root / "imagesUn"


def export_dataset(cases: Sequence[SceneCase], out_dir: Path, preferred_order: Sequence[str] = (),
                   name: str = "PLBOpt Slicer dataset") -> ExportedDataset:
    """Write the scene's cases as a PLBOptCore dataset folder (dataset.json, imagesTr, labelsTr, imagesUn).

    Labeled cases go to imagesTr/labelsTr; unlabeled, pseudo-labeled and not yet accepted
    corrected cases go to imagesUn (their labels are not trusted). Images keep their exact grid
    (origin, spacing, direction) as NIfTI. Everything is validated before anything is written, and
    the image folders are rewritten so cases removed from the scene do not linger.
    """
    out_dir = Path(out_dir)
    names = class_names(cases, preferred_order)
    labeled = [case for case in cases if case.trains_supervised]
    unlabeled = [case for case in cases if not case.trains_supervised]
    for case in labeled:
        check_segmentation_geometry(case)
    for case in unlabeled:
        imageio.check_not_transformed(case.volume)
    colors = class_colors(labeled[0], names)

    for folder in ("imagesTr", "labelsTr", "imagesUn"):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    training, unlabeled_entries = [], []
    for case in labeled:
        grid = imageio.volume_geometry(case.volume)
        image_path, label_path = f"imagesTr/{case.name}.nii.gz", f"labelsTr/{case.name}.nii.gz"
        imageio.write_image(imageio.array_to_sitk(slicer.util.arrayFromVolume(case.volume), grid), out_dir / image_path)
        imageio.write_image(imageio.array_to_sitk(label_array(case, names), grid), out_dir / label_path)
        training.append({"image": image_path, "label": label_path})
    for case in unlabeled:
        grid = imageio.volume_geometry(case.volume)
        image_path = f"imagesUn/{case.name}.nii.gz"
        imageio.write_image(imageio.array_to_sitk(slicer.util.arrayFromVolume(case.volume), grid), out_dir / image_path)
        unlabeled_entries.append({"image": image_path})
    for case in cases:
        # Predictions come back under the case name; remember it even if the node is renamed later.
        case.volume.SetAttribute(CASE_NAME_ATTRIBUTE, case.name)

    manifest = {
        "name": name,
        "labels": {"0": BACKGROUND_NAME, **{str(i + 1): n for i, n in enumerate(names)}},
        "colors": {str(i + 1): list(colors[n]) for i, n in enumerate(names)},
        "training": training,
        "unlabeled": unlabeled_entries,
        "validation": [],
        "test": [],
    }
    _write_json(out_dir / "dataset.json", manifest)
    return ExportedDataset(root=out_dir, class_names=names, labeled=[c.name for c in labeled],
                           unlabeled=[c.name for c in unlabeled])


def read_class_table(dataset_json: Path) -> Tuple[Dict[int, str], Dict[int, Tuple[int, int, int]]]:
    """Class names and 0-255 colours by label value from a dataset.json (a run folder keeps a copy)."""
    path = Path(dataset_json)
    try:
        data = json.loads(path.read_text())
        labels = {int(k): str(v) for k, v in data["labels"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise PLBOptSlicerError(f"{path}: cannot read class names ({error})") from error
    colors = {int(k): tuple(int(c) for c in v[:3]) for k, v in (data.get("colors") or {}).items()}
    return labels, colors


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)
