"""Cases in the scene (volume + optional segmentation + status) and their export as a PLBOptCore dataset.

A case is a scalar volume. Its segmentation is the one the module linked to it (node reference
``PLBOptSegmentation``), otherwise the segmentation whose reference geometry is that volume, which
is what Segment Editor creates. The status lives in the volume's ``PLBOpt.Status`` attribute so it
is saved with the scene.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import vtk

import slicer

from . import imageio
from .errors import PLBOptSlicerError

try:  # Slicer's translation function for what the case table shows; no Qt import
    from slicer.i18n import tr as _
except ImportError:  # slicer-core (headless tests) or a Slicer without slicer.i18n: the English text
    def _(text: str) -> str:
        return text

STATUS_ATTRIBUTE = "PLBOpt.Status"
CASE_NAME_ATTRIBUTE = "PLBOpt.CaseName"
ROLE_ATTRIBUTE = "PLBOpt.Role"  # marks module-created volumes (confidence maps) that are not cases
SEGMENTATION_REFERENCE_ROLE = "PLBOptSegmentation"
BACKGROUND_NAME = "background"
USE_ATTRIBUTE = "PLBOpt.Use"  # "1"/"0": the user's tick in the case table (saved with the scene)
DICOM_MODALITY_ATTRIBUTE = "DICOM.Modality"  # vtkMRMLSubjectHierarchyConstants' series modality
DOSE_VOLUME_ATTRIBUTE = "DicomRtImport.DoseVolume"  # what SlicerRT's DICOM-RT import puts on a dose grid
# DICOM modalities whose volumes are no images of the anatomy the model segments.
NON_IMAGE_MODALITIES = {"RTDOSE": _("a radiotherapy dose grid"), "SEG": _("a segmentation"),
                        "RTSTRUCT": _("structure contours"), "REG": _("a registration"), "RTIMAGE": _("a portal image")}
# A finest voxel spacing this many times coarser or finer than every labeled case's is another
# kind of image (PET at 4 mm or a dose grid at 2.5-3 mm next to CTs at 0.6-1 mm), not another patient.
SPACING_FACTOR = 2.0


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


@dataclass(frozen=True)
class CaseUse:
    """Whether a case goes into the exported dataset, and why (shown in the case table)."""

    used: bool
    reason: str  # "" for a case used without remark
    chosen: bool  # the user ticked or unticked it (else the default below decided)


def set_case_use(volume_node, used: Optional[bool]) -> None:
    """Record the user's tick (saved with the scene); None goes back to the default."""
    if used is None:
        volume_node.RemoveAttribute(USE_ATTRIBUTE)
    else:
        volume_node.SetAttribute(USE_ATTRIBUTE, "1" if used else "0")


def volume_modality(volume_node) -> Optional[str]:
    """The DICOM modality of a volume (CT, MR, PT, RTDOSE, ...) where Slicer knows it: on the node,
    or on its series item in the subject hierarchy (the DICOM import puts it there); None for a
    volume read from NIfTI/NRRD or made in Slicer."""
    modality = volume_node.GetAttribute(DICOM_MODALITY_ATTRIBUTE)
    if not modality:
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
        item = hierarchy.GetItemByDataNode(volume_node) if hierarchy is not None else 0
        if item:
            modality = hierarchy.GetItemAttribute(item, DICOM_MODALITY_ATTRIBUTE)
    return modality.strip().upper() if modality and modality.strip() else None


def _shape_problem(volume_node) -> str:
    """Why no training could read this volume at all ("" when it can)."""
    image = volume_node.GetImageData()
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        return _("{count} values per voxel (a colour or vector image); training reads one").format(count=components)
    if min(image.GetDimensions()) < 2:
        return _("a single slice; training needs 3D volumes")
    return ""


