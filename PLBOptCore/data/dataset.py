"""Dataset folders (MSD or nnU-Net v2 ``dataset.json``): loading, validation, writing.

MSD layout (what PLBOpt's converters write)::

    root/dataset.json   {"name", "labels": {"0": "background", "1": "spleen"}, "colors": {"1": [r, g, b]},
                         "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
                         "unlabeled": [{"image": "imagesUn/b.nii.gz"}],
                         "validation": [{"image", "label"}], "test": [{"image", "label"?}]}

Paths are relative to ``root`` and must stay inside it.

nnU-Net v2 layout, read in place (recognised by its ``file_ending`` key, as nnU-Net v2 itself
ignores an old ``training`` list)::

    root/dataset.json   {"channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1},
                         "numTraining": 2, "file_ending": ".nii.gz",
                         "dataset": {"a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"}},
                         "unlabeled": "imagesUn"}
    root/imagesTr/a_0000.nii.gz ↔ root/labelsTr/a.nii.gz;  root/imagesTs/, root/labelsTs/ (optional)

``dataset`` (optional, nnU-Net's explicit case list: paths relative to ``root`` or absolute,
``$VARS`` expanded) replaces the ``imagesTr`` scan. ``unlabeled`` (optional, PLBOpt's own key,
ignored by nnU-Net) names a folder of unlabeled images. ``imagesTs`` (with ``labelsTs`` labels
where present) becomes the test split; a file there that is not named ``<case>_0000<file_ending>``
is left out with a warning (nnU-Net never reads ``imagesTs`` for training, so neither is it refused). Case names drop the ``_0000`` channel suffix; datasets
with several channels are refused.

Sparse annotation (both layouts): a label named ``"ignore"`` marks voxels nobody annotated. As
nnU-Net v2 requires, it must be the highest label value (``{"background": 0, "spleen": 1,
"ignore": 2}``); it is no class: ``DatasetSpec.labels`` and ``num_classes`` leave it out and
``DatasetSpec.ignore_label`` holds its value.

A sparsely annotated training case's unannotated voxels are exactly what semi-supervision is
for: :func:`with_sparse_as_unlabeled` (``Config.sparse_as_unlabeled``, applied by the trainer)
also lists the image of every training case whose label holds the ignore label among the
unlabeled cases, as ``<case>~unannotated`` without its label.

``load_dataset`` checks the JSON and that files exist; ``validate_dataset`` opens the files
(header only, or every voxel with ``deep=True``).
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import DatasetError
from ..utils import atomic_write
from .io import (CHANNEL_SUFFIX, IMAGE_SUFFIXES, case_name, check_case_name, check_same_geometry, check_single_channel,
                 image_case_name, image_files, read_header, read_image)

Color = Tuple[int, int, int]
logger = logging.getLogger(__name__)

# Colours of classes that dataset.json gives none: Okabe and Ito's palette for the first seven, whose
# colours stay apart with protan, deutan and tritan colour vision (about 1 in 12 men sees red and green
# alike; Testing/core/test_class_colors.py simulates it), then evenly spread hues.
_PALETTE: Tuple[Color, ...] = (
    (0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167),
)


def default_color(index: int) -> Color:
    """Colour of class ``index`` when dataset.json gives none (background is black)."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.6, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass
class Case:
    name: str
    image: Path
    label: Optional[Path] = None


@dataclass
class DatasetSpec:
    root: Path
    labels: Dict[int, str]  # {0: "background", 1: "spleen", ...}, contiguous 0..C-1
    colors: Dict[int, Color]  # every class, from dataset.json or the default palette
    training: List[Case]  # labeled
    unlabeled: List[Case] = field(default_factory=list)
    validation: List[Case] = field(default_factory=list)
    test: List[Case] = field(default_factory=list)
    unlabeled_dirs: List[Path] = field(default_factory=list)  # folders given besides dataset.json (--unlabeled)
    # the image modality: nnU-Net's channel_names["0"] or MSD's modality["0"] ("CT", "T2", "MRI"...),
    # "" when dataset.json does not say; the preprocessing plan normalises CT and other images differently
    modality: str = ""
    # the label value of voxels nobody annotated (nnU-Net v2's "ignore" label), None when every
    # voxel of a label is annotated; it is no class and not in ``labels``
    ignore_label: Optional[int] = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def json_path(self) -> Path:
        return self.root / "dataset.json"


