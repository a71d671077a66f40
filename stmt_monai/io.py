"""Reading and writing CT volumes and label maps.

One loader for NIfTI files (any orientation), other ITK formats, and DICOM series folders.
Arrays come back in the file's own voxel order with a 4 x 4 affine in RAS world coordinates
(mm), the NIfTI convention; DICOM's LPS geometry is converted. Every problem with an input
is raised as :class:`ImageError`, whose message is one line naming the file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from stmt_monai.labels import LABELS

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
#: LPS (DICOM, ITK) <-> RAS (NIfTI): flip the first two world axes
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageError(ValueError):
    """A CT or label file that cannot be used; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # picklable, so a worker process can report it
        return type(self), (self.path, self.problem)


@dataclasses.dataclass(frozen=True)
class InputWarning:
    """Something doubtful about an input that still lets it be read and segmented.

    Attributes:
        kind: what it is about: ``"intensity"``, ``"spacing"``, ``"non_finite"``,
            ``"field_of_view"``, ``"dicom"``, ``"itk"``, ``"file_format"``, ``"modality"``.
        message: one line (the file is named by whoever shows it).
    """

    kind: str
    message: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message}

    def __str__(self) -> str:
        return self.message


def case_name(path: str | os.PathLike) -> str:
    """FLARE case name of an image path: ``FLARE23_0001_0000.nii.gz`` -> ``FLARE23_0001``.

    A DICOM folder is named after the folder; one series of a folder that holds several
    (:class:`stmt_monai.dicom.DicomSeries`) has its own name.
    """
    if not isinstance(path, (str, os.PathLike)):
        return str(path.name)  # a DicomSeries
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def _check_3d(path, array: np.ndarray) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise ImageError(path, f"expected a 3D volume, got an array of shape {tuple(array.shape)}")
    return array


def _from_sitk(image) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    array = np.ascontiguousarray(np.transpose(array, tuple(range(array.ndim))[::-1]))
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), float).reshape(ndim, ndim)
    affine = np.eye(4)
    affine[:ndim, :ndim] = direction @ np.diag(image.GetSpacing())
    affine[:ndim, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ affine


def _holds_dicom_series(folder: Path) -> bool:
    """Whether ``folder`` itself holds DICOM files of a series (ITK's "no series" warning silenced)."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _dicom_cases(folder: Path, each_series: bool) -> list:
    """The DICOM cases of a folder's own files: none, the folder, or (``each_series``, several
    series) each series of two or more images (:func:`stmt_monai.dicom.scan_folder`)."""
    if not _holds_dicom_series(folder):
        return []
    if not each_series:
        return [folder]
    from stmt_monai.dicom import scan_folder

    series = scan_folder(folder)
    volumes = [s for s in series if len(s.files) > 1]
    for single in (s for s in series if len(s.files) == 1):
        logger.info("%s: not a case (a single image, not a volume)", single)
    if len(volumes) <= 1:
        return [folder] if volumes else []
    return sorted(volumes, key=lambda s: s.name)


def find_cases(input: str | os.PathLike, dicom: bool = True, allow_empty: bool = False, each_series: bool = False) -> list[Path]:
    """The cases of a file or folder: the one rule of the package for what a case is.

    - a file is one case (whatever its name; :func:`load_image` says whether it can be read);
    - a folder that itself holds a DICOM series is one case (with ``dicom``);
    - any other folder: each NIfTI / ITK file in it (:data:`NIFTI_SUFFIXES`, :data:`ITK_SUFFIXES`)
      and, with ``dicom``, each sub-folder that holds a DICOM series; names starting with ``.``
      (hidden, e.g. the partial writes of :func:`atomic_path`) and other files are skipped.

    A folder holding several DICOM series (as scanners export a study: several reconstructions,
    phases, a localizer) is one case read from its largest series, unless ``each_series``: then
    each series of two or more images is a case of its own, a
    :class:`stmt_monai.dicom.DicomSeries` named ``<folder>_s<SeriesNumber>_<SeriesDescription>``
    (single images, such as localizers, are left out with a log line).

    Args:
        input: a CT or label file, a DICOM series folder, or a folder of such.
        dicom: count DICOM series folders as cases (``False`` for label maps, never DICOM).
        allow_empty: return ``[]`` for a folder without any case instead of raising.
        each_series: each DICOM series of a folder that holds several is a case (``stmt-segment``).

    Returns:
        the case paths (files and DICOM folders, or series with ``each_series``), sorted by name.

    Raises:
        ImageError: ``input`` does not exist, or (unless ``allow_empty``) holds no case.
    """
    path = Path(input)
    if not path.exists():
        raise ImageError(path, "no such file or folder")
    if path.is_file():
        return [path]
    own = _dicom_cases(path, each_series) if dicom else []
    if own:
        return own
    cases = []
    for p in sorted(path.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
            cases.append(p)
        elif dicom and p.is_dir():
            cases += _dicom_cases(p, each_series)
    if not cases and not allow_empty:
        kinds = ", ".join(NIFTI_SUFFIXES + ITK_SUFFIXES) + (" or DICOM series folder" if dicom else "")
        raise ImageError(path, f"holds no image ({kinds})")
    return cases


def cases_by_name(cases: list[Path]) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Cases keyed by FLARE case name (:func:`case_name`), and apart the names several cases share
    (``x.nii.gz`` and ``x_0000.nii.gz``, or ``x.nii.gz`` and ``x.mha``): which one is meant cannot
    be told, so neither is in the first dict."""
    by_name: dict[str, list[Path]] = {}
    for path in cases:
        by_name.setdefault(case_name(path), []).append(Path(path))
    unique = {name: paths[0] for name, paths in sorted(by_name.items()) if len(paths) == 1}
    shared = {name: paths for name, paths in sorted(by_name.items()) if len(paths) > 1}
    return unique, shared


