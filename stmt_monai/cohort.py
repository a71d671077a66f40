"""A synthetic FLARE23-like cohort made from one real abdominal CT and its organ mask.

The source is the TotalSegmentator CT shipped in ``stmt_monai/example_data`` (3 mm, RAS, HU,
non-contrast, abdomen down to the pelvis; FLARE organ labels, no esophagus, no tumor). Every
case is drawn from a seed (:func:`synthesize_case`):

- anatomy: a random affine (rotation, anisotropic scaling, translation) and a smooth elastic
  deformation (cubic B-spline field), applied to image and mask in one resampling
  (``scipy.ndimage.map_coordinates``, order 1 for HU, order 0 for labels) of the source in world
  coordinates, so the output grid (field of view, spacing) is independent of the source's;
- field of view: some cases upper abdomen only, some down to the pelvis; random in-plane margins
  (extra air or a tighter crop that never cuts an organ); output in-plane spacing follows from
  ``size`` voxels across the field of view; some cases get an anisotropic slice spacing;
- intensity: a contrast phase per case (per-organ HU shifts), global offset, blur and noise;
- tumors: 0..3 lobulated lesions (5..40 mm, mostly hypodense) in liver, kidneys, pancreas,
  spleen or stomach, and some outside every organ in the lower abdomen (the paper's hard case),
  all labelled :data:`~stmt_monai.labels.TUMOR`.

**Esophagus.** The source mask has no esophagus label. So that "fully organ labelled"
means what it means on FLARE (all 13 organ classes annotated), the source is given a plausible
abdominal esophagus once, before any case is drawn (:func:`source_volume`): a soft-tissue tube of
7 mm radius from the top slice, anterior-left of the aorta, down to the stomach's cardia, drawn
only on background voxels. Every case's full truth therefore holds all 13 organs (unless a
deformation squeezes a tiny one out of a coarse grid; the annotation set is always taken from
what is actually present, so policy and files agree).

**Annotation policy** (:func:`make_cohort`), as FLARE23 pools datasets: of the labelled cases a
small share is fully organ labelled, many are partial (single-organ datasets: liver only,
kidneys only (both kidneys), pancreas only, spleen only; and random organ subsets), some have no
organ label; most cases carry tumor annotations, some of those with a second tumor left
unannotated (background in the label, tumor in the hidden truth); plus an unlabelled pool.
Partial labels are always a subset of the hidden full truth (same value wherever they are > 0).

Output (FLARE23 layout)::

    imagesTr/<name>_0000.nii.gz  labelsTr/<name>.nii.gz   labelled training cases (partial labels)
    unlabeled/<name>_0000.nii.gz                           the unlabelled pool
    validation/images, validation/labels                   fully labelled (all organs and tumors)
    test/images, test/labels                               fully labelled
    truth/<name>.nii.gz                                    hidden full truth of every training case
    policy.json                                            each case's category and the counts

Images are int16 HU, labels uint8; files are byte-for-byte reproducible from the seed
(nibabel writes gzip with mtime 0 and no file name).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from stmt_monai.io import load_image, load_label, save_label_map, save_nifti, write_text_atomic
from stmt_monai.labels import BACKGROUND, KIDNEYS, ORGAN_CLASSES, ORGANS, TUMOR, TUMOR_HOST_ORGANS, label_name
from stmt_monai.triage import LAYOUT, category_counts

EXAMPLE_DATA = Path(__file__).resolve().parent / "example_data"
SOURCE_IMAGE = EXAMPLE_DATA / "abdomen_ct_3mm.nii.gz"
SOURCE_LABELS = EXAMPLE_DATA / "abdomen_ct_3mm_organs.nii.gz"

_BY_NAME = {name: label for label, name in ORGANS.items()}
LIVER, SPLEEN, PANCREAS = _BY_NAME["liver"], _BY_NAME["spleen"], _BY_NAME["pancreas"]
AORTA, STOMACH, ESOPHAGUS = _BY_NAME["aorta"], _BY_NAME["stomach"], _BY_NAME["esophagus"]

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
#: relative frequency of tumor host organs (liver lesions are the most common in FLARE23)
_HOST_WEIGHTS_BY_NAME = {"liver": 0.40, "right_kidney": 0.11, "left_kidney": 0.11, "pancreas": 0.12, "spleen": 0.10, "stomach": 0.16}
HOST_WEIGHTS: dict[int, float] = {h: _HOST_WEIGHTS_BY_NAME[ORGANS[h]] for h in TUMOR_HOST_ORGANS}
OUTSIDE = "outside_organs_lower_abdomen"

#: annotation kinds of labelled cases and the organ set each annotates (None: drawn per case)
ANNOTATION_KINDS: dict[str, tuple[int, ...] | None] = {
    "fully": ORGAN_CLASSES,
    "liver_only": (LIVER,),
    "kidneys_only": KIDNEYS,
    "pancreas_only": (PANCREAS,),
    "spleen_only": (SPLEEN,),
    "random_subset": None,
    "none": (),
}


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """How many cases, how large, and the annotation policy of a synthetic cohort.

    Args:
        num_labelled, num_unlabelled, num_validation, num_test: cases per split.
        size: voxels across the larger in-plane axis of the output grid (the other axes follow the
            field of view; the slice axis is capped at ``1.5 * size``).
        anisotropic_share: share of cases whose slice spacing differs from the in-plane spacing.
        z_spacing_mm: range of that slice spacing (mm).
        upper_abdomen_share: share of cases whose field of view stops above the pelvis.
        fully_share, liver_only_share, kidneys_only_share, pancreas_only_share, spleen_only_share,
            random_subset_share, no_organ_share: annotation policy of the labelled cases
            (normalised to sum 1; counts by largest remainder, so they are exact).
        tumor_annotated_share: share of labelled cases with tumor annotations (each has >= 1 tumor).
        unannotated_tumor_share: share of the tumor-annotated cases that hold a second tumor which
            is left unannotated.
        tumor_count_probs: probabilities of 0, 1, 2, 3 lesions in cases without tumor annotation
            (unlabelled, validation, test, not tumor annotated).
        outside_tumor_share: share of lesions placed outside the organs in the lower abdomen
            (when the field of view reaches below the kidneys).
        tumor_diameter_mm: lesion diameter range (uniform), mm.
        hypodense_share: share of lesions darker than their host organ.
        max_rotation_deg, scale_range, max_translation_mm: random affine (rotation about the
            field of view's centre, anisotropic scaling, and a shift of the patient in world
            coordinates, which moves the output grid's origin with it).
        elastic_mm, elastic_grid_mm: peak displacement range and control-point spacing of the
            elastic field.
        noise_hu, blur_voxels: ranges of Gaussian noise sd (HU) and blur sigma (voxels).
    """

    num_labelled: int = 60
    num_unlabelled: int = 24
    num_validation: int = 8
    num_test: int = 8
    size: int = 96
    anisotropic_share: float = 0.3
    z_spacing_mm: tuple[float, float] = (2.5, 5.0)
    upper_abdomen_share: float = 0.35
    fully_share: float = 0.10
    liver_only_share: float = 0.10
    kidneys_only_share: float = 0.10
    pancreas_only_share: float = 0.08
    spleen_only_share: float = 0.07
    random_subset_share: float = 0.35
    no_organ_share: float = 0.20
    tumor_annotated_share: float = 0.70
    unannotated_tumor_share: float = 0.20
    tumor_count_probs: tuple[float, float, float, float] = (0.25, 0.40, 0.25, 0.10)
    outside_tumor_share: float = 0.15
    tumor_diameter_mm: tuple[float, float] = (5.0, 40.0)
    hypodense_share: float = 0.8
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.88, 1.12)
    max_translation_mm: float = 10.0
    elastic_mm: tuple[float, float] = (0.0, 8.0)
    elastic_grid_mm: float = 60.0
    noise_hu: tuple[float, float] = (0.0, 25.0)
    blur_voxels: tuple[float, float] = (0.0, 0.8)

    def annotation_shares(self) -> dict[str, float]:
        """Annotation kind -> share of labelled cases (keys of :data:`ANNOTATION_KINDS`)."""
        shares = {
            "fully": self.fully_share,
            "liver_only": self.liver_only_share,
            "kidneys_only": self.kidneys_only_share,
            "pancreas_only": self.pancreas_only_share,
            "spleen_only": self.spleen_only_share,
            "random_subset": self.random_subset_share,
            "none": self.no_organ_share,
        }
        total = sum(shares.values())
        if total <= 0 or min(shares.values()) < 0:
            raise ValueError(f"annotation shares must be >= 0 and not all 0, got {shares}")
        return {k: v / total for k, v in shares.items()}


@dataclasses.dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
        image: ``(X, Y, Z)`` int16 HU.
        labels: ``(X, Y, Z)`` uint8 full truth (the 13 organs, every lesion :data:`TUMOR`).
        affine: 4 x 4 voxel-to-world RAS affine (mm).
        tumors: ``(X, Y, Z)`` uint8 tumor instance map (0 none, 1..n lesion number).
        tumor_sites: host organ name per lesion (or ``"outside_organs_lower_abdomen"``).
        info: how the case was drawn (field of view, shape, spacing, phase, lesion sites and
            volumes), JSON-ready.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    tumors: np.ndarray
    tumor_sites: list[str]
    info: dict


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


def generate_case(seed: int | Sequence[int], config: CohortConfig = CohortConfig(), num_tumors: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, full_labels, affine)`` of :func:`synthesize_case`: int16 HU, uint8 labels, RAS affine."""
    case = synthesize_case(seed, config, num_tumors)
    return case.image, case.labels, case.affine


# ----------------------------------------------------------------------------- the cohort
def _largest_remainder(shares: dict[str, float], n: int) -> dict[str, int]:
    """Integer counts summing to ``n`` closest to ``shares * n``."""
    raw = {k: v * n for k, v in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], list(raw).index(k)))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def annotation_plan(config: CohortConfig, seed: int) -> list[dict]:
    """The policy of every case before drawing it: split, name, annotation kind, tumor plan.

    Labelled cases get exact annotation-kind counts (largest remainder, at least one fully
    labelled case when there are two or more), shuffled; tumor-annotated ones get 1..3 lesions,
    a share of those a second unannotated lesion (2..3 lesions, the last left out).
    """
    rng = np.random.default_rng([seed, 0])
    plan: list[dict] = []
    n_lab = config.num_labelled
    counts = _largest_remainder(config.annotation_shares(), n_lab)
    if n_lab >= 2 and counts["fully"] == 0:
        donor = max(counts, key=counts.get)
        counts[donor] -= 1
        counts["fully"] += 1
    kinds = [k for k, c in counts.items() for _ in range(c)]
    kinds = [kinds[i] for i in rng.permutation(n_lab)]
    n_tumor = int(round(config.tumor_annotated_share * n_lab))
    annotated = set(rng.permutation(n_lab)[:n_tumor].tolist())
    n_second = int(round(config.unannotated_tumor_share * n_tumor))
    second = set(sorted(annotated)[i] for i in rng.permutation(len(annotated))[:n_second])
    probs = np.asarray(config.tumor_count_probs, float)
    probs = probs / probs.sum()
    for i in range(n_lab):
        kind = kinds[i]
        subset = ANNOTATION_KINDS[kind]
        if subset is None:  # random subset: 2..12 organs
            subset = tuple(sorted(rng.choice(ORGAN_CLASSES, rng.integers(2, len(ORGAN_CLASSES)), replace=False).tolist()))
        if i in second:
            n_t, n_annot = int(rng.integers(2, 4)), None
        elif i in annotated:
            n_t = int(rng.choice([1, 2, 3], p=probs[1:] / probs[1:].sum()))
            n_annot = n_t
        else:
            n_t, n_annot = int(rng.choice(len(probs), p=probs)), 0
        if n_annot is None:
            n_annot = n_t - 1
        plan.append({"split": "labelled", "annotation": kind, "annotate_organs": list(subset), "num_tumors": n_t, "annotate_tumors": n_annot})
    for split, n in (("unlabelled", config.num_unlabelled), ("validation", config.num_validation), ("test", config.num_test)):
        for _ in range(n):
            plan.append({"split": split, "num_tumors": int(rng.choice(len(probs), p=probs))})
    train = 0
    per_split = {"validation": 0, "test": 0}
    for index, entry in enumerate(plan):
        entry["seed"] = [int(seed), 1, index]
        if entry["split"] in ("labelled", "unlabelled"):
            train += 1
            entry["name"] = f"FLARE23Syn_{train:04d}"
        else:
            per_split[entry["split"]] += 1
            prefix = "FLARE23SynVal" if entry["split"] == "validation" else "FLARE23SynTs"
            entry["name"] = f"{prefix}_{per_split[entry['split']]:04d}"
    return plan


