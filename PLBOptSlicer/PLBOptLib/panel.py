"""Decisions of the PLBOpt panel that need no Qt: what the case table lists and in which order,
which case is selected, what Accept acts on, what the panel says when training ends, which
review comes back when Slicer is reopened.

``PLBOpt.py`` only copies these into widgets, so they are tested headless.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple

from .cases import SceneCase
from .errors import PLBOptSlicerError


@dataclass(frozen=True)
class CaseRow:
    """One row of the case table."""

    volume_id: str  # MRML node ID of the case's volume: what a selected row stands for
    case_name: str
    cells: Tuple[str, str, str, str]  # case, status, segmentation, uncertainty


def case_rows(logic) -> List[CaseRow]:
    """The case table: the scene's cases, most uncertain pseudo labels first, then the others in
    name order."""
    uncertainty = {item.case_name: item.prediction.uncertainty for item in logic.ranked_review()}
    cases = sorted(logic.cases(), key=lambda case: -uncertainty.get(case.name, -1.0))
    return [CaseRow(case.volume.GetID(), case.name,
                    (case.name, case.status.value, case.segmentation.GetName() if case.segmentation else "",
                     f"{uncertainty[case.name]:.3f}" if case.name in uncertainty else ""))
            for case in cases]


class CaseSelection:
    """The case the panel shows and acts on, held as its volume's node ID.

    The table is rebuilt and re-sorted whenever a node is added to or removed from the scene, so
    a row number soon names another case than the one in the slice views; the node ID does not
    change.
    """

    def __init__(self) -> None:
        self.volume_id: Optional[str] = None

    def select(self, volume_id: Optional[str]) -> None:
        self.volume_id = volume_id or None

    def row_in(self, rows: Sequence[CaseRow]) -> Optional[int]:
        """Row of the selected case in a rebuilt table; None (and nothing selected any more) when
        its volume has left the scene."""
        for index, row in enumerate(rows):
            if row.volume_id == self.volume_id:
                return index
        self.volume_id = None
        return None

    def case(self, logic) -> Optional[SceneCase]:
        """The selected case as the scene has it now."""
        return logic.case_of_volume(self.volume_id) if self.volume_id else None

    def require_case(self, logic) -> SceneCase:
        case = self.case(logic)
        if case is None:
            raise PLBOptSlicerError("select a case in the table first")
        return case


def accept_selected(logic, selection: CaseSelection) -> Path:
    """Accept the selected case's segmentation as a label (the Accept button)."""
    return logic.accept_as_labeled(selection.require_case(logic).name)


def training_finished_message(job) -> Tuple[str, str]:
    """``(kind, text)`` for a finished training job: kind ``info`` goes to the log, ``error`` to an
    error dialog. "Checkpoint kept" is said only when the checkpoint file exists: a training
    stopped before its first checkpoint leaves nothing to resume."""
    progress = job.progress
    if progress.status == "completed":
        return "info", f"Training completed: {job.run_dir}"
    if progress.status == "interrupted":
        if Path(job.checkpoint).is_file():
            return "info", f"Training stopped; checkpoint kept for Resume: {job.checkpoint}"
        return "info", (f"Training stopped before its first checkpoint; {job.run_dir.name} has nothing to resume "
                        "(Resume, Retrain and Predict use the latest run with a checkpoint)")
    return "error", f"Training failed: {progress.message}"


def training_to_reattach(logic, current_job) -> Optional[Path]:
    """On module entry: the run folder whose running trainer the panel should follow, i.e. the
    newest one found through the run locks, unless the panel already follows a training."""
    if current_job is not None and current_job.process.running:
        return None
    running = logic.running_trainings()
    return running[-1] if running else None


def exit_question(training_job) -> Optional[str]:
    """What to ask when Slicer closes while a training runs (None: nothing runs, ask nothing).
    Yes stops it; No leaves it running, to be found again when the module is next opened."""
    if training_job is None or not training_job.process.running or training_job.process.cancel_requested:
        return None
    return (f"A training is running in {training_job.run_dir}.\n\n"
            "Stop it now? It saves a checkpoint at the end of the current step, for Resume.\n\n"
            "No: it keeps running (and keeps its GPU and run folder) after Slicer closes; open the PLBOpt "
            "module again with the same working folder to follow or cancel it.")


def pending_review_question(pending) -> str:
    """What the panel asks before loading pseudo labels that are on disk but not in the scene."""
    names = pending.case_names
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (f"{pending.out_dir} holds pseudo labels of {pending.run_dir.name} for {len(names)} case(s) of the scene "
            f"that have none: {shown}.\n\nLoad them for review (most uncertain first)?")


def restore_review(logic, confirm: Callable[[str], bool], declined: Set[Path]) -> list:
    """When the module is entered (Slicer reopened, a training found again) or a scene is loaded:
    bring the review back as a prediction in this session would have left it.

    - Pseudo labels the module loaded before are already in a saved scene: their ranking and
      jump targets come back from their nodes, without a question and without touching them.
    - Predictions on disk for unlabeled cases that have no segmentation are offered (``confirm``
      asks the user); a folder the user declined (``declined``, kept by the panel) is not
      offered again.

    Returns the review items that came back, most uncertain first (empty: nothing changed, the
    panel keeps its selection)."""
    restored = {item.case_name for item in logic.restore_review_from_scene()}
    pending = logic.unloaded_predictions()
    if pending is not None and pending.out_dir not in declined:
        if confirm(pending_review_question(pending)):
            restored |= {item.case_name for item in logic.load_predictions(pending.run_dir, pending.out_dir,
                                                                           pending.case_names)}
        else:
            declined.add(pending.out_dir)
    return [item for item in logic.ranked_review() if item.case_name in restored]
