"""Lesions of the synthetic cohort: where they go and what they look like.

Each lesion is a lobulated blob (an ellipsoid plus a few smaller spheres, 5..40 mm by default,
mostly hypodense) drawn into a host organ (liver, kidneys, pancreas, spleen or stomach, weighted
by :data:`HOST_WEIGHTS`) or, for a share of lesions, outside every organ in the lower abdomen
(:data:`OUTSIDE`): the case the paper names as missed by its stage 1 (sections 4.2 and 4.5).
Every lesion is labelled :data:`~stmt_monai.labels.TUMOR` in the full truth and numbered in the
case's lesion map.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from stmt_monai.labels import (
    BACKGROUND,
    KIDNEYS,
    ORGANS,
    TUMOR,
    TUMOR_HOST_ORGANS,
    label_name,
)
from stmt_monai.synthetic.config import CohortConfig

#: relative frequency of tumor host organs (liver lesions are the most common in FLARE23)
_HOST_WEIGHTS_BY_NAME = {"liver": 0.40, "right_kidney": 0.11, "left_kidney": 0.11, "pancreas": 0.12, "spleen": 0.10, "stomach": 0.16}


HOST_WEIGHTS: dict[int, float] = {h: _HOST_WEIGHTS_BY_NAME[ORGANS[h]] for h in TUMOR_HOST_ORGANS}


OUTSIDE = "outside_organs_lower_abdomen"


# ----------------------------------------------------------------------------- tumors
def _blob(rng: np.random.Generator, diameter_mm: float, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A lobulated lesion: an ellipsoid plus 2..4 smaller spheres around it.

    Returns ``(mask, offset)``: a boolean box and the voxel offset of its corner from the centre.
    """
    half = np.ceil(0.95 * diameter_mm / spacing).astype(int) + 1
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = diameter_mm / 2.0
    semi = r * rng.uniform(0.75, 1.25, 3)
    mask = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    for _ in range(rng.integers(2, 5)):
        direction = rng.normal(size=3)
        c = direction / np.linalg.norm(direction) * r * rng.uniform(0.6, 1.0)
        mask |= (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= (r * rng.uniform(0.35, 0.6)) ** 2
    mask[tuple(half)] = True  # the centre voxel always: even a 5 mm lesion on a coarse grid exists
    return mask, -half


def _place_tumor(
    rng: np.random.Generator,
    config: CohortConfig,
    image: np.ndarray,
    labels: np.ndarray,
    tumors: np.ndarray,
    spacing: np.ndarray,
    number: int,
    outside_candidates: np.ndarray | None,
) -> str | None:
    """Draw one lesion into ``image``, ``labels`` (as TUMOR) and ``tumors`` (as ``number``); its site."""
    outside = outside_candidates is not None and len(outside_candidates) and rng.random() < config.outside_tumor_share
    if outside:
        centre = outside_candidates[rng.integers(len(outside_candidates))]
        outside = labels[tuple(centre)] == BACKGROUND  # not inside an earlier lesion
    if outside:
        host, site = BACKGROUND, OUTSIDE
        surround_hu, allowed_hu = rng.uniform(25, 65), (-150.0, 150.0)
    else:
        hosts = [h for h in HOST_WEIGHTS if (labels == h).any()]
        if not hosts:
            return None
        p = np.array([HOST_WEIGHTS[h] for h in hosts])
        host = hosts[rng.choice(len(hosts), p=p / p.sum())]
        site = label_name(host)
        voxels = np.argwhere(labels == host)
        centre = voxels[rng.integers(len(voxels))]
        host_mask = labels == host
        surround_hu = float(np.median(image[host_mask & (image > -200)])) if (host_mask & (image > -200)).any() else 40.0
        allowed_hu = None
    diameter = float(rng.uniform(*config.tumor_diameter_mm))
    host_voxels = int((labels == host).sum()) if host != BACKGROUND else None
    for _ in range(5):  # shrink a lesion that would swallow more than half of its organ
        mask, offset = _blob(rng, diameter, spacing)
        start = centre + offset
        lo = np.maximum(start, 0)
        hi = np.minimum(start + mask.shape, labels.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask = mask[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))]
        lesion = mask & (labels[box] == host)
        if allowed_hu is not None:
            lesion &= (image[box] > allowed_hu[0]) & (image[box] < allowed_hu[1])
            lesion[tuple(centre - lo)] = True
        if host_voxels is None or lesion.sum() <= 0.5 * host_voxels:
            break
        diameter *= 0.7
    hypodense = rng.random() < config.hypodense_share
    delta = -rng.uniform(25, 90) if hypodense else rng.uniform(20, 70)
    target = surround_hu + delta + rng.normal(0, 8, lesion.shape)
    weight = ndimage.gaussian_filter(lesion.astype(np.float32), 0.6)
    weight[lesion] = np.maximum(weight[lesion], 0.8)
    if allowed_hu is not None:  # keep bone and gas next to an outside lesion intact
        weight *= (image[box] > allowed_hu[0]) & (image[box] < allowed_hu[1])
    image[box] = image[box] * (1 - weight) + target * weight
    labels[box][lesion] = TUMOR
    tumors[box][lesion] = number
    return site


def _lower_abdomen_candidates(image: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """Voxels for a lesion outside the organs: below and anterior to the kidneys (in the
    abdominal cavity, not the spine or back muscles), central body, soft tissue HU."""
    kidneys = np.argwhere(np.isin(labels, KIDNEYS))
    if not len(kidneys) or kidneys[:, 2].min() < 4:
        return None
    kidney_bottom = int(kidneys[:, 2].min())
    kidney_y = int(np.ceil(kidneys[:, 1].mean()))
    body = np.argwhere(image[..., :kidney_bottom] > -300)
    if not len(body):
        return None
    b_lo, b_hi = body[:, :2].min(0), body[:, :2].max(0)
    c, h = (b_lo + b_hi) / 2, (b_hi - b_lo) * 0.3
    region = np.zeros(labels.shape, bool)
    x0, x1 = int(c[0] - h[0]), int(c[0] + h[0]) + 1
    y0, y1 = int(c[1] - h[1]), int(c[1] + h[1]) + 1
    region[x0:x1, max(y0, kidney_y) : y1, :kidney_bottom] = True
    region &= (labels == BACKGROUND) & (image > -30) & (image < 120)
    found = np.argwhere(region)
    return found if len(found) else None
