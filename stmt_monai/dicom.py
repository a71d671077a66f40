"""DICOM series as scanners write them: one volume per series, on the grid its slice positions give.

ITK's series reader spaces the slices evenly by their mean distance: a series with a missing
slice is read 5 % too thick everywhere and its mask would sit on wrong slice positions, and it
says so only as raw text on stderr. This module reads the slice positions itself:

- :func:`scan_folder`: every DICOM file of a folder by its header (SimpleITK / GDCM), grouped
  into series by ``SeriesInstanceUID``; each series a :class:`DicomSeries` with a case name;
- :func:`slice_grid`: the slices' grid from ``ImagePositionPatient`` projected on the slice
  normal (``ImageOrientationPatient``): even spacing; slices missing from an even lattice
  (filled, see below); gantry tilt (slices stacked along a direction that is not their normal:
  a sheared grid); refused with the reason: slices of different orientation or size, image
  rows and columns that are not perpendicular, two slices at one position, positions off one
  line, spacings that no even lattice holds, a gap wider than :data:`MAX_GAP_MM`;
- :func:`read_series`: the pixels (ITK, rescaled to HU by GDCM), missing slices filled by
  linear interpolation between their neighbours on the even lattice, so the volume and its
  mask hold every original slice at its own position; a tilted series made orthogonal by
  shifting each slice within its own plane (:func:`deshear`, as dcm2niix does: NIfTI readers
  other than nibabel cannot hold a sheared grid), so each slice of the volume and its mask lies
  in an original slice plane; ITK's own messages caught (:func:`itk_messages`) and returned as
  warnings.

Warnings are :class:`stmt_monai.io.InputWarning` s appended to the caller's list; refusals are
:class:`stmt_monai.io.ImageError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from stmt_monai.io import LPS_TO_RAS, ImageError, InputWarning

logger = logging.getLogger(__name__)


#: widest gap between two slices of a series that is filled by interpolation, in mm
MAX_GAP_MM = 10.0


#: a step may differ from a whole multiple of the series' spacing by this share of it
SPACING_TOLERANCE = 0.05


#: gantry tilts below this (degrees) are rounding of the positions, not a tilt
MIN_TILT_DEG = 0.05


# DICOM tags read from each file's header (SimpleITK's "gggg|eeee" keys)
_TAGS = {
    "position": "0020|0032",
    "orientation": "0020|0037",
    "series_uid": "0020|000e",
    "series_number": "0020|0011",
    "description": "0008|103e",
    "modality": "0008|0060",
    "tilt": "0018|1120",
    "rows": "0028|0010",
    "columns": "0028|0011",
    "pixel_spacing": "0028|0030",
}


# ----------------------------------------------------------------------------- ITK's messages
class _Collector(sitk.LoggerBase):
    """SimpleITK logger that keeps ITK's messages (one line each) instead of printing them."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def _keep(self, text: str) -> None:
        line = clean_itk_message(text)
        if line:
            self.messages.append(line)

    DisplayText = DisplayErrorText = DisplayWarningText = DisplayGenericOutputText = _keep

    def DisplayDebugText(self, text: str) -> None:  # ITK's name
        pass


def clean_itk_message(text: str) -> str:
    """ITK's multi-line message as one line: the source-file line and object addresses dropped.

    ``"WARNING: In /x/itkImageSeriesReader.hxx, line 502\\nImageSeriesReader (0x55): Non uniform
    sampling ..."`` -> ``"ImageSeriesReader: Non uniform sampling ..."``.
    """
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not re.match(r"^(WARNING|ERROR|Warning|Error)?:? ?In .*, line \d+$", ln)]
    line = " ".join(" ".join(lines).split())
    return re.sub(r" ?\(0x[0-9a-fA-F]+\)", "", line)


@contextlib.contextmanager
def itk_messages() -> Iterator[list[str]]:
    """Catch ITK's warnings (SimpleITK's global logger) while the block runs.

    Yields:
        the list the block's messages are appended to, one line each (:func:`clean_itk_message`);
        nothing reaches stderr meanwhile.
    """
    collector = _Collector()
    previous = collector.SetAsGlobalITKLogger()
    try:
        yield collector.messages
    finally:
        previous.SetAsGlobalITKLogger()


