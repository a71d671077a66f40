"""FLARE23 metrics against DeepMind's ``surface-distance`` package and hand-computed cases."""

import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import surface_distance

from stmt_monai.evaluation.metrics import (
    NSD_DSC_THRESHOLD,
    dice,
    flare_case_scores,
    normalized_surface_dice,
    scores_to_rows,
    summarize,
    surfel_area_table,
)
from stmt_monai.labels import LABELS, NSD_TOLERANCE_MM, ORGAN_CLASSES, ORGANS, SLICE_RANGE_CLASSES, TUMOR

REPO = Path(__file__).resolve().parents[1]
REAL_ORGANS = "abdomen_ct_3mm_organs.nii.gz"
AORTA = SLICE_RANGE_CLASSES[0]
LIVER = ORGAN_CLASSES[0]


def _real_mask() -> np.ndarray:
    """FLARE-ordered organ label map of the real 3 mm CT (the packaged copy)."""
    path = REPO / "stmt_monai" / "example_data" / REAL_ORGANS
    return np.asarray(nib.load(str(path)).dataobj)


def _package_nsd(gt: np.ndarray, pred: np.ndarray, spacing, tolerance) -> float:
    """NSD by the surface-distance package (it uses numpy / scipy aliases that now warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distances = surface_distance.compute_surface_distances(gt, pred, spacing)
        return float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance))


def _cube(shape=(20, 22, 24), low=(5, 6, 7), size=(8, 9, 10)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, lo + n) for lo, n in zip(low, size))] = True
    return mask


def _sphere(shape=(30, 32, 28), centre=(15, 16, 14), radius_mm=20.0, spacing=(1.5, 1.5, 2.5)) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return dist2 <= radius_mm**2


# --- DSC and NSD of single masks ------------------------------------------------------------


def test_perfect_prediction():
    cube = _cube()
    assert dice(cube, cube) == 1.0
    assert normalized_surface_dice(cube, cube, (1.0, 1.0, 1.0), 0.0) == 1.0


def test_empty_masks():
    empty, cube = np.zeros((8, 8, 8), bool), _cube((8, 8, 8), (2, 2, 2), (3, 3, 3))
    assert dice(empty, empty) == 1.0 and normalized_surface_dice(empty, empty, (1, 1, 1), 2) == 1.0
    for gt, pred in ((empty, cube), (cube, empty)):
        assert dice(gt, pred) == 0.0 and normalized_surface_dice(gt, pred, (1, 1, 1), 2) == 0.0


def test_dice_value():
    gt, pred = _cube(), np.roll(_cube(), 2, axis=0)  # 8 x 9 x 10 cube, 6 of 8 rows overlap
    assert dice(gt, pred) == pytest.approx(0.75)


def test_surfel_areas_match_package():
    from surface_distance import lookup_tables

    for spacing in ((1.0, 1.0, 1.0), (0.8, 0.8, 3.0), (3.0, 1.1, 0.7)):
        np.testing.assert_allclose(
            surfel_area_table(spacing),
            lookup_tables.create_table_neighbour_code_to_surface_area(spacing),
            rtol=0,
            atol=1e-12,
        )


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.2, 3.0)])
@pytest.mark.parametrize("tolerance", [0.5, 1.0, 2.0, 3.0])
def test_shifted_cube_matches_package(spacing, tolerance):
    gt = _cube()
    pred = np.roll(gt, (1, -2, 1), axis=(0, 1, 2))
    ours = normalized_surface_dice(gt, pred, spacing, tolerance)
    assert ours == pytest.approx(_package_nsd(gt, pred, spacing, tolerance), abs=1e-6)
    assert 0.0 < normalized_surface_dice(gt, pred, spacing, 0.5) < 1.0


@pytest.mark.parametrize("tolerance", [1.0, 2.0, 5.0])
def test_shifted_sphere_anisotropic_matches_package(tolerance):
    spacing = (1.5, 1.5, 2.5)
    gt = _sphere(spacing=spacing)
    pred = _sphere(centre=(16, 15, 15), radius_mm=18.0, spacing=spacing)
    ours = normalized_surface_dice(gt, pred, spacing, tolerance)
    assert ours == pytest.approx(_package_nsd(gt, pred, spacing, tolerance), abs=1e-6)


def test_mask_touching_volume_border_matches_package():
    gt = _cube((10, 10, 10), (0, 0, 3), (5, 10, 4))
    pred = _cube((10, 10, 10), (0, 1, 2), (6, 9, 8))
    spacing = (0.9, 1.7, 2.2)
    assert normalized_surface_dice(gt, pred, spacing, 2.0) == pytest.approx(
        _package_nsd(gt, pred, spacing, 2.0), abs=1e-6
    )


def test_real_organs_match_package():
    labels = _real_mask()
    spacing = (3.0, 3.0, 3.0)
    organs = [label for label in ORGANS if (labels == label).any()]
    assert len(organs) >= 10  # the sample has most FLARE organs (not the esophagus)
    for label in organs:
        gt = labels == label
        for pred in (np.roll(gt, (1, -2, 1), axis=(0, 1, 2)), np.roll(gt, 2, axis=2)):
            tolerance = NSD_TOLERANCE_MM[label]
            ours = normalized_surface_dice(gt, pred, spacing, tolerance)
            assert ours == pytest.approx(_package_nsd(gt, pred, spacing, tolerance), abs=1e-6), label


# --- the official FLARE23 rules ---------------------------------------------------------------


def _official_case_scores(gt_labels, pred_labels, spacing):
    """The official FLARE23 script's per-class loop, on the surface-distance package."""
    scores = {}
    for label in LABELS:
        gt_any, pred_any = (gt_labels == label).any(), (pred_labels == label).any()
        if not gt_any and not pred_any:
            scores[label] = (1.0, 1.0)
            continue
        if not gt_any or not pred_any:
            scores[label] = (0.0, 0.0)
            continue
        gt, pred = gt_labels == label, pred_labels == label
        if label in SLICE_RANGE_CLASSES:
            z_index = np.where(gt)[2]
            z_lower, z_upper = np.min(z_index), np.max(z_index)
            gt, pred = gt[:, :, z_lower:z_upper], pred[:, :, z_lower:z_upper]
        dsc = float(surface_distance.compute_dice_coefficient(gt, pred))
        nsd = 0.0 if dsc < NSD_DSC_THRESHOLD else _package_nsd(gt, pred, spacing, NSD_TOLERANCE_MM[label])
        scores[label] = (dsc, nsd)
    return scores


