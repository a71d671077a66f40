"""One stage's network input from a CT (paper section 2.1): orientation, region of interest, resize.

:func:`prepare_volume` brings a CT (and optionally its label map) to canonical RAS order, crops
the stage-2 region of interest (from a mask: :func:`~stmt_monai.preprocessing.roi.abdomen_roi`, or
a box stage 1 found) and resamples to the network size: the whole CT to :data:`STAGE1_SIZE`
(128^3) in stage 1, the crop to :data:`STAGE2_SIZE` (192^3) in stage 2, or to a fixed voxel
spacing for the sliding-window teacher. It returns the :class:`~stmt_monai.preprocessing.geometry.CaseGeometry`
that :func:`~stmt_monai.preprocessing.geometry.restore_label_map` inverts. Intensities stay in HU
here: the fingerprint normalises them (:mod:`stmt_monai.preprocessing.fingerprint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from nibabel import orientations

from stmt_monai.arrays import is_tensor
from stmt_monai.preprocessing.geometry import CaseGeometry, crop, resize, resize_linear, to_canonical
from stmt_monai.preprocessing.roi import ROI_MARGIN_MM, abdomen_roi

if TYPE_CHECKING:  # annotations only: the CPU path never imports torch (stmt_monai.arrays)
    import torch

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
    labels: np.ndarray | Sequence[np.ndarray] | None = None,
    target_spacing_mm: Sequence[float] | None = None,
    canonical: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    as_tensor: bool = True,
) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | None, CaseGeometry]:
    """Geometry half of preprocessing: canonical orientation, optional ROI crop, resize.

    Args:
        image: ``(X, Y, Z)`` CT in HU, in the file's voxel order.
        affine: its RAS affine.
        network_size: e.g. ``STAGE1_SIZE`` (whole volume) or ``STAGE2_SIZE`` (ROI).
        roi_mask: stage 2: a mask on the same grid as ``image`` (file voxel order) whose
            bounding box plus ``margin_mm`` is the ROI (e.g. the ground truth in training).
        roi_box: stage 2 alternative: the ROI already in canonical voxels, ``(start, end)``.
        margin_mm, jitter_mm, rng: see :func:`abdomen_roi`.
        labels: optional label map on the image's grid, cropped and resized (nearest) alike, or a
            list of such maps (each cropped with the same box).
        target_spacing_mm: instead of a fixed ``network_size``, resample the crop to this voxel
            size (the teacher's nnU-Net-style fixed-spacing input for sliding windows); pass
            ``network_size=None`` with it.
        canonical: ``to_canonical(image, affine)`` if the caller already has it (the cascade
            prepares one volume for several networks; a view, ``contiguous=False``, is enough);
            its array may be a tensor on a device
            (:func:`~stmt_monai.preprocessing.geometry.canonical_tensor`): the crop is resized there.
        as_tensor: return the image as a torch tensor (default); ``False``: a NumPy array when the
            volume is one (the cascade's CPU path, which never imports torch).

    Returns:
        ``(image, labels, geometry)``: ``(1, *network_size)`` float32 HU tensor (array with
        ``as_tensor=False``), the labels as a
        ``(1, *network_size)`` uint8 tensor (or None) and the :class:`CaseGeometry`.
    """
    shape = tuple(int(s) for s in image.shape)
    # a view (no reoriented copy): the resampling reads any strides
    canonical, canonical_affine, ornt = canonical if canonical is not None else to_canonical(image, affine, contiguous=False)
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
    if is_tensor(canonical):  # already on the network's device (the cascade on CUDA)
        net_image = resize(crop(canonical, start, end)[None].float(), network_size, "trilinear")
    else:
        net_image = resize_linear(crop(canonical, start, end), network_size)[None]
        if as_tensor:
            import torch

            net_image = torch.from_numpy(net_image)

    def net_label(label_map: np.ndarray) -> torch.Tensor:
        import torch

        canonical_labels = orientations.apply_orientation(label_map, ornt)
        return resize(torch.from_numpy(np.ascontiguousarray(crop(canonical_labels, start, end)))[None], network_size, "nearest")

    if labels is None:
        net_labels = None
    elif isinstance(labels, np.ndarray):
        net_labels = net_label(labels)
    else:
        net_labels = [net_label(label_map) for label_map in labels]
    return net_image, net_labels, geometry
