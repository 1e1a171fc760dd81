"""Synthetic abdominal CT phantoms: demo and test data that need no download.

Each case is an axial body ellipse (fat rim around soft tissue, air outside) with a spine (bone,
not labeled: a bright distractor) and six labeled organs at anatomically plausible places, each a
smoothly deformed ellipsoid with random position, size and intensity. Intensities are realistic
HU and overlap where they do in real CT (liver vs spleen, gallbladder vs fat/soft tissue), so a
network has to use position and shape too. The image is blurred (partial volume) and gets
Gaussian noise, then stored as int16 HU like a scanner would.

Array coordinates follow the LPS convention of an identity-direction DICOM volume: X grows towards
the patient's left, Y towards posterior, Z towards superior.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .dataset import Case, write_dataset_json
from .io import write_image

LABELS: Dict[int, str] = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left",
                          5: "aorta", 6: "gallbladder"}
# Recommended display colours of the organs' SNOMED CT codes (those of PLBOptSlicer/PLBOptLib/terminology.py)
# in Slicer's terminology: "recommendedDisplayRGBValue" in Slicer/Slicer
# Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json (the same values
# in SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json). Both kidneys share one colour there.
TERMINOLOGY_COLORS: Dict[int, Tuple[int, int, int]] = {1: (221, 130, 101), 2: (157, 108, 162), 3: (185, 102, 83),
                                                       4: (185, 102, 83), 5: (224, 97, 76), 6: (139, 150, 98)}
# The classes' colours: the terminology's where they are distinct (liver, spleen). Its kidney and aorta
# are reddish browns close to its liver (CIE76 delta E 12.5 and 18; the right kidney and the aorta border the
# liver or lie next to it), the two kidneys would be one colour, and its olive gallbladder, set into the
# liver, looks like the liver with protan colour vision (delta E 3.7). So: aorta arterial red, right kidney
# yellow, left kidney magenta, gallbladder aqua. Every pair is at least delta E 48 apart, 27 with simulated
# protan, deutan or tritan vision, and 20 when drawn at the montage's opacity over CT
# (Testing/core/test_class_colors.py).
COLORS: Dict[int, Tuple[int, int, int]] = {1: TERMINOLOGY_COLORS[1], 2: TERMINOLOGY_COLORS[2], 3: (230, 220, 70),
                                           4: (240, 32, 240), 5: (200, 0, 0), 6: (0, 248, 224)}
SPACING_ZYX = (2.5, 1.5, 1.5)  # mm
ORIGIN_XYZ = (-71.25, -95.5, -412.5)  # mm, deliberately not zero

# Organ templates in normalised coordinates (-1..1 across the volume, Z, Y, X):
# (label, centre, radii, mean HU). Order matters: an earlier organ keeps voxels a later one
# also claims, so the gallbladder carves into the liver and kidneys are never covered by spleen.
_ORGANS: Tuple[Tuple[int, Tuple[float, float, float], Tuple[float, float, float], float], ...] = (
    (5, (0.0, 0.22, 0.10), (1.2, 0.08, 0.08), 220.0),  # aorta: contrast-filled tube along Z
    (3, (-0.25, 0.28, -0.42), (0.40, 0.19, 0.14), 170.0),  # right kidney (patient right = small X)
    (4, (-0.20, 0.28, 0.42), (0.40, 0.19, 0.14), 170.0),  # left kidney
    (6, (-0.05, -0.28, -0.18), (0.20, 0.10, 0.09), 10.0),  # gallbladder: small, bile ~10 HU
    (2, (0.35, 0.12, 0.55), (0.36, 0.25, 0.17), 115.0),  # spleen: left, posterior
    (1, (0.35, -0.08, -0.35), (0.55, 0.42, 0.38), 105.0),  # liver: right, anterior, large
)
_SPINE_CENTRE_YX, _SPINE_RADIUS = (0.46, 0.0), 0.13


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int, int], coarse=(4, 5, 5)) -> np.ndarray:
    """Low-frequency noise of unit standard deviation: a coarse random grid, spline-upsampled to a
    quarter of ``shape`` and then linearly to ``shape`` (a full-size cubic zoom costs 20× more)."""
    middle = [max(c, s // 4) for s, c in zip(shape, coarse)]
    field = ndimage.zoom(rng.standard_normal(coarse), [m / c for m, c in zip(middle, coarse)], order=3)
    field = ndimage.zoom(field, [s / m for s, m in zip(shape, middle)], order=1)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def make_phantom_case(shape: Tuple[int, int, int], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One phantom: HU image int16 (Z, Y, X) and label uint8 (Z, Y, X) with classes of ``LABELS``."""
    z, y, x = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    fields = [_smooth_field(rng, shape) for _ in range(2)]

    def deformed(centre, radii, amplitude):
        """Ellipsoid (Z,Y,X) deformed by a low-frequency field of its own."""
        theta = rng.uniform(0, 2 * np.pi)
        noise = np.cos(theta) * fields[0] + np.sin(theta) * fields[1]
        distance = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
        return distance + amplitude * noise < 1.0

    # body: elliptic cylinder, slightly varying along Z, with a subcutaneous fat rim
    body_radii = (10.0, 0.62 * rng.uniform(0.92, 1.05), 0.86 * rng.uniform(0.92, 1.05))
    body = deformed((0.0, 0.02, 0.0), body_radii, 0.08)
    inner = deformed((0.0, 0.02, 0.0), (10.0, body_radii[1] * 0.88, body_radii[2] * 0.9), 0.08) & body
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = -100.0
    # visceral fat mixed with bowel and muscle: organs (portal venous phase) stand out from it,
    # while liver and spleen share their HU range, so position and shape must tell them apart
    image[inner] = -30.0 + 15.0 * fields[1][inner]
    image[inner & deformed((0.0, 0.0, 0.0), (0.9, 0.35, 0.5), 0.6) & (fields[0] > 1.2)] = -90.0  # mesenteric fat

    # spine: cortical ring around cancellous bone, with lower-HU discs every ~12 slices; unlabeled
    yy, xx = y - _SPINE_CENTRE_YX[0] * body_radii[1] / 0.62, x - _SPINE_CENTRE_YX[1]
    ring = np.sqrt((yy / (0.75 * _SPINE_RADIUS)) ** 2 + (xx / _SPINE_RADIUS) ** 2)
    spine = np.broadcast_to(ring < 1.0, shape) & inner
    image[spine] = 250.0
    image[spine & np.broadcast_to(ring > 0.6, shape)] = 700.0
    discs = np.broadcast_to((np.arange(shape[0]) % 12 < 2)[:, None, None], shape)
    image[spine & discs] = 90.0
    occupied = spine | ~inner

    label = np.zeros(shape, dtype=np.uint8)
    for index, centre, radii, hu in _ORGANS:
        jitter = rng.uniform(-0.06, 0.06, size=3)
        scale = rng.uniform(0.85, 1.15, size=3)
        mask = deformed(np.add(centre, jitter), np.multiply(radii, scale), 0.3) & ~occupied
        label[mask] = index
        image[mask] = hu + rng.uniform(-8.0, 8.0)
        occupied |= mask

    image = ndimage.gaussian_filter(image, sigma=0.75)  # partial-volume blur at organ edges
    image += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING_ZYX)))
    image.SetOrigin(ORIGIN_XYZ)
    return image


