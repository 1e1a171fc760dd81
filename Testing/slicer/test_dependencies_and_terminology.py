"""Smaller problems of issue 21 item 7: the restart check sees numpy and scipy upgraded as
dependencies, the install dialog names everything the PyTorch extension installs, torch has an
upper bound, and only paired organs carry a left/right modifier, with Slicer's code meanings."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from PLBOptLib import dependencies, terminology


def test_an_install_that_upgrades_numpy_or_scipy_as_a_dependency_asks_for_a_restart():
    """Installing scikit-image upgrades numpy and scipy, which Slicer has imported: the old code
    stays in memory until a restart, though neither was on the list of missing packages."""
    installed = {"torch": "2.4.1", "numpy": "1.24.4", "scipy": "1.10.1", "SimpleITK": "2.3.1", "tqdm": "4.66",
                 "pyyaml": "6.0", "matplotlib": "3.8", "pillow": "10.0"}
    status = dependencies.check_dependencies(installed.get)
    assert status.missing_light == ["scikit-image>=0.21"]
    names = dependencies.packages_an_install_may_change(status)
    assert {"numpy", "scipy", "pillow", "scikit-image"} <= set(names) and "torch" not in names  # torch is not touched
    before = dependencies.installed_versions(names, installed.get)
    after = dependencies.installed_versions(names, {**installed, "scikit-image": "0.24", "numpy": "1.26.4",
                                                    "scipy": "1.13.1", "pillow": "10.4"}.get)
    assert dependencies.restart_reasons(before, after, imported={"numpy", "scipy", "PIL", "vtk"}) == [
        "numpy 1.24.4 -> 1.26.4", "pillow 10.0 -> 10.4", "scipy 1.10.1 -> 1.13.1"]
    assert dependencies.restart_reasons(before, after, imported={"vtk"}) == []  # nothing old in memory

    without_torch = dependencies.check_dependencies({**installed, "torch": None}.get)
    assert dependencies.packages_an_install_may_change(without_torch)[:3] == ["torch", "torchvision", "light-the-torch"]


def test_the_install_dialog_names_what_the_pytorch_extension_installs_and_torch_is_bounded():
    text = dependencies.check_dependencies(lambda name: None).install_description(Path("/ext/PLBOptCore"))
    assert "torch>=2.2,<2.13 (through the PyTorch extension" in text
    assert "torchvision and light-the-torch, which the PyTorch extension installs with torch" in text
    ready = dependencies.check_dependencies({"torch": "2.13.0", **{dependencies.requirement_name(r): "99"
                                                                   for r in dependencies.LIGHT_REQUIREMENTS}}.get)
    assert ready.ready  # an installed newer torch is kept: the bound is for what an install fetches


def test_torch_is_installed_below_the_version_that_breaks_slicer_5_12_on_windows(monkeypatch):
    asked = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **options):
            asked.append(torchVersionRequirement)
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    dependencies.install_torch(lambda line: None)
    assert asked == [">=2.2,<2.13"]  # PyTorchUtils appends it to "torch": ltt install torch>=2.2,<2.13 torchvision

    requested = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension: from PyPI, same bound
    monkeypatch.setattr(dependencies.slicer.util, "pip_install", lambda requirement, **kw: requested.append(requirement),
                        raising=False)
    dependencies.install_torch(lambda line: None)
    assert requested == ["torch>=2.2,<2.13"]


def test_only_paired_organs_carry_a_side_and_the_bladder_has_slicers_name():
    assert "~SCT^64033007^Kidney~SCT^7771000^Left~" in terminology.terminology_entry("Kidney_Left")
    assert "~SCT^39607008^Lung~SCT^24028007^Right~" in terminology.terminology_entry("right lung")
    assert terminology.terminology_entry("left liver") is None  # no "left liver" in the list: no code at all
    assert terminology.terminology_entry("spleen right") is None
    assert "~SCT^10200004^Liver~^^~" in terminology.terminology_entry("Liver")
    assert "~SCT^89837001^Bladder~^^~" in terminology.terminology_entry("bladder")
    assert "~SCT^89837001^Bladder~^^~" in terminology.terminology_entry("urinary_bladder")
