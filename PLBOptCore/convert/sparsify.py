"""Sparse versions of labelled datasets, and how much of a labeled set is annotated (issue 23).

A clinician who paints every 4th slice of eight volumes spends about as long as one who paints
two whole volumes. Comparing the two needs the sparse version of a dataset made reproducibly, and
every result to state how many slices were annotated. Three pieces live here:

* :class:`SparseSpec` (``every``, ``axis``, ``offset``): slices ``offset, offset + every, ...``
  along the image axis ``x``, ``y`` or ``z`` (SimpleITK's index order; ``z`` is numpy axis 0, the
  axial slices of an axial acquisition) stay annotated, every other voxel becomes ``ignore``.
* :func:`sparsify_dataset` (``plbopt sparsify``) writes such a version of a labelled dataset as a
  new nnU-Net v2 raw folder: images hard-linked (copied across file systems), labels of the chosen
  cases rewritten, ``"ignore"`` the highest label value as nnU-Net v2 requires. The same spec in a
  fixed split file (``"sparse": {"every": 4, "axis": "z"}``, applied to its ``labeled`` cases by
  :func:`~PLBOptCore.convert.splits.apply_split_file`) gives ``plbopt bench accuracy --split`` the
  sparse arm of an equal-effort comparison without an intermediate folder. Both use
  :func:`sparsify_array`, so they write the same labels.
* :func:`annotation_effort` / :func:`labeled_effort`: annotated slices, slices holding foreground
  and the annotated-voxel fraction of one label or of a dataset's labeled cases, which
  ``plbopt bench accuracy`` reports beside every table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..data.dataset import IGNORE_NAME, DatasetSpec, load_dataset
from ..data.io import read_image, write_image
from ..errors import ConfigError, DatasetError

AXES = {"x": 2, "y": 1, "z": 0}  # image index axis -> axis of the numpy array SimpleITK returns
SPARSE_KEYS = ("every", "axis", "offset")


@dataclass(frozen=True)
class SparseSpec:
    """Which slices stay annotated: ``offset, offset + every, ...`` along image axis ``axis``."""

    every: int
    axis: str = "z"
    offset: int = 0

    def check(self, where: str) -> "SparseSpec":
        """Raise ``ConfigError`` (prefixed ``where``) unless every >= 1, axis in x/y/z, 0 <= offset < every."""
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"{where}: 'every' must be an integer >= 1, got {self.every!r}")
        if self.axis not in AXES:
            raise ConfigError(f"{where}: 'axis' must be one of x, y, z, got {self.axis!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or not 0 <= self.offset < self.every:
            raise ConfigError(f"{where}: 'offset' must be an integer from 0 to every - 1 = {self.every - 1}, "
                              f"got {self.offset!r}")
        return self

    def kept(self, n_slices: int) -> np.ndarray:
        """Boolean mask of the ``n_slices`` slices that stay annotated."""
        index = np.arange(n_slices)
        return (index >= self.offset) & ((index - self.offset) % self.every == 0)

    def to_dict(self) -> Dict[str, Any]:
        return {"every": self.every, "axis": self.axis, "offset": self.offset}


def parse_sparse(raw: Any, where: str) -> SparseSpec:
    """A :class:`SparseSpec` from a split file's ``"sparse"`` object; ``ConfigError`` naming ``where``."""
    if not isinstance(raw, dict) or "every" not in raw:
        raise ConfigError(f"{where}: 'sparse' must be an object like {{\"every\": 4, \"axis\": \"z\"}}")
    unknown = sorted(set(raw) - set(SPARSE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in 'sparse': {', '.join(unknown)} "
                          f"(allowed: {', '.join(SPARSE_KEYS)})")
    return SparseSpec(raw["every"], raw.get("axis", "z"), raw.get("offset", 0)).check(where)


def sparsify_array(label: np.ndarray, ignore: int, spec: SparseSpec) -> np.ndarray:
    """``label`` (numpy order z, y, x) with every slice ``spec`` does not keep set to ``ignore``
    (voxels already ``ignore`` stay so); the dtype widens when ``ignore`` does not fit."""
    dtype = np.result_type(label.dtype, np.min_scalar_type(ignore))
    out = label.astype(dtype, copy=True)
    axis = AXES[spec.axis]
    dropped = ~spec.kept(out.shape[axis])
    index = [slice(None)] * out.ndim
    index[axis] = dropped
    out[tuple(index)] = ignore
    return out


def sparsify_label_file(src: Path, dst: Path, ignore: int, spec: SparseSpec) -> None:
    """Write the sparse version of label file ``src`` to ``dst`` (same geometry), atomically."""
    image = read_image(src)
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind not in "iu":
        rounded = np.round(array)
        if not np.array_equal(rounded, array):
            raise DatasetError(f"{src}: label values must be integers")
        array = rounded.astype(np.int32)
    out = sitk.GetImageFromArray(sparsify_array(array, ignore, spec))
    out.CopyInformation(image)
    write_image(out, dst)


# ------------------------------------------------------------------------------------- annotation effort
def _slicewise(annotated: np.ndarray, axis: int) -> bool:
    """Whether every slice along ``axis`` is annotated completely or not at all."""
    other = tuple(a for a in range(annotated.ndim) if a != axis)
    return bool(np.array_equal(annotated.any(axis=other), annotated.all(axis=other)))


def annotation_effort(label: np.ndarray, ignore: Optional[int], axis: Optional[str] = None) -> Dict[str, Any]:
    """How much of one label (numpy order z, y, x) is annotated, i.e. not ``ignore``.

    ``axis``: the image axis slices are counted along; by default the axis along which the
    annotation is slice-wise (each slice complete or absent: what :func:`sparsify_array` writes),
    ``z`` when several are (a whole volume) or none is (scribbles; then a slice counts when any of
    its voxels is annotated). Returns ``{"axis", "slices", "slices_total", "foreground_slices"
    (annotated slices holding a class other than background), "voxels", "voxels_total"}``.
    """
    annotated = np.ones(label.shape, bool) if ignore is None else label != ignore
    if axis is None:
        axis = next((name for name in ("z", "y", "x") if _slicewise(annotated, AXES[name])), "z")
    numpy_axis = AXES[axis]
    other = tuple(a for a in range(label.ndim) if a != numpy_axis)
    foreground = annotated & (label != 0)
    return {"axis": axis, "slices": int(annotated.any(axis=other).sum()), "slices_total": int(label.shape[numpy_axis]),
            "foreground_slices": int(foreground.any(axis=other).sum()), "voxels": int(annotated.sum()),
            "voxels_total": int(label.size)}


def labeled_effort(spec: DatasetSpec) -> Dict[str, Any]:
    """:func:`annotation_effort` of every labeled (``training``) case of ``spec`` and their sums.

    Returns ``{"cases", "axis" (common axis, or "mixed"), "slices", "slices_total",
    "foreground_slices", "voxels", "voxels_total", "voxel_fraction", "sparse_cases" (cases with
    ignore voxels), "per_case": {name: effort}}``. Reads every training label.
    """
    per_case = {}
    for case in spec.training:
        array = sitk.GetArrayFromImage(read_image(case.label))  # a copy: a view dies with its image
        per_case[case.name] = annotation_effort(array, spec.ignore_label)
    totals = {key: sum(e[key] for e in per_case.values())
              for key in ("slices", "slices_total", "foreground_slices", "voxels", "voxels_total")}
    axes = {e["axis"] for e in per_case.values()}
    return {"cases": len(per_case), "axis": axes.pop() if len(axes) == 1 else "mixed", **totals,
            "voxel_fraction": totals["voxels"] / max(totals["voxels_total"], 1),
            "sparse_cases": sum(e["voxels"] < e["voxels_total"] for e in per_case.values()), "per_case": per_case}


def effort_line(effort: Mapping[str, Any]) -> str:
    """One Markdown line stating the labeled set's annotation effort."""
    return (f"Annotation effort of the labeled set: **{effort['slices']} annotated slices** (axis {effort['axis']}) "
            f"of {effort['slices_total']} in {effort['cases']} cases ({effort['sparse_cases']} sparse), "
            f"{effort['foreground_slices']} of them holding foreground; "
            f"{100 * effort['voxel_fraction']:.1f} % of the labeled voxels annotated.")


# ------------------------------------------------------------------------------------- dataset
def _nnunet_labels(spec: DatasetSpec, ignore: int) -> Dict[str, int]:
    labels = {name: value for value, name in sorted(spec.labels.items())}
    labels[IGNORE_NAME] = ignore
    return labels


def _file_ending(spec: DatasetSpec, cases: Sequence[Any]) -> str:
    """The one image suffix of every file of ``cases`` (nnU-Net v2 has one ``file_ending``)."""
    from .splits import image_suffix

    endings = {}
    for case in cases:
        for path in (case.image, case.label):
            if path is not None:
                endings.setdefault(image_suffix(path), path)
    if len(endings) != 1:
        found = ", ".join(f"{ending} ({path})" for ending, path in endings.items())
        raise DatasetError(f"{spec.json_path}: nnU-Net v2 needs one file ending, the cases have {found}")
    return next(iter(endings))


def sparsify_dataset(source_dir: Path, out_dir: Path, spec: SparseSpec, cases: Optional[Sequence[str]] = None,
                     overwrite: bool = False, link: bool = True) -> Path:
    """Write the sparse version of the labelled dataset ``source_dir`` (any layout ``load_dataset``
    reads) to ``out_dir`` in the nnU-Net v2 raw layout and return ``out_dir``.

    Labelled ``training`` and ``validation`` cases go to ``imagesTr``/``labelsTr`` (nnU-Net v2 has
    no validation role: choose roles with a split file), ``test`` cases to ``imagesTs``/``labelsTs``
    and unlabeled ones to ``imagesUn`` (PLBOpt's ``"unlabeled"`` key), images hard-linked where
    possible. The labels of ``cases`` (default: every ``training`` case) keep the slices ``spec``
    keeps and get ``ignore`` elsewhere; the other labels are placed unchanged. ``ignore`` is the
    source's ignore label, or one above its highest class. dataset.json records the spec, the
    cases and the source under ``"sparse"``.

    The folder is built under a temporary sibling and renamed at the end; an existing non-empty
    ``out_dir`` is refused unless ``overwrite`` (then replaced only once the new one is complete).
    Raises ``DatasetError`` / ``ConfigError`` naming the file or option at fault.
    """
    from .splits import _place, image_suffix, write_json

    source_dir, out_dir = Path(source_dir).absolute(), Path(out_dir).absolute()
    spec.check("--every/--axis/--offset")
    source = load_dataset(source_dir)
    src_real, out_real = source_dir.resolve(), out_dir.resolve()
    if out_real == src_real or src_real in out_real.parents or out_real in src_real.parents:
        raise DatasetError(f"{out_dir}: the output folder must lie outside the source dataset {source_dir} "
                           "and not contain it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DatasetError(f"{out_dir}: output folder exists and is not empty; use --overwrite to replace it")
    labelled = source.training + [c for c in source.validation if c.label is not None]
    names = [c.name for c in source.training] if cases is None else list(dict.fromkeys(cases))
    known = {c.name for c in labelled}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DatasetError(f"{source.json_path}: case {unknown[0]!r} (--cases) is not a labelled training case there")
    if not names:
        raise DatasetError(f"{source.json_path}: no case to sparsify")
    ignore = source.ignore_label if source.ignore_label is not None else max(source.labels) + 1
    ending = _file_ending(source, labelled + source.test + source.unlabeled)
    chosen = set(names)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    _remove(tmp, old)
    try:
        for case in sorted(labelled, key=lambda c: c.name):
            (tmp / "imagesTr").mkdir(parents=True, exist_ok=True)
            (tmp / "labelsTr").mkdir(parents=True, exist_ok=True)
            _place(case.image, tmp / "imagesTr" / f"{case.name}_0000{ending}", link)
            label = tmp / "labelsTr" / f"{case.name}{ending}"
            if case.name in chosen:
                sparsify_label_file(case.label, label, ignore, spec)
            else:
                _place(case.label, label, link)
        for case in source.test:
            (tmp / "imagesTs").mkdir(parents=True, exist_ok=True)
            _place(case.image, tmp / "imagesTs" / f"{case.name}_0000{ending}", link)
            if case.label is not None:
                (tmp / "labelsTs").mkdir(parents=True, exist_ok=True)
                _place(case.label, tmp / "labelsTs" / f"{case.name}{ending}", link)
        data: Dict[str, Any] = {
            "channel_names": {"0": source.modality or "image"},
            "labels": _nnunet_labels(source, ignore), "numTraining": len(labelled), "file_ending": ending,
            "name": f"{source_dir.name} sparse (every {spec.every}, axis {spec.axis}, offset {spec.offset})",
            "colors": {str(k): list(v) for k, v in source.colors.items() if k > 0},
            "sparse": {**spec.to_dict(), "ignore": ignore, "cases": sorted(names), "source": str(source_dir)},
        }
        if source.unlabeled:
            (tmp / "imagesUn").mkdir(parents=True, exist_ok=True)
            for case in source.unlabeled:
                _place(case.image, tmp / "imagesUn" / f"{case.name}_0000{image_suffix(case.image)}", link)
            data["unlabeled"] = "imagesUn"
        write_json(tmp / "dataset.json", data)
        if out_dir.exists():
            os.replace(out_dir, old)  # --overwrite: the old folder goes only once the new one is complete
        os.replace(tmp, out_dir)
    finally:
        _remove(tmp, old)
    return out_dir


def _remove(*paths: Path) -> None:
    """Delete each of ``paths`` that exists, folder or file."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ------------------------------------------------------------------------------------- CLI
def _run_sparsify(args: argparse.Namespace) -> int:
    cases = [name.strip() for name in args.cases.split(",") if name.strip()] if args.cases else None
    out = sparsify_dataset(args.dataset, args.output, SparseSpec(args.every, args.axis, args.offset), cases,
                           overwrite=args.overwrite, link=not args.copy)
    effort = labeled_effort(load_dataset(out))
    data = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    print(f"wrote {out / 'dataset.json'}: {len(data['sparse']['cases'])} sparse case(s), ignore label "
          f"{data['sparse']['ignore']}; labeled cases: {effort['slices']} annotated slices "
          f"(axis {effort['axis']}) of {effort['slices_total']}, {100 * effort['voxel_fraction']:.1f} % of voxels")
    return 0


def add_sparsify_arguments(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``plbopt sparsify`` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "sparsify", help="write a sparse version of a labelled dataset (nnU-Net v2, 'ignore' label): "
                         "every Nth slice annotated")
    p.add_argument("dataset", type=Path, help="labelled dataset folder (MSD or nnU-Net v2)")
    p.add_argument("-o", "--output", type=Path, required=True, help="new nnU-Net v2 dataset folder")
    p.add_argument("--every", type=int, required=True, help="keep every Nth slice annotated, e.g. 4")
    p.add_argument("--axis", choices=tuple(AXES), default="z",
                   help="image axis the slices are taken along (default z: numpy axis 0, axial for axial scans)")
    p.add_argument("--offset", type=int, default=0, help="first annotated slice, 0..N-1 (default 0)")
    p.add_argument("--cases", metavar="A,B,...", help="cases whose labels become sparse (default: every training case)")
    p.add_argument("--copy", action="store_true", help="copy the images instead of hard-linking them")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_run_sparsify)