def test_case_scores_match_official_procedure():
    gt = _real_mask()
    pred = np.roll(gt, (1, 0, 2), axis=(0, 1, 2))
    pred[pred == LIVER] = 0  # a missed organ
    pred[:4, :4, :4] = TUMOR  # a tumor where the gt has none
    ours = flare_case_scores(gt, pred, (3.0, 3.0, 3.0))
    official = _official_case_scores(gt, pred, (3.0, 3.0, 3.0))
    assert set(ours) == set(LABELS)
    for label, (dsc, nsd) in official.items():
        assert ours[label]["dsc"] == pytest.approx(dsc, abs=1e-6), label
        assert ours[label]["nsd"] == pytest.approx(nsd, abs=1e-6), label
    assert ours[LIVER] == {"dsc": 0.0, "nsd": 0.0}
    assert ours[TUMOR] == {"dsc": 0.0, "nsd": 0.0}


def test_case_scores_empty_rules():
    gt = np.zeros((10, 10, 10), np.uint8)
    pred = gt.copy()
    pred[2:5, 2:5, 2:5] = TUMOR
    scores = flare_case_scores(gt, pred, (1.0, 1.0, 1.0))
    assert scores[TUMOR] == {"dsc": 0.0, "nsd": 0.0}
    assert all(scores[label] == {"dsc": 1.0, "nsd": 1.0} for label in ORGANS)


def test_low_dice_sets_nsd_to_zero():
    gt = np.zeros((30, 30, 30), np.uint8)
    gt[5:15, 5:15, 5:15] = LIVER
    pred = np.zeros_like(gt)
    pred[13:23, 5:15, 5:15] = LIVER  # 2 of 10 rows overlap: DSC 0.2
    pred_low = np.zeros_like(gt)
    pred_low[14:24, 5:15, 5:15] = LIVER  # 1 of 10 rows: DSC 0.1
    at_threshold = flare_case_scores(gt, pred, (1.0, 1.0, 1.0), classes=[LIVER])[LIVER]
    assert at_threshold["dsc"] == pytest.approx(NSD_DSC_THRESHOLD)
    assert at_threshold["nsd"] > 0.0  # the surfaces touch within the 5 mm liver tolerance
    below = flare_case_scores(gt, pred_low, (1.0, 1.0, 1.0), classes=[LIVER])[LIVER]
    assert below == {"dsc": pytest.approx(0.1), "nsd": 0.0}
    assert normalized_surface_dice(gt == LIVER, pred_low == LIVER, (1, 1, 1), NSD_TOLERANCE_MM[LIVER]) > 0.0


