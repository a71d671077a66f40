"""The anatomy of the synthetic cohort: the source CT and the random draws that deform it.

The source is the TotalSegmentator CT shipped in ``stmt_monai/example_data`` (3 mm, RAS, HU,
non-contrast, abdomen down to the pelvis; FLARE organ labels, no esophagus, no tumor),
read once per process by :func:`source_volume`.

**Esophagus.** The source mask has no esophagus label. So that "fully organ labelled"
means what it means on FLARE (all 13 organ classes annotated), the source is given a plausible
abdominal esophagus once, before any case is drawn (:func:`source_volume`): a soft-tissue tube of
7 mm radius from the top slice, anterior-left of the aorta, down to the stomach's cardia, drawn
only on background voxels.

The draws :func:`stmt_monai.synthetic.case.synthesize_case` combines: a smooth elastic
displacement (:func:`elastic_field`, cubic B-spline, mm), a rotation mostly about the S axis, a
field of view (upper abdomen only, or down to the pelvis) and the per-organ HU shifts of a
contrast phase (:data:`PHASE_SHIFTS_HU`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stmt_monai.io import load_image, load_label
from stmt_monai.labels import BACKGROUND, ORGAN_CLASSES
from stmt_monai.synthetic.config import AORTA, ESOPHAGUS, STOMACH, CohortConfig

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "example_data"


SOURCE_IMAGE = EXAMPLE_DATA / "abdomen_ct_3mm.nii.gz"


SOURCE_LABELS = EXAMPLE_DATA / "abdomen_ct_3mm_organs.nii.gz"




HU_MIN, HU_MAX = -1024, 3071


#: the source is non-contrast; per-organ HU added for each contrast phase (typical enhancement)
PHASE_SHIFTS_HU: dict[str, dict[str, float]] = {
    "non_contrast": {},
    "arterial": {
        "aorta": 230, "inferior_vena_cava": 30, "right_kidney": 130, "left_kidney": 130, "spleen": 70,
        "liver": 20, "pancreas": 70, "right_adrenal_gland": 30, "left_adrenal_gland": 30,
        "stomach": 20, "duodenum": 20, "esophagus": 10,
    },
    "portal_venous": {
        "aorta": 120, "inferior_vena_cava": 110, "right_kidney": 140, "left_kidney": 140, "spleen": 80,
        "liver": 60, "pancreas": 60, "right_adrenal_gland": 40, "left_adrenal_gland": 40,
        "stomach": 30, "duodenum": 30, "esophagus": 20,
    },
    "delayed": {
        "aorta": 70, "inferior_vena_cava": 70, "right_kidney": 100, "left_kidney": 100, "spleen": 50,
        "liver": 40, "pancreas": 40, "right_adrenal_gland": 30, "left_adrenal_gland": 30,
        "stomach": 20, "duodenum": 20, "esophagus": 15,
    },
}


# ----------------------------------------------------------------------------- the source
@functools.lru_cache(maxsize=1)
def source_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real CT (float32 HU), its FLARE organ mask with a synthesised esophagus, and the affine.

    Cached per process; the arrays are read-only.
    """
    image, affine = load_image(SOURCE_IMAGE)
    labels, _ = load_label(SOURCE_LABELS, image.shape, affine)
    if not (labels == ESOPHAGUS).any():
        _add_esophagus(image, labels, affine)
    image.setflags(write=False)
    labels.setflags(write=False)
    return image, labels, affine


