"""Reading, writing and checking 3D images with SimpleITK.

Every problem a user's file can have is reported as ``DatasetError("<path>: <problem>")`` so that
the CLI and Slicer can show one clear line instead of an ITK stack trace.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..errors import DatasetError
from ..utils import atomic_write

# Longest suffix first: ``.seg.nrrd`` must win over ``.nrrd`` and ``.nii.gz`` over ``.gz``.
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# Anything with GetSize/GetSpacing/GetOrigin/GetDirection: a ``sitk.Image`` or a
# ``sitk.ImageFileReader`` after ``ReadImageInformation`` (header-only checks).
Geometry = Union[sitk.Image, sitk.ImageFileReader]


def case_name(path: Path) -> str:
    """File name without its image suffix (``a.nii.gz`` → ``a``), or the folder name of a DICOM series."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        return name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# nnU-Net names the channels of a case ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...
CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


def image_case_name(path: Path) -> str:
    """Case name of an input image: :func:`case_name` without nnU-Net's channel-0 suffix ``_0000``,
    so that ``imagesTs/liver_3_0000.nii.gz`` is case ``liver_3`` like ``labelsTs/liver_3.nii.gz``."""
    name = case_name(path)
    match = CHANNEL_SUFFIX.search(name)
    return name[: match.start()] if match and match.group(1) == "0000" else name


def check_single_channel(paths: Sequence[Path]) -> None:
    """Raise ``DatasetError`` when ``paths`` hold a second channel (``<case>_0001``...) of a case
    whose ``<case>_0000`` image is among them: PLBOpt's networks take one channel."""
    channel_zero = {case_name(p)[:-5] for p in paths if image_case_name(p) != case_name(p)}
    for path in paths:
        match = CHANNEL_SUFFIX.search(case_name(path))
        if match and match.group(1) != "0000" and case_name(path)[: match.start()] in channel_zero:
            raise DatasetError(f"{path}: channel {int(match.group(1))} of a multi-channel nnU-Net case; "
                               "PLBOpt trains and predicts single-channel images only")


CONFIDENCE_SUFFIX = "_confidence"  # `<case>_confidence.nii.gz`, written beside `<case>.nii.gz` by predict


def image_files(folder: Path) -> List[Path]:
    """Sorted image files of a folder, leaving out hidden files (including the ``.tmp-`` files of an
    interrupted atomic write) and the ``<case>_confidence`` maps that ``plbopt predict`` writes."""
    return [path for path in sorted(Path(folder).iterdir())
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)
            and not case_name(path).endswith(CONFIDENCE_SUFFIX)]


def _image_suffix(path: Path) -> str:
    lower = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise DatasetError(
        f"{path}: unsupported file type (expected {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)"
    )


def _check_magic(path: Path, suffix: str) -> None:
    """Reject files whose first bytes do not match their extension, before ITK guesses wrongly."""
    with open(path, "rb") as f:
        head = f.read(352)
    if suffix == ".nii" and len(head) < 348:
        raise DatasetError(f"{path}: file is truncated ({len(head)} bytes; a NIfTI header alone has 348)")
    if suffix == ".nii.gz":
        ok, what = head[:2] == b"\x1f\x8b", "gzip-compressed NIfTI"
    elif suffix == ".nii":
        ok, what = head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00", "NIfTI"
    elif suffix in (".nrrd", ".seg.nrrd"):
        ok, what = head[:4] == b"NRRD", "NRRD"
    else:  # MetaImage: a text header of "Key = Value" lines
        ok, what = re.match(rb"\s*\w+\s*=", head) is not None, "MetaImage"
    if not ok:
        raise DatasetError(f"{path}: not a {what} file (wrong magic bytes {head[:4]!r})")


def _itk_reason(exc: RuntimeError) -> str:
    """The informative part of an ITK exception: its ERROR line (without prefixes) and last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"(sitk::ERROR|ITK ERROR):", ln)]
    parts = [re.sub(r"^(sitk::ERROR|ITK ERROR):\s*|\(0x[0-9a-f]+\)", "", errors[0])] if errors else []
    if lines and lines[-1] not in errors:
        parts.append(lines[-1])
    return " ".join(parts)[:300] or "unknown error"


def _nifti_data_bytes(header: bytes) -> Optional[int]:
    """Bytes a NIfTI-1/2 file needs (header + voxel data) according to its header, or None."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif sizeof_hdr == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        return max(offset, sizeof_hdr) + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]])) * bitpix // 8
    return None


def _check_nifti_complete(path: Path, compressed: bool) -> None:
    """ITK's NIfTI reader fills missing voxels with zeros instead of failing: check the length here.

    For ``.nii.gz`` the gzip stream is decompressed (in chunks, not kept) to find its true length
    and whether it ends properly.
    """
    with open(path, "rb") as f:
        if not compressed:
            needed, actual = _nifti_data_bytes(f.read(544)), path.stat().st_size
        else:
            inflate = zlib.decompressobj(wbits=31)
            head, actual = b"", 0
            try:
                while not inflate.eof and (chunk := f.read(1 << 20)):
                    data = inflate.decompress(chunk)
                    head = head if len(head) >= 544 else (head + data)[:544]
                    actual += len(data)
            except zlib.error as exc:
                raise DatasetError(f"{path}: corrupt gzip data ({exc})") from None
            if not inflate.eof:
                raise DatasetError(f"{path}: file is truncated (gzip stream ends early)")
            needed = _nifti_data_bytes(head)
    if needed is None:
        raise DatasetError(f"{path}: not a NIfTI file (invalid header)")
    if actual < needed:
        raise DatasetError(f"{path}: file is truncated ({actual} bytes of voxel data and header, {needed} expected)")