# ----------------------------------------------------------------------------- headers and series
@dataclasses.dataclass
class SliceHeader:
    """What one DICOM file's header says about its slice.

    Attributes:
        path: the file.
        position: ``ImagePositionPatient`` (LPS mm, centre of the first pixel), or None.
        orientation: ``ImageOrientationPatient`` (row then column direction cosines), or None.
        rows, columns: image size.
        pixel_spacing: ``(between rows, between columns)`` in mm, or None.
        series_uid, series_number, description, modality: series identity.
        tilt_deg: ``GantryDetectorTilt`` in degrees (0 if absent).
    """

    path: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    series_uid: str = ""
    series_number: str = ""
    description: str = ""
    modality: str = ""
    tilt_deg: float = 0.0


def _numbers(text: str | None) -> tuple[float, ...] | None:
    if not text or not text.strip():
        return None
    try:
        return tuple(float(v) for v in text.strip().split("\\"))
    except ValueError:
        return None


def read_header(path: str | os.PathLike) -> SliceHeader | None:
    """The header of one file as a :class:`SliceHeader`, or None if it is not a DICOM image.

    Kept while the file is unchanged (size and modification time), since a case's files are
    scanned when it is listed, when its memory need is estimated and when it is read.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _read_header(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8192)
def _read_header(path: str, nbytes: int, mtime_ns: int) -> SliceHeader | None:  # nbytes, mtime_ns: the cache key
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    try:
        with itk_messages():
            reader.ReadImageInformation()
    except RuntimeError:
        return None

    def tag(name: str) -> str:
        key = _TAGS[name]
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    size = reader.GetSize()
    position, orientation, spacing = _numbers(tag("position")), _numbers(tag("orientation")), _numbers(tag("pixel_spacing"))
    tilt = _numbers(tag("tilt"))
    return SliceHeader(
        path=str(path),
        position=tuple(position[:3]) if position and len(position) >= 3 else None,
        orientation=tuple(orientation[:6]) if orientation and len(orientation) >= 6 else None,
        rows=int(size[1]),
        columns=int(size[0]),
        pixel_spacing=tuple(spacing[:2]) if spacing and len(spacing) >= 2 else None,
        series_uid=tag("series_uid"),
        series_number=tag("series_number"),
        description=tag("description"),
        modality=tag("modality"),
        tilt_deg=float(tilt[0]) if tilt else 0.0,
    )


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    """One series of a folder that holds several: a case of its own.

    ``str()`` names the folder and the series (for ``file: reason`` lines); :attr:`name` is the
    case name the outputs take (:func:`stmt_monai.io.case_name`).

    Attributes:
        folder: the folder holding the files.
        uid: ``SeriesInstanceUID`` (may be empty).
        files: the series' files.
        name: case name, ``<folder>_s<number>_<description>`` (unique within the folder).
        label: the series as a person reads it, e.g. ``"3 CT Body 3.0 (120 images)"``.
    """

    folder: Path
    uid: str
    files: tuple[str, ...]
    name: str
    label: str

    def __str__(self) -> str:
        return f"{self.folder} [series {self.label}]"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.")


def scan_folder(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series of a folder (its own files, not sub-folders), by ``SeriesInstanceUID``.

    Files that are not DICOM images (and hidden names) are ignored.

    Returns:
        one :class:`DicomSeries` per series, most images first; ``[]`` if none.
    """
    folder = Path(folder)
    groups: dict[str, list[SliceHeader]] = {}
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return []
    for path in entries:
        header = read_header(path)
        if header is not None:
            groups.setdefault(header.series_uid, []).append(header)
    series, taken = [], set()
    for uid, headers in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        first = headers[0]
        words = " ".join(w for w in (first.series_number, first.description) if w)
        slug = _slug(f"s{first.series_number}_{first.description}" if words else uid[-12:] or "series")
        name = f"{folder.name}_{slug}"
        if name in taken:
            name = f"{name}_{_slug(uid[-8:]) or len(taken)}"
        while name in taken:
            name += "_"
        taken.add(name)
        label = f"{words or uid or 'without SeriesInstanceUID'} ({len(headers)} images)"
        series.append(DicomSeries(folder, uid, tuple(h.path for h in headers), name, label))
    return series


