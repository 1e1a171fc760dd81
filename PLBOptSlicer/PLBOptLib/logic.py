"""The PLBOpt workflow on a MRML scene: dataset export, training/prediction processes, review,
correction. No qt or ctk here, so it runs headless (tests, ``slicer-core``) and from the Python console.

Working folder layout::

    WORK/dataset/           dataset.json, imagesTr/, labelsTr/, imagesUn/   (rewritten on export)
    WORK/runs/run-NNN/      PLBOptCore run folders (checkpoints/last.pt, events.jsonl, dataset.json)
    WORK/predictions/run-NNN/   <case>.nii.gz + confidence/<case>.nii.gz from ``refine``
    WORK/corrected/<case>.seg.nrrd   accepted corrections
"""

from __future__ import annotations

import json
import os
import re
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import slicer

from . import bundle, imageio, review, sparse
from . import cases as case_utils
from .cases import DatasetExport, ExportedDataset, SceneCase, Status
from .errors import PLBOptSlicerError
from .events import EventsFollower, TrainingProgress
from .process import (EXIT_INTERRUPTED, STOP_FILE_NAME, AttachedProcess, JobProcess, TrainSettings,
                      in_slicer_application, process_alive, python_executable, refine_command, train_command)

PREDICTION_KILL_AFTER_SECONDS = 10.0  # a prediction has nothing to save: SIGTERM, then kill soon
RESUMABLE_CHECKPOINTS = ("last.pt",)  # what --resume and --init-from read
PREDICTION_CHECKPOINTS = ("best.pt", "last.pt")  # what refine reads ("best", falling back to "last")
RUN_LOCK_NAME = "train.lock"  # PLBOptCore.engine.runcontrol.RUN_LOCK_NAME: {"pid", "host", "time"} while a trainer runs


@dataclass
class TrainingJob:
    """A running (or finished) training process and the progress read from its events.jsonl."""

    run_dir: Path
    process: JobProcess
    events: EventsFollower
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    _unreported: List[str] = field(default_factory=list, repr=False)  # read by cancel(), returned by the next poll()

    @property
    def checkpoint(self) -> Path:
        """The resumable checkpoint PLBOptCore keeps up to date (also written on cancel)."""
        return self.run_dir / "checkpoints" / "last.pt"

    def poll(self) -> List[str]:
        """Advance progress from new events and process output; return lines for the log."""
        log, self._unreported = self._unreported + list(self.process.poll()), []
        for record in self.events.read_new():
            line = self.progress.update(record)
            if line:
                log.append(line)
        returncode = self.process.returncode
        if returncode is not None and not self.progress.finished:
            # No "end" record (killed, crashed before logging): the exit status tells what happened.
            if returncode == 0:
                self.progress.status = "completed"
            elif returncode == EXIT_INTERRUPTED or self.process.cancel_requested:
                self.progress.status = "interrupted"
            else:
                self.progress.status, self.progress.message = "failed", self.process.failure_message()
            log.append(f"Training process exited with status {returncode}")
        return log

    @property
    def finished(self) -> bool:
        return self.process.returncode is not None and self.progress.finished

    def cancel(self) -> None:
        """Stop the trainer. In its loop it watches the stop file and stops at the next step with a
        resumable checkpoint; before that (loading, preprocessing, building) it looks at nothing and
        has nothing to save, so its process group is terminated at once."""
        self._unreported += self.poll()  # the newest events tell whether the loop has started
        self.process.cancel(graceful=self.progress.status == "running")

    def wait(self, timeout: Optional[float] = None, log: Optional[Callable[[str], None]] = None) -> TrainingProgress:
        """Block until the process ends (console/tests); the panel polls instead."""
        self.process.wait(timeout)
        for line in self.poll():
            if log:
                log(line)
        return self.progress


@dataclass
class PredictionJob:
    """A running ``refine`` process writing pseudo labels for the unlabeled cases."""

    run_dir: Path
    out_dir: Path
    process: JobProcess

    def cancel(self) -> None:
        """Stop the prediction (its partial outputs are not loaded)."""
        self.process.cancel()


