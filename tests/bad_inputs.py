"""Bad and implausible inputs made on the fly from the shipped CT and DICOM series.

Each maker writes one input into a folder and returns its path. tests/test_checks.py,
tests/test_dicom.py and tests/test_formats.py use them; ``docs/input_checks.md`` was filled by
running ``stmt-segment`` on all of them:

    python tests/bad_inputs.py /tmp/bad        # writes every kind into /tmp/bad/<kind>
    stmt-segment /tmp/bad/<kind> out/ [--strict]
"""

from __future__ import annotations

import gzip
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "stmt_monai" / "example_data"
CT = EXAMPLE_DATA / "abdomen_ct_3mm.nii.gz"
ORGANS = EXAMPLE_DATA / "abdomen_ct_3mm_organs.nii.gz"
DICOM = EXAMPLE_DATA / "abdomen_ct_dicom"


# ----------------------------------------------------------------------------- NIfTI variants
def shipped_ct() -> tuple[np.ndarray, np.ndarray]:
    """The shipped CT as float32 HU ``(122, 101, 112)`` and its affine (3 mm, RAS)."""
    image = nib.load(CT)
    return np.asarray(image.dataobj, np.float32), image.affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype), affine), path)
    return path


def _transformed(change: Callable[[np.ndarray], np.ndarray], dtype=np.float32) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        array, affine = shipped_ct()
        return write_nifti(folder / "case_0000.nii.gz", change(array), affine, dtype)

    return make


def mr_like(hu: np.ndarray) -> np.ndarray:
    """A T1-like volume: air dark at 0, fat bright, soft tissue grey, bone dark, plus noise."""
    rng = np.random.default_rng(0)
    return np.interp(hu, [-1000, -150, -50, 40, 80, 400, 1500], [0, 850, 800, 400, 450, 150, 100]) + rng.normal(0, 20, hu.shape)


def with_spacing(scale: float) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        array, affine = shipped_ct()
        affine = affine.copy()
        affine[:3, :3] *= scale
        return write_nifti(folder / "case_0000.nii.gz", array, affine, np.int16)

    return make


def with_nan(folder: Path) -> Path:
    """A slab of NaN (the first 10 slices) and a few Inf voxels."""
    array, affine = shipped_ct()
    array[..., :10] = np.nan
    array[60, 50, 50:53] = np.inf
    return write_nifti(folder / "case_0000.nii.gz", array, affine)


def all_nan(folder: Path) -> Path:
    array, affine = shipped_ct()
    return write_nifti(folder / "case_0000.nii.gz", np.full_like(array, np.nan), affine)


def thin_slab(folder: Path, slices: int = 14, start: int = 56) -> Path:
    """14 axial slices (42 mm) of the shipped CT: little of the abdomen in the field of view."""
    array, affine = shipped_ct()
    affine = affine.copy()
    affine[:3, 3] += affine[:3, 2] * start
    return write_nifti(folder / "case_0000.nii.gz", array[..., start : start + slices], affine, np.int16)


def copied_as(source: Path, path: Path) -> Path:
    """``source`` copied to ``path`` (a name that may lie about its format), folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return path


def label_map(folder: Path) -> Path:
    """The shipped organ label map, given as if it were the CT."""
    return copied_as(ORGANS, folder / "case_0000.nii.gz")


def binary_mask(folder: Path) -> Path:
    image = nib.load(ORGANS)
    return write_nifti(folder / "case_0000.nii.gz", np.asarray(image.dataobj) > 0, image.affine, np.uint8)


# ----------------------------------------------------------------------------- misnamed files
def plain_named_gz(folder: Path) -> Path:
    """An uncompressed NIfTI named .nii.gz."""
    path = folder / "case_0000.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.decompress(CT.read_bytes()))
    return path


def gz_named_plain(folder: Path) -> Path:
    """A gzipped NIfTI named .nii."""
    return copied_as(CT, folder / "case_0000.nii")


def nifti_named_mha(folder: Path) -> Path:
    return copied_as(CT, folder / "case_0000.mha")


def mha_named_nifti(folder: Path) -> Path:
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    real = folder / ".real.mha"
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(real))
    path = folder / "case_0000.nii.gz"
    real.rename(path)
    return path


def dicom_file_named_nifti(folder: Path) -> Path:
    """One slice of the DICOM series given as a .nii.gz."""
    return copied_as(min(DICOM.iterdir()), folder / "case_0000.nii.gz")


# ----------------------------------------------------------------------------- DICOM variants
def dicom_slices() -> list[Path]:
    """The shipped series' files in slice order (ascending position along the slice normal)."""
    import pydicom

    files = sorted(DICOM.iterdir())
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def write_series(
    folder: Path,
    keep: Sequence[int] | None = None,
    edit: Callable[[int, object], None] | None = None,
    pixels: np.ndarray | None = None,
    uid: str | None = None,
    number: int | None = None,
    description: str | None = None,
) -> Path:
    """Copy the shipped 20-slice series (512 x 512, 2 mm) into ``folder``, edited slice by slice.

    Args:
        folder: destination (created).
        keep: indices (slice order) of the slices to copy; default all.
        edit: ``edit(index, dataset)`` changes one slice's pydicom dataset before it is written.
        pixels: ``(Z, rows, columns)`` stored values replacing the pixel data (uncompressed).
        uid, number, description: SeriesInstanceUID, SeriesNumber, SeriesDescription.
    """
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    for index, source in enumerate(dicom_slices()):
        if keep is not None and index not in keep:
            continue
        ds = pydicom.dcmread(source)
        if uid is not None:
            ds.SeriesInstanceUID = uid
        if number is not None:
            ds.SeriesNumber = number
        if description is not None:
            ds.SeriesDescription = description
        if pixels is not None:
            ds.set_pixel_data(np.ascontiguousarray(pixels[index], np.uint16), "MONOCHROME2", 12)
            ds.PixelSpacing = [float(v) * 512 / pixels.shape[1] for v in ds.PixelSpacing]
        if edit is not None:
            edit(index, ds)
        ds.save_as(folder / f"{source.name}{'' if uid is None else '_' + uid[-2:]}")
    return folder


