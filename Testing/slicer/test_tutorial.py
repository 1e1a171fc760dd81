"""The tutorial (``PLBOptSlicer/TUTORIAL.md``) stays true (issue 21, item 9: "a tutorial with data a
user can load").

- Every panel name it writes in bold exists, word for word, in the panel (``PLBOpt.ui`` or
  ``PLBOpt.py``); the choices and numbers it tells the user to set are ones the panel offers.
- Its data step, the Python snippet as printed, writes the phantom through the bundled PLBOptCore
  (a real child process) with exactly the files its table lists, and loads the volumes and the
  labels as segmentations that the module takes as 2 labeled and 12 unlabeled cases, with the
  segmentation names, table cells and class names the tutorial shows; that dataset exports.
- The progress lines it quotes are the ones the panel writes.
- The module README and the help text link it, and its own links resolve.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from conftest import MODULE_DIR
from PLBOptLib import (DEVICES, DOCUMENTATION_URL, PRESETS, TUTORIAL_URL, PLBOptSlicerError, WorkflowLogic, panel,
                       sparse, tutorial)
from PLBOptLib.events import TrainingProgress

TUTORIAL = MODULE_DIR / "TUTORIAL.md"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "PLBOpt.ui"
WIDGET = MODULE_DIR / "PLBOpt.py"
REPO = MODULE_DIR.parent


def panel_texts() -> set:
    """Every text the panel can show: the .ui file's strings and PLBOpt.py's string constants."""
    texts = {element.text.strip() for element in ElementTree.parse(UI_FILE).iter("string") if element.text}
    texts |= {node.value.strip() for node in ast.walk(ast.parse(WIDGET.read_text()))
              if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return texts


def bold_names(markdown: str) -> list:
    """The names the tutorial writes in bold (its convention for names of the PLBOpt panel)."""
    return [" ".join(match.split()) for match in re.findall(r"\*\*(.+?)\*\*", markdown, re.DOTALL)]


def unknown_panel_names(markdown: str) -> list:
    texts = panel_texts()
    return sorted({name for name in bold_names(markdown) if name not in texts})


def code_spans(markdown: str) -> list:
    return [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", markdown)]


def table_row(markdown: str, first_cell: str) -> str:
    """The first table row of ``markdown`` whose first cell is ``first_cell``."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[0] == first_cell:
            return line
    raise AssertionError(f"TUTORIAL.md: no table row starting with {first_cell!r}")


def spin_box_range(name: str) -> tuple:
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        if widget.get("name") == name:
            values = {prop.get("name"): int(prop.find("number").text) for prop in widget.findall("property")
                      if prop.get("name") in ("minimum", "maximum")}
            return values["minimum"], values["maximum"]
    raise AssertionError(f"{UI_FILE.name}: no widget {name}")


def test_every_panel_name_in_bold_exists_in_the_panel():
    text = TUTORIAL.read_text()
    names = bold_names(text)
    assert len(names) > 30  # the convention is in use: the walk-through names the panel's controls
    assert unknown_panel_names(text) == []
    for required in ("Start", "Cancel", "Why (not) used", "Annotated", "Predict unlabeled cases",
                     "Jump to least confident region", "Edit in Segment Editor", "Accept as labeled",
                     "Retrain (fine-tune from last checkpoint)", "Holding a segment"):
        assert required in names, f"the tutorial no longer names {required!r}"


def test_the_check_finds_a_name_the_panel_lacks():
    assert unknown_panel_names("Press **Start**, then **Strat training**, then\n**Accept as\nlabeled**.") == \
        ["Strat training"]


def test_the_settings_the_tutorial_gives_are_ones_the_panel_offers():
    text = TUTORIAL.read_text()

    def value(setting: str) -> str:  # the Value column of the tutorial's settings table
        return re.search(r"`([^`]+)`", table_row(text, f"**{setting}**").split("|")[2]).group(1)

    assert value("Preset:") in PRESETS
    assert value("Device:") in DEVICES
    assert spin_box_range("iterationsSpinBox")[0] <= int(value("Iterations:")) <= spin_box_range("iterationsSpinBox")[1]
    for size, box in zip(value("Patch size (Z Y X):").split(), ("patchZSpinBox", "patchYSpinBox", "patchXSpinBox")):
        low, high = spin_box_range(box)
        assert low <= int(size) <= high
    low, high = spin_box_range("baseFiltersSpinBox")
    assert low <= int(value("Base filters:")) <= high
    # the orientation the sparse-annotation step picks is one of the panel's choices
    assert re.search(r"\*\*Annotated slices:\*\*, choose `(\w+)`", text).group(1) in sparse.AXES


