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


#: the small synthetic cohort of tests/test_cohort.py and tests/test_triage.py (about 1 s to make)
SMALL_COHORT = dict(num_labelled=12, num_unlabelled=4, num_validation=2, num_test=2, size=48)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """A synthetic FLARE23-layout cohort (stmt_monai.synthetic.anatomy), seed 0, 48 voxels a side; read only."""
    from stmt_monai.synthetic.annotation import make_cohort
    from stmt_monai.synthetic.config import CohortConfig

    out = tmp_path_factory.mktemp("cohort") / "cohort"
    make_cohort(out, CohortConfig(**SMALL_COHORT), seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_cohort(small_cohort, tmp_path_factory):
    """:func:`small_cohort` triaged (stmt_monai.data.triage): ``.root`` the FLARE23 layout,
    ``.prepared`` its datalists (``datalist_fully_labelled.json``, ``datalist_pseudo_label_jobs.json``,
    ``datalist_tumor.json``, ``datalist_validation.json``) and ``fingerprint.json``; read only."""
    from types import SimpleNamespace

    from stmt_monai.data.triage import triage_dataset

    prepared = tmp_path_factory.mktemp("prepared") / "prepared"
    triage_dataset(small_cohort, prepared, progress=False)
    return SimpleNamespace(root=small_cohort, prepared=prepared)
