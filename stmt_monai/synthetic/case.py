"""One synthetic FLARE23-like case, drawn from a seed (:func:`synthesize_case`).

- anatomy: a random affine (rotation, anisotropic scaling, translation) and a smooth elastic
  deformation (:mod:`stmt_monai.synthetic.anatomy`), applied to image and mask in one resampling
  (``scipy.ndimage.map_coordinates``, order 1 for HU, order 0 for labels) of the source in world
  coordinates, so the output grid (field of view, spacing) is independent of the source's;
- field of view: some cases upper abdomen only, some down to the pelvis; random in-plane margins
  (extra air or a tighter crop that never cuts an organ); output in-plane spacing follows from
  ``size`` voxels across the field of view; some cases get an anisotropic slice spacing;
- intensity: a contrast phase per case (per-organ HU shifts), global offset, blur and noise;
- tumors: 0..3 lesions (:mod:`stmt_monai.synthetic.tumors`), all labelled
  :data:`~stmt_monai.labels.TUMOR`.

Every case's full truth holds all 13 organs (unless a deformation squeezes a tiny one out of a
coarse grid; the annotation set is always taken from what is actually present). Images are
int16 HU, labels uint8, affines 4 x 4 RAS in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from stmt_monai.labels import BACKGROUND, ORGAN_CLASSES
from stmt_monai.synthetic.anatomy import (
    HU_MAX,
    HU_MIN,
    PHASE_SHIFTS_HU,
    _field_of_view,
    _rotation,
    elastic_field,
    source_volume,
)
from stmt_monai.synthetic.config import _BY_NAME, CohortConfig, SyntheticCase
from stmt_monai.synthetic.tumors import _lower_abdomen_candidates, _place_tumor


# ----------------------------------------------------------------------------- one case
def synthesize_case(seed: int | Sequence[int], config: CohortConfig = CohortConfig(), num_tumors: int | None = None) -> SyntheticCase:
    """Draw one synthetic case from ``seed``.

    Args:
        seed: anything ``numpy.random.default_rng`` accepts (an int or a sequence of ints).
        config: sizes and ranges (:class:`CohortConfig`).
        num_tumors: lesions to draw (0..3); default drawn from ``config.tumor_count_probs``.

    Returns:
        a :class:`SyntheticCase` (image int16 HU, full-truth labels uint8, RAS affine, lesion map).
    """
    rng = np.random.default_rng(seed)
    src_image, src_labels, src_affine = source_volume()

    # --- anatomy: the output shows the field-of-view box B of the source, rotated by R, scaled
    # by S about B's centre c and moved by t: world point p samples the source at
    # c + M^-1 (p - c - t) + d(p), M = R S, d the elastic field
    lo, hi, fov = _field_of_view(rng, config, src_labels)
    corners = [src_affine[:3, :3] @ v + src_affine[:3, 3] for v in (lo, hi)]
    lo_w, hi_w = np.minimum(*corners), np.maximum(*corners)
    centre = (lo_w + hi_w) / 2
    scale = rng.uniform(*config.scale_range, 3)
    inv_m = np.linalg.inv(_rotation(rng, config.max_rotation_deg) @ np.diag(scale))
    shift = rng.uniform(-1, 1, 3) * config.max_translation_mm
    # the output box is B scaled and moved with the anatomy (rotation aside), so what the field
    # of view holds (e.g. the top slice through the esophagus) stays in it
    out_lo = centre + shift + scale * (lo_w - centre)
    extent = scale * (hi_w - lo_w)

    # --- output grid: ``size`` voxels across the larger in-plane axis; slice spacing as drawn
    s_xy = max(extent[0], extent[1]) / config.size
    s_z = rng.uniform(*config.z_spacing_mm) if rng.random() < config.anisotropic_share else s_xy
    n_z = int(np.clip(round(extent[2] / s_z), 8, round(1.5 * config.size)))
    shape = (max(int(round(extent[0] / s_xy)), 8), max(int(round(extent[1] / s_xy)), 8), n_z)
    spacing = np.array([extent[0] / shape[0], extent[1] / shape[1], extent[2] / n_z])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = np.round(out_lo + spacing / 2, 4)  # first voxel centre, world mm

    src_inv = np.linalg.inv(src_affine)
    # output voxel -> source voxel, linear part and offset
    lin = src_inv[:3, :3] @ inv_m @ affine[:3, :3]
    off = src_inv[:3, :3] @ (inv_m @ (affine[:3, 3] - centre - shift) + centre) + src_inv[:3, 3]
    disp = elastic_field(rng, shape, spacing, rng.uniform(*config.elastic_mm), config.elastic_grid_mm)
    grid = np.ogrid[: shape[0], : shape[1], : shape[2]]
    coords = np.empty((3, *shape), np.float32)
    for i in range(3):
        coords[i] = lin[i, 0] * grid[0] + lin[i, 1] * grid[1] + lin[i, 2] * grid[2] + off[i]
        for j in range(3):  # the displacement (mm) in source voxels; the source is axis-aligned
            if src_inv[i, j] != 0:
                coords[i] += src_inv[i, j] * disp[j]
    image = ndimage.map_coordinates(src_image, coords, order=1, mode="nearest", output=np.float32)
    labels = ndimage.map_coordinates(src_labels, coords, order=0, mode="nearest").astype(np.uint8)
    # beyond the source's in-plane edges is air (above / below it the nearest slice continues)
    outside = np.zeros(shape, bool)
    for i in range(2):
        outside |= (coords[i] < -0.5) | (coords[i] > src_image.shape[i] - 0.5)
    image[outside] = HU_MIN
    labels[outside] = BACKGROUND
    del coords, disp

    # --- contrast phase: per-organ HU shift on soft tissue (not on gas), soft organ edges
    phase = str(rng.choice(list(PHASE_SHIFTS_HU)))
    strength = rng.uniform(0.7, 1.2)
    lut = np.zeros(256, np.float32)
    for name, hu in PHASE_SHIFTS_HU[phase].items():
        lut[_BY_NAME[name]] = hu * strength
    lut[list(ORGAN_CLASSES)] += rng.normal(0, 8, len(ORGAN_CLASSES))
    shift_map = ndimage.gaussian_filter(lut[labels], 0.6)
    image += shift_map * np.clip((image + 200.0) / 150.0, 0.0, 1.0) + rng.normal(0, 8)

    # --- tumors
    if num_tumors is None:
        probs = np.asarray(config.tumor_count_probs, float)
        num_tumors = int(rng.choice(len(probs), p=probs / probs.sum()))
    tumors = np.zeros(shape, np.uint8)
    sites: list[str] = []
    outside_candidates = _lower_abdomen_candidates(image, labels) if num_tumors else None
    for number in range(1, num_tumors + 1):
        site = _place_tumor(rng, config, image, labels, tumors, spacing, number, outside_candidates)
        if site is not None:
            sites.append(site)

    # --- acquisition: blur and noise
    sigma = rng.uniform(*config.blur_voxels)
    if sigma > 0.05:
        image = ndimage.gaussian_filter(image, sigma)
    image += rng.normal(0, rng.uniform(*config.noise_hu), shape).astype(np.float32)
    image = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)

    info = {
        "fov": fov,
        "shape": [int(s) for s in shape],
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "phase": phase,
        "num_tumors": len(sites),
        "tumor_sites": sites,
        # lesion volumes as drawn (a later lesion never overwrites an earlier one), mm^3
        "tumor_volumes_mm3": [round(float((tumors == k).sum() * np.prod(spacing)), 1) for k in range(1, len(sites) + 1)],
    }
    return SyntheticCase(image, labels, affine, tumors, sites, info)


def generate_case(seed: int | Sequence[int], config: CohortConfig = CohortConfig(), num_tumors: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, full_labels, affine)`` of :func:`synthesize_case`: int16 HU, uint8 labels, RAS affine."""
    case = synthesize_case(seed, config, num_tumors)
    return case.image, case.labels, case.affine
