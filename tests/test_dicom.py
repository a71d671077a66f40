"""stmt_monai.dicom: DICOM series as scanners write them, from copies of the shipped series edited
with pydicom (tests/bad_inputs.py): missing slices filled on the even grid, uneven or duplicated
slices and odd orientations refused with the reason, a gantry tilt resampled in-plane, several
series in a folder each a case, ITK's own messages caught."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from bad_inputs import (
    DICOM,
    duplicate_slice,
    gantry_tilt,
    gap_too_wide,
    localizer_in_series,
    missing_slice,
    missing_two_slices,
    modality_mr,
    non_orthogonal,
    several_series,
    tilt,
    uneven_slices,
    write_series,
)

from stmt_monai.dicom import DicomSeries, itk_messages, read_series, series_shape
from stmt_monai.io import ImageError, case_name, find_cases, load_image


@pytest.fixture(scope="module")
def complete():
    """The shipped series as read: ``(array, affine)``, 512 x 512 x 20 at 2 mm."""
    return read_series(DICOM, [])


def test_the_shipped_series_reads_as_itk_reads_it(complete):
    array, affine = complete
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DICOM)))
    itk = reader.Execute()
    assert np.array_equal(array, np.transpose(sitk.GetArrayFromImage(itk), (2, 1, 0)).astype(np.float32))
    assert np.allclose(np.abs(affine[:3, :3]).sum(0), itk.GetSpacing()) and affine[2, 3] == pytest.approx(itk.GetOrigin()[2])


@pytest.mark.parametrize("make, gone", [(missing_slice, [12]), (missing_two_slices, [5, 6])])
def test_missing_slices_are_filled_on_the_even_grid(tmp_path, complete, capfd, make, gone):
    array, affine = complete
    warnings = []
    filled, filled_affine = load_image(make(tmp_path), warnings=warnings)
    # the grid of the complete series: every original slice at its own position, bit for bit
    assert filled.shape == array.shape and np.allclose(filled_affine, affine)
    kept = [k for k in range(20) if k not in gone]
    assert np.array_equal(filled[..., kept], array[..., kept])
    # a missing slice is the linear interpolation of its neighbours on the lattice
    before, after = min(gone) - 1, max(gone) + 1
    for k in gone:
        w = (k - before) / (after - before)
        assert np.allclose(filled[..., k], (1 - w) * array[..., before] + w * array[..., after], atol=1e-3)
    assert [w.kind for w in warnings] == ["dicom"]
    assert f"{len(gone)} slice(s) missing from the series' even 2.00 mm spacing" in warnings[0].message
    # ITK's own "Non uniform sampling" text reaches neither the terminal nor the warnings
    assert "Non uniform" not in capfd.readouterr().err and "Non uniform" not in warnings[0].message


@pytest.mark.parametrize(
    "make, reason",
    [
        (gap_too_wide, "a gap of 14.0 mm between slices (at 8.0 mm from the first; spacing 2.00 mm): too wide to fill"),
        (uneven_slices, "unevenly spaced slices (steps 1.20 to 2.80 mm, not whole multiples of 2.00 mm)"),
        (duplicate_slice, "1 slice(s) at the position of another (first at 22.00 mm): two acquisitions or duplicate files"),
        (non_orthogonal, "image rows and columns are not perpendicular (84.0 degrees in ImageOrientationPatient)"),
        (localizer_in_series, "images of 2 different orientations in one series (e.g. a localizer): not one volume"),
    ],
    ids=["gap", "uneven", "duplicate", "non-orthogonal", "mixed-orientation"],
)
def test_series_on_no_even_grid_are_refused_with_the_reason(tmp_path, make, reason):
    folder = make(tmp_path)
    with pytest.raises(ImageError) as err:
        load_image(folder)
    assert err.value.path == str(folder) and reason in err.value.problem and "\n" not in str(err.value)
    with pytest.raises(ImageError):  # the header-only shape (memory estimate) refuses alike
        series_shape(folder)


def test_a_gantry_tilt_is_resampled_within_each_slice_plane(tmp_path):
    """A bright block in a tilted series lands at the world position its DICOM tags give."""
    pixels = np.zeros((20, 64, 64), np.uint16)  # (slice, row, column), stored values: HU + 1024
    pixels[9:12, 40:46, 20:26] = 2024  # 1000 HU in slices 9..11, rows 40..45, columns 20..25
    degrees = 20.0
    folder = write_series(tmp_path / "series", pixels=pixels, edit=lambda i, ds: tilt(i, ds, degrees))
    warnings = []
    volume, affine = load_image(folder, warnings=warnings)
    assert [w.kind for w in warnings] == ["dicom"] and "gantry tilt 20.0 degrees" in warnings[0].message
    columns = affine[:3, :3]
    assert np.allclose(columns.T @ columns, np.diag(np.diag(columns.T @ columns)), atol=1e-9)  # orthogonal
    assert volume.shape[2] == 20  # one slice per original slice plane
    # the block's centre in world mm, from the tags of the original slices (LPS -> RAS)
    import pydicom

    first = pydicom.dcmread(sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[10])
    row, column = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    spacing = float(first.PixelSpacing[0])
    centre_lps = np.array(first.ImagePositionPatient, float) + row * spacing * 22.5 + column * spacing * 42.5
    expected = centre_lps * [-1, -1, 1]
    found = np.argwhere(volume > 500).mean(0)
    world = affine[:3, :3] @ found + affine[:3, 3]
    assert np.linalg.norm(world - expected) < 0.5 * spacing
    # untilted, the same block is where the untilted tags put it (no shift at all)
    straight, _ = load_image(write_series(tmp_path / "straight", pixels=pixels))
    assert np.array_equal(np.argwhere(straight > 500).mean(0), [22.5, 42.5, 10.0])


def test_several_series_in_a_folder_each_become_a_case(tmp_path):
    study = several_series(tmp_path)
    cases = find_cases(study, each_series=True)
    assert all(isinstance(c, DicomSeries) for c in cases)
    assert [case_name(c) for c in cases] == ["study_s2_CT_Body_3.0", "study_s3_CT_Body_4mm"]  # the localizer is no case
    assert "[series 3 CT Body 4mm (10 images)]" in str(cases[1])
    shapes = [load_image(c)[0].shape for c in cases]
    assert shapes == [(512, 512, 20), (512, 512, 10)]
    # a folder of such folders: each series of each
    assert [case_name(c) for c in find_cases(tmp_path, each_series=True)] == ["study_s2_CT_Body_3.0", "study_s3_CT_Body_4mm"]
    # without each_series the folder is one case, its largest series, and the reading says so
    assert find_cases(study) == [study]
    warnings = []
    assert load_image(study, warnings=warnings)[0].shape == (512, 512, 20)
    assert [w.kind for w in warnings] == ["dicom"]
    assert "folder holds several DICOM series: read 2 CT Body 3.0 (20 images), not 3 CT Body 4mm (10 images)" in warnings[0].message


def test_a_series_that_is_not_ct_says_so(tmp_path):
    warnings = []
    load_image(modality_mr(tmp_path), warnings=warnings)
    assert [(w.kind, w.message) for w in warnings] == [("modality", "modality MR (not CT) in the DICOM header")]


def test_itk_messages_are_caught_not_printed(tmp_path, capfd):
    folder = missing_slice(tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    with itk_messages() as messages:
        reader.Execute()
    assert len(messages) == 1 and messages[0].startswith("ImageSeriesReader: Non uniform sampling or missing slices detected")
    assert "\n" not in messages[0] and "0x" not in messages[0]
    assert capfd.readouterr().err == ""


def test_series_shape_from_headers_only(tmp_path):
    assert series_shape(DICOM) == (512, 512, 20)
    assert series_shape(missing_slice(tmp_path / "a")) == (512, 512, 20)
    assert series_shape(gantry_tilt(tmp_path / "b")) == load_image(tmp_path / "b" / "series")[0].shape
