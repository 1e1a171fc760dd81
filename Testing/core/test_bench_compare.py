"""``plbopt bench compare``: two accuracy-benchmark folders paired by group and seed (issue 23's
equal-effort comparison), on hand-written reports whose differences are known."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from PLBOptCore.bench.compare import COMPARE_JSON, COMPARE_MD, COMPARE_PNG, compare_benches
from PLBOptCore.cli import main


def _record(group: str, seed: int, liver: float, spleen: float, subnets=None, preset=None, variant=None) -> dict:
    mean = (liver + spleen) / 2
    return {"name": f"{group}-seed{seed}", "group": group, "preset": preset or group, "seed": seed,
            "variant": variant or {}, "noise": None, "mean_dice": mean, "mean_asd": 1.0,
            "dice": {"liver": liver, "spleen": spleen}, "asd": {"liver": 1.0, "spleen": 1.0},
            "subnets": subnets if subnets is not None else {"a": mean}, "seconds": {"train": 10.0}}


def _bench(root: Path, reports: dict, slices: int, mtimes=None) -> Path:
    """A benchmark folder with one ``reports/<name>/results.json`` per entry of ``reports``."""
    for index, (name, runs) in enumerate(reports.items()):
        path = root / "reports" / name / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"runs": runs, "dataset": {"split_file": f"{root.name}.json"},
                                    "annotation": {"cases": 2, "axis": "z", "slices": slices, "slices_total": 96,
                                                   "foreground_slices": slices, "sparse_cases": 0,
                                                   "voxel_fraction": 1.0}}))
        os.utime(path, (1000 + index, 1000 + index))  # written in this order
    return root


@pytest.fixture
def arms(tmp_path):
    whole = _bench(tmp_path / "whole", {"main": [
        _record("dhc", 0, 0.80, 0.60, {"a": 0.70, "b": 0.60}), _record("dhc", 1, 0.70, 0.70, {"a": 0.70, "b": 0.50}),
        _record("supervised", 0, 0.50, 0.50)]}, slices=96)
    sparse = _bench(tmp_path / "sparse", {
        "old": [_record("dhc", 0, 0.10, 0.10, {"a": 0.1, "b": 0.1})],  # superseded by the newer report
        "main": [_record("dhc", 0, 0.90, 0.70, {"a": 0.80, "b": 0.70}),
                 _record("dhc", 1, 0.60, 0.70, {"a": 0.60, "b": 0.60}),
                 _record("dhc", 2, 0.99, 0.99, {"a": 0.99, "b": 0.99})],  # no partner in the whole arm
        "variant": [_record("dhc_set-sparse_as_unlabeled=true", 0, 0.85, 0.65, {"a": 0.75, "b": 0.65}, preset="dhc",
                            variant={"sparse_as_unlabeled": True})]}, slices=96)
    return whole, sparse


def test_runs_are_paired_by_group_and_seed_and_a_variant_with_its_preset(arms):
    comparison = compare_benches(*arms, "whole2", "sparse8x4")
    rows = {row["group"]: row for row in comparison["paired"]}
    assert set(rows) == {"dhc", "dhc_set-sparse_as_unlabeled=true"}  # supervised ran in one arm only
    dhc = rows["dhc"]
    assert dhc["reference"] == "dhc" and dhc["seeds"] == [0, 1]  # seed 2 has no partner
    # seed 0: (0.9+0.7)/2 - (0.8+0.6)/2 = +0.1; seed 1: (0.6+0.7)/2 - 0.7 = -0.05
    assert dhc["differences"] == pytest.approx([0.10, -0.05])
    assert dhc["mean"] == pytest.approx(0.025) and dhc["min"] == pytest.approx(-0.05) and dhc["wins"] == 1
    assert dhc["std"] == pytest.approx(0.15 / 2 ** 0.5)
    assert dhc["classes"]["liver"]["mean"] == pytest.approx((0.10 - 0.10) / 2)
    assert dhc["classes"]["spleen"]["mean"] == pytest.approx((0.10 + 0.00) / 2)
    assert dhc["subnets"]["b"]["mean"] == pytest.approx((0.10 + 0.10) / 2)
    variant = rows["dhc_set-sparse_as_unlabeled=true"]
    assert variant["reference"] == "dhc" and variant["differences"] == pytest.approx([0.05])
    # the sparse arm's aggregate holds the newer report's seed 0, not the superseded one
    sparse_dhc = comparison["arms"]["sparse8x4"]["groups"]["dhc"]
    assert sparse_dhc["seeds"] == [0, 1, 2] and sparse_dhc["classes"]["liver"]["dice"]["mean"] == pytest.approx(
        (0.90 + 0.60 + 0.99) / 3)


def test_the_command_writes_the_report_and_never_overwrites_it_unasked(arms, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["bench", "compare", *map(str, arms), "-o", str(out), "--names", "whole2,sparse8x4"]) == 0
    printed = capsys.readouterr().out
    assert "| sparse8x4 dhc − whole2 dhc | +10.0, -5.0 | +2.5 ± 10.6 | -5.0 | 1/2 |" in printed
    assert "**96 annotated slices**" in printed
    assert json.loads((out / COMPARE_JSON).read_text())["order"] == ["whole2", "sparse8x4"]
    assert (out / COMPARE_PNG).read_bytes()[:4] == b"\x89PNG"
    before = (out / COMPARE_MD).read_text()
    assert main(["bench", "compare", *map(str, arms), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / COMPARE_MD).read_text() == before
    assert main(["bench", "compare", *map(str, arms), "-o", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("problem", ["no reports", "not json", "other organs", "names"])
def test_bad_input_is_one_line_before_anything_is_written(arms, tmp_path, capsys, problem):
    whole, sparse = arms
    names = "whole2,sparse8x4"
    if problem == "no reports":
        sparse = tmp_path / "empty"
        sparse.mkdir()
    elif problem == "not json":
        (sparse / "reports" / "main" / "results.json").write_text("{")
    elif problem == "other organs":
        _bench(tmp_path / "other", {"main": [{**_record("dhc", 0, 0.5, 0.5), "dice": {"aorta": 0.5}}]}, slices=9)
        sparse = tmp_path / "other"
    else:
        names = "same,same"
    out = tmp_path / "cmp"
    assert main(["bench", "compare", str(whole), str(sparse), "-o", str(out), "--names", names]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("plbopt: error:")
    assert not out.exists()