def _add_esophagus(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, radius_mm: float = 7.0) -> None:
    """Draw an abdominal esophagus in place: a tube from the top slice down to the stomach.

    Top: 8 mm left of and 22 mm anterior to the aorta's centre in the highest slice holding both
    aorta and stomach (RAS: -x is left, +y anterior). Bottom: the stomach voxel nearest to it at
    least 15 mm lower (the cardia). Only background voxels become esophagus; they get 35 HU.
    """
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    both = [z for z in range(labels.shape[2]) if (labels[..., z] == AORTA).any() and (labels[..., z] == STOMACH).any()]
    if not both:
        return
    z_top = both[-1]
    aorta_xy = np.argwhere(labels[..., z_top] == AORTA).mean(0)
    top = np.array([aorta_xy[0] - 8.0 / spacing[0], aorta_xy[1] + 22.0 / spacing[1], labels.shape[2] - 0.5])
    stomach = np.argwhere(labels == STOMACH)
    stomach = stomach[stomach[:, 2] <= z_top - 15.0 / spacing[2]]
    if not len(stomach):
        return
    bottom = stomach[np.argmin((((stomach - top) * spacing) ** 2).sum(1))].astype(float)
    lo = np.floor(np.minimum(top, bottom) - radius_mm / spacing - 1).astype(int).clip(0)
    hi = np.minimum(np.ceil(np.maximum(top, bottom) + radius_mm / spacing + 2).astype(int), labels.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).astype(float)
    axis = (bottom - top) * spacing
    rel = (grid - top) * spacing
    t = np.clip((rel @ axis) / (axis @ axis), 0.0, 1.0)
    dist = np.linalg.norm(rel - t[..., None] * axis, axis=-1)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    tube = (dist <= radius_mm) & (labels[box] == BACKGROUND)
    labels[box][tube] = ESOPHAGUS
    image[box][tube] = 35.0


# ----------------------------------------------------------------------------- geometry
def _bspline_matrix(n: int, n_ctrl: int) -> np.ndarray:
    """``(n, n_ctrl)`` cubic B-spline weights of ``n`` evenly spread samples over ``n_ctrl`` points."""
    u = (np.arange(n) + 0.5) / n * (n_ctrl - 3)
    j = np.floor(u).astype(int)
    t = u - j
    w = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], 1) / 6.0
    matrix = np.zeros((n, n_ctrl))
    for k in range(4):
        matrix[np.arange(n), j + k] = w[:, k]
    return matrix


def elastic_field(rng: np.random.Generator, shape: Sequence[int], spacing_mm: Sequence[float], peak_mm: float, grid_mm: float) -> np.ndarray:
    """Smooth random displacement ``(3, X, Y, Z)`` in mm with peak magnitude ``peak_mm``.

    Cubic B-spline interpolation of N(0, 1) control values on a grid of about ``grid_mm``.
    """
    n_ctrl = [max(int(np.ceil(n * s / grid_mm)), 1) + 3 for n, s in zip(shape, spacing_mm)]
    ctrl = rng.normal(size=(3, *n_ctrl))
    mx, my, mz = (_bspline_matrix(n, c) for n, c in zip(shape, n_ctrl))
    field = np.einsum("ai,bj,ck,dijk->dabc", mx, my, mz, ctrl, optimize=True)
    peak = np.abs(field).max()
    return (field * (peak_mm / peak if peak > 0 else 0.0)).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation: small tilts about R and A, a larger share about S (patient turning)."""
    ax, ay, az = np.deg2rad(rng.uniform(-1, 1, 3) * max_deg * np.array([0.5, 0.5, 1.0]))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _field_of_view(rng: np.random.Generator, config: CohortConfig, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Field of view in source voxel coordinates ``(lo, hi)`` (voxel edges) and its kind."""
    shape = np.asarray(labels.shape, float)
    organ_vox = np.argwhere(np.isin(labels, ORGAN_CLASSES))
    organ_lo, organ_hi = organ_vox.min(0).astype(float), organ_vox.max(0).astype(float)
    lo, hi = np.full(3, -0.5), shape - 0.5
    # in-plane: -6 (extra air) .. +10 voxels (tighter crop) per side, never into the organs
    margins = rng.uniform(-6, 10, size=(2, 2))
    lo[:2] = np.minimum(lo[:2] + margins[:, 0], organ_lo[:2] - 3)
    hi[:2] = np.maximum(hi[:2] - margins[:, 1], organ_hi[:2] + 3)
    hi[2] -= rng.uniform(0.0, 1.5)
    if rng.random() < config.upper_abdomen_share:
        kind, lo[2] = "upper_abdomen", organ_lo[2] - rng.uniform(3, 15)
    else:
        kind, lo[2] = "abdomen_pelvis", rng.uniform(-0.5, 25.0)
    return lo, hi, kind
