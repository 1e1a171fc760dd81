"""Reading, writing and checking 3D images with SimpleITK.

Every problem a user's file can have is reported as ``DatasetError("<path>: <problem>")`` so that
the CLI and Slicer can show one clear line instead of an ITK stack trace.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..config import SPACING_RANGE_MM
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
        return path.resolve().name  # "." or "series/.." name the folder they stand for
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


# What a case name may become: ``<name><suffix>`` files written through ``.tmp-<pid>-<name><suffix>``
# (utils.atomic_write) and ``<cache>/<key>/<name>/`` folders. The temporary must fit a file name:
# 255 bytes on every common file system, minus the prefix with a pid of up to 10 digits (32-bit)
# and the longest image suffix.
FILE_NAME_BYTES = 255
CASE_NAME_BYTES = FILE_NAME_BYTES - len(".tmp--") - 10 - max(len(s) for s in IMAGE_SUFFIXES)


def check_case_name(name: object, where: Path) -> str:
    """``name`` if it is safe as one path component, else ``DatasetError("<where>: case name ...")``.

    Case names become cache folders and output files, so a name must not leave its folder or
    address another one: no absolute name, no ``.`` or ``..``, no separator (``/``, ``\\``), no NUL
    or other control character, no leading ``.`` (hidden, and the ``.tmp-`` files of an
    interrupted write are cleared as leftovers), and short enough that the temporary name of an
    atomic write still fits a file name.
    """
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: case name {name!r} must be a non-empty string")
    if any(sep in name for sep in {"/", "\\", os.sep, os.altsep} - {None}):
        raise DatasetError(f"{where}: case name {name!r} contains a path separator; "
                           "a case name is one file name, it must not lead into another folder")
    if name.startswith("."):
        raise DatasetError(f"{where}: case name {name!r} starts with '.'; '.', '..' and hidden names are refused")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise DatasetError(f"{where}: case name {name!r} contains a NUL or control character")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > CASE_NAME_BYTES:
        raise DatasetError(f"{where}: case name is {size} bytes long; at most {CASE_NAME_BYTES} fit a file name "
                           f"once the temporary prefix of an atomic write is added ({name[:40]!r}...)")
    return name


def check_single_channel(paths: Sequence[Path]) -> None:
    """Raise ``DatasetError`` when ``paths`` hold a second channel (``<case>_0001``...) of a case
    whose ``<case>_0000`` image is among them: PLBOpt's networks take one channel."""
    channel_zero = {case_name(p)[:-5] for p in paths if image_case_name(p) != case_name(p)}
    for path in paths:
        match = CHANNEL_SUFFIX.search(case_name(path))
        if match and match.group(1) != "0000" and case_name(path)[: match.start()] in channel_zero:
            raise DatasetError(f"{path}: channel {int(match.group(1))} of a multi-channel nnU-Net case; "
                               "PLBOpt trains and predicts single-channel images only")


# `plbopt predict -o OUT` writes label maps `OUT/<case><ending>` and confidence maps
# `OUT/confidence/<case><ending>`: OUT holds label maps only, as nnU-Net's evaluation expects (it
# keeps probabilities apart too, with --save_probabilities).
CONFIDENCE_FOLDER = "confidence"


def prediction_suffix(image: Path) -> str:
    """File ending of the prediction of input ``image``: the input's own format, so that a
    prediction folder pairs with ground truth stored like the images (nnU-Net's ``file_ending``).
    A DICOM series gives ``.nii.gz``; ``.mhd`` gives ``.mha``, because a header with a separate
    ``.raw`` cannot be moved into place atomically; ``.seg.nrrd`` gives ``.nrrd``, because a
    label map is not a Slicer segmentation file."""
    image = Path(image)
    if image.is_dir():
        return ".nii.gz"
    suffix = _image_suffix(image)
    return {".mhd": ".mha", ".seg.nrrd": ".nrrd"}.get(suffix, suffix)


def image_files(folder: Path) -> List[Path]:
    """Sorted image files of a folder, leaving out hidden files (including the ``.tmp-`` files of an
    interrupted atomic write)."""
    return [path for path in sorted(Path(folder).iterdir())
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)]


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