SPLITS = ("training", "unlabeled", "validation", "test")
IGNORE_NAME = "ignore"  # nnU-Net v2's name of the label of unannotated voxels


def _parse_labels(raw: Any, where: Path) -> Tuple[Dict[int, str], Optional[int]]:
    """``({value: class name}, ignore value or None)`` of dataset.json's ``labels``; the ignore
    label (named ``"ignore"``) must be the highest value and is not among the classes."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: 'labels' must be a non-empty mapping like {{\"0\": \"background\", \"1\": \"spleen\"}}")
    # nnU-Net v2 writes {"background": 0, "spleen": 1}; accept it too.
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        raw = {str(v): k for k, v in raw.items()}
    labels: Dict[int, str] = {}
    for key, name in raw.items():
        try:
            index = int(key)
        except ValueError:
            raise DatasetError(f"{where}: label key {key!r} is not an integer") from None
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: label {key} must have a non-empty name, got {name!r}")
        labels[index] = name.strip()
    ignore = next((index for index, name in labels.items() if name == IGNORE_NAME), None)
    if ignore is not None and ignore != max(labels):
        raise DatasetError(f"{where}: the \"ignore\" label must have the highest label value (as nnU-Net v2 "
                           f"requires), but it is {ignore} and the highest is {max(labels)}")
    if sorted(labels) != list(range(len(labels))) or len(labels) - (ignore is not None) < 2:
        raise DatasetError(
            f"{where}: labels must be contiguous 0..C-1 with 0 = background and at least one class, "
            f"got {sorted(labels)}"
        )
    names = list(labels.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{where}: duplicate label names {duplicates}")
    classes = {index: name for index, name in sorted(labels.items()) if index != ignore}
    return classes, ignore


def _parse_colors(raw: Any, labels: Mapping[int, str], where: Path, ignore: Optional[int] = None) -> Dict[int, Color]:
    """Colour of every class; a colour given for the ignore label is accepted and dropped (no class)."""
    colors = {i: default_color(i) for i in labels}
    if raw is None:
        return colors
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: 'colors' must map label values to [r, g, b]")
    for key, rgb in raw.items():
        try:
            index = int(key)
        except ValueError:
            raise DatasetError(f"{where}: colour key {key!r} is not an integer") from None
        if index == ignore:
            continue
        if index not in labels:
            raise DatasetError(f"{where}: colour given for label {index}, which is not in 'labels'")
        if (not isinstance(rgb, (list, tuple)) or len(rgb) != 3
                or not all(isinstance(c, int) and 0 <= c <= 255 for c in rgb)):
            raise DatasetError(f"{where}: colour of label {index} must be [r, g, b] integers 0-255, got {rgb!r}")
        colors[index] = (rgb[0], rgb[1], rgb[2])
    return colors


def _resolve(root: Path, rel: Any, where: Path, split: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` components that leave ``root``.

    The check is lexical on purpose: symbolic links placed in the folder by the user (a common way
    to assemble a dataset without copying images) are followed, but the JSON cannot point outside.
    """
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: '{split}' has an entry with a missing or non-string path: {rel!r}")
    if os.path.isabs(rel):
        raise DatasetError(f"{where}: path {rel!r} in '{split}' must be relative to the dataset folder")
    normal = os.path.normpath(rel)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise DatasetError(f"{where}: path {rel!r} in '{split}' points outside the dataset folder")
    return root / normal