def _make_one(out_dir: str, config: CohortConfig, entry: dict) -> dict:
    """Generate one planned case, write its files, return its policy record."""
    case = synthesize_case(entry["seed"], config, entry["num_tumors"])
    out = Path(out_dir)
    name, split = entry["name"], entry["split"]
    paths = _case_paths(name, split)
    record = {"split": split, **case.info}
    present = sorted(int(v) for v in np.unique(case.labels) if v in ORGANS)
    record["organs_in_truth"] = present
    if split == "labelled":
        organs = sorted(set(entry["annotate_organs"]) & set(present))
        annotated_lesions = np.arange(1, entry["annotate_tumors"] + 1)
        keep = np.isin(case.labels, organs) | ((case.labels == TUMOR) & np.isin(case.tumors, annotated_lesions))
        partial = np.where(keep, case.labels, BACKGROUND).astype(np.uint8)
        tumor_annotated = bool((partial == TUMOR).any())
        record.update(
            annotation=entry["annotation"],
            organs=organs,
            tumor_annotated=tumor_annotated,
            unannotated_tumor=bool(((case.labels == TUMOR) & (partial != TUMOR)).any()),
        )
        save_nifti(out / paths["image"], case.image, case.affine, dtype=np.int16)
        save_label_map(out / paths["label"], partial, case.affine)
        save_label_map(out / paths["truth"], case.labels, case.affine)
    elif split == "unlabelled":
        record.update(annotation="unlabelled", organs=[], tumor_annotated=False, unannotated_tumor=bool(case.info["num_tumors"]))
        save_nifti(out / paths["image"], case.image, case.affine, dtype=np.int16)
        save_label_map(out / paths["truth"], case.labels, case.affine)
    else:
        record.update(annotation="full_truth", organs=present, tumor_annotated=bool(case.info["num_tumors"]), unannotated_tumor=False)
        save_nifti(out / paths["image"], case.image, case.affine, dtype=np.int16)
        save_label_map(out / paths["label"], case.labels, case.affine)
    return record


