"""Accuracy benchmark (``plbopt bench accuracy``) on a tiny phantom: outputs, report and resumability."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PLBOptCore.api import train
from PLBOptCore.bench.accuracy import (METRICS_FILE, REPORT_NAME_MAX, RunSpec, aggregate, base_overrides, plan_runs,
                                       postprocessed_section, pseudo_labels_section, refined_section, report_name,
                                       run_accuracy_bench)
from PLBOptCore.convert import apply_labeled_ratio, unlabeled_with_labels
from PLBOptCore.data.phantom import LABELS, make_phantom_dataset
from PLBOptCore.engine.events import read_events
from PLBOptCore.metrics import dice
from PLBOptCore.errors import ConfigError, TrainingInterrupted

# Smallest network and patch the VNet accepts, so two trainings + predictions take seconds on CPU.
TINY = dict(patch_size=(16, 32, 32), base_filters=4, batch_size=1, log_every=1, checkpoint_every=1,
            triplet_max_anchors=32, triplet_max_candidates=256, triplet_capacity=64, superpixel_divisor=20)
CLASSES = [name for label, name in sorted(LABELS.items()) if label > 0]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Run the bench once (supervised + dhc, 1 seed, 2 steps) and keep the first result for every test."""
    root = tmp_path_factory.mktemp("bench")
    dataset = make_phantom_dataset(root / "data", n_labeled=2, n_unlabeled=2, n_test=1, n_validation=0, shape=(24, 48, 48))
    out = root / "out"
    results = run_accuracy_bench(dataset, out, presets=["supervised", "dhc"], seeds=1, iterations=2, small=True,
                                 device="cpu", extra_overrides=TINY)
    return dataset, out, results


def test_results_json_structure(bench):
    _, out, results = bench
    stored = json.loads((out / results["report_dir"] / "results.json").read_text())
    assert stored["tables"]["main"] == [{"group": "supervised", "label": "Supervised only (VNet)"},
                                        {"group": "dhc", "label": "Baseline (DHC)"}]
    assert stored["dataset"] == {"path": stored["dataset"]["path"], "split_file": None, "split": None, "n_labeled": 2, "n_unlabeled": 2,
                                 "n_validation": 0, "n_test": 1, "classes": CLASSES}
    assert stored["this_call"]["trained"] == ["supervised-seed0", "dhc-seed0"]
    assert stored["hardware"]["cpu_count"] >= 1 and stored["total_seconds"] > 0
    assert stored["command"].startswith("plbopt bench accuracy ")
    runs = {r["name"]: r for r in stored["runs"]}
    assert set(runs) == {"supervised-seed0", "dhc-seed0"}
    for record in runs.values():
        assert set(record["dice"]) == set(CLASSES) and set(record["asd"]) == set(CLASSES)
        assert 0.0 <= record["mean_dice"] <= 1.0
        assert record["overrides"]["iterations"] == 2 and record["overrides"]["base_filters"] == 4
        assert record["seconds"]["train"] > 0 and record["seconds"]["predict"] > 0
        assert (out / record["run_dir"] / "checkpoints" / "best.pt").is_file()
    # each subnet scored on its own: both of the dual run, the single network of the supervised run
    assert set(runs["dhc-seed0"]["subnets"]) == {"a", "b"} and set(runs["supervised-seed0"]["subnets"]) == {"a"}
    assert runs["supervised-seed0"]["subnets"]["a"] == runs["supervised-seed0"]["mean_dice"]
    assert (out / runs["dhc-seed0"]["run_dir"] / "predictions-b").is_dir()
    pair = stored["paired"][0]
    assert (pair["better"], pair["reference"], pair["seeds"]) == ("dhc", "supervised", [0])
    assert pair["differences"][0] == pytest.approx(runs["dhc-seed0"]["mean_dice"] - runs["supervised-seed0"]["mean_dice"])
    for group in ("supervised", "dhc"):
        entry = stored["aggregates"][group]
        assert entry["n_seeds"] == 1 and entry["mean_dice"]["std"] is None  # no spread from one seed
        assert entry["mean_dice"]["mean"] == pytest.approx(runs[f"{group}-seed0"]["mean_dice"])
        assert set(entry["classes"]) == set(CLASSES)
    # the returned dict is what was written (up to NaN -> null)
    assert results["aggregates"].keys() == stored["aggregates"].keys()


