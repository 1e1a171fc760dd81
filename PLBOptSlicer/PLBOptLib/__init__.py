"""PLBOpt module internals that run without the Slicer GUI (no qt/ctk imports).

PLBOptCore (torch) is never imported here: training and prediction run in a child process.
"""

# The extension's version; the PLBOptCore it ships (and every job imports) must report the same.
__version__ = "0.1.0"
# The module's user documentation, linked from its help text; in the repository of PLBOpt.json's
# scm_url at its scm_revision (Testing/slicer/test_translations_and_help.py checks both).
DOCUMENTATION_URL = "https://github.com/PLBOpt/PLBOpt/blob/main/PLBOptSlicer/README.md"
# The tutorial with data to load (the synthetic phantom), beside it (Testing/slicer/test_tutorial.py).
TUTORIAL_URL = DOCUMENTATION_URL.rsplit("/", 1)[0] + "/TUTORIAL.md"

from .cases import SceneCase, Status, export_dataset, find_cases
from .errors import PLBOptSlicerError
from .events import EventsFollower, TrainingProgress
from .logic import PredictionJob, ReviewItem, TrainingJob, WorkflowLogic
from .process import DEVICES, PRESETS, JobProcess, TrainSettings

__all__ = ["DEVICES", "DOCUMENTATION_URL", "PRESETS", "TUTORIAL_URL", "EventsFollower", "JobProcess", "PLBOptSlicerError", "PredictionJob",
           "ReviewItem", "SceneCase", "Status", "TrainSettings", "TrainingJob", "TrainingProgress",
           "WorkflowLogic", "export_dataset", "find_cases"]