# The demo and benchmark split: the paper's regime, where labels are scarce (Synapse 10 %, AMOS
# 2-5 %): 2 labeled of 14 training volumes, a validation pair that chooses best.pt, 4 test volumes.
DEMO_SPLIT = dict(n_labeled=2, n_unlabeled=12, n_validation=2, n_test=4)


def make_phantom_dataset(out_dir: Path, n_labeled: int = 2, n_unlabeled: int = 12, n_test: int = 4,
                         n_validation: int = 2, shape: Tuple[int, int, int] = (48, 96, 96), seed: int = 0) -> Path:
    """Write a phantom dataset folder and return it (default: :data:`DEMO_SPLIT`).

    Layout: ``imagesTr/labelsTr`` (labeled), ``imagesUn`` (unlabeled), ``imagesVal/labelsVal``
    (when ``n_validation > 0``), ``imagesTs/labelsTs`` (test) and ``dataset.json`` with labels and
    colours. Deterministic in ``seed``: case ``i`` (numbered across splits in that order) always
    comes from ``np.random.default_rng([seed, i])``.
    """
    out_dir = Path(out_dir).resolve()  # dataset.json paths are made relative to it
    shape = tuple(int(s) for s in shape)
    splits = (("training", "imagesTr", "labelsTr", n_labeled), ("unlabeled", "imagesUn", None, n_unlabeled),
              ("validation", "imagesVal", "labelsVal", n_validation), ("test", "imagesTs", "labelsTs", n_test))
    cases: Dict[str, List[Case]] = {}
    index = 0
    for split, image_dir, label_dir, count in splits:
        cases[split] = []
        for _ in range(count):
            name = f"phantom_{index:03d}"
            image, label = make_phantom_case(shape, np.random.default_rng([seed, index]))
            image_path = out_dir / image_dir / f"{name}.nii.gz"
            write_image(_image(image), image_path)
            label_path = None
            if label_dir is not None:
                label_path = out_dir / label_dir / f"{name}.nii.gz"
                write_image(_image(label), label_path)
            cases[split].append(Case(name, image_path, label_path))
            index += 1
    write_dataset_json(out_dir, LABELS, cases["training"], cases["unlabeled"], cases["validation"], cases["test"],
                       colors=COLORS, name="PLBOpt synthetic abdominal CT phantom", modality="CT")
    return out_dir