def test_results_markdown_and_plots(bench):
    _, out, results = bench
    report = out / results["report_dir"]
    markdown = (report / "RESULTS.md").read_text()
    assert "| Method | Avg. Dice ↑ | Avg. ASD ↓ | " + " | ".join(CLASSES) + " |" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| Supervised only") or line.startswith("| Baseline (DHC)")]
    assert len(rows) == 4  # the main table, then the per-subnet table
    assert rows[3].endswith(" | 1/1 |") or rows[3].endswith(" | 0/1 |")  # collapse count of the one seed
    assert results["command"] in markdown and "CPUs" in markdown
    assert "labeled ratio 2/4 = 50 %" in markdown
    assert "## Each subnet on its own" in markdown and "## Paired differences" in markdown
    assert "| dhc − supervised |" in markdown
    assert set(results["plots"]) == {"main", "training_curves"}
    for relative in results["plots"].values():
        path = report / relative
        assert path.suffix == ".png" and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_call_skips_finished_runs(bench, caplog):
    caplog.set_level(logging.INFO, logger="PLBOptCore")
    dataset, out, first = bench
    metrics = {name: out / "runs" / name / METRICS_FILE for name in ("supervised-seed0", "dhc-seed0")}
    checkpoints = {name: out / "runs" / name / "checkpoints" / "last.pt" for name in metrics}
    before = {p: p.stat().st_mtime_ns for p in [*metrics.values(), *checkpoints.values()]}
    again = run_accuracy_bench(dataset, out, presets=["supervised", "dhc"], seeds=1, iterations=2, small=True,
                               device="cpu", extra_overrides=TINY)
    assert again["this_call"]["skipped"] == ["supervised-seed0", "dhc-seed0"]
    assert again["this_call"]["trained"] == [] and again["this_call"]["failed"] == []
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "supervised-seed0: skipped" in caplog.text
    assert again["aggregates"]["dhc"]["mean_dice"] == first["aggregates"]["dhc"]["mean_dice"]


def test_partial_training_is_resumed(bench, tmp_path):
    dataset, _, _ = bench
    run_dir = tmp_path / "runs" / "supervised-seed0"
    polls = iter([False, True])  # stop at the second step boundary: one step done, checkpoint written
    with pytest.raises(TrainingInterrupted):
        train(dataset, run_dir, preset="supervised", overrides=dict(base_overrides(2, True, "cpu", TINY), seed=0),
              should_stop=lambda: next(polls))
    results = run_accuracy_bench(dataset, tmp_path, presets=["supervised"], seeds=1, iterations=2, device="cpu",
                                 extra_overrides=TINY)
    assert results["this_call"]["resumed"] == ["supervised-seed0"]
    starts = [e["start_step"] for e in read_events(run_dir) if e["type"] == "start"]
    assert starts == [0, 1]


def test_a_config_file_sets_the_budget_and_explicit_flags_win_over_it(bench, tmp_path):
    dataset, _, _ = bench
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text("iterations: 2\ndevice: cpu\nbase_filters: 4\n")
    out = tmp_path / "out"
    results = run_accuracy_bench(dataset, out, presets=["supervised"], seeds=1, small=True,
                                 extra_overrides=TINY, config_file=config_file)
    assert (results["settings"]["iterations"], results["settings"]["device"]) == (2, "cpu")
    assert "--iterations 2" in results["command"]
    trained = json.loads((out / "runs" / "supervised-seed0" / "config.json").read_text())
    assert trained["iterations"] == 2
    # --iterations 3 beside the file's 2: the flag wins, so the 2-step run is other settings
    with pytest.raises(ConfigError, match="other settings"):
        run_accuracy_bench(dataset, out, presets=["supervised"], seeds=1, iterations=3, small=True,
                           extra_overrides=TINY, config_file=config_file)
    if not torch.cuda.is_available():  # a GPU recipe here: refused before the bench folder exists
        config_file.write_text("device: cuda\n")
        with pytest.raises(ConfigError, match="cuda"):
            run_accuracy_bench(dataset, tmp_path / "gpu", presets=["supervised"], seeds=1, config_file=config_file)
        assert not (tmp_path / "gpu").exists()


def test_other_settings_in_same_folder_are_refused(bench):
    dataset, out, _ = bench
    with pytest.raises(ConfigError, match="other settings"):
        run_accuracy_bench(dataset, out, presets=["dhc"], seeds=1, iterations=3, small=True, device="cpu",
                           extra_overrides=TINY)