def _default_exclusion(case: SceneCase, labeled: Sequence[SceneCase], modalities: Dict[str, Optional[str]],
                       spacing_range: Optional[Tuple[float, float]]) -> str:
    """Why an unlabeled volume should not be a case by default ("" when it should be). Decided
    from what the scene knows about it (never its voxels): components and shape, DICOM-RT and
    modality tags, voxel spacing."""
    if _shape_problem(case.volume):
        return _shape_problem(case.volume)
    if case.volume.GetAttribute(DOSE_VOLUME_ATTRIBUTE) == "1":
        return _("a radiotherapy dose grid (DICOM-RT import)")
    modality = modalities[case.volume.GetID()]
    if modality in NON_IMAGE_MODALITIES:
        return _("modality {modality}: {what}").format(modality=modality, what=NON_IMAGE_MODALITIES[modality])
    labeled_modalities = sorted({modalities[c.volume.GetID()] for c in labeled} - {None})
    if modality and labeled_modalities and modality not in labeled_modalities:
        return _("modality {modality}; the labeled cases are {labeled}").format(modality=modality,
                                                                                 labeled=", ".join(labeled_modalities))
    if spacing_range is not None:
        finest = min(case.volume.GetSpacing())
        low, high = spacing_range
        if finest > high * SPACING_FACTOR or finest < low / SPACING_FACTOR:
            span = f"{low:.2g}" if abs(high - low) < 1e-6 else f"{low:.2g}-{high:.2g}"
            return _("finest voxel spacing {spacing} mm, the labeled cases' {labeled} mm: another kind of image "
                     "(PET, dose, a resampled copy)?").format(spacing=f"{finest:.2g}", labeled=span)
    return ""


def dataset_modality(labeled: Sequence[SceneCase]) -> Optional[str]:
    """The ``channel_names`` entry of an exported dataset: the DICOM modality all labeled cases
    share (CT, MR, ...), or None when one is unknown or they differ.

    PLBOptCore plans its preprocessing from it, as nnU-Net does: "CT" gets the HU-based body crop
    and the dataset's foreground statistics, anything else a per-case z-score.
    """
    modalities = {volume_modality(case.volume) for case in labeled}
    return modalities.pop() if len(modalities) == 1 and None not in modalities else None


def case_uses(cases: Sequence[SceneCase]) -> Dict[str, CaseUse]:
    """Which cases the export uses, by volume node ID.

    The user's tick wins. Otherwise labeled cases are used (someone drew on them) unless no
    training could read them (several values per voxel, a single slice), and every other volume
    is used unless it does not look like the labeled cases: unreadable in the same way, a dose
    grid or another non-image DICOM modality, a modality other than the labeled cases', or a
    finest voxel spacing more than SPACING_FACTOR away from theirs. The reason is shown in the
    case table, so a wrong guess is one click away from fixed. (Whether a volume covers the same
    region as another is no criterion: datasets resampled to one grid would lose every case but one.)
    """
    labeled = [case for case in cases if case.trains_supervised]
    modalities = {case.volume.GetID(): volume_modality(case.volume) for case in cases}
    finest = [min(case.volume.GetSpacing()) for case in labeled]
    spacing_range = (min(finest), max(finest)) if finest else None
    uses: Dict[str, CaseUse] = {}
    for case in cases:
        if case.trains_supervised:
            reason = _shape_problem(case.volume)
        else:
            reason = _default_exclusion(case, labeled, modalities, spacing_range)
        choice = case.volume.GetAttribute(USE_ATTRIBUTE)
        if choice == "1":
            text = _("ticked by you (by default not: {reason})").format(reason=reason) if reason else _("ticked by you")
            uses[case.volume.GetID()] = CaseUse(True, text, True)
        elif choice == "0":
            uses[case.volume.GetID()] = CaseUse(False, _("unticked by you"), True)
        else:
            uses[case.volume.GetID()] = CaseUse(not reason, reason, False)
    return uses


def used_cases(cases: Sequence[SceneCase]) -> List[SceneCase]:
    """The cases the dataset export writes (see :func:`case_uses`), in the order given."""
    uses = case_uses(cases)
    return [case for case in cases if uses[case.volume.GetID()].used]


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


@dataclass
class _CaseSnapshot:
    """What the writer thread writes for one case, read from the scene on the main thread."""

    name: str
    folder: str  # imagesTr or imagesUn
    image: np.ndarray  # (K, J, I), a copy: the node may change or leave the scene meanwhile
    label: Optional[np.ndarray]  # class-index label map for labelsTr (ignore outside annotated slices), or None
    grid: imageio.Geometry


_END_OF_CASES = None  # what the main thread queues after the last case


