"""The Extensions Index entry (``PLBOpt.json``) agrees with the extension's CMakeLists.txt (issue 21, item 9).

The Slicer Extensions Index holds one ``<ExtensionName>.json`` per extension, checked against
Slicer's catalog-entry schema (``Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json``):
required ``$schema``, ``scm_url``, ``scm_revision``, ``build_dependencies``, ``category``; optional
``build_subdirectory``, ``enabled``, ``tier``. The index builds ``scm_url`` at ``scm_revision``; the
description, homepage, icon, screenshots, contributors and status come from the ``EXTENSION_*``
variables of the top-level CMakeLists.txt, so both must say the same thing.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Dict, List

from conftest import MODULE_DIR

REPO = MODULE_DIR.parent
SCHEMA_URL = re.compile(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.[01]\.json#")
REQUIRED = {"$schema": str, "scm_url": str, "scm_revision": str, "build_dependencies": list, "category": str}
OPTIONAL = {"build_subdirectory": str, "enabled": bool, "tier": int}
TIERS = (1, 3, 5)
EXTENSION_VARIABLES = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS",
                       "DEPENDS", "STATUS")
GITHUB_REPOSITORY = re.compile(r"https://(?:github\.com|raw\.githubusercontent\.com)/([^/]+)/([^/#.]+)")


def cmake_extension_settings(cmake_text: str) -> Dict[str, str]:
    """``project()`` name and the ``set(EXTENSION_<NAME> "value")`` values of a CMakeLists.txt."""
    settings = {key: value for key, value in re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', cmake_text)}
    project = re.search(r"^project\((\w+)", cmake_text, re.MULTILINE)
    settings["PROJECT"] = project.group(1) if project else ""
    return settings


def catalog_problems(entry: dict, entry_name: str, cmake_text: str, repo: Path) -> List[str]:
    """What keeps ``entry`` (the contents of ``<entry_name>``) from being a valid index entry for
    the extension that ``cmake_text`` declares, checked out in ``repo``; empty when valid."""
    problems = []
    settings = cmake_extension_settings(cmake_text)
    if entry_name != f"{settings['PROJECT']}.json":
        problems.append(f"{entry_name}: must be named after the extension, {settings['PROJECT']}.json")
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key in REQUIRED and key not in entry:
            problems.append(f"{key}: missing")
        elif key in entry and not (isinstance(entry[key], kind) and not (kind is int and isinstance(entry[key], bool))):
            problems.append(f"{key}: must be a {kind.__name__}")
    problems += [f"{key}: not a catalog-entry field" for key in entry if key not in REQUIRED and key not in OPTIONAL]
    if problems:
        return problems

    if not SCHEMA_URL.fullmatch(entry["$schema"]):
        problems.append(f"$schema: {entry['$schema']} is not Slicer's catalog-entry schema")
    if entry.get("tier", 1) not in TIERS:
        problems.append(f"tier: {entry['tier']} is none of {TIERS}")
    if entry["category"] != settings.get("CATEGORY"):
        problems.append(f"category: {entry['category']!r} differs from EXTENSION_CATEGORY {settings.get('CATEGORY')!r}")
    depends = [name for name in re.split(r"[;\s]+", settings.get("DEPENDS", "")) if name and name != "NA"]
    if entry["build_dependencies"] != depends:
        problems.append(f"build_dependencies: {entry['build_dependencies']} differs from EXTENSION_DEPENDS {depends}")
    if not re.fullmatch(r"https://github\.com/[^/]+/[^/]+\.git", entry["scm_url"]):
        problems.append(f"scm_url: {entry['scm_url']} is not an https git URL the index can clone")
    if not re.fullmatch(r"[0-9a-f]{40}|[A-Za-z0-9._/-]+", entry["scm_revision"]):
        problems.append(f"scm_revision: {entry['scm_revision']!r} is neither a branch nor a commit")
    subdirectory = repo / entry.get("build_subdirectory", ".")
    if not (subdirectory / "CMakeLists.txt").is_file():
        problems.append(f"build_subdirectory: {subdirectory} holds no CMakeLists.txt")

    for variable in EXTENSION_VARIABLES:
        if not settings.get(variable):
            problems.append(f"CMakeLists.txt: EXTENSION_{variable} is not set")
    scm = GITHUB_REPOSITORY.match(entry["scm_url"])
    for variable in ("HOMEPAGE", "ICONURL", "SCREENSHOTURLS"):
        for url in settings.get(variable, "").split():
            where = GITHUB_REPOSITORY.match(url)
            if scm and (not where or where.groups() != scm.groups()):
                problems.append(f"EXTENSION_{variable}: {url} is not in the repository of scm_url {entry['scm_url']}")
            raw = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/([^/]+)/(.+)", url)
            if raw and raw.group(1) != entry["scm_revision"]:
                problems.append(f"EXTENSION_{variable}: {url} is not on scm_revision {entry['scm_revision']}")
            if raw and not (repo / raw.group(2)).is_file():
                problems.append(f"EXTENSION_{variable}: {raw.group(2)} is not in the repository")
    return problems


def test_catalog_entry_is_valid_and_agrees_with_cmakelists():
    entry_path = REPO / "PLBOpt.json"
    entry = json.loads(entry_path.read_text())
    assert catalog_problems(entry, entry_path.name, (REPO / "CMakeLists.txt").read_text(), REPO) == []


def test_catalog_check_rejects_entries_the_index_would_refuse():
    """The check itself can fail: each broken entry is reported with the field at fault."""
    entry = json.loads((REPO / "PLBOpt.json").read_text())
    cmake = (REPO / "CMakeLists.txt").read_text()

    def problems_with(**changes):
        broken = copy.deepcopy(entry)
        for key, value in changes.items():
            if value is None:
                broken.pop(key.replace("schema", "$schema") if key == "schema" else key)
            else:
                broken[key] = value
        return catalog_problems(broken, "PLBOpt.json", cmake, REPO)

    assert problems_with(scm_url=None) == ["scm_url: missing"]
    assert problems_with(schema=None) == ["$schema: missing"]
    assert any(p.startswith("category:") for p in problems_with(category="Utilities"))
    assert any(p.startswith("build_dependencies:") for p in problems_with(build_dependencies=[]))
    assert any(p.startswith("scm_url:") for p in problems_with(scm_url="/home/me/PLBOpt"))
    assert problems_with(tier="1") == ["tier: must be a int"]
    assert problems_with(description="not here") == ["description: not a catalog-entry field"]
    assert any("EXTENSION_ICONURL" in p for p in problems_with(scm_url="https://github.com/someone/Else.git"))
    assert catalog_problems(entry, "Other.json", cmake, REPO)[0].startswith("Other.json: must be named")
    without_status = re.sub(r'set\(EXTENSION_STATUS "[^"]*"\)', "", cmake)
    assert catalog_problems(entry, "PLBOpt.json", without_status, REPO) == ["CMakeLists.txt: EXTENSION_STATUS is not set"]
