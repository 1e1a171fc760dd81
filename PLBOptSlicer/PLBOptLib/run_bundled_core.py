"""Entry point of every PLBOpt job: ``python run_bundled_core.py CORE_ROOT VERSION ARGS...``.

It checks that this interpreter, run as the job runs (environment, working folder), imports the
PLBOptCore in ``CORE_ROOT`` at ``VERSION`` (the module's), then runs ``python -m PLBOptCore ARGS...``
in the same process. A failed check is the job's failure: one line on the output and exit status
2, which the panel shows like any other job error. Doing the check inside the job keeps the GUI
thread free: a separate check process started before each job blocked Slicer until an
interpreter had started and imported the core (up to two minutes on a cold disk).

The check catches an extension updated while Slicer runs (old module code in memory, new core on
disk) and another PLBOptCore (a stray ``plbopt`` in Slicer's Python, a folder in the working
folder) that would shadow the bundled one.

This file is run as a script and never imported by PLBOptLib: it needs nothing but the standard
library (PLBOptLib imports ``slicer``, which a job's interpreter may lack).
"""

import os
import runpy
import sys
from pathlib import Path

CORE_PACKAGE = "PLBOptCore"
EXIT_CORE_MISMATCH = 2  # PLBOptCore's exit status for a user error: the panel shows the last output line


def fail(message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    return EXIT_CORE_MISMATCH


def main(argv) -> int:
    if len(argv) < 2:
        return fail("usage: run_bundled_core.py CORE_ROOT VERSION [PLBOptCore arguments...]")
    root, version, arguments = argv[0], argv[1], list(argv[2:])
    # ``python -m`` puts the working folder first on sys.path; a script run puts the script's own
    # folder there instead, whose module names (imageio.py, events.py) could shadow packages.
    sys.path[0] = os.getcwd()
    expected = (Path(root) / CORE_PACKAGE).resolve()
    try:
        import PLBOptCore as core
    except Exception as error:  # noqa: BLE001 - any import failure is reported as one line
        return fail(f"{expected}: cannot be imported by {sys.executable}: {type(error).__name__}: {error}")
    location = Path(core.__file__).resolve().parent
    if location != expected:
        return fail(f"{location}: jobs import this PLBOptCore instead of the one in the extension ({expected}); "
                    "remove it (pip uninstall plbopt, or move it out of the working folder)")
    if core.__version__ != version:
        return fail(f"{expected}: PLBOptCore {core.__version__} does not match the PLBOpt module {version}; "
                    "the extension was updated while Slicer was running: restart Slicer")
    sys.argv = [sys.argv[0], *arguments]  # run_module replaces argv[0] with PLBOptCore/__main__.py, as -m does
    runpy.run_module(CORE_PACKAGE, run_name="__main__", alter_sys=True)  # exits through sys.exit(main())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
