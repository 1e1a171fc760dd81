"""Labeled/unlabeled partitions and the writer shared by the dataset converters.

Three jobs live here because the converters and ``plbopt split`` must agree on them exactly:

* :func:`parse_labeled` turns ``"10%"``, ``0.1`` or ``"2"`` into a case count (DHC rounds down).
* :func:`select_labeled` picks which training cases keep their labels. The choice depends only on
  the sorted case names and the seed, so converting with ``--labeled 10% --seed 0`` and later
  running ``plbopt split --labeled 10% --seed 0`` on the result give the same cases, and the
  labeled set of a smaller ratio is always contained in the one of a larger ratio.
* :func:`write_dataset_folder` copies (or links) a planned split into the PLBOptCore folder layout
  and writes ``dataset.json`` + ``splits.json``; :func:`apply_labeled_ratio` re-partitions an
  existing dataset folder in place or into a new one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..data.io import case_name, check_same_geometry, read_header
from ..errors import ConfigError, DatasetError
from ..utils import atomic_write

Labeled = Union[str, int, float]

# Independent random streams: adding a stream never changes the draws of another one.
STREAM_TEST_ORDER = 1
STREAM_TRAIN_VAL = 2
STREAM_LABELED = 3

# Folder names of the PLBOptCore layout, per dataset.json role. Labels of unlabeled cases go to
# labelsUn/: dataset.json never points at them (training cannot see them), but splits.json does,
# so that ``plbopt split`` can later give them back to "training".
LAYOUT = {
    "training": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUn", "labelsUn"),
    "validation": ("imagesVal", "labelsVal"),
    "test": ("imagesTs", "labelsTs"),
}
ROLES = tuple(LAYOUT)

_LABELED_HELP = "expected a percentage like '10%', a fraction like 0.1 or a case count like 2"


@dataclass(frozen=True)
class SourceCase:
    """One case to convert: its output name and its source files."""

    name: str
    image: Path
    label: Optional[Path] = None


@dataclass
class SplitPlan:
    """Which source cases go to which dataset.json role."""

    training: List[SourceCase] = field(default_factory=list)
    unlabeled: List[SourceCase] = field(default_factory=list)
    validation: List[SourceCase] = field(default_factory=list)
    test: List[SourceCase] = field(default_factory=list)

    def role(self, name: str) -> List[SourceCase]:
        return getattr(self, name)


def check_seed(seed: int) -> int:
    """Seeds feed ``np.random.default_rng([seed, ...])``, which needs a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"--seed {seed!r}: expected a non-negative integer")
    return int(seed)


def rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator for one named stream of one seed."""
    return np.random.default_rng([check_seed(seed), *stream])


def round_half_up(value: float) -> int:
    """Python's ``round`` rounds 2.5 to 2; split sizes should not depend on that subtlety."""
    return int(math.floor(value + 0.5))


def parse_labeled(value: Labeled, n_train: int) -> int:
    """Number of labeled cases among ``n_train`` for ``value``.

    ``"10%"`` and ``0.1``/``"0.1"`` are fractions of ``n_train``, rounded down like DHC's split
    files (10% of 216 AMOS cases = 21) but at least 1; an int or a digit string is a count.
    Raises ``ConfigError`` for anything else, for 0, or for more cases than there are.
    """
    text = str(value).strip()
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, np.integer)) or (isinstance(value, str) and text.isdigit()):
            count = int(text)
        else:
            fraction = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
            if not 0.0 < fraction <= 1.0:  # also rejects NaN
                raise ConfigError(f"--labeled {value!r}: must be more than 0% and at most 100%")
            # The epsilon keeps 0.1 * 20 = 2.0000000000000004 and 0.29 * 100 = 28.999999999999996 exact.
            count = max(1, math.floor(fraction * n_train + 1e-9))
    except ValueError:
        raise ConfigError(f"--labeled {value!r}: {_LABELED_HELP}") from None
    if count < 1:
        raise ConfigError(f"--labeled {value!r}: at least one labeled case is needed")
    if count > n_train:
        raise ConfigError(f"--labeled {value!r}: only {n_train} training cases have labels")
    return count


def select_labeled(names: Sequence[str], count: int, seed: int) -> List[str]:
    """The ``count`` names that keep their labels: a prefix of a seeded permutation of the sorted names."""
    ordered = sorted(names)
    order = rng(seed, STREAM_LABELED).permutation(len(ordered))
    return sorted(ordered[i] for i in order[:count])


def partition_labeled(cases: Sequence[SourceCase], labeled: Labeled, seed: int) -> SplitPlan:
    """Split labeled ``cases`` into a plan's "training" (keeps labels) and "unlabeled" parts."""
    count = parse_labeled(labeled, len(cases))
    keep = set(select_labeled([c.name for c in cases], count, seed))
    return SplitPlan(
        training=[c for c in cases if c.name in keep],
        unlabeled=[c for c in cases if c.name not in keep],
    )


