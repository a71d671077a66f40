"""stmt_monai.inference.report: organ volumes and mean HU, tumors with RECIST diameters and host organs."""

import csv
import json

import numpy as np
import pytest

from stmt_monai.inference.report import axial_axis, case_report, host_organ, longest_axial_diameter, write_report
from stmt_monai.labels import ORGANS, TUMOR

SPACING = (0.8, 1.2, 2.5)  # anisotropic in-plane pixels on purpose
AFFINE = np.diag([*SPACING, 1.0])
VOXEL_ML = 0.8 * 1.2 * 2.5 / 1000


def synthetic_case():
    labels = np.zeros((60, 50, 20), np.uint8)
    image = np.full(labels.shape, -1000.0, np.float32)
    labels[5:35, 5:30, 2:15] = 1  # liver
    image[labels == 1] = 60.0
    labels[40:50, 10:20, 5:10] = 3  # spleen
    image[labels == 3] = 45.0
    labels[10:20, 10:14, 6:9] = TUMOR  # tumor inside the liver: 10 x 4 voxels, 3 slices
    image[labels == TUMOR] = 20.0
    labels[52:55, 40:43, 15:17] = TUMOR  # small tumor outside every organ
    organs_only = labels.copy()
    organs_only[10:20, 10:14, 6:9] = 1
    organs_only[52:55, 40:43, 15:17] = 0
    return labels, image, organs_only


def test_volumes_are_voxel_counts_times_voxel_volume_and_mean_hu_is_per_organ():
    labels, image, organs_only = synthetic_case()
    report = case_report(labels, AFFINE, image, organ_labels=organs_only, case="c1")
    assert report["voxel_volume_ml"] == pytest.approx(VOXEL_ML)
    organs = {o["label"]: o for o in report["organs"]}
    assert sorted(organs) == list(ORGANS)
    for label, entry in organs.items():
        count = int((labels == label).sum())
        assert entry["voxels"] == count
        assert entry["volume_ml"] == pytest.approx(count * VOXEL_ML)
    assert organs[1]["mean_hu"] == pytest.approx(60.0) and organs[3]["mean_hu"] == pytest.approx(45.0)
    assert organs[2]["volume_ml"] == 0 and organs[2]["mean_hu"] is None
    assert report["tumors"]["total_volume_ml"] == pytest.approx((labels == TUMOR).sum() * VOXEL_ML)


def test_tumors_count_diameter_and_host():
    labels, image, organs_only = synthetic_case()
    tumors = case_report(labels, AFFINE, image, organ_labels=organs_only)["tumors"]
    assert tumors["count"] == 2
    big, small = tumors["lesions"]
    assert big["voxels"] == 10 * 4 * 3 and small["voxels"] == 3 * 3 * 2
    # corner to corner of a 10 x 4 pixel rectangle of 0.8 x 1.2 mm pixels
    assert big["longest_axial_diameter_mm"] == pytest.approx(np.hypot(10 * 0.8, 4 * 1.2), abs=1e-3)
    assert 6 <= big["diameter_slice"] <= 8
    assert big["host_organ"] == "liver" and big["host_organ_label"] == 1
    assert small["host_organ"] == "none" and small["host_organ_label"] == 0
    assert big["mean_hu"] == pytest.approx(20.0)
    # centroid in mm through an affine with an origin: the lesion's mean voxel (14.5, 11.5, 7)
    shifted = AFFINE.copy()
    shifted[:3, 3] = (-100.0, 20.0, 5.0)
    moved = case_report(labels, shifted, image, organ_labels=organs_only)["tumors"]["lesions"][0]
    expected = shifted[:3, :3] @ np.array([14.5, 11.5, 7.0]) + shifted[:3, 3]
    assert moved["centroid_mm"] == pytest.approx(expected.tolist(), abs=0.01)


def test_host_organ_from_the_final_map_uses_the_ring():
    labels, image, _ = synthetic_case()
    lesions = case_report(labels, AFFINE, image)["tumors"]["lesions"]
    assert lesions[0]["host_organ"] == "liver"  # the ring around the lesion is liver
    comp = np.zeros((5, 5, 5), bool)
    comp[2, 2, 2] = True
    organ_map = np.zeros((5, 5, 5), np.uint8)
    organ_map[1, 2, 2] = 2
    organ_map[3, 2, 2] = 13
    organ_map[2, 1, 2] = 13
    assert host_organ(comp, organ_map, exclude_component=True) == 13
    # the lesion's own voxels in a final map are tumor, and tumor hosts nothing
    lesion = np.zeros((7, 7, 7), bool)
    lesion[2:5, 2:5, 2:5] = True
    final = np.where(lesion, TUMOR, 0).astype(np.uint8)
    final[1, 3, 3] = 13
    assert host_organ(lesion, final) == 13


