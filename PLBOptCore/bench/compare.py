"""Paired comparison of two accuracy-benchmark folders (``plbopt bench compare A B``).

``plbopt bench accuracy`` compares presets and variants trained on one split. Some questions need
two splits of the same images, trained with the same presets and seeds: the equal-effort comparison
of sparse annotation (issue 23) trains 2 whole volumes in one folder and every 4th slice of 8
volumes in another. This module reads both folders' ``results.json`` reports, pairs the runs by
group (preset + variant) and seed, and writes ``compare.json``, ``COMPARE.md`` and ``compare.png``
(per-organ Dice bars of every arm and group):

* each arm's annotation effort (annotated slices of its labeled set) and split file;
* per arm and group, the mean Dice ± std over seeds, per organ and for each subnet, and the
  collapse count;
* paired differences ``B − A`` per seed. A group of B is paired with the same group of A, or,
  where A lacks it (a ``--set`` variant trained in B only, e.g. ``sparse_as_unlabeled``), with
  its preset's group in A.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..convert.sparsify import effort_line
from ..convert.splits import read_json, write_json
from ..errors import DatasetError
from ..utils import atomic_write, check_output_file, check_output_folder
from .accuracy import _cell as accuracy_cell
from .accuracy import _stats, aggregate
from .plots import plot_dice_bars

COMPARE_JSON = "compare.json"
COMPARE_MD = "COMPARE.md"
COMPARE_PNG = "compare.png"


def load_bench(out_dir: Path) -> Dict[str, Any]:
    """The runs of the accuracy-benchmark folder ``out_dir``, merged over its reports.

    Every ``reports/*/results.json`` is read, oldest first, so a run scored in several calls keeps
    the record of the newest report. Noise evaluations are left out (they are no training arm).

    Returns ``{"dir", "runs", "class_names", "annotation", "split_file"}``; ``annotation`` is the
    labeled set's effort (:func:`~PLBOptCore.convert.sparsify.labeled_effort`) as the newest report
    states it. Raises ``DatasetError`` naming the folder or file at fault.
    """
    out_dir = Path(out_dir)
    reports = sorted((out_dir / "reports").glob("*/results.json"), key=lambda path: path.stat().st_mtime)
    if not reports:
        raise DatasetError(f"{out_dir}: no benchmark reports (reports/*/results.json); "
                           "give a folder written by plbopt bench accuracy")
    runs: Dict[str, Dict[str, Any]] = {}
    newest: Dict[str, Any] = {}
    for path in reports:
        results = read_json(path)
        records = results.get("runs")
        if not isinstance(records, list) or not all(isinstance(r, dict) and "name" in r for r in records):
            raise DatasetError(f"{path}: 'runs' is not a list of run records")
        runs.update({record["name"]: record for record in records if not record.get("noise")})
        newest = results
    class_names = sorted({name for record in runs.values() for name in record.get("dice", {})})
    dataset = newest.get("dataset") if isinstance(newest.get("dataset"), dict) else {}
    return {"dir": str(out_dir), "runs": list(runs.values()), "class_names": class_names,
            "annotation": newest.get("annotation"), "split_file": dataset.get("split_file")}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _reference_group(group: str, preset: str, groups_a: Sequence[str]) -> Optional[str]:
    """The group of A that ``group`` of B is paired with: itself, else its preset's, else none."""
    if group in groups_a:
        return group
    return preset if preset in groups_a else None


def paired_rows(runs_a: Sequence[Dict[str, Any]], runs_b: Sequence[Dict[str, Any]],
                class_names: Sequence[str]) -> List[Dict[str, Any]]:
    """``B − A`` differences of each group of B on the seeds both arms ran.

    Each row: ``group`` (B's), ``reference`` (A's), ``seeds``, ``differences`` (mean Dice per seed),
    the mean Dice statistics (``mean``, ``std``, ``n``), ``min`` (worst seed), ``wins`` (seeds where B
    was better), ``classes`` (organ → statistics of its per-seed Dice differences) and ``subnets``
    (subnet → the same for its mean Dice).
    """
    by_a = {(r["group"], r["seed"]): r for r in runs_a}
    groups_a = sorted({r["group"] for r in runs_a})
    rows = []
    for group in dict.fromkeys(r["group"] for r in runs_b):
        sample = next(r for r in runs_b if r["group"] == group)
        reference = _reference_group(group, sample["preset"], groups_a)
        if reference is None:
            continue
        pairs = [(b, by_a[(reference, b["seed"])]) for b in runs_b
                 if b["group"] == group and (reference, b["seed"]) in by_a
                 and _finite(b.get("mean_dice")) and _finite(by_a[(reference, b["seed"])].get("mean_dice"))]
        if not pairs:
            continue
        pairs.sort(key=lambda pair: pair[0]["seed"])
        differences = [b["mean_dice"] - a["mean_dice"] for b, a in pairs]

        def per_key(field: str, key: str) -> Dict[str, Any]:
            values = [b[field].get(key) - a[field].get(key) for b, a in pairs
                      if _finite(b.get(field, {}).get(key)) and _finite(a.get(field, {}).get(key))]
            return _stats(values)

        subnets = sorted(set(pairs[0][0].get("subnets", {})) & set(pairs[0][1].get("subnets", {})))
        rows.append({"group": group, "reference": reference, "seeds": [b["seed"] for b, _ in pairs],
                     "differences": differences, **_stats(differences), "min": min(differences),
                     "wins": sum(d > 0 for d in differences),
                     "classes": {name: per_key("dice", name) for name in class_names},
                     "subnets": {name: per_key("subnets", name) for name in subnets}})
    return rows


