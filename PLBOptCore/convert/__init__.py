"""Public-dataset converters (Synapse, AMOS22) and labeled-ratio splits, plus their CLI commands.

``add_convert_arguments(subparsers)`` registers ``plbopt convert synapse|amos`` and
``plbopt split`` on the main CLI's subparsers; each command's ``func(args)`` returns an exit code
and lets :class:`PLBOptCore.errors.PLBOptError` propagate for the CLI to report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .amos import convert_amos
from .splits import apply_labeled_ratio, parse_labeled, select_labeled, unlabeled_with_labels
from .synapse import convert_synapse, split_synapse_cases

__all__ = [
    "add_convert_arguments",
    "apply_labeled_ratio",
    "convert_amos",
    "convert_synapse",
    "parse_labeled",
    "select_labeled",
    "split_synapse_cases",
    "unlabeled_with_labels",
]


def _summary(folder: Path) -> str:
    """One line: where the dataset is and how many cases each role has."""
    data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    counts = ", ".join(f"{len(data.get(role, []))} {role}" for role in ("training", "unlabeled", "validation", "test"))
    return f"{folder}: {counts}"


def _run_synapse(args: argparse.Namespace) -> int:
    print(_summary(convert_synapse(args.raw_dir, args.out_dir, args.labeled, args.fold, args.seed, args.link)))
    return 0


def _run_amos(args: argparse.Namespace) -> int:
    print(_summary(convert_amos(args.raw_dir, args.out_dir, args.labeled, args.seed, args.link)))
    return 0


def _run_split(args: argparse.Namespace) -> int:
    print(_summary(apply_labeled_ratio(args.dataset_dir, args.labeled, args.seed, args.output)))
    return 0


def _add_common(parser: argparse.ArgumentParser, default_labeled: str) -> None:
    parser.add_argument("raw_dir", type=Path, metavar="RAW_DIR", help="the downloaded dataset folder")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new (or empty) PLBOpt dataset folder")
    parser.add_argument(
        "--labeled", default=default_labeled,
        # argparse %-formats help text, hence the doubled percent sign.
        help=f"labeled training cases: a percentage, fraction or count (default {default_labeled.replace('%', '%%')})",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--link", action="store_true", help="hard-link files instead of copying (copies across file systems)")


def _run_totalseg(args: argparse.Namespace) -> int:
    from ..data.totalseg import import_totalsegmentator

    out = import_totalsegmentator(args.raw_dir, args.out_dir, args.classes)
    print(f"wrote {out / 'dataset.json'}")
    return 0


def add_convert_arguments(subparsers: "argparse._SubParsersAction") -> "argparse._SubParsersAction":
    """Register ``convert`` (synapse|amos|totalseg) and ``split`` on ``subparsers``.

    Returns the ``convert`` command's own subparsers so that other converters can join it.
    """
    convert = subparsers.add_parser("convert", help="convert a public dataset into a PLBOpt dataset folder")
    datasets = convert.add_subparsers(dest="dataset", metavar="DATASET", required=True)

    synapse = datasets.add_parser(
        "synapse", help="Synapse multi-organ CT (RawData/Training/img, label): 13 organs, 20/4/6 split, 3 folds"
    )
    _add_common(synapse, "10%")
    synapse.add_argument("--fold", type=int, default=0, choices=(0, 1, 2), help="cross-validation fold (default 0)")
    synapse.set_defaults(func=_run_synapse)

    amos = datasets.add_parser("amos", help="AMOS22 CT cases (dataset.json, imagesTr, imagesVa): 15 organs")
    _add_common(amos, "2%")
    amos.set_defaults(func=_run_amos)

    totalseg = datasets.add_parser(
        "totalseg", help="TotalSegmentator-style folder (ct_*.nii.gz + labels_*.nii.gz, classes_total_v2.json)"
    )
    totalseg.add_argument("raw_dir", type=Path, metavar="RAW_DIR")
    totalseg.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    totalseg.add_argument("--classes", nargs="+", required=True, metavar="NAME",
                          help="TotalSegmentator class names to keep, in label order (e.g. liver spleen aorta)")
    totalseg.set_defaults(func=_run_totalseg)

    split = subparsers.add_parser("split", help="re-partition a dataset's labeled/unlabeled training cases")
    split.add_argument("dataset_dir", type=Path, metavar="DATASET_DIR")
    split.add_argument("--labeled", required=True, help="a percentage, fraction or count, e.g. 10%%")
    split.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    split.add_argument(
        "-o", "--output", type=Path, default=None,
        help="write a new dataset folder instead of updating DATASET_DIR (dataset.json.bak keeps the old one)",
    )
    split.set_defaults(func=_run_split)
    return datasets
