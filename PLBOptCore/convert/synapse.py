"""Synapse multi-organ CT (BTCV "RawData") → PLBOptCore dataset folder, with DHC-style splits.

DHC trains on 20 cases, validates on 4 and tests on 6, with three-fold cross-validation. Its
published split files contradict each other (docs/DATASETS.md), so we fix our own seeded folds:

* fold 0 tests on DHC's current ``test.txt`` (0008 0027 0029 0033 0037 0039) whenever all six
  cases are present; the remaining cases are shuffled once (seed, stream 1) and folds 1 and 2
  test on the next two blocks of six, so the three test sets are disjoint;
* within a fold, the non-test cases are shuffled (seed, stream 2, fold): the first 4 validate,
  the rest train;
* the labeled training cases are :func:`..splits.select_labeled` (seed, stream 3).

Other case counts scale the sizes: test = 1/5 of all cases, validation = 1/6 of the rest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..data.io import IMAGE_SUFFIXES
from ..errors import ConfigError, DatasetError
from .splits import (
    STREAM_TEST_ORDER,
    STREAM_TRAIN_VAL,
    Labeled,
    SourceCase,
    check_seed,
    partition_labeled,
    rng,
    round_half_up,
    write_dataset_folder,
)

SYNAPSE_LABELS: Dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal vein and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}

# DHC HEAD's code/synapse_data/splits/test.txt (see docs/DATASETS.md for why only this file).
DHC_TEST_IDS: Tuple[str, ...] = ("0008", "0027", "0029", "0033", "0037", "0039")
NUM_FOLDS = 3
TEST_FRACTION = 6 / 30  # DHC: 6 test cases of 30
VALIDATION_FRACTION = 4 / 24  # DHC: 4 validation cases of the 24 others

# (image folder, label folder) relative to RAW_DIR, in the order they are tried: the Synapse
# download unpacks to RawData/Training/{img,label}; users often point at RawData or Training.
RAW_LAYOUTS: Tuple[Tuple[str, str], ...] = (
    ("Training/img", "Training/label"),
    ("RawData/Training/img", "RawData/Training/label"),
    ("img", "label"),
)

_IMAGE_RE = re.compile(r"^img(\d+)(\.nii\.gz|\.nii)$", re.IGNORECASE)


def find_synapse_cases(raw_dir: Path) -> Dict[str, SourceCase]:
    """Case id (``"0001"``) → source files, from the first layout of :data:`RAW_LAYOUTS` present."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DatasetError(f"{raw_dir}: Synapse raw folder not found")
    for image_rel, label_rel in RAW_LAYOUTS:
        image_dir, label_dir = raw_dir / image_rel, raw_dir / label_rel
        if image_dir.is_dir():
            break
    else:
        tried = ", ".join(img for img, _ in RAW_LAYOUTS)
        raise DatasetError(f"{raw_dir}: no Synapse image folder found (looked for {tried})")
    if not label_dir.is_dir():
        raise DatasetError(f"{label_dir}: Synapse label folder not found (needed for the images in {image_dir})")

    cases: Dict[str, SourceCase] = {}
    for image in sorted(image_dir.iterdir()):
        match = _IMAGE_RE.match(image.name)
        if match is None:
            continue
        case_id = match.group(1)
        label = _find_label(label_dir, case_id, match.group(2))
        cases[case_id] = SourceCase(f"synapse_{case_id}", image, label)
    if not cases:
        raise DatasetError(f"{image_dir}: no Synapse images named img<NNNN>.nii.gz")
    return cases


def _find_label(label_dir: Path, case_id: str, suffix: str) -> Path:
    """``label<id>`` with the image's suffix first, then any other image suffix."""
    for candidate in (suffix, *IMAGE_SUFFIXES):
        label = label_dir / f"label{case_id}{candidate}"
        if label.is_file():
            return label
    raise DatasetError(f"{label_dir / f'label{case_id}{suffix}'}: label file not found for img{case_id}{suffix}")


def split_synapse_cases(case_ids: Sequence[str], fold: int = 0, seed: int = 0) -> Dict[str, List[str]]:
    """Our DHC-style split of ``case_ids`` for ``fold``: {"train", "validation", "test"} id lists.

    Deterministic in (sorted ids, fold, seed); the test sets of the three folds are disjoint.
    """
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise ConfigError(f"--fold {fold!r}: expected 0, 1 or 2 (three-fold cross-validation)")
    ids = sorted(case_ids)
    n_test = max(1, round_half_up(len(ids) * TEST_FRACTION))
    if len(ids) < NUM_FOLDS * n_test or len(ids) - n_test < 2:
        raise ConfigError(f"Synapse split: {len(ids)} cases are too few for {NUM_FOLDS} folds")
    # DHC's test set only when complete and of the scaled size; otherwise fold 0 is seeded too.
    complete = set(DHC_TEST_IDS) <= set(ids) and n_test == len(DHC_TEST_IDS)
    first = list(DHC_TEST_IDS) if complete else []
    rest = [i for i in ids if i not in first]
    order = first + [rest[k] for k in rng(seed, STREAM_TEST_ORDER).permutation(len(rest))]
    test = sorted(order[fold * n_test : (fold + 1) * n_test])

    others = [i for i in ids if i not in test]
    n_val = max(1, round_half_up(len(others) * VALIDATION_FRACTION))
    shuffled = [others[k] for k in rng(seed, STREAM_TRAIN_VAL, fold).permutation(len(others))]
    return {"train": sorted(shuffled[n_val:]), "validation": sorted(shuffled[:n_val]), "test": test}


def convert_synapse(
    raw_dir: Path,
    out_dir: Path,
    labeled: Labeled = "10%",
    fold: int = 0,
    seed: int = 0,
    link: bool = False,
) -> Path:
    """Convert a Synapse raw folder into a PLBOptCore dataset folder and return ``out_dir``.

    ``labeled`` is how many of the training cases keep their labels ("10%", 0.1 or a count);
    the others go to "unlabeled" (their labels are kept aside in labelsUn/ and splits.json).
    ``link`` hard-links the files instead of copying them. splits.json records
    the seed, fold, ratio and case lists.
    """
    check_seed(seed)
    cases = find_synapse_cases(Path(raw_dir))
    split = split_synapse_cases(list(cases), fold, seed)
    plan = partition_labeled([cases[i] for i in split["train"]], labeled, seed)
    plan.validation = [cases[i] for i in split["validation"]]
    plan.test = [cases[i] for i in split["test"]]
    info: Dict[str, Any] = {
        "source": "synapse",
        "raw_dir": str(Path(raw_dir).absolute()),
        "seed": seed,
        "fold": fold,
        "num_folds": NUM_FOLDS,
        "dhc_test_ids": split["test"] == list(DHC_TEST_IDS),
        "labeled": str(labeled),
        "num_labeled": len(plan.training),
    }
    return write_dataset_folder(Path(out_dir), "Synapse multi-organ CT", SYNAPSE_LABELS, plan, info, link=link,
                                modality="CT")
