"""Label-overlay pictures of CT volumes (PNG), for docs and for the cascade's preview.

:func:`overlay_figure` draws one case, :func:`overlay_grid` several (one row each): axial,
coronal and sagittal slices through a centre point, in a soft-tissue window, with the label map
over them in fixed per-label colours (:data:`LABEL_COLORS`) and a legend of the labels shown.
Volumes are brought to canonical RAS voxel order first, so any file orientation looks the
same; slices are drawn in mm (true aspect) in the radiological convention (patient's right on
the viewer's left; anterior up in axial views; superior up in coronal and sagittal views,
anterior on the left in sagittal views). Rendering uses matplotlib's Agg backend; files are
written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stmt_monai.io import atomic_write
from stmt_monai.labels import LABELS, TUMOR, label_name

#: RGB per label name (organs in distinct hues, tumor in saturated yellow so it stands out)
_COLORS_BY_NAME: dict[str, tuple[float, float, float]] = {
    "liver": (0.80, 0.33, 0.20),
    "right_kidney": (0.95, 0.60, 0.10),
    "spleen": (0.55, 0.25, 0.70),
    "pancreas": (0.95, 0.55, 0.75),
    "aorta": (0.90, 0.10, 0.15),
    "inferior_vena_cava": (0.20, 0.35, 0.90),
    "right_adrenal_gland": (0.40, 0.85, 0.40),
    "left_adrenal_gland": (0.10, 0.60, 0.30),
    "gallbladder": (0.30, 0.80, 0.80),
    "esophagus": (0.00, 0.45, 0.55),
    "stomach": (0.50, 0.65, 1.00),
    "duodenum": (0.75, 0.50, 0.35),
    "left_kidney": (1.00, 0.80, 0.40),
    "tumor": (1.00, 1.00, 0.00),
}


#: RGB per FLARE label number
LABEL_COLORS: dict[int, tuple[float, float, float]] = {label: _COLORS_BY_NAME[name] for label, name in LABELS.items()}


VIEWS = ("axial", "coronal", "sagittal")


#: soft-tissue window (HU): level 40, width 400
SOFT_TISSUE_WINDOW = (-160.0, 240.0)


def label_colormap():
    """A matplotlib ``ListedColormap`` indexed by label number (0 fully transparent)."""
    from matplotlib.colors import ListedColormap

    colors = np.zeros((max(LABELS) + 1, 4))
    for label, rgb in LABEL_COLORS.items():
        colors[label] = (*rgb, 1.0)
    return ListedColormap(colors)


def default_center(labels: np.ndarray) -> tuple[int, int, int]:
    """Centre point (canonical voxels) of the slices.

    The largest tumor (connected component) if there is one, else the centroid of all labels,
    else the middle of the volume; a voxel inside the structure, so every view cuts it.
    """
    from scipy import ndimage

    tumor = labels == TUMOR
    if tumor.any():
        components, _ = ndimage.label(tumor)
        mask = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    else:
        mask = labels > 0
    if not mask.any():
        return tuple(int(s) // 2 for s in labels.shape)
    voxels = np.argwhere(mask)
    nearest = voxels[np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1))]
    return tuple(int(v) for v in nearest)


def _slice(volume: np.ndarray, view: str, center: Sequence[int]) -> np.ndarray:
    """2D slice (rows top to bottom, columns left to right as displayed) of a canonical volume."""
    x, y, z = center
    if view == "axial":  # rows: anterior at top; columns: patient right on the left
        return volume[::-1, ::-1, z].T
    if view == "coronal":  # rows: superior at top; columns: patient right on the left
        return volume[::-1, y, ::-1].T
    if view == "sagittal":  # rows: superior at top; columns: anterior on the left
        return volume[x, ::-1, ::-1].T
    raise ValueError(f"unknown view {view!r}: expected one of {VIEWS}")


def _extent_mm(shape: Sequence[int], spacing: Sequence[float], view: str) -> tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) in mm so pixels get their true aspect."""
    axes = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[view]
    width = shape[axes[0]] * spacing[axes[0]]
    height = shape[axes[1]] * spacing[axes[1]]
    return (0.0, width, 0.0, height)