def make_cohort(out_dir: str | os.PathLike, config: CohortConfig = CohortConfig(), seed: int = 0, workers: int = 1, progress: bool = True) -> dict:
    """Generate a cohort in FLARE23 layout under ``out_dir`` (see the module docstring).

    Args:
        out_dir: output folder (created); synthetic case files of an earlier run there that this
            cohort does not have are deleted, so the folder holds exactly this cohort.
        config: counts, size and policy (:class:`CohortConfig`).
        seed: the same seed and config give the same files, byte for byte.
        workers: processes generating cases in parallel (the output does not depend on it).
        progress: show a tqdm progress bar.

    Returns:
        the policy written to ``out_dir/policy.json``: ``{"seed", "config", "counts", "cases"}``,
        ``cases`` mapping each name to its split, annotation kind, annotated organ set
        (``organs``), ``tumor_annotated``, ``unannotated_tumor``, lesion sites, field of view,
        spacing and phase; ``counts`` in the format of :func:`stmt_monai.triage.category_counts`.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = annotation_plan(config, seed)
    bar = tqdm(total=len(plan), desc="cohort", unit="case", disable=not progress)
    records: dict[str, dict] = {}
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_make_one, str(out), config, entry) for entry in plan]
            for entry, future in zip(plan, futures):
                records[entry["name"]] = future.result()
                bar.update()
    else:
        for entry in plan:
            records[entry["name"]] = _make_one(str(out), config, entry)
            bar.update()
    bar.close()
    _remove_stale_cases(out, records)
    training = [
        {"organs": r["organs"], "tumor": r["tumor_annotated"], "labelled": r["split"] == "labelled"}
        for r in records.values()
        if r["split"] in ("labelled", "unlabelled")
    ]
    counts = category_counts(training)
    counts["validation"] = config.num_validation
    counts["test"] = config.num_test
    policy = {"seed": int(seed), "config": dataclasses.asdict(config), "counts": counts, "cases": records}
    write_text_atomic(out / "policy.json", json.dumps(policy, indent=1) + "\n")
    return policy


def _case_paths(name: str, split: str) -> dict[str, str]:
    """Relative paths of a case's files by kind (``image``, ``label``, ``truth``) in the layout."""
    if split == "labelled":
        return {
            "image": f"{LAYOUT['images']}/{name}_0000.nii.gz",
            "label": f"{LAYOUT['labels']}/{name}.nii.gz",
            "truth": f"{LAYOUT['truth']}/{name}.nii.gz",
        }
    if split == "unlabelled":
        return {"image": f"{LAYOUT['unlabelled']}/{name}_0000.nii.gz", "truth": f"{LAYOUT['truth']}/{name}.nii.gz"}
    return {"image": f"{LAYOUT[split + '_images']}/{name}_0000.nii.gz", "label": f"{LAYOUT[split + '_labels']}/{name}.nii.gz"}