def test_aorta_scored_in_gt_slice_range_only():
    gt = np.zeros((12, 12, 20), np.uint8)
    gt[4:8, 4:8, 5:15] = AORTA  # gt slices 5..14
    pred = np.zeros_like(gt)
    pred[4:8, 4:8, 0:20] = AORTA  # the same tube, over every slice
    scores = flare_case_scores(gt, pred, (1.0, 1.0, 2.0), classes=[AORTA])[AORTA]
    # official cut [5:14]: slices 0-4 and 15-19 of pred do not count
    assert scores == {"dsc": 1.0, "nsd": 1.0}
    # the same shapes as a liver (no cut): pred has twice the gt volume
    as_liver = {name: np.where(mask == AORTA, LIVER, 0) for name, mask in (("gt", gt), ("pred", pred))}
    liver_scores = flare_case_scores(as_liver["gt"], as_liver["pred"], (1.0, 1.0, 2.0), classes=[LIVER])
    assert liver_scores[LIVER]["dsc"] == pytest.approx(2 * 160 / (160 + 320))


def test_aorta_cut_excludes_last_gt_slice():
    gt = np.zeros((12, 12, 20), np.uint8)
    gt[4:8, 4:8, 5:15] = AORTA  # slices 5..14, 16 voxels each
    pred = np.zeros_like(gt)
    pred[4:8, 4:8, 5:14] = AORTA  # misses only the last gt slice, 14
    assert flare_case_scores(gt, pred, (1.0, 1.0, 1.0), classes=[AORTA])[AORTA] == {"dsc": 1.0, "nsd": 1.0}
    pred_last = np.zeros_like(gt)
    pred_last[4:8, 4:8, 14] = AORTA  # only the last gt slice: nothing left after the cut
    assert flare_case_scores(gt, pred_last, (1.0, 1.0, 1.0), classes=[AORTA])[AORTA] == {"dsc": 0.0, "nsd": 0.0}


def test_single_slice_gt_gives_nan_like_official():
    gt = np.zeros((12, 12, 20), np.uint8)
    gt[4:8, 4:8, 7] = AORTA  # one slice: the official cut [7:7] is empty on both sides
    scores = flare_case_scores(gt, gt.copy(), (1.0, 1.0, 1.0), classes=[AORTA])[AORTA]
    assert math.isnan(scores["dsc"]) and math.isnan(scores["nsd"])


# --- summary and table ------------------------------------------------------------------------


def _two_cases() -> dict:
    case_a = {label: {"dsc": 1.0, "nsd": 1.0} for label in ORGANS}
    case_a[LIVER] = {"dsc": 0.5, "nsd": 0.25}
    case_a[TUMOR] = {"dsc": 0.4, "nsd": 0.2}
    case_b = {label: {"dsc": 0.8, "nsd": 0.6} for label in ORGANS}
    case_b[TUMOR] = {"dsc": 0.0, "nsd": 0.0}
    return {"case_a": case_a, "case_b": case_b}


def test_summarize_two_cases():
    summary = summarize(_two_cases())
    assert summary["num_cases"] == 2
    assert summary["per_class"][LIVER] == {"dsc": pytest.approx(0.65), "nsd": pytest.approx(0.425)}
    assert summary["per_class"][ORGAN_CLASSES[1]] == {"dsc": pytest.approx(0.9), "nsd": pytest.approx(0.8)}
    # 12 organs average 0.9 / 0.8, the liver 0.65 / 0.425; the tumor is not part of it
    assert summary["organ_dsc"] == pytest.approx((12 * 0.9 + 0.65) / 13)
    assert summary["organ_nsd"] == pytest.approx((12 * 0.8 + 0.425) / 13)
    assert summary["tumor_dsc"] == pytest.approx(0.2)
    assert summary["tumor_nsd"] == pytest.approx(0.1)


def test_summarize_skips_nan_and_missing_tumor():
    cases = {"a": {LIVER: {"dsc": 0.5, "nsd": 0.5}}, "b": {LIVER: {"dsc": math.nan, "nsd": math.nan}}}
    summary = summarize(cases)
    assert summary["organ_dsc"] == 0.5 and summary["organ_nsd"] == 0.5
    assert math.isnan(summary["tumor_dsc"]) and math.isnan(summary["tumor_nsd"])


def test_scores_to_rows():
    rows = scores_to_rows(_two_cases())
    assert len(rows) == 2 * len(LABELS)
    assert rows[0] == {"case": "case_a", "label": LIVER, "name": "liver", "dsc": 0.5, "nsd": 0.25}
    assert rows[-1] == {"case": "case_b", "label": TUMOR, "name": LABELS[TUMOR], "dsc": 0.0, "nsd": 0.0}
