"""Write Resources/Screenshots/review.png: what the Review step shows, rendered headless.

With ``--run RUN_DIR --image IMAGE`` (how the README screenshot is made, from the `plbopt demo`
run and one of its unlabeled phantom CTs) the module's own background job computes the refined
pseudo label and confidence (``python -m PLBOptCore refine``). Without, a phantom case gets a
synthetic pseudo label and confidence map (confidence drops near organ boundaries and in one
deliberately ambiguous region). Either way they go through the module's data path: files ->
WorkflowLogic.load_predictions -> segmentation + confidence nodes -> arrays read back from the
nodes -> PLBOptLib.review.render_review_png.

    python Testing/slicer/make_review_screenshot.py [OUTPUT.png] [--run RUN_DIR --image IMAGE]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "PLBOptSlicer")]

import slicer  # noqa: E402
from conftest import add_segmentation, add_volume, phantom_case  # noqa: E402
from headless_slicer import create_headless_scene  # noqa: E402
from PLBOptLib import WorkflowLogic, cases, imageio, review  # noqa: E402

LABELS = {0: "background", 1: "liver", 2: "spleen"}
COLORS = {1: (221, 130, 101), 2: (157, 108, 162)}


def synthetic_prediction(label: np.ndarray, seed: int = 7):
    """A plausible pseudo label and confidence: boundary voxels less sure, one blob ambiguous."""
    rng = np.random.default_rng(seed)
    predicted = label.copy()
    z, y, x = np.meshgrid(*[np.arange(s) for s in label.shape], indexing="ij")
    blob = ((z - label.shape[0] * 0.5) / 5) ** 2 + ((y - label.shape[1] * 0.42) / 9) ** 2 \
        + ((x - label.shape[2] * 0.52) / 9) ** 2 < 1
    predicted[blob & (label == 0)] = 1  # the model leaks liver into a neighbouring region
    edges = np.zeros(label.shape, bool)
    for axis in range(3):
        edges |= np.diff(predicted, axis=axis, prepend=np.take(predicted, [0], axis=axis)) != 0
    confidence = np.full(label.shape, 0.97, np.float32) - rng.uniform(0, 0.03, label.shape).astype(np.float32)
    confidence[predicted > 0] -= 0.08
    confidence[edges] = 0.6
    confidence[blob] = 0.42 + rng.uniform(0, 0.1, int(blob.sum()))
    return predicted, confidence


def main(out_path: Path) -> Path:
    scene = create_headless_scene()
    image, label = phantom_case(shape=(40, 128, 128), seed=5)
    labeled_image, labeled_label = phantom_case(shape=(40, 128, 128), seed=6)
    grid = dict(spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), directions=np.eye(3))
    reference = add_volume(scene, "labeled case", labeled_image, **grid)
    add_segmentation(scene, reference, {"liver": labeled_label == 1, "spleen": labeled_label == 2})
    volume = add_volume(scene, "unlabeled case", image, **grid)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        run_dir, out_dir = work / "runs" / "run-001", work / "predictions" / "run-001"
        run_dir.mkdir(parents=True)
        (run_dir / "dataset.json").write_text(json.dumps({
            "labels": {str(k): v for k, v in LABELS.items()}, "colors": {str(k): list(v) for k, v in COLORS.items()}}))
        predicted, confidence = synthetic_prediction(label)
        geometry = imageio.volume_geometry(volume)
        imageio.write_image(imageio.array_to_sitk(predicted, geometry), out_dir / "unlabeled_case.nii.gz")
        imageio.write_image(imageio.array_to_sitk(confidence, geometry), out_dir / "unlabeled_case_confidence.nii.gz")
        item = WorkflowLogic(scene, working_dir=work).load_predictions(run_dir, out_dir)[0]
    return render_loaded(scene, item, LABELS, COLORS, out_path)


def render_loaded(scene, item, labels, colors, out_path: Path) -> Path:
    """Read a loaded pseudo label back from its segment nodes and render the review view of it."""
    case = cases.find_case(scene, item.case_name)
    shown_label = np.zeros(slicer.util.arrayFromVolume(case.volume).shape, np.uint8)
    for value, name in labels.items():
        if value:
            shown_label[slicer.util.arrayFromSegmentBinaryLabelmap(case.segmentation, name, case.volume) > 0] = value
    return review.render_review_png(slicer.util.arrayFromVolume(case.volume), shown_label,
                                    slicer.util.arrayFromVolume(item.prediction.confidence), labels, colors, out_path,
                                    window=(-160.0, 240.0),  # abdominal soft-tissue window
                                    title=f"PLBOpt review: {item.case_name} (uncertainty {item.prediction.uncertainty:.3f})")


def main_from_run(out_path: Path, run_dir: Path, image_path: Path) -> Path:
    """The review view of a real run's refined pseudo label for ``image_path``."""
    import subprocess

    import SimpleITK as sitk

    scene = create_headless_scene()
    image = imageio.read_image(image_path)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", image_path.name.split(".")[0])
    imageio.set_volume_from_array(volume, sitk.GetArrayFromImage(image), imageio.sitk_geometry(image))
    meta = json.loads((run_dir / "dataset.json").read_text())
    labels = {int(k): v for k, v in meta["labels"].items()}
    colors = {int(k): tuple(v) for k, v in meta["colors"].items()}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        out_dir = work / "predictions"
        subprocess.run([sys.executable, "-m", "PLBOptCore", "refine", str(run_dir), str(image_path), "-o", str(out_dir),
                        "--device", "cpu", "--quiet"], check=True)
        item = WorkflowLogic(scene, working_dir=work).load_predictions(run_dir, out_dir)[0]
    return render_loaded(scene, item, labels, colors, out_path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path,
                        default=HERE.parents[1] / "Resources" / "Screenshots" / "review.png")
    parser.add_argument("--run", type=Path, help="a trained run folder (e.g. plbopt-demo/run)")
    parser.add_argument("--image", type=Path, help="an unlabeled image to review")
    args = parser.parse_args()
    print(main_from_run(args.output, args.run, args.image) if args.run else main(args.output))
