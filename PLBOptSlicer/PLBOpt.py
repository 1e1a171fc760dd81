"""PLBOpt: semi-supervised CT segmentation in 3D Slicer (train, review pseudo labels, correct, retrain).

Thin Module/Widget/Logic/Test classes; the work lives in PLBOptLib, which has no qt/ctk imports
and runs headless. Training and prediction run PLBOptCore in a child process (PythonSlicer), so
torch is never imported into Slicer and the application stays responsive.
"""

import logging
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

try:  # Slicer's translation functions (lupdate finds _() and translate() calls in this file)
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # a Slicer or slicer-core without slicer.i18n: the English text
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

from PLBOptLib import (DEVICES, DOCUMENTATION_URL, PRESETS, TUTORIAL_URL, JobProcess, PLBOptSlicerError,
                       TrainSettings, WorkflowLogic, bundle, dependencies, panel, selftest, sparse)
from PLBOptLib.events import TrainingProgress
from PLBOptLib.review import DEFAULT_CONFIDENCE_THRESHOLD, OVERLAY_OPACITY

POLL_INTERVAL_MS = 1000
EXPORT_STEP_INTERVAL_MS = 10  # one case read from the scene per tick; the GUI handles events in between
SCENE_REFRESH_DELAY_MS = 300  # one case-table refresh for a burst of node additions/removals
MAX_LOG_CHARACTERS = 256 * 1024  # the log box gets slow beyond this; older lines are dropped