def _dicom_file_names(folder: Path) -> Sequence[str]:
    # GDCM prints a multi-line ITK warning on stderr for a folder without DICOM files; the
    # DatasetError below says the same in one line.
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if not series:
        raise DatasetError(f"{folder}: folder contains no DICOM series")
    if len(series) > 1:
        raise DatasetError(
            f"{folder}: folder contains {len(series)} DICOM series ({', '.join(series[:3])}...); "
            "put one series per folder"
        )
    return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])


def _check_dimension(path: Path, dimension: int, size: Sequence[int], components: int) -> None:
    dims = "×".join(str(s) for s in size)
    if components != 1:
        raise DatasetError(f"{path}: image has {components} components per voxel; a scalar volume is required")
    if dimension == 2 or (dimension == 3 and min(size) == 1):
        raise DatasetError(f"{path}: image is 2D (size {dims}); a 3D volume is required")
    if dimension != 3:
        raise DatasetError(f"{path}: image is {dimension}D (size {dims}); a 3D volume is required")


def _check_file(path: Path, complete: bool = True) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    suffix = _image_suffix(path)
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty (0 bytes)")
    _check_magic(path, suffix)
    if complete and suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path, compressed=suffix == ".nii.gz")


def read_image(path: Path) -> sitk.Image:
    """Read a 3D scalar volume: NIfTI, NRRD, MetaImage file or a DICOM series folder.

    Raises ``DatasetError`` naming ``path`` when the file is missing, empty, of the wrong format,
    truncated or corrupt, not 3D (2D, 4D, vector), or holds NaN/Inf voxels.
    """
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(_dicom_file_names(path))
    else:
        _check_file(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DatasetError(f"{path}: cannot read image, file is truncated or corrupt ({_itk_reason(exc)})") from None
    _check_dimension(path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
        if bad:
            raise DatasetError(f"{path}: image contains {bad} NaN/Inf voxels")
    return image


def read_header(path: Path) -> Geometry:
    """Geometry of an image without reading its voxels (a DICOM series is read in full).

    Same file checks as :func:`read_image` except the voxel-value ones (NaN/Inf, truncated data).
    The result works with :func:`check_same_geometry`.
    """
    path = Path(path)
    if path.is_dir():
        return read_image(path)
    _check_file(path, complete=False)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DatasetError(f"{path}: cannot read image header, file is truncated or corrupt ({_itk_reason(exc)})") from None
    _check_dimension(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
    return reader


def write_image(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """Write ``image`` atomically; the format follows the extension of ``path``."""
    with atomic_write(Path(path)) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def check_same_geometry(ref: Geometry, other: Geometry, ref_path: Path, other_path: Path, tol: float = 1e-3) -> None:
    """Raise ``DatasetError`` unless ``other`` lies on the voxel grid of ``ref``.

    Sizes must match exactly; spacings within ``tol`` relative, origins within ``tol`` mm (plus
    ``tol`` relative, for origins far from zero) and direction cosines within ``tol``. Real data
    need the tolerance: DICOM series often carry spacings like 0.9999999999999929.
    Values are reported in SimpleITK's (x, y, z) order.
    """
    def fail(what: str, a: Sequence[float], b: Sequence[float]) -> None:
        raise DatasetError(
            f"{other_path}: {what} {_fmt(b)} (x, y, z) differs from {what} {_fmt(a)} of image {ref_path}"
        )

    if tuple(ref.GetSize()) != tuple(other.GetSize()):
        raise DatasetError(
            f"{other_path}: size {tuple(other.GetSize())} (x, y, z) differs from size "
            f"{tuple(ref.GetSize())} of image {ref_path}"
        )
    a, b = np.asarray(ref.GetSpacing()), np.asarray(other.GetSpacing())
    if np.any(np.abs(a - b) > tol * np.maximum(np.abs(a), np.abs(b))):
        fail("spacing", a, b)
    a, b = np.asarray(ref.GetOrigin()), np.asarray(other.GetOrigin())
    if np.any(np.abs(a - b) > tol * (1.0 + np.abs(a))):
        fail("origin", a, b)
    a, b = np.asarray(ref.GetDirection()), np.asarray(other.GetDirection())
    if np.any(np.abs(a - b) > tol):
        fail("direction", a, b)


def array_to_image(array_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image of ``array_zyx`` (Z, Y, X) with the geometry of ``reference``."""
    array_zyx = np.asarray(array_zyx)
    if array_zyx.dtype == bool:  # SimpleITK has no boolean pixel type
        array_zyx = array_zyx.astype(np.uint8)
    image = sitk.GetImageFromArray(array_zyx)
    image.CopyInformation(reference)
    return image