def overlay_grid(
    cases: Sequence[Mapping],
    path: str | os.PathLike,
    views: Sequence[str] = VIEWS,
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
    alpha: float = 0.45,
    panel_inches: float = 3.0,
    dpi: int = 110,
) -> Path:
    """Draw several cases, one row each, and write a PNG.

    Args:
        cases: mappings with ``image`` (``(X, Y, Z)`` HU), ``labels`` (same shape, FLARE label
            numbers), optional ``affine`` (4 x 4 RAS; default identity, 1 mm voxels), ``title`` and
            ``center`` (canonical voxel indices of the slices; default :func:`default_center`).
        path: output PNG.
        views: columns, any of ``axial``, ``coronal``, ``sagittal``.
        window: display range in HU.
        alpha: opacity of the label colours.
        panel_inches, dpi: size of one panel and resolution.

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from stmt_monai.preprocessing.geometry import to_canonical

    cmap = label_colormap()
    fig = plt.figure(figsize=(panel_inches * len(views), (panel_inches + 0.35) * len(cases) + 0.5), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(cases), 1))
    shown: set[int] = set()
    for subfig, case in zip(subfigs, cases):
        affine = np.asarray(case.get("affine", np.eye(4)), float)
        image, canonical_affine, _ = to_canonical(np.asarray(case["image"]), affine)
        labels, _, _ = to_canonical(np.asarray(case["labels"]), affine)
        spacing = np.sqrt((canonical_affine[:3, :3] ** 2).sum(0))
        center = case.get("center") or default_center(labels)
        center = [int(np.clip(c, 0, s - 1)) for c, s in zip(center, labels.shape)]
        if case.get("title"):
            subfig.suptitle(str(case["title"]), fontsize=7)
        for ax, view in zip(np.atleast_1d(subfig.subplots(1, len(views))), views):
            extent = _extent_mm(labels.shape, spacing, view)
            ax.imshow(_slice(image, view, center), cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="nearest")
            lab = _slice(labels, view, center)
            shown.update(int(v) for v in np.unique(lab) if v)
            organs = np.ma.masked_where((lab == 0) | (lab == TUMOR), lab)
            ax.imshow(organs, cmap=cmap, vmin=0, vmax=max(LABELS), alpha=alpha, extent=extent, interpolation="nearest")
            # tumors more opaque: small lesions must stay visible over the organs' colours
            ax.imshow(np.ma.masked_where(lab != TUMOR, lab), cmap=cmap, vmin=0, vmax=max(LABELS), alpha=min(1.0, 1.5 * alpha), extent=extent, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.98, view, transform=ax.transAxes, color="white", fontsize=7, va="top")
    if shown:
        handles = [Patch(color=LABEL_COLORS[v], label=f"{v} {label_name(v)}") for v in sorted(shown)]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def overlay_figure(
    image: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    affine: np.ndarray | None = None,
    title: str | None = None,
    center: Sequence[int] | None = None,
    **kwargs,
) -> Path:
    """One case as a PNG: axial, coronal and sagittal slices with the label overlay.

    Args:
        image: ``(X, Y, Z)`` CT in HU.
        labels: ``(X, Y, Z)`` label map (FLARE numbers).
        path: output PNG.
        affine: 4 x 4 RAS affine (default identity).
        title: text beside the row.
        center: canonical voxel indices the slices pass through (default :func:`default_center`:
            the largest tumor, else the labels' centroid).
        kwargs: passed to :func:`overlay_grid` (``views``, ``window``, ``alpha``, ...).
    """
    case = {"image": image, "labels": labels, "affine": np.eye(4) if affine is None else affine, "title": title, "center": center}
    return overlay_grid([case], path, **kwargs)