def compare_benches(dir_a: Path, dir_b: Path, name_a: str = "A", name_b: str = "B") -> Dict[str, Any]:
    """Read two benchmark folders and return the comparison :func:`write_comparison` writes."""
    a, b = load_bench(dir_a), load_bench(dir_b)
    if a["class_names"] != b["class_names"]:
        raise DatasetError(f"{dir_b}: its organs {b['class_names']} are not those of {dir_a} {a['class_names']}; "
                           "compare benchmarks of the same dataset")
    class_names = a["class_names"]
    arms = {}
    for name, arm in ((name_a, a), (name_b, b)):
        arms[name] = {"dir": arm["dir"], "split_file": arm["split_file"], "annotation": arm["annotation"],
                      "groups": aggregate(arm["runs"], class_names)}
    return {"arms": arms, "order": [name_a, name_b], "class_names": class_names,
            "paired": paired_rows(a["runs"], b["runs"], class_names)}


def _cell(stats: Dict[str, Any], signed: bool = False) -> str:
    return accuracy_cell(stats, 100, 1, signed=signed)


def render_comparison(comparison: Dict[str, Any]) -> str:
    """The Markdown report of :func:`compare_benches`."""
    name_a, name_b = comparison["order"]
    names = comparison["class_names"]
    lines = [f"# {name_b} against {name_a}: paired by seed", ""]
    for name in (name_a, name_b):
        arm = comparison["arms"][name]
        lines.append(f"- **{name}**: `{arm['dir']}`" + (f", split `{arm['split_file']}`" if arm["split_file"] else ""))
        if arm["annotation"]:
            lines.append(f"  {effort_line(arm['annotation'])}")
    subnets = sorted({s for arm in comparison["arms"].values() for g in arm["groups"].values() for s in g["subnets"]})
    lines += ["", "Dice ×100 on the test cases, mean ± std over seeds; a run is collapsed when the ensemble or a "
              "subnet scores below 60.", "",
              "| Arm | Method | Seeds | Mean Dice | " + " | ".join(names) + " | "
              + " | ".join(f"subnet {s.upper()}" for s in subnets) + " | Collapsed |",
              "|---|---|---|---|" + "---|" * (len(names) + len(subnets)) + "---|"]
    for name in (name_a, name_b):
        for group, stats in comparison["arms"][name]["groups"].items():
            lines.append(f"| {name} | {group} | {stats['n_seeds']} | {_cell(stats['mean_dice'])} | "
                         + " | ".join(_cell(stats["classes"][c]["dice"]) for c in names) + " | "
                         + " | ".join(_cell(stats["subnets"][s]) if s in stats["subnets"] else "–" for s in subnets)
                         + f" | {stats['collapsed']}/{stats['n_seeds']} |")
    rows = comparison["paired"]
    if rows:
        lines += ["", f"Paired differences {name_b} − {name_a}, Dice ×100 on each seed both ran (a variant trained in "
                  f"{name_b} only is paired with its preset in {name_a}); mean ± sample std, the worst seed, and on how "
                  f"many seeds {name_b} was better.", "",
                  "| Comparison | Per seed | Mean ± std | Worst | Better on | " + " | ".join(names) + " |",
                  "|---|---|---|---|---|" + "---|" * len(names)]
        for row in rows:
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in row["differences"])
            lines.append(f"| {name_b} {row['group']} − {name_a} {row['reference']} | {per_seed} | "
                         f"{_cell(row, signed=True)} | {100 * row['min']:+.1f} | {row['wins']}/{len(row['seeds'])} | "
                         + " | ".join(_cell(row["classes"][c], signed=True) for c in names) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: Dict[str, Any], path: Path) -> Path:
    """Per-organ Dice bars (mean ± std over seeds) of every arm and group, side by side."""
    bars = {f"{arm} {group}": stats for arm in comparison["order"]
            for group, stats in comparison["arms"][arm]["groups"].items()}
    name_a, name_b = comparison["order"]
    return plot_dice_bars(bars, list(bars), {}, comparison["class_names"], path, f"{name_b} against {name_a}")


def write_comparison(dir_a: Path, dir_b: Path, out_dir: Path, name_a: str = "A", name_b: str = "B",
                     overwrite: bool = False) -> Tuple[Dict[str, Any], str]:
    """Compare two benchmark folders and write ``OUT/compare.json``, ``OUT/COMPARE.md`` and
    ``OUT/compare.png`` (atomically; existing ones only with ``overwrite``). Returns the comparison
    and the Markdown. Every input is read and checked before anything is written."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    for name in (COMPARE_JSON, COMPARE_MD, COMPARE_PNG):
        check_output_file(out_dir / name, overwrite)
    comparison = compare_benches(Path(dir_a), Path(dir_b), name_a, name_b)
    markdown = render_comparison(comparison)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / COMPARE_JSON, comparison)
    with atomic_write(out_dir / COMPARE_MD) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    plot_comparison(comparison, out_dir / COMPARE_PNG)
    return comparison, markdown