class DatasetExport:
    """A dataset export split so that Slicer's GUI thread never waits for a file to be written.

    - The constructor validates everything (class names, segmentation grids, transforms) before
      anything is written.
    - :meth:`step`, on the main thread (MRML is not thread-safe), reads one case from the scene: a
      copy of its voxels and, for a labeled case, its segmentation as a class-index label map.
    - A worker thread removes the previous image folders, compresses and writes each case's NIfTI
      files and, last, ``dataset.json``. SimpleITK releases the GIL while it writes, so the GUI
      stays responsive.

    The main thread reads the next case only while fewer than ``max_pending`` read cases wait to be
    written, so at most a few volume copies are held in memory. :meth:`run` does everything and
    waits (console, tests); the panel calls :meth:`step` from a timer and shows :attr:`progress_text`.
    """

    def __init__(self, cases: Sequence[SceneCase], out_dir: Path, preferred_order: Sequence[str] = (),
                 name: str = "PLBOpt Slicer dataset", max_pending: int = 2):
        self.out_dir = Path(out_dir)
        self.cases = list(cases)
        self.class_names = class_names(self.cases, preferred_order)
        self.labeled = [case for case in self.cases if case.trains_supervised]
        from . import sparse  # (sparse imports this module)

        sparse.check_class_names(self.class_names)
        self.ignore = sparse.export_ignore_value(self.labeled, self.class_names)  # None: all fully annotated
        self.unlabeled = [case for case in self.cases if not case.trains_supervised]
        for case in self.labeled:
            check_segmentation_geometry(case)
        for case in self.unlabeled:
            imageio.check_not_transformed(case.volume)
        self.colors = class_colors(self.labeled[0], self.class_names)
        self.modality = dataset_modality(self.labeled)
        self.dataset_name = name
        self.max_pending = max(1, int(max_pending))
        self._to_read: List[SceneCase] = self.labeled + self.unlabeled
        self._queue: "queue.Queue[Optional[_CaseSnapshot]]" = queue.Queue()
        self._writer = threading.Thread(target=self._write_all, name="PLBOpt dataset export", daemon=True)
        self.read_count = 0
        self.written_count = 0  # updated by the writer thread
        self.error: Optional[BaseException] = None  # set by the writer thread
        self.cancelled = False
        self._result: Optional[ExportedDataset] = None

    @property
    def total(self) -> int:
        return len(self.labeled) + len(self.unlabeled)

    @property
    def writer_done(self) -> bool:
        return self._writer.ident is not None and not self._writer.is_alive()

    @property
    def progress_text(self) -> str:
        return _("Exporting the dataset: {written}/{total} cases written").format(written=self.written_count,
                                                                                  total=self.total)

    @property
    def fraction(self) -> float:
        return self.written_count / self.total if self.total else 1.0

    def step(self) -> bool:
        """Main thread: read the next case if the writer has room for it. Returns True once the
        export is over (written, failed or cancelled); then :meth:`result` tells which."""
        if self._writer.ident is None:
            self._writer.start()
        if self.writer_done or self.cancelled:
            return self.writer_done
        if self._to_read and self.read_count - self.written_count < self.max_pending:
            case = self._to_read.pop(0)
            self._queue.put(self._snapshot(case))
            self.read_count += 1
            if not self._to_read:
                self._queue.put(_END_OF_CASES)
        return False

    def _snapshot(self, case: SceneCase) -> _CaseSnapshot:
        grid = imageio.volume_geometry(case.volume)
        image = np.array(slicer.util.arrayFromVolume(case.volume), copy=True)
        if case.trains_supervised:
            from . import sparse

            marked = sparse.annotated_slices(case.volume)
            if marked is None:
                return _CaseSnapshot(case.name, "imagesTr", image, label_array(case, self.class_names), grid)
            # a sparse case's image goes where Predict reads, so its pseudo label can complete it
            label = sparse.with_ignore(label_array(case, self.class_names), marked, self.ignore)
            return _CaseSnapshot(case.name, "imagesUn", image, label, grid)
        return _CaseSnapshot(case.name, "imagesUn", image, None, grid)

    def _write_all(self) -> None:
        """Writer thread: never touches the scene, only numpy arrays and files."""
        try:
            for folder in ("imagesTr", "labelsTr", "imagesUn"):
                shutil.rmtree(self.out_dir / folder, ignore_errors=True)
            training, unlabeled = [], []
            while True:
                snapshot = self._queue.get()
                if snapshot is _END_OF_CASES or self.cancelled:
                    break
                image_path = f"{snapshot.folder}/{snapshot.name}.nii.gz"
                imageio.write_image(imageio.array_to_sitk(snapshot.image, snapshot.grid), self.out_dir / image_path)
                if snapshot.label is not None:
                    label_path = f"labelsTr/{snapshot.name}.nii.gz"
                    imageio.write_image(imageio.array_to_sitk(snapshot.label, snapshot.grid), self.out_dir / label_path)
                    training.append({"image": image_path, "label": label_path})
                else:
                    unlabeled.append({"image": image_path})
                self.written_count += 1
            if self.cancelled:
                return
            names = self.class_names
            from . import sparse

            _write_json(self.out_dir / "dataset.json", {
                "name": self.dataset_name,
                **({"channel_names": {"0": self.modality}} if self.modality else {}),
                "labels": sparse.dataset_labels(names, self.ignore),
                "colors": {str(i + 1): list(self.colors[n]) for i, n in enumerate(names)},
                "training": training,
                "unlabeled": unlabeled,
                "validation": [],
                "test": [],
            })
        except BaseException as error:  # noqa: BLE001 - handed to the main thread by result()
            self.error = error

    def cancel(self) -> None:
        """Stop after the file being written; dataset.json is not rewritten."""
        self.cancelled = True
        self._queue.put(_END_OF_CASES)  # wakes a writer waiting for the next case

    def result(self) -> ExportedDataset:
        """Main thread, once :meth:`step` returned True: what was written. Raises when the writer
        failed or the export was cancelled."""
        if not self.writer_done:
            raise RuntimeError("the export is still running")
        if self.error is not None:
            raise PLBOptSlicerError(f"{self.out_dir}: dataset export failed: {self.error}") from self.error
        if self.cancelled:
            raise PLBOptSlicerError(f"{self.out_dir}: dataset export cancelled")
        if self._result is None:
            for case in self.cases:
                # Predictions come back under the case name; remember it even if the node is renamed later.
                case.volume.SetAttribute(CASE_NAME_ATTRIBUTE, case.name)
            self._result = ExportedDataset(root=self.out_dir, class_names=list(self.class_names),
                                           labeled=[c.name for c in self.labeled],
                                           unlabeled=[c.name for c in self.unlabeled])
        return self._result

    def run(self, interval: float = 0.005) -> ExportedDataset:
        """Read every case, wait for the writer and return what was written (console, tests)."""
        while not self.step():
            if self.read_count - self.written_count >= self.max_pending or not self._to_read:
                time.sleep(interval)  # the writer is busy: nothing to read yet
        return self.result()