def image_datalist(input: str | os.PathLike) -> list[dict]:
    """The cases of :func:`find_cases` as datalist items ``{"image": path}`` (inference input)."""
    return [{"image": str(p)} for p in find_cases(input)]


def load_image(
    path: str | os.PathLike, dtype=np.float32, warnings: list[InputWarning] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D CT volume.

    A file whose name lies about its format (an uncompressed NIfTI named ``.nii.gz``, a NIfTI
    named ``.mha``...) is read by its content (:mod:`stmt_monai.formats`); a DICOM series on the
    grid its slice positions give (:func:`stmt_monai.dicom.read_series`: missing slices filled,
    a gantry tilt resampled, or refused with the reason).

    Args:
        path: a NIfTI file (``.nii``, ``.nii.gz``), an ITK file (``.mha``, ``.nrrd``), a folder
            holding one DICOM series, or a :class:`stmt_monai.dicom.DicomSeries`.
        dtype: array type of the result (HU as float32 by default).
        warnings: the reading's :class:`InputWarning` s are appended here (a misnamed format,
            DICOM slices filled or resampled, ITK's own messages); logged when None.

    Returns:
        ``(array, affine)``: the volume in the file's voxel order, shape ``(X, Y, Z)``, and its
        4 x 4 voxel-to-world affine in RAS mm.

    Raises:
        ImageError: missing file, unreadable or non-image file, not a 3D volume.
    """
    notes: list[InputWarning] = []
    if not isinstance(path, (str, os.PathLike)) or Path(path).is_dir():
        # a DicomSeries, or a series folder; imported here: a NIfTI case does not need SimpleITK
        from stmt_monai import dicom

        array, affine = dicom.read_series(path, notes)
    else:
        path = Path(path)
        if not path.exists():
            raise ImageError(path, "no such file or folder")
        array, affine = _read_file(path, notes)
    array = _check_3d(path, array)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageError(path, "has a degenerate voxel-to-world affine")
    if warnings is None:
        for note in notes:
            logger.warning("%s: %s", path, note.message)
    else:
        warnings.extend(notes)
    return np.asarray(array, dtype=dtype), np.asarray(affine, float)


def _read_file(path: Path, notes: list[InputWarning]) -> tuple[np.ndarray, np.ndarray]:
    """An image file's array and RAS affine, read by its content where its name lies about it."""
    from stmt_monai import formats

    if formats.sniff(path) == "dicom":
        raise ImageError(path, "is a single DICOM file (one slice), not a 3D volume: give the folder that holds its series")
    found = formats.mismatch(path)
    if found is None:
        return _read_by_name(path, path, notes)
    kind, message = found
    notes.append(InputWarning("file_format", message))
    with formats.content_alias(path, kind) as alias:
        return _read_by_name(alias, path, notes)


def _read_by_name(path: Path, source: Path, notes: list[InputWarning]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` with the reader its suffix names; errors name ``source`` (the user's file)."""
    if path.name.endswith(NIFTI_SUFFIXES):
        try:
            return read_nifti(path)
        except Exception as err:  # nibabel raises many kinds for a bad file
            raise ImageError(source, f"not a readable NIfTI image ({type(err).__name__}: {err})") from None
    if path.name.endswith(ITK_SUFFIXES):
        import SimpleITK as sitk

        from stmt_monai.dicom import itk_messages

        try:
            with itk_messages() as messages:
                image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise ImageError(source, f"not a readable image ({str(err).strip().splitlines()[-1]})") from None
        notes.extend(InputWarning("itk", m) for m in dict.fromkeys(messages))
        return _from_sitk(image)
    raise ImageError(source, f"unsupported file type (expected {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)} or a DICOM folder)")


def load_label(
    path: str | os.PathLike, image_shape: tuple[int, ...] | None = None, image_affine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a FLARE label map (0 background, 1..13 organs, 14 tumor) as uint8.

    Args:
        path: label file (NIfTI or ITK format).
        image_shape, image_affine: the image's, if the label belongs to one: a different shape is
            an error; an affine that differs by more than 1e-3 mm is an error too.

    Returns:
        ``(labels, affine)``, labels of shape ``(X, Y, Z)``.
    """
    array, affine = load_image(path, dtype=np.float32)
    if image_shape is not None and tuple(array.shape) != tuple(image_shape):
        raise ImageError(path, f"label shape {tuple(array.shape)} differs from its image's {tuple(image_shape)}")
    if image_affine is not None and not np.allclose(affine, image_affine, atol=1e-3):
        raise ImageError(path, "label affine differs from its image's (not on the same voxel grid)")
    if array.size and (array.min() < 0 or array.max() > max(LABELS) or not np.all(np.mod(array, 1) == 0)):
        raise ImageError(path, f"holds values outside the FLARE labels 0..{max(LABELS)}")
    return array.astype(np.uint8), affine


def atomic_path(path: str | os.PathLike) -> tuple[Path, Path]:
    """A temporary name beside ``path`` with the same suffix, to write then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the renamed file gets the usual mode
    return Path(tmp), path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Write ``path`` atomically: the ``with`` body writes the temporary file it is given
    (:func:`atomic_path`), which is renamed onto ``path`` when the body ends without an
    exception and removed in every case, so that ``path`` is either the old file or the whole
    new one, never half written::

        with atomic_write(out / "case.nii.gz") as tmp:
            nib.save(image, tmp)
    """
    tmp, final = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


#: gzip level of written NIfTI files: ISA-L's level 1 (its fastest full compression; a 512 x 512 x 300
#: label map: 0.35 MB in ~0.01 s, against zlib level 1's 0.66 MB in ~0.4 s, measured on 2 loaded cores)
GZIP_LEVEL = 1


def gzip_bytes(data: bytes, level: int = GZIP_LEVEL) -> bytes:
    """One gzip member of ``data``: ISA-L (``isal``, 3-30x zlib's speed) where installed, else zlib."""
    try:
        from isal import igzip
    except ImportError:
        import gzip

        return gzip.compress(data, level, mtime=0)
    return igzip.compress(data, min(int(level), 3), mtime=0)


def gunzip_bytes(data: bytes) -> bytes:
    """The content of gzip ``data`` (every member): ISA-L where installed (2-3x zlib), else zlib."""
    try:
        from isal import igzip
    except ImportError:
        import gzip

        return gzip.decompress(data)
    return igzip.decompress(data)


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI-1 or -2 file's voxels and affine, read whole and decompressed in one call.

    The voxels come back in the file's own type and memory order (NIfTI's Fortran order,
    ``(X, Y, Z)`` indexing) as a read-only view of the decompressed bytes, without a copy,
    when the file has no intensity scaling; else nibabel applies the scaling (float).
    Decompressing in one call with ISA-L (:func:`gunzip_bytes`) reads a 512 x 512 x 300 int16
    CT ~2.5x faster than nibabel's streaming zlib read, at half its peak memory.

    Returns:
        ``(array, affine)``: the array as above and nibabel's voxel-to-world RAS affine.
    """
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gunzip_bytes(data)
    image_class = nib.Nifti2Image if int.from_bytes(data[:4], "little") == 540 or int.from_bytes(data[:4], "big") == 540 else nib.Nifti1Image
    image = image_class.from_bytes(data)
    proxy = image.dataobj  # where nibabel reads the voxels (the offset a 0 vox_offset really means)
    if float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0:
        count = int(np.prod(proxy.shape))
        array = np.frombuffer(data, proxy.dtype, count=count, offset=int(proxy.offset)).reshape(proxy.shape, order=proxy.order)
        return array, image.affine
    return np.asarray(image.dataobj), image.affine


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write a NIfTI atomically (a temporary name in the same folder, then rename).

    Args:
        path: output ``.nii.gz`` (or ``.nii``).
        array: ``(X, Y, Z)`` volume.
        affine: voxel-to-world RAS affine; written as both qform and sform.
        dtype: stored type (e.g. ``np.uint8`` for label maps); default the array's.
    """
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype, copy=False))
    image = nib.Nifti1Image(array, np.asarray(affine, float))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_write(path) as tmp:
        if str(path).endswith(".gz"):
            # header and voxels serialised once (a Fortran-ordered array is copied, not transposed),
            # then one gzip member by ISA-L where installed
            tmp.write_bytes(gzip_bytes(image.to_bytes()))
        else:
            nib.save(image, str(tmp))
    return Path(path)


def save_label_map(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write a label map (uint8) atomically; see :func:`save_nifti`."""
    return save_nifti(path, labels, affine, dtype=np.uint8)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (JSON, CSV) atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv_atomic(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[Mapping]) -> Path:
    """Write a CSV table (a header, then one line per row dict, ``\\n`` line ends) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())
