"""Beyond the paper: tumors outside stage 1's box (an optional step of the cascade, off by default).

The cascade looks for tumors only in the box around stage 1's abdomen (paper Fig. 2c), so a lesion
away from every organ, in the lower abdomen or the pelvis, is never seen: the weakness the
paper's discussion names. This step runs the tumor network once more, on the *whole* volume
resized to its input size (a coarser grid than the box's), and keeps the tumor components that lie
outside the box:

1. :func:`~stmt_monai.preprocessing.stage_input.prepare_volume` of the whole canonical volume at
   the tumor network's size, normalised with its fingerprint, argmax at network resolution;
2. :func:`select_outside_components`: the 26-connected tumor components of which less than
   ``max_inside_fraction`` lies in the box (mapped onto the network grid rounding outwards) and
   at least ``min_volume_ml`` lies outside it; their voxels inside the box are dropped (the box's
   own, finer pass decides there);
3. nearest restore to the input's grid
   (:func:`~stmt_monai.preprocessing.geometry.restore_label_map`): the result never touches the box.

``stmt-segment --outside_tumors`` (``Cascade(outside_tumors=True)``, the ``cascade`` bundle's
``outside_tumors``) turns it on. What it recovers, what it adds falsely and what it costs are in
``docs/outside_roi_tumors.md`` (``benchmarks/outside_roi_tumors.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cc3d
import numpy as np

from stmt_monai.arrays import as_numpy
from stmt_monai.inference.postprocessing import CONNECTIVITY
from stmt_monai.preprocessing.geometry import restore_label_map
from stmt_monai.preprocessing.roi import scale_box
from stmt_monai.preprocessing.stage_input import prepare_volume

if TYPE_CHECKING:
    from stmt_monai.inference.stage import StageModel

#: a component needs at least this much tumor outside the box (ml; a 10 mm sphere is 0.52 ml)
OUTSIDE_MIN_VOLUME_ML = 0.5
#: a component with this share of its voxels or more inside the box is the box pass's business
OUTSIDE_MAX_INSIDE_FRACTION = 0.5


def select_outside_components(
    tumor_net: np.ndarray,
    box_net: tuple[Sequence[int], Sequence[int]],
    voxel_ml: float,
    min_volume_ml: float = OUTSIDE_MIN_VOLUME_ML,
    max_inside_fraction: float = OUTSIDE_MAX_INSIDE_FRACTION,
) -> np.ndarray:
    """The tumor of a whole-volume pass that lies outside the box.

    Args:
        tumor_net: ``(X, Y, Z)`` tumor labels (> 0) at network resolution over the whole volume.
        box_net: stage 1's box on the same grid, ``(start, end)``, ``[start, end)`` per axis.
        voxel_ml: one network voxel's volume in ml.
        min_volume_ml: a component's voxels outside the box must add up to at least this.
        max_inside_fraction: a component with this share of its voxels inside the box, or more,
            is dropped.

    Returns:
        ``(X, Y, Z)`` uint8 mask (1 = tumor) of the kept components' voxels outside the box.
    """
    tumor = as_numpy(tumor_net)
    tumor = np.ascontiguousarray(tumor.reshape(tumor.shape[-3:]) > 0)
    out = np.zeros(tumor.shape, np.uint8)
    if not tumor.any():
        return out
    components, num = cc3d.connected_components(tumor, connectivity=CONNECTIVITY, return_N=True)
    inside = np.zeros(tumor.shape, bool)
    inside[tuple(slice(int(s), int(e)) for s, e in zip(*box_net))] = True
    total = np.bincount(components.ravel(), minlength=num + 1)
    in_box = np.bincount(components[inside], minlength=num + 1)
    outside_ml = (total - in_box) * float(voxel_ml)
    keep = (in_box < max_inside_fraction * total) & (outside_ml >= min_volume_ml)
    keep[0] = False
    out[keep[components] & ~inside] = 1
    return out


def outside_roi_tumors(
    model: StageModel,
    image: np.ndarray,
    affine: np.ndarray,
    box: tuple[Sequence[int], Sequence[int]],
    canonical: tuple | None = None,
    min_volume_ml: float = OUTSIDE_MIN_VOLUME_ML,
    max_inside_fraction: float = OUTSIDE_MAX_INSIDE_FRACTION,
) -> np.ndarray | None:
    """The tumor network over the whole volume; the tumors it finds outside ``box``.

    Args:
        model: the tumor stage (:class:`~stmt_monai.inference.stage.StageModel`).
        image: ``(X, Y, Z)`` HU in the file's voxel order; ``affine`` its RAS affine.
        box: stage 1's box in canonical voxels, ``(start, end)`` (the cascade's ROI).
        canonical: ``to_canonical(image, affine)`` if the caller has it (the cascade does).
        min_volume_ml, max_inside_fraction: see :func:`select_outside_components`.

    Returns:
        ``(X, Y, Z)`` uint8 mask on the input's grid (1 = tumor, never inside ``box``), or None
        when nothing was found.
    """
    x, _, geometry = prepare_volume(image, affine, model.spatial_size, canonical=canonical, as_tensor=False)
    net = as_numpy(model.predict(model.fingerprint.normalize(x)))
    del x
    shape = geometry.canonical_shape
    box_net = scale_box(box[0], box[1], shape, model.spatial_size)
    voxel_ml = float(np.prod(geometry.spacing * np.asarray(shape) / np.asarray(model.spatial_size))) / 1000.0
    mask = select_outside_components(net, box_net, voxel_ml, min_volume_ml, max_inside_fraction)
    if not mask.any():
        return None
    return restore_label_map(mask, geometry)
