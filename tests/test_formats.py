"""stmt_monai.formats and load_image: a file whose name lies about its format is read by its
content (magic bytes) with a warning; what cannot be told stays an error naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from bad_inputs import (
    CT,
    dicom_file_named_nifti,
    gz_named_plain,
    mha_named_nifti,
    nifti_named_mha,
    plain_named_gz,
    shipped_ct,
)

from stmt_monai import formats
from stmt_monai.io import ImageError, load_image


@pytest.mark.parametrize(
    "make, kind, message",
    [
        (plain_named_gz, "nifti", "named .nii.gz but holds an uncompressed NIfTI: read by its content"),
        (gz_named_plain, "nifti-gz", "named .nii but holds a gzipped NIfTI: read by its content"),
        (nifti_named_mha, "nifti-gz", "named .mha but holds a gzipped NIfTI: read by its content"),
        (mha_named_nifti, "metaimage", "named .nii.gz but holds a MetaImage (.mha): read by its content"),
    ],
    ids=["plain-named-gz", "gz-named-plain", "nifti-named-mha", "mha-named-nifti"],
)
def test_a_misnamed_file_is_read_by_its_content(tmp_path, make, kind, message):
    path = make(tmp_path)
    assert formats.sniff(path) == kind
    warnings = []
    array, affine = load_image(path, warnings=warnings)
    expected, expected_affine = shipped_ct()
    assert np.array_equal(array, expected) and np.allclose(affine, expected_affine, atol=1e-4)
    assert [(w.kind, w.message) for w in warnings] == [("file_format", message)]
    assert not any(p.name.startswith("stmt-alias") for p in tmp_path.iterdir())


def test_a_correctly_named_file_raises_no_warning():
    warnings = []
    load_image(CT, warnings=warnings)
    assert formats.sniff(CT) == "nifti-gz" and formats.mismatch(CT) is None and warnings == []


def test_a_single_dicom_file_is_refused_with_what_to_give_instead(tmp_path):
    path = dicom_file_named_nifti(tmp_path)
    with pytest.raises(ImageError, match="is a single DICOM file \\(one slice\\), not a 3D volume: give the folder that holds its series"):
        load_image(path)


def test_what_the_content_does_not_tell_stays_an_error(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"hello, not an image")
    assert formats.sniff(junk) is None
    with pytest.raises(ImageError, match="junk.nii.gz: not a readable NIfTI image"):
        load_image(junk)
    # a detached MetaImage header names its data file relative to itself: left to its suffix
    detached = tmp_path / "x.mha"
    detached.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = x.raw\n")
    assert formats.sniff(detached) is None
