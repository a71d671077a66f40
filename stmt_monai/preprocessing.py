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

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from stmt_monai.io import ImageError, load_image, load_label, write_text_atomic

#: paper section 2.1: network input sizes of the two stages
STAGE1_SIZE = (128, 128, 128)
STAGE2_SIZE = (192, 192, 192)
#: margin around the stage-1 abdomen box, in mm (covers the coarse 128^3 mask's blockiness)
ROI_MARGIN_MM = 10.0
#: stage-1 components smaller than this share of the largest one do not enter the ROI
ROI_MIN_COMPONENT_FRACTION = 0.1
#: nnU-Net's CT normalisation: clip percentiles of foreground voxels
CLIP_PERCENTILES = (0.5, 99.5)
#: voxels sampled per labelled case for the fingerprint (nnU-Net samples 10,000 per case too)
FINGERPRINT_SAMPLES_PER_CASE = 10_000


# ----------------------------------------------------------------------------- fingerprint
@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Foreground intensity statistics of a training set (HU).

    Attributes:
        lower, upper: 0.5 and 99.5 percentiles of foreground voxels (clip range).
        mean, std: global mean and sd of the foreground voxels (z-score).
        num_cases, num_voxels: how many cases and sampled voxels they come from.
    """

    lower: float
    upper: float
    mean: float
    std: float
    num_cases: int = 0
    num_voxels: int = 0

    def normalize(self, image: np.ndarray | torch.Tensor):
        """Clip to ``[lower, upper]`` and z-score: HU in, normalised intensities out."""
        if isinstance(image, torch.Tensor):
            return (image.clamp(self.lower, self.upper) - self.mean) / self.std
        return (np.clip(image, self.lower, self.upper) - self.mean) / self.std

    def scale_intensity_range(self) -> dict[str, float]:
        """The same clip + z-score as arguments of MONAI ``ScaleIntensityRange(clip=True)``."""
        return {
            "a_min": self.lower,
            "a_max": self.upper,
            "b_min": (self.lower - self.mean) / self.std,
            "b_max": (self.upper - self.mean) / self.std,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (atomically)."""
        return write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Fingerprint":
        """Read a fingerprint JSON; a missing or malformed file is an :class:`ImageError`."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except FileNotFoundError:
            raise ImageError(path, "fingerprint file not found (run scripts/prepare_data.py first)") from None
        except (ValueError, TypeError, KeyError) as err:
            raise ImageError(path, f"not a fingerprint JSON ({err})") from None


def foreground_fingerprint(
    cases: Iterable[tuple[str | os.PathLike, str | os.PathLike]],
    samples_per_case: int = FINGERPRINT_SAMPLES_PER_CASE,
    seed: int = 0,
) -> Fingerprint:
    """Compute the intensity fingerprint over labelled cases, one case in memory at a time.

    From each case, up to ``samples_per_case`` foreground voxels (label > 0) are drawn
    uniformly without replacement (seeded by ``seed`` and the case's position), and the
    percentiles, mean and sd are taken over the pooled samples, as nnU-Net does.

    Args:
        cases: ``(image_path, label_path)`` pairs.
        samples_per_case: voxels drawn per case (all foreground voxels if fewer).
        seed: sampling seed; the same cases and seed give the same fingerprint.
    """
    pooled = []
    for index, (image_path, label_path) in enumerate(cases):
        image, affine = load_image(image_path)
        labels, _ = load_label(label_path, image.shape, affine)
        values = image[labels > 0]
        if values.size > samples_per_case:
            rng = np.random.default_rng([seed, index])
            values = rng.choice(values, samples_per_case, replace=False)
        pooled.append(values.astype(np.float64))
    if not pooled or sum(v.size for v in pooled) == 0:
        raise ValueError("no foreground voxels: the fingerprint needs labelled cases")
    values = np.concatenate(pooled)
    lower, upper = np.percentile(values, CLIP_PERCENTILES)
    return Fingerprint(
        lower=float(lower),
        upper=float(upper),
        mean=float(values.mean()),
        std=float(max(values.std(), 1e-8)),
        num_cases=len(pooled),
        num_voxels=int(values.size),
    )


# ----------------------------------------------------------------------------- geometry
@dataclasses.dataclass
class CaseGeometry:
    """What preprocessing did to one case, so that :func:`restore_label_map` can undo it.

    Attributes:
        shape: the input file's array shape ``(X, Y, Z)``.
        affine: the input file's voxel-to-world RAS affine.
        ornt: nibabel orientation transform from the file's voxel order to canonical RAS order.
        roi_start, roi_end: crop box in canonical voxels (``[start, end)``); the whole volume
            when there was no crop.
        network_size: spatial size the crop was resampled to.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray
    roi_start: tuple[int, int, int]
    roi_end: tuple[int, int, int]
    network_size: tuple[int, int, int]

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in orientations.apply_orientation(np.empty(self.shape, bool), self.ornt).shape)

    @property
    def canonical_affine(self) -> np.ndarray:
        return self.affine @ orientations.inv_ornt_aff(self.ornt, self.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Canonical voxel size in mm."""
        return np.sqrt((self.canonical_affine[:3, :3] ** 2).sum(0))

    @property
    def roi_shape(self) -> tuple[int, int, int]:
        return tuple(int(e - s) for s, e in zip(self.roi_start, self.roi_end))

    def roi_world(self) -> dict[str, list[float]]:
        """The crop box's opposite corners in RAS world mm (voxel corners, not centres)."""
        aff = self.canonical_affine
        corners = [np.asarray(self.roi_start, float) - 0.5, np.asarray(self.roi_end, float) - 0.5]
        world = [(aff[:3, :3] @ c + aff[:3, 3]).tolist() for c in corners]
        return {"start_mm": world[0], "end_mm": world[1]}

    def to_json(self) -> str:
        return json.dumps(
            {
                "shape": list(self.shape),
                "affine": np.asarray(self.affine).tolist(),
                "ornt": np.asarray(self.ornt).tolist(),
                "roi_start": list(self.roi_start),
                "roi_end": list(self.roi_end),
                "network_size": list(self.network_size),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "CaseGeometry":
        d = json.loads(text)
        return cls(
            shape=tuple(d["shape"]),
            affine=np.asarray(d["affine"]),
            ornt=np.asarray(d["ornt"]),
            roi_start=tuple(d["roi_start"]),
            roi_end=tuple(d["roi_end"]),
            network_size=tuple(d["network_size"]),
        )


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder a volume's axes and flips so voxel axes run to R, A, S.

    Returns:
        ``(canonical_array, canonical_affine, ornt)``; ``ornt`` goes to :class:`CaseGeometry`.
    """
    ornt = orientations.io_orientation(affine)
    canonical = orientations.apply_orientation(array, ornt)
    return np.ascontiguousarray(canonical), affine @ orientations.inv_ornt_aff(ornt, array.shape), ornt


def from_canonical(array: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back to the file's voxel order and shape."""
    # geometry.ornt maps file -> canonical; its inverse maps canonical -> file
    inverse = _invert_ornt(geometry.ornt)
    out = orientations.apply_orientation(array, inverse)
    assert out.shape == tuple(geometry.shape), (out.shape, geometry.shape)
    return np.ascontiguousarray(out)


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """Orientation transform undoing ``ornt`` (``apply(apply(a, ornt), inv) == a``)."""
    ornt = np.asarray(ornt)
    inverse = np.zeros_like(ornt)
    for in_axis, (out_axis, flip) in enumerate(ornt):
        inverse[int(out_axis)] = (in_axis, flip)
    return inverse


def resize(volume: np.ndarray | torch.Tensor, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resample a ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) volume to a fixed spatial size.

    ``mode="trilinear"`` for images (align_corners=False), ``"nearest"`` for label maps
    (``nearest-exact``: voxel centres map to voxel centres).
    """
    t = torch.as_tensor(volume)
    squeeze = t.ndim == 3
    if squeeze:
        t = t[None]
    size = tuple(int(s) for s in size)
    if tuple(t.shape[1:]) != size:
        if mode == "nearest":
            t = F.interpolate(t[None].float(), size=size, mode="nearest-exact")[0].to(t.dtype)
        else:
            t = F.interpolate(t[None].float(), size=size, mode=mode, align_corners=False)[0]
    return t[0] if squeeze else t


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
    mask = np.asarray(mask_net.detach().cpu() if isinstance(mask_net, torch.Tensor) else mask_net)
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


def crop(volume: np.ndarray, start: Sequence[int], end: Sequence[int]) -> np.ndarray:
    """``volume[..., s0:e0, s1:e1, s2:e2]`` (leading channel axes kept)."""
    return volume[(Ellipsis, *(slice(s, e) for s, e in zip(start, end)))]


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


def restore_label_map(labels: np.ndarray | torch.Tensor, geometry: CaseGeometry) -> np.ndarray:
    """Inverse of :func:`prepare_volume` for a label map.

    Args:
        labels: ``(X', Y', Z')`` (or ``(1, X', Y', Z')``) integer labels at network resolution.
        geometry: the case's :class:`CaseGeometry`.

    Returns:
        ``(X, Y, Z)`` uint8 labels in the input file's voxel order: nearest-neighbour resampled
        into the crop, zero outside it; write it with ``geometry.affine``.
    """
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    t = t.reshape(t.shape[-3:]).to(torch.uint8)
    in_crop = resize(t, geometry.roi_shape, "nearest").numpy()
    full = np.zeros(geometry.canonical_shape, np.uint8)
    full[tuple(slice(s, e) for s, e in zip(geometry.roi_start, geometry.roi_end))] = in_crop
    return from_canonical(full, geometry)


def orientation_codes(affine: np.ndarray) -> str:
    """Axis codes of an affine, e.g. ``"RAS"`` or ``"LPS"``."""
    return "".join(nib.aff2axcodes(affine))
