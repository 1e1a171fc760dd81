"""``plbopt export``: a trained run as a self-describing ``torch.export`` program (and optionally ONNX).

The export is the inference ensemble of :class:`~PLBOptCore.engine.inference.Predictor`: the
mean of the subnets' logits (A and B; only one subnet for ``supervised`` runs), whose softmax over
classes is the probability map. It takes a **preprocessed** patch batch ``(B, 1, Z, Y, X)`` float32,
``(Z, Y, X) = patch_size``, with a dynamic batch ``B``; the spatial axes are fixed to
``patch_size``, which is what sliding-window inference feeds.

- ``model.pt2`` (``torch.export.save``): a program returning the **mean logits** ``(B, C, Z, Y, X)``,
  from which the sliding window's own softmax reproduces the checkpoint's predictions bit for bit.
  ``torch.export.load("model.pt2").module()`` runs it; :func:`load_exported` returns an
  :class:`ExportedEnsemble` that also gives the probabilities.
- ``model.onnx`` (PyTorch's ``torch.export``-based exporter, ``dynamo=True``; needs ``onnxscript``):
  returns the **probabilities** ``(B, C, Z, Y, X)``.

Whatever a deployment needs besides the weights (class names and colours, patch size,
preprocessing parameters, sliding-window overlap) is stored as JSON: inside the ``.pt2`` archive
(``extra_files["plbopt.json"]``), as a sidecar ``<output stem>.json`` for other tools, and in the
ONNX file's ``metadata_props["plbopt"]``.

``torch.jit`` is deprecated in recent PyTorch (2.13 here), so PLBOpt no longer writes TorchScript;
:func:`load_exported` still reads the TorchScript ``.pt`` files of earlier versions (export format 1).

Memory of :func:`predict_with_export` (and of ``plbopt predict``, which works the same way), for
an input of ``N`` voxels, ``V`` voxels after resampling and body crop, ``C`` classes; the input
image stays loaded throughout. Preprocessing peaks at about 21 bytes per voxel (a SimpleITK
float32 cast, its numpy copy, the body mask and int32 component map, then float32 temporaries of
clipping and scaling; 17 bytes of it numpy, measured with ``tracemalloc``). Inference holds the
preprocessed volume (4 V), the probability accumulator (4 C V) and the weight sum (4 V); then
``probs.max`` adds an int64 label and float32 confidence (12 V) and restoring the original grid
a full-size array plus a SimpleITK copy per output (about 10 N). Add the window batch,
``sw_batch_size × C × prod(patch_size)`` floats a few times over (about 0.6 GB for 14 classes
and 64×128×128 patches). Peak ≈ ``(4 C + 30) V`` bytes + window batch + input: about 5 GB for
14 classes and 512×512×200 voxels. (Measured: 1.1 GB peak RSS above baseline for C = 14,
128×256×256 voxels, 64×128×128 patches.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .utils import atomic_write

if TYPE_CHECKING:
    from .data.preprocess import PreprocessParams
    from .engine.inference import Predictor

EXPORT_FORMAT = "plbopt-export"
EXPORT_VERSION = 2  # 1: TorchScript .pt (read, no longer written); 2: torch.export .pt2
METADATA_NAME = "plbopt.json"
PROGRAM_SUFFIX = ".pt2"


class EnsembleModule(nn.Module):
    """Softmax of the mean logits of ``subnets``, exactly as the Predictor's sliding window computes it."""

    def __init__(self, subnets: Sequence[nn.Module]) -> None:
        super().__init__()
        self.subnets = nn.ModuleList(subnets)

    def mean_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, Z, Y, X)`` → mean logits ``(B, C, Z, Y, X)``.

        Summed in subnet order and divided once, like ``sum(...) / len(models)`` in
        ``sliding_window_probabilities``, so exported and checkpoint predictions agree bit for bit.
        """
        total = self.subnets[0](x)[0].float()
        for subnet in self.subnets[1:]:
            total = total + subnet(x)[0].float()
        return total / len(self.subnets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, Z, Y, X)`` preprocessed patches → probabilities ``(B, C, Z, Y, X)``."""
        return torch.softmax(self.mean_logits(x), dim=1)


