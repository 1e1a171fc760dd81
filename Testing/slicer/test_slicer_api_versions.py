"""Slicer APIs newer than the oldest supported Slicer are used only behind a guard (issue 21, item 8).

The headless tests run against the ``slicer-core`` wheel, which is newer than 5.6, so a call such
as ``vtkSegment.SetTerminology`` (Slicer 5.10+) passes every other test and fails only a clinician
on Slicer 5.6 or 5.8. This static scan of every Python file of the module finds each use of an
API listed in ``VERSION_DEPENDENT`` and fails unless it is guarded:

- in the body of an ``if`` (or a conditional expression, or after ``and``) whose test calls
  ``hasattr(..., "<name>")`` or compares ``slicer.app.majorVersion``/``minorVersion``, or in the
  ``else`` of an ``if not hasattr(...)``;
- in a ``try`` whose handlers catch ``AttributeError`` (an attribute) or ``ImportError`` (a module).

Add an API here when the module starts to use one that appeared after the oldest supported version.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from conftest import MODULE_DIR

OLDEST_SUPPORTED = (5, 6)
# Attribute or module -> first Slicer version that has it (where we know it from).
VERSION_DEPENDENT_ATTRIBUTES: Dict[str, Tuple[Tuple[int, int], str]] = {
    "SetTerminology": ((5, 10), "vtkSegment; older Slicer: SetTag(GetTerminologyEntryTagName(), entry) (issue 21)"),
    "GetTerminology": ((5, 10), "vtkSegment; older Slicer: GetTag(GetTerminologyEntryTagName())"),
    "pip_ensure": ((5, 12), "slicer.util / slicer.packaging"),
}
VERSION_DEPENDENT_MODULES: Dict[str, Tuple[Tuple[int, int], str]] = {
    "slicer.packaging": ((5, 12), "Slicer's package manager (pip_install with constraints and a progress dialog)"),
}
VERSION_ATTRIBUTES = ("majorVersion", "minorVersion")  # slicer.app.majorVersion etc.


@dataclass(frozen=True)
class Use:
    path: str
    line: int
    name: str
    since: Tuple[int, int]

    def __str__(self) -> str:
        return (f"{self.path}:{self.line}: {self.name} exists only from Slicer {self.since[0]}.{self.since[1]} on "
                f"(oldest supported: {OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]}); guard it with hasattr, "
                "a version check or try/except")


def _hasattr_names(test: ast.AST) -> List[str]:
    return [node.args[1].value for node in ast.walk(test)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
            and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)]


def _checks_version(test: ast.AST) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr in VERSION_ATTRIBUTES for node in ast.walk(test))


def _negated(test: ast.AST) -> bool:
    return isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)


def _guards(test: ast.AST, name: str, in_body: bool) -> bool:
    """Whether a condition ``test`` guards ``name`` for the branch taken when it is true
    (``in_body``) or false."""
    if _checks_version(test):
        return True
    if _negated(test):
        return not in_body and (name in _hasattr_names(test.operand) or _checks_version(test.operand))
    return in_body and name.split(".")[-1] in _hasattr_names(test)


def _catches(handler: ast.ExceptHandler, exception: str) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in (exception, "Exception", "BaseException") for n in names)


def _guarded(chain: List[ast.AST], name: str, exception: str) -> bool:
    """Whether the innermost node of ``chain`` (a path from the module down to the use) is guarded."""
    for parent, child in zip(chain, chain[1:]):
        if isinstance(parent, (ast.If, ast.IfExp)):
            branch = parent.body if isinstance(parent, ast.If) else [parent.body]
            orelse = parent.orelse if isinstance(parent, ast.If) else [parent.orelse]
            if child in branch and _guards(parent.test, name, in_body=True):
                return True
            if child in orelse and _guards(parent.test, name, in_body=False):
                return True
        if isinstance(parent, ast.BoolOp) and isinstance(parent.op, ast.And):
            earlier = parent.values[:parent.values.index(child)] if child in parent.values else []
            if any(_guards(test, name, in_body=True) for test in earlier):
                return True
        if isinstance(parent, ast.Try) and child in parent.body and any(_catches(h, exception) for h in parent.handlers):
            return True
    return False


def _module_named(node: ast.AST) -> Optional[str]:
    """The version-dependent module ``node`` imports or names, if any."""
    if isinstance(node, ast.Import):
        return next((a.name for a in node.names if a.name in VERSION_DEPENDENT_MODULES), None)
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module in VERSION_DEPENDENT_MODULES:
            return node.module
        return next((f"{node.module}.{a.name}" for a in node.names
                     if f"{node.module}.{a.name}" in VERSION_DEPENDENT_MODULES), None)
    if isinstance(node, ast.Constant) and node.value in VERSION_DEPENDENT_MODULES:
        return node.value  # __import__("slicer.packaging") / importlib.import_module(...)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        dotted = f"{node.value.id}.{node.attr}"
        return dotted if dotted in VERSION_DEPENDENT_MODULES else None
    return None


def unguarded_uses(source: str, path: str = "<snippet>") -> List[Use]:
    """Uses of version-dependent APIs in ``source`` that no guard protects."""
    found = []

    def visit(node: ast.AST, chain: List[ast.AST]) -> None:
        chain = chain + [node]
        module = _module_named(node)
        if module is not None:
            if not _guarded(chain, module, "ImportError"):
                found.append(Use(path, node.lineno, module, VERSION_DEPENDENT_MODULES[module][0]))
        elif isinstance(node, ast.Attribute) and node.attr in VERSION_DEPENDENT_ATTRIBUTES:
            if not _guarded(chain, node.attr, "AttributeError"):
                found.append(Use(path, node.lineno, node.attr, VERSION_DEPENDENT_ATTRIBUTES[node.attr][0]))
        for child in ast.iter_child_nodes(node):
            visit(child, chain)

    visit(ast.parse(source), [])
    return [use for use in found if use.since > OLDEST_SUPPORTED]


def module_files() -> List[Path]:
    return sorted(p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_module_uses_newer_slicer_apis_only_behind_a_guard():
    files = module_files()
    assert MODULE_DIR / "PLBOpt.py" in files and MODULE_DIR / "PLBOptLib" / "review.py" in files
    problems = [str(use) for path in files
                for use in unguarded_uses(path.read_text(), str(path.relative_to(MODULE_DIR.parent)))]
    assert problems == [], "\n".join(problems)


def test_the_module_does_use_the_guarded_apis():
    """The scan would pass vacuously if the names it looks for were never there."""
    text = "\n".join(path.read_text() for path in module_files())
    assert ".SetTerminology(" in text and "slicer.packaging" in text


def uses(snippet: str) -> List[str]:
    return [use.name for use in unguarded_uses(textwrap.dedent(snippet))]


def test_an_unguarded_call_fails_the_scan():
    assert uses("segment.SetTerminology(entry)\n") == ["SetTerminology"]
    assert uses("import slicer.packaging\n") == ["slicer.packaging"]
    assert uses("from slicer import packaging\n") == ["slicer.packaging"]
    assert uses("packaging = __import__('slicer.packaging', fromlist=['pip_install'])\n") == ["slicer.packaging"]
    assert uses("slicer.util.pip_ensure(['numpy'])\n") == ["pip_ensure"]
    # A guard for another name, the wrong branch, or an exception that is not raised do not count.
    assert uses("""
        if hasattr(segment, "SetTag"):
            segment.SetTerminology(entry)
        if hasattr(segment, "SetTerminology"):
            pass
        else:
            segment.SetTerminology(entry)
        try:
            segment.SetTerminology(entry)
        except ValueError:
            pass
        try:
            import slicer.packaging
        except AttributeError:
            pass
        """) == ["SetTerminology", "SetTerminology", "SetTerminology", "slicer.packaging"]


def test_guarded_calls_pass_the_scan():
    assert uses("""
        if hasattr(segment, "SetTerminology"):
            segment.SetTerminology(entry)
        else:
            segment.SetTag(segment.GetTerminologyEntryTagName(), entry)
        if not hasattr(segment, "GetTerminology"):
            entry = segment.GetTag(name)
        else:
            entry = segment.GetTerminology()
        entry = segment.GetTerminology() if hasattr(segment, "GetTerminology") else None
        ok = hasattr(segment, "SetTerminology") and segment.SetTerminology(entry)
        if (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 12):
            slicer.util.pip_ensure(["numpy"])
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        try:
            segment.SetTerminology(entry)
        except AttributeError:
            pass
        """) == []


OLDEST_PYTHON = (3, 9)  # the Python of the oldest supported Slicer (5.6)


def test_module_files_parse_with_the_oldest_supported_python_grammar():
    """Syntax newer than Slicer 5.6's Python (``match``, parenthesised context managers, ``except*``)
    would stop the module from loading there; the headless tests run a newer Python."""
    problems = []
    for path in module_files():
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=OLDEST_PYTHON)
        except SyntaxError as error:
            problems.append(f"{path.relative_to(MODULE_DIR)}:{error.lineno}: {error.msg}")
    assert problems == []
    try:
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=OLDEST_PYTHON)
    except SyntaxError:
        pass
    else:
        pytest.fail("the grammar check lets a match statement through")
