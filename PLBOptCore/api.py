"""The Python API: what the CLI, the Slicer module and notebooks call.

Every long function takes ``progress`` (called with event dicts) and ``should_stop`` (polled; True
cancels cleanly) so a GUI can drive it from a worker thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .config import (CPU_SCHEDULE, PLANNED_KEYS, RESUME_SAFE_KEYS, Config, load_config_file, make_config,
                     resume_config, stored_config)
from .errors import ConfigError, DatasetError
from .utils import check_output_folder

PathLike = Union[str, Path]


def train(dataset_dir: PathLike, run_dir: PathLike, preset: Optional[str] = None, config_file: Optional[PathLike] = None,
          overrides: Optional[Dict[str, Any]] = None, resume: bool = False, overwrite: bool = False,
          init_from: Optional[PathLike] = None, progress: Optional[Callable[[dict], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None, show_progress_bar: bool = False,
          unlabeled_dir: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None, small: bool = False) -> Path:
    """Train a run folder from a dataset folder (MSD or nnU-Net v2 ``dataset.json``); returns ``run_dir``.

    ``preset`` defaults to ``"plbopt"`` for a new run and to the stored one on resume.
    With ``resume=True`` the configuration stored in the run folder is used, so a resumed run
    continues the same experiment: ``config_file`` and ``overrides`` may change only the keys of
    :data:`~PLBOptCore.config.RESUME_SAFE_KEYS` (schedule length, device, workers, logging);
    a different value of any other key, another ``preset``, ``small`` where the run was not
    trained with the CPU schedule, ``init_from``, or a dataset whose classes are not the run's
    is refused (:class:`ConfigError`), as is a checkpoint that cannot be loaded, all before
    anything in the run folder or the cache changes.
    With ``sparse_as_unlabeled`` (and a preset that uses unlabeled data) every training case whose
    label holds the dataset's ignore label also joins the unlabeled cases
    (:func:`~PLBOptCore.engine.trainer.dataset_for_training`, applied by the trainer).
    ``unlabeled_dir`` adds the images of a folder to the unlabeled cases; ``cache_dir`` holds the
    preprocessing cache (default ``<dataset_dir>/.plbopt_cache``; give another folder when the
    dataset is read-only).

    A new run plans its preprocessing from the dataset (:mod:`PLBOptCore.data.plan`): target
    spacing, patch size (within the budget of ``small``, the CPU schedule, or of the full network),
    normalisation by modality. Values in ``config_file`` and ``overrides`` win over the plan; a
    resumed run keeps its stored plan.
    """
    from .data.dataset import load_dataset, validate_dataset
    from .data.plan import plan_config
    from .engine.trainer import Trainer, check_training_inputs

    run_dir = Path(run_dir)
    requested = {**(load_config_file(Path(config_file)) if config_file else {}), **(overrides or {})}
    if resume:
        # A resumed run continues its stored experiment: every request it cannot honour is refused
        # here, not ignored, before anything in the run folder changes.
        if init_from:
            raise ConfigError(f"{init_from}: --init-from starts a new run from a checkpoint's weights; --resume "
                              f"continues the weights of {run_dir}; use one or the other")
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no config.json)")
        stored = stored_config(load_config_file(run_dir / "config.json"), run_dir / "config.json")
        # --small and a preset become requested values below the explicit ones, as in make_config
        schedule = {key: value for key, value in CPU_SCHEDULE.items() if key not in RESUME_SAFE_KEYS} if small else {}
        config = resume_config(stored, {**schedule, **({"preset": preset} if preset else {}), **requested},
                               run_dir / "config.json")
    else:
        config = make_config(preset or "plbopt", Path(config_file) if config_file else None, overrides, small=small)
    dataset = load_dataset(Path(dataset_dir), unlabeled_dir=Path(unlabeled_dir) if unlabeled_dir else None)
    validate_dataset(dataset, deep=True)
    cache_dir = Path(cache_dir) if cache_dir else Path(dataset.root) / ".plbopt_cache"
    if not cache_dir.is_dir():  # an existing one may be a complete, read-only shared cache
        check_output_folder(cache_dir)
    plan = None
    if resume:
        check_resume_inputs(dataset, run_dir)
    else:
        init_config = check_training_inputs(config, dataset, run_dir, Path(init_from) if init_from else None)
        # a fine-tuned network keeps the input it was trained on
        # (through Config, so a checkpoint older than a key gets the default it was trained with)
        inherited = ({key: value for key, value in Config.from_dict(init_config).to_dict().items()
                      if key in PLANNED_KEYS} if init_config is not None else None)
        config, plan = plan_config(config, dataset, requested, small, cache_dir, inherited)
    trainer = Trainer(config, dataset, run_dir, resume=resume, overwrite=overwrite, init_from=init_from,
                      progress=progress, should_stop=should_stop, show_progress_bar=show_progress_bar,
                      cache_dir=cache_dir, plan=plan)
    trainer.fit()
    return run_dir


def check_resume_inputs(dataset: Any, run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` on ``dataset`` (a :class:`~PLBOptCore.data.dataset.DatasetSpec`)
    when its classes are not the run's, or when no checkpoint of the run loads (``last.pt``
    truncated and no good ``last.pt.prev``): before the run's ``dataset.json`` is rewritten and
    before its ``events.jsonl`` grows, since the Slicer module reads class names from the former.

    The run's classes are those of its ``dataset.json``; where that file is missing or unreadable,
    those stored in the checkpoint.
    """
    import json

    from .engine.checkpoint import load_latest_good

    last = run_dir / "checkpoints" / "last.pt"
    state = load_latest_good(last) if last.exists() or last.with_name("last.pt.prev").exists() else {}
    source, stored = run_dir / "dataset.json", None
    try:
        stored = json.loads(source.read_text())["labels"]
    except (OSError, ValueError, TypeError, KeyError):
        source, stored = last, state.get("labels")
    current = {str(key): name for key, name in dataset.labels.items()}
    if stored is not None and stored != current:
        def shown(labels: Any) -> str:
            text = ", ".join(f"{key} {name}" for key, name in labels.items()) if isinstance(labels, dict) else repr(labels)
            return text if len(text) <= 200 else text[:200] + "..."

        raise ConfigError(f"{source}: the run was trained on the classes {{{shown(stored)}}}; dataset "
                          f"{dataset.root} has {{{shown(current)}}}; resume on the run's dataset, or train a new "
                          "run folder")