class _MeanLogits(EnsembleModule):
    """The ensemble with ``mean_logits`` as ``forward``: what the ``.pt2`` program computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean_logits(x)


class ExportedEnsemble(nn.Module):
    """A loaded export, used like :class:`EnsembleModule`: ``forward`` gives probabilities
    ``(B, C, Z, Y, X)``, ``mean_logits`` the mean logits.

    Args:
        program: the module computing the mean logits from ``(B, 1, Z, Y, X)`` patches.
        method: its method that does so (``forward`` for ``.pt2`` programs, ``mean_logits`` for
            TorchScript files of export format 1).
    """

    def __init__(self, program: nn.Module, method: str = "forward") -> None:
        super().__init__()
        self.program, self.method = program, method

    def train(self, mode: bool = True) -> "ExportedEnsemble":
        """Only flags this wrapper: an exported program was recorded in eval mode and refuses
        ``train()``/``eval()`` (so does not need them), and a traced TorchScript graph is fixed too."""
        self.training = mode
        return self

    def mean_logits(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.program, self.method)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mean_logits(x), dim=1)


class _LogitsAdapter(nn.Module):
    """Makes an exported ensemble look like a VNet (``(logits, features)``) to the sliding window.

    It returns the exported mean logits rather than log-probabilities so that the sliding
    window's own softmax reproduces the Predictor's arithmetic exactly.
    """

    def __init__(self, exported: ExportedEnsemble) -> None:
        super().__init__()
        self.exported = exported

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return self.exported.mean_logits(x), None


def export_metadata(predictor: Predictor, checkpoint: Path) -> Dict[str, Any]:
    """Everything besides the weights that inference needs, as JSON-ready data."""
    from .data.preprocess import BODY_MARGIN, PreprocessParams

    config = predictor.config
    params = PreprocessParams.from_config(config)
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "preset": config.preset,
        "subnets": len(predictor.models),
        "num_classes": predictor.num_classes,
        "labels": {str(k): v for k, v in sorted(predictor.labels.items())},
        "colors": {str(k): list(v) for k, v in sorted(predictor.colors.items())},
        "input": "image (B, 1, Z, Y, X) float32, preprocessed, (Z, Y, X) = patch_size",
        "output": ".pt2: the subnets' mean logits (B, C, Z, Y, X) float32, softmax over C gives the probabilities; "
                  ".onnx: the probabilities (B, C, Z, Y, X) float32",
        "patch_size": [int(p) for p in config.patch_size],
        "overlap": float(config.sw_overlap),
        "sw_batch_size": int(config.sw_batch_size),
        "preprocessing": {**json.loads(json.dumps(dataclasses.asdict(params))), "key": params.key(),
                          "body_margin": BODY_MARGIN},
        # after restoring: keep only the largest component of these classes (PLBOptCore.postprocess)
        "postprocessing": {"largest_component": list(predictor.largest_component_classes)},
        "checkpoint": str(checkpoint),
        "torch_version": torch.__version__,
    }


def _export_program(subnets: Sequence[nn.Module], example: torch.Tensor) -> torch.export.ExportedProgram:
    """The mean-logits program with a dynamic batch axis.

    ``example`` needs a batch of 2 or more: torch.export specialises a dimension traced at size 1.
    """
    program = torch.export.export(_MeanLogits(subnets).eval(), (example,),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    program.example_inputs = None  # else saved with the program: 8 MB of zeros for a 64×128×128 patch
    return program


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Hide PyTorch-internal exporter chatter (missing torchvision ops, its own deprecations)
    that a PLBOpt user cannot act on; errors still propagate."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(module: EnsembleModule, example: torch.Tensor, path: Path, metadata: Dict[str, Any]) -> None:
    """Write ``module`` as one self-contained ONNX file with a dynamic batch axis and the metadata."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter imports it lazily; fail early and clearly)
    except ImportError as exc:
        raise ConfigError(f"{path}: ONNX export needs the '{exc.name}' package (pip install onnx onnxscript)") from None
    with atomic_write(path) as tmp, _quiet_onnx_exporter():
        # external_data=False: one file (weights inline, fine below ONNX's 2 GB limit) rather
        # than a side '.data' file that would carry the temporary name.
        torch.onnx.export(module, (example,), str(tmp), input_names=["image"], output_names=["probabilities"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True,
                          external_data=False, verbose=False)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {"plbopt": json.dumps(metadata)})
        onnx.save(model, str(tmp))


