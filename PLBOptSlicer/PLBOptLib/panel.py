"""Decisions of the PLBOpt panel that need no Qt: what the case table lists and in which order,
which case is selected, what Accept acts on, what the panel says when training ends, which
review comes back when Slicer is reopened, what to ask before restarting Slicer.

``PLBOpt.py`` only copies these into widgets, so they are tested headless.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple

from . import cases as case_utils
from . import sparse
from .cases import SceneCase
from .errors import PLBOptSlicerError
from .logic import PendingPredictions

try:  # Slicer's translation function; its context is this file ("PLBOptLib.panel"); no Qt import
    from slicer.i18n import tr as _
except ImportError:  # slicer-core (headless tests) or a Slicer without slicer.i18n: the English text
    def _(text: str) -> str:
        return text


@dataclass(frozen=True)
class CaseRow:
    """One row of the case table."""

    volume_id: str  # MRML node ID of the case's volume: what a selected row stands for
    case_name: str
    used: bool  # the tick in the first column: whether the export writes this case
    # case, status, segmentation, uncertainty, why (not) used, how much is annotated (sparse.annotation_text)
    cells: Tuple[str, str, str, str, str, str]


def case_rows(logic) -> List[CaseRow]:
    """The case table: the scene's cases, most uncertain pseudo labels first, then the others in
    name order; each ticked when the export uses it, with the reason when it does not (or the
    user overrode the default)."""
    uncertainty = {item.case_name: item.prediction.uncertainty for item in logic.ranked_review()}
    cases = sorted(logic.cases(), key=lambda case: -uncertainty.get(case.name, -1.0))
    uses = case_utils.case_uses(cases)
    return [CaseRow(case.volume.GetID(), case.name, uses[case.volume.GetID()].used,
                    (case.name, case.status.value, case.segmentation.GetName() if case.segmentation else "",
                     f"{uncertainty[case.name]:.3f}" if case.name in uncertainty else "",
                     uses[case.volume.GetID()].reason, sparse.annotation_text(case)))
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
            raise PLBOptSlicerError(_("select a case in the table first"))
        return case


class SceneWatch:
    """The scene events the panel follows, only while the module is shown (:meth:`start` on
    enter, :meth:`stop` on exit): volumes and segmentations added or removed anywhere (Data module,
    DICOM, Segment Editor) change the case table, and a loaded scene may bring pseudo labels back
    for review. While the module is closed nothing is observed, so loading data elsewhere costs
    nothing; entering refreshes the table once. The handlers take no arguments."""

    def __init__(self, scene, on_nodes_changed: Callable[[], None], on_scene_imported: Callable[[], None]):
        self.scene = scene
        self._handlers = ((scene.NodeAddedEvent, on_nodes_changed), (scene.NodeRemovedEvent, on_nodes_changed),
                          (scene.EndImportEvent, on_scene_imported))
        self._tags: List[int] = []

    @property
    def active(self) -> bool:
        return bool(self._tags)

    def start(self) -> None:
        if self._tags:
            return  # entered twice: one observer per event, never two
        self._tags = [self.scene.AddObserver(event, lambda caller, name, handler=handler: handler())
                      for event, handler in self._handlers]

    def stop(self) -> None:
        for tag in self._tags:
            self.scene.RemoveObserver(tag)
        self._tags = []


def accept_selected(logic, selection: CaseSelection) -> Path:
    """Accept the selected case's segmentation as a label (the Accept button)."""
    return logic.accept_as_labeled(selection.require_case(logic).name)


def training_finished_message(job) -> Tuple[str, str]:
    """``(kind, text)`` for a finished training job: kind ``info`` goes to the log, ``error`` to an
    error dialog. "Checkpoint kept" is said only when the checkpoint file exists: a training
    stopped before its first checkpoint leaves nothing to resume."""
    progress = job.progress
    if progress.status == "completed":
        return "info", _("Training completed: {run}").format(run=job.run_dir)
    if progress.status == "interrupted":
        if Path(job.checkpoint).is_file():
            return "info", _("Training stopped; checkpoint kept for Resume: {checkpoint}").format(
                checkpoint=job.checkpoint)
        return "info", _("Training stopped before its first checkpoint; {run} has nothing to resume "
                         "(Resume, Retrain and Predict use the latest run with a checkpoint)").format(run=job.run_dir.name)
    return "error", _("Training failed: {reason}").format(reason=progress.message)


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
    return _("A training is running in {run}.\n\n"
             "Stop it now? It saves a checkpoint at the end of the current step, for Resume.\n\n"
             "No: it keeps running (and keeps its GPU and run folder) after Slicer closes; open the PLBOpt "
             "module again with the same working folder to follow or cancel it.").format(run=training_job.run_dir)


def pending_review_question(pending) -> str:
    """What the panel asks before loading pseudo labels that are on disk but not in the scene."""
    names = pending.case_names
    shown = ", ".join(names[:8]) + (_(" and {count} more").format(count=len(names) - 8) if len(names) > 8 else "")
    return _("{folder} holds pseudo labels of {run} for {count} case(s) of the scene that have none: {cases}.\n\n"
             "Load them for review (most uncertain first)?").format(folder=pending.out_dir, run=pending.run_dir.name,
                                                                    count=len(names), cases=shown)