def test_a_run_older_than_a_learning_key_is_not_reused_as_todays_settings(bench):
    """Its config.json lacks class_weight_floor: it trained with 0, while the key's default is 1 now."""
    dataset, out, _ = bench
    stored = out / "runs" / "dhc-seed0" / "config.json"
    settings = json.loads(stored.read_text())
    original = stored.read_text()
    stored.write_text(json.dumps({k: v for k, v in settings.items() if k != "class_weight_floor"}))
    try:
        with pytest.raises(ConfigError, match="dhc-seed0/config.json: written by an older PLBOpt, it lacks "
                                              "class_weight_floor,"):
            run_accuracy_bench(dataset, out, presets=["dhc"], seeds=1, iterations=2, small=True, device="cpu",
                               extra_overrides=TINY)
    finally:  # the other tests share this bench folder
        stored.write_text(original)


def test_a_setting_that_a_switch_left_off_does_not_stop_reuse(bench):
    """refine_homogeneity changes nothing in a DHC run (refine off): a run that stored another value
    is the same experiment; a switch that differs is not."""
    dataset, out, _ = bench
    stored = out / "runs" / "dhc-seed0" / "config.json"
    original = stored.read_text()
    settings = json.loads(original)
    try:
        stored.write_text(json.dumps({**settings, "refine_homogeneity": 0.7}))
        results = run_accuracy_bench(dataset, out, presets=["dhc"], seeds=1, iterations=2, small=True, device="cpu",
                                     extra_overrides=TINY)
        assert results["this_call"]["skipped"] == ["dhc-seed0"]
        stored.write_text(json.dumps({**settings, "refine": True}))
        with pytest.raises(ConfigError, match=r"other settings \(refine: True there, False now\)"):
            run_accuracy_bench(dataset, out, presets=["dhc"], seeds=1, iterations=2, small=True, device="cpu",
                               extra_overrides=TINY)
    finally:  # the other tests share this bench folder
        stored.write_text(original)


def test_plan_variants_reuse_the_main_run():
    base = base_overrides(300, True, "cpu", None)
    units, tables = plan_runs(["dhc", "plbopt"], 2, ["superpixel-methods", "superpixel-number", "noise"], base)
    names = [u.name for u in units]
    assert len(names) == len(set(names))
    # SLIC and H*W/50 are the plbopt preset's own settings: the main run, not a second training
    assert "plbopt[superpixel_method=slic]-seed0" not in names
    assert "plbopt[superpixel_method=quickshift]-seed1" in names
    assert "plbopt[superpixel_area_mm2=22.5]-seed0" in names
    assert [r["label"] for r in tables["superpixel-methods"]] == [
        "Baseline (DHC)", "Compact Watershed", "Felzenszwalb", "Quickshift", "SLIC"]
    assert {"group": "plbopt", "label": "112.5 mm² (H×W/50 at 1.5 mm)"} in tables["superpixel-number"]
    noise = [u for u in units if u.noise]
    assert {u.run_name for u in noise} == {"dhc-seed0", "dhc-seed1", "plbopt-seed0", "plbopt-seed1"}
    with pytest.raises(ConfigError, match="unknown variant"):
        plan_runs(["dhc"], 1, ["colour-jitter"], base)
    with pytest.raises(ConfigError):
        plan_runs(["no-such-preset"], 1, [], base)


def test_plan_settings_variants_of_every_preset():
    base = base_overrides(300, True, "cpu", None)
    units, tables = plan_runs(["dhc", "plbopt"], 2, [], base,
                              [{"lambda_mc": 0.3}, {"triplet_mining": "paper"}, {"class_weight_floor": 0.0}])
    names = [u.name for u in units]
    # trainings seed-major: the presets' own runs, then the variants
    assert names[:2] == ["dhc-seed0", "plbopt-seed0"] and "plbopt[lambda_mc=0.3]-seed1" in names
    # a setting equal to the preset's own value (both mine as eq. 5-6) is that preset's run
    assert not any("triplet_mining" in name for name in names)
    # a setting the preset switches off (dhc has no mutual correction) trains nothing
    assert "dhc[lambda_mc=0.3]-seed0" not in names and "dhc[class_weight_floor=0.0]-seed1" in names
    assert [r["group"] for r in tables["settings"]] == ["dhc", "dhc[class_weight_floor=0.0]", "plbopt",
                                                        "plbopt[lambda_mc=0.3]", "plbopt[class_weight_floor=0.0]"]
    assert tables["settings"][3]["label"] == "Full (PLBOpt) (lambda_mc=0.3)"
    with pytest.raises(ConfigError):
        plan_runs(["dhc"], 1, [], base, [{"lambda_mc": -1.0}])


