"""The one preprocessing path of StMt, shared by training, evaluation and inference.

SPEC.md, "Preprocessing" and paper section 2.1:

- intensity: clip at the 0.5 / 99.5 percentiles of foreground voxels, z-score with the global
  foreground mean and sd, numbers from a dataset fingerprint (:class:`Fingerprint`);
- stage 1: the whole CT resampled to 128^3;
- stage 2: the region of interest found by stage 1, cropped from the original-resolution CT
  and resampled to 192^3; in training the box of the label (:func:`abdomen_roi`), at inference
  the box of stage 1's prediction (:func:`abdomen_roi_from_prediction`; :func:`roi_coverage`
  measures the share of a case's labelled voxels it keeps);
- the inverse (:func:`restore_label_map`): a label map at network resolution goes back to the
  crop (nearest neighbour), is zero-padded into the full grid and returned in the input file's
  own voxel order, so it can be written with the input's exact shape and affine.

All geometry is done in a canonical RAS voxel order (:func:`to_canonical`), so a file in any
orientation gives the same network input; :class:`CaseGeometry` records what was done so
the inverse is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from nibabel import orientations

from stmt_monai.preprocessing.geometry import CaseGeometry, crop, resize, to_canonical
from stmt_monai.preprocessing.roi import ROI_MARGIN_MM, abdomen_roi

#: paper section 2.1: network input sizes of the two stages
STAGE1_SIZE = (128, 128, 128)


STAGE2_SIZE = (192, 192, 192)


def prepare_volume(
    image: np.ndarray,
    affine: np.ndarray,
    network_size: Sequence[int] | None,
    roi_mask: np.ndarray | None = None,
    roi_box: tuple[Sequence[int], Sequence[int]] | None = None,
    margin_mm: float = ROI_MARGIN_MM,
    jitter_mm: float = 0.0,
    rng: np.random.Generator | None = None,
    labels: np.ndarray | None = None,
    target_spacing_mm: Sequence[float] | None = None,
    canonical: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, CaseGeometry]:
    """Geometry half of preprocessing: canonical orientation, optional ROI crop, resize.

    Args:
        image: ``(X, Y, Z)`` CT in HU, in the file's voxel order.
        affine: its RAS affine.
        network_size: e.g. ``STAGE1_SIZE`` (whole volume) or ``STAGE2_SIZE`` (ROI).
        roi_mask: stage 2: a mask on the same grid as ``image`` (file voxel order) whose
            bounding box plus ``margin_mm`` is the ROI (e.g. the ground truth in training).
        roi_box: stage 2 alternative: the ROI already in canonical voxels, ``(start, end)``.
        margin_mm, jitter_mm, rng: see :func:`abdomen_roi`.
        labels: optional label map on the image's grid, cropped and resized (nearest) alike.
        target_spacing_mm: instead of a fixed ``network_size``, resample the crop to this voxel
            size (the teacher's nnU-Net-style fixed-spacing input for sliding windows); pass
            ``network_size=None`` with it.
        canonical: ``to_canonical(image, affine)`` if the caller already has it (the cascade
            prepares one volume for several networks: reorienting a 512 x 512 x 300 CT once
            instead of per network saves ~1.8 s on 2 CPU cores).

    Returns:
        ``(image, labels, geometry)``: ``(1, *network_size)`` float32 HU tensor, the labels as a
        ``(1, *network_size)`` uint8 tensor (or None) and the :class:`CaseGeometry`.
    """
    shape = tuple(int(s) for s in image.shape)
    canonical, canonical_affine, ornt = canonical if canonical is not None else to_canonical(image, affine)
    if roi_box is not None:
        start, end = (tuple(int(v) for v in roi_box[0]), tuple(int(v) for v in roi_box[1]))
    elif roi_mask is not None:
        spacing = np.sqrt((canonical_affine[:3, :3] ** 2).sum(0))
        start, end = abdomen_roi(orientations.apply_orientation(roi_mask, ornt), spacing, margin_mm, jitter_mm, rng)
    else:
        start, end = (0, 0, 0), canonical.shape
    end = tuple(int(e) for e in end)
    if target_spacing_mm is not None:
        spacing = np.sqrt((canonical_affine[:3, :3] ** 2).sum(0))
        extent = (np.asarray(end) - np.asarray(start)) * spacing
        network_size = tuple(int(max(1, round(v))) for v in extent / np.asarray(target_spacing_mm, float))
    elif network_size is None:
        raise ValueError("give network_size or target_spacing_mm")
    network_size = tuple(int(v) for v in network_size)
    geometry = CaseGeometry(shape, np.asarray(affine, float), ornt, start, end, network_size)
    net_image = resize(crop(canonical, start, end)[None].astype(np.float32, copy=False), network_size, "trilinear")
    net_labels = None
    if labels is not None:
        canonical_labels = orientations.apply_orientation(labels, ornt)
        net_labels = resize(torch.from_numpy(np.ascontiguousarray(crop(canonical_labels, start, end)))[None], network_size, "nearest")
    return net_image, net_labels, geometry