_COMPLEX_PIXEL_IDS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


def _check_dimension(path: Path, dimension: int, size: Sequence[int], components: int, pixel_id: int) -> None:
    dims = "×".join(str(s) for s in size)
    if pixel_id in _COMPLEX_PIXEL_IDS:  # before the component count: a reader counts 2 for complex voxels
        raise DatasetError(f"{path}: image has complex-valued voxels; a real-valued scalar volume is required")
    if components != 1:
        raise DatasetError(f"{path}: image has {components} components per voxel; a scalar volume is required")
    if dimension == 2 or (dimension == 3 and min(size) == 1):
        raise DatasetError(f"{path}: image is 2D (size {dims}); a 3D volume is required")
    if dimension != 3:
        raise DatasetError(f"{path}: image is {dimension}D (size {dims}); a 3D volume is required")


def _check_spacing(path: Path, spacing: Sequence[float]) -> None:
    """Refuse a voxel spacing no medical volume has (outside :data:`~PLBOptCore.config.SPACING_RANGE_MM`):
    a header written in metres (0.0015) or micrometres would be resampled to a handful of voxels,
    or to billions, and train or predict nonsense without any other error."""
    low, high = SPACING_RANGE_MM
    if not all(math.isfinite(s) and low <= s <= high for s in spacing):
        raise DatasetError(f"{path}: voxel spacing {_fmt(spacing)} mm (x, y, z) is not that of a medical image; "
                           f"each must be in [{low:g}, {high:g}] mm (a header written in metres?)")


def _check_slice_positions(path: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """Refuse a DICOM series two of whose slices lie at one position (ImagePositionPatient along the
    slice normal): ITK would stack them with an invented spacing of 1 mm. Slices without a
    position (some secondary captures) are left to ITK."""
    key = "0020|0032"
    names = reader.GetFileNames()
    if len(names) < 2 or not all(reader.HasMetaDataKey(i, key) for i in range(len(names))):
        return
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(len(names))])
    except ValueError:
        raise DatasetError(f"{path}: a slice has an unreadable ImagePositionPatient (0020,0032)") from None
    if positions.shape[1] != 3:
        raise DatasetError(f"{path}: a slice's ImagePositionPatient (0020,0032) does not hold 3 numbers")
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if gaps.size and gaps.min() < 1e-3:  # mm: DICOM writes positions to 1e-6 and more
        first = int(np.argmin(gaps))
        a, b = (Path(names[order[first]]).name, Path(names[order[first + 1]]).name)
        raise DatasetError(f"{path}: slices {a} and {b} lie at one position ({along[order[first]]:.6g} mm along the "
                           "slice normal), so the slice spacing is 0; a series must have one slice per position")


# A NRRD header's `data file:` (also `datafile:`) and a MetaImage header's `ElementDataFile` name
# the files holding the voxels: one name, `LIST` (the names follow, one a line), or a printf
# pattern with first, last and step numbers (`slice%03d.raw 1 40 1`). MetaImage's `LOCAL` means
# the voxels follow the header.
_DATA_FILE_FIELDS = {"nrrd": re.compile(r"\s*data ?file\s*:(.*)$", re.IGNORECASE),
                     "meta": re.compile(r"\s*ElementDataFile\s*=(.*)$", re.IGNORECASE)}
_MAX_PATTERN_FILES = 100_000


def _detached_data_files(path: Path, suffix: str) -> List[str]:
    """The file names a NRRD or MetaImage header reads its voxels from; [] when they follow the header."""
    nrrd = suffix in (".nrrd", ".seg.nrrd")
    with open(path, "rb") as f:
        lines = f.read(1 << 20).decode("utf-8", "surrogateescape").splitlines()
    field = _DATA_FILE_FIELDS["nrrd" if nrrd else "meta"]
    for index, line in enumerate(lines):
        if nrrd and not line.strip():
            return []  # the blank line ending a NRRD header: the voxels are attached
        match = field.match(line)
        if match:
            break
    else:
        return []
    value = match.group(1).strip()
    tokens = value.split()
    if not tokens or (not nrrd and tokens[0].upper() == "LOCAL"):
        return []
    if tokens[0].upper() == "LIST":
        return [line.strip() for line in lines[index + 1:] if line.strip()]
    if len(tokens) >= 4 and "%" in tokens[0] and all(re.fullmatch(r"[+-]?\d+", t) for t in tokens[1:4]):
        first, last, step = (int(t) for t in tokens[1:4])
        if step == 0 or (last - first) // step + 1 > _MAX_PATTERN_FILES:
            raise DatasetError(f"{path}: data file pattern {value!r} names no or too many files")
        try:
            return [tokens[0] % number for number in range(first, last + (1 if step > 0 else -1), step)]
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: data file pattern {tokens[0]!r} is not a number pattern") from None
    return [value]


