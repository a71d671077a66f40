"""Geometry of the one preprocessing path and its exact inverse (paper section 2.1 and Fig. 2c).

- :func:`to_canonical` / :func:`from_canonical`: a volume in canonical RAS voxel order and back,
  so a file in any orientation gives the same network input;
- :func:`crop`, :func:`resize`: the region-of-interest crop and the resampling to a fixed network
  size (trilinear for images, nearest for labels);
- :class:`CaseGeometry`: what was done to one case (input shape and affine, orientation, crop box,
  network size);
- :func:`restore_label_map`: the inverse for a label map, "restored to the size of the original
  data by resampling and zero padding": nearest-neighbour back into the crop, zero padding to the
  full grid, in the input file's own voxel order, so it is written with the input's exact shape
  and affine.

Arrays are ``(X, Y, Z)`` (or ``(C, X, Y, Z)``) in voxels; affines are 4 x 4 voxel-to-RAS in mm.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel import orientations

from stmt_monai.arrays import as_numpy

if TYPE_CHECKING:  # annotations only: the CPU path never imports torch (stmt_monai.arrays)
    import torch


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


def to_canonical(array: np.ndarray, affine: np.ndarray, contiguous: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder a volume's axes and flips so voxel axes run to R, A, S.

    Args:
        array: ``(X, Y, Z)`` volume in its file's voxel order.
        affine: its voxel-to-world RAS affine.
        contiguous: copy into a C-contiguous array; ``False`` returns a view of ``array``
            (transposed and flipped, no copy: the cascade's path, whose numpy resampling
            :func:`resize_linear` reads any strides; a 512 x 512 x 600 CT copied costs ~1 s and 0.6 GB).

    Returns:
        ``(canonical_array, canonical_affine, ornt)``; ``ornt`` goes to :class:`CaseGeometry`.
    """
    ornt = orientations.io_orientation(affine)
    canonical = orientations.apply_orientation(array, ornt)
    if contiguous:
        canonical = np.ascontiguousarray(canonical)
    return canonical, affine @ orientations.inv_ornt_aff(ornt, array.shape), ornt


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
    import torch
    import torch.nn.functional as F

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