def list_images(inputs: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Image files (and DICOM series folders) named by a file, a folder, or a list of them.

    Case names (:func:`~PLBOptCore.data.io.image_case_name`) drop nnU-Net's ``_0000`` suffix; a
    second channel (``<case>_0001``) of such a case is refused.
    """
    from .data.io import IMAGE_SUFFIXES, check_case_name, check_single_channel, image_case_name, image_files

    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    found: List[Path] = []
    for path in paths:
        if not path.exists():
            raise DatasetError(f"{path}: input not found")
        if path.is_file():
            found.append(path)
        elif any(child.suffix.lower() == ".dcm" for child in path.iterdir()):
            found.append(path)
        else:
            images = image_files(path)
            if not images:
                raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found.extend(images)
    check_single_channel(found)
    names = [check_case_name(image_case_name(p), p) for p in found]  # names become output files
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{paths[0]}: several inputs share the case name(s) {', '.join(duplicates)}")
    return found


def predict(run_dir: PathLike, inputs: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
            checkpoint: str = "best", device: str = "auto", refine: bool = False, overlap: Optional[float] = None,
            progress: Optional[Callable[[dict], None]] = None, should_stop: Optional[Callable[[], bool]] = None,
            subnet: str = "both", overwrite: bool = False, postprocess: bool = True) -> List[Path]:
    """Write the label map ``out_dir/<case><ending>`` and the confidence map (max softmax)
    ``out_dir/confidence/<case><ending>`` of every input image; returns the label maps.

    ``out_dir`` holds label maps only, the layout nnU-Net's evaluation reads; ``<ending>`` is the
    input's format (:func:`~PLBOptCore.data.io.prediction_suffix`). Outputs are in each input's
    original geometry. ``subnet`` is ``"a"``, ``"b"`` or ``"both"`` (DHC's ensemble, the default).
    ``postprocess``: keep the largest component of the classes the run's validation chose
    (:mod:`PLBOptCore.postprocess`); False writes the network's labels as they are.

    Everything is checked before the first byte is written: ``overlap`` (in [0, 1)), the inputs
    and their case names, the output folder, and every output file: one that exists is refused
    unless ``overwrite``, an input image always (even when ``out_dir`` is the input folder).
    """
    from .engine.inference import Reading

    reading = Reading(subnet=None if subnet == "both" else subnet, refine=refine, postprocess=postprocess)
    return predict_readings(run_dir, inputs, {out_dir: reading}, checkpoint, device, overlap, progress, should_stop,
                            overwrite)[Path(out_dir)]


def predict_readings(run_dir: PathLike, inputs: Union[PathLike, Sequence[PathLike]], outputs: Dict[PathLike, Any],
                     checkpoint: str = "best", device: str = "auto", overlap: Optional[float] = None,
                     progress: Optional[Callable[[dict], None]] = None,
                     should_stop: Optional[Callable[[], bool]] = None,
                     overwrite: bool = False) -> Dict[Path, List[Path]]:
    """:func:`predict` of several readings at once: ``outputs`` maps each output folder to a
    :class:`~PLBOptCore.engine.inference.Reading` (the ensemble or one subnet, refined or not,
    postprocessed or not). Each image is preprocessed once and each subnet slides over it once,
    and each folder gets what :func:`predict` with that reading writes there, bit for bit.
    Everything is checked first, as :func:`predict` does. Returns folder -> label maps written.
    """
    from .data.io import CONFIDENCE_FOLDER, image_case_name, prediction_suffix, read_header, read_image, write_image
    from .engine.inference import Predictor, check_overlap
    from .utils import check_output_file, check_output_folder

    overlap = check_overlap(overlap) if overlap is not None else None
    images = list_images(inputs)
    outputs = {Path(folder): reading for folder, reading in outputs.items()}  # created by the first write
    for out_dir in outputs:
        for folder in (out_dir, out_dir / CONFIDENCE_FOLDER):
            check_output_folder(folder)
    input_set = {p.resolve() for p in images}
    jobs = []
    for image_path in images:
        name, ending = image_case_name(image_path), prediction_suffix(image_path)
        targets = [(out_dir / f"{name}{ending}", out_dir / CONFIDENCE_FOLDER / f"{name}{ending}") for out_dir in outputs]
        for target in (path for pair in targets for path in pair):
            if target.resolve() in input_set:
                raise DatasetError(f"{target}: refusing to overwrite an input image; choose another output folder")
            check_output_file(target, overwrite)
        read_header(image_path)  # a broken input is refused before the first case is written
        jobs.append((image_path, name, targets))
    predictor = Predictor.from_run(Path(run_dir), checkpoint, device)
    if overlap is not None:
        predictor.config.sw_overlap = overlap
    readings = list(outputs.values())
    for reading in readings:  # a subnet the run lacks is refused before the first case is written
        predictor.check_reading(reading)
    written: Dict[Path, List[Path]] = {out_dir: [] for out_dir in outputs}
    for index, (image_path, name, targets) in enumerate(jobs):
        predictions = predictor.predict_image_readings(read_image(image_path), readings, should_stop=should_stop)
        for out_dir, prediction, (label_path, confidence_path) in zip(outputs, predictions, targets):
            write_image(prediction.label, label_path)
            write_image(prediction.confidence, confidence_path)
            written[out_dir].append(label_path)
        if progress:
            first = predictions[0]
            progress({"type": "predict", "case": name, "index": index + 1, "total": len(images),
                      "refine_changed_fraction": first.refine_changed_fraction,
                      "postprocess_removed_voxels": first.postprocess_removed_voxels, "path": str(targets[0][0])})
    return written


def predict_array(run_dir: PathLike, volume_zyx: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), checkpoint: str = "best",
                  device: str = "auto", refine: bool = False, postprocess: bool = True):
    """Predict a numpy volume (Z, Y, X) in HU; returns ``(labels, confidence)`` arrays of the same shape
    (``postprocess`` as in :func:`predict`)."""
    from .engine.inference import Predictor

    image = sitk.GetImageFromArray(np.asarray(volume_zyx, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    prediction = Predictor.from_run(Path(run_dir), checkpoint, device).predict_image(image, refine=refine,
                                                                                   postprocess=postprocess)
    return sitk.GetArrayFromImage(prediction.label), sitk.GetArrayFromImage(prediction.confidence)


def evaluate(pred_dir: PathLike, gt_dir: PathLike, labels: Union[None, Dict[int, str], PathLike] = None,
             out_dir: Optional[PathLike] = None, empty: str = "ignore", missing: str = "diagonal",
             hd95: str = "pooled", average: str = "classes") -> dict:
    """Per case and class Dice, ASD, ASSD and HD95 (mm); writes metrics.csv and metrics.json.

    ``empty`` (``ignore``/``perfect``/``ignore-gt``), ``missing`` (``diagonal``/``inf``/``skip``),
    ``hd95`` (``pooled``/``max``) and ``average`` (``classes``/``cases``: the order of the mean over
    cases and classes) choose the conventions described in :mod:`PLBOptCore.evaluate`.
    """
    from .evaluate import evaluate_folders

    return evaluate_folders(Path(pred_dir), Path(gt_dir), labels if isinstance(labels, dict) or labels is None else Path(labels),
                            Path(out_dir) if out_dir else None, empty=empty, missing=missing, hd95=hd95,
                            average=average)