def test_diameter_handles_axis_order_and_matches_a_disc():
    # a disc of radius 20 mm on 0.7 x 0.7 mm pixels, slices along the first voxel axis
    spacing = 0.7
    yy, xx = np.mgrid[:80, :80]
    disc = ((yy - 39.5) * spacing) ** 2 + ((xx - 39.5) * spacing) ** 2 <= 20.0**2
    mask = np.zeros((4, 80, 80), bool)
    mask[1:3] = disc
    # voxel axes (S, A, R): the axial axis is axis 0
    affine = np.zeros((4, 4))
    affine[0, 2] = affine[1, 1] = spacing
    affine[2, 0] = 3.0
    affine[3, 3] = 1
    assert axial_axis(affine) == 0
    diameter, index = longest_axial_diameter(mask, affine)
    assert 40.0 <= diameter <= 40.0 + spacing * np.sqrt(2) + 0.5
    assert index in (1, 2)
    assert longest_axial_diameter(np.zeros((3, 3, 3), bool), np.eye(4)) == (0.0, -1)


def test_report_is_the_same_for_a_fortran_ordered_map():
    """A NIfTI volume is Fortran-ordered and the report reads it in that order (masks, connected
    components): every figure equals the report of the C-ordered copy."""
    labels, image, organs = synthetic_case()
    image = image + np.random.default_rng(0).normal(0.0, 30.0, image.shape).astype(np.float32)  # every voxel its own HU
    reference = case_report(labels, AFFINE, image, organ_labels=organs)
    fortran = case_report(np.asfortranarray(labels), AFFINE, np.asfortranarray(image), organ_labels=np.asfortranarray(organs))
    assert fortran["tumors"]["count"] >= 2 and fortran["tumors"]["lesions"][0]["mean_hu"] is not None
    assert _rounded(fortran) == _rounded(reference)


def _rounded(value, digits: int = 9):
    """The report with its floats to ``digits`` significant digits (sums in another order)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _diameter_by_every_corner(mask, affine):
    """The definition itself: every voxel corner of every axial slice, every pair."""
    axis = axial_axis(affine)
    plane = [a for a in range(3) if a != axis]
    m = np.asarray(affine, float)[:3, plane]
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    best, best_slice = 0.0, -1
    moved = np.moveaxis(mask, axis, 0)
    for index in range(moved.shape[0]):
        points = np.argwhere(moved[index])
        if not len(points):
            continue
        mm = (points[:, None, :] + corners[None]).reshape(-1, 2) @ m.T
        span = float(np.sqrt(((mm[:, None, :] - mm[None, :, :]) ** 2).sum(-1)).max())
        if span > best + 1e-9:
            best, best_slice = span, index
    return best, best_slice


@pytest.mark.parametrize("seed", range(4))
def test_diameter_equals_the_definition_on_irregular_lesions(seed):
    # lumpy lesions with holes and several islands per slice, on anisotropic, sheared and
    # reordered grids: the row-end / bounding-bound search must find the definition's value and slice
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((24, 20, 9)), 1.5) > 0.52
    assert mask.any()
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0] * 0.3  # a slight obliquity
    affine = np.eye(4)
    affine[:3, :3] = np.diag([0.7, 1.1, 3.0]) + rotation
    affine[0, 1] += 0.2  # shear within the axial plane
    if seed % 2:  # the axial axis first in voxel order
        affine[:3, :3] = affine[:3, [2, 0, 1]]
        mask = np.moveaxis(mask, 2, 0)
    diameter, index = longest_axial_diameter(mask, affine)
    expected, _ = _diameter_by_every_corner(mask, affine)
    assert diameter == pytest.approx(expected, rel=1e-9)
    # the slice returned is one where the diameter lies (several may tie)
    assert _diameter_by_every_corner(np.take(mask, [index], axial_axis(affine)), affine)[0] == pytest.approx(expected, rel=1e-9)


def test_write_report_json_and_csv(tmp_path):
    labels, image, organs_only = synthetic_case()
    report = case_report(labels, AFFINE, image, organ_labels=organs_only, case="c1", source="c1.nii.gz")
    json_path, csv_path = write_report(report, tmp_path / "c1_report.json", tmp_path / "c1_report.csv")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["kind"] for r in rows] == ["organ"] * 13 + ["tumor"] * 2
    assert rows[0]["name"] == "liver" and float(rows[0]["volume_ml"]) == pytest.approx(report["organs"][0]["volume_ml"], abs=1e-3)
    assert rows[13]["host_organ"] == "liver" and float(rows[13]["longest_axial_diameter_mm"]) == pytest.approx(9.3, abs=0.05)
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_many_specks_are_counted_but_only_the_largest_measured():
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[::3, ::3, ::3] = TUMOR  # 14^3 isolated voxels
    labels[0:4, 0:4, 0:4] = TUMOR  # one larger lesion (joins the speck at the origin)
    tumors = case_report(labels, AFFINE)["tumors"]
    assert tumors["count"] == 14**3 - 7  # 8 specks fall inside the cube and form one lesion with it
    assert tumors["lesions_listed"] == 100 and tumors["lesions"][0]["voxels"] == 64
