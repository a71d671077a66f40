"""Lesion detection: which true tumors a prediction finds, which it misses, what it adds.

Voxel scores (DSC, NSD in :mod:`stmt_monai.evaluation.metrics`) weigh a large tumor over many
small ones; lesion detection counts tumors. Both masks are split into connected components
(26-connectivity, as the post-processing and the report use), and a true lesion is *found* when
at least ``min_overlap_voxels`` of its voxels are predicted tumor; a predicted component that
touches no true lesion is a *false component*. One predicted component that covers two true
lesions finds both; a true lesion split into two predicted components is found once.

The benchmarks and the ablation count unannotated tumors this way (a second tumor left out of
the annotation, which the mean teacher should learn to find): ``annotation`` marks each true
lesion as annotated or not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cc3d
import numpy as np

from stmt_monai.inference.postprocessing import CONNECTIVITY
from stmt_monai.labels import TUMOR


def _mask(array, label: int) -> np.ndarray:
    """A boolean mask as it is; a label map's voxels equal to ``label``."""
    array = np.asarray(array)
    return array if array.dtype == bool else array == label


def _spacing(affine_or_spacing) -> np.ndarray:
    """Voxel size in mm from a 4 x 4 voxel-to-world affine (column norms) or a 3-vector."""
    value = np.asarray(affine_or_spacing, float)
    if value.shape == (4, 4):
        return np.linalg.norm(value[:3, :3], axis=0)
    if value.shape == (3,):
        return value
    raise ValueError(f"expected a 4 x 4 affine or 3 voxel sizes, got shape {value.shape}")


def lesion_detection(
    truth,
    pred,
    affine_or_spacing=(1.0, 1.0, 1.0),
    annotation=None,
    label: int = TUMOR,
    min_overlap_voxels: int = 1,
    connectivity: int = CONNECTIVITY,
) -> dict:
    """Per-lesion detection of one case.

    Args:
        truth: the true tumors, ``(X, Y, Z)``: a boolean mask, or a FLARE label map (``label``).
        pred: the predicted tumors on the same grid, likewise.
        affine_or_spacing: the grid's 4 x 4 voxel-to-world affine or its voxel size in mm
            (for the volumes).
        annotation: optional mask or label map of the annotated tumor voxels: each true lesion
            is then ``annotated`` when any of its voxels is annotated.
        label: the tumor's number in label maps (FLARE: 14).
        min_overlap_voxels: predicted voxels a true lesion needs to count as found.
        connectivity: 6, 18 or 26.

    Returns:
        ``{"found", "missed", "false_components"}`` (counts), ``"lesions"``: one
        ``{"volume_ml", "overlap_voxels", "found"}`` per true lesion (largest first, plus
        ``"annotated"`` with ``annotation``), ``"false_volume_ml"``: the volume of the false
        components; with ``annotation`` also ``"annotated"`` and ``"unannotated"``:
        ``{"found", "total"}`` of each kind.

    Raises:
        ValueError: the masks' shapes differ.
    """
    truth, pred = _mask(truth, label), _mask(pred, label)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    voxel_ml = float(np.prod(_spacing(affine_or_spacing))) / 1000.0
    true_components, num_true = cc3d.connected_components(truth, connectivity=connectivity, return_N=True)
    pred_components, num_pred = cc3d.connected_components(pred, connectivity=connectivity, return_N=True)
    # voxels of each true lesion, and of those the predicted ones, in one pass each
    sizes = np.bincount(true_components.ravel(), minlength=num_true + 1)
    overlaps = np.bincount(true_components[pred].ravel(), minlength=num_true + 1)
    annotated = None
    if annotation is not None:
        annotation = _mask(annotation, label)
        if annotation.shape != truth.shape:
            raise ValueError(f"annotation {annotation.shape} and truth {truth.shape} differ in shape")
        annotated = np.bincount(true_components[annotation].ravel(), minlength=num_true + 1) > 0
    lesions = []
    for index in range(1, num_true + 1):
        lesion = {"volume_ml": float(sizes[index]) * voxel_ml, "overlap_voxels": int(overlaps[index]), "found": bool(overlaps[index] >= min_overlap_voxels)}
        if annotated is not None:
            lesion["annotated"] = bool(annotated[index])
        lesions.append(lesion)
    lesions.sort(key=lambda lesion: -lesion["volume_ml"])
    touching = np.unique(pred_components[truth])
    false = np.setdiff1d(np.arange(1, num_pred + 1), touching)
    pred_sizes = np.bincount(pred_components.ravel(), minlength=num_pred + 1)
    result = {
        "found": sum(lesion["found"] for lesion in lesions),
        "missed": sum(not lesion["found"] for lesion in lesions),
        "false_components": int(false.size),
        "false_volume_ml": float(pred_sizes[false].sum()) * voxel_ml,
        "lesions": lesions,
    }
    if annotated is not None:
        for kind, flag in (("annotated", True), ("unannotated", False)):
            group = [lesion for lesion in lesions if lesion["annotated"] == flag]
            result[kind] = {"found": sum(lesion["found"] for lesion in group), "total": len(group)}
    return result


def detection_totals(cases: Mapping[str, Mapping] | Sequence[Mapping]) -> dict:
    """Sum of :func:`lesion_detection` results over cases.

    Returns:
        ``{"cases", "found", "missed", "false_components", "false_components_per_case",
        "detection_rate"}`` (found / true lesions; NaN without any), and ``"annotated"`` /
        ``"unannotated"`` ``{"found", "total", "rate"}`` when every case has them.
    """
    cases = list(cases.values()) if isinstance(cases, Mapping) else list(cases)
    found, missed = sum(c["found"] for c in cases), sum(c["missed"] for c in cases)
    false = sum(c["false_components"] for c in cases)
    totals = {
        "cases": len(cases),
        "found": found,
        "missed": missed,
        "false_components": false,
        "false_components_per_case": false / len(cases) if cases else float("nan"),
        "detection_rate": found / (found + missed) if found + missed else float("nan"),
    }
    for kind in ("annotated", "unannotated"):
        if cases and all(kind in c for c in cases):
            hit, total = sum(c[kind]["found"] for c in cases), sum(c[kind]["total"] for c in cases)
            totals[kind] = {"found": hit, "total": total, "rate": hit / total if total else float("nan")}
    return totals
