"""Detect and install what training needs: torch (via the PyTorch extension) and PLBOptCore.

Nothing here imports torch into Slicer: detection reads package metadata, and the device check
runs in a child interpreter, like training itself. PLBOptCore is installed without its declared
dependencies so pip can never swap Slicer's SimpleITK or the PyTorch extension's CUDA torch for a
PyPI build; its light dependencies are installed separately, only if missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import slicer

TORCH_REQUIREMENT = ">=2.2"
PLBOPT_DISTRIBUTION = "plbopt"
# Provided by Slicer (SimpleITK) and the PyTorch extension (torch); pinned, never replaced.
PROTECTED_PACKAGES = ("torch", "SimpleITK")
# PLBOptCore's dependencies other than the protected ones (pyproject.toml [project].dependencies).
LIGHT_REQUIREMENTS = ("numpy>=1.23", "scikit-image>=0.21", "scipy>=1.10", "tqdm>=4.60", "pyyaml>=6", "matplotlib>=3.6")

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


def plbopt_requirement(module_dir: Path) -> str:
    """What pip should install for PLBOptCore: the source tree the module runs from (developer
    checkout, identified by its pyproject.toml) or the released package."""
    root = Path(module_dir).resolve().parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'^name\s*=\s*"plbopt"', pyproject.read_text(), re.MULTILINE):
        return f"{PLBOPT_DISTRIBUTION} @ {root.as_uri()}"
    return PLBOPT_DISTRIBUTION


@dataclass
class DependencyStatus:
    """What is installed and what an install would add."""

    torch_version: Optional[str]
    plbopt_version: Optional[str]
    missing_light: List[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.torch_version is not None and self.plbopt_version is not None and not self.missing_light

    def summary(self) -> str:
        return (f"torch: {self.torch_version or 'not installed'}; "
                f"PLBOptCore: {self.plbopt_version or 'not installed'}"
                + (f"; missing: {', '.join(self.missing_light)}" if self.missing_light else ""))

    def install_description(self, plbopt_source: str) -> str:
        """The confirmation text: every package an install would add, and what it leaves alone."""
        lines = ["PLBOpt needs these Python packages:"]
        if self.torch_version is None:
            lines.append(f"  • torch{TORCH_REQUIREMENT} (through the PyTorch extension: CUDA build when a GPU is found)")
        if self.plbopt_version is None:
            lines.append(f"  • {plbopt_source} (without its dependencies)")
        lines += [f"  • {requirement}" for requirement in self.missing_light]
        lines.append("Installed torch and SimpleITK are kept as they are. Download size can be several GB for torch.")
        return "\n".join(lines)


def check_dependencies(lookup: VersionLookup = installed_version) -> DependencyStatus:
    """Installed torch / PLBOptCore versions and the light requirements that are missing."""
    missing = [r for r in LIGHT_REQUIREMENTS if lookup(requirement_name(r)) is None]
    return DependencyStatus(torch_version=lookup("torch"), plbopt_version=lookup(PLBOPT_DISTRIBUTION),
                            missing_light=missing)


def protected_constraints(lookup: VersionLookup = installed_version) -> List[str]:
    """``name==version`` pins for the installed protected packages (pip constraints)."""
    return [f"{name}=={version}" for name in PROTECTED_PACKAGES if (version := lookup(name))]


def _slicer_packaging():
    """Slicer's package manager module (``slicer.packaging``; ``slicer.pydeps`` in 5.11), or None before 5.11."""
    for name in ("packaging", "pydeps"):
        try:
            return __import__(f"slicer.{name}", fromlist=["pip_ensure"])
        except ImportError:
            continue
    return None


def install_torch(log: Callable[[str], None]) -> None:
    """Install torch with the PyTorch extension (picks the CUDA build for the driver), else from PyPI."""
    try:
        import PyTorchUtils
    except ImportError:
        log("PyTorch extension not found: installing torch from PyPI (CPU build on Windows and macOS). "
            "Install the PyTorch extension for GPU training.")
        slicer.util.pip_install(f"torch{TORCH_REQUIREMENT}")
        return
    log("Installing torch with the PyTorch extension…")
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
        raise RuntimeError("PyTorch installation failed or was cancelled")


def install_plbopt(status: DependencyStatus, plbopt_source: str, log: Callable[[str], None]) -> None:
    """Install PLBOptCore and its missing light requirements, never touching torch or SimpleITK."""
    packaging = _slicer_packaging()
    if packaging is not None:
        # Slicer 5.11+: skip_packages drops the protected packages from the whole dependency tree.
        from packaging.requirements import Requirement

        log(f"Installing {plbopt_source} (keeping {', '.join(PROTECTED_PACKAGES)})…")
        packaging.pip_ensure([Requirement(plbopt_source), *[Requirement(r) for r in LIGHT_REQUIREMENTS]],
                             skip_packages=list(PROTECTED_PACKAGES), requester="PLBOpt")
        return
    # Slicer 5.10: two plain pip calls, the second constrained to the installed protected versions.
    log(f"Installing {plbopt_source} without dependencies…")
    slicer.util.pip_install(["--no-deps", plbopt_source])
    if status.missing_light:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write("\n".join(protected_constraints()) + "\n")
        log(f"Installing {', '.join(status.missing_light)}…")
        slicer.util.pip_install(["-c", constraints.name, *status.missing_light])
        Path(constraints.name).unlink()


def probe_torch(python: str, timeout: float = 180.0) -> Dict[str, object]:
    """Ask a child interpreter which torch and device training would get.

    Returns ``{"torch": version, "cuda": bool, "device_name": str}``; importing torch in a child
    keeps its memory and CUDA context out of Slicer.
    """
    code = ("import json, torch; cuda = torch.cuda.is_available(); "
            "print(json.dumps({'torch': torch.__version__, 'cuda': cuda, "
            "'device_name': torch.cuda.get_device_name(0) if cuda else 'CPU'}))")
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"torch cannot be imported: {lines[-1] if lines else 'exit ' + str(result.returncode)}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def device_message(probe: Dict[str, object]) -> str:
    """Plain sentence for the panel about where training will run."""
    if probe.get("cuda"):
        return f"Training will run on the GPU ({probe.get('device_name')}, torch {probe.get('torch')})."
    return (f"No CUDA GPU is visible to torch {probe.get('torch')}: training will run on the CPU, which is "
            "much slower; use a small patch size and few iterations, or install the PyTorch extension's CUDA build.")
