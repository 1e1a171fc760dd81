"""Review of pseudo labels: load PLBOptCore predictions as MRML nodes, rank cases by uncertainty,
locate the least confident region, and colour the confidence overlay so that only doubt shows.

``<case>.nii.gz`` is a class-index label map and ``confidence/<case>.nii.gz`` the max-softmax
probability per voxel, both on the input image's grid (PLBOptCore's refine contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import vtk

import slicer

from . import imageio, terminology
from .cases import ROLE_ATTRIBUTE
from .errors import PLBOptSlicerError

CONFIDENCE_REFERENCE_ROLE = "PLBOptConfidence"
CONFIDENCE_ROLE = "confidence"
CONFIDENCE_COLORS_ROLE = "confidence-colors"
PSEUDO_LABEL_ROLE = "pseudo-label"
THRESHOLD_ATTRIBUTE = "PLBOpt.ConfidenceThreshold"
# The review numbers of a pseudo label, kept on its segmentation node so that they are saved with
# the scene: a reopened scene (or a reloaded module) shows the same ranking and jump target
# without reading the prediction files again.
UNCERTAINTY_ATTRIBUTE = "PLBOpt.Uncertainty"
LEAST_CONFIDENT_ATTRIBUTE = "PLBOpt.LeastConfidentRAS"
PREDICTION_FILE_ATTRIBUTE = "PLBOpt.PredictionFile"
# Voxels at least this confident are transparent in the overlay: the clinician sees only doubt.
DEFAULT_CONFIDENCE_THRESHOLD = 0.9
# The strongest doubt colour from here down; below 0.5 the predicted class is not even a majority.
OPAQUE_CONFIDENCE = 0.5
OVERLAY_OPACITY = 0.6  # foreground layer opacity of the confidence map in the slice views
# Used when a run's dataset.json has no "colors" (0-255 RGB; a qualitative palette).
DEFAULT_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


@dataclass
class LoadedPrediction:
    """A case's pseudo label and confidence as scene nodes, plus the review numbers."""

    segmentation: "slicer.vtkMRMLSegmentationNode"
    confidence: "slicer.vtkMRMLScalarVolumeNode"
    uncertainty: float  # mean (1 - confidence) over predicted foreground; higher = review first
    least_confident_ras: Tuple[float, float, float]


def class_color(value: int, colors: Dict[int, Tuple[int, int, int]]) -> Tuple[int, int, int]:
    return tuple(colors.get(value, DEFAULT_PALETTE[(value - 1) % len(DEFAULT_PALETTE)]))


def uncertainty_score(label: np.ndarray, confidence: np.ndarray) -> float:
    """Mean ``1 - confidence`` over predicted foreground (the whole volume if nothing is predicted).

    Restricting to foreground keeps large, easy background from diluting the score, so cases whose
    organs are uncertain rank first.
    """
    foreground = label > 0
    region = confidence[foreground] if foreground.any() else confidence
    return float(np.mean(1.0 - region.astype(np.float64)))