def _parse_split(root: Path, raw: Any, split: str, where: Path) -> List[Case]:
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: '{split}' must be a list of {{\"image\": ..., \"label\": ...}} entries")
    cases = []
    for entry in raw:
        if isinstance(entry, str):  # MSD lists test images as plain strings
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{where}: every entry of '{split}' needs an \"image\", got {entry!r}")
        if split == "training" and not entry.get("label"):
            raise DatasetError(f"{where}: training entry {entry['image']!r} has no \"label\"")
        if split == "unlabeled" and entry.get("label"):
            raise DatasetError(f"{where}: unlabeled entry {entry['image']!r} has a \"label\"; move it to 'training'")
        image = _resolve(root, entry["image"], where, split)
        label = _resolve(root, entry["label"], where, split) if entry.get("label") else None
        cases.append(Case(image_case_name(image), image, label))
    return cases


def _refuse_channels(channels: Any, key: str, where: Path) -> None:
    """One input channel only: a multi-channel dataset gets one clear line instead of a 4D error."""
    if isinstance(channels, dict) and len(channels) > 1:
        names = ", ".join(str(v) for v in channels.values())
        raise DatasetError(f"{where}: {len(channels)} input channels in '{key}' ({names}); "
                           "PLBOpt trains on single-channel images only")


