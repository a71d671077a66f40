"""FLARE23 evaluation: Dice, normalized surface Dice (NSD) and the official scoring rules.

Paper section 3.1, scored by the official FLARE23 rules. NSD is DeepMind's surface-distance method
(Nikolov et al. 2021; the PyPI package ``surface-distance``, which FLARE's official script
copies), re-implemented here so that the package is only a test dependency; the tests check
that both agree to 1e-6.

Arrays are 3D label maps or binary masks in array-axis order ``(x0, x1, x2)``; the third axis
is the slice axis that the official code cuts for aorta, IVC and esophagus. Spacings are in
mm per array axis, in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric
from scipy import ndimage

from stmt_monai.labels import (
    LABELS,
    NSD_TOLERANCE_MM,
    ORGAN_CLASSES,
    SLICE_RANGE_CLASSES,
    TUMOR,
    label_name,
)

#: below this DSC a class's NSD is set to 0 (final FLARE23 rule; earlier FLARE23 code used 0.1)
NSD_DSC_THRESHOLD = 0.2


# --- surface elements of a 2x2x2 neighbourhood --------------------------------------------
# The surface passes between the voxel centres. Each corner point of the voxel grid sees the
# 2x2x2 voxels around it; their inside/outside pattern is an 8-bit code, with bit value
# 2 ** (7 - (4 * a + 2 * b + c)) for the voxel at offset (a, b, c) in {0, 1}^3 (offset 0 is
# the voxel before the corner along that axis). A code stands for a few triangles ("surfels")
# of the marching-cubes surface; each has a normal whose length is its area in units of a
# voxel face. The normals below are DeepMind's table (surface_distance/lookup_tables.py,
# Apache-2.0), written compactly: one string per code, one digit triple per surfel, each
# digit |normal component| in eighths. Signs do not change the area, and a pattern and its
# complement have the same surface, so code c >= 128 uses the entry of 255 - c.
# fmt: off
_SURFEL_NORMALS_EIGHTHS: tuple[str, ...] = (
    '', '111', '111', '220 220', '111', '202 202', '111 111', '400 222 111',  # 0-7
    '111', '111 111', '202 202', '400 222 111', '220 220', '400 222 111', '400 222 111', '400 400',  # 8-15
    '111', '022 022', '111 111', '040 222 111', '111 111', '004 222 111', '111 111 111', '111 222 222 111',  # 16-23
    '111 111', '022 022 111', '202 202 111', '111 333 022 202', '111 220 220', '333 022 111 220', '400 111 222 111', '400 111 222',  # 24-31
    '111', '111 111', '022 022', '040 111 222', '111 111', '111 202 202', '022 022 111', '333 022 111 202',  # 32-39
    '111 111', '111 111 111', '004 222 111', '222 222 111 111', '111 220 220', '400 222 111 111', '022 333 111 220', '400 222 111',  # 40-47
    '220 220', '040 222 111', '040 111 222', '040 040', '220 220 111', '333 202 111 220', '111 040 222 111', '040 222 111',  # 48-55
    '111 220 220', '040 222 111 111', '333 220 111 202', '040 222 111', '220 220 220 220', '220 220 111', '111 220 220', '220 220',  # 56-63
    '111', '111 111', '111 111', '111 220 220', '022 022', '004 222 111', '022 022 111', '333 022 111 220',  # 64-71
    '111 111', '111 111 111', '111 202 202', '400 222 111 111', '040 222 111', '222 222 111 111', '202 333 022 111', '400 222 111',  # 72-79
    '202 202', '004 222 111', '111 202 202', '202 333 220 111', '004 222 111', '004 004', '111 111 222 004', '111 222 004',  # 80-87
    '202 202 111', '004 222 111 111', '202 202 202 202', '111 202 202', '202 333 220 111', '004 222 111', '111 202 202', '202 202',  # 88-95
    '111 111', '111 111 111', '111 022 022', '040 111 222 111', '022 022 111', '004 222 111 111', '022 022 022 022', '022 022 111',  # 96-103
    '111 111 111', '111 111 111 111', '004 222 111 111', '111 111 111', '040 222 111 111', '111 111 111', '022 022 111', '111 111',  # 104-111
    '400 222 111', '222 111 222 111', '333 022 111 202', '040 222 111', '333 220 022 111', '111 222 004', '111 022 022', '022 022',  # 112-119
    '400 222 111 111', '111 111 111', '202 202 111', '111 111', '220 220 111', '111 111', '111 111', '111',  # 120-127
)


def _surfel_normals() -> np.ndarray:
    """Normals of every code as a ``(256, 4, 3)`` array in voxel-face units, zero-padded."""
    normals = np.zeros((256, 4, 3))
    for code in range(256):
        entry = _SURFEL_NORMALS_EIGHTHS[min(code, 255 - code)]
        for k, triple in enumerate(entry.split()):
            normals[code, k] = [int(digit) / 8 for digit in triple]
    return normals


_NORMALS = _surfel_normals()


def surfel_area_table(spacing_mm: Sequence[float]) -> np.ndarray:
    """Surface area of each 2x2x2 neighbourhood code for a voxel spacing.

    Args:
        spacing_mm: voxel size along the three array axes, in mm.

    Returns:
        ``(256,)`` float array, area in mm^2 per code (0 for codes 0 and 255).
    """
    s0, s1, s2 = (float(s) for s in spacing_mm)
    # a normal's component along axis i scales with the area of a voxel face normal to axis i
    face_area = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(_NORMALS * face_area, axis=-1).sum(axis=-1)


def _neighbourhood_codes(mask: np.ndarray) -> np.ndarray:
    """8-bit code of every voxel-grid corner of ``mask``.

    Args:
        mask: ``(n0, n1, n2)`` bool array.

    Returns:
        ``(n0 + 1, n1 + 1, n2 + 1)`` uint8 array; entry ``(i, j, k)`` encodes the voxels
        ``[i-1:i+1, j-1:j+1, k-1:k+1]`` (outside the array counts as background).
    """
    padded = np.pad(mask, 1).astype(np.uint8)
    n0, n1, n2 = (n + 1 for n in mask.shape)
    codes = np.zeros((n0, n1, n2), np.uint8)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                bit = 7 - (4 * a + 2 * b + c)
                codes |= padded[a : a + n0, b : b + n1, c : c + n2] << bit
    return codes


def _surface_distances(
    gt: np.ndarray, pred: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surfels of both masks with their areas and distances to the other surface.

    Both masks must be non-empty. They are first cropped to their joint bounding box; the
    corner grid adds one point on each side, so every surfel is kept.

    Args:
        gt: ``(n0, n1, n2)`` bool ground-truth mask.
        pred: bool prediction mask of the same shape.
        spacing_mm: voxel size along the three array axes, in mm.

    Returns:
        ``(dist_gt_to_pred, area_gt, dist_pred_to_gt, area_pred)``: 1D float arrays, one
        entry per surfel corner, distances in mm and areas in mm^2.
    """
    either = gt | pred
    box = []
    for axis in range(3):
        present = np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(present[0], present[-1] + 1))
    box = tuple(box)
    areas = surfel_area_table(spacing_mm)
    surfaces = []
    for mask in (gt[box], pred[box]):
        codes = _neighbourhood_codes(mask)
        border = (codes != 0) & (codes != 255)
        # distance of every corner point to the nearest border corner of this mask, in mm
        distance = ndimage.distance_transform_edt(~border, sampling=spacing_mm)
        surfaces.append((border, areas[codes[border]], distance))
    (border_gt, area_gt, dist_to_gt), (border_pred, area_pred, dist_to_pred) = surfaces
    return dist_to_pred[border_gt], area_gt, dist_to_gt[border_pred], area_pred


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks, with FLARE's rules for empty masks.

    Args:
        gt: ground-truth mask, any shape, nonzero = foreground.
        pred: prediction mask of the same shape.

    Returns:
        ``2 |G and P| / (|G| + |P|)`` in [0, 1]; 1.0 when both are empty, 0.0 when exactly one is.
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} differs from pred shape {pred.shape}")
    total = int(gt.sum()) + int(pred.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(gt & pred)) / total


