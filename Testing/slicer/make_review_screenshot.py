"""Write Resources/Screenshots/review.png: what the Review step shows, rendered headless by Slicer.

The two views are drawn by Slicer's own slice pipeline from the PyPI ``slicer-core`` wheel
(``vtkMRMLSliceLogic``: reslice of each layer, the volume display nodes' colour tables, then the
layer blend), so the confidence overlay shows exactly the module's colour table and alpha rule.
Left: the CT with the pseudo label exported to a label map in the label layer. Right: the CT
with the confidence map as foreground, centred on the least confident region (the module's
jump). The pseudo label is drawn as the label layer (filled, at the label opacity) because the
segmentation's own slice display comes from a displayable manager that needs an OpenGL window,
which the headless wheel does not have. Matplotlib only places the two rendered images side by
side and draws the colour bar from the same colour table.

With ``--run RUN_DIR --image IMAGE`` the module's own background job computes the refined pseudo
label and confidence (``python -m PLBOptCore refine``); without, a phantom case gets a synthetic
pseudo label and confidence map (confidence drops near organ boundaries and in one deliberately
ambiguous region). Either way they go through the module's data path: files ->
WorkflowLogic.load_predictions -> segmentation + confidence nodes -> slice views.

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
    confidence[predicted > 0] -= 0.02  # organ interiors: confident, left clear by the overlay
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
        imageio.write_image(imageio.array_to_sitk(confidence, geometry), out_dir / "confidence" / "unlabeled_case.nii.gz")
        item = WorkflowLogic(scene, working_dir=work).load_predictions(run_dir, out_dir)[0]
    return render_loaded(scene, item, LABELS, COLORS, out_path)


VIEW_PIXELS = 384


def render_slice_view(scene, background, foreground=None, label=None, ras=None, pixels: int = VIEW_PIXELS) -> np.ndarray:
    """(pixels, pixels, 4) uint8 RGBA of an axial slice view, as Slicer's slice logic composes it
    (row 0 at the top). The view is fitted to the background and, when ``ras`` is given, moved to
    that point with the module's jump (:func:`PLBOptLib.review.jump_slices_to`)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(scene._plbopt_logics[0])
    logic.SetMRMLScene(scene)
    slice_node = logic.AddSliceNode(f"Review{scene.GetNumberOfNodesByClass('vtkMRMLSliceNode')}")
    slice_node.SetOrientationToAxial()
    slice_node.SetDimensions(pixels, pixels, 1)
    composite = logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(background.GetID())
    composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    composite.SetForegroundOpacity(review.OVERLAY_OPACITY)  # as the panel sets it
    composite.SetLabelVolumeID(label.GetID() if label is not None else None)
    composite.SetLabelOpacity(0.6)
    logic.FitSliceToAll()
    if ras is not None:
        review.jump_slices_to(scene, ras)
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    width, height, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return rgba[::-1].copy()  # VTK rows run bottom-up


def pseudo_label_map(scene, segmentation, volume):
    """The pseudo label as a label-map volume coloured like its segments (Slicer's own export)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "pseudo label (label layer)")
    if not slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(segmentation, labelmap, volume):
        raise RuntimeError(f"{segmentation.GetName()}: export to a label map failed")
    return labelmap


def render_loaded(scene, item, labels, colors, out_path: Path) -> Path:
    """The review picture of a loaded pseudo label: two slice views rendered by the slice logic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.patches import Patch

    case = cases.find_case(scene, item.case_name)
    volume, confidence = case.volume, item.prediction.confidence
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-160.0, 240.0)  # abdominal soft-tissue window
    ras = item.prediction.least_confident_ras
    left = render_slice_view(scene, volume, label=pseudo_label_map(scene, case.segmentation, volume), ras=ras)
    right = render_slice_view(scene, volume, foreground=confidence, ras=ras)

    table = confidence.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    legend = []
    for index in range(table.GetNumberOfColors()):
        table.GetColor(index, rgba)
        legend.append(list(rgba))
    legend = np.array(legend)
    # The table as the view draws it over mid-grey tissue: alpha 0 is clear, any other is the layer opacity.
    opacity = review.OVERLAY_OPACITY * (legend[:, 3:] > 0)
    shown = legend[:, :3] * opacity + 0.5 * (1 - opacity)

    figure, axes = plt.subplots(1, 2, figsize=(10, 5.4), dpi=100)
    axes[0].imshow(left)
    axes[0].set_title("Refined pseudo label")
    segments = case.segmentation.GetSegmentation()
    axes[0].legend(handles=[Patch(color=segments.GetNthSegment(i).GetColor(), label=segments.GetNthSegment(i).GetName())
                            for i in range(segments.GetNumberOfSegments())], loc="lower left", fontsize=8, framealpha=0.8)
    axes[1].imshow(right)
    axes[1].plot([right.shape[1] / 2], [right.shape[0] / 2], marker="+", color="cyan", markersize=18, markeredgewidth=2)
    threshold = float(table.GetAttribute(review.THRESHOLD_ATTRIBUTE))
    axes[1].set_title(f"Confidence: clear above {threshold:.2f}, + least confident")
    figure.colorbar(ScalarMappable(Normalize(0, 1), ListedColormap(shown)), ax=axes[1], fraction=0.046, pad=0.04,
                    label="confidence (max softmax probability)")
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(f"PLBOpt review: {item.case_name} (uncertainty {item.prediction.uncertainty:.3f}), "
                    "rendered by Slicer's slice logic")
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(f".tmp-{out_path.name}")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    temporary.replace(out_path)  # atomic: a half-written screenshot never replaces the old one
    return out_path


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
