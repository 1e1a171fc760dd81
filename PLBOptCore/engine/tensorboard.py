"""Optional TensorBoard logging of a run (``pip install "plbopt[tensorboard]"``).

A sink of the :class:`~PLBOptCore.engine.events.EventWriter`: the scalars are the event records'
(losses, learning rate, refinement fraction, per-class validation Dice), written by rank 0 only
into ``RUN_DIR/tensorboard``. ``tensorboard --logdir RUN_DIR`` shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
TRAIN_SCALARS = ("loss", "loss_sup", "loss_unsup", "loss_tri", "loss_mc", "lr", "refine_changed_fraction")


def require_tensorboard() -> None:
    """Raise a one-line :class:`ConfigError` when the ``tensorboard`` package is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise ConfigError('tensorboard: the tensorboard package is not installed '
                          '(pip install "plbopt[tensorboard]", or run without --tensorboard)') from None


class TensorBoardSink:
    """Writes ``train`` and ``validation`` records as scalars under ``log_dir``.

    The writer opens at the ``start`` record, dropping what an interrupted earlier attempt logged
    from the resumed step on (``purge_step``), and closes at the ``end`` record.
    """

    def __init__(self, log_dir: Path) -> None:
        require_tensorboard()
        self.log_dir = Path(log_dir)
        self._writer: Optional[Any] = None

    def __call__(self, record: Dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "start":
            from torch.utils.tensorboard import SummaryWriter

            self.close()
            self._writer = SummaryWriter(str(self.log_dir), purge_step=int(record.get("start_step", 0)) or None,
                                         flush_secs=10)
        elif self._writer is None:
            return
        elif kind == "train":
            for key in TRAIN_SCALARS:
                if isinstance(record.get(key), (int, float)):
                    self._writer.add_scalar(f"train/{key}", record[key], record["step"])
            for name, gain in (record.get("refine_gain") or {}).items():  # refinement's self-check
                self._writer.add_scalar(f"train/refine_gain_{name}", gain, record["step"])
            for subnet, weights in (record.get("class_weights") or {}).items():  # DiffDW (a), DistDW (b)
                for name, weight in weights.items():
                    self._writer.add_scalar(f"train/class_weight_{subnet}_{name}", weight, record["step"])
        elif kind == "validation":
            for name, value in record.get("dice", {}).items():
                self._writer.add_scalar(f"validation/dice_{name}", value, record["step"])
            self._writer.add_scalar("validation/mean_dice", record["mean_dice"], record["step"])
            for subnet, scores in (record.get("subnets") or {}).items():
                self._writer.add_scalar(f"validation/mean_dice_subnet_{subnet}", scores["mean_dice"], record["step"])
            for name, gain in (record.get("refine_gain") or {}).items():  # refinement checked on validation
                self._writer.add_scalar(f"validation/refine_gain_{name}", gain, record["step"])
            for name, gain in (record.get("largest_component_gain") or {}).items():  # postprocessing's measure
                self._writer.add_scalar(f"validation/largest_component_gain_{name}", gain, record["step"])
        elif kind == "end":
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
