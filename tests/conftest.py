"""Shared fixtures: the real CT shipped with the package (TotalSegmentator sample, Apache-2.0)."""

from pathlib import Path

import pytest

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "stmt_monai" / "example_data"


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """Real abdominal CT, 3 mm, RAS NIfTI."""
    return EXAMPLE_DATA / "abdomen_ct_3mm.nii.gz"


@pytest.fixture(scope="session")
def real_organs() -> Path:
    """Organ mask of :func:`real_ct` in FLARE order (TotalSegmentator prediction)."""
    return EXAMPLE_DATA / "abdomen_ct_3mm_organs.nii.gz"


@pytest.fixture(scope="session")
def real_dicom() -> Path:
    """Real CT as a DICOM series folder (20 slices, 512 x 512)."""
    return EXAMPLE_DATA / "abdomen_ct_dicom"


@pytest.fixture(scope="session")
def real_dicom_organs() -> Path:
    """Organ mask of :func:`real_dicom` (NIfTI, LAS voxel order)."""
    return EXAMPLE_DATA / "abdomen_ct_dicom_organs.nii.gz"