def _remove_stale_cases(out: Path, records: Mapping[str, Mapping]) -> None:
    """Delete synthetic case files of an earlier run in ``out`` that are not files of this cohort."""
    keep = {out / p for name, r in records.items() for p in _case_paths(name, r["split"]).values()}
    for folder in set(LAYOUT.values()):
        for path in (out / folder).glob("FLARE23Syn*.nii.gz"):
            if path not in keep:
                path.unlink()


def example_cases(policy: Mapping, n: int = 3) -> list[str]:
    """Names of ``n`` training cases that show the cohort's variety, for a preview figure.

    One case each, in this order: a lesion outside the organs, an upper-abdomen field of view,
    an anisotropic spacing, any lesion; within each, the case with the largest lesion (so the
    picture shows one).
    """
    cases = {k: v for k, v in sorted(policy["cases"].items()) if v["split"] in ("labelled", "unlabelled")}
    tests = [
        lambda r: OUTSIDE in r["tumor_sites"],
        lambda r: r["fov"] == "upper_abdomen",
        lambda r: abs(r["spacing_mm"][2] - r["spacing_mm"][0]) > 0.3,
        lambda r: True,
    ]
    chosen: list[str] = []
    for test in tests + [lambda r: True] * n:
        candidates = [name for name, r in cases.items() if name not in chosen and test(r)]
        if len(chosen) < n and candidates:
            chosen.append(max(candidates, key=lambda name: max(cases[name]["tumor_volumes_mm3"], default=0.0)))
    return chosen