class StagedStart:
    """Start, Retrain or Export as the panel runs them without freezing Slicer: the dataset
    export, one case read from the scene per :meth:`advance` on the main thread while a worker
    thread writes the files, then (unless export only) the training job, started from the
    finished export. The panel calls :meth:`advance` from a timer until it returns True."""

    def __init__(self, export: DatasetExport, log: Callable[[str], None],
                 start: Optional[Callable[[], TrainingJob]] = None,
                 exported_callback: Callable[[], None] = lambda: None):
        self.export = export
        self.log = log
        self.exported_callback = exported_callback  # the logic reads the new dataset.json again
        self.start = start
        self.exported: Optional[ExportedDataset] = None
        self.job: Optional[TrainingJob] = None

    @property
    def progress_text(self) -> str:
        return self.export.progress_text

    @property
    def fraction(self) -> float:
        return self.export.fraction

    def advance(self) -> bool:
        """Do the next bit of work; True when over. Then :attr:`job` is the started job (None for
        an export only). Raises when the export failed or was cancelled, or the job cannot start."""
        if not self.export.step():
            return False
        self.exported = self.export.result()
        self.exported_callback()
        self.log(export_summary(self.exported))
        if self.start is not None:
            self.job = self.start()
        return True

    def cancel(self) -> None:
        """Stop the export after the file being written; no job is started."""
        self.export.cancel()


class StagedLoad:
    """Loading a prediction's pseudo labels without freezing Slicer: a worker thread reads and
    checks the next case's files (:func:`review.read_prediction`, no scene access) while the GUI
    thread adds the current case's nodes, one case per :meth:`advance`. A case that left the scene,
    or that the user labeled or began correcting meanwhile, is skipped, so no edit is overwritten."""

    def __init__(self, logic: "WorkflowLogic", out_dir: Path, targets: List[Tuple[str, str]], labels: Dict[int, str],
                 colors: Dict[int, tuple]):
        """``targets``: (volume node ID, case name) of each case to load, in order."""
        self.logic = logic
        self.out_dir = out_dir
        self.labels, self.colors = labels, colors
        self._pending = list(targets)
        self.total = len(targets)
        self.loaded: List[str] = []
        self.skipped: List[str] = []
        self.cancelled = False
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="PLBOpt pseudo labels")
        self._reading: Optional[Tuple[str, str, Future]] = None  # (volume ID, case name, read)
        self._read_next()

    @property
    def done_count(self) -> int:
        return len(self.loaded) + len(self.skipped)

    @property
    def fraction(self) -> float:
        return self.done_count / self.total if self.total else 1.0

    @property
    def progress_text(self) -> str:
        return f"Loading pseudo labels: {self.done_count}/{self.total} cases"

    @property
    def ranked(self) -> List["ReviewItem"]:
        """The cases loaded so far, most uncertain first."""
        return [item for item in self.logic.ranked_review() if item.case_name in self.loaded]

    def _read_next(self) -> None:
        """Hand the next case's files to the reader (its grid is read from the node here, on the GUI thread)."""
        self._reading = None
        while self._pending and not self.cancelled:
            volume_id, name = self._pending.pop(0)
            case = self.logic.case_of_volume(volume_id)
            if case is None or case.name != name:
                self._skip(name)
                continue
            grid = imageio.volume_geometry(case.volume)
            read = self._reader.submit(review.read_prediction, self.out_dir / f"{case.name}.nii.gz",
                                       self.out_dir / "confidence" / f"{case.name}.nii.gz", grid,
                                       case.volume.GetName(), self.labels)
            self._reading = (case.volume.GetID(), case.name, read)
            return
        self._reader.shutdown(wait=False)
        stopped = " (loading cancelled)" if self.cancelled else ""
        self.logic.log_callback(f"Loaded pseudo labels of {len(self.loaded)} cases from {self.out_dir}{stopped}")

    def advance(self, wait: bool = False) -> bool:
        """Add the case whose files are read, if they are (``wait``: wait for them); True when
        every case is done or the load was cancelled. Raises what reading or adding a case raised
        (the cases added before it stay loaded)."""
        if self._reading is None:
            return True
        volume_id, name, read = self._reading
        if not wait and not read.done():
            return False
        try:
            files = read.result()
            case = self.logic.case_of_volume(volume_id)  # as the scene is now, not as it was when queued
            if case is None or case.name != name or not WorkflowLogic._takes_prediction(case, self.out_dir, None):
                self._skip(name)
            else:
                self.logic._add_prediction(case, files, self.labels, self.colors)
                self.loaded.append(name)
        except BaseException:
            self._reader.shutdown(wait=False)
            self._reading = None
            raise
        self._read_next()
        return self._reading is None

    def _skip(self, name: str) -> None:
        self.skipped.append(name)
        self.logic.log_callback(f"Skipped the pseudo label of {name}: since the prediction, the case was removed, "
                                f"renamed, labeled or is being corrected")

    def cancel(self) -> None:
        """Stop after the case being read; the cases loaded so far stay for review."""
        self.cancelled = True
        self._pending.clear()


