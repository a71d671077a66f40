"""The stage-2 region of interest: a bounding box plus a margin in mm (paper sections 2.1-2.2, Fig. 2c).

- :func:`abdomen_roi`: the box of a mask (``> 0``) grown by a margin in mm and clamped; in
  training the mask is the case's label (or an organ pseudo label for the tumor student), and
  the margin can be jittered per side (an augmentation, ``roi_jitter_mm`` of ``organ_selftrain``);
- :func:`abdomen_roi_from_prediction`: at inference, the box of stage 1's abdomen mask (small
  far components dropped) mapped from the 128^3 network grid to the input's canonical grid, grown
  by :data:`ROI_MARGIN_MM` (10 mm; the paper gives no margin: it covers the coarse mask's
  blockiness);
- :func:`scale_box`: a voxel box from one grid to another over the same field of view;
- :func:`roi_coverage`: the share of a case's labelled voxels inside a box; :func:`roi_report`:
  that of the organs and the tumor, and the box's share of the volume against the ideal box's.

Boxes are ``(start, end)`` in canonical RAS voxels, ``[start, end)`` per axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import cc3d
import numpy as np

from stmt_monai.arrays import as_numpy
from stmt_monai.preprocessing.geometry import CaseGeometry, crop, to_canonical

if TYPE_CHECKING:  # annotations only: the CPU path never imports torch (stmt_monai.arrays)
    import torch

#: margin around the stage-1 abdomen box, in mm (covers the coarse 128^3 mask's blockiness)
ROI_MARGIN_MM = 10.0


#: stage-1 components smaller than this share of the largest one do not enter the ROI
ROI_MIN_COMPONENT_FRACTION = 0.1


def abdomen_roi(
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    margin_mm: float = ROI_MARGIN_MM,
    jitter_mm: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Region of interest: bounding box of ``mask > 0``, grown by a margin in mm, clamped.

    Args:
        mask: ``(X, Y, Z)`` abdomen (or any label) mask on the grid to crop.
        spacing_mm: voxel size of that grid.
        margin_mm: margin added on each side.
        jitter_mm: training augmentation: each side's margin is drawn from
            ``margin_mm + U(-jitter_mm, jitter_mm)`` (at least 0).
        rng: random generator for the jitter.

    Returns:
        ``(start, end)`` voxel indices, ``[start, end)`` per axis; the whole volume if the
        mask is empty (nothing found: do not crop away what might be there).
    """
    mask = np.asarray(mask) > 0
    shape = np.asarray(mask.shape)
    if not mask.any():
        return (0, 0, 0), tuple(int(s) for s in shape)
    lo = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[[0, -1]] for ax in range(3)])
    margins = np.full((3, 2), float(margin_mm))
    if jitter_mm:
        rng = rng or np.random.default_rng()
        margins = np.maximum(margins + rng.uniform(-jitter_mm, jitter_mm, size=(3, 2)), 0.0)
    vox = np.ceil(margins / np.asarray(spacing_mm, float)[:, None]).astype(int)
    start = np.maximum(lo[:, 0] - vox[:, 0], 0)
    end = np.minimum(lo[:, 1] + 1 + vox[:, 1], shape)
    return tuple(int(s) for s in start), tuple(int(e) for e in end)