def _earlier_export(path: Path) -> bool:
    """Whether ``path`` is what an export writes: training writes no ``.pt2`` or ``.onnx`` file,
    and of the ``.json`` files only an export's sidecar carries the export format."""
    if path.suffix in (PROGRAM_SUFFIX, ".onnx"):
        return True
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_export_targets(run_dir: Path, targets: Sequence[Path], source: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, targets that would destroy something.

    Never (not even with ``overwrite``): the checkpoint being exported, one target twice (``-o
    m.pt2 --onnx m.json`` would write the sidecar over the ONNX file), anything in a subfolder
    of the run folder (``checkpoints/``, ``tensorboard/``), and a file of the run folder that is
    not an earlier export (``-o RUN/config.pt2`` would replace ``config.json``, and the run could not
    be resumed). Without ``overwrite``, any existing file.
    """
    from .utils import check_output_file, check_output_folder

    run = Path(run_dir).resolve()
    seen = set()
    for target in targets:
        resolved = target.resolve()
        if resolved == source.resolve():
            raise ConfigError(f"{target}: refusing to overwrite the checkpoint being exported")
        if resolved in seen:
            raise ConfigError(f"{target}: written twice by this export (the .pt2 sidecar is <name>.json); "
                              "give the outputs different names")
        seen.add(resolved)
        if resolved.is_relative_to(run) and (resolved.parent != run or (resolved.exists()
                                                                        and not _earlier_export(resolved))):
            raise ConfigError(f"{target}: belongs to the run folder {run_dir}; export next to its files, "
                              "never over or among them")
        check_output_folder(target.parent)
        check_output_file(target, overwrite)


def export_run(run_dir: Path, output: Path, onnx_path: Optional[Path] = None, checkpoint: str = "best",
               overwrite: bool = False) -> List[Path]:
    """Export a run's ensemble; returns the written files (``output``, its ``.json`` sidecar, ONNX).

    Args:
        run_dir: a training run folder.
        output: ``.pt2`` file to write (e.g. ``model.pt2``); the sidecar is ``output.with_suffix(".json")``.
        onnx_path: also write an ONNX model here.
        checkpoint: ``best``, ``last`` or a checkpoint path, as for ``plbopt predict``.
        overwrite: replace existing outputs (never the run folder's own files: :func:`check_export_targets`).
    """
    from .engine.inference import Predictor, resolve_checkpoint

    output = Path(output)
    if output.suffix != PROGRAM_SUFFIX:
        raise ConfigError(f"{output}: the exported program is a torch.export archive; name it *{PROGRAM_SUFFIX}")
    source = resolve_checkpoint(Path(run_dir), checkpoint)
    targets = [output, output.with_suffix(".json")] + ([Path(onnx_path)] if onnx_path is not None else [])
    check_export_targets(Path(run_dir), targets, source, overwrite)
    predictor = Predictor.from_checkpoint(source, device="cpu")
    metadata = export_metadata(predictor, source)
    example = torch.zeros([2, 1] + metadata["patch_size"], dtype=torch.float32)
    text = json.dumps(metadata, indent=2)
    with torch.no_grad():
        program = _export_program(predictor.models, example)
    # Serialised in memory first: torch's zip writer, handed a file, kills the process with
    # SIGABRT when the disk refuses bytes (it retries in its destructor); Python's write raises.
    archive = io.BytesIO()
    torch.export.save(program, archive, extra_files={METADATA_NAME: text})
    with atomic_write(output) as tmp:
        tmp.write_bytes(archive.getbuffer())
    sidecar = output.with_suffix(".json")
    with atomic_write(sidecar) as tmp:
        tmp.write_text(text + "\n")
    written = [output, sidecar]
    if onnx_path is not None:
        _export_onnx(EnsembleModule(predictor.models).eval(), example, Path(onnx_path), metadata)
        written.append(Path(onnx_path))
    return written


def _archive_kind(path: Path) -> Optional[str]:
    """``"pt2"`` (torch.export archive), ``"torchscript"``, or None, from the zip's entry names:
    asking the loaders instead makes them log tracebacks for every foreign file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(name.endswith("/archive_format") for name in names):
        return "pt2"
    if any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names):
        return "torchscript"
    return None


def load_exported(path: Path, device: str = "cpu") -> Tuple[ExportedEnsemble, Dict[str, Any]]:
    """Load an exported model (``.pt2``, or a TorchScript ``.pt`` of export format 1) and its
    metadata; :class:`CheckpointError` names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: exported model not found")
    kind = _archive_kind(path)
    if kind is None:
        raise CheckpointError(f"{path}: not an exported model (neither a torch.export .pt2 archive nor TorchScript)")
    extra = {METADATA_NAME: ""}
    try:
        if kind == "pt2":
            with open(path, "rb") as handle:  # a file object: torch.export.load insists on the .pt2 suffix for paths
                module = ExportedEnsemble(torch.export.load(handle, extra_files=extra).module().to(device))
        else:
            with warnings.catch_warnings():  # reading the files earlier versions wrote; torch.jit is deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                module = ExportedEnsemble(torch.jit.load(str(path), map_location=device, _extra_files=extra),
                                          method="mean_logits")
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read the exported model ({str(exc).splitlines()[0][:200]})") from None
    try:
        metadata = json.loads(extra[METADATA_NAME] or "null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: not a PLBOpt export (no '{METADATA_NAME}' with format '{EXPORT_FORMAT}')")
    if int(metadata.get("version", 0)) > EXPORT_VERSION:
        raise CheckpointError(f"{path}: export version {metadata['version']} is newer than this PLBOpt "
                              f"(supports {EXPORT_VERSION}); upgrade PLBOpt")
    return module.eval(), metadata


def preprocess_params(metadata: Dict[str, Any]) -> PreprocessParams:
    """The :class:`PreprocessParams` recorded in export ``metadata``."""
    from .data.preprocess import PreprocessParams

    raw = metadata["preprocessing"]
    return PreprocessParams(
        target_spacing=tuple(raw["target_spacing"]) if raw["target_spacing"] else None,
        clip_window=tuple(raw["clip_window"]) if raw["clip_window"] else None,
        normalization=raw["normalization"], crop_to_body=raw["crop_to_body"],
        superpixel_method=raw["superpixel_method"], superpixel_divisor=raw["superpixel_divisor"],
        superpixel_compactness=raw["superpixel_compactness"], superpixel_area_mm2=raw.get("superpixel_area_mm2"),
        intensity_mean_std=tuple(raw["intensity_mean_std"]) if raw.get("intensity_mean_std") else None,
        # exports written before planning had a fixed CT body threshold, recorded as body_threshold_hu
        body_threshold=raw.get("body_threshold", raw.get("body_threshold_hu", -500.0)))


def postprocessed_classes(path: Path, metadata: Dict[str, Any]) -> List[int]:
    """The classes whose largest component alone an export keeps (none in exports that predate it);
    :class:`CheckpointError` naming ``path`` for anything but a list of foreground class ids."""
    section = metadata.get("postprocessing", {})
    classes = section.get("largest_component", []) if isinstance(section, dict) else None
    num_classes = metadata["num_classes"]
    if not isinstance(classes, list) or not all(type(c) is int and 0 < c < num_classes for c in classes):
        raise CheckpointError(f"{path}: postprocessing.largest_component must list class ids 1..{num_classes - 1}, "
                              f"got {classes!r}")
    return classes


def predict_with_export(path: Path, image: sitk.Image, device: str = "cpu",
                        overlap: Optional[float] = None) -> Tuple[sitk.Image, sitk.Image]:
    """Label and confidence maps of ``image`` in its own geometry, from an exported model.

    Same preprocessing, sliding window, restoring and postprocessing as ``Predictor.predict_image``
    (without superpixel refinement), so the labels equal those of the checkpoint the model came
    from. Exports written before postprocessing existed name no classes and remove nothing.
    """
    from .data.preprocess import preprocess_image
    from .engine.inference import check_overlap, postprocess_images, restore_prediction, sliding_window_probabilities
    from .utils import resolve_device

    overlap = check_overlap(overlap) if overlap is not None else None
    module, metadata = load_exported(path, device)
    volume, info = preprocess_image(image, preprocess_params(metadata))
    probs = sliding_window_probabilities(
        [_LogitsAdapter(module)], torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)),
        metadata["patch_size"], metadata["num_classes"], metadata["overlap"] if overlap is None else overlap,
        metadata["sw_batch_size"], resolve_device(device))
    label, confidence = restore_prediction(probs, info, metadata["num_classes"])
    label, confidence, _ = postprocess_images(label, confidence, postprocessed_classes(path, metadata))
    return label, confidence


def cmd_export(args: argparse.Namespace) -> int:
    written = export_run(args.run_dir, args.output, args.onnx, args.checkpoint, overwrite=args.overwrite)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def add_export_arguments(subparsers: Any) -> None:
    """Register ``plbopt export RUN_DIR -o model.pt2 [--onnx model.onnx] [--checkpoint best|last|PATH]``."""
    p = subparsers.add_parser("export", help="export the inference ensemble as a torch.export program (and ONNX) with metadata")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="torch.export program, e.g. model.pt2 (+ model.json)")
    p.add_argument("--onnx", type=Path, help="also write an ONNX model (dynamic batch axis)")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never the run folder's own files)")
    p.set_defaults(func=cmd_export)
