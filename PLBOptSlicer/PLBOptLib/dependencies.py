"""Detect and install the third-party packages training needs: torch and PLBOptCore's light dependencies.

PLBOptCore itself ships with the extension (see :mod:`PLBOptLib.bundle`) and is never installed
from a package index: a bare ``plbopt`` from an index could be anyone's code. What is installed
comes from the index by pinned-minimum name only: torch through the PyTorch extension (it picks
the CUDA build for the driver), the light packages through Slicer's ``pip_install`` with a
constraints file that pins the installed torch and SimpleITK, so pip can never replace Slicer's
SimpleITK or the PyTorch extension's CUDA torch.

Nothing here imports torch into Slicer: detection reads package metadata, and the device check
runs in a child interpreter, like training itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import slicer

TORCH_MINIMUM = "2.2"
# What an install asks for. torch 2.13 changed how its wheels carry their licence files, and its
# install breaks Slicer 5.12 on Windows (Slicer/light-the-torch#176; "<2.13" installs), so none is
# installed from here; a newer torch that is already installed (and imports) is kept.
TORCH_INSTALL_BELOW = "2.13"
TORCH_INSTALL_REQUIREMENT = f">={TORCH_MINIMUM},<{TORCH_INSTALL_BELOW}"
# What the PyTorch extension installs with torch (light-the-torch picks the CUDA build for the driver).
PYTORCH_EXTENSION_ALSO_INSTALLS = ("torchvision", "light-the-torch")
# Provided by Slicer (SimpleITK) and the PyTorch extension (torch); pinned, never replaced.
PROTECTED_PACKAGES = ("torch", "SimpleITK")
# PLBOptCore's dependencies other than the protected ones (pyproject.toml [project].dependencies).
LIGHT_REQUIREMENTS = ("numpy>=1.23", "scikit-image>=0.21", "scipy>=1.10", "tqdm>=4.60", "pyyaml>=6", "matplotlib>=3.6")
# Distribution name -> top-level module, where they differ (to tell whether Slicer has it imported).
IMPORT_NAMES = {"scikit-image": "skimage", "pyyaml": "yaml", "pillow": "PIL", "light-the-torch": "light_the_torch"}
# Packages an install can replace as a dependency of what it installs (scikit-image and matplotlib
# upgrade numpy, scipy and pillow; pip upgrades packaging): Slicer has some of them imported.
DEPENDENCIES_OFTEN_UPGRADED = ("numpy", "scipy", "pillow", "packaging")
TORCH_PROBE_CODE = ("import json, torch; cuda = torch.cuda.is_available(); "
                    "print(json.dumps({'torch': torch.__version__, 'cuda': cuda, "
                    "'device_name': torch.cuda.get_device_name(0) if cuda else 'CPU'}))")

VersionLookup = Callable[[str], Optional[str]]


def installed_version(distribution: str) -> Optional[str]:
    """Installed version of a distribution, from metadata only (nothing gets imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirement_name(requirement: str) -> str:
    """``scikit-image>=0.21`` -> ``scikit-image``."""
    return re.split(r"[\s<>=!~;\[@]", requirement.strip(), maxsplit=1)[0]


def version_key(version: str) -> Tuple[int, ...]:
    """``2.3.1+cu121`` -> ``(2, 3, 1)``: enough to compare release numbers with a minimum."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


@dataclass
class DependencyStatus:
    """What is installed and what an install would add or upgrade."""

    torch_version: Optional[str]
    missing_light: List[str] = field(default_factory=list)

    @property
    def torch_ok(self) -> bool:
        return self.torch_version is not None and version_key(self.torch_version) >= version_key(TORCH_MINIMUM)

    @property
    def ready(self) -> bool:
        return self.torch_ok and not self.missing_light

    def summary(self) -> str:
        if self.torch_version is None:
            torch = "torch: not installed"
        elif not self.torch_ok:
            torch = f"torch: {self.torch_version} (older than {TORCH_MINIMUM})"
        else:
            torch = f"torch: {self.torch_version}"
        return torch + (f"; missing: {', '.join(self.missing_light)}" if self.missing_light else "")

    def install_description(self, core_dir: Path) -> str:
        """The one confirmation text: every package an install would add, and what it leaves alone."""
        lines = ["PLBOpt needs these Python packages from the Python Package Index:"]
        if self.torch_version is None:
            lines.append(f"  • torch{TORCH_INSTALL_REQUIREMENT} (through the PyTorch extension: CUDA build when a GPU is "
                         "found)")
        elif not self.torch_ok:
            lines.append(f"  • torch{TORCH_INSTALL_REQUIREMENT}, replacing torch {self.torch_version} (through the PyTorch "
                         "extension; Slicer must be restarted afterwards if torch is already loaded)")
        if not self.torch_ok:
            lines.append(f"  • {' and '.join(PYTORCH_EXTENSION_ALSO_INSTALLS)}, which the PyTorch extension installs "
                         "with torch")
        lines += [f"  • {requirement}" for requirement in self.missing_light]
        lines.append(f"PLBOptCore comes with the extension ({core_dir}) and is not downloaded.")
        lines.append("Installed SimpleITK (and torch, unless listed) are kept as they are. torch can be several GB.")
        return "\n".join(lines)


def check_dependencies(lookup: VersionLookup = installed_version) -> DependencyStatus:
    """Installed torch version and the light requirements that are missing."""
    missing = [r for r in LIGHT_REQUIREMENTS if lookup(requirement_name(r)) is None]
    return DependencyStatus(torch_version=lookup("torch"), missing_light=missing)


def protected_constraints(lookup: VersionLookup = installed_version) -> List[str]:
    """``name==version`` pins for the installed protected packages (pip constraints)."""
    return [f"{name}=={version}" for name in PROTECTED_PACKAGES if (version := lookup(name))]


def packages_an_install_may_change(status: "DependencyStatus") -> List[str]:
    """Distributions whose version to compare before and after an install, to tell whether Slicer
    must restart: what is installed (torch with what the PyTorch extension brings, the missing
    light packages) and what pip may upgrade as their dependency, including light requirements
    that are already installed."""
    names = [requirement_name(r) for r in LIGHT_REQUIREMENTS] + list(DEPENDENCIES_OFTEN_UPGRADED)
    if not status.torch_ok:
        names = ["torch", *PYTORCH_EXTENSION_ALSO_INSTALLS, *names]
    return list(dict.fromkeys(names))


def installed_versions(requirements: Iterable[str], lookup: VersionLookup = installed_version) -> Dict[str, Optional[str]]:
    """``{name: installed version or None}`` for requirement strings."""
    return {requirement_name(r): lookup(requirement_name(r)) for r in requirements}


def restart_reasons(before: Dict[str, Optional[str]], after: Dict[str, Optional[str]],
                    imported: Optional[Iterable[str]] = None) -> List[str]:
    """Packages whose version changed while Slicer has them imported (``imported``, default the
    modules loaded now; the old code stays in memory until a restart), as ``name old -> new``."""
    loaded = set(sys.modules if imported is None else imported)
    return [f"{name} {before[name]} -> {after[name]}" for name in sorted(before)
            if before[name] is not None and after.get(name) != before[name] and IMPORT_NAMES.get(name, name) in loaded]


def _slicer_packaging():
    """Slicer's package manager module (``slicer.packaging``, 5.12+), or None before that."""
    try:
        return __import__("slicer.packaging", fromlist=["pip_install"])
    except ImportError:
        return None


def install_torch(log: Callable[[str], None]) -> None:
    """Install (or upgrade to) torch TORCH_INSTALL_REQUIREMENT with the PyTorch extension (which also
    installs torchvision and light-the-torch), else from PyPI."""
    requirement = f"torch{TORCH_INSTALL_REQUIREMENT}"
    try:
        import PyTorchUtils
    except ImportError:
        log("PyTorch extension not found: installing torch from PyPI (CPU build on Windows and macOS). "
            "Install the PyTorch extension for GPU training.")
        slicer.util.pip_install(requirement)
        return
    log("Installing torch with the PyTorch extension…")
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_INSTALL_REQUIREMENT) is None:
        raise RuntimeError("PyTorch installation failed or was cancelled")