def canonical_tensor(array: np.ndarray, ornt: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """The volume in canonical RAS order as a tensor on ``device``, in its own dtype.

    Uploaded once in its memory order (no host-side copy for a C- or Fortran-ordered array, e.g.
    the int16 voxels of a NIfTI file), then flipped and permuted on the device as
    :func:`to_canonical` does on the host: on a GPU the cascade crops and resamples there and
    the host never makes a float32 or reoriented copy of the volume.

    Args:
        array: ``(X, Y, Z)`` volume in its file's voxel order.
        ornt: ``to_canonical``'s orientation transform (``nibabel.orientations.io_orientation``).
        device: torch device.
    """
    import torch

    a = np.asarray(array)
    order = [int(i) for i in np.argsort([-abs(s) for s in a.strides], kind="stable")]
    base = np.ascontiguousarray(a.transpose(order))  # a view already for C or Fortran order
    t = torch.from_numpy(base).to(device).permute(*[int(i) for i in np.argsort(order)])
    ornt = np.asarray(ornt)
    flips = [axis for axis, (_, flip) in enumerate(ornt) if flip == -1]
    if flips:
        t = t.flip(flips)
    # as nibabel's apply_orientation: input axis i becomes output axis ornt[i, 0]
    return t.permute(*[int(i) for i in np.argsort(ornt[:, 0])])


def _source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis as ``torch.nn.functional.interpolate`` does it with
    ``align_corners=False``: for each output voxel the two source voxels and their weights."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_linear(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Trilinear resampling of a ``(X, Y, Z)`` volume (any dtype, any strides) to ``size``,
    the same as :func:`resize` ``"trilinear"`` (torch, ``align_corners=False``) to float32
    rounding.

    Done as three one-axis passes (trilinear interpolation is separable), in the order the
    axes lie in memory, outermost first, so each pass reads whole slabs and the first one
    shrinks the data most: a 512 x 512 x 300 int16 CT (a transposed or flipped view as well)
    goes to 128^3 without a float32 copy of the volume; ~6x faster than torch's interpolate on
    the float32 copy it needs (2 CPU cores).

    Returns:
        ``size`` float32, C-contiguous.
    """
    a = np.asarray(volume)
    order = [int(i) for i in np.argsort([-abs(s) for s in a.strides], kind="stable")]
    v = a.transpose(order)
    for axis, target in enumerate(int(size[i]) for i in order):
        n = v.shape[axis]
        if n == target:
            v = v.astype(np.float32, copy=False)
            continue
        i0, i1, w1 = _source_index(n, target)
        shape = [1] * v.ndim
        shape[axis] = target
        w1 = w1.reshape(shape)
        lower = np.take(v, i0, axis=axis).astype(np.float32, copy=False)
        v = lower + (np.take(v, i1, axis=axis) - lower) * w1  # (1 - w) * a + w * b
    return np.ascontiguousarray(v.transpose(np.argsort(order)), np.float32)


def resize_nearest(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a ``(X, Y, Z)`` label map to ``size`` in its own dtype,
    the same voxels as :func:`resize` ``"nearest"`` (``nearest-exact``: voxel centres to voxel
    centres): one index gather per axis, no float copy."""
    out = np.asarray(labels)
    for axis, target in enumerate(int(s) for s in size):
        n = out.shape[axis]
        if n != target:
            index = np.minimum(np.floor((np.arange(target) + 0.5) * (n / target)).astype(np.intp), n - 1)
            out = np.take(out, index, axis=axis)
    return out


def crop(volume: np.ndarray, start: Sequence[int], end: Sequence[int]) -> np.ndarray:
    """``volume[..., s0:e0, s1:e1, s2:e2]`` (leading channel axes kept)."""
    return volume[(Ellipsis, *(slice(s, e) for s, e in zip(start, end)))]


def restore_label_map(labels: np.ndarray | torch.Tensor, geometry: CaseGeometry) -> np.ndarray:
    """Inverse of :func:`prepare_volume` for a label map.

    Args:
        labels: ``(X', Y', Z')`` (or ``(1, X', Y', Z')``) integer labels at network resolution.
        geometry: the case's :class:`CaseGeometry`.

    Returns:
        ``(X, Y, Z)`` uint8 labels in the input file's voxel order (Fortran-ordered memory):
        nearest-neighbour resampled into the crop, zero outside it; write it with ``geometry.affine``.
    """
    lab = as_numpy(labels)
    lab = lab.reshape(lab.shape[-3:]).astype(np.uint8, copy=False)
    # written straight into the file-order output through its canonical view: no reoriented copy;
    # Fortran order is NIfTI's, so writing the file needs no transposed copy either
    full = np.zeros(geometry.shape, np.uint8, order="F")
    canonical = orientations.apply_orientation(full, geometry.ornt)
    target = canonical[tuple(slice(s, e) for s, e in zip(geometry.roi_start, geometry.roi_end))]
    # gathered in the target's own memory order (outermost axis first), so that the copy into it
    # streams through memory: at 512 x 512 x 600 0.2-0.9 s instead of 1.3-2.1 s for a C-order
    # gather copied into the Fortran-order file
    order = np.argsort([-abs(stride) for stride in target.strides], kind="stable")
    gathered = resize_nearest(np.transpose(lab, order), [geometry.roi_shape[a] for a in order])
    target[...] = np.transpose(gathered, np.argsort(order))
    return full


def orientation_codes(affine: np.ndarray) -> str:
    """Axis codes of an affine, e.g. ``"RAS"`` or ``"LPS"``."""
    return "".join(nib.aff2axcodes(affine))


def resample_to_shape(array: np.ndarray, affine: np.ndarray, shape: Sequence[int], labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A volume resampled to another voxel grid over the same field of view (e.g. a 3 mm CT as a
    512 x 512 x 300 case for timing): the grid's outer voxel faces stay where they were.

    Args:
        array: ``(X, Y, Z)`` volume in its file's voxel order.
        affine: its 4 x 4 voxel-to-world affine (mm).
        shape: the new ``(X', Y', Z')``.
        labels: nearest neighbour (a label map, dtype kept; :func:`resize_nearest`) instead of
            trilinear (float32, :func:`resize_linear`: no float copy of a large volume).

    Returns:
        ``(resampled, new_affine)``; voxel ``i`` of the new grid lies at old voxel coordinate
        ``(i + 0.5) * old / new - 0.5``.
    """
    scale = np.asarray(array.shape, float) / np.asarray(shape, float)
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(scale)
    to_old[:3, 3] = (scale - 1) / 2
    resampled = resize_nearest(array, shape) if labels else resize_linear(array, shape)
    return resampled, np.asarray(affine, float) @ to_old