# ----------------------------------------------------------------------------- the slice grid
@dataclasses.dataclass
class SliceGrid:
    """Where a series' slices lie: an even lattice along the slice stacking direction.

    Attributes:
        files: the slices' files sorted along the slice normal.
        lattice: each file's index on the even lattice (``0 .. num_slices - 1``, increasing).
        num_slices: lattice length (``len(files)`` plus the missing slices).
        affine_lps: 4 x 4 voxel-to-world LPS affine of the lattice, voxel axes ``(column, row,
            slice)`` (ITK's array order); its third column is the step between lattice slices,
            which is not along the normal for a tilted series.
        spacing_mm: distance between lattice slices along the normal.
        tilt_deg: angle between the stacking direction and the slice normal (0: orthogonal grid).
        missing_mm: positions (mm along the normal, from the first slice) of the missing slices.
        rows, columns: image size.
    """

    files: list[str]
    lattice: list[int]
    num_slices: int
    affine_lps: np.ndarray
    spacing_mm: float
    tilt_deg: float
    missing_mm: list[float]
    rows: int
    columns: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the volume on the lattice (columns, rows, slices)."""
        return (self.columns, self.rows, self.num_slices)


def slice_grid(headers: Sequence[SliceHeader], source: str | os.PathLike) -> SliceGrid:
    """Check a series' slice positions and find the even lattice that holds them.

    Args:
        headers: the series' slices (any order).
        source: the folder, for error messages.

    Returns:
        the :class:`SliceGrid`.

    Raises:
        ImageError: the slices do not make one volume on an even grid (the reason says why).
    """
    if len(headers) < 2:
        raise ImageError(source, f"the series holds {len(headers)} image: not a 3D volume")
    missing_tags = [h for h in headers if h.position is None or h.orientation is None or h.pixel_spacing is None]
    if missing_tags:
        raise ImageError(
            source, f"{len(missing_tags)} of {len(headers)} images lack ImagePositionPatient, ImageOrientationPatient or PixelSpacing: no 3D geometry"
        )
    sizes = {(h.rows, h.columns) for h in headers}
    if len(sizes) > 1:
        raise ImageError(source, f"images of {len(sizes)} different sizes {sorted(sizes)} in one series: not one volume")
    orientations = np.array([h.orientation for h in headers], float)
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        kinds = len({tuple(np.round(o, 3)) for o in orientations})
        raise ImageError(source, f"images of {kinds} different orientations in one series (e.g. a localizer): not one volume")
    spacings = np.array([h.pixel_spacing for h in headers], float)
    if np.abs(spacings - spacings[0]).max() > 1e-3 * spacings[0].max():
        raise ImageError(source, "images of different pixel spacing in one series: not one volume")
    row, column = orientations[0, :3], orientations[0, 3:]
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    if abs(float(row @ column)) > 1e-3:
        angle = np.degrees(np.arccos(np.clip(row @ column, -1, 1)))
        raise ImageError(source, f"image rows and columns are not perpendicular ({angle:.1f} degrees in ImageOrientationPatient): not supported")
    normal = np.cross(row, column)
    positions = np.array([h.position for h in headers], float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    files = [headers[i].path for i in order]
    steps = np.diff(along)
    extent = float(along[-1] - along[0])
    if extent <= 0:
        raise ImageError(source, f"all {len(headers)} images lie at one position: not a 3D volume")
    base = float(np.median(steps[steps > 1e-3 * extent])) if np.any(steps > 1e-3 * extent) else extent
    duplicates = int(np.sum(steps < SPACING_TOLERANCE * base))
    if duplicates:
        at = float(along[1:][steps < SPACING_TOLERANCE * base][0] - along[0])
        raise ImageError(
            source, f"{duplicates} slice(s) at the position of another (first at {at:.2f} mm): two acquisitions or duplicate files in one series"
        )
    ratio = steps / base
    lattice_steps = np.rint(ratio).astype(int)
    off = np.abs(ratio - lattice_steps)
    if off.max() > SPACING_TOLERANCE:
        raise ImageError(
            source,
            f"unevenly spaced slices (steps {steps.min():.2f} to {steps.max():.2f} mm, not whole multiples of {base:.2f} mm): "
            "no even grid holds the original slices; export the series with even spacing",
        )
    if steps.max() > MAX_GAP_MM + SPACING_TOLERANCE * base:
        at = float(along[int(np.argmax(steps))] - along[0])
        raise ImageError(
            source, f"a gap of {steps.max():.1f} mm between slices (at {at:.1f} mm from the first; spacing {base:.2f} mm): too wide to fill (> {MAX_GAP_MM:g} mm)"
        )
    lattice = np.concatenate([[0], np.cumsum(lattice_steps)]).astype(int)
    # the step vector between lattice slices: a line fit of the positions against lattice index
    design = np.stack([np.ones_like(lattice, dtype=float), lattice.astype(float)], 1)
    fit, *_ = np.linalg.lstsq(design, positions, rcond=None)
    origin, step = fit[0], fit[1]
    residual = float(np.abs(design @ fit - positions).max())
    if residual > max(0.1 * base, 0.05 * float(spacings[0].min()), 0.01):
        raise ImageError(source, f"slice positions do not lie on one line (off by up to {residual:.2f} mm): not one volume")
    step_along = float(step @ normal)
    tilt = float(np.degrees(np.arccos(np.clip(abs(step_along) / np.linalg.norm(step), 0, 1))))
    if tilt < MIN_TILT_DEG:
        step, tilt = normal * step_along, 0.0
    if tilt > 45.0:
        raise ImageError(source, f"slices stacked {tilt:.0f} degrees off their normal: not a volume of parallel slices that can be resampled")
    affine = np.eye(4)
    # ITK's array axes: x along the row direction (spacing between columns), y along the column
    affine[:3, 0] = row * spacings[0, 1]
    affine[:3, 1] = column * spacings[0, 0]
    affine[:3, 2] = step
    affine[:3, 3] = origin
    missing = sorted(set(range(int(lattice[-1]) + 1)) - {int(v) for v in lattice})
    return SliceGrid(
        files=files,
        lattice=[int(v) for v in lattice],
        num_slices=int(lattice[-1]) + 1,
        affine_lps=affine,
        spacing_mm=abs(step_along),
        tilt_deg=tilt,
        missing_mm=[round(m * abs(step_along), 2) for m in missing],
        rows=headers[0].rows,
        columns=headers[0].columns,
    )


def _fill_missing(volume: np.ndarray, lattice: Sequence[int], num_slices: int) -> np.ndarray:
    """``(X, Y, n)`` slices at ``lattice`` indices -> ``(X, Y, num_slices)``, each missing slice
    linearly interpolated between its two neighbours (float32)."""
    lattice = np.asarray(lattice)
    out = np.empty(volume.shape[:2] + (num_slices,), np.float32)
    out[..., lattice] = volume
    for k in range(len(lattice) - 1):
        a, b = int(lattice[k]), int(lattice[k + 1])
        for m in range(a + 1, b):
            w = (m - a) / (b - a)
            out[..., m] = (1 - w) * volume[..., k] + w * volume[..., k + 1]
    return out


def _orthogonal_grid(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The orthogonal grid of a sheared one's slice planes (gantry tilt, as dcm2niix corrects it).

    Axes: the image rows and columns (``affine``'s first two columns, perpendicular), and the
    slice normal, with the distance between slice planes along it; each slice plane of the
    sheared grid is a slice of this grid, shifted within its plane. Rows are added so that every
    shifted slice fits.

    Returns:
        ``(affine, shape)`` of that grid.
    """
    columns = affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    e1, e2 = columns[:, 0] / spacing[0], columns[:, 1] / spacing[1]
    normal = np.cross(e1, e2)
    step = float(columns[:, 2] @ normal)
    frame = np.stack([e1 * spacing[0], e2 * spacing[1], normal * step], 1)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    local = np.linalg.solve(frame, (corners @ columns.T).T).T  # corners in the new frame, origin kept
    low, high = np.floor(local.min(0) + 1e-6), np.floor(local.max(0) + 1e-6)
    out = np.eye(4)
    out[:3, :3] = frame
    out[:3, 3] = affine[:3, 3] + frame @ low
    return out, tuple(int(v) for v in high - low + 1)


