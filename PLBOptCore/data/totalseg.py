"""Import TotalSegmentator-labelled CTs (the example folder in ``shared/data/totalsegmentator-example``).

Source folder: ``classes_total_v2.json`` (``{"1": "spleen", ...}``, TotalSegmentator v2 "total" ids),
labeled pairs ``ct_<x>.nii.gz`` + ``labels_<x>.nii.gz`` and further ``ct_*.nii.gz`` without labels,
which become unlabeled cases. The chosen classes become labels ``1..K`` in the given order; every
other TotalSegmentator class becomes background.
"""

from __future__ import annotations

import difflib
import json
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import DatasetError
from ..utils import atomic_write
from .dataset import Case, write_dataset_json
from .io import check_same_geometry, read_image, write_image

CLASS_FILE = "classes_total_v2.json"


def _read_class_ids(path: Path) -> Dict[str, int]:
    """TotalSegmentator class name → id from ``classes_total_v2.json``."""
    if not path.is_file():
        raise DatasetError(f"{path}: TotalSegmentator class list not found")
    try:
        raw = json.loads(path.read_text())
        return {str(name): int(index) for index, name in raw.items()}
    except (json.JSONDecodeError, AttributeError, ValueError) as exc:
        raise DatasetError(f"{path}: expected a JSON object {{\"1\": \"spleen\", ...}} ({exc})") from None


def _class_ids(class_file: Path, classes: Sequence[str]) -> List[int]:
    ids = _read_class_ids(class_file)
    if not classes:
        raise DatasetError(f"{class_file}: choose at least one class, e.g. {', '.join(list(ids)[:5])}")
    duplicates = sorted({c for c in classes if list(classes).count(c) > 1})
    if duplicates:
        raise DatasetError(f"{class_file}: classes chosen twice: {', '.join(duplicates)}")
    for name in classes:
        if name not in ids:
            close = difflib.get_close_matches(name, list(ids), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid names include {', '.join(list(ids)[:8])}, ..."
            raise DatasetError(f"{class_file}: unknown TotalSegmentator class {name!r} ({len(ids)} classes; {hint})")
    return [ids[name] for name in classes]


def _copy(src: Path, dst: Path) -> None:
    with atomic_write(dst) as tmp:
        tmp.write_bytes(src.read_bytes())


def import_totalsegmentator(src_dir: Path, out_dir: Path, classes: Sequence[str]) -> Path:
    """Write a dataset folder with ``classes`` (TotalSegmentator names) as labels 1..K.

    Labeled CTs go to ``imagesTr``/``labelsTr`` (labels remapped, uint8, on the CT's grid), the
    other CTs to ``imagesUn``. Raises ``DatasetError`` for an unknown class name (with suggestions)
    or a source folder without any labeled CT; warns for a class absent from every label map.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    ids = _class_ids(src_dir / CLASS_FILE, classes)
    lookup = np.zeros(max(max(ids), 255) + 1, dtype=np.uint8)
    lookup[ids] = np.arange(1, len(ids) + 1)

    training: List[Case] = []
    unlabeled: List[Case] = []
    found = np.zeros(len(ids) + 1, dtype=bool)
    for ct_path in sorted(src_dir.glob("ct_*.nii.gz")):
        name = ct_path.name[: -len(".nii.gz")]
        label_path = src_dir / f"labels_{name[len('ct_'):]}.nii.gz"
        image_out = out_dir / ("imagesTr" if label_path.exists() else "imagesUn") / ct_path.name
        if not label_path.exists():
            read_image(ct_path)  # refuse a corrupt source before writing a dataset around it
            _copy(ct_path, image_out)
            unlabeled.append(Case(name, image_out))
            continue
        image, label = read_image(ct_path), read_image(label_path)
        check_same_geometry(image, label, ct_path, label_path)
        values = sitk.GetArrayViewFromImage(label).astype(np.int64)
        if values.min() < 0 or values.max() >= len(lookup):
            raise DatasetError(f"{label_path}: label values {values.min()}..{values.max()} are not TotalSegmentator ids")
        remapped = lookup[values]
        found[np.unique(remapped)] = True
        out = sitk.GetImageFromArray(remapped)
        out.CopyInformation(image)
        label_out = out_dir / "labelsTr" / ct_path.name
        _copy(ct_path, image_out)
        write_image(out, label_out)
        training.append(Case(name, image_out, label_out))
    if not training:
        raise DatasetError(f"{src_dir}: no labeled CT (ct_<name>.nii.gz with labels_<name>.nii.gz) found")
    absent = [c for c, ok in zip(classes, found[1:]) if not ok]
    if absent:
        warnings.warn(f"{src_dir}: classes absent from every label map: {', '.join(absent)}", stacklevel=2)
    labels = {0: "background", **{i + 1: name for i, name in enumerate(classes)}}
    write_dataset_json(out_dir, labels, training, unlabeled, name=f"TotalSegmentator import from {src_dir.name}")
    return out_dir