def _check_data_files_inside(path: Path, suffix: str) -> None:
    """Refuse a header whose voxels would be read from outside its folder.

    The reader opens the names relative to the header's folder as given; each must resolve
    (symbolic links followed) into that folder, or into the folder the header itself resolves to
    (a dataset assembled from links to header and data files). Otherwise a header could make any
    file the user can read part of a dataset, around the rule that dataset paths stay inside.
    """
    folder = path.parent
    allowed = (folder.resolve(), path.resolve().parent)
    for name in _detached_data_files(path, suffix):
        target = (folder / name).resolve() if "\0" not in name else None
        if target is None or not any(target.is_relative_to(inside) for inside in allowed):
            raise DatasetError(f"{path}: header reads its voxels from {name[:200]!r}, outside the folder of "
                               "the header; keep the data file next to its header")


def _check_file(path: Path, complete: bool = True) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    suffix = _image_suffix(path)
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty (0 bytes)")
    _check_magic(path, suffix)
    if suffix in (".nii", ".nii.gz"):
        if complete:
            _check_nifti_complete(path, compressed=suffix == ".nii.gz")
    else:
        _check_data_files_inside(path, suffix)


def read_image(path: Path) -> sitk.Image:
    """Read a 3D scalar volume: NIfTI, NRRD, MetaImage file or a DICOM series folder.

    Raises ``DatasetError`` naming ``path`` when the file is missing, empty, of the wrong format,
    truncated or corrupt, not 3D (2D, 4D, vector), has an implausible voxel spacing, holds NaN/Inf
    voxels, or is a DICOM series with two slices at one position.
    """
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(_dicom_file_names(path))
        reader.MetaDataDictionaryArrayUpdateOn()  # the slices' positions, checked below
    else:
        _check_file(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DatasetError(f"{path}: cannot read image, file is truncated or corrupt ({_itk_reason(exc)})") from None
    _check_dimension(path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(),
                     image.GetPixelID())
    if path.is_dir():
        _check_slice_positions(path, reader, image)
    _check_spacing(path, image.GetSpacing())
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
    _check_dimension(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                     reader.GetPixelID())
    _check_spacing(path, reader.GetSpacing())
    return reader


def write_image(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """Write ``image`` atomically; the format follows the extension of ``path``.

    A write the storage cut short raises :class:`~PLBOptCore.errors.OutputError` naming ``path``
    ("disk full?") and leaves ``path`` as it was: the NRRD and MetaImage writers raise
    (:func:`~PLBOptCore.utils.atomic_write` turns that into the error), ITK's NIfTI writer does not
    (it leaves a 0-byte or short file that reads back as zeros), so a NIfTI file is checked for
    its full length before it is moved into place.
    """
    path = Path(path)
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        _check_written(tmp, path)


def _check_written(tmp: Path, path: Path) -> None:
    """Raise ``OutputError`` for ``path`` unless the NIfTI file ``tmp`` holds its whole header and data."""
    from ..errors import OutputError

    suffix = _image_suffix(path)
    if suffix not in (".nii", ".nii.gz"):
        return
    try:
        if tmp.stat().st_size == 0:
            raise DatasetError(f"{tmp}: 0 bytes written")
        _check_nifti_complete(tmp, compressed=suffix == ".nii.gz")
    except DatasetError as exc:
        reason = str(exc).removeprefix(f"{tmp}: ")
        raise OutputError(f"{path}: the file could not be written completely ({reason}); disk full?") from None


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
