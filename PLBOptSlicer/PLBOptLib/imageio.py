"""Volume-node geometry and NIfTI/NRRD files, without qt.

MRML stores geometry in RAS, ITK/NIfTI files in LPS; the two differ by flipping the first two
axes. Arrays are always (K, J, I) = (Z, Y, X), the order of ``slicer.util.arrayFromVolume``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import vtk

import slicer

# RAS <-> LPS: negate the first two world axes (its own inverse).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """A voxel grid: size (I, J, K), spacing (I, J, K) mm, origin (RAS mm), axis directions (3x3, columns I, J, K in RAS)."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    directions: np.ndarray

    def differences(self, other: "Geometry", tolerance: float = 1e-3) -> List[str]:
        """Human-readable list of what differs from ``other`` (empty when the grids match).

        Spacing is compared relatively, origin in mm and directions absolutely, all with ``tolerance``.
        """
        problems = []
        if tuple(self.size) != tuple(other.size):
            problems.append(f"size {tuple(self.size)} vs {tuple(other.size)}")
        if not np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=0):
            problems.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=tolerance):
            problems.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.directions, other.directions, rtol=0, atol=tolerance):
            problems.append("axis directions differ")
        return problems

    def ijk_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """World position (RAS mm) of a continuous voxel index (I, J, K)."""
        return np.asarray(self.origin) + self.directions @ (np.asarray(ijk, float) * np.asarray(self.spacing))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def check_not_transformed(node) -> None:
    """Files carry only the node's own grid, so a parent transform would be silently lost."""
    from .errors import PLBOptSlicerError

    if node.GetParentTransformNode() is not None:
        raise PLBOptSlicerError(f"{node.GetName()}: is under a transform; harden the transform first "
                                "(Data module: right-click > Harden transform)")


def volume_geometry(volume_node) -> Geometry:
    """Grid of a volume node, from its image data and IJK-to-RAS matrix."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(matrix)
    directions = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    return Geometry(size=tuple(volume_node.GetImageData().GetDimensions()), spacing=tuple(volume_node.GetSpacing()),
                    origin=tuple(volume_node.GetOrigin()), directions=directions)


def oriented_image_geometry(image) -> Geometry:
    """Grid of a ``vtkOrientedImageData`` (segmentation geometry), origin moved to its first voxel."""
    matrix = vtk.vtkMatrix4x4()
    image.GetDirectionMatrix(matrix)
    directions = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    extent = image.GetExtent()
    first_voxel = np.array([extent[0], extent[2], extent[4]], float)
    origin = np.asarray(image.GetOrigin()) + directions @ (first_voxel * np.asarray(image.GetSpacing()))
    size = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    return Geometry(size=size, spacing=tuple(image.GetSpacing()), origin=tuple(origin), directions=directions)


def sitk_geometry(image) -> Geometry:
    """Grid of a SimpleITK image, converted from LPS to RAS."""
    directions_lps = np.array(image.GetDirection(), float).reshape(3, 3)
    return Geometry(size=tuple(image.GetSize()), spacing=tuple(image.GetSpacing()),
                    origin=tuple(_RAS_TO_LPS @ np.asarray(image.GetOrigin())),
                    directions=_RAS_TO_LPS @ directions_lps)


def array_to_sitk(array_kji: np.ndarray, geometry: Geometry):
    """SimpleITK image holding ``array_kji`` on ``geometry`` (LPS, as ITK and NIfTI expect)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing([float(s) for s in geometry.spacing])
    image.SetOrigin([float(v) for v in _RAS_TO_LPS @ np.asarray(geometry.origin)])
    image.SetDirection([float(v) for v in (_RAS_TO_LPS @ geometry.directions).ravel()])
    return image


def write_image(image, path: Path) -> None:
    """Write atomically (temp file in the same folder, then rename) so a crash never leaves half a file."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        sitk.WriteImage(image, str(temporary), True)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_image(path: Path):
    """Read an image file with SimpleITK; a clear error when it is missing or unreadable."""
    import SimpleITK as sitk

    from .errors import PLBOptSlicerError

    path = Path(path)
    if not path.is_file():
        raise PLBOptSlicerError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise PLBOptSlicerError(f"{path}: cannot be read ({str(error).strip().splitlines()[-1]})") from error


def set_volume_from_array(volume_node, array_kji: np.ndarray, geometry: Geometry) -> None:
    """Give ``volume_node`` the voxels ``array_kji`` on ``geometry``."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(geometry.directions[r, c]))
    volume_node.SetIJKToRASDirectionMatrix(matrix)
    volume_node.SetSpacing(*[float(s) for s in geometry.spacing])
    volume_node.SetOrigin(*[float(v) for v in geometry.origin])
    slicer.util.updateVolumeFromArray(volume_node, np.ascontiguousarray(array_kji))
