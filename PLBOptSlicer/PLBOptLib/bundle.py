"""The PLBOptCore that ships with the module, and the environment that makes jobs run it.

The extension installs PLBOptCore next to ``PLBOpt.py`` (``<module folder>/PLBOptCore``); in a
source checkout it is the checkout's ``PLBOptCore`` beside ``PLBOptSlicer``. Jobs get that folder
first on ``PYTHONPATH``, so they never need (and the module never installs) a ``plbopt`` package
from an index. Every job starts through ``run_bundled_core.py`` (:func:`checked_core_command`),
which checks, inside the job, that its interpreter imports the bundled PLBOptCore at the
extension's version. That catches an extension updated while Slicer was running (old module code
in memory, new core on disk) and a stray ``plbopt`` in Slicer's Python that would shadow the
bundled core, without making the GUI thread wait for an interpreter to start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

from . import __version__ as EXTENSION_VERSION
from .errors import PLBOptSlicerError

CORE_PACKAGE = "PLBOptCore"
MODULE_DIR = Path(__file__).resolve().parents[1]  # the folder holding PLBOpt.py and PLBOptLib/
JOB_SCRIPT = Path(__file__).resolve().with_name("run_bundled_core.py")  # every job's entry point


def core_root(module_dir: Path = MODULE_DIR) -> Path:
    """The folder that contains the ``PLBOptCore`` package jobs must run: the module folder of an
    installed extension, else the source checkout that holds the module folder."""
    for root in (Path(module_dir), Path(module_dir).parent):
        if (root / CORE_PACKAGE / "__init__.py").is_file():
            return root
    raise PLBOptSlicerError(f"{module_dir}: {CORE_PACKAGE} is missing next to the module; reinstall the PLBOpt "
                            "extension from the Extensions Manager")


def bundled_core_version(root: Path) -> str:
    """``__version__`` of ``root/PLBOptCore``, read from the file (nothing is imported)."""
    init = Path(root) / CORE_PACKAGE / "__init__.py"
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', init.read_text(), re.MULTILINE)
    if not match:
        raise PLBOptSlicerError(f"{init}: no __version__ line; reinstall the PLBOpt extension")
    return match.group(1)


def job_environment(root: Path, base: Mapping[str, str]) -> Dict[str, str]:
    """``base`` with ``root`` first on ``PYTHONPATH`` (so it shadows any other PLBOptCore; the
    inherited entries follow) and unbuffered output, so progress lines arrive as they are printed."""
    entries = [str(root)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**base, "PYTHONPATH": os.pathsep.join(entries), "PYTHONUNBUFFERED": "1"}


def checked_core_command(command: Sequence[str], root: Path) -> List[str]:
    """``[python, "-m", "PLBOptCore", *args]`` as the job really runs it: through
    ``run_bundled_core.py``, which refuses (exit status 2, one line saying why) unless that
    interpreter imports ``root/PLBOptCore`` at the extension's version, then runs the CLI."""
    python, flag, package, *arguments = [str(part) for part in command]
    if (flag, package) != ("-m", CORE_PACKAGE):
        raise ValueError(f"not a PLBOptCore command: {' '.join(map(str, command[:3]))}")
    return [python, str(JOB_SCRIPT), str(Path(root)), EXTENSION_VERSION, *arguments]
