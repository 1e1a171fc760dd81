"""AMOS22 (abdominal multi-organ, CT part) → PLBOptCore dataset folder, with a DHC-style split.

DHC trains on 216 and validates on 24 cases of AMOS's imagesTr (240 cases, 40 of them MRI) and
tests on the 120 cases of imagesVa (20 MRI), normalising MRI like CT. We keep CT only (AMOS ids
below 500), which leaves 200 imagesTr and 100 imagesVa cases, and scale DHC's 216/24 ratio:
1/10 of the CT imagesTr cases validate (20), the rest train (180), and every CT imagesVa case
tests. The labeled training cases are :func:`..splits.select_labeled` of the seed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from ..data.io import case_name
from ..errors import DatasetError
from .splits import (
    STREAM_TRAIN_VAL,
    Labeled,
    SourceCase,
    check_seed,
    partition_labeled,
    read_json,
    rng,
    round_half_up,
    write_dataset_folder,
)

# AMOS's own label names, used when RAW_DIR/dataset.json has no usable "labels".
AMOS_LABELS: Dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "postcava",
    10: "pancreas",
    11: "right adrenal gland",
    12: "left adrenal gland",
    13: "duodenum",
    14: "bladder",
    15: "prostate/uterus",
}

FIRST_MRI_ID = 500  # AMOS numbers its MRI scans from 500 up
VALIDATION_FRACTION = 24 / 240  # DHC: 24 of the 240 imagesTr cases validate

# dataset.json role → (image folder, label folder) when RAW_DIR has no dataset.json.
RAW_FOLDERS = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVa", "labelsVa")}

_ID_RE = re.compile(r"^amos_(\d+)$")


def amos_id(name: str, where: Path) -> int:
    """The number of an AMOS case name (``amos_0507`` → 507)."""
    match = _ID_RE.match(name)
    if match is None:
        raise DatasetError(f"{where}: case name {name!r} is not of the AMOS form amos_<NNNN>")
    return int(match.group(1))


def _file(raw_dir: Path, rel: Any, where: Path) -> Path:
    if not isinstance(rel, str):
        raise DatasetError(f"{where}: expected a file path, found {rel!r}")
    path = raw_dir / rel
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (listed in {where})")
    return path


def _from_dataset_json(raw_dir: Path, data: Mapping[str, Any], role: str, source: Path) -> List[SourceCase]:
    """Cases of AMOS's own dataset.json ``role`` ("training" or "validation")."""
    entries = data.get(role, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "image" in e for e in entries):
        raise DatasetError(f"{source}: {role!r} must be a list of {{'image', 'label'}} objects")
    cases = []
    for entry in entries:
        image = _file(raw_dir, entry["image"], source)
        label = _file(raw_dir, entry["label"], source) if "label" in entry else None
        cases.append(SourceCase(case_name(image), image, label))
    return cases


def _from_folders(raw_dir: Path, role: str) -> List[SourceCase]:
    """Cases of ``role`` by listing its folders: a label is the same file name in the label folder."""
    image_dir, label_dir = (raw_dir / f for f in RAW_FOLDERS[role])
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: AMOS image folder not found (and no {raw_dir / 'dataset.json'})")
    cases = []
    for image in sorted(image_dir.glob("amos_*.nii*")):
        label = label_dir / image.name
        cases.append(SourceCase(case_name(image), image, label if label.is_file() else None))
    return cases


def _labels(data: Mapping[str, Any], source: Path) -> Dict[int, str]:
    """AMOS's "labels" as {int: name}, checked to be 0 = background..C-1; the fallback if absent."""
    raw = data.get("labels")
    if raw is None:
        return dict(AMOS_LABELS)
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, ValueError):
        raise DatasetError(f"{source}: 'labels' must map label numbers to names") from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise DatasetError(f"{source}: 'labels' must number classes 0..C-1 contiguously, found {sorted(labels)}")
    return labels


def read_amos(raw_dir: Path) -> Tuple[Dict[int, str], List[SourceCase], List[SourceCase]]:
    """(labels, labeled CT imagesTr cases, CT imagesVa cases) of an AMOS22 raw folder."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DatasetError(f"{raw_dir}: AMOS raw folder not found")
    source = raw_dir / "dataset.json"
    if source.exists():
        data = read_json(source)
        training = _from_dataset_json(raw_dir, data, "training", source)
        validation = _from_dataset_json(raw_dir, data, "validation", source)
    else:
        data = {}
        training, validation = _from_folders(raw_dir, "training"), _from_folders(raw_dir, "validation")

    def ct(cases: List[SourceCase]) -> List[SourceCase]:
        return [c for c in cases if amos_id(c.name, c.image) < FIRST_MRI_ID]

    training, validation = ct(training), ct(validation)
    unlabeled = [c.image for c in training if c.label is None]
    if unlabeled:
        raise DatasetError(f"{unlabeled[0]}: AMOS training case has no label")
    return _labels(data, source), training, validation


def convert_amos(
    raw_dir: Path,
    out_dir: Path,
    labeled: Labeled = "2%",
    seed: int = 0,
    link: bool = False,
) -> Path:
    """Convert the CT cases of an AMOS22 raw folder into a PLBOptCore dataset folder.

    Reads RAW_DIR/dataset.json (AMOS's own) or, without it, imagesTr/labelsTr/imagesVa/labelsVa.
    ``labeled`` ("2%", 0.05, a count...) of the training cases keep their labels; the others go
    to "unlabeled" (labels kept aside in labelsUn/ and splits.json). Returns ``out_dir``.
    """
    check_seed(seed)
    labels, training, test = read_amos(Path(raw_dir))
    if len(training) < 2:
        raise DatasetError(f"{raw_dir}: {len(training)} labeled CT training cases; at least 2 are needed")
    training.sort(key=lambda c: c.name)
    n_val = max(1, round_half_up(len(training) * VALIDATION_FRACTION))
    order = rng(seed, STREAM_TRAIN_VAL, 0).permutation(len(training))
    validation = [training[k] for k in order[:n_val]]
    plan = partition_labeled([training[k] for k in order[n_val:]], labeled, seed)
    plan.validation, plan.test = validation, test
    info = {
        "source": "amos",
        "raw_dir": str(Path(raw_dir).absolute()),
        "seed": seed,
        "modality": "CT",
        "excluded_mri_from_id": FIRST_MRI_ID,
        "labeled": str(labeled),
        "num_labeled": len(plan.training),
    }
    return write_dataset_folder(Path(out_dir), "AMOS22 CT", labels, plan, info, link=link, modality="CT")
