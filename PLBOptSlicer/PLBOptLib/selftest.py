"""The review loop without torch, for the module's self-test and the headless tests.

A synthetic labeled case and an unlabeled one go into the scene; a prediction and a confidence
map for the unlabeled case are written in the files and layout of PLBOptCore's ``refine``
(``<case>.nii.gz``, ``confidence/<case>.nii.gz``, the run's ``dataset.json``); then the real
workflow runs on them: load -> jump to the least confident region -> begin correction -> accept
as labeled -> export. This checks the module's segmentations, slice and file handling on any
machine, with or without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np

import slicer

from . import imageio
from .cases import Status, find_case, set_case_segmentation
from .errors import PLBOptSlicerError
from .logic import WorkflowLogic
from .review import voxel_to_ras

CLASS_NAMES = ("liver", "spleen")
SHAPE = (16, 32, 32)  # (K, J, I) voxels
UNCERTAIN_BOX = (slice(6, 10), slice(8, 14), slice(18, 24))  # where the synthetic model doubts


@dataclass
class ReviewSelfTestResult:
    """What the self-test saw, for its assertions."""

    ranked: list  # case names, most uncertain first
    jumped_to: Tuple[float, float, float]  # RAS the slice views were centred on
    expected_jump: Tuple[float, float, float]  # RAS centre of UNCERTAIN_BOX
    accepted: Path  # WORK/corrected/<case>.seg.nrrd
    labeled_after_accept: list  # cases the next export trains on


def synthetic_case(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(image, label) with two organs: 1 = liver ellipsoid, 2 = spleen ball, in CT-like units."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    liver = ((x + 0.3) / 0.45) ** 2 + (y / 0.5) ** 2 + (z / 0.8) ** 2 < 1
    spleen = ((x - 0.5) / 0.25) ** 2 + ((y + 0.2) / 0.25) ** 2 + (z / 0.6) ** 2 < 1
    label = np.zeros(SHAPE, np.uint8)
    label[liver] = 1
    label[spleen & ~liver] = 2
    image = np.choose(label, [0.0, 60.0, 120.0]) + rng.normal(0, 10, SHAPE)
    return image.astype(np.float32), label


def add_synthetic_volume(scene, name: str, image: np.ndarray):
    """A volume holding ``image`` (K, J, I) on a 0.8 x 0.8 x 2 mm LPS-like grid."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    grid = imageio.Geometry(size=tuple(reversed(SHAPE)), spacing=(0.8, 0.8, 2.0), origin=(-12.0, 8.0, 20.0),
                            directions=np.diag([-1.0, -1.0, 1.0]))
    imageio.set_volume_from_array(volume, image, grid)
    volume.CreateDefaultDisplayNodes()
    return volume


def add_synthetic_segmentation(scene, volume, label: np.ndarray):
    """A labeled case: one segment per CLASS_NAMES entry from ``label``, linked to ``volume``."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for value, name in enumerate(CLASS_NAMES, start=1):
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name, name, [0.9, 0.4, 0.2] if value == 1 else [0.2, 0.5, 0.9])
        slicer.util.updateSegmentBinaryLabelmapFromArray((label == value).astype(np.uint8), segmentation, segment_id, volume)
    set_case_segmentation(volume, segmentation, Status.LABELED)
    return segmentation


def write_synthetic_prediction(volume, case_name: str, run_dir: Path, out_dir: Path, label: np.ndarray) -> None:
    """What ``PLBOptCore refine`` writes for ``volume``: label map and confidence on its grid (low
    inside UNCERTAIN_BOX), plus the run's class table."""
    grid = imageio.volume_geometry(volume)
    confidence = np.where(label > 0, 0.93, 0.99).astype(np.float32)
    confidence[UNCERTAIN_BOX] = 0.55
    (Path(run_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", **{str(v): n for v, n in enumerate(CLASS_NAMES, start=1)}}, "colors": {}}))
    imageio.write_image(imageio.array_to_sitk(label.astype(np.uint8), grid), Path(out_dir) / f"{case_name}.nii.gz")
    imageio.write_image(imageio.array_to_sitk(confidence, grid), Path(out_dir) / "confidence" / f"{case_name}.nii.gz")


def run_review_self_test(scene, working_dir: Path) -> ReviewSelfTestResult:
    """Build the synthetic scene in ``scene`` and run the review loop on it in ``working_dir``."""
    labeled_image, labeled_label = synthetic_case(seed=0)
    add_synthetic_segmentation(scene, add_synthetic_volume(scene, "selftest labeled", labeled_image), labeled_label)
    image, label = synthetic_case(seed=1)
    unlabeled = add_synthetic_volume(scene, "selftest unlabeled", image)

    logic = WorkflowLogic(scene, working_dir=working_dir, log_callback=lambda line: None)
    logic.export_dataset()
    case_name = next(case.name for case in logic.cases() if case.volume is unlabeled)
    run_dir = logic.new_run_dir()
    out_dir = Path(working_dir) / "predictions" / run_dir.name
    write_synthetic_prediction(unlabeled, case_name, run_dir, out_dir, label)

    ranked = [item.case_name for item in logic.load_predictions(run_dir, out_dir)]
    jumped_to = logic.jump_to_least_confident(case_name)
    centre = [(s.start + s.stop - 1) / 2 for s in UNCERTAIN_BOX]
    logic.begin_correction(case_name)
    if find_case(scene, case_name).status != Status.CORRECTED:
        raise PLBOptSlicerError(f"{case_name}: not marked as corrected after begin_correction")
    accepted = logic.accept_as_labeled(case_name)
    labeled = logic.export_dataset().labeled
    return ReviewSelfTestResult(ranked=ranked, jumped_to=tuple(jumped_to), expected_jump=voxel_to_ras(unlabeled, centre),
                                accepted=accepted, labeled_after_accept=labeled)