def scale_box(
    start: Sequence[int], end: Sequence[int], from_shape: Sequence[int], to_shape: Sequence[int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Map a voxel box between two grids covering the same field of view (outward rounding)."""
    ratio = np.asarray(to_shape, float) / np.asarray(from_shape, float)
    s = np.floor(np.asarray(start) * ratio).astype(int)
    e = np.minimum(np.ceil(np.asarray(end) * ratio).astype(int), np.asarray(to_shape))
    return tuple(int(v) for v in np.maximum(s, 0)), tuple(int(v) for v in e)


def abdomen_roi_from_prediction(
    mask_net: np.ndarray | torch.Tensor,
    geometry: CaseGeometry | str,
    margin_mm: float = ROI_MARGIN_MM,
    min_component_fraction: float = ROI_MIN_COMPONENT_FRACTION,
) -> dict:
    """Stage 2's region of interest from stage 1's abdomen mask (paper Fig. 2c).

    The mask's 26-connected components smaller than ``min_component_fraction`` of the largest
    are dropped (a far false positive must not inflate the box); the bounding box of the rest is
    mapped from the network grid to the canonical grid of the input (:func:`scale_box`, rounding
    outwards), grown by ``margin_mm`` on each side and clamped to the volume.

    Args:
        mask_net: ``(X', Y', Z')`` or ``(1, X', Y', Z')`` abdomen mask (> 0) at network resolution,
            covering ``geometry``'s crop (in stage 1 the whole canonical volume).
        geometry: the stage-1 input's :class:`CaseGeometry` (or its JSON).
        margin_mm: margin added on each side, in mm.
        min_component_fraction: components below this share of the largest one's voxels are
            ignored; 0 keeps every component.

    Returns:
        ``{"found", "start_voxel", "end_voxel", "start_mm", "end_mm", "margin_mm",
        "canonical_shape", "spacing_mm", "num_components", "num_components_kept"}``:
        the box ``[start_voxel, end_voxel)`` in canonical (RAS) voxel order of the input, which
        :func:`prepare_volume` takes as ``roi_box``; its corners in RAS world mm
        (:meth:`CaseGeometry.roi_world`); the canonical shape and voxel size (mm). An empty mask
        (``found`` false) gives the whole volume: nothing is cropped away.
    """
    if isinstance(geometry, str):
        geometry = CaseGeometry.from_json(geometry)
    mask = as_numpy(mask_net)
    mask = np.ascontiguousarray(mask.reshape(mask.shape[-3:]) > 0)
    shape = np.asarray(geometry.canonical_shape)
    components, num = cc3d.connected_components(mask, connectivity=26, return_N=True)
    kept = 0
    start, end = np.zeros(3, int), shape.copy()
    if num:
        sizes = np.bincount(components.ravel())[1:]
        keep = np.flatnonzero(sizes >= min_component_fraction * sizes.max()) + 1
        kept = int(keep.size)
        net_start, net_end = abdomen_roi(np.isin(components, keep), (1.0, 1.0, 1.0), margin_mm=0.0)
        box_start, box_end = scale_box(net_start, net_end, mask.shape, geometry.roi_shape)
        margin = np.ceil(float(margin_mm) / geometry.spacing).astype(int)
        start = np.maximum(np.asarray(geometry.roi_start) + box_start - margin, 0)
        end = np.minimum(np.asarray(geometry.roi_start) + box_end + margin, shape)
    start, end = tuple(int(v) for v in start), tuple(int(v) for v in end)
    box = dataclasses.replace(geometry, roi_start=start, roi_end=end)
    return {
        "found": bool(num),
        "start_voxel": list(start),
        "end_voxel": list(end),
        **box.roi_world(),
        "margin_mm": float(margin_mm),
        "canonical_shape": [int(s) for s in shape],
        "spacing_mm": [float(s) for s in geometry.spacing],
        "num_components": int(num),
        "num_components_kept": kept,
    }


def roi_coverage(
    labels: np.ndarray, affine: np.ndarray, start: Sequence[int], end: Sequence[int], classes: Iterable[int] | None = None
) -> float:
    """Share of a case's labelled voxels that lie inside a region of interest.

    Args:
        labels: ``(X, Y, Z)`` label map in its file's voxel order.
        affine: its voxel-to-world affine (gives the canonical order the box refers to).
        start, end: the box ``[start, end)`` in canonical voxels, as
            :func:`abdomen_roi_from_prediction` returns it.
        classes: the label values counted; default every label > 0.

    Returns:
        Voxels inside the box / all such voxels, in ``[0, 1]``; 1.0 for a case without any.
    """
    canonical, _, _ = to_canonical(np.asarray(labels), affine)
    selected = canonical > 0 if classes is None else np.isin(canonical, list(classes))
    total = int(selected.sum())
    if total == 0:
        return 1.0
    return float(crop(selected, start, end).sum()) / total


def roi_report(labels: np.ndarray, affine: np.ndarray, roi: dict) -> dict:
    """How well a region of interest holds a case's labelled anatomy, and how much it crops.

    Args:
        labels: ``(X, Y, Z)`` FLARE label map (the truth) in its file's voxel order.
        affine: its voxel-to-world affine.
        roi: the box as :func:`abdomen_roi_from_prediction` returns it (or its JSON as the
            ``coarse_abdomen`` bundle writes it): ``start_voxel``, ``end_voxel``, ``margin_mm``.

    Returns:
        ``{"organs", "tumor"}``: :func:`roi_coverage` of the organ classes and of the tumor
        (``None`` without tumor); ``"roi_share_of_volume"``: the box's share of the volume;
        ``"truth_roi_share_of_volume"``: that of the ideal box (the truth's own box, > 0, grown by
        the same margin), for comparison.
    """
    from stmt_monai.labels import ORGAN_CLASSES, TUMOR

    labels = np.asarray(labels)
    start, end = roi["start_voxel"], roi["end_voxel"]
    canonical, canonical_affine, _ = to_canonical(labels, affine)
    ideal = abdomen_roi(canonical > 0, np.linalg.norm(canonical_affine[:3, :3], axis=0), roi["margin_mm"])
    return {
        "organs": roi_coverage(labels, affine, start, end, classes=ORGAN_CLASSES),
        "tumor": roi_coverage(labels, affine, start, end, classes=[TUMOR]) if (labels == TUMOR).any() else None,
        "roi_share_of_volume": float(np.prod(np.subtract(end, start)) / labels.size),
        "truth_roi_share_of_volume": float(np.prod(np.subtract(ideal[1], ideal[0])) / labels.size),
    }
