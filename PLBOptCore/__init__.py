"""PLBOptCore: pseudo-label optimisation for semi-supervised 3D medical image segmentation.

Public API (imported on first use, so ``import PLBOptCore`` stays light for Slicer start-up)::

    PLBOptCore.train(dataset_dir, run_dir, preset="plbopt", ...)
    PLBOptCore.predict(run_dir, inputs, out_dir, refine=False, ...)
    PLBOptCore.predict_readings(run_dir, inputs, {out_dir: PLBOptCore.Reading(subnet="a", refine=True)}, ...)
    PLBOptCore.predict_array(run_dir, volume_zyx, spacing_zyx)
    PLBOptCore.evaluate(pred_dir, gt_dir, labels=None)
    PLBOptCore.refine_pseudo_labels(probs, pseudo, superpixels, tau)
    PLBOptCore.make_config(preset, config_file=None, overrides=None)
"""

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Library convention: messages go to whatever handlers the application (CLI, Slicer, a script)
# installs on "PLBOptCore" or the root logger; none are printed by default.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "train": "PLBOptCore.api",
    "predict": "PLBOptCore.api",
    "predict_readings": "PLBOptCore.api",
    "Reading": "PLBOptCore.engine.inference",
    "predict_array": "PLBOptCore.api",
    "evaluate": "PLBOptCore.api",
    "refine_pseudo_labels": "PLBOptCore.method.refine",
    "make_config": "PLBOptCore.config",
    "Config": "PLBOptCore.config",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'PLBOptCore' has no attribute {name!r}")