def check_pair(case: SourceCase) -> None:
    """Header-only check that a case's image and label exist, are 3D and share one voxel grid.

    Catching a mismatched or corrupt file here names it at conversion time, rather than hours
    later in training; reading headers only keeps conversion of full datasets fast.
    """
    image = read_header(case.image)
    if case.label is not None:
        check_same_geometry(image, read_header(case.label), case.image, case.label)


def image_suffix(path: Path) -> str:
    """The image suffix of ``path`` (``.nii.gz``...), kept on the output so the format is unchanged."""
    return path.name[len(case_name(path)):]


def _place(src: Path, dst: Path, link: bool) -> None:
    """Copy ``src`` to ``dst`` byte for byte (geometry untouched), or hard-link it when ``link``.

    A hard link costs no space and survives moving the raw folder. Where one is impossible
    (another file system) the file is copied: a symbolic link would point outside the dataset
    folder, which ``load_dataset`` rejects.
    """
    try:
        if link:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise DatasetError(f"{dst}: cannot copy {src} ({exc.strerror})") from None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON object from ``path``; ``DatasetError`` naming it when missing or malformed."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    return data


def _check_output_dir(out_dir: Path) -> None:
    """Refuse to mix a new dataset with existing files: stale cases would silently stay behind."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"{out_dir}: output folder exists and is not empty; choose a new folder")


def _entry(image: str, label: Optional[str]) -> Dict[str, str]:
    return {"image": image, "label": label} if label is not None else {"image": image}


def write_dataset_folder(
    out_dir: Path,
    name: str,
    labels: Mapping[int, str],
    plan: SplitPlan,
    split_info: Mapping[str, Any],
    link: bool = False,
    colors: Optional[Mapping[str, Any]] = None,
    modality: str = "",
    label_writers: Optional[Mapping[str, Callable[[Path, Path], None]]] = None,
) -> Path:
    """Materialise ``plan`` as a PLBOptCore dataset folder and return ``out_dir``.

    Files go to imagesTr/labelsTr, imagesUn(/labelsUn), imagesVal/labelsVal, imagesTs/labelsTs as
    ``<case><suffix>``. The folder is built under a temporary sibling name and renamed at the end,
    so an interrupted conversion never leaves a half-filled dataset under ``out_dir``.
    ``split_info`` (seed, fold, ratio...) is stored in splits.json with the case lists;
    ``colors`` (dataset.json's optional display colours) is copied into dataset.json when given,
    ``modality`` as MSD's ``{"modality": {"0": ...}}`` (the preprocessing plan normalises by it).
    ``label_writers`` maps a case name to ``write(src, dst)``, which writes that case's label
    instead of a copy (a split file's ``"sparse"`` labels).
    """
    out_dir = Path(out_dir).absolute()
    _check_output_dir(out_dir)
    counts = Counter(c.name for role in ROLES for c in plan.role(role))
    duplicates = sorted(n for n, k in counts.items() if k > 1)
    if duplicates:
        raise DatasetError(f"{out_dir}: case names used twice: {', '.join(duplicates)}")
    for role in ROLES:
        for case in plan.role(role):
            check_pair(case)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        dataset: Dict[str, Any] = {
            "name": name,
            "labels": {str(k): v for k, v in sorted(labels.items())},
        }
        if colors is not None:
            dataset["colors"] = colors
        if modality:
            dataset["modality"] = {"0": modality}
        unlabeled_with_labels: List[Dict[str, str]] = []
        for role in ROLES:
            image_dir, label_dir = LAYOUT[role]
            entries = []
            for case in sorted(plan.role(role), key=lambda c: c.name):
                image = f"{image_dir}/{case.name}{image_suffix(case.image)}"
                label = None if case.label is None else f"{label_dir}/{case.name}{image_suffix(case.label)}"
                for src, rel in ((case.image, image), (case.label, label)):
                    if src is not None:
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        if rel == label and case.name in (label_writers or {}):
                            label_writers[case.name](Path(src), tmp / rel)
                        else:
                            _place(Path(src), tmp / rel, link)
                if role == "unlabeled":
                    if label is not None:
                        unlabeled_with_labels.append(_entry(image, label))
                    label = None  # dataset.json must not hand these labels to training
                entries.append(_entry(image, label))
            dataset[role] = entries
        write_json(tmp / "dataset.json", dataset)
        splits = dict(split_info)
        splits.update({role: sorted(c.name for c in plan.role(role)) for role in ROLES})
        splits["unlabeled_with_labels"] = unlabeled_with_labels
        write_json(tmp / "splits.json", splits)
        if out_dir.exists():  # empty (checked above); os.replace onto a folder fails on Windows
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _inside(root: Path, rel: str) -> Optional[Path]:
    """``root / rel`` normalised, or None when it leaves ``root``."""
    path = Path(os.path.normpath(root / rel))
    return path if root in path.parents else None


def _cases(root: Path, data: Mapping[str, Any], role: str, source: Path) -> List[SourceCase]:
    """Resolve the dataset.json-style entries ``data[role]`` (read from ``source``) into cases."""
    entries = data.get(role, [])
    if not isinstance(entries, list):
        raise DatasetError(f"{source}: {role!r} must be a list")
    cases = []
    for i, entry in enumerate(entries):
        files: Dict[str, Optional[Path]] = {"image": None, "label": None}
        for key in files:
            if key == "label" and (role == "unlabeled" or "label" not in entry):
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
                raise DatasetError(f"{source}: {role}[{i}]: expected an object with an {key!r} path")
            path = _inside(root, entry[key])
            if path is None:
                raise DatasetError(f"{source}: {role}[{i}]: {entry[key]!r} points outside {root}")
            if not path.exists():
                raise DatasetError(f"{path}: file not found (listed in {source})")
            files[key] = path
        cases.append(SourceCase(case_name(files["image"]), files["image"], files["label"]))
    return cases


def unlabeled_with_labels(dataset_dir: Path) -> List[SourceCase]:
    """The unlabeled cases of ``dataset_dir`` whose labels splits.json keeps aside (written by the
    converters, ``plbopt split`` and fixed split files), in dataset.json's order; empty without
    splits.json. A remembered label only counts while dataset.json still lists its image as
    unlabeled. Training never reads these labels: they let a benchmark score the pseudo labels of
    the unlabeled cases and ``plbopt split`` give the cases back to "training"."""
    root = Path(os.path.abspath(dataset_dir))
    dataset_path, splits_path = root / "dataset.json", root / "splits.json"
    if not splits_path.exists():
        return []
    remembered = {c.image: c for c in _cases(root, read_json(splits_path), "unlabeled_with_labels", splits_path)
                  if c.label}
    return [remembered[c.image] for c in _cases(root, read_json(dataset_path), "unlabeled", dataset_path)
            if c.image in remembered]


def apply_labeled_ratio(
    dataset_dir: Path, labeled: Labeled, seed: int = 0, out_dir: Optional[Path] = None
) -> Path:
    """Re-partition a dataset folder's labeled cases into "training" and "unlabeled" by ratio.

    The pool is every "training" case plus the "unlabeled" cases whose labels splits.json
    remembers under "unlabeled_with_labels" (written by the converters and by this function), so
    ratios can go up as well as down and the operation is reversible. Unlabeled cases without
    labels stay unlabeled. The labeled cases are :func:`select_labeled` of the pool.

    Without ``out_dir`` the folder is updated in place: files stay where they are, dataset.json is
    rewritten atomically after copying the previous one to dataset.json.bak, and splits.json is
    updated. With ``out_dir`` a new folder in the standard layout is written and the source is
    left untouched. Returns the folder written.
    """
    root = Path(os.path.abspath(dataset_dir))
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    dataset_path, splits_path = root / "dataset.json", root / "splits.json"
    dataset = read_json(dataset_path)
    splits = read_json(splits_path) if splits_path.exists() else {}

    training = _cases(root, dataset, "training", dataset_path)
    unlabeled_missing = [c.image for c in training if c.label is None]
    if unlabeled_missing:
        raise DatasetError(f"{dataset_path}: training case {unlabeled_missing[0]} has no 'label'")
    remembered = {c.image: c for c in unlabeled_with_labels(root)}
    unlabeled = _cases(root, dataset, "unlabeled", dataset_path)
    pool = training + list(remembered.values())
    plan = partition_labeled(pool, labeled, seed)
    plan.unlabeled += [c for c in unlabeled if c.image not in remembered]
    plan.validation = _cases(root, dataset, "validation", dataset_path)
    plan.test = _cases(root, dataset, "test", dataset_path)

    # Keep what the converter recorded (source, fold...), replace what this call decides.
    info = {k: v for k, v in splits.items() if k not in ROLES and k != "unlabeled_with_labels"}
    info.update({"seed": check_seed(seed), "labeled": str(labeled), "num_labeled": len(plan.training)})

    if out_dir is not None:
        try:
            labels = {int(k): str(v) for k, v in dataset.get("labels", {}).items()}
        except (AttributeError, ValueError):
            raise DatasetError(f"{dataset_path}: 'labels' must map integer strings to names") from None
        return write_dataset_folder(
            Path(out_dir), str(dataset.get("name", "")), labels, plan, info, colors=dataset.get("colors"),
            modality=str((dataset.get("modality") or {}).get("0", "")),
        )

    def entry(case: SourceCase, with_label: bool = True) -> Dict[str, str]:
        label = case.label.relative_to(root).as_posix() if with_label and case.label else None
        return _entry(case.image.relative_to(root).as_posix(), label)

    new = dict(dataset)
    new["training"] = [entry(c) for c in sorted(plan.training, key=lambda c: c.name)]
    new["unlabeled"] = [entry(c, with_label=False) for c in sorted(plan.unlabeled, key=lambda c: c.name)]
    info.update({role: sorted(c.name for c in plan.role(role)) for role in ROLES})
    info["unlabeled_with_labels"] = [entry(c) for c in sorted(plan.unlabeled, key=lambda c: c.name) if c.label]
    with atomic_write(root / "dataset.json.bak") as tmp:
        shutil.copyfile(dataset_path, tmp)
    write_json(dataset_path, new)
    write_json(splits_path, info)
    return root


# The keys of a fixed split file (Resources/splits/<dataset>.json) and the dataset.json role of each.
SPLIT_FILE_ROLES = {"labeled": "training", "unlabeled": "unlabeled", "validation": "validation", "test": "test"}


def apply_split_file(split_file: Path, source_dir: Path, out_dir: Path) -> Path:
    """Materialise a fixed split of a labelled dataset folder (any layout ``load_dataset`` reads,
    e.g. nnU-Net v2 raw) as a PLBOptCore dataset folder in ``out_dir``, files hard-linked where possible.

    ``split_file`` is JSON with case-name lists ``labeled``, ``unlabeled``, ``validation`` and
    ``test`` (every case of the source at most once); unlabeled cases keep their labels aside in
    labelsUn/ as the converters do. An ``out_dir`` already made from the same split and source is
    reused as it is, so a benchmark can be resumed; any other non-empty ``out_dir`` is refused.

    An optional ``"sparse": {"every": 4, "axis": "z", "offset": 0}`` makes the ``labeled`` cases'
    labels sparse (:mod:`PLBOptCore.convert.sparsify`): only those slices stay annotated, the rest
    become the ``ignore`` label (the source's, or one above its highest class); the other roles'
    labels stay whole. So one split file states an equal-effort arm completely.
    """
    from ..data.dataset import IGNORE_NAME, load_dataset
    from .sparsify import parse_sparse, sparsify_label_file

    split_file, source_dir, out_dir = Path(split_file), Path(source_dir), Path(out_dir)
    split = read_json(split_file)
    source = load_dataset(source_dir)
    cases = {case.name: case for case in source.training + source.unlabeled + source.validation + source.test}
    plan = SplitPlan()
    for key, role in SPLIT_FILE_ROLES.items():
        names = split.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{split_file}: '{key}' must be a list of case names")
        unknown = [n for n in names if n not in cases]
        if unknown:
            raise DatasetError(f"{split_file}: case {unknown[0]!r} of '{key}' is not in {source.json_path}")
        plan.role(role).extend(SourceCase(n, cases[n].image, cases[n].label) for n in names)
    if not plan.training:
        raise DatasetError(f"{split_file}: 'labeled' lists no case")
    missing_labels = [c.name for role in ("training", "validation", "test") for c in plan.role(role) if c.label is None]
    if missing_labels:
        raise DatasetError(f"{split_file}: case {missing_labels[0]!r} has no label in {source.json_path}")
    info: Dict[str, Any] = {"split_file": split_file.name, "source": str(source_dir.resolve())}
    ignore = source.ignore_label
    writers: Dict[str, Callable[[Path, Path], None]] = {}
    if "sparse" in split:
        sparse = parse_sparse(split["sparse"], str(split_file))
        if ignore is None:
            ignore = max(source.labels) + 1
        info["sparse"] = {**sparse.to_dict(), "ignore": ignore}
        writers = {c.name: (lambda src, dst, s=sparse, i=ignore: sparsify_label_file(src, dst, i, s))
                   for c in plan.training}
    if (out_dir / "splits.json").is_file():
        made = read_json(out_dir / "splits.json")
        if made.get("split_file") == info["split_file"] and made.get("source") == info["source"] \
                and made.get("sparse") == info.get("sparse") and all(
                made.get(role) == sorted(c.name for c in plan.role(role)) for role in ROLES):
            return out_dir
    colors = {str(k): list(v) for k, v in source.colors.items()}
    labels = dict(source.labels)
    if ignore is not None:  # the linked label files still hold it, or the sparse labels do
        labels[ignore] = IGNORE_NAME
    return write_dataset_folder(out_dir, source_dir.name, labels, plan, info, link=True, colors=colors,
                                modality=source.modality, label_writers=writers)