def test_set_trains_a_variant_and_pairs_it_with_the_preset(bench, tmp_path):
    dataset, out, first = bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    first_report = (copy / first["report_dir"] / "RESULTS.md").read_bytes()
    results = run_accuracy_bench(dataset, copy, presets=["dhc"], seeds=1, iterations=2, small=True, device="cpu",
                                 extra_overrides=TINY, settings=[{"cps_weight": 0.2}])
    # its own report beside the first call's, which stays as it was; the index lists both
    assert results["report_dir"] == "reports/dhc_set-cps_weight=0.2" and first["report_dir"] == "reports/supervised+dhc"
    assert (copy / first["report_dir"] / "RESULTS.md").read_bytes() == first_report
    index = (copy / "RESULTS.md").read_text()
    assert "(reports/dhc_set-cps_weight=0.2/RESULTS.md)" in index and "(reports/supervised+dhc/RESULTS.md)" in index
    assert results["this_call"]["skipped"] == ["dhc-seed0"] and results["this_call"]["trained"] == ["dhc[cps_weight=0.2]-seed0"]
    runs = {r["name"]: r["mean_dice"] for r in results["runs"]}
    pair = [row for row in results["paired"] if row["better"] == "dhc[cps_weight=0.2]"]
    assert pair and pair[0]["reference"] == "dhc" and pair[0]["differences"] == pytest.approx(
        [runs["dhc[cps_weight=0.2]-seed0"] - runs["dhc-seed0"]])
    assert results["command"].endswith("--set cps_weight=0.2 --device cpu")
    markdown = (copy / results["report_dir"] / "RESULTS.md").read_text()
    assert "Settings against each preset's default" in markdown and "| dhc[cps_weight=0.2] − dhc |" in markdown


def test_a_split_without_unlabeled_cases_leaves_out_the_runs_that_need_them(tmp_path):
    # a floor or ceiling split (Resources/splits/*-labeled-only.json, *-all-labeled.json)
    dataset = make_phantom_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=0, n_test=1, n_validation=0,
                                   shape=(24, 48, 48))
    with pytest.raises(ConfigError, match="lists no unlabeled cases, which dhc, plbopt train on"):
        run_accuracy_bench(dataset, tmp_path / "refused", presets=["dhc", "plbopt"], seeds=1, iterations=2,
                           small=True, device="cpu", extra_overrides=TINY)
    assert not (tmp_path / "refused").exists()
    results = run_accuracy_bench(dataset, tmp_path / "out", presets=["dhc"], seeds=1, iterations=2, small=True,
                                 device="cpu", extra_overrides=TINY, settings=[{"cps_weight": 0}])
    assert results["not_run"] == {"dhc": "needs unlabeled cases; this dataset has none"}
    assert results["this_call"]["trained"] == ["dhc[cps_weight=0]-seed0"] and not results["failures"]
    assert not (tmp_path / "out" / "runs" / "dhc-seed0").exists()
    markdown = (tmp_path / "out" / results["report_dir"] / "RESULTS.md").read_text()
    assert "- Not run: dhc (needs unlabeled cases; this dataset has none)" in markdown
    assert "Failed runs" not in markdown