def set_z(index: int, ds, z: float) -> None:
    position = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [position[0], position[1], z]
    ds.SliceLocation = z


def missing_slice(folder: Path) -> Path:
    return write_series(folder / "series", keep=[i for i in range(20) if i != 12])


def missing_two_slices(folder: Path) -> Path:
    return write_series(folder / "series", keep=[i for i in range(20) if i not in (5, 6)])


def gap_too_wide(folder: Path) -> Path:
    """Slices 5..10 missing: a 14 mm gap in a 2 mm series."""
    return write_series(folder / "series", keep=[i for i in range(20) if not 5 <= i <= 10])


def uneven_slices(folder: Path) -> Path:
    """Slice 7 moved 0.8 mm: steps of 2.8 and 1.2 mm, on no even lattice."""
    return write_series(folder / "series", edit=lambda i, ds: set_z(i, ds, float(ds.ImagePositionPatient[2]) + 0.8) if i == 7 else None)


def duplicate_slice(folder: Path) -> Path:
    """Slice 8 written twice (as a second acquisition would be)."""
    series = write_series(folder / "series")
    source = sorted(series.iterdir())[8]
    shutil.copyfile(source, series / f"{source.name}.copy")
    return series


def non_orthogonal(folder: Path) -> Path:
    """ImageOrientationPatient whose rows and columns are 84 degrees apart."""
    column = [math.sin(math.radians(6)), math.cos(math.radians(6)), 0.0]
    return write_series(folder / "series", edit=lambda i, ds: setattr(ds, "ImageOrientationPatient", [1.0, 0.0, 0.0, *column]))


def localizer_in_series(folder: Path) -> Path:
    """One slice with a sagittal orientation in the same series (a localizer sharing its UID)."""
    return write_series(folder / "series", edit=lambda i, ds: setattr(ds, "ImageOrientationPatient", [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]) if i == 0 else None)


def tilt(index: int, ds, degrees: float) -> None:
    """Gantry tilt: image columns tilted about the row axis, positions still along the table (z)."""
    t = math.radians(degrees)
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t)]
    ds.GantryDetectorTilt = degrees


def gantry_tilt(folder: Path, degrees: float = 15.0) -> Path:
    return write_series(folder / "series", edit=lambda i, ds: tilt(i, ds, degrees))


def modality_mr(folder: Path) -> Path:
    return write_series(folder / "series", edit=lambda i, ds: setattr(ds, "Modality", "MR"))


def several_series(folder: Path) -> Path:
    """Two series (all 20 slices, and every other slice as a 4 mm reconstruction) and a
    single-image localizer, in one folder."""
    study = folder / "study"
    write_series(study, uid="1.2.826.0.1.3680043.8.498.1", number=2, description="CT Body 3.0")
    write_series(study, keep=list(range(0, 20, 2)), uid="1.2.826.0.1.3680043.8.498.2", number=3, description="CT Body 4mm")
    write_series(study, keep=[0], uid="1.2.826.0.1.3680043.8.498.9", number=1, description="Topogram")
    return study


#: every kind, as ``docs/input_checks.md`` lists them: name -> maker(folder) -> input path
KINDS: dict[str, Callable[[Path], Path]] = {
    "label_map": label_map,
    "binary_mask": binary_mask,
    "mr_like": _transformed(mr_like),
    "raw_dicom_values": _transformed(lambda hu: hu + 1024, np.int16),
    "normalised": _transformed(lambda hu: (hu - hu.mean()) / hu.std()),
    "spacing_in_metres": with_spacing(1e-3),
    "spacing_in_cm": with_spacing(0.1),
    "spacing_12mm": with_spacing(4.0),
    "nan_and_inf": with_nan,
    "all_nan": all_nan,
    "thin_slab": thin_slab,
    "plain_named_gz": plain_named_gz,
    "gz_named_plain": gz_named_plain,
    "nifti_named_mha": nifti_named_mha,
    "mha_named_nifti": mha_named_nifti,
    "dicom_file_named_nifti": dicom_file_named_nifti,
    "dicom_missing_slice": missing_slice,
    "dicom_missing_two_slices": missing_two_slices,
    "dicom_gap_too_wide": gap_too_wide,
    "dicom_uneven_slices": uneven_slices,
    "dicom_duplicate_slice": duplicate_slice,
    "dicom_non_orthogonal": non_orthogonal,
    "dicom_localizer_in_series": localizer_in_series,
    "dicom_gantry_tilt": gantry_tilt,
    "dicom_modality_mr": modality_mr,
    "dicom_several_series": several_series,
}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for kind, make in KINDS.items():
        print(kind, make(out / kind))