def install_light(requirements: Sequence[str], log: Callable[[str], None]) -> None:
    """Install light requirements with torch and SimpleITK pinned to their installed versions.

    The user has already agreed to the list (:meth:`DependencyStatus.install_description`), so
    Slicer 5.12's ``pip_install`` is used, not ``pip_ensure``, which would ask a second time; its
    progress dialog keeps the application responsive while pip runs.
    """
    if not requirements:
        return
    with tempfile.NamedTemporaryFile("w", suffix="-plbopt-constraints.txt", delete=False) as constraints:
        constraints.write("\n".join(protected_constraints()) + "\n")
    try:
        log(f"Installing {', '.join(requirements)}…")
        packaging = _slicer_packaging()
        if packaging is not None:
            packaging.pip_install(list(requirements), constraints=constraints.name, requester="PLBOpt")
        else:  # Slicer 5.10: pip_install(requirements) only
            slicer.util.pip_install(["-c", constraints.name, *requirements])
    finally:
        Path(constraints.name).unlink()


def torch_probe_command(python: str) -> List[str]:
    """A child-interpreter command printing ``{"torch", "cuda", "device_name"}`` as its last line;
    importing torch in a child keeps its memory and CUDA context out of Slicer."""
    return [python, "-c", TORCH_PROBE_CODE]


def parse_torch_probe(lines: Sequence[str], returncode: int) -> Dict[str, object]:
    """The probe's answer, or RuntimeError with its last output line when torch cannot be imported."""
    text = [line for line in lines if line.strip()]
    if returncode != 0 or not text:
        raise RuntimeError(f"torch cannot be imported: {text[-1] if text else 'exit ' + str(returncode)}")
    return json.loads(text[-1])


def device_message(probe: Dict[str, object]) -> str:
    """Plain sentence for the panel about where training will run."""
    if probe.get("cuda"):
        return f"Training will run on the GPU ({probe.get('device_name')}, torch {probe.get('torch')})."
    return (f"No CUDA GPU is visible to torch {probe.get('torch')}: training will run on the CPU, which is "
            "much slower; use a small patch size and few iterations, or install the PyTorch extension's CUDA build.")