def normalized_surface_dice(
    gt: np.ndarray, pred: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> float:
    """Normalized surface Dice at a tolerance (DeepMind ``compute_surface_dice_at_tolerance``).

    The share of both surfaces' area (gt and pred) that lies within ``tolerance_mm`` of the
    other surface.

    Args:
        gt: ``(n0, n1, n2)`` ground-truth mask, nonzero = foreground.
        pred: prediction mask of the same shape.
        spacing_mm: voxel size along the three array axes, in mm (the ground truth's).
        tolerance_mm: largest surface-to-surface distance that counts as agreement, in mm.

    Returns:
        NSD in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is (FLARE's rules;
        the package gives NaN and 0 there).
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape or gt.ndim != 3 or len(spacing_mm) != 3:
        raise ValueError(
            f"expected two 3D masks of one shape and 3 spacings, got {gt.shape}, {pred.shape}, {spacing_mm}"
        )
    gt_any, pred_any = gt.any(), pred.any()
    if not (gt_any or pred_any):
        return 1.0
    if not (gt_any and pred_any):
        return 0.0
    dist_gt, area_gt, dist_pred, area_pred = _surface_distances(gt, pred, spacing_mm)
    within = area_gt[dist_gt <= tolerance_mm].sum() + area_pred[dist_pred <= tolerance_mm].sum()
    return float(within / (area_gt.sum() + area_pred.sum()))


def flare_case_scores(
    gt_labels: np.ndarray,
    pred_labels: np.ndarray,
    spacing_mm: Sequence[float],
    classes: Iterable[int] = tuple(LABELS),
) -> dict[int, dict[str, float]]:
    """DSC and NSD of each class of one case, by the official FLARE23 rules.

    - gt and pred both without the class: DSC = NSD = 1; exactly one without it: 0 and 0.
    - Aorta, IVC, esophagus (``SLICE_RANGE_CLASSES``): both masks are first cut to the gt's
      slice range along the third array axis, as the official code does.
    - NSD = 0 when DSC < ``NSD_DSC_THRESHOLD``; otherwise NSD at the class's tolerance
      (``labels.NSD_TOLERANCE_MM``).

    Args:
        gt_labels: ``(n0, n1, n2)`` integer ground-truth label map (FLARE numbers).
        pred_labels: predicted label map of the same shape.
        spacing_mm: the ground truth's voxel size along the three array axes, in mm.
        classes: label numbers to score; default all 13 organs and the tumor.

    Returns:
        ``{label: {"dsc": float, "nsd": float}}``. NaN for a slice-range class whose gt lies
        in one slice only and whose pred has nothing in the (then empty) cut: the official
        code divides 0 by 0 there; :func:`summarize` skips NaN as the official pandas mean does.
    """
    gt_labels, pred_labels = np.asarray(gt_labels), np.asarray(pred_labels)
    if gt_labels.shape != pred_labels.shape:
        raise ValueError(f"gt shape {gt_labels.shape} differs from pred shape {pred_labels.shape}")
    scores = {}
    for label in classes:
        gt, pred = gt_labels == label, pred_labels == label
        gt_any, pred_any = gt.any(), pred.any()
        if not (gt_any and pred_any):
            both_empty = not (gt_any or pred_any)
            scores[label] = {"dsc": float(both_empty), "nsd": float(both_empty)}
            continue
        if label in SLICE_RANGE_CLASSES:
            z = np.flatnonzero(gt.any(axis=(0, 1)))
            # the official code slices [z_min:z_max], so the gt's last slice is left out too
            gt, pred = gt[:, :, z[0] : z[-1]], pred[:, :, z[0] : z[-1]]
            if not (gt.any() or pred.any()):
                scores[label] = {"dsc": math.nan, "nsd": math.nan}
                continue
        dsc = dice(gt, pred)
        nsd = 0.0
        if dsc >= NSD_DSC_THRESHOLD:
            nsd = normalized_surface_dice(gt, pred, spacing_mm, NSD_TOLERANCE_MM[label])
        scores[label] = {"dsc": dsc, "nsd": nsd}
    return scores


def _mean(values: Iterable[float]) -> float:
    """Mean that skips NaN (as pandas does); NaN when nothing is left."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def summarize(case_scores: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict:
    """Average the per-case scores as FLARE23 reports them.

    Args:
        case_scores: ``{case name: flare_case_scores(...)}``.

    Returns:
        ``{"per_class": {label: {"dsc", "nsd"}}, "organ_dsc", "organ_nsd", "tumor_dsc",
        "tumor_nsd", "num_cases"}``: each class averaged over the cases that scored it, the
        organ figures the mean of the organ class averages, the tumor figures its own class
        average (NaN when no case scored the tumor).
    """
    labels = sorted({label for scores in case_scores.values() for label in scores})
    per_class = {
        label: {
            metric: _mean(scores[label][metric] for scores in case_scores.values() if label in scores)
            for metric in ("dsc", "nsd")
        }
        for label in labels
    }
    organs = [label for label in labels if label in ORGAN_CLASSES]
    tumor = per_class.get(TUMOR, {"dsc": math.nan, "nsd": math.nan})
    return {
        "per_class": per_class,
        "organ_dsc": _mean(per_class[label]["dsc"] for label in organs),
        "organ_nsd": _mean(per_class[label]["nsd"] for label in organs),
        "tumor_dsc": tumor["dsc"],
        "tumor_nsd": tumor["nsd"],
        "num_cases": len(case_scores),
    }


def scores_to_rows(case_scores: Mapping[str, Mapping[int, Mapping[str, float]]]) -> list[dict]:
    """Flatten per-case scores into table rows, e.g. for ``csv.DictWriter``.

    Args:
        case_scores: ``{case name: flare_case_scores(...)}``.

    Returns:
        One dict per case and class, in input order: ``{"case", "label", "name", "dsc", "nsd"}``.
    """
    return [
        {"case": case, "label": label, "name": label_name(label), "dsc": s["dsc"], "nsd": s["nsd"]}
        for case, scores in case_scores.items()
        for label, s in scores.items()
    ]



class PresentDiceMetric(DiceMetric):
    """Validation Dice over the cases whose label holds the class (the tumor network's).

    MONAI's :class:`~monai.metrics.DiceMetric` with ``ignore_empty=True``: a case whose label has
    no tumor is not scored (NaN in the per-case values) instead of counting 1 when the prediction
    is empty too (the FLARE rule the organ validation keeps). When no case has a tumor,
    :meth:`aggregate` is NaN, "no tumor", where MONAI's own reduction gives 0.

    Args:
        num_classes, include_background: as ``DiceMetric``'s.
    """

    def __init__(self, num_classes: int | None = None, include_background: bool = False):
        super().__init__(include_background=include_background, ignore_empty=True, get_not_nans=True, num_classes=num_classes)

    def aggregate(self, reduction=None):
        value, scored = super().aggregate(reduction)
        return torch.where(scored > 0, value, torch.full_like(value, float("nan")))