def restore_review(logic, confirm: Callable[[str], bool], declined: Set[Path],
                   load: Optional[Callable[[PendingPredictions], list]] = None) -> list:
    """When the module is entered (Slicer reopened, a training found again) or a scene is loaded:
    bring the review back as a prediction in this session would have left it.

    - Pseudo labels the module loaded before are already in a saved scene: their ranking and
      jump targets come back from their nodes, without a question and without touching them.
    - Predictions on disk for unlabeled cases that have no segmentation are offered (``confirm``
      asks the user); a folder the user declined (``declined``, kept by the panel) is not
      offered again. ``load`` loads an accepted offer and returns the review items it loaded
      (default: :meth:`WorkflowLogic.load_predictions`, all at once; the panel loads them from a
      timer instead, and they come back from there).

    Returns the review items that came back, most uncertain first (empty: nothing changed, the
    panel keeps its selection)."""
    restored = {item.case_name for item in logic.restore_review_from_scene()}
    pending = logic.unloaded_predictions()
    if pending is not None and pending.out_dir not in declined:
        if confirm(pending_review_question(pending)):
            loaded = (load(pending) if load is not None
                      else logic.load_predictions(pending.run_dir, pending.out_dir, pending.case_names))
            restored |= {item.case_name for item in loaded}
        else:
            declined.add(pending.out_dir)
    return [item for item in logic.ranked_review() if item.case_name in restored]


class RestartChoice(str, Enum):
    """The buttons of the question before Slicer restarts after a dependency install."""

    SAVE = "save"  # open Slicer's save dialog, then restart once nothing is left unsaved
    RESTART = "restart"  # restart now, discarding what is unsaved
    CANCEL = "cancel"  # do not restart now; the new packages are used after the next restart


class RestartStep(str, Enum):
    RESTART = "restart"
    ASK_AGAIN = "ask again"  # saved, but something is still unsaved: ask with the new list
    STAY = "stay"


@dataclass(frozen=True)
class RestartQuestion:
    text: str
    choices: Tuple[Tuple[RestartChoice, str], ...]  # (choice, button text), in the order shown
    unsaved: Tuple[str, ...]  # names of what a restart would discard


MAX_UNSAVED_LISTED = 10


def unsaved_data(scene) -> List[str]:
    """What a restart now would discard, as Slicer's own close question sees it: data nodes
    modified since they were read or saved (a segmentation edited in Segment Editor, a pseudo
    label, a volume made in Slicer), then the scene itself when only its layout changed."""
    from vtk import vtkCollection

    modified = vtkCollection()
    names = []
    if scene.GetStorableNodesModifiedSinceRead(modified):
        for index in range(modified.GetNumberOfItems()):
            node = modified.GetItemAsObject(index)
            if not node.GetHideFromEditors():
                names.append(node.GetName() or node.GetID())
    if not names and scene.GetModifiedSinceRead():
        names.append(_("the scene (views, layout and node settings)"))
    return names


def restart_question(scene, reasons: Sequence[str]) -> RestartQuestion:
    """What to ask before ``slicer.util.restart()`` after an install replaced packages Slicer had
    loaded: a restart closes the scene without Slicer's own save question, so unsaved Segment
    Editor work would be lost. With unsaved data: Save / Restart without saving / Cancel."""
    why = _("Slicer has older versions of these packages loaded; restart to use the new ones:\n{packages}").format(
        packages="\n".join(reasons))
    unsaved = tuple(unsaved_data(scene))
    if not unsaved:
        return RestartQuestion(why + "\n\n" + _("Restart Slicer now?"),
                               ((RestartChoice.RESTART, _("Restart now")), (RestartChoice.CANCEL, _("Not now"))), ())
    listed = "\n".join(f"  - {name}" for name in unsaved[:MAX_UNSAVED_LISTED])
    if len(unsaved) > MAX_UNSAVED_LISTED:
        listed += "\n  " + _("and {count} more").format(count=len(unsaved) - MAX_UNSAVED_LISTED)
    return RestartQuestion(
        why + "\n\n" + _("These data are not saved and a restart discards them:\n{names}\n\nSave them first?").format(
            names=listed),
        ((RestartChoice.SAVE, _("Save…")), (RestartChoice.RESTART, _("Restart without saving")),
         (RestartChoice.CANCEL, _("Cancel"))), unsaved)


def after_restart_choice(choice: RestartChoice, saved: Optional[bool] = None,
                         still_unsaved: Sequence[str] = ()) -> RestartStep:
    """What follows the user's answer. ``saved``: whether Slicer's save dialog was applied
    (after SAVE); ``still_unsaved``: :func:`unsaved_data` after it. Restarting is never the
    outcome of a save dialog that was cancelled or that left data unsaved."""
    if choice == RestartChoice.RESTART:
        return RestartStep.RESTART
    if choice == RestartChoice.SAVE and saved:
        return RestartStep.ASK_AGAIN if still_unsaved else RestartStep.RESTART
    return RestartStep.STAY
