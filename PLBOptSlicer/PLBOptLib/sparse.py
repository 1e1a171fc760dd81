"""Sparse annotation in the scene (issue 23): which slices of a labeled case are annotated, the
``ignore`` label the export writes elsewhere, and turning a sparse case fully annotated.

A clinician who paints an organ on every fourth slice of ten volumes gives the network more
variety than one who paints two whole volumes in the same time. The module lets the user say
which slices of a case are annotated, in an axis the user picks (axial, coronal or sagittal):

- every slice holding a segment (:func:`mark_slices_holding_segments`), or
- the slices edited in Segment Editor since :meth:`EditTracker.start` (:meth:`EditTracker.mark`).

The choice is stored on the volume (``PLBOpt.AnnotatedSlices``, saved with the scene); a labeled
case without it is fully annotated. The export writes every voxel outside the annotated slices with
the dataset's ``ignore`` label, nnU-Net v2's: the value after the highest class
(:func:`ignore_value`), named ``"ignore"`` in dataset.json, which PLBOptCore leaves out of every
supervised term. A sparse case's image goes to ``imagesUn`` (listed under ``training`` with its
label), so Predict completes it: its pseudo label keeps the user's annotated slices and takes the
prediction elsewhere (:func:`complete_with_prediction`); accepting it (``WorkflowLogic.accept_as_labeled``)
makes the case fully annotated (:func:`set_fully_annotated`).

Arrays are (K, J, I), the order of ``slicer.util.arrayFromVolume``. No qt and no PLBOptCore here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import cases as case_utils
from . import imageio, review
from .cases import SceneCase, Status
from .errors import PLBOptSlicerError

try:  # Slicer's translation function for what the panel shows; no Qt import
    from slicer.i18n import tr as _
except ImportError:  # slicer-core (headless tests) or a Slicer without slicer.i18n: the English text
    def _(text: str) -> str:
        return text

ANNOTATED_SLICES_ATTRIBUTE = "PLBOpt.AnnotatedSlices"  # "<axis>:<array axis>:<ranges>", e.g. "axial:0:0-3,8"
IGNORE_NAME = "ignore"  # nnU-Net v2's (and PLBOptCore's) name of the label of unannotated voxels
# The world (RAS) axis normal to the slices of each anatomical orientation: R = 0, A = 1, S = 2.
AXES: Dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class AnnotatedSlices:
    """The annotated slices of a sparsely annotated case."""

    axis: str  # "axial" | "coronal" | "sagittal", as the user picked it
    array_axis: int  # 0, 1 or 2: the axis of the (K, J, I) array those slices are normal to
    indices: Tuple[int, ...]  # sorted slice numbers along ``array_axis``
    count: int  # slices along ``array_axis``

    @property
    def fraction(self) -> float:
        return len(self.indices) / self.count if self.count else 0.0

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        """Boolean (K, J, I) array of ``shape``: True on the annotated slices."""
        selected = np.zeros(int(shape[self.array_axis]), bool)
        selected[list(self.indices)] = True
        view = [1, 1, 1]
        view[self.array_axis] = selected.size
        return np.broadcast_to(selected.reshape(view), tuple(int(s) for s in shape))

    def describe(self) -> str:
        """What the case table shows, e.g. ``12/48 axial slices (25 %)``."""
        return _("{annotated}/{count} {axis} slices ({percent} %)").format(
            annotated=len(self.indices), count=self.count, axis=_(self.axis), percent=f"{100 * self.fraction:.0f}")


def array_axis(volume_node, axis: str) -> int:
    """The (K, J, I) array axis whose slices are ``axis`` slices of ``volume_node``: the voxel axis
    most nearly parallel to the world axis normal to them (an oblique volume's closest one)."""
    if axis not in AXES:
        raise PLBOptSlicerError(f"unknown slice orientation {axis!r}; choose one of {', '.join(AXES)}")
    directions = imageio.volume_geometry(volume_node).directions  # columns: I, J, K in RAS
    ijk = int(np.argmax(np.abs(directions[AXES[axis], :])))
    return 2 - ijk  # I is the last array axis, K the first


def encode_indices(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    values = sorted({int(i) for i in indices})
    parts, start = [], None
    for index, value in enumerate(values):
        if start is None:
            start = value
        if index + 1 == len(values) or values[index + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def decode_indices(text: str) -> Tuple[int, ...]:
    """``"0-3,8"`` -> ``(0, 1, 2, 3, 8)``; ValueError for anything else."""
    values = set()
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"not a slice range: {part!r}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise ValueError(f"not a slice range: {part!r}")
        values.update(range(low, high + 1))
    return tuple(sorted(values))


def annotated_slices(volume_node) -> Optional[AnnotatedSlices]:
    """The case's annotated slices; None when it is fully annotated (no marking)."""
    stored = volume_node.GetAttribute(ANNOTATED_SLICES_ATTRIBUTE)
    if not stored:
        return None
    try:
        axis, axis_index, ranges = stored.split(":")
        number = int(axis_index)
        count = int(volume_node.GetImageData().GetDimensions()[2 - number])
        indices = decode_indices(ranges)
        if axis not in AXES or not indices or indices[-1] >= count:
            raise ValueError(stored)
    except (ValueError, IndexError, AttributeError) as error:
        raise PLBOptSlicerError(f"{volume_node.GetName()}: annotated slices {stored!r} cannot be read ({error}); "
                                "mark them again") from error
    return AnnotatedSlices(axis, number, indices, count)


def set_annotated_slices(volume_node, axis: str, indices: Sequence[int]) -> AnnotatedSlices:
    """Record that only the ``axis`` slices ``indices`` of the case are annotated (saved with the scene)."""
    number = array_axis(volume_node, axis)
    count = int(volume_node.GetImageData().GetDimensions()[2 - number])
    values = tuple(sorted({int(i) for i in indices}))
    if not values:
        raise PLBOptSlicerError(f"{volume_node.GetName()}: no {axis} slice to mark as annotated")
    if values[0] < 0 or values[-1] >= count:
        raise PLBOptSlicerError(f"{volume_node.GetName()}: {axis} slices run 0-{count - 1}, not {values[0]}-{values[-1]}")
    volume_node.SetAttribute(ANNOTATED_SLICES_ATTRIBUTE, f"{axis}:{number}:{encode_indices(values)}")
    return AnnotatedSlices(axis, number, values, count)


def set_fully_annotated(volume_node) -> None:
    """Every voxel of the case is annotated again (what accepting a completed label does)."""
    volume_node.RemoveAttribute(ANNOTATED_SLICES_ATTRIBUTE)


def slices_holding_segments(label: np.ndarray, axis_index: int) -> Tuple[int, ...]:
    """Slice numbers along ``axis_index`` of the (K, J, I) ``label`` that hold any class (> 0)."""
    other = tuple(a for a in range(3) if a != axis_index)
    return tuple(int(i) for i in np.flatnonzero((np.asarray(label) > 0).any(axis=other)))


def touched_slices(before: np.ndarray, after: np.ndarray, axis_index: int) -> Tuple[int, ...]:
    """Slice numbers along ``axis_index`` where the (K, J, I) label maps ``before`` and ``after`` differ
    (painted, erased or relabelled)."""
    other = tuple(a for a in range(3) if a != axis_index)
    return tuple(int(i) for i in np.flatnonzero((np.asarray(before) != np.asarray(after)).any(axis=other)))


def _segment_label(case: SceneCase, names: Sequence[str]) -> np.ndarray:
    """Label map (K, J, I) of the case's segments ``names`` (1..N), zeros without a segmentation."""
    if case.segmentation is None or not names:
        return np.zeros(slicer_shape(case.volume), np.int16)
    return case_utils.label_array(case, names).astype(np.int16)


def slicer_shape(volume_node) -> Tuple[int, int, int]:
    """(K, J, I) shape of a volume's voxel array."""
    i, j, k = volume_node.GetImageData().GetDimensions()
    return k, j, i


def _own_segment_names(case: SceneCase) -> List[str]:
    if case.segmentation is None:
        return []
    segmentation = case.segmentation.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName().strip() for i in range(segmentation.GetNumberOfSegments())]


def mark_slices_holding_segments(case: SceneCase, axis: str) -> AnnotatedSlices:
    """Mark every ``axis`` slice of the case that holds a segment as annotated, the rest not."""
    names = [n for n in _own_segment_names(case) if n.lower() != case_utils.BACKGROUND_NAME]
    if not names:
        raise PLBOptSlicerError(_("{case}: has no segment; paint some slices first (Segment Editor)").format(
            case=case.name))
    label = _segment_label(case, names)
    indices = slices_holding_segments(label, array_axis(case.volume, axis))
    if not indices:
        raise PLBOptSlicerError(_("{case}: its segments are empty; paint some slices first (Segment Editor)").format(
            case=case.name))
    return set_annotated_slices(case.volume, axis, indices)


class EditTracker:
    """The slices touched in Segment Editor: :meth:`start` keeps the case's label map, :meth:`mark`
    marks the slices where it changed since as annotated (added to those already marked in the same
    orientation), painting, erasing and relabelling alike. Held in memory by the panel."""

    def __init__(self) -> None:
        self._before: Dict[str, Tuple[List[str], np.ndarray]] = {}  # volume ID -> (segment names, label)

    def tracking(self, case: SceneCase) -> bool:
        return case.volume.GetID() in self._before

    def start(self, case: SceneCase) -> None:
        """Remember the case's segments as they are now (nothing painted yet: empty)."""
        names = _own_segment_names(case)
        self._before[case.volume.GetID()] = (names, _segment_label(case, names))

    def mark(self, case: SceneCase, axis: str) -> AnnotatedSlices:
        """Mark the ``axis`` slices edited since :meth:`start` as annotated; tracking goes on."""
        if not self.tracking(case):
            raise PLBOptSlicerError(_("{case}: edits are not tracked; press Track edits before painting").format(
                case=case.name))
        names, before = self._before[case.volume.GetID()]
        # segments added since keep the old ones' numbers and get new ones, so they count as changes
        now = names + [n for n in _own_segment_names(case) if n not in names]
        number = array_axis(case.volume, axis)
        indices = set(touched_slices(before, _segment_label(case, now), number))
        if not indices:
            raise PLBOptSlicerError(_("{case}: no slice was edited since Track edits").format(case=case.name))
        current = annotated_slices(case.volume)
        if current is not None and current.axis == axis:
            indices |= set(current.indices)
        return set_annotated_slices(case.volume, axis, sorted(indices))

    def stop(self, case: SceneCase) -> None:
        self._before.pop(case.volume.GetID(), None)


# ---- export ---------------------------------------------------------------------------------------

def check_class_names(names: Sequence[str]) -> None:
    """A segment named "ignore" would be read as the ignore label by PLBOptCore and nnU-Net."""
    reserved = [n for n in names if n.strip().lower() == IGNORE_NAME]
    if reserved:
        raise PLBOptSlicerError(_("segment name {name} is reserved for unannotated voxels; rename the segment").format(
            name=repr(reserved[0])))


def ignore_value(class_names: Sequence[str]) -> int:
    """The ignore label's value: after the highest class, as nnU-Net v2 requires."""
    return len(class_names) + 1


def export_ignore_value(labeled: Sequence[SceneCase], class_names: Sequence[str]) -> Optional[int]:
    """The ignore label an export writes: :func:`ignore_value` when a labeled case is sparse, else None."""
    return ignore_value(class_names) if any(annotated_slices(c.volume) is not None for c in labeled) else None


def with_ignore(label: np.ndarray, marked: Optional[AnnotatedSlices], ignore: int) -> np.ndarray:
    """The (K, J, I) class-index ``label`` with ``ignore`` outside the annotated slices (``label``
    itself when the case is fully annotated)."""
    if marked is None:
        return label
    dtype = label.dtype if np.iinfo(label.dtype).max >= ignore else np.int16
    return np.where(marked.mask(label.shape), label, ignore).astype(dtype)


def dataset_labels(class_names: Sequence[str], ignore: Optional[int]) -> Dict[str, str]:
    """dataset.json ``labels``: background, the classes, and ``"ignore"`` (highest) when given."""
    labels = {"0": case_utils.BACKGROUND_NAME, **{str(i + 1): n for i, n in enumerate(class_names)}}
    if ignore is not None:
        labels[str(ignore)] = IGNORE_NAME
    return labels


def without_ignore(labels: Dict[int, str]) -> Dict[int, str]:
    """A class table read from a dataset.json without its ignore label (no class)."""
    return {value: name for value, name in labels.items() if name != IGNORE_NAME}


# ---- review and accept ----------------------------------------------------------------------------

def is_pseudo_label(segmentation_node) -> bool:
    """Whether the module made this segmentation from a prediction."""
    return segmentation_node is not None and segmentation_node.GetAttribute(case_utils.ROLE_ATTRIBUTE) == \
        review.PSEUDO_LABEL_ROLE


def completes_with_prediction(case: SceneCase) -> bool:
    """A sparse labeled case whose segmentation is still the user's own: a prediction completes it.
    (One already completed is left alone, so edits made to it are never overwritten.)"""
    return (case.status == Status.LABELED and annotated_slices(case.volume) is not None
            and not is_pseudo_label(case.segmentation))


def can_accept(case: SceneCase) -> bool:
    """Whether Accept applies: a pseudo label (being corrected or not), or a sparse case completed by one."""
    return case.status in (Status.PSEUDO_LABELED, Status.CORRECTED) or (
        annotated_slices(case.volume) is not None and is_pseudo_label(case.segmentation))


def user_label(case: SceneCase, class_names: Sequence[str]) -> np.ndarray:
    """The user's label map (K, J, I) of a sparse case in the run's classes (1..N); raises when its
    segment names are not the run's."""
    names = [n for n in _own_segment_names(case) if n.lower() != case_utils.BACKGROUND_NAME]
    if set(names) != set(class_names):
        raise PLBOptSlicerError(f"{case.name}: segments ({', '.join(names)}) are not the run's classes "
                                f"({', '.join(class_names)}); rename them or retrain")
    return case_utils.label_array(case, class_names)


def complete_with_prediction(case: SceneCase, annotated_label: np.ndarray, prediction: "review.LoadedPrediction",
                             class_names: Sequence[str]) -> "review.LoadedPrediction":
    """Put the user's ``annotated_label`` (K, J, I) back on the annotated slices of the case's
    freshly loaded ``prediction``, which keeps the predicted voxels elsewhere; the confidence map
    there becomes 1 (nothing to doubt), and the review numbers are those of the unannotated part."""
    import slicer

    marked = annotated_slices(case.volume)
    mask = marked.mask(annotated_label.shape)
    segmentation_node = prediction.segmentation
    segmentation = segmentation_node.GetSegmentation()
    predicted = _segment_label(SceneCase(case.name, case.volume, segmentation_node, case.status), class_names)
    merged = np.where(mask, annotated_label, predicted)
    for value, name in enumerate(class_names, start=1):
        slicer.util.updateSegmentBinaryLabelmapFromArray((merged == value).astype(np.uint8), segmentation_node,
                                                         segmentation.GetSegmentIdBySegmentName(name), case.volume)
    confidence = slicer.util.arrayFromVolume(prediction.confidence)
    confidence[mask] = 1.0
    slicer.util.arrayFromVolumeModified(prediction.confidence)
    completed = review.LoadedPrediction(
        segmentation=segmentation_node, confidence=prediction.confidence,
        uncertainty=review.uncertainty_score(np.where(mask, 0, merged), confidence),
        least_confident_ras=review.voxel_to_ras(case.volume,
                                                review.least_confident_voxel(np.where(mask, 0, merged), confidence)))
    segmentation_node.SetAttribute(review.UNCERTAINTY_ATTRIBUTE, repr(completed.uncertainty))
    segmentation_node.SetAttribute(review.LEAST_CONFIDENT_ATTRIBUTE,
                                   " ".join(repr(v) for v in completed.least_confident_ras))
    return completed


def annotation_text(case: SceneCase) -> str:
    """The case table's "Annotated" cell: ``all`` for a fully annotated labeled case, the annotated
    slices of a sparse one (``+ pseudo label`` once a prediction completed it), empty otherwise."""
    if case.status != Status.LABELED:
        return ""
    marked = annotated_slices(case.volume)
    if marked is None:
        return _("all")
    return marked.describe() + (_(" + pseudo label") if is_pseudo_label(case.segmentation) else "")


# ---- the panel's buttons --------------------------------------------------------------------------

MARKINGS = ("segments", "track", "edited", "all")  # what the panel's annotated-slices buttons do


def apply_marking(case: SceneCase, how: str, axis: str, tracker: EditTracker) -> str:
    """The panel's annotated-slices buttons on ``case``; returns the line the log shows.

    ``segments``: every ``axis`` slice holding a segment is annotated; ``track``: remember the
    segments now, to find the slices edited from here on; ``edited``: the ``axis`` slices edited
    since ``track`` are annotated (with those marked before in that orientation); ``all``: the case
    is fully annotated.
    """
    if how == "segments":
        marked = mark_slices_holding_segments(case, axis)
        return _("{case}: annotated {slices}").format(case=case.name, slices=marked.describe())
    if how == "track":
        tracker.start(case)
        return _("{case}: tracking edits; paint in Segment Editor, then mark the edited slices").format(case=case.name)
    if how == "edited":
        return _("{case}: annotated {slices}").format(case=case.name, slices=tracker.mark(case, axis).describe())
    if how == "all":
        set_fully_annotated(case.volume)
        tracker.stop(case)
        return _("{case}: every slice annotated").format(case=case.name)
    raise ValueError(f"unknown marking {how!r}; one of {', '.join(MARKINGS)}")