def export_dataset(cases: Sequence[SceneCase], out_dir: Path, preferred_order: Sequence[str] = (),
                   name: str = "PLBOpt Slicer dataset") -> ExportedDataset:
    """Write the scene's cases as a PLBOptCore dataset folder (dataset.json, imagesTr, labelsTr, imagesUn)
    and wait until it is written (see :class:`DatasetExport`, which the panel drives step by step).

    Labeled cases go to imagesTr/labelsTr; unlabeled, pseudo-labeled and not yet accepted
    corrected cases go to imagesUn (their labels are not trusted). A sparsely annotated case
    (:mod:`PLBOptLib.sparse`) goes to imagesUn/labelsTr, listed under training: its label holds
    the ``ignore`` label (after the highest class, named in dataset.json) outside its annotated
    slices, and Predict, which reads imagesUn, completes it. Images keep their exact grid
    (origin, spacing, direction) as NIfTI. Everything is validated before anything is written, and
    the image folders are rewritten so cases removed from the scene do not linger.
    """
    return DatasetExport(cases, out_dir, preferred_order, name).run()


def read_class_table(dataset_json: Path) -> Tuple[Dict[int, str], Dict[int, Tuple[int, int, int]]]:
    """Class names and 0-255 colours by label value from a dataset.json (a run folder keeps a copy);
    the ``ignore`` label of a sparse dataset is no class and left out."""
    from . import sparse

    path = Path(dataset_json)
    try:
        data = json.loads(path.read_text())
        labels = sparse.without_ignore({int(k): str(v) for k, v in data["labels"].items()})
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise PLBOptSlicerError(f"{path}: cannot read class names ({error})") from error
    colors = {int(k): tuple(int(c) for c in v[:3]) for k, v in (data.get("colors") or {}).items()}
    return labels, colors


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)