def case_files(cohort_dir: str | os.PathLike, name: str, record: Mapping) -> tuple[Path, Path]:
    """``(image, full_truth)`` paths of a case of a cohort written by :func:`make_cohort`."""
    paths = _case_paths(name, record["split"])
    return Path(cohort_dir) / paths["image"], Path(cohort_dir) / paths.get("truth", paths.get("label"))


def cohort_preview(cohort_dir: str | os.PathLike, path: str | os.PathLike, names: Sequence[str] | None = None, n: int = 3) -> Path:
    """PNG of a few cases of a written cohort (image with its full truth), one row each.

    Args:
        cohort_dir: folder written by :func:`make_cohort` (reads ``policy.json``).
        path: output PNG (e.g. ``docs/cohort_examples.png``).
        names: cases to show; default :func:`example_cases` (``n`` of them).
    """
    from stmt_monai.visualize import overlay_grid

    policy = json.loads((Path(cohort_dir) / "policy.json").read_text())
    rows = []
    for name in names or example_cases(policy, n):
        record = policy["cases"][name]
        image_path, truth_path = case_files(cohort_dir, name, record)
        image, affine = load_image(image_path)
        labels, _ = load_label(truth_path, image.shape, affine)
        spacing = " x ".join(f"{s:.1f}" for s in record["spacing_mm"])
        sites = ", ".join(s.replace("outside_organs_lower_abdomen", "outside organs") for s in record["tumor_sites"]) or "none"
        title = (
            f"{name} ({record['split']}, {record['annotation']}, {len(record['organs'])} organs annotated)\n"
            f"{record['fov'].replace('_', ' ')}, {record['phase'].replace('_', ' ')}, {spacing} mm\nlesions: {sites}"
        )
        rows.append({"image": image, "labels": labels, "affine": affine, "title": title})
    return overlay_grid(rows, path)