def test_the_progress_lines_quoted_are_the_panels():
    spans = code_spans(TUTORIAL.read_text())
    progress = TrainingProgress()
    progress.update({"type": "preprocess", "index": 3, "total": 14, "case": "phantom_002"})
    assert progress.summary() in spans
    assert progress.update({"type": "start", "total_steps": 1200, "start_step": 0, "device": "cpu",
                            "preset": "plbopt"}) in spans
    progress.update({"type": "train", "step": 350, "loss": 0.4213, "eta_seconds": 850})
    assert progress.summary() in spans


def test_the_data_step_writes_and_loads_what_the_tutorial_names(scene, tmp_path, monkeypatch):
    text = TUTORIAL.read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert "tutorial.write_phantom(" in snippet and "tutorial.load_phantom(" in snippet
    monkeypatch.setenv("HOME", str(tmp_path))  # the snippet's Path.home()
    namespace = {"__name__": "tutorial_snippet"}
    exec(compile(snippet, str(TUTORIAL), "exec"), namespace)  # as pasted into Slicer's Python console
    folder = namespace["folder"]
    assert folder == tmp_path / "PLBOpt-tutorial" / "phantom"

    # The files: exactly those of the tutorial's table ("a … b" is the numbered run from a to b).
    rows = [line for line in text.splitlines() if re.match(r"\| `[^`]+\.(nii\.gz|json|ctbl)`", line)]
    named = set()
    for row in rows:
        cell = row.split("|")[1]
        paths = re.findall(r"`([^`]+)`", cell)
        if "…" in cell:
            (first, last), prefix = paths, paths[0].rsplit("_", 1)[0]
            low, high = (int(re.search(r"_(\d+)\.nii\.gz$", p).group(1)) for p in (first, last))
            named |= {f"{prefix}_{i:03d}.nii.gz" for i in range(low, high + 1)}
        else:
            named |= set(paths)
    written = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert written == named
    assert tutorial.COLOR_TABLE_NAME in named and "labelsTr/phantom_000.nii.gz" in named

    # The scene: the volumes and segmentations the tutorial names, as the case table shows them.
    logic = WorkflowLogic(scene, working_dir=tmp_path / "PLBOpt-tutorial" / "work")
    rows = {row.cells[0]: row for row in panel.case_rows(logic)}
    assert sorted(rows) == [f"phantom_{i:03d}" for i in range(14)]
    assert all(row.used and row.cells[4] == "" for row in rows.values())  # ticked, no reason given
    labeled = {name: row.cells for name, row in rows.items() if row.cells[1] == "labeled"}
    assert sorted(labeled) == ["phantom_000", "phantom_001"]
    assert {row.cells[1] for name, row in rows.items() if name not in labeled} == {"unlabeled"}
    for name, cells in labeled.items():
        assert cells[2] == name + tutorial.LABELS_SUFFIX and f"`{cells[2]}`" in text
        assert cells[5] == "all" and "`all`" in table_row(text, "**Annotated**")
    status_row = table_row(text, "**Status**")
    assert "`labeled` for phantom_000 and phantom_001" in status_row and "`unlabeled` for the others" in status_row
    classes = "Classes: {names}".format(names=", ".join(logic.class_names()))
    assert classes in code_spans(text)
    assert "Classes: {names}" in panel_texts()  # what the panel writes below the table

    # What Start would train on: the export takes 2 labeled and 12 unlabeled cases.
    exported = logic.export_dataset()
    assert (sorted(exported.labeled), len(exported.unlabeled)) == (["phantom_000", "phantom_001"], 12)
    assert exported.class_names == logic.class_names()
    assert len(list((exported.root / "labelsTr").iterdir())) == 2 and (exported.root / "dataset.json").is_file()


def test_the_tutorial_is_linked_and_its_links_resolve():
    assert "(TUTORIAL.md)" in (MODULE_DIR / "README.md").read_text()
    assert TUTORIAL_URL.rsplit("/", 1)[0] == DOCUMENTATION_URL.rsplit("/", 1)[0]
    assert (REPO / "PLBOptSlicer" / TUTORIAL_URL.rsplit("/", 1)[1]).is_file()
    help_text = [node.value for node in ast.walk(ast.parse(WIDGET.read_text())) if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Attribute) and t.attr == "helpText" for t in node.targets)]
    assert "TUTORIAL_URL" in {n.id for n in ast.walk(help_text[0]) if isinstance(n, ast.Name)}
    for target in re.findall(r"\]\(([^)#]+)\)", TUTORIAL.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (MODULE_DIR / target).exists(), f"TUTORIAL.md links {target}, which does not exist"


def test_a_failed_phantom_write_says_why(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(PLBOptSlicerError, match=r"phantom: the phantom could not be written: .*file"):
        tutorial.write_phantom(blocked / "phantom", unlabeled=1)