class PLBOpt(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PLBOpt")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["PLBOpt contributors"]
        self.parent.helpText = _("""
Semi-supervised 3D CT segmentation with pseudo-label optimisation.
<ol>
<li><b>Dependencies</b>: installs torch (through the PyTorch extension) and a few small packages on first use,
after asking; PLBOptCore itself comes with the extension.</li>
<li><b>Dataset</b>: the ticked volumes of the case table are cases (a PET, dose grid or resampled copy is
unticked by default, with the reason shown); a volume with a segmentation is labeled. Segment names
are the classes and must be the same in every labeled case. Export writes the working folder's dataset.</li>
<li><b>Train</b>: choose a preset and schedule, Start; Cancel keeps a resumable checkpoint, Resume continues.</li>
<li><b>Review</b>: predicts refined pseudo labels and confidence maps for unlabeled cases, ranked by
uncertainty; jump to the least confident region.</li>
<li><b>Correct</b>: edit the pseudo label in Segment Editor, Accept as labeled, then Retrain (fine-tunes).</li>
</ol>
Python console: <code>logic = slicer.util.getModuleLogic("PLBOpt")</code>.
<br>Method: Ji, Ye, Ma, "Pseudo Label Optimization for Semi-Supervised Medical Image Segmentation".
""") + _('<p>See the <a href="{url}">module documentation</a> for the step-by-step workflow, supported Slicer '
         'versions and what was tested where.</p>').format(url=DOCUMENTATION_URL) + _(
            '<p>New to PLBOpt? The <a href="{url}">tutorial</a> goes through every step with a synthetic CT '
            'phantom you can load.</p>').format(url=TUTORIAL_URL)
        self.parent.acknowledgementText = _("""
PLBOpt builds on DHC (Wang &amp; Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for
Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023). The extension layout follows
SlicerTotalSegmentator and SlicerMONAIAuto3DSeg; torch comes from the SlicerPyTorch extension.
""")


@parameterNodeWrapper
class PLBOptParameterNode:
    workingFolder: Path
    preset: Annotated[str, Choice(list(PRESETS))] = "plbopt"
    iterations: Annotated[int, WithinRange(1, 1000000)] = 2000
    patchZ: Annotated[int, WithinRange(8, 512)] = 48
    patchY: Annotated[int, WithinRange(8, 512)] = 96
    patchX: Annotated[int, WithinRange(8, 512)] = 96
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    baseFilters: Annotated[int, WithinRange(0, 256)] = 0  # 0 = the preset's width
    confidenceThreshold: Annotated[float, WithinRange(0.5, 1.0)] = DEFAULT_CONFIDENCE_THRESHOLD


class TimerSteps:
    """Runs staged work (PLBOptLib.logic.StagedStart or StagedLoad: ``advance()`` → over,
    ``fraction``, ``progress_text``, ``cancel()``) one step per timer tick under a busy cursor, so
    that Slicer stays usable, and shows its progress; then calls ``finished(work)``, or
    ``failed(work, error)`` when a step raised."""

    def __init__(self, progressBar, progressLabel, finished, failed, changed) -> None:
        self.work = None
        self._progressBar, self._progressLabel = progressBar, progressLabel
        self._finished, self._failed, self._changed = finished, failed, changed
        self._timer = qt.QTimer()
        self._timer.setInterval(EXPORT_STEP_INTERVAL_MS)
        self._timer.connect("timeout()", self._step)

    def start(self, work) -> None:
        self.stop()
        self.work = work
        qt.QApplication.setOverrideCursor(qt.Qt.BusyCursor)
        self._progressBar.setValue(0)
        self._progressLabel.text = work.progress_text
        self._timer.start()
        self._changed()

    def stop(self, cancel: bool = True) -> None:
        """Stop stepping (and cancel the work unless it is over)."""
        if self.work is None:
            return
        if cancel:
            self.work.cancel()
        self._timer.stop()
        self.work = None
        qt.QApplication.restoreOverrideCursor()

    def _step(self) -> None:
        work = self.work
        if work is None:
            self._timer.stop()
            return
        try:
            over = work.advance()
        except Exception as error:  # noqa: BLE001 - shown to the user by failed()
            self.stop(cancel=False)
            self._progressLabel.text = str(error)
            self._failed(work, error)
            return
        self._progressBar.setValue(int(round(1000 * work.fraction)))
        self._progressLabel.text = work.progress_text
        if over:
            self.stop(cancel=False)
            self._finished(work)


class PLBOptWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: dependency check, case table, training with progress, review and correction."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[PLBOptLogic] = None
        self._parameterNode: Optional[PLBOptParameterNode] = None
        self._parameterNodeGuiTag = None
        self._trainingJob = None
        self._predictionJob = None
        self.exportSteps = None  # Export/Start/Retrain while the dataset is exported (TimerSteps of a StagedStart)
        self.loadSteps = None  # pseudo labels being loaded, one case per tick (TimerSteps of a StagedLoad)
        self._probeJob = None  # child interpreter telling which torch/device training gets
        self._devicePrompted = False
        self.selection = panel.CaseSelection()  # by volume node ID: rows move when the table is rebuilt
        self.editTracker = sparse.EditTracker()  # slices edited in Segment Editor since "Track edits"
        self._declinedReviews = set()  # prediction folders the user chose not to load (asked once per scene)

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PLBOpt.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PLBOptLogic()
        self.logic.log_callback = self.appendLog
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)
        self.exportSteps = TimerSteps(self.ui.progressBar, self.ui.progressLabel, self.onStagedStartFinished,
                                      self.onStagedStartFailed, self.updateButtons)
        self.loadSteps = TimerSteps(self.ui.progressBar, self.ui.progressLabel, self.onPseudoLabelsLoaded,
                                    self.onPseudoLabelsLoadFailed, self.updateButtons)
        self.sceneRefreshTimer = qt.QTimer()
        self.sceneRefreshTimer.setSingleShot(True)
        self.sceneRefreshTimer.setInterval(SCENE_REFRESH_DELAY_MS)
        self.sceneRefreshTimer.connect("timeout()", self.refreshCaseTable)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # Node additions/removals and scene imports are observed only while the module is shown
        # (enter/exit); a burst of them rebuilds the table once, from the scene and from what the
        # logic read from the working folder before (no disk access per node).
        self.sceneWatch = panel.SceneWatch(slicer.mrmlScene, lambda: self.sceneRefreshTimer.start(),
                                           self.onSceneImported)

        self.ui.checkDependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self.ui.refreshCasesButton.connect("clicked(bool)", self.onRefreshCases)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.startButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelTraining)
        self.ui.cancelPredictionButton.connect("clicked(bool)", self.onCancelPrediction)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3D)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeTraining)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.casesTable.connect("itemSelectionChanged()", self.onCaseSelected)
        self.ui.casesTable.connect("itemChanged(QTableWidgetItem*)", self.onCaseItemChanged)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpToLeastConfident)
        self.ui.editButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.acceptButton.connect("clicked(bool)", self.onAcceptAsLabeled)
        self.ui.annotatedAxisComboBox.addItems(list(sparse.AXES))
        for button, how in ((self.ui.markSegmentSlicesButton, "segments"), (self.ui.trackEditsButton, "track"),
                            (self.ui.markEditedSlicesButton, "edited"), (self.ui.fullyAnnotatedButton, "all")):
            button.connect("clicked(bool)", lambda checked=False, how=how: self.onMarkAnnotatedSlices(how))
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrain)

        self.initializeParameterNode()
        self.refreshCaseTable()
        self.updateButtons()

    def cleanup(self) -> None:
        """Module unloaded: stop polling (a running job keeps running and can be resumed)."""
        self.pollTimer.stop()
        self.sceneRefreshTimer.stop()
        self.sceneWatch.stop()
        self.exportSteps.stop()
        self.loadSteps.stop()
        self.removeObservers()

    def onRefreshCases(self) -> None:
        self.logic.forget_folder_facts()  # runs or exports made outside this panel show up now
        self.refreshCaseTable()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.sceneWatch.start()
        self.logic.forget_folder_facts()
        self.refreshCaseTable()  # catches up with what changed while the module was closed
        self._reattachRunningTraining()
        self._restoreReview()

    def onSceneImported(self, caller=None, event=None) -> None:
        """A scene was loaded while the module is shown: its pseudo labels come back for review."""
        self._restoreReview()

    def _restoreReview(self) -> None:
        """The review of an earlier session (saved scene, or prediction files of the working
        folder), shown as after a prediction in this session: ranked, most uncertain case selected."""
        self._syncLogicWithParameters()
        restored = []
        with slicer.util.tryWithErrorDisplay(_("Could not load the pseudo labels."), waitCursor=True):
            restored = panel.restore_review(
                self.logic, lambda question: slicer.util.confirmYesNoDisplay(question, _("PLBOpt: pseudo labels found")),
                self._declinedReviews, load=self._loadPredictionsInSteps)
        if not restored:
            return
        self.appendLog(_("Review of {count} pseudo labels restored, most uncertain first").format(count=len(restored)))
        self.refreshCaseTable()
        if self.selection.volume_id is None:
            self.ui.casesTable.selectRow(0)

    def _reattachRunningTraining(self) -> None:
        """Follow a training that an earlier Slicer session started and left running."""
        self._syncLogicWithParameters()
        runDir = panel.training_to_reattach(self.logic, self._trainingJob)
        if runDir is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not follow the running training.")):
            self._trainingJob = self.logic.reattach_training(runDir)
            self.showProgress(self._trainingJob.progress)
            self.pollTimer.start()
        self.updateButtons()

    def onAboutToQuit(self) -> None:
        """Slicer closes: ask whether to stop a running training (it would outlive Slicer)."""
        question = panel.exit_question(self._trainingJob)
        if question and slicer.util.confirmYesNoDisplay(question, _("PLBOpt: training is running")):
            self._trainingJob.cancel()
        if self._predictionJob is not None and self._predictionJob.process.running:
            self._predictionJob.cancel()  # nothing would load its output once Slicer is gone

    def exit(self) -> None:
        self.sceneWatch.stop()
        self.sceneRefreshTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            # Nothing the panel shows needs updating while it is closed (enter reconnects).
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.loadSteps.stop()  # its cases are about to go
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.logic.review_items.clear()
        self._declinedReviews.clear()  # another scene: its pseudo labels may be offered again
        if self.parent.isEntered:  # a closed module catches up on enter
            self.initializeParameterNode()
            self.refreshCaseTable()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if str(parameterNode.workingFolder) in ("", "."):
            parameterNode.workingFolder = Path(slicer.app.defaultScenePath) / "PLBOpt"
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode: Optional[PLBOptParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.logic.set_confidence_threshold(self._parameterNode.confidenceThreshold)
        self.updateButtons()

    # ---- state shown in the panel ------------------------------------------------------------
    def _syncLogicWithParameters(self) -> None:
        self.logic.working_dir = WorkflowLogic.working_folder_from_text(str(self._parameterNode.workingFolder))

    def _busy(self) -> bool:
        return self.exportSteps.work is not None or self.loadSteps.work is not None or any(
            job is not None and job.process.running for job in (self._trainingJob, self._predictionJob))

    def updateButtons(self, caller=None, event=None) -> None:
        busy = self._busy()
        training = self._trainingJob is not None and self._trainingJob.process.running
        exporting = self.exportSteps.work
        predicting = self._predictionJob is not None and self._predictionJob.process.running
        hasRun = False
        if self._parameterNode:
            self._syncLogicWithParameters()
            hasRun = self.logic.has_trained_run()
        selected = self.selectedCase()
        for button in (self.ui.exportButton, self.ui.startButton):
            button.enabled = not busy
        self.ui.cancelButton.enabled = (exporting is not None and not exporting.export.cancelled) or (
            training and not self._trainingJob.process.cancel_requested)
        loading = self.loadSteps.work is not None and not self.loadSteps.work.cancelled
        self.ui.cancelPredictionButton.enabled = loading or (predicting and not self._predictionJob.process.cancel_requested)
        self.ui.show3DButton.enabled = selected is not None and selected.segmentation is not None
        self.ui.resumeButton.enabled = not busy and hasRun
        self.ui.predictButton.enabled = not busy and hasRun
        self.ui.retrainButton.enabled = not busy and hasRun
        self.ui.jumpButton.enabled = selected is not None and selected.name in self.logic.review_items
        self.ui.editButton.enabled = selected is not None and selected.segmentation is not None
        self.ui.acceptButton.enabled = selected is not None and sparse.can_accept(selected)
        for button in (self.ui.markSegmentSlicesButton, self.ui.trackEditsButton, self.ui.markEditedSlicesButton,
                       self.ui.fullyAnnotatedButton):
            button.enabled = selected is not None

    def appendLog(self, text: str) -> None:
        if len(self.ui.logTextEdit.toPlainText()) > MAX_LOG_CHARACTERS:
            self.ui.logTextEdit.clear()
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def refreshCaseTable(self) -> None:
        """Case table: volumes of the scene, most uncertain pseudo labels first. The selected case
        stays selected wherever its row moves (the selection is its volume's node ID)."""
        table = self.ui.casesTable
        rows = panel.case_rows(self.logic)
        wasBlocked = table.blockSignals(True)  # rebuilding is no selection by the user
        try:
            table.setRowCount(len(rows))
            for index, row in enumerate(rows):
                for column, text in enumerate(row.cells):
                    item = qt.QTableWidgetItem(text)
                    item.setData(qt.Qt.UserRole, row.volume_id)
                    if column == 0:  # the tick: whether the export uses this volume as a case
                        item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                        item.setCheckState(qt.Qt.Checked if row.used else qt.Qt.Unchecked)
                        item.setToolTip(row.cells[4] or _("Used for training; untick to leave it out"))
                    table.setItem(index, column, item)
            selectedRow = self.selection.row_in(rows)
            if selectedRow is None:
                table.clearSelection()
            else:
                table.selectRow(selectedRow)
        finally:
            table.blockSignals(wasBlocked)
        table.resizeColumnsToContents()
        try:
            names = self.logic.class_names()
            self.ui.classesLabel.text = _("Classes: {names}").format(names=", ".join(names))
        except PLBOptSlicerError as error:
            self.ui.classesLabel.text = str(error)
        self.updateButtons()

    def selectedCase(self):
        return self.selection.case(self.logic)

    def showProgress(self, progress: TrainingProgress) -> None:
        self.ui.progressBar.setValue(int(round(1000 * progress.fraction)))
        self.ui.progressLabel.text = progress.summary()

    # ---- dependencies ------------------------------------------------------------------------
    def onCheckDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Dependency check failed.")):
            self.ensureDependencies(askToInstall=True)

    def ensureDependencies(self, askToInstall: bool) -> bool:
        """True when jobs can start. Asks once, listing every package, before installing anything;
        offers a restart when an installed package replaced one Slicer had already loaded."""
        status = dependencies.check_dependencies()
        self.ui.dependencyStatusLabel.text = _("{summary}; PLBOptCore: bundled").format(summary=status.summary())
        if not status.ready:
            if not askToInstall:
                return False
            coreDir = bundle.core_root() / bundle.CORE_PACKAGE
            if not slicer.util.confirmOkCancelDisplay(status.install_description(coreDir), _("PLBOpt: install packages")):
                return False
            restartReasons = self.logic.install_dependencies(status)
            status = dependencies.check_dependencies()
            self.ui.dependencyStatusLabel.text = _("{summary}; PLBOptCore: bundled").format(summary=status.summary())
            if restartReasons and self._restartSlicer(restartReasons):
                return False
            if not status.ready:
                raise PLBOptSlicerError(_("installation finished but packages are still missing: {summary}").format(
                    summary=status.summary()))
        if not self._devicePrompted and self._probeJob is None:
            # Importing torch takes seconds: ask a child in the background, the panel stays usable.
            self.ui.deviceStatusLabel.text = _("Checking which device training will use…")
            self._probeJob = JobProcess(dependencies.torch_probe_command(self.logic.job_python()),
                                        environment=self.logic.job_environment()).start()
            self.pollTimer.start()
        return True

    def _restartSlicer(self, reasons) -> bool:
        """Restart after asking (panel.restart_question); with unsaved data the user can save them
        first, as Slicer's own close question offers. False: Slicer keeps running."""
        while True:
            question = panel.restart_question(slicer.mrmlScene, reasons)
            box = qt.QMessageBox(slicer.util.mainWindow())
            box.setWindowTitle(_("PLBOpt: restart recommended"))
            box.setIcon(qt.QMessageBox.Question)
            box.setText(question.text)
            buttons = [(box.addButton(text, qt.QMessageBox.ActionRole), choice) for choice, text in question.choices]
            box.exec_()
            clicked = box.clickedButton()
            choice = next((choice for button, choice in buttons if button == clicked), panel.RestartChoice.CANCEL)
            saved = slicer.app.ioManager().openSaveDataDialog() if choice == panel.RestartChoice.SAVE else None
            step = panel.after_restart_choice(choice, saved, panel.unsaved_data(slicer.mrmlScene) if saved else ())
            if step == panel.RestartStep.RESTART:
                slicer.util.restart()
                return True
            if step == panel.RestartStep.STAY:
                self.appendLog(_("Slicer not restarted: the new packages are used after its next restart"))
                return False

    def _pollProbe(self) -> None:
        self._probeJob.poll()
        if self._probeJob.running:
            return
        try:
            message = dependencies.device_message(dependencies.parse_torch_probe(list(self._probeJob.output),
                                                                                self._probeJob.returncode))
        except (RuntimeError, ValueError) as error:
            message = str(error)
        self.ui.deviceStatusLabel.text = message
        self.appendLog(message)
        self._devicePrompted = True
        self._probeJob = None

    # ---- dataset and training ----------------------------------------------------------------
    def trainSettings(self) -> TrainSettings:
        return self.logic.settings_from_parameter_node(self._parameterNode)

    def onExport(self) -> None:
        self._syncLogicWithParameters()
        self._beginStagedStart(self._validated(_("Dataset export failed."), self.logic.staged_export))

    @staticmethod
    def _validated(failure: str, makeStaged):
        """The StagedStart ``makeStaged`` builds (it validates every case, which may take a moment:
        wait cursor), or None after showing why it cannot start."""
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            return makeStaged()
        return None

    def _beginStagedStart(self, staged) -> None:
        """Export step by step from a timer (the files are written on a worker thread), then start
        the job, if any."""
        if staged is not None:
            self.exportSteps.start(staged)

    def onStagedStartFailed(self, staged, error) -> None:
        if not staged.export.cancelled:
            slicer.util.errorDisplay(_("Could not export the dataset: {error}").format(error=error))
        self.refreshCaseTable()

    def onStagedStartFinished(self, staged) -> None:
        if staged.job is not None:
            self._trainingStarted(staged.job)
        self.refreshCaseTable()

    def _trainingStarted(self, job) -> None:
        self._trainingJob = job
        self.ui.progressBar.setValue(0)
        self.ui.progressLabel.text = TrainingProgress().summary()
        self.pollTimer.start()

    def _startTraining(self, staged) -> None:
        """Start/Retrain: dependencies, then the staged export and the job; ``staged`` builds the
        StagedStart (validating the cases, which raises with the reason)."""
        self._syncLogicWithParameters()
        ready = False
        with slicer.util.tryWithErrorDisplay(_("Could not start training.")):
            ready = self.ensureDependencies(askToInstall=True)  # may ask: no wait cursor over its dialogs
        if ready:
            self._beginStagedStart(self._validated(_("Could not start training."), staged))

    def onStartTraining(self) -> None:
        self._startTraining(lambda: self.logic.staged_training(self.trainSettings()))

    def onRetrain(self) -> None:
        self._startTraining(lambda: self.logic.staged_retrain(self.trainSettings()))

    def onResumeTraining(self) -> None:
        self._syncLogicWithParameters()
        with slicer.util.tryWithErrorDisplay(_("Could not resume training.")):
            if not self.ensureDependencies(askToInstall=True):
                return
            self._trainingStarted(self.logic.resume_training(self.trainSettings()))
        self.refreshCaseTable()

    def onCancelTraining(self) -> None:
        if self.exportSteps.work is not None:
            self.appendLog(_("Cancelling the dataset export; no training is started"))
            self.exportSteps.work.cancel()  # the export stops after the file being written, then fails
            self.updateButtons()
        elif self._trainingJob is not None:
            self.appendLog(_("Cancelling: the trainer saves a checkpoint at the end of the current step…"))
            self._trainingJob.cancel()
            self.updateButtons()

    def onCancelPrediction(self) -> None:
        if self.loadSteps.work is not None:
            self.appendLog(_("Cancelling the loading of pseudo labels; those loaded stay for review"))
            self.loadSteps.work.cancel()  # stops after the case being read
            self.updateButtons()
        elif self._predictionJob is not None:
            self.appendLog(_("Cancelling the prediction…"))
            self._predictionJob.cancel()
            self.updateButtons()

    def onPollTimer(self) -> None:
        if self._trainingJob is not None:
            for line in self._trainingJob.poll():
                self.appendLog(line)
            self.showProgress(self._trainingJob.progress)
            if self._trainingJob.finished:
                self.logic.forget_folder_facts()  # a checkpoint may now exist for Predict/Retrain/Resume
                self.onTrainingFinished(self._trainingJob)
                self._trainingJob = None
        if self._predictionJob is not None:
            for line in self._predictionJob.process.poll():
                self.appendLog(line)
            if not self._predictionJob.process.running:
                self.onPredictionFinished(self._predictionJob)
                self._predictionJob = None
        if self._probeJob is not None:
            self._pollProbe()
        if not self._busy() and self._probeJob is None:
            self.pollTimer.stop()
        self.updateButtons()

    def onTrainingFinished(self, job) -> None:
        kind, message = panel.training_finished_message(job)
        if kind == "error":
            slicer.util.errorDisplay(message, detailedText="\n".join(job.process.output))
        else:
            self.appendLog(message)

    # ---- review ------------------------------------------------------------------------------
    def onPredict(self) -> None:
        self._syncLogicWithParameters()
        with slicer.util.tryWithErrorDisplay(_("Could not start prediction.")):
            if not self.ensureDependencies(askToInstall=True):
                return
            self._predictionJob = self.logic.start_prediction()
            self.ui.progressLabel.text = _("Predicting pseudo labels for the unlabeled cases…")
            self.pollTimer.start()
        self.updateButtons()

    def onPredictionFinished(self, job) -> None:
        if job.process.cancel_requested:
            self.ui.progressLabel.text = _("Prediction cancelled")
            return
        if job.process.returncode != 0:
            slicer.util.errorDisplay(_("Prediction failed: {reason}").format(reason=job.process.failure_message()),
                                     detailedText="\n".join(job.process.output))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the pseudo labels.")):
            self.loadSteps.start(self.logic.staged_load_predictions(job.run_dir, job.out_dir))

    def _loadPredictionsInSteps(self, pending) -> list:
        """panel.restore_review's loader: the offered predictions load from the timer; none yet."""
        self.loadSteps.start(self.logic.staged_load_predictions(pending.run_dir, pending.out_dir, pending.case_names))
        return []

    def onPseudoLabelsLoadFailed(self, staged, error) -> None:
        slicer.util.errorDisplay(_("Could not load the pseudo labels: {error}").format(error=error))
        self.refreshCaseTable()

    def onPseudoLabelsLoaded(self, staged) -> None:
        ranked = staged.ranked
        self.ui.progressLabel.text = _("{count} pseudo labels loaded, most uncertain first").format(count=len(ranked))
        self.refreshCaseTable()
        if ranked and self.selection.volume_id is None:
            self.ui.casesTable.selectRow(0)
        self.updateButtons()

    def onCaseSelected(self) -> None:
        items = self.ui.casesTable.selectedItems()
        self.selection.select(items[0].data(qt.Qt.UserRole) if items else None)
        case = self.selectedCase()
        self.updateButtons()
        if case is None:
            return
        confidence = self.logic.show_case(case.name)
        # Confident voxels are clear through the colour table; doubtful ones tint the CT.
        slicer.util.setSliceViewerLayers(background=case.volume, foreground=confidence,
                                         foregroundOpacity=OVERLAY_OPACITY if confidence else 0.0, fit=True)

    def onCaseItemChanged(self, item) -> None:
        """The user ticked or unticked a case (rebuilding the table blocks this signal)."""
        if item.column() != 0:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not change which cases are used.")):
            self.logic.set_case_use(item.data(qt.Qt.UserRole), item.checkState() == qt.Qt.Checked)
        self.sceneRefreshTimer.start()  # the reasons and classes change; not rebuilt inside the table's own signal

    def onShow3D(self) -> None:
        case = self.selectedCase()
        with slicer.util.tryWithErrorDisplay(_("Could not show the segmentation in 3D."), waitCursor=True):
            self.logic.show_in_3d(case.name)
            slicer.app.layoutManager().threeDWidget(0).threeDView().resetFocalPoint()

    def onJumpToLeastConfident(self) -> None:
        case = self.selectedCase()
        with slicer.util.tryWithErrorDisplay(_("Could not jump to the least confident region.")):
            self.logic.jump_to_least_confident(case.name)

    # ---- correction --------------------------------------------------------------------------
    def onEditInSegmentEditor(self) -> None:
        case = self.selectedCase()
        with slicer.util.tryWithErrorDisplay(_("Could not open Segment Editor.")):
            segmentation = self.logic.begin_correction(case.name)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.SegmentEditorWidget.editor
            editor.setSegmentationNode(segmentation)
            editor.setSourceVolumeNode(case.volume)
        self.refreshCaseTable()

    def onAcceptAsLabeled(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not accept the segmentation."), waitCursor=True):
            panel.accept_selected(self.logic, self.selection)
        self.refreshCaseTable()

    def onMarkAnnotatedSlices(self, how: str) -> None:
        """The annotated-slices buttons (see :func:`PLBOptLib.sparse.apply_marking`)."""
        with slicer.util.tryWithErrorDisplay(_("Could not mark the annotated slices."), waitCursor=True):
            case = self.selection.require_case(self.logic)
            self.appendLog(sparse.apply_marking(case, how, self.ui.annotatedAxisComboBox.currentText, self.editTracker))
        self.refreshCaseTable()


class PLBOptLogic(ScriptedLoadableModuleLogic, WorkflowLogic):
    """Python-console API of the module (all methods of :class:`PLBOptLib.WorkflowLogic`), e.g.::

        logic = slicer.util.getModuleLogic("PLBOpt")  # or PLBOpt.PLBOptLogic()
        logic.working_dir = Path("~/plbopt-work").expanduser()
        job = logic.start_training(TrainSettings(preset="plbopt", iterations=500, device="cpu"))
        job.wait()                                   # or poll job.poll() / job.progress from a timer
        prediction = logic.start_prediction(); prediction.process.wait()
        ranked = logic.load_predictions(prediction.run_dir, prediction.out_dir)
    """

    def __init__(self, working_dir: Optional[Path] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        WorkflowLogic.__init__(self, slicer.mrmlScene, working_dir=working_dir)

    def getParameterNode(self) -> PLBOptParameterNode:
        return PLBOptParameterNode(super().getParameterNode())

    @staticmethod
    def settings_from_parameter_node(parameterNode: PLBOptParameterNode) -> TrainSettings:
        return TrainSettings(preset=parameterNode.preset, iterations=parameterNode.iterations,
                             patch_size=(parameterNode.patchZ, parameterNode.patchY, parameterNode.patchX),
                             device=parameterNode.device, base_filters=parameterNode.baseFilters or None)

    def install_dependencies(self, status) -> list:
        """Install torch (PyTorch extension) and the missing light packages, never replacing
        SimpleITK; returns why a restart is needed (empty when it is not)."""
        names = dependencies.packages_an_install_may_change(status)
        before, loaded = dependencies.installed_versions(names), set(sys.modules)
        if not status.torch_ok:
            dependencies.install_torch(self.log_callback)
        dependencies.install_light(status.missing_light, self.log_callback)
        return dependencies.restart_reasons(before, dependencies.installed_versions(names), imported=loaded)


class PLBOptTest(ScriptedLoadableModuleTest):
    """Workflow on a tiny synthetic volume: export, 2 CPU training steps, prediction, review, accept."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_review_loop_without_torch()
        self.setUp()
        self.test_workflow_on_synthetic_volumes()

    def test_review_loop_without_torch(self) -> None:
        """Load a synthetic prediction, jump, correct and accept, through the real segmentations logic."""
        self.delayDisplay("Review loop on a synthetic prediction (no torch needed)")
        result = selftest.run_review_self_test(slicer.mrmlScene, Path(tempfile.mkdtemp(prefix="PLBOptReview-")))
        self.assertEqual(result.ranked, ["selftest_unlabeled"])
        self.assertLess(float(np.linalg.norm(np.subtract(result.jumped_to, result.expected_jump))), 2.0)
        self.assertTrue(result.accepted.is_file())
        self.assertEqual(result.labeled_after_accept, ["selftest_labeled", "selftest_unlabeled"])
        self.delayDisplay("Review loop passed")

    def _addVolume(self, name: str, seed: int):
        rng = np.random.default_rng(seed)
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in (16, 32, 32)], indexing="ij")
        organ = (x / 0.5) ** 2 + (y / 0.4) ** 2 + (z / 0.7) ** 2 < 1
        image = (np.where(organ, 100.0, 0.0) + rng.normal(0, 5, organ.shape)).astype(np.float32)
        volume = slicer.util.addVolumeFromArray(image, name=name)
        volume.SetSpacing(0.8, 0.8, 2.0)
        return volume, organ

    def test_workflow_on_synthetic_volumes(self) -> None:
        self.delayDisplay("Creating a labeled and an unlabeled synthetic volume")
        labeled, organ = self._addVolume("labeled", 0)
        self._addVolume("unlabeled", 1)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labeled segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labeled)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("organ", "organ", [0.9, 0.3, 0.2])
        slicer.util.updateSegmentBinaryLabelmapFromArray(organ.astype(np.uint8), segmentation, segmentId, labeled)

        logic = PLBOptLogic(Path(tempfile.mkdtemp(prefix="PLBOptTest-")))
        exported = logic.export_dataset()
        self.assertEqual(exported.class_names, ["organ"])
        self.assertEqual((exported.labeled, exported.unlabeled), (["labeled"], ["unlabeled"]))

        if not dependencies.check_dependencies().ready:
            self.delayDisplay("torch/PLBOptCore not installed: training steps skipped (export checked)")
            return
        self.delayDisplay("Training 2 steps on the CPU")
        settings = TrainSettings(preset="plbopt", iterations=2, patch_size=(16, 32, 32), device="cpu", base_filters=4,
                                 overrides={"checkpoint_every": 1, "validate_every": 1000, "log_every": 1})
        progress = logic.start_training(settings, export=False).wait(timeout=600)
        self.assertEqual(progress.status, "completed", progress.message)

        self.delayDisplay("Predicting and loading the pseudo label")
        prediction = logic.start_prediction()
        self.assertEqual(prediction.process.wait(timeout=600), 0, prediction.process.failure_message())
        ranked = logic.load_predictions(prediction.run_dir, prediction.out_dir)
        self.assertEqual([item.case_name for item in ranked], ["unlabeled"])
        logic.jump_to_least_confident("unlabeled")

        logic.begin_correction("unlabeled")
        logic.accept_as_labeled("unlabeled")
        self.assertEqual(len(logic.export_dataset().labeled), 2)
        self.delayDisplay("Test passed")
