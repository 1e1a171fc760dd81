"""``plbopt`` command line: train / predict / refine / evaluate / demo / convert / split / sparsify / bench / export / plot.

User errors print one line ``plbopt: error: <file>: <problem>`` and exit 2; an interrupted training
exits 130 after writing a resumable checkpoint. The library's INFO log messages are printed on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from . import __version__
from .config import (CHECKPOINT_NAMES, CPU_SCHEDULE, PATCH_BUDGET, PRESETS, SUBNETS, inert_settings, load_config_file,
                     make_config, parse_override)
from .convert import add_convert_arguments
from .convert.sparsify import add_sparsify_arguments
from .data.io import CONFIDENCE_FOLDER
from .errors import ConfigError, PLBOptError, TrainingInterrupted
from .export import add_export_arguments
from .metrics import AVERAGE_CONVENTIONS, EMPTY_CONVENTIONS, HD95_CONVENTIONS, MISSING_CONVENTIONS


def _training_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    for text in args.set or []:
        key, value = parse_override(text)
        overrides[key] = value
    for key in ("iterations", "base_filters", "batch_size", "device", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "patch_size", None):
        overrides["patch_size"] = list(args.patch_size)
    return overrides


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    # No default here: with --resume a preset given is checked against the run's, one not given is the run's.
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="method preset (default: plbopt; with --resume the run's own)")
    parser.add_argument("--config", type=Path, help="YAML or JSON config file (applied after the preset)")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override any config key, e.g. lr=0.01 refine_tau=0.6")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"))
    parser.add_argument("--base-filters", type=int)
    parser.add_argument("--batch-size", type=int, help="labeled (and unlabeled) patches per step")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int)


def cmd_train(args: argparse.Namespace) -> int:
    from .api import train

    chosen = _training_overrides(args)
    overrides = dict(chosen)
    if args.tensorboard:
        overrides["tensorboard"] = True
    if not args.resume:  # a setting the preset switches off trains nothing different: say so before hours of it
        config = make_config(args.preset or "plbopt", args.config, overrides, small=args.small)
        chosen = {**(load_config_file(args.config) if args.config else {}), **chosen}
        for key, switch in inert_settings(config, chosen).items():
            print(f"plbopt: warning: {key} has no effect on training: {switch} is off in preset {config.preset}",
                  file=sys.stderr)
    # log lines go above the progress bar instead of through it
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm([logging.getLogger("PLBOptCore")]) if not args.quiet else contextlib.nullcontext():
        train(args.dataset, args.output, preset=args.preset, config_file=args.config, overrides=overrides,
              resume=args.resume, overwrite=args.overwrite, init_from=args.init_from, show_progress_bar=not args.quiet,
              unlabeled_dir=args.unlabeled, cache_dir=args.cache_dir, small=args.small)
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per torchrun process
        print(f"run folder: {args.output}  (checkpoints/best.pt, events.jsonl)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .api import predict

    def report(event: dict) -> None:
        if not args.quiet:
            extra = f", refinement changed {100 * event['refine_changed_fraction']:.2f}% of voxels" if args.refine else ""
            if event["postprocess_removed_voxels"]:
                extra += f", {event['postprocess_removed_voxels']} voxels outside their class's largest component removed"
            print(f"[{event['index']}/{event['total']}] {event['case']} -> {event['path']}{extra}", flush=True)

    written = predict(args.run_dir, args.input, args.output, checkpoint=args.checkpoint, device=args.device or "auto",
                      refine=args.refine, overlap=args.overlap, subnet=args.subnet, progress=report,
                      overwrite=args.overwrite, postprocess=not args.no_postprocessing)
    print(f"wrote {len(written)} label maps to {args.output} and their confidence maps to "
          f"{Path(args.output) / CONFIDENCE_FOLDER}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import evaluate
    from .evaluate import format_table

    results = evaluate(args.pred_dir, args.gt_dir, labels=args.labels, out_dir=args.output, empty=args.empty,
                       missing=args.missing, hd95=args.hd95, average=args.average)
    print(format_table(results))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    # a demo run also needs a test volume: run_demo refuses --test 0
    for name, least in (("labeled", 1), ("unlabeled", 0), ("validation", 0), ("test", 0)):
        if getattr(args, name) < least:
            raise ConfigError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if args.data_only:
        from .data.phantom import make_phantom_dataset

        path = make_phantom_dataset(args.output, n_labeled=args.labeled, n_unlabeled=args.unlabeled,
                                    n_validation=args.validation, n_test=args.test)
        print(f"wrote {path / 'dataset.json'}")
        return 0

    run_demo(Path(args.output), preset=args.preset, iterations=args.iterations, device=args.device or "auto",
             overwrite=args.overwrite, n_labeled=args.labeled, n_unlabeled=args.unlabeled,
             n_validation=args.validation, n_test=args.test, train=args.train)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .bench.plots import plot_run

    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench in ("step", "predict"):
        from .bench.throughput import run_predict_bench, run_step_bench_throughput

        small = True if args.small else None
        overrides = dict(parse_override(text) for text in args.set or [])
        if args.bench == "step":
            run_step_bench_throughput(args.output, args.device or "auto", args.preset, args.steps, small=small,
                                      overrides=overrides)
        else:
            run_predict_bench(args.output, args.device or "auto", args.preset, args.shape, args.classes, args.repeats,
                              small=small, overrides=overrides)
        return 0
    if args.bench == "errors":
        from .bench.errors import run_error_bench

        results = run_error_bench(args.runs, args.dataset, args.output, args.checkpoint, args.device or "cpu")
        print((Path(args.output) / "ERRORS.md").read_text(), end="")
        print(f"wrote {Path(args.output) / 'errors.json'} ({len(results['runs'])} runs)")
        return 0
    if args.bench == "compare":
        from .bench.compare import write_comparison

        names = args.names.split(",")
        if len(names) != 2 or not all(names) or names[0] == names[1]:
            raise ConfigError(f"--names: two different comma-separated names, got {args.names!r}")
        _, markdown = write_comparison(args.first, args.second, args.output, names[0], names[1], args.overwrite)
        print(markdown, end="")
        print(f"wrote {Path(args.output) / 'COMPARE.md'}, compare.json and compare.png")
        return 0
    if args.bench == "refine":
        from .bench.refine import run_refine_bench

        run_refine_bench(Path(args.output))
        from .bench.step import run_step_bench

        run_step_bench(Path(args.output), iterations=args.steps)
        return 0
    from .bench.accuracy import run_accuracy_bench

    results = run_accuracy_bench(Path(args.dataset), Path(args.output), presets=args.presets.split(","),
                                 seeds=args.seeds, iterations=args.iterations,
                                 variants=args.variants.split(",") if args.variants else [],
                                 small=not args.full_size, device=args.device,
                                 settings=[dict(parse_override(text) for text in group) for group in args.set],
                                 checkpoint=args.checkpoint, split_file=args.split, config_file=args.config)
    report = Path(args.output) / results["report_dir"] / "RESULTS.md"
    print(f"report: {report}  (all reports: {Path(args.output) / 'RESULTS.md'})")
    failed = results["this_call"]["failed"]
    if failed:  # the others ran and are reported; a script or a cluster job still has to see the failure
        print(f"plbopt: {len(failed)} run(s) failed: {', '.join(failed)} (see {report}, 'Failed runs')", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plbopt", description="PLBOpt: semi-supervised 3D segmentation with pseudo-label optimisation")
    parser.add_argument("--version", action="version", version=f"plbopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run from a dataset folder")
    p.add_argument("dataset", type=Path, help="dataset folder with dataset.json (MSD or nnU-Net v2)")
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    add_training_arguments(p)
    p.add_argument("--unlabeled", type=Path, metavar="DIR", help="add the images of DIR as unlabeled cases")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="preprocessing cache (default DATASET/.plbopt_cache; needed for a read-only dataset)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start again in a non-empty run folder")
    p.add_argument("--init-from", type=Path, help="initialise the subnets from this checkpoint (fine-tune)")
    p.add_argument("--small", action="store_true",
                   help=(f"CPU-sized schedule ({CPU_SCHEDULE['base_filters']} filters, patches of at most "
                         f"{PATCH_BUDGET['cpu']} voxels planned from the data, {CPU_SCHEDULE['iterations']} "
                         f"steps, {CPU_SCHEDULE['optimizer']} lr {CPU_SCHEDULE['lr']}); a --config file's values win"))
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to RUN_DIR/tensorboard (pip install \"plbopt[tensorboard]\")")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    for name, refine in (("predict", False), ("refine", True)):
        helptext = ("predict label and confidence maps" if not refine
                    else "predict and refine pseudo labels with superpixel entropy voting")
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_dir", type=Path)
        p.add_argument("input", type=Path, help="image file, DICOM series folder, or folder of images")
        p.add_argument("-o", "--output", type=Path, required=True)
        p.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint path")
        p.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1)")
        p.add_argument("--subnet", default="both", choices=SUBNETS,
                       help="predict with subnet a, b, or both averaged (default; a supervised run has only a)")
        p.add_argument("--device")
        p.add_argument("--overwrite", action="store_true", help="replace prediction files that already exist")
        p.add_argument("--no-postprocessing", action="store_true",
                       help="keep every component: do not remove the islands of the classes whose largest "
                            "component alone scored better on the run's validation cases")
        p.add_argument("-q", "--quiet", action="store_true")
        if refine:
            p.set_defaults(refine=True)
        else:
            p.add_argument("--refine", action="store_true", help="apply superpixel refinement")
        p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, ASD, ASSD, HD95 of predictions against ground truth")
    p.add_argument("pred_dir", type=Path)
    p.add_argument("gt_dir", type=Path)
    p.add_argument("--labels", type=Path, help="dataset.json with class names (its \"ignore\" label, if any, "
                   "marks ground-truth voxels left out of the scores)")
    p.add_argument("-o", "--output", type=Path, help="where metrics.csv/json go (default PRED_DIR)")
    p.add_argument("--empty", choices=EMPTY_CONVENTIONS, default="ignore",
                   help="a class absent from prediction and GT: ignore = left out of the means (default; "
                        "nnU-Net v2), perfect = Dice 1 and distance 0 (DHC; MONAI DiceMetric ignore_empty=False); "
                        "ignore-gt = also leave out a class predicted where the GT has none (MONAI DiceMetric "
                        "ignore_empty=True)")
    p.add_argument("--missing", choices=MISSING_CONVENTIONS, default="diagonal",
                   help="distance of a class in only one of prediction and GT: diagonal = image diagonal "
                        "in mm (default), inf (MONAI's ASD/ASSD), skip = left out of the means (MONAI's HD95, "
                        "earlier PLBOpt)")
    p.add_argument("--hd95", choices=HD95_CONVENTIONS, default="pooled",
                   help="pooled = 95th percentile of both directions together (default; medpy, DHC), "
                        "max = larger of the two directed 95th percentiles (MONAI)")
    p.add_argument("--average", choices=AVERAGE_CONVENTIONS, default="classes",
                   help="the mean row: classes = mean over classes of each class's mean over cases (default; "
                        "nnU-Net v2, DHC), cases = mean over cases of each case's mean over its classes "
                        "(MONAI's default reduction=\"mean\")")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="generate the embedded phantom dataset, predict with the shipped checkpoint "
                                    "(or --train), evaluate, montage")
    p.add_argument("-o", "--output", type=Path, default=Path("plbopt-demo"))
    p.add_argument("--train", action="store_true",
                   help="train first (1200 CPU steps, about 10 minutes on 2 cores), as the shipped checkpoint was trained; "
                        "another --preset, --iterations or split always trains")
    p.add_argument("--preset", default="plbopt", choices=sorted(PRESETS))
    p.add_argument("--iterations", type=int)
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--data-only", action="store_true", help="only write the phantom dataset folder to -o")
    p.add_argument("--labeled", type=int, default=2, help="labeled phantom volumes (default 2)")
    p.add_argument("--unlabeled", type=int, default=12, help="unlabeled phantom volumes (default 12)")
    p.add_argument("--validation", type=int, default=2, help="validation phantom volumes, choosing best.pt (default 2)")
    p.add_argument("--test", type=int, default=4, help="test phantom volumes, scored (default 4)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="training-curve PNG of a run folder from its events.jsonl")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-o", "--output", type=Path, help="PNG to write (default RUN_DIR/training_curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="benchmarks (not tests): refine | accuracy | step | predict")
    bench = p.add_subparsers(dest="bench", required=True)
    for name, helptext in (("step", "training steps/s, voxels/s and peak memory on this device"),
                           ("predict", "sliding-window inference voxels/s and peak memory on this device")):
        b = bench.add_parser(name, help=helptext)
        b.add_argument("-o", "--output", type=Path, default=Path(f"bench-{name}"))
        b.add_argument("--preset", default="plbopt", choices=sorted(PRESETS))
        b.add_argument("--device")
        b.add_argument("--small", action="store_true", help="CPU demo size even on CUDA (default: preset size on CUDA)")
        b.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="config overrides, e.g. num_workers=4 amp=false")
        if name == "step":
            b.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
        else:
            b.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], metavar=("Z", "Y", "X"),
                           help="random preprocessed volume to predict")
            b.add_argument("--classes", type=int, default=14)
            b.add_argument("--repeats", type=int, default=1)
        b.set_defaults(func=cmd_bench)
    b = bench.add_parser("errors", help="where runs' test errors lie: near a boundary, in homogeneous superpixels "
                                        "(what refinement can fix), organ confusion")
    b.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    b.add_argument("--dataset", type=Path, required=True, help="dataset folder whose 'test' cases are scored")
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--checkpoint", choices=CHECKPOINT_NAMES, default="best")
    b.add_argument("--device")
    b.set_defaults(func=cmd_bench)
    b = bench.add_parser("compare", help="two accuracy-benchmark folders (e.g. two splits of one dataset) paired by "
                                         "preset and seed: compare.json, COMPARE.md, compare.png")
    b.add_argument("first", type=Path, metavar="BENCH_A", help="folder written by plbopt bench accuracy (the reference)")
    b.add_argument("second", type=Path, metavar="BENCH_B", help="folder written by plbopt bench accuracy")
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--names", default="A,B", help="names of the two arms in the report, e.g. whole2,sparse8x4")
    b.add_argument("--overwrite", action="store_true", help="replace an existing compare.json / COMPARE.md / compare.png")
    b.set_defaults(func=cmd_bench)
    b = bench.add_parser("refine", help="vectorised vs reference refinement, and the step-time share of PLBOpt's extras")
    b.add_argument("-o", "--output", type=Path, default=Path("bench-refine"))
    b.add_argument("--steps", type=int, default=20, help="training steps timed per preset (interleaved; medians)")
    b.set_defaults(func=cmd_bench)
    b = bench.add_parser("accuracy", help="train/predict/evaluate presets x seeds; results.json, RESULTS.md, plots")
    b.add_argument("dataset", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--presets", default="supervised,dhc,plbopt,refine-only,triplet-only,mc-only")
    b.add_argument("--seeds", type=int, default=3)
    b.add_argument("--iterations", type=int,
                   help="training steps of every run (default: the --config file's, else 300)")
    b.add_argument("--variants", default="", help="comma list: superpixel-methods, superpixel-number, noise")
    b.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="a variant of every preset, trained beside its own runs and compared with them seed by "
                        "seed, e.g. --set lambda_mc=0.3; repeat --set for more variants (to change every run "
                        "without training the preset's own runs, use --config)")
    b.add_argument("--full-size", action="store_true", help="use the preset's own network size instead of the CPU schedule")
    b.add_argument("--config", type=Path, metavar="YAML",
                   help="settings of every run, e.g. Resources/configs/phantom-cpu.yaml (the phantom's preprocessing "
                        "before planning, with which docs/RESULTS.md's phantom tables were measured)")
    b.add_argument("--split", type=Path, metavar="SPLIT_JSON",
                   help="fixed split of a labelled DATASET (e.g. Resources/splits/Dataset103_LA.json): case lists "
                        "labeled, unlabeled, validation, test; the split's folder is built in OUTPUT/dataset")
    b.add_argument("--checkpoint", choices=CHECKPOINT_NAMES, default="best",
                   help="score best.pt (chosen on the validation cases, default) or last.pt (the final weights)")
    b.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the --config file's, else auto)")
    b.set_defaults(func=cmd_bench)

    add_convert_arguments(sub)
    add_sparsify_arguments(sub)
    add_export_arguments(sub)
    return parser


class _ConsoleFormatter(logging.Formatter):
    """The message alone; a warning prefixed ``plbopt: warning:``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"plbopt: warning: {text}" if record.levelno >= logging.WARNING else text


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """Print the library's INFO messages on stdout and its warnings as ``plbopt: warning: ...`` on
    stderr while a command runs (removed afterwards, so repeated ``main()`` calls in one process do
    not print twice)."""
    package = logging.getLogger("PLBOptCore")
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warning = logging.StreamHandler(sys.stderr)
    warning.setLevel(logging.WARNING)
    for handler in (info, warning):  # one formatter for both: logging_redirect_tqdm keeps the first's
        handler.setFormatter(_ConsoleFormatter())
    level = package.level
    package.addHandler(info)
    package.addHandler(warning)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(info)
        package.removeHandler(warning)
        package.setLevel(level)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _console_logging():
            return int(args.func(args) or 0)
    except TrainingInterrupted as exc:
        print(f"plbopt: {exc}", file=sys.stderr)
        return 130
    except PLBOptError as exc:
        print(f"plbopt: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system refused a file operation (disk full, permissions, /proc): name the file
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"plbopt: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plbopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