def test_the_command_exits_1_naming_the_runs_that_failed(bench, tmp_path, monkeypatch, capsys):
    import PLBOptCore.bench.accuracy as accuracy
    from PLBOptCore.cli import main

    def diverge(*args, **kwargs):
        raise RuntimeError("loss is NaN")

    monkeypatch.setattr(accuracy, "train", diverge)
    dataset, _, _ = bench
    code = main(["bench", "accuracy", str(dataset), "-o", str(tmp_path / "out"), "--presets", "supervised",
                 "--seeds", "1", "--iterations", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "plbopt: 1 run(s) failed: supervised-seed0" in err
    markdown = (tmp_path / "out" / "reports" / "supervised" / "RESULTS.md").read_text()
    assert "- supervised-seed0: RuntimeError: loss is NaN" in markdown


def test_last_checkpoint_is_scored_apart_without_training(bench, tmp_path):
    dataset, out, first = bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    results = run_accuracy_bench(dataset, copy, presets=["supervised", "dhc"], seeds=1, iterations=2, small=True,
                                 device="cpu", extra_overrides=TINY, checkpoint="last")
    assert results["this_call"]["evaluated"] == ["supervised-seed0", "dhc-seed0"] and not results["this_call"]["trained"]
    record = json.loads((copy / "runs" / "dhc-seed0" / "checkpoint-last" / METRICS_FILE).read_text())
    assert record["checkpoint"] == "last" and (copy / "runs" / "dhc-seed0" / "checkpoint-last" / "predictions-b").is_dir()
    # the best checkpoint's metrics are untouched; without validation cases best.pt is the final weights
    best = json.loads((copy / "runs" / "dhc-seed0" / METRICS_FILE).read_text())
    assert best["checkpoint"] == "best"
    assert record["mean_dice"] == pytest.approx(best["mean_dice"])
    assert "--checkpoint last" in results["command"]
    assert "`last.pt`" in (copy / results["report_dir"] / "RESULTS.md").read_text()
    with pytest.raises(ConfigError, match="checkpoint"):
        run_accuracy_bench(dataset, copy, presets=["dhc"], seeds=1, iterations=2, checkpoint="final")


def test_a_refining_preset_is_also_scored_refined(bench, tmp_path):
    dataset, out, first = bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    results = run_accuracy_bench(dataset, copy, presets=["plbopt"], seeds=1, iterations=2, small=True, device="cpu",
                                 extra_overrides=TINY)
    record = results["runs"][0]
    assert set(record["refined"]) == {"mean_dice", "dice"} and set(record["refined"]["dice"]) == set(CLASSES)
    assert len(list((copy / record["run_dir"] / "predictions-refined").glob("*[0-9].nii.gz"))) == 1
    assert "## Refined predictions (`plbopt refine`)" in (copy / results["report_dir"] / "RESULTS.md").read_text()
    assert all(r["refined"] is None for r in first["runs"])  # supervised and dhc do not refine


def test_refined_section_pairs_each_run_with_itself():
    def run(seed, dice, refined):
        return {"group": "plbopt", "seed": seed, "noise": None, "mean_dice": dice, "dice": {"liver": dice},
                "refined": {"mean_dice": refined, "dice": {"liver": refined}}}
    results = {"dataset": {"classes": ["liver"]}, "runs": [run(0, 0.80, 0.81), run(1, 0.70, 0.69), run(2, 0.75, 0.78)]}
    row = [line for line in refined_section(results) if line.startswith("| plbopt |")]
    # +1, -1, +3 points: mean +1.00, sample std 2.00, better on 2 of 3
    assert row == ["| plbopt | +1.00 ± 2.00 | 2/3 | +1.00 ± 2.00 |"]


def test_every_run_is_also_scored_postprocessed_as_predict_writes_by_default(bench):
    _, out, results = bench
    for record in results["runs"]:
        # no validation cases here: nothing measured, nothing chosen, the same labels scored again
        assert record["postprocessed"]["classes"] == []
        assert record["postprocessed"]["mean_dice"] == pytest.approx(record["mean_dice"])
        assert set(record["postprocessed"]["dice"]) == set(CLASSES)
        folder = out / record["run_dir"] / "predictions-postprocessed"
        assert len(list(folder.glob("*[0-9].nii.gz"))) == 1
        # written by predict's own path, so with the confidence map predict writes beside each label map
        assert [p.name for p in (folder / "confidence").iterdir()] == [p.name for p in folder.glob("*[0-9].nii.gz")]
    assert "## Postprocessed predictions (largest component)" in (out / results["report_dir"] / "RESULTS.md").read_text()


def test_postprocessed_section_pairs_each_run_with_itself_and_compares_presets_after_it():
    def run(group, seed, dice, post, chosen):
        return {"group": group, "preset": group, "variant": {}, "seed": seed, "noise": None, "mean_dice": dice,
                "dice": {"liver": dice}, "postprocessed": {"mean_dice": post, "dice": {"liver": post},
                                                           "classes": ["liver"] if chosen else []}}
    results = {"dataset": {"classes": ["liver"]},
               "runs": [run("dhc", 0, 0.80, 0.84, True), run("dhc", 1, 0.70, 0.70, False),
                        run("plbopt", 0, 0.82, 0.83, True), run("plbopt", 1, 0.71, 0.74, True)]}
    lines = postprocessed_section(results)
    # dhc: +4, 0 -> +2.0 ± 2.8, better on 1 of 2, liver chosen by 1 of 2 runs
    assert "| dhc | 77.0 ± 9.9 | +2.0 ± 2.8 | 1/2 | +2.0 ± 2.8 (1/2) |" in lines
    assert "| plbopt | 78.5 ± 6.4 | +2.0 ± 1.4 | 2/2 | +2.0 ± 1.4 (2/2) |" in lines
    # after postprocessing plbopt − dhc is -1 and +4 points
    assert "| plbopt − dhc | -1.0, +4.0 | +1.5 ± 3.5 | -1.0 | 1/2 |" in lines


def test_report_name_says_what_a_call_compares():
    assert report_name(["supervised", "dhc", "plbopt"]) == "supervised+dhc+plbopt"
    assert report_name(["plbopt"], ["noise"], [{"lambda_mc": 0.3}, {"triplet_capacity": 1024}], "last") == (
        "plbopt_variants-noise_set-lambda_mc=0.3_set-triplet_capacity=1024_last")
    # values a file system may refuse become _; lists keep the --set spelling otherwise
    assert report_name(["dhc"], settings=[{"patch_size": [16, 32, 32], "superpixel_method": "a/b"}]) == (
        "dhc_set-patch_size=[16,32,32],superpixel_method=a_b")
    long_a = report_name(["plbopt"], settings=[{"triplet_capacity": 1}] * 20)
    long_b = report_name(["plbopt"], settings=[{"triplet_capacity": 1}] * 21)
    assert len(long_a) == len(long_b) == REPORT_NAME_MAX and long_a != long_b


def test_aggregate_mean_and_sample_std():
    records = [{"group": "g", "preset": "dhc", "variant": {}, "noise": None, "seed": s, "mean_dice": d,
                "mean_asd": a, "dice": {"liver": d}, "asd": {"liver": a}, "seconds": {"train": 1.0},
                "subnets": {"a": d, "b": 0.59}}
               for s, (d, a) in enumerate([(0.5, 2.0), (0.7, None)])]
    entry = aggregate(records, ["liver"])["g"]
    assert entry["mean_dice"]["mean"] == pytest.approx(0.6)
    assert entry["mean_dice"]["std"] == pytest.approx(0.1414213, rel=1e-5)  # ddof=1
    assert entry["mean_asd"] == {"mean": 2.0, "std": None, "n": 1}  # undefined distances left out
    assert entry["subnets"]["b"]["mean"] == pytest.approx(0.59) and entry["collapsed"] == 2  # B < 0.60 twice
    assert RunSpec("plbopt", 1, (("superpixel_method", "quickshift"),), "weak").name == \
        "plbopt[superpixel_method=quickshift][noise=weak]-seed1"


@pytest.fixture(scope="module")
def bench_with_labels_aside(bench, tmp_path_factory):
    """The bench's phantom re-split with one of its two labeled cases unlabeled, its label kept aside
    (splits.json), benchmarked with supervised + dhc, 1 seed, 2 steps."""
    dataset, _, _ = bench
    root = tmp_path_factory.mktemp("aside")
    resplit = apply_labeled_ratio(dataset, 1, seed=0, out_dir=root / "data")
    results = run_accuracy_bench(resplit, root / "out", presets=["supervised", "dhc"], seeds=1, iterations=2,
                                 small=True, device="cpu", extra_overrides=TINY)
    return resplit, root / "out", results


def _class_mean_dice(prediction: Path, label: Path) -> float:
    """Mean Dice over the phantom's classes of one case, both-empty counting as 1 (the bench's convention)."""
    pred, gt = (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in (prediction, label))
    return float(np.mean([dice(pred == c, gt == c) for c in range(1, len(CLASSES) + 1)]))


def test_the_pseudo_labels_of_the_unlabeled_cases_are_scored_against_the_labels_kept_aside(bench_with_labels_aside):
    dataset, out, results = bench_with_labels_aside
    (kept,) = unlabeled_with_labels(dataset)
    for record in results["runs"]:
        scores = record["pseudo_labels"]
        assert scores["cases"] == 1 and set(scores) == {"cases", "network", "postprocessed", "handed_back", "seconds"}
        assert scores["seconds"]["predict"] > 0  # both readings from one pass of each subnet
        run_dir = out / record["run_dir"]
        for key, folder in (("network", "predictions-unlabeled"), ("postprocessed", "predictions-unlabeled-postprocessed"),
                            ("handed_back", "predictions-pseudo-labels")):
            predicted = run_dir / folder / f"{kept.name}.nii.gz"
            assert sorted(p.name for p in (run_dir / folder).glob("*[0-9].nii.gz")) == [predicted.name]
            assert scores[key]["mean_dice"] == pytest.approx(_class_mean_dice(predicted, kept.label))
            assert set(scores[key]["dice"]) == set(CLASSES)
        # what is handed back comes with the confidence map the Slicer review shows
        assert (run_dir / "predictions-pseudo-labels" / "confidence" / f"{kept.name}.nii.gz").is_file()
    markdown = (out / results["report_dir"] / "RESULTS.md").read_text()
    assert "## Pseudo labels of the unlabeled cases" in markdown and "The 1 unlabeled training cases" in markdown


def test_a_dataset_without_labels_aside_scores_no_pseudo_labels(bench):
    _, out, results = bench
    assert all(record["pseudo_labels"] is None for record in results["runs"])
    assert not (out / "runs" / "dhc-seed0" / "predictions-unlabeled").exists()
    assert "## Pseudo labels" not in (out / results["report_dir"] / "RESULTS.md").read_text()


def test_a_record_from_before_the_pseudo_labels_were_scored_gets_them_without_training(bench_with_labels_aside, tmp_path):
    dataset, out, first = bench_with_labels_aside
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    metrics = copy / "runs" / "dhc-seed0" / METRICS_FILE
    older = json.loads(metrics.read_text())
    del older["pseudo_labels"]
    metrics.write_text(json.dumps(older))
    checkpoint = copy / "runs" / "dhc-seed0" / "checkpoints" / "last.pt"
    trained_at = checkpoint.stat().st_mtime_ns
    results = run_accuracy_bench(dataset, copy, presets=["supervised", "dhc"], seeds=1, iterations=2, small=True,
                                 device="cpu", extra_overrides=TINY)
    assert results["this_call"]["evaluated"] == ["dhc-seed0"] and results["this_call"]["skipped"] == ["supervised-seed0"]
    assert checkpoint.stat().st_mtime_ns == trained_at
    again = json.loads(metrics.read_text())["pseudo_labels"]
    assert again["network"]["mean_dice"] == pytest.approx(first["runs"][1]["pseudo_labels"]["network"]["mean_dice"])


def test_pseudo_labels_section_per_method_and_paired_by_seed():
    def run(group, seed, network, postprocessed, handed_back):
        scores = {"network": network, "postprocessed": postprocessed, "handed_back": handed_back}
        return {"group": group, "preset": group, "variant": {}, "seed": seed, "noise": None,
                "pseudo_labels": {"cases": 6, **{key: {"mean_dice": value, "dice": {"liver": value}}
                                                 for key, value in scores.items()}}}
    results = {"dataset": {"classes": ["liver"]},
               "runs": [run("supervised", 0, 0.60, 0.61, 0.62), run("supervised", 1, 0.70, 0.70, 0.70),
                        run("dhc", 0, 0.66, 0.68, 0.70), run("dhc", 1, 0.72, 0.72, 0.71)]}
    lines = pseudo_labels_section(results)
    assert "The 6 unlabeled training cases" in lines[2]
    # supervised: network 60, 70 -> 65.0 ± 7.1; postprocessed 61, 70 -> 65.5 ± 6.4; handed back 62, 70 -> 66.0 ± 5.7
    assert "| supervised | 65.0 ± 7.1 | 65.5 ± 6.4 | 66.0 ± 5.7 | 66.0 ± 5.7 |" in lines
    assert "| dhc | 69.0 ± 4.2 | 70.0 ± 2.8 | 70.5 ± 0.7 | 70.5 ± 0.7 |" in lines
    # dhc − supervised: handed back +8, +1; postprocessed +7, +2; the network's labels +6, +2
    handed_back, postprocessed, network = (lines.index(f"Paired differences on the unlabeled cases, {what}:")
                                           for what in ("handed back", "postprocessed", "the network's labels"))
    assert lines[handed_back + 4] == "| dhc − supervised | +8.0, +1.0 | +4.5 ± 4.9 | +1.0 | 2/2 |"
    assert lines[postprocessed + 4] == "| dhc − supervised | +7.0, +2.0 | +4.5 ± 3.5 | +2.0 | 2/2 |"
    assert lines[network + 4] == "| dhc − supervised | +6.0, +2.0 | +4.0 ± 2.8 | +2.0 | 2/2 |"


def test_the_record_names_the_kind_of_processor(tmp_path):
    # same code, seed and threads give other numbers on another processor: the record must say which
    from PLBOptCore.bench.accuracy import cpu_text
    from PLBOptCore.utils import cpu_identity

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: sse2 avx2 fma\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: sse2 avx2 fma\n")
    identity = cpu_identity(cpuinfo)
    assert identity["cpu_model"] == "AMD EPYC 9R14"
    assert identity["cpu_flags_digest"] == hashlib.sha256(b"avx2 fma sse2").hexdigest()[:12]  # sorted flags
    assert identity["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu_text(identity) == f", CPU AMD EPYC 9R14 ({identity['cpu_capability']}, flags {identity['cpu_flags_digest']})"
    assert cpu_identity(tmp_path / "absent")["cpu_flags_digest"] is None
    assert cpu_text({"cpu_count": 2}) == ""  # a record from before these fields


def test_each_run_records_the_threads_and_processor_it_trained_on(bench):
    _, out, results = bench
    for record in results["runs"]:
        (setup,) = record["trained_on"]
        assert setup["torch_threads"] == torch.get_num_threads() and setup["torch"] == torch.__version__
        assert setup["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        start = next(e for e in read_events(out / record["run_dir"]) if e["type"] == "start")
        assert start["setup"] == setup  # the trainer's own record, not the scoring call's
    markdown = (out / results["report_dir"] / "RESULTS.md").read_text()
    assert f"- Trained with: {torch.get_num_threads()} torch thread" in markdown


def test_runs_trained_on_different_setups_are_named_in_the_report(tmp_path):
    from PLBOptCore.bench.accuracy import setup_line, training_setups

    one = {"torch_threads": 1, "cpu_model": "AMD EPYC", "cpu_capability": "AVX512", "cpu_flags_digest": "0a1b",
           "torch": "2.13.0+cpu"}
    two = {**one, "torch_threads": 2}
    run = tmp_path / "run"
    run.mkdir()
    # a run resumed with another thread count trained on both
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (
        {"type": "start", "time": 1.0, "setup": one}, {"type": "train", "time": 2.0, "step": 1},
        {"type": "start", "time": 3.0, "setup": two}, {"type": "start", "time": 4.0, "setup": one})))
    assert training_setups(read_events(run)) == [one, two]
    line = setup_line([{"name": "dhc-seed0", "trained_on": [one]}, {"name": "dhc-seed1", "trained_on": [two]},
                       {"name": "old-seed0"}])
    assert line == ("- **Trained on 2 set-ups** (the same code and seed give other numbers with another thread count "
                    "or processor, so differences between these runs mix both): 1 torch thread, CPU AMD EPYC (AVX512, "
                    "flags 0a1b), torch 2.13.0+cpu: dhc-seed0; 2 torch threads, CPU AMD EPYC (AVX512, flags 0a1b), "
                    "torch 2.13.0+cpu: dhc-seed1; 1 run predates this record (old-seed0)")
    assert setup_line([{"name": "a", "trained_on": [one]}, {"name": "b", "trained_on": [one]}]) == (
        "- Trained with: 1 torch thread, CPU AMD EPYC (AVX512, flags 0a1b), torch 2.13.0+cpu")


def test_hardware_note_names_a_cuda_device_with_one_query(monkeypatch):
    """The bench record names the GPU once (compute_setup's device_name), for the report's line."""
    import PLBOptCore.bench.accuracy as accuracy

    queries = []
    monkeypatch.setattr(accuracy, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: queries.append(device) or "Test GPU")
    note = accuracy.hardware_note("cuda")
    assert note["device"] == "cuda:0 (Test GPU)" and note["device_name"] == "Test GPU"
    assert len(queries) == 1
