"""The PLBOptCore that ships with the module, and the environment that makes jobs run it.

The extension installs PLBOptCore next to ``PLBOpt.py`` (``<module folder>/PLBOptCore``); in a
source checkout it is the checkout's ``PLBOptCore`` beside ``PLBOptSlicer``. Jobs get that folder
first on ``PYTHONPATH``, so they never need (and the module never installs) a ``plbopt`` package
from an index. Before a job starts, :func:`check_core` asks the job's interpreter which
PLBOptCore it imports: it must be the bundled one, at the extension's version. That catches an
extension updated while Slicer was running (old module code in memory, new core on disk) and a
stray ``plbopt`` in Slicer's Python that would shadow the bundled core.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Dict, Mapping

from . import __version__ as EXTENSION_VERSION
from .errors import PLBOptSlicerError
from .process import hidden_console_options

CORE_PACKAGE = "PLBOptCore"
MODULE_DIR = Path(__file__).resolve().parents[1]  # the folder holding PLBOpt.py and PLBOptLib/


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


def check_core(python: str, root: Path, environment: Mapping[str, str], cwd: Path, timeout: float = 120.0) -> str:
    """Ask ``python``, run as the job will be (whole ``environment``, in ``cwd``, which Python puts
    first on ``sys.path``), which PLBOptCore it imports; return its version.

    Raises :class:`PLBOptSlicerError` unless it is ``root/PLBOptCore`` at the extension's version.
    """
    code = f"import json, {CORE_PACKAGE} as c; print(json.dumps([c.__version__, c.__file__]))"
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                            env=dict(environment), cwd=str(cwd), stdin=subprocess.DEVNULL, **hidden_console_options())
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise PLBOptSlicerError(f"{root / CORE_PACKAGE}: cannot be imported by {python}: "
                                f"{lines[-1] if lines else 'exit ' + str(result.returncode)}")
    version, location = json.loads(result.stdout.strip().splitlines()[-1])
    expected = (Path(root) / CORE_PACKAGE).resolve()
    if Path(location).resolve().parent != expected:
        raise PLBOptSlicerError(f"{location}: jobs import this PLBOptCore instead of the one in the extension "
                                f"({expected}); uninstall it from Slicer's Python (pip uninstall plbopt)")
    if version != EXTENSION_VERSION:
        raise PLBOptSlicerError(f"{expected}: PLBOptCore {version} does not match the PLBOpt module {EXTENSION_VERSION}; "
                                "the extension was updated while Slicer was running: restart Slicer")
    return version