def folder_cases(folder: Path) -> List[Case]:
    """Unlabeled cases from every image in ``folder`` (nnU-Net ``_0000`` suffixes dropped from the names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: unlabeled image folder not found")
    images = image_files(folder)
    check_single_channel(images)
    if not images:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return [Case(check_case_name(image_case_name(path), path), path) for path in images]


def _nnunet_path(root: Path, raw: Any, where: Path) -> Path:
    """A path of an nnU-Net v2 dataset.json, read as nnU-Net does: ``$VARS`` expanded, relative to
    ``root`` unless absolute."""
    if not isinstance(raw, str) or not raw:
        raise DatasetError(f"{where}: 'dataset' has a missing or non-string path: {raw!r}")
    return root / os.path.expandvars(raw)  # an absolute right-hand side replaces root


def _nnunet_scan(folder: Path, file_ending: str, where: Path, strict: bool = True) -> Dict[str, Path]:
    """``{case: image}`` of an nnU-Net images folder, whose files are ``<case>_0000<file_ending>``.

    A file with the ending that is not named so is refused (``strict``, ``imagesTr``), or left
    out with one warning (``imagesTs``: nnU-Net never reads it for training, and neither does a
    PLBOpt training)."""
    cases: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not name.endswith(file_ending):
            continue
        stem = name[: -len(file_ending)]
        match = CHANNEL_SUFFIX.search(stem)
        problem = None
        if match is None:
            problem = f"not named <case>_0000{file_ending} as {where.name} (nnU-Net v2) requires"
        elif match.group(1) != "0000":
            problem = (f"channel {int(match.group(1))} of a multi-channel case; "
                       "PLBOpt trains on single-channel images only")
        if problem is not None and strict:
            raise DatasetError(f"{path}: {problem}")
        if problem is not None:
            _warn_once(f"{path}: {problem}; left out of the test cases ({folder.name} is not read for training)")
            continue
        cases[stem[: match.start()]] = path
    return cases


_WARNED: set = set()


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning, once per process (``load_dataset`` runs more than once per command)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


def _nnunet_v2_splits(root: Path, data: Dict[str, Any], where: Path, check_files: bool) -> Dict[str, List[Case]]:
    """Training, unlabeled and test cases of an nnU-Net v2 dataset folder (see the module docstring)."""
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in data]
    if missing:
        raise DatasetError(f"{where}: missing required nnU-Net v2 keys {missing}")
    _refuse_channels(data["channel_names"], "channel_names", where)
    if isinstance(data["labels"], dict) and any(isinstance(v, (list, tuple)) for v in data["labels"].values()):
        raise DatasetError(f"{where}: region-based labels (lists of label values) are not supported; "
                           "PLBOpt trains one class per label value")
    file_ending = data["file_ending"]
    if not isinstance(file_ending, str) or not file_ending.lower().endswith(IMAGE_SUFFIXES):
        raise DatasetError(f"{where}: file_ending {file_ending!r} is not one of {', '.join(IMAGE_SUFFIXES)}")
    training = _nnunet_training(root, data, where, file_ending)
    if check_files:
        for case in training:
            if not case.label.exists():
                raise DatasetError(f"{case.label}: file not found (label of {case.image})")
    expected = data.get("numTraining")
    if expected is not None and expected != len(training):
        raise DatasetError(f"{where}: numTraining is {expected!r} but {len(training)} training cases were found")
    unlabeled: List[Case] = []
    if "unlabeled" in data:
        if not isinstance(data["unlabeled"], str) or not data["unlabeled"]:
            raise DatasetError(f"{where}: 'unlabeled' must name a folder of images, e.g. \"imagesUn\"")
        unlabeled = folder_cases(_nnunet_path(root, data["unlabeled"], where))
    test: List[Case] = []
    if (root / "imagesTs").is_dir():
        for name, image in _nnunet_scan(root / "imagesTs", file_ending, where, strict=False).items():
            label = root / "labelsTs" / f"{name}{file_ending}"
            test.append(Case(name, image, label if label.is_file() else None))
    return {"training": training, "unlabeled": unlabeled, "validation": [], "test": test}


def _nnunet_training(root: Path, data: Dict[str, Any], where: Path, file_ending: str) -> List[Case]:
    """Labeled cases of a v2 dataset: its ``dataset`` key if present, else the ``imagesTr`` scan."""
    if "dataset" in data:
        if not isinstance(data["dataset"], dict):
            raise DatasetError(f"{where}: 'dataset' must map case names to {{\"images\": [...], \"label\": ...}}")
        training: List[Case] = []
        for name, entry in data["dataset"].items():
            images = entry.get("images") if isinstance(entry, dict) else None
            if not isinstance(images, list) or not images or "label" not in entry:
                raise DatasetError(f"{where}: 'dataset' entry {name!r} needs \"images\" (a list) and \"label\"")
            if len(images) > 1:
                raise DatasetError(f"{where}: case {name!r} has {len(images)} channels; "
                                   "PLBOpt trains on single-channel images only")
            training.append(Case(name, _nnunet_path(root, images[0], where), _nnunet_path(root, entry["label"], where)))
    else:
        images_dir = root / "imagesTr"
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: folder not found (nnU-Net v2 layout, {where.name} has no 'dataset' key)")
        training = [Case(name, image, root / "labelsTr" / f"{name}{file_ending}")
                    for name, image in _nnunet_scan(images_dir, file_ending, where).items()]
    return training


def load_dataset(root: Path, check_files: bool = True, unlabeled_dir: Optional[Path] = None) -> DatasetSpec:
    """Parse and check ``root/dataset.json`` (MSD or nnU-Net v2); with ``check_files`` every file must exist.

    Args:
        root: the dataset folder.
        check_files: require every listed image and label to exist.
        unlabeled_dir: a folder whose images are added to the unlabeled cases (names without
            nnU-Net's ``_0000`` suffix).

    Raises ``DatasetError`` for a missing folder or dataset.json, invalid JSON, missing keys,
    bad labels/colours, paths escaping the folder, case names that are no safe file name
    (:func:`~PLBOptCore.data.io.check_case_name`), duplicate case names, no labeled case, several
    input channels, or a missing file (named in the message).
    """
    root = Path(root)
    where = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if not where.is_file():
        raise DatasetError(f"{where}: dataset.json not found")
    try:
        data = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc})") from None
    except RecursionError:  # json recurses once per level of nesting
        raise DatasetError(f"{where}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: must contain a JSON object")
    if "file_ending" in data:
        splits = _nnunet_v2_splits(root, data, where, check_files)
        labels, ignore = _parse_labels(data["labels"], where)
    else:
        missing = [key for key in ("labels", "training") if key not in data]
        if missing:
            raise DatasetError(f"{where}: missing required keys {missing}")
        _refuse_channels(data.get("modality"), "modality", where)
        labels, ignore = _parse_labels(data["labels"], where)
        splits = {split: _parse_split(root, data.get(split, []), split, where) for split in SPLITS}
    if unlabeled_dir is not None:
        splits["unlabeled"] = splits["unlabeled"] + folder_cases(Path(unlabeled_dir))
    if not splits["training"]:
        raise DatasetError(f"{where}: no labeled case in 'training'; at least one image with a label is needed")
    seen: Dict[str, str] = {}
    for split, cases in splits.items():
        for case in cases:
            check_case_name(case.name, where)  # names become cache folders: one safe file name each
            if case.name in seen:
                raise DatasetError(
                    f"{where}: case name {case.name!r} appears twice ({seen[case.name]} and {split}); names must be unique"
                )
            seen[case.name] = split
            if check_files:
                for path in (case.image, case.label):
                    if path is not None and not path.exists():
                        raise DatasetError(f"{path}: file not found (listed in {where.name} '{split}')")
    channels = data.get("channel_names", data.get("modality"))
    modality = str(next(iter(channels.values()))) if isinstance(channels, dict) and channels else ""
    return DatasetSpec(
        root=root, labels=labels, colors=_parse_colors(data.get("colors"), labels, where, ignore), **splits,
        unlabeled_dirs=[Path(unlabeled_dir)] if unlabeled_dir is not None else [], modality=modality,
        ignore_label=ignore,
    )


def _check_label_values(path: Path, label: sitk.Image, labels: Mapping[int, str], ignore: Optional[int] = None) -> bool:
    """Raise unless every voxel is one of ``labels`` or ``ignore``; return whether any annotated
    foreground (a class other than background) is present."""
    array = sitk.GetArrayViewFromImage(label)
    if array.dtype.kind == "f":
        fractional = array[array != np.round(array)]
        if fractional.size:
            raise DatasetError(
                f"{path}: label map has non-integer values (e.g. {float(fractional.flat[0]):g}); "
                "labels must be whole class numbers"
            )
    values = np.unique(array)
    bad = [v.item() for v in values if v not in labels and v != ignore]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        allowed = f"0..{len(labels) - 1}" + (f", ignore {ignore}" if ignore is not None else "")
        raise DatasetError(f"{path}: label values [{shown}] are not in dataset.json labels ({allowed})")
    return any(v != 0 and v != ignore for v in values.tolist())


# Name suffix of the unlabeled copy of a sparsely annotated training case (with_sparse_as_unlabeled):
# its own preprocessing cache folder, never mistaken for the labeled case.
SPARSE_UNLABELED_SUFFIX = "~unannotated"


def sparse_training_cases(spec: DatasetSpec) -> List[Case]:
    """The training cases whose label holds ``spec.ignore_label`` (reads every training label;
    none without an ignore label)."""
    if spec.ignore_label is None:
        return []
    sparse = []
    for case in spec.training:
        assert case.label is not None  # load_dataset refuses a training case without a label
        image = read_image(case.label)  # held: the array view reads the image's own buffer
        if (sitk.GetArrayViewFromImage(image) == spec.ignore_label).any():
            sparse.append(case)
    return sparse


def with_sparse_as_unlabeled(spec: DatasetSpec) -> DatasetSpec:
    """A copy of ``spec`` whose ``unlabeled`` cases also hold the image, without its label, of each
    sparsely annotated training case (:func:`sparse_training_cases`), named ``<case>~unannotated``;
    the case stays in ``training`` too. Unlabeled patches of those copies are uniform crops of the
    whole volume, the annotated slices included, whose labels are not used there (CPS, refinement,
    triplet and mutual correction see only the network's pseudo labels).

    Raises ``DatasetError`` when a copy's name is taken by another case or is no safe file name.
    """
    taken = {case.name for split in SPLITS for case in getattr(spec, split)}
    joined = {case.name: case.image for case in spec.unlabeled}
    copies = []
    for case in sparse_training_cases(spec):
        name = check_case_name(case.name + SPARSE_UNLABELED_SUFFIX, spec.json_path)
        if joined.get(name) == case.image:  # joined already: applying this twice changes nothing
            continue
        if name in taken:
            raise DatasetError(f"{spec.json_path}: case name {name!r} is taken; it names the unlabeled copy of "
                               f"the sparsely annotated case {case.name!r} (sparse_as_unlabeled)")
        copies.append(Case(name, case.image, None))
    return dataclasses.replace(spec, unlabeled=list(spec.unlabeled) + copies) if copies else spec


def _check_image_values(path: Path, image: sitk.Image) -> None:
    array = sitk.GetArrayViewFromImage(image)
    low, high = array.min(), array.max()
    if low == high:
        raise DatasetError(f"{path}: image is constant (every voxel = {low.item():g})")


def validate_dataset(spec: DatasetSpec, deep: bool = True) -> None:
    """Open every image and label of ``spec`` and raise ``DatasetError`` on the first problem.

    Always: file readable, 3D, label on the image grid (size, spacing, origin, direction).
    ``deep`` additionally reads every voxel: NaN/Inf, truncated data, constant images, label values
    outside ``spec.labels`` (the ignore label allowed), non-integer labels, and every training label
    empty (no annotated foreground).
    Volumes are read one at a time so memory stays at one case.
    """
    any_foreground = False
    for split in SPLITS:
        for case in getattr(spec, split):
            if not deep:
                ref = read_header(case.image)
                if case.label is not None:
                    check_same_geometry(ref, read_header(case.label), case.image, case.label)
                continue
            image = read_image(case.image)
            _check_image_values(case.image, image)
            if case.label is not None:
                label = read_image(case.label)
                check_same_geometry(image, label, case.image, case.label)
                has_foreground = _check_label_values(case.label, label, spec.labels, spec.ignore_label)
                any_foreground |= split == "training" and has_foreground
    if deep and not any_foreground:
        raise DatasetError(
            f"{spec.json_path}: every training label is empty (background only); there is nothing to learn"
        )


def _relative(root: Path, path: Path) -> str:
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise DatasetError(f"{path}: must be inside the dataset folder {root}") from None


def _entries(root: Path, cases: Iterable[Case]) -> List[Dict[str, str]]:
    entries = []
    for case in cases:
        entry = {"image": _relative(root, case.image)}
        if case.label is not None:
            entry["label"] = _relative(root, case.label)
        entries.append(entry)
    return entries


def write_dataset_json(root: Path, labels: Mapping[int, str], training: Sequence[Case], unlabeled: Sequence[Case],
                       validation: Sequence[Case] = (), test: Sequence[Case] = (),
                       colors: Optional[Mapping[int, Sequence[int]]] = None, name: str = "",
                       modality: str = "") -> Path:
    """Write ``root/dataset.json`` atomically and return its path.

    Case paths may be absolute (inside ``root``) or relative to ``root``; they are stored relative.
    ``modality`` ("CT", "MR"...) is written as MSD's ``{"modality": {"0": ...}}`` when given.
    """
    root = Path(root)
    data = {
        "name": name or root.name,
        "labels": {str(int(k)): v for k, v in sorted(labels.items())},
        "training": _entries(root, training),
        "unlabeled": _entries(root, unlabeled),
        "validation": _entries(root, validation),
        "test": _entries(root, test),
    }
    if colors:
        data["colors"] = {str(int(k)): [int(c) for c in rgb] for k, rgb in sorted(colors.items())}
    if modality:
        data["modality"] = {"0": modality}
    path = root / "dataset.json"
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path