def deshear(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample a volume on a sheared grid (gantry tilt) onto the orthogonal grid of its slice
    planes (:func:`_orthogonal_grid`; linear interpolation within each slice).

    Args:
        volume: ``(X, Y, Z)`` on the grid of ``affine``.
        affine: its 4 x 4 voxel-to-world affine, columns not perpendicular.

    Returns:
        ``(volume, affine)`` on :func:`_orthogonal_grid`; voxels outside the original take its
        minimum (air or padding).
    """
    from scipy import ndimage

    target, size = _orthogonal_grid(affine, volume.shape)
    to_source = np.linalg.solve(affine, target)  # target voxel -> source voxel
    # same rows, columns and slices, so target slice k is source slice k shifted in-plane by
    # (to_source[0, 2], to_source[1, 2]) * k + the offset: a 2D shift per slice, no mixing of slices
    fill = float(np.min(volume))
    out = np.empty(size, np.float32)
    for k in range(size[2]):
        shift = to_source[:2, 2] * k + to_source[:2, 3]
        out[:, :, k] = ndimage.affine_transform(
            np.asarray(volume[:, :, k], np.float32), np.eye(2), offset=shift, output_shape=size[:2], order=1, cval=fill
        )
    return out, target


def read_series(source: str | os.PathLike | DicomSeries, warnings: list[InputWarning] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM series on the grid its slice positions give.

    Args:
        source: a folder holding the series (the one with most images if it holds several), or a
            :class:`DicomSeries`.
        warnings: :class:`~stmt_monai.io.InputWarning` s are appended here (missing slices filled, tilt resampled,
            several series, ITK's own messages, a modality other than CT); logged if None.

    Returns:
        ``(array, affine)``: float32 ``(X, Y, Z)`` values (HU for CT: GDCM applies each slice's
        rescale slope and intercept), and the 4 x 4 voxel-to-world RAS affine.

    Raises:
        ImageError: no DICOM series, unreadable pixels, or slices that make no even grid.
    """
    notes: list[InputWarning] = []
    if isinstance(source, DicomSeries):
        files = list(source.files)
    else:
        folder = Path(source)
        series = scan_folder(folder)
        if not series:
            raise ImageError(folder, "folder holds no DICOM series")
        files = list(series[0].files)
        alternatives = [s.label for s in series[1:] if len(s.files) > 1]  # single images (localizers) are none
        if alternatives:
            notes.append(
                InputWarning(
                    "dicom",
                    f"folder holds several DICOM series: read {series[0].label}, not {'; '.join(alternatives)} (stmt-segment takes each series as a case)",
                )
            )
    source_name = str(source)
    headers = [h for h in (read_header(f) for f in files) if h is not None]
    grid = slice_grid(headers, source_name)
    modalities = sorted({h.modality for h in headers if h.modality})
    if modalities and modalities != ["CT"]:
        notes.append(InputWarning("modality", f"modality {'/'.join(modalities)} (not CT) in the DICOM header"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(grid.files)
    try:
        with itk_messages() as itk:
            image = reader.Execute()
    except RuntimeError as err:
        raise ImageError(source_name, f"unreadable DICOM series ({clean_itk_message(str(err).strip().splitlines()[-1])})") from None
    array = sitk.GetArrayFromImage(image)  # (slices, rows, columns)
    del image
    volume = np.ascontiguousarray(np.transpose(array, (2, 1, 0)), dtype=np.float32)
    del array
    affine = grid.affine_lps
    if grid.missing_mm:
        volume = _fill_missing(volume, grid.lattice, grid.num_slices)
        shown = ", ".join(f"{m:g}" for m in grid.missing_mm[:5]) + (", ..." if len(grid.missing_mm) > 5 else "")
        notes.append(
            InputWarning(
                "dicom",
                f"{len(grid.missing_mm)} slice(s) missing from the series' even {grid.spacing_mm:.2f} mm spacing (at {shown} mm from the first): "
                "filled by interpolation between neighbours; the mask holds every original slice at its position",
            )
        )
    if grid.tilt_deg:
        tilt_tag = max((abs(h.tilt_deg) for h in headers), default=0.0)
        volume, affine = deshear(volume, affine)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        notes.append(
            InputWarning(
                "dicom",
                f"gantry tilt {grid.tilt_deg:.1f} degrees (GantryDetectorTilt {tilt_tag:g}): each slice shifted within its plane onto an orthogonal "
                f"{' x '.join(f'{s:.2f}' for s in spacing)} mm grid (as dcm2niix corrects a tilt); the mask is on that grid, in the original slice planes",
            )
        )
    explained = bool(grid.missing_mm or grid.tilt_deg)
    for message in dict.fromkeys(itk):  # once each, in order
        if explained and "Non uniform sampling" in message:
            continue  # said precisely above
        notes.append(InputWarning("itk", message))
    if warnings is None:
        for note in notes:
            logger.warning("%s: %s", source_name, note.message)
    else:
        warnings.extend(notes)
    return volume, LPS_TO_RAS @ affine


def series_shape(source: str | os.PathLike | DicomSeries) -> tuple[int, int, int]:
    """``(X, Y, Z)`` a series will have when read (:func:`read_series`), from its headers only.

    Raises:
        ImageError: as :func:`read_series` for the geometry.
    """
    if isinstance(source, DicomSeries):
        files = source.files
    else:
        series = scan_folder(source)
        if not series:
            raise ImageError(source, "folder holds no DICOM series")
        files = series[0].files
    grid = slice_grid([h for h in (read_header(f) for f in files) if h is not None], str(source))
    if grid.tilt_deg:
        return _orthogonal_grid(grid.affine_lps, grid.shape)[1]
    return grid.shape
