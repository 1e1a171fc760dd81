"""Extensions Index polish (issue 21 item 9): the panel's texts go through Slicer's translation
function ``_()`` (``slicer.i18n.tr``, with an English fallback where ``slicer.i18n`` is missing),
and the help text links the module documentation in the repository the index builds."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from conftest import MODULE_DIR
from PLBOptLib import DOCUMENTATION_URL, panel

REPO = MODULE_DIR.parent
WIDGET = MODULE_DIR / "PLBOpt.py"
# Calls whose first argument(s) the user reads: each must be a translated text, not a literal.
SHOWN_ARGUMENTS = {"tryWithErrorDisplay": 1, "errorDisplay": 1, "confirmYesNoDisplay": 2, "confirmOkCancelDisplay": 2,
                   "warningDisplay": 1, "infoDisplay": 1, "appendLog": 1, "setWindowTitle": 1, "setToolTip": 1,
                   "setText": 1, "addButton": 1}
SHOWN_ATTRIBUTES = {"text", "title", "helpText", "acknowledgementText", "toolTip", "windowTitle"}
TRANSLATORS = {"_", "translate"}


def untranslated(node: ast.AST) -> bool:
    """Whether ``node`` puts literal English text in front of the user: a string constant with
    letters or an f-string, also inside ``+``, ``x or "..."`` and ``a if c else b``; a call of
    ``_``/``translate`` (and ``.format`` on one) is translated, anything else (a variable, a
    message made in PLBOptLib) is not this file's literal."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and any(c.isalpha() for c in node.value)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return untranslated(node.left) or untranslated(node.right)
    if isinstance(node, ast.BoolOp):
        return any(untranslated(value) for value in node.values)
    if isinstance(node, ast.IfExp):
        return untranslated(node.body) or untranslated(node.orelse)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return untranslated(node.func.value)
    return False


def untranslated_texts(source: str, where: str):
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for argument in node.args[:SHOWN_ARGUMENTS.get(name, 0)]:
                if untranslated(argument):
                    found.append(f"{where}:{node.lineno}: {name}({ast.unparse(argument)[:60]})")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr in SHOWN_ATTRIBUTES and untranslated(node.value):
                    found.append(f"{where}:{node.lineno}: .{target.attr} = {ast.unparse(node.value)[:60]}")
    return found


def test_every_text_the_panel_shows_is_translatable():
    assert untranslated_texts(WIDGET.read_text(), WIDGET.name) == []


def test_the_check_finds_untranslated_texts():
    source = '''
slicer.util.errorDisplay("Prediction failed")
self.appendLog(f"{n} pseudo labels loaded")
self.ui.classesLabel.text = "Classes: " + names
item.setToolTip(reason or "Used for training")
slicer.util.confirmYesNoDisplay(question, "PLBOpt: restart")
self.appendLog(_("{n} pseudo labels loaded").format(n=n))
self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
self.ui.progressLabel.text = progress.summary()
'''
    assert sorted(int(line.split(":")[1]) for line in untranslated_texts(source, "x")) == [2, 3, 4, 5, 6]


def test_the_translation_function_has_an_english_fallback_where_slicer_i18n_is_missing():
    for path in (WIDGET, MODULE_DIR / "PLBOptLib" / "panel.py", MODULE_DIR / "PLBOptLib" / "cases.py"):
        tree = ast.parse(path.read_text())
        guarded = [node for node in tree.body if isinstance(node, ast.Try)
                   and any(isinstance(n, ast.ImportFrom) and n.module == "slicer.i18n" for n in node.body)]
        assert guarded, f"{path.name}: no `from slicer.i18n import tr as _` at module level"
        fallback = [n for handler in guarded[0].handlers if getattr(handler.type, "id", "") == "ImportError"
                    for n in handler.body if isinstance(n, ast.FunctionDef) and n.name == "_"]
        assert fallback, f"{path.name}: no `_` defined when slicer.i18n cannot be imported"
    assert "slicer.i18n" not in sys.modules  # slicer-core has none: the fallback is what runs here
    assert panel._("Restart now") == "Restart now"


def test_panel_messages_go_through_slicers_translation_function(monkeypatch):
    """With a ``slicer.i18n`` that marks every text it translates, the messages come out marked
    and their placeholders filled in."""
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: "«" + text + "»"
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    spec = importlib.util.spec_from_file_location("PLBOptLib.panel_translated", MODULE_DIR / "PLBOptLib" / "panel.py")
    translated = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, translated)  # its dataclasses look their module up
    spec.loader.exec_module(translated)
    job = types.SimpleNamespace(run_dir=Path("/work/runs/run-002"),
                                process=types.SimpleNamespace(running=True, cancel_requested=False))
    assert translated.exit_question(job).startswith("«A training is running in /work/runs/run-002.")
    question = translated.restart_question(types.SimpleNamespace(
        GetStorableNodesModifiedSinceRead=lambda collection: False, GetModifiedSinceRead=lambda: False), ["numpy"])
    assert question.text == "«Slicer has older versions of these packages loaded; restart to use the new ones:\nnumpy»" \
                            "\n\n«Restart Slicer now?»"
    assert [text for _, text in question.choices] == ["«Restart now»", "«Not now»"]


def test_the_help_text_links_the_module_documentation_in_the_built_repository():
    entry = json.loads((REPO / "PLBOpt.json").read_text())
    prefix = f"{entry['scm_url'].removesuffix('.git')}/blob/{entry['scm_revision']}/"
    assert DOCUMENTATION_URL.startswith(prefix)
    assert (REPO / DOCUMENTATION_URL[len(prefix):]).is_file()
    help_text = [node.value for node in ast.walk(ast.parse(WIDGET.read_text())) if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Attribute) and t.attr == "helpText" for t in node.targets)]
    assert len(help_text) == 1
    names = {n.id for n in ast.walk(help_text[0]) if isinstance(n, ast.Name)}
    assert "DOCUMENTATION_URL" in names and "<a href=" in ast.unparse(help_text[0])