def export_summary(exported: ExportedDataset) -> str:
    return (f"Exported {len(exported.labeled)} labeled and {len(exported.unlabeled)} unlabeled "
            f"cases, classes: {', '.join(exported.class_names)} -> {exported.root}")


@dataclass(frozen=True)
class PendingPredictions:
    """Predictions of a run on disk for cases of the scene that have no pseudo label yet."""

    run_dir: Path
    out_dir: Path
    case_names: List[str]


@dataclass
class ReviewItem:
    """A case whose pseudo label is in the scene, with its review numbers."""

    case_name: str
    prediction: review.LoadedPrediction


class WorkflowLogic:
    """Scene cases -> dataset -> training -> pseudo labels -> correction -> retraining.

    ``scene`` defaults to ``slicer.mrmlScene``; ``python`` to PythonSlicer (or the current
    interpreter outside Slicer). Messages go to ``log_callback``.
    """

    def __init__(self, scene=None, working_dir: Optional[Path] = None, python: Optional[str] = None,
                 log_callback: Optional[Callable[[str], None]] = None, core_root: Optional[Path] = None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        # What the case table and the buttons show from the working folder, read once and kept
        # until forget_folder_facts(): the table is rebuilt on every node added to the scene.
        self._folder_facts: Dict[str, object] = {}
        self._working_dir: Optional[Path] = None
        self.working_dir = Path(working_dir) if working_dir else None
        self.python = python
        self.core_root = Path(core_root) if core_root else None  # None: the PLBOptCore shipped with the module
        self.log_callback = log_callback or print
        self.review_items: Dict[str, ReviewItem] = {}
        self.confidence_threshold = review.DEFAULT_CONFIDENCE_THRESHOLD  # overlay is clear from here up

    # ---- folders -----------------------------------------------------------------------------
    @property
    def working_dir(self) -> Optional[Path]:
        return self._working_dir

    @working_dir.setter
    def working_dir(self, folder: Optional[Path]) -> None:
        folder = Path(folder) if folder else None
        if folder != self._working_dir:
            self._folder_facts.clear()
        self._working_dir = folder

    def forget_folder_facts(self) -> None:
        """Read the working folder again for the table and buttons: after an export, a job's end,
        on module entry and on Refresh (a run made outside Slicer shows up then)."""
        self._folder_facts.clear()

    def _folder_fact(self, key: str, read: Callable[[], object]):
        if key not in self._folder_facts:
            self._folder_facts[key] = read()
        return self._folder_facts[key]

    @staticmethod
    def working_folder_from_text(text: str) -> Optional[Path]:
        """The folder a text field names, or None when it is empty: ``Path("")`` would be the
        current directory ``.``, i.e. wherever Slicer was started from."""
        text = str(text).strip()
        return Path(text).expanduser() if text not in ("", ".") else None

    def _work(self) -> Path:
        if self.working_dir is None:
            raise PLBOptSlicerError("choose a working folder first")
        return self.working_dir

    @property
    def dataset_dir(self) -> Path:
        return self._work() / "dataset"

    @property
    def runs_dir(self) -> Path:
        return self._work() / "runs"

    def run_dirs(self) -> List[Path]:
        """Run folders, oldest first."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(p for p in self.runs_dir.iterdir() if p.is_dir() and re.fullmatch(r"run-\d{3,}", p.name))

    def latest_run_dir(self) -> Optional[Path]:
        runs = self.run_dirs()
        return runs[-1] if runs else None

    def latest_run_with_checkpoint(self, names=RESUMABLE_CHECKPOINTS) -> Optional[Path]:
        """The newest run folder holding ``checkpoints/<name>`` for one of ``names``. A run
        cancelled or crashed before its first checkpoint is passed over, so it never hides an
        earlier good run from Resume, Retrain or Predict."""
        for run_dir in reversed(self.run_dirs()):
            if any((run_dir / "checkpoints" / name).is_file() for name in names):
                return run_dir
        return None

    def has_trained_run(self) -> bool:
        """Whether Resume, Retrain and Predict have a run to work on (for the buttons: read once,
        until :meth:`forget_folder_facts`; the actions themselves look again)."""
        return self.working_dir is not None and self._folder_fact(
            "trained run", lambda: self.latest_run_with_checkpoint() is not None)

    def running_trainings(self) -> List[Path]:
        """Run folders whose trainer is running now on this host, oldest first: the run lock names
        a live process that is not newer than the lock. Found after Slicer was closed and reopened
        while a training ran (the trainer outlives Slicer), so the panel can follow and cancel it."""
        if self.working_dir is None:
            return []
        return [run_dir for run_dir in self.run_dirs() if self._live_lock(run_dir) is not None]

    @staticmethod
    def _live_lock(run_dir: Path) -> Optional[dict]:
        try:
            holder = json.loads((run_dir / RUN_LOCK_NAME).read_text())
            pid, since = int(holder["pid"]), float(holder["time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if holder.get("host") != socket.gethostname() or not process_alive(pid, since):
            return None  # another host's trainer cannot be signalled from here; a dead one is no job
        return {"pid": pid, "time": since}

    def reattach_training(self, run_dir: Path) -> TrainingJob:
        """Follow and control the trainer running in ``run_dir`` (see :meth:`running_trainings`):
        progress rebuilt from the whole ``events.jsonl``, Cancel through the stop file, then the
        trainer's process group."""
        run_dir = Path(run_dir)
        holder = self._live_lock(run_dir)
        if holder is None:
            raise PLBOptSlicerError(f"{run_dir}: no trainer is running in this run folder")
        process = AttachedProcess(holder["pid"], stop_file=run_dir / STOP_FILE_NAME, started=holder["time"])
        job = TrainingJob(run_dir=run_dir, process=process, events=EventsFollower(run_dir / "events.jsonl"))
        job.poll()  # catches up with the records so far; their log lines were shown by the earlier session
        self.log_callback(f"Following the training running in {run_dir.name} (pid {holder['pid']}), "
                          "started before Slicer was last closed")
        return job

    def new_run_dir(self) -> Path:
        latest = self.latest_run_dir()
        number = int(latest.name.split("-")[1]) + 1 if latest else 1
        return self.runs_dir / f"run-{number:03d}"

    # ---- dataset -----------------------------------------------------------------------------
    def cases(self) -> List[SceneCase]:
        """Cases of the scene with their status (see :mod:`PLBOptLib.cases`)."""
        return case_utils.find_cases(self.scene)

    def case_uses(self) -> Dict[str, case_utils.CaseUse]:
        """Which cases the export uses and why, by volume node ID (see :func:`PLBOptLib.cases.case_uses`)."""
        return case_utils.case_uses(self.cases())

    def used_cases(self) -> List[SceneCase]:
        """The cases the next export writes: ticked in the case table, or used by default."""
        return case_utils.used_cases(self.cases())

    def set_case_use(self, volume_id: str, used: Optional[bool]) -> None:
        """The user ticked (True) or unticked (False) a case in the table; None: back to the default."""
        case = self.case_of_volume(volume_id)
        if case is None:
            raise PLBOptSlicerError(f"{volume_id}: is not a case of the scene")
        case_utils.set_case_use(case.volume, used)

    def case_of_volume(self, volume_id: str) -> Optional[SceneCase]:
        """The case whose volume has node ID ``volume_id``, None when it is not a case (any more)."""
        return next((case for case in self.cases() if case.volume.GetID() == volume_id), None)

    def class_names(self) -> List[str]:
        """Class names the next export would use; raises with the reason when labeled cases disagree."""
        return case_utils.class_names(self.used_cases(), self._previous_class_order())

    def _previous_class_order(self) -> List[str]:
        """Class names of the last export, in their order (read once, until :meth:`forget_folder_facts`)."""
        def read() -> List[str]:
            previous = self.dataset_dir / "dataset.json"
            if not previous.is_file():
                return []
            labels, _ = case_utils.read_class_table(previous)
            return [labels[v] for v in sorted(labels) if v > 0]

        return list(self._folder_fact("class order", read))

    def begin_export(self) -> DatasetExport:
        """An export of the scene's used cases (ticked in the case table, or used by default: see
        :func:`PLBOptLib.cases.case_uses`; the others are named in the log) to ``WORK/dataset``,
        validated now and written as it is stepped (see :class:`PLBOptLib.cases.DatasetExport`).

        Classes keep the order of the previous export when the names are the same, so a model
        fine-tuned from an earlier run keeps its output channels.
        """
        cases = self.cases()
        uses = case_utils.case_uses(cases)
        for case in cases:
            if not uses[case.volume.GetID()].used:
                self.log_callback(f"Not exported: {case.name} ({uses[case.volume.GetID()].reason})")
        return DatasetExport([case for case in cases if uses[case.volume.GetID()].used], self.dataset_dir,
                             preferred_order=self._previous_class_order())

    def export_dataset(self) -> ExportedDataset:
        """Write the scene's cases to ``WORK/dataset`` in the PLBOptCore dataset format and wait
        until it is written (console, tests; the panel uses :meth:`staged_export`)."""
        exported = self.begin_export().run()
        self.forget_folder_facts()
        self.log_callback(export_summary(exported))
        return exported

    def staged_export(self) -> StagedStart:
        """Export the dataset step by step (the panel's Export button)."""
        return StagedStart(self.begin_export(), self.log_callback, exported_callback=self.forget_folder_facts)

    # ---- training ----------------------------------------------------------------------------
    def job_python(self) -> str:
        """Interpreter for PLBOptCore jobs: ``python`` if given, else PythonSlicer / the current one."""
        return self.python or python_executable()

    def job_environment(self) -> Dict[str, str]:
        """Environment of PLBOptCore jobs: the bundled PLBOptCore first on ``PYTHONPATH``."""
        base = slicer.util.startupEnvironment() if in_slicer_application() else os.environ
        return bundle.job_environment(self.core_root or bundle.core_root(), base)

    def _start_job(self, command: List[str], stop_file: Optional[Path] = None,
                   kill_after_seconds: float = 120.0) -> JobProcess:
        """Start ``python -m PLBOptCore ...`` without waiting for it. The job itself first checks
        that it imports the bundled PLBOptCore at the module's version (``run_bundled_core.py``)
        and otherwise fails with one line saying why, which the panel shows as the job's error."""
        self.log_callback("Running: " + " ".join(command))
        root = self.core_root or bundle.core_root()
        return JobProcess(bundle.checked_core_command(command, root), cwd=self._work(),
                          environment=self.job_environment(), stop_file=stop_file,
                          kill_after_seconds=kill_after_seconds).start()

    def start_training(self, settings: TrainSettings, resume: bool = False, init_from: Optional[Path] = None,
                       export: bool = True) -> TrainingJob:
        """Launch ``PLBOptCore train`` in a child process and return the job to poll.

        A new run folder is created unless ``resume``, which continues the latest run from its
        ``checkpoints/last.pt``.
        """
        if export and not resume:
            self.export_dataset()
        return self._launch_training(settings, resume=resume, init_from=init_from)

    def staged_training(self, settings: TrainSettings, init_from: Optional[Path] = None) -> StagedStart:
        """Start as the panel runs it: the export step by step, then the job (see :class:`StagedStart`)."""
        return StagedStart(self.begin_export(), self.log_callback,
                           start=lambda: self._launch_training(settings, init_from=init_from),
                           exported_callback=self.forget_folder_facts)

    def staged_retrain(self, settings: TrainSettings) -> StagedStart:
        """Retrain as the panel runs it: the export step by step, then the fine-tuning job."""
        return self.staged_training(settings, init_from=self._fine_tuning_checkpoint())

    def _launch_training(self, settings: TrainSettings, resume: bool = False,
                         init_from: Optional[Path] = None) -> TrainingJob:
        if resume:
            run_dir = self.latest_run_with_checkpoint()
            if run_dir is None:
                raise PLBOptSlicerError(f"{self.runs_dir}: no run with a checkpoint to resume")
        else:
            run_dir = self.new_run_dir()
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        command = train_command(self.job_python(), self.dataset_dir, run_dir, settings, resume=resume, init_from=init_from)
        events = EventsFollower.from_end(run_dir / "events.jsonl")
        # Cancel creates the stop file; the trainer stops at the next step with a checkpoint.
        process = self._start_job(command, stop_file=run_dir / STOP_FILE_NAME)
        return TrainingJob(run_dir=run_dir, process=process, events=events)

    def resume_training(self, settings: TrainSettings) -> TrainingJob:
        return self.start_training(settings, resume=True)

    def retrain(self, settings: TrainSettings) -> TrainingJob:
        """Re-export (corrections now count as labeled) and fine-tune from the latest run's last checkpoint."""
        return self.start_training(settings, init_from=self._fine_tuning_checkpoint())

    def _fine_tuning_checkpoint(self) -> Path:
        latest = self.latest_run_with_checkpoint()
        if latest is None:
            raise PLBOptSlicerError(f"{self.runs_dir}: no trained run to fine-tune; start a training first")
        return latest / "checkpoints" / RESUMABLE_CHECKPOINTS[0]

    # ---- review ------------------------------------------------------------------------------
    def start_prediction(self, run_dir: Optional[Path] = None) -> PredictionJob:
        """Launch ``PLBOptCore refine`` on the exported unlabeled images of ``run_dir`` (default: the
        latest run with a checkpoint)."""
        run_dir = Path(run_dir) if run_dir else self.latest_run_with_checkpoint(PREDICTION_CHECKPOINTS)
        if run_dir is None or not any((run_dir / "checkpoints" / name).is_file() for name in PREDICTION_CHECKPOINTS):
            raise PLBOptSlicerError(f"{run_dir or self.runs_dir}: no trained run; train a model first")
        inputs = self.dataset_dir / "imagesUn"
        if not inputs.is_dir() or not any(inputs.iterdir()):
            raise PLBOptSlicerError(f"{inputs}: no unlabeled images exported")
        out_dir = self._work() / "predictions" / run_dir.name
        command = refine_command(self.job_python(), run_dir, inputs, out_dir)
        process = self._start_job(command, kill_after_seconds=PREDICTION_KILL_AFTER_SECONDS)
        return PredictionJob(run_dir=run_dir, out_dir=out_dir, process=process)

    def staged_load_predictions(self, run_dir: Path, out_dir: Path,
                                case_names: Optional[List[str]] = None) -> "StagedLoad":
        """The loading of :meth:`load_predictions`, one case per :meth:`StagedLoad.advance`, as the
        panel runs it from a timer so that Slicer stays usable while many cases load."""
        labels, colors = case_utils.read_class_table(Path(run_dir) / "dataset.json")
        targets = [(case.volume.GetID(), case.name) for case in self.cases()
                   if self._takes_prediction(case, Path(out_dir), case_names)]
        return StagedLoad(self, Path(out_dir), targets, labels, colors)

    def load_predictions(self, run_dir: Path, out_dir: Path, case_names: Optional[List[str]] = None) -> List[ReviewItem]:
        """Load every predicted case (or those of ``case_names``) as pseudo label + confidence map;
        return them most uncertain first.

        Cases being corrected or already labeled are left alone so edits are never overwritten;
        an earlier pseudo label of the same case is replaced. A sparsely annotated labeled case whose
        segmentation is still the user's is completed: its pseudo label keeps the user's annotated
        slices (see :func:`PLBOptLib.sparse.complete_with_prediction`) and the case stays labeled.
        """
        staged = self.staged_load_predictions(run_dir, out_dir, case_names)
        while not staged.advance(wait=True):
            pass
        return staged.ranked

    @staticmethod
    def _takes_prediction(case: SceneCase, out_dir: Path, case_names: Optional[List[str]]) -> bool:
        """Whether a prediction in ``out_dir`` is loaded into ``case``: never over a label or a
        correction of the user's, except to complete a sparse annotation."""
        if case_names is not None and case.name not in case_names:
            return False
        if not (out_dir / f"{case.name}.nii.gz").is_file():
            return False
        return case.status not in (Status.LABELED, Status.CORRECTED) or sparse.completes_with_prediction(case)

    def _add_prediction(self, case: SceneCase, files: review.PredictionFiles, labels: Dict[int, str],
                        colors: Dict[int, tuple]) -> None:
        """The scene part of loading one case's prediction (GUI thread)."""
        class_order = [labels[value] for value in sorted(labels) if value > 0]
        completes = sparse.completes_with_prediction(case)
        annotated = sparse.user_label(case, class_order) if completes else None
        previous = self._pseudo_label_nodes(case)  # replaced only once the new one has loaded
        prediction = review.add_prediction(case.volume, files, labels, colors, threshold=self.confidence_threshold)
        if completes:
            try:
                prediction = sparse.complete_with_prediction(case, annotated, prediction, class_order)
            except BaseException:
                review.remove_nodes(self.scene, [prediction.segmentation, prediction.confidence])
                raise
            if case.segmentation.GetDisplayNode() is not None:  # the user's own stays in the scene, hidden
                case.segmentation.GetDisplayNode().SetVisibility(False)
        review.remove_nodes(self.scene, previous)
        case_utils.set_case_segmentation(case.volume, prediction.segmentation,
                                         Status.LABELED if completes else Status.PSEUDO_LABELED)
        self.review_items[case.name] = ReviewItem(case.name, prediction)

    def restore_review_from_scene(self) -> List[ReviewItem]:
        """The review as it was before the module was reloaded or Slicer reopened with the saved
        scene: pseudo labels (also those being corrected) that the module loaded carry their
        review numbers, so ranking, the uncertainty column and Jump come back without reading a
        file or touching a node (see :func:`review.prediction_in_scene`). Returns the cases
        restored, most uncertain first."""
        restored = []
        for case in self.cases():
            if case.name in self.review_items or not sparse.can_accept(case):  # (a completed sparse case too)
                continue
            prediction = review.prediction_in_scene(case.volume, case.segmentation)
            if prediction is not None:
                self.review_items[case.name] = ReviewItem(case.name, prediction)
                restored.append(case.name)
        return [item for item in self.ranked_review() if item.case_name in restored]

    def unloaded_predictions(self) -> Optional[PendingPredictions]:
        """Pseudo labels on disk that the scene lacks: the newest ``WORK/predictions/run-NNN``
        whose run still has its class table, and the scene's unlabeled cases without any
        segmentation that it holds a prediction for (e.g. Slicer reopened and the volumes loaded
        again). None when there is nothing to load. Reads the working folder: called when the
        module is entered, never per scene change."""
        if self.working_dir is None:
            return None
        predictions = self._work() / "predictions"
        folders = sorted((p for p in predictions.iterdir() if p.is_dir() and re.fullmatch(r"run-\d{3,}", p.name)),
                         key=lambda p: int(p.name.split("-")[1])) if predictions.is_dir() else []
        for out_dir in reversed(folders):
            run_dir = self.runs_dir / out_dir.name
            if not (run_dir / "dataset.json").is_file():
                continue
            names = [case.name for case in self.cases()
                     if case.status == Status.UNLABELED and case.segmentation is None
                     and (out_dir / f"{case.name}.nii.gz").is_file()
                     and (out_dir / "confidence" / f"{case.name}.nii.gz").is_file()]
            return PendingPredictions(run_dir, out_dir, names) if names else None
        return None

    @staticmethod
    def _pseudo_label_nodes(case: SceneCase) -> list:
        """The module-made pseudo label and confidence map of a case, which a new prediction replaces."""
        nodes = [case.volume.GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE)]
        if case.status == Status.PSEUDO_LABELED:
            nodes.append(case.segmentation)
        return [node for node in nodes if node is not None]

    def ranked_review(self) -> List[ReviewItem]:
        """Pseudo-labeled cases, most uncertain first: correcting those teaches the model most."""
        return sorted(self.review_items.values(), key=lambda item: item.prediction.uncertainty, reverse=True)

    def jump_to_least_confident(self, case_name: str) -> tuple:
        """Centre the slice views on the case's least confident region; return that RAS point."""
        item = self.review_items.get(case_name)
        if item is None:
            raise PLBOptSlicerError(f"{case_name}: no pseudo label loaded for review")
        review.jump_slices_to(self.scene, item.prediction.least_confident_ras)
        return item.prediction.least_confident_ras

    def show_case(self, case_name: str) -> Optional["slicer.vtkMRMLScalarVolumeNode"]:
        """Show this case's segmentation and hide the other cases' ones; return its confidence map.

        Only segmentations of the module's cases are touched: anything else the user has in the
        scene keeps its visibility.
        """
        selected = case_utils.find_case(self.scene, case_name)
        for case in self.cases():
            if case.segmentation is not None and case.segmentation.GetDisplayNode() is not None:
                case.segmentation.GetDisplayNode().SetVisibility(case.name == selected.name)
        return selected.volume.GetNodeReference(review.CONFIDENCE_REFERENCE_ROLE)

    def show_in_3d(self, case_name: str) -> "slicer.vtkMRMLSegmentationNode":
        """Build the case's segmentation surfaces and show them in the 3D view."""
        case = case_utils.find_case(self.scene, case_name)
        if case.segmentation is None:
            raise PLBOptSlicerError(f"{case_name}: has no segmentation to show in 3D")
        if not case.segmentation.CreateClosedSurfaceRepresentation():
            raise PLBOptSlicerError(f"{case.segmentation.GetName()}: could not build the 3D surfaces")
        display = case.segmentation.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility3D(True)
        return case.segmentation

    def set_confidence_threshold(self, threshold: float) -> None:
        """Confidence at or above which the overlay is transparent, for the maps in the scene (they
        share one colour table) and those loaded later."""
        self.confidence_threshold = float(threshold)
        if review.find_confidence_color_node(self.scene) is not None:
            review.confidence_color_node(self.scene, self.confidence_threshold)

    # ---- correction --------------------------------------------------------------------------
    def begin_correction(self, case_name: str) -> "slicer.vtkMRMLSegmentationNode":
        """Mark a pseudo-labeled case as being corrected and return the segmentation to edit."""
        case = case_utils.find_case(self.scene, case_name)
        if case.segmentation is None:
            raise PLBOptSlicerError(f"{case_name}: has no segmentation to correct; predict it first")
        if case.status != Status.LABELED:
            case_utils.set_status(case.volume, Status.CORRECTED)
        return case.segmentation

    def accept_as_labeled(self, case_name: str) -> Path:
        """Promote a (corrected) pseudo label to a training label: saved as ``WORK/corrected/<case>.seg.nrrd``.

        Its segment names must match the labeled cases' classes; the next export puts it in labelsTr.
        The case is then fully annotated (a sparse case's marking of annotated slices is removed).
        """
        case = case_utils.find_case(self.scene, case_name)
        if case.segmentation is None:
            raise PLBOptSlicerError(f"{case_name}: has no segmentation to accept")
        case_utils.check_segmentation_geometry(case)
        promoted = SceneCase(case.name, case.volume, case.segmentation, Status.LABELED)
        others = [c for c in self.used_cases() if c.trains_supervised and c.name != case.name]
        case_utils.class_names(others + [promoted])  # raises if its segment names disagree
        path = self._work() / "corrected" / f"{case.name}.seg.nrrd"
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = case.segmentation.GetStorageNode()
        if storage is None:
            case.segmentation.AddDefaultStorageNode()
            storage = case.segmentation.GetStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(case.segmentation):
            raise PLBOptSlicerError(f"{path}: could not write the segmentation")
        case_utils.set_case_segmentation(case.volume, case.segmentation, Status.LABELED)
        sparse.set_fully_annotated(case.volume)
        self.review_items.pop(case.name, None)
        self.log_callback(f"{case_name}: accepted as labeled ({path})")
        return path