def least_confident_voxel(label: np.ndarray, confidence: np.ndarray,
                          window: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """(K, J, I) centre of the least confident foreground region.

    A box of ``window`` voxels (default about 1/8 of each axis, 3 to 15) slides over the
    uncertainty ``(1 - confidence)`` of predicted foreground; the box holding the most uncertainty
    wins, so a compact uncertain region beats an isolated noisy voxel. The result is the
    uncertainty-weighted centre inside that box.
    """
    foreground = label > 0
    weights = (1.0 - confidence.astype(np.float64)) * (foreground if foreground.any() else 1.0)
    shape = np.array(weights.shape)
    if window is None:
        window = np.clip(shape // 8, 3, 15)
    window = np.minimum(np.asarray(window, int), shape)
    # Summed-volume table: every box sum in O(1) by inclusion-exclusion over the 8 corners.
    table = np.zeros(tuple(shape + 1))
    table[1:, 1:, 1:] = weights.cumsum(0).cumsum(1).cumsum(2)
    (a, b, c), (n0, n1, n2) = window, shape - window + 1
    box = (table[a:a + n0, b:b + n1, c:c + n2] - table[:n0, b:b + n1, c:c + n2]
           - table[a:a + n0, :n1, c:c + n2] - table[a:a + n0, b:b + n1, :n2]
           + table[:n0, :n1, c:c + n2] + table[:n0, b:b + n1, :n2] + table[a:a + n0, :n1, :n2]
           - table[:n0, :n1, :n2])
    start = np.unravel_index(int(np.argmax(box)), box.shape)
    block = tuple(slice(s, s + w) for s, w in zip(start, window))
    block_weights = weights[block]
    if block_weights.sum() <= 0:
        return tuple(int(s + w // 2) for s, w in zip(start, window))
    grids = np.meshgrid(*[np.arange(s, s + w) for s, w in zip(start, window)], indexing="ij")
    return tuple(int(round(float((g * block_weights).sum() / block_weights.sum()))) for g in grids)


def voxel_to_ras(volume_node, kji: Sequence[int]) -> Tuple[float, float, float]:
    """World (RAS) position of voxel (K, J, I) of ``volume_node``."""
    ras = imageio.volume_geometry(volume_node).ijk_to_ras(np.asarray(kji[::-1], float))
    return tuple(float(v) for v in ras)


def doubt_colors(doubt: np.ndarray) -> np.ndarray:
    """RGB in 0..1 for doubt 0..1: yellow (just below the threshold) -> orange -> red -> magenta
    (confidence at OPAQUE_CONFIDENCE or lower). Light, saturated hues: over a CT they tint the
    anatomy instead of darkening it."""
    doubt = np.clip(np.asarray(doubt, np.float64), 0.0, 1.0)
    green = np.clip(1.0 - 1.5 * doubt, 0.0, 1.0)
    blue = np.clip(3.0 * doubt - 2.0, 0.0, 1.0)
    return np.stack([np.ones_like(doubt), green, blue], axis=-1)


def confidence_rgba(threshold: float, count: int = 256) -> np.ndarray:
    """(count, 4) RGBA in 0..1 indexed by confidence 0..1.

    Entries at or above ``threshold`` have alpha 0: confident voxels leave the CT untouched. Below
    it alpha is 1 and the colour says how doubtful the model is (:func:`doubt_colors`, doubt
    rising linearly from the threshold to OPAQUE_CONFIDENCE). Slicer's slice views use a colour
    table's alpha only as on/off for a scalar volume layer (measured with its slice logic: any
    alpha above 0 is drawn opaque), so the degree of doubt is carried by the colour, and the layer
    opacity OVERLAY_OPACITY keeps the anatomy visible under it.
    """
    confidence = np.linspace(0.0, 1.0, count)
    doubt = (threshold - confidence) / max(threshold - OPAQUE_CONFIDENCE, 1e-3)
    alpha = (confidence < threshold).astype(np.float64)
    return np.concatenate([doubt_colors(doubt), alpha[:, None]], axis=1)


def find_confidence_color_node(scene) -> Optional["slicer.vtkMRMLColorTableNode"]:
    """The module's colour table for confidence maps, if the scene has one."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if node.GetAttribute(ROLE_ATTRIBUTE) == CONFIDENCE_COLORS_ROLE:
            return node
    return None


def confidence_color_node(scene, threshold: Optional[float] = None) -> "slicer.vtkMRMLColorTableNode":
    """The module's colour table for confidence maps (one per scene, shared by all of them), clear
    from ``threshold`` up (default: the table's current threshold, else DEFAULT_CONFIDENCE_THRESHOLD)."""
    node = find_confidence_color_node(scene)
    if node is None:
        node = slicer.vtkMRMLColorTableNode()
        node.SetName("PLBOpt confidence")
        node.SetTypeToUser()
        node.SetAttribute(ROLE_ATTRIBUTE, CONFIDENCE_COLORS_ROLE)
        scene.AddNode(node)
    if threshold is None:
        threshold = float(node.GetAttribute(THRESHOLD_ATTRIBUTE) or DEFAULT_CONFIDENCE_THRESHOLD)
    if node.GetAttribute(THRESHOLD_ATTRIBUTE) != f"{threshold:.3f}":
        colors = confidence_rgba(threshold)
        disabled = node.StartModify()
        node.SetNumberOfColors(len(colors))
        for index, (r, g, b, a) in enumerate(colors):
            node.SetColor(index, f"confidence {index / (len(colors) - 1):.2f}", r, g, b, a)
        node.SetAttribute(THRESHOLD_ATTRIBUTE, f"{threshold:.3f}")
        node.EndModify(disabled)
    return node


def place_under(volume_node, nodes: Sequence) -> None:
    """Put ``nodes`` under ``volume_node`` in the subject hierarchy (so they travel with the
    patient/study in the Data module and DICOM export)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
    parent = hierarchy.GetItemByDataNode(volume_node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), volume_node)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)


def set_segment_terminology(segment, entry: str) -> None:
    """Give ``segment`` the serialised terminology ``entry``. ``vtkSegment.SetTerminology`` exists
    from Slicer 5.10 on; Slicer 5.6 and 5.8 keep the entry in the segment's terminology tag, which
    5.10+ still read (as SlicerTotalSegmentator writes it for those versions)."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def remove_nodes(scene, nodes: Sequence) -> None:
    """Remove ``nodes`` and their display nodes (what a failed load had added) from ``scene``."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for display in [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]:
                if display is not None:
                    scene.RemoveNode(display)
        scene.RemoveNode(node)


def _read_on_grid(path: Path, grid: "imageio.Geometry", volume_name: str, what: str) -> np.ndarray:
    image = imageio.read_image(path)
    problems = imageio.sitk_geometry(image).differences(grid)
    if problems:
        raise PLBOptSlicerError(f"{path}: {what} grid differs from volume {volume_name}: {'; '.join(problems)}")
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


@dataclass(frozen=True)
class PredictionFiles:
    """A case's prediction files read and checked, with its review numbers: everything of
    loading a prediction that needs no scene, so it may run on a worker thread while the GUI
    thread adds the previous case's nodes."""

    label_path: Path
    label: np.ndarray  # (K, J, I) class indices on the volume's grid
    confidence: np.ndarray  # (K, J, I) float32
    uncertainty: float
    least_confident_voxel: Tuple[int, int, int]  # (k, j, i)


def read_prediction(label_path: Path, confidence_path: Path, grid: "imageio.Geometry", volume_name: str,
                    labels: Dict[int, str]) -> PredictionFiles:
    """Read a case's pseudo label and confidence, check them against the volume's ``grid`` (read
    from its node on the GUI thread) and the run's class list, and compute the review numbers.
    Touches no MRML node."""
    label = _read_on_grid(label_path, grid, volume_name, "label")
    confidence = _read_on_grid(confidence_path, grid, volume_name, "confidence").astype(np.float32)
    unknown = sorted(set(np.unique(label).tolist()) - set(labels))
    if unknown:
        raise PLBOptSlicerError(f"{label_path}: label values {unknown} are not in the run's class list {labels}")
    return PredictionFiles(label_path=label_path, label=label, confidence=confidence,
                           uncertainty=uncertainty_score(label, confidence),
                           least_confident_voxel=least_confident_voxel(label, confidence))


def _add_prediction_nodes(volume_node, label: np.ndarray, confidence: np.ndarray, grid, label_path: Path,
                          labels: Dict[int, str], colors: Dict[int, Tuple[int, int, int]], threshold: float,
                          added: list):
    """The scene part of :func:`add_prediction`; every node it adds goes into ``added`` first."""
    scene = volume_node.GetScene()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} pseudo label")
    added.append(segmentation_node)
    segmentation_node.SetAttribute(ROLE_ATTRIBUTE, PSEUDO_LABEL_ROLE)
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segment_ids = vtk.vtkStringArray()
    for value in range(1, max(labels) + 1):
        name = labels.get(value, f"class {value}")
        rgb = [c / 255.0 for c in class_color(value, colors)]
        segment_id = segmentation_node.GetSegmentation().AddEmptySegment(name, name, rgb)
        entry = terminology.terminology_entry(name)
        if entry is not None:
            set_segment_terminology(segmentation_node.GetSegmentation().GetSegment(segment_id), entry)
        segment_ids.InsertNextValue(segment_id)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__PLBOpt_import__")
    added.append(labelmap)
    try:
        imageio.set_volume_from_array(labelmap, label.astype(np.int16), grid)
        # Label value v goes to the v-th listed segment, i.e. the class of that index.
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation_node,
                                                                                      segment_ids):
            raise PLBOptSlicerError(f"{label_path}: import into a segmentation failed")
    finally:
        remove_nodes(scene, [labelmap])

    confidence_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{volume_node.GetName()} confidence")
    added.append(confidence_node)
    confidence_node.SetAttribute(ROLE_ATTRIBUTE, CONFIDENCE_ROLE)
    imageio.set_volume_from_array(confidence_node, confidence, grid)
    confidence_node.CreateDefaultDisplayNodes()
    display = confidence_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(confidence_color_node(scene, threshold).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)  # colour table index = confidence
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(confidence_node)
    if legend is not None:
        legend.SetTitleText("Confidence")
        legend.SetLabelFormat("%.2f")
    volume_node.SetNodeReferenceID(CONFIDENCE_REFERENCE_ROLE, confidence_node.GetID())
    place_under(volume_node, (segmentation_node, confidence_node))

    return segmentation_node, confidence_node


def add_prediction(volume_node, files: PredictionFiles, labels: Dict[int, str],
                   colors: Dict[int, Tuple[int, int, int]],
                   threshold: float = DEFAULT_CONFIDENCE_THRESHOLD) -> LoadedPrediction:
    """Add a case's pseudo label (one named, coloured segment per class) and confidence map, as
    :func:`read_prediction` read them, to the scene.

    The segmentation takes the volume as its reference geometry so Segment Editor edits it voxel
    for voxel.
    """
    scene = volume_node.GetScene()
    grid = imageio.volume_geometry(volume_node)
    added = []  # removed again if anything below fails: no half-built pseudo label stays in the scene
    try:
        segmentation_node, confidence_node = _add_prediction_nodes(volume_node, files.label, files.confidence, grid,
                                                                   files.label_path, labels, colors, threshold, added)
    except BaseException:
        remove_nodes(scene, reversed(added))
        raise

    loaded = LoadedPrediction(segmentation=segmentation_node, confidence=confidence_node,
                              uncertainty=files.uncertainty,
                              least_confident_ras=voxel_to_ras(volume_node, files.least_confident_voxel))
    segmentation_node.SetAttribute(UNCERTAINTY_ATTRIBUTE, repr(loaded.uncertainty))
    segmentation_node.SetAttribute(LEAST_CONFIDENT_ATTRIBUTE, " ".join(repr(v) for v in loaded.least_confident_ras))
    segmentation_node.SetAttribute(PREDICTION_FILE_ATTRIBUTE, str(files.label_path))
    return loaded


def prediction_in_scene(volume_node, segmentation_node) -> Optional[LoadedPrediction]:
    """The review of a pseudo label already in the scene, from the numbers :func:`add_prediction`
    stored on its node (None for a segmentation the module did not load, or one without them).
    Reads nothing from disk and changes nothing in the scene, so edits in progress are kept."""
    if segmentation_node is None:
        return None
    try:
        uncertainty = float(segmentation_node.GetAttribute(UNCERTAINTY_ATTRIBUTE))
        ras = tuple(float(v) for v in segmentation_node.GetAttribute(LEAST_CONFIDENT_ATTRIBUTE).split())
    except (TypeError, ValueError, AttributeError):
        return None
    if len(ras) != 3 or not np.isfinite([uncertainty, *ras]).all():
        return None
    return LoadedPrediction(segmentation=segmentation_node,
                            confidence=volume_node.GetNodeReference(CONFIDENCE_REFERENCE_ROLE),
                            uncertainty=uncertainty, least_confident_ras=ras)


def jump_slices_to(scene, ras: Sequence[float]) -> None:
    """Centre every slice view on ``ras`` (the views' own orientation is kept)."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *[float(v) for v in ras], slicer.vtkMRMLSliceNode.CenteredJumpSlice)
