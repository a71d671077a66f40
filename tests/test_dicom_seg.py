"""DICOM SEG output (``stmt-segment --dicom_seg``, :mod:`stmt_monai.inference.dicom_seg`).

Read back with highdicom and pydicom: one segment per label present, FLARE names, SNOMED CT
codes, the source series referenced; every frame checked, voxel for voxel, against the NIfTI
mask through the frame's own position, orientation and spacing (the SEG's functional groups, LPS
mm) and the mask's affine (nibabel, RAS mm).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.affines import apply_affine

from stmt_monai.inference.dicom_seg import read_series, segment_codes, write_dicom_seg
from stmt_monai.labels import LABELS, TUMOR


def check_seg_against_mask(seg_path, mask_path, series_dir) -> list[int]:
    """Assert the SEG at ``seg_path`` is the label map at ``mask_path`` on the DICOM series
    ``series_dir``; returns the labels it holds."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    mask_image = nib.load(mask_path)
    mask = np.asarray(mask_image.dataobj)
    sources = read_series(series_dir)
    source_uids = {str(d.SOPInstanceUID) for d in sources}

    # the source series and study referenced, segments named and coded after the FLARE labels present
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert [str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence] == [str(sources[0].SeriesInstanceUID)]
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == source_uids
    present = [int(v) for v in np.unique(mask) if v]
    by_number = {}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        label = present[number - 1]
        by_number[number] = label
        assert description.segment_label == LABELS[label]
        category, kind, modifier = segment_codes()[label]
        assert description.segmented_property_type.scheme_designator == "SCT"
        assert (description.segmented_property_type.value, description.segmented_property_category.value) == (kind.value, category.value)
        modifiers = getattr(description, "SegmentedPropertyTypeModifierCodeSequence", [])
        assert [m.CodeValue for m in modifiers] == ([modifier.value] if modifier is not None else [])
    assert sorted(by_number.values()) == present

    # every frame, voxel for voxel, through the SEG's own geometry
    shared = seg.SharedFunctionalGroupsSequence[0]
    row_dir, col_dir = np.reshape(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float), (2, 3))
    spacing_r, spacing_c = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    r, c = np.meshgrid(np.arange(seg.Rows), np.arange(seg.Columns), indexing="ij")
    to_voxel = np.linalg.inv(mask_image.affine)
    frames_of = {}
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        label = by_number[int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        source = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert source in source_uids
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
        lps = position + c[..., None] * spacing_c * row_dir + r[..., None] * spacing_r * col_dir
        voxel = np.rint(apply_affine(to_voxel, lps * [-1.0, -1.0, 1.0])).astype(int)
        assert voxel.min() >= 0 and all(voxel[..., k].max() < mask.shape[k] for k in range(3))  # the series' grid is the mask's
        np.testing.assert_array_equal(frame.astype(bool), mask[tuple(np.moveaxis(voxel, -1, 0))] == label)
        frames_of.setdefault(label, set()).add(source)
    # no frame missing: each label has a frame on every source slice that holds it
    for label in present:
        slices = {str(d.SOPInstanceUID) for d in sources if (check_slice(mask, mask_image.affine, d) == label).any()}
        assert frames_of[label] == slices
    return present


def check_slice(mask, affine, image) -> np.ndarray:
    """The mask's labels on one source image (independent of the writer: nibabel's apply_affine)."""
    row_dir, col_dir = np.reshape(np.asarray(image.ImageOrientationPatient, float), (2, 3))
    spacing_r, spacing_c = (float(v) for v in image.PixelSpacing)
    r, c = np.meshgrid(np.arange(image.Rows), np.arange(image.Columns), indexing="ij")
    lps = np.asarray(image.ImagePositionPatient, float) + c[..., None] * spacing_c * row_dir + r[..., None] * spacing_r * col_dir
    voxel = np.rint(apply_affine(np.linalg.inv(affine), lps * [-1.0, -1.0, 1.0])).astype(int)
    return mask[tuple(np.moveaxis(voxel, -1, 0))]


def test_every_flare_label_has_snomed_codes():
    codes = segment_codes()
    assert set(codes) == set(LABELS)
    for label, (category, kind, _) in codes.items():
        assert category.scheme_designator == kind.scheme_designator == "SCT"
        assert category.meaning == ("Morphologically Altered Structure" if label == TUMOR else "Anatomical Structure")
    assert codes[TUMOR][1].meaning == "Neoplasm" and codes[1][1].meaning == "Liver"


def test_dicom_seg_of_the_shipped_organ_mask_matches_it(real_dicom, real_dicom_organs, tmp_path):
    """The shipped organ labels of the shipped series (its own grid, LAS voxel order) as a SEG."""
    out = write_dicom_seg(real_dicom_organs, real_dicom, tmp_path / "organs_seg.dcm")
    present = check_seg_against_mask(out, real_dicom_organs, real_dicom)
    assert len(present) >= 5 and 1 in present  # liver among them
    assert pydicom.dcmread(out).Modality == "SEG"


def test_a_mask_on_another_grid_is_refused_in_one_line(real_dicom, real_organs, tmp_path):
    from stmt_monai.io import ImageError

    with pytest.raises(ImageError) as err:
        write_dicom_seg(real_organs, real_dicom, tmp_path / "x.dcm")
    assert "no DICOM series has the mask's grid" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_stmt_segment_dicom_seg_on_the_shipped_series(real_dicom, tmp_path, monkeypatch):
    """``stmt-segment <series> out --dicom_seg`` with the shipped demo weights: the SEG beside the
    NIfTI mask is that mask on the source series, frame for frame."""
    from stmt_monai.cli import segment_main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit) as status:
        segment_main([str(real_dicom), str(tmp_path), "--dicom_seg", "--backend", "torch", "--threads", "1", "--progress", "False"])
    assert status.value.code == 0
    mask = tmp_path / "abdomen_ct_dicom.nii.gz"
    seg = tmp_path / "abdomen_ct_dicom_seg.dcm"
    present = check_seg_against_mask(seg, mask, real_dicom)
    assert 1 in present  # the liver
