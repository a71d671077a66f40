"""Per-case report of a FLARE label map: organ volumes and mean HU, tumors with RECIST diameters.

:func:`case_report` measures a label map on its own grid (the cascade's output, with the input's
affine) and :func:`write_report` writes it as JSON and CSV (atomically):

- every organ (1..13): voxel count, volume in ml (voxels x voxel volume, the voxel volume being
  ``|det(affine[:3, :3])|`` mm^3), mean HU over its voxels in the original CT;
- tumors (label 14): 26-connected components (connected-components-3d), each with its volume
  in ml, mean HU, longest axial diameter in mm as RECIST 1.1 measures it (:func:`longest_axial_diameter`)
  and its host organ (:func:`host_organ`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cc3d
import numpy as np
from nibabel import orientations

from stmt_monai.io import write_csv_atomic, write_text_atomic
from stmt_monai.labels import ORGAN_CLASSES, ORGANS, TUMOR, TUMOR_NAME

#: slices of the volume per step when summing HU (bounds the float64 temporaries)
_SLAB = 32


#: lesions measured one by one (largest first); RECIST itself follows at most 5 target lesions
MAX_LESIONS = 100


#: ``message``: the text of a ``warning`` row (an input warning, :mod:`stmt_monai.inference.checks`)
CSV_FIELDS = ("kind", "label", "name", "voxels", "volume_ml", "mean_hu", "longest_axial_diameter_mm", "host_organ", "message")


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml (``|det|`` of the affine's 3 x 3 part, mm^3, / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0


def label_statistics(labels: np.ndarray, image: np.ndarray | None = None, num_labels: int = TUMOR + 1) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and HU sum per label value, slab by slab (no full-size float64 copy).

    Only the bounding box of the labelled voxels is read voxel by voxel (the cascade's output
    is zero outside its region of interest); the background outside it is counted, not summed.
    Slabs are raveled in the arrays' memory order (NIfTI volumes are Fortran-ordered), so
    raveling copies without transposing.

    Returns:
        ``(counts, hu_sums)``, each of length ``num_labels`` (``hu_sums`` zeros without an image,
        and for label 0 only the sum inside the labelled box).
    """
    counts = np.zeros(num_labels, np.int64)
    sums = np.zeros(num_labels, np.float64)
    if not labels.any():
        counts[0] = labels.size
        return counts, sums
    box = _bbox(labels, pad=0)
    lab_box = labels[box]
    image_box = image[box] if image is not None else None
    order = "F" if abs(lab_box.strides[0]) < abs(lab_box.strides[-1]) else "C"
    slab_axis = -1 if order == "F" else 0  # the outermost axis in memory
    for start in range(0, lab_box.shape[slab_axis], _SLAB):
        part = (Ellipsis, slice(start, start + _SLAB)) if slab_axis == -1 else (slice(start, start + _SLAB),)
        lab = lab_box[part].ravel(order)
        counts += np.bincount(lab, minlength=num_labels)[:num_labels]
        if image_box is not None:
            sums += np.bincount(lab, weights=image_box[part].ravel(order), minlength=num_labels)[:num_labels]
    counts[0] += labels.size - lab_box.size
    return counts, sums


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the body's superior-inferior direction (slices across it are axial)."""
    ornt = orientations.io_orientation(np.asarray(affine, float))
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def longest_axial_diameter(mask: np.ndarray, affine: np.ndarray) -> tuple[float, int]:
    """RECIST longest diameter of a lesion: the largest in-plane extent over its axial slices.

    On each axial slice (voxel slices across :func:`axial_axis`), the lesion's extent is the
    largest distance between two corners of its voxels (a voxel covers its full square, so one
    voxel measures its diagonal), measured in mm through the affine: the two in-plane voxel axes
    enter with their own spacing and any shear (anisotropic or oblique pixels are handled).

    Args:
        mask: ``(X, Y, Z)`` boolean lesion mask (one component).
        affine: the grid's 4 x 4 affine (only its 3 x 3 part is used).

    Returns:
        ``(diameter_mm, slice_index)``: the longest diameter and the slice (index along the axial
        voxel axis, within ``mask``) where it lies; ``(0.0, -1)`` for an empty mask.
    """
    from scipy.spatial import ConvexHull, QhullError

    mask = np.asarray(mask, bool)
    axis = axial_axis(affine)
    plane = [a for a in range(3) if a != axis]
    if abs(mask.strides[plane[0]]) < abs(mask.strides[plane[1]]):
        plane.reverse()  # columns along the axis closest in memory: the row scans below read memory in order
    # |M d| for in-plane index steps d, M the 3 x 2 columns of the plane: with M = Q R, |M d| = |R d|
    r = np.linalg.qr(np.asarray(affine, float)[:3, plane], mode="r")
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    moved = np.transpose(mask, (axis, *plane))  # (slices, rows, columns)
    occupied = moved.any(2)  # (slices, rows)
    slices = np.flatnonzero(occupied.any(1))
    if not slices.size:
        return 0.0, -1
    # the farthest pair of a slice lies on its convex hull, whose vertices are corners of each row's
    # first or last voxel: two voxels per row are measured, not the whole slice
    first = moved.argmax(2)
    last = moved.shape[2] - 1 - moved[:, :, ::-1].argmax(2)
    rows_of = [np.flatnonzero(occupied[index]) for index in slices]
    # an upper bound per slice, the diagonals of its bounding rectangle: slices are measured largest
    # bound first, and the search stops where no bound can beat the longest diameter found
    bounds = []
    for index, rows in zip(slices, rows_of):
        low = np.array([rows[0], first[index, rows].min()]) - 0.5
        high = np.array([rows[-1], last[index, rows].max()]) + 0.5
        box = np.array([low, high, [low[0], high[1]], [high[0], low[1]]]) @ r.T
        bounds.append(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3])))
    best, best_slice = 0.0, -1
    for k in sorted(range(len(slices)), key=lambda k: (-bounds[k], slices[k])):
        index, rows = slices[k], rows_of[k]
        if bounds[k] + 1e-6 < best:
            break
        ends = np.concatenate([np.stack([rows, first[index, rows]], 1), np.stack([rows, last[index, rows]], 1)]).astype(float)
        mm = (ends[:, None, :] + corners[None]).reshape(-1, 2) @ r.T
        if len(mm) > 16:  # only the convex hull's vertices can be farthest apart
            try:
                mm = mm[ConvexHull(mm).vertices]
            except QhullError:  # collinear points: keep them all
                pass
        span = float(np.sqrt(((mm[:, None, :] - mm[None, :, :]) ** 2).sum(-1)).max())
        if span > best:
            best, best_slice = span, int(index)
    return best, best_slice


def host_organ(component: np.ndarray, organ_map: np.ndarray, exclude_component: bool = False) -> int:
    """The organ a lesion lies in: the most frequent organ label over the lesion and a one-voxel
    ring around it (26-neighbourhood).

    Args:
        component: boolean lesion mask.
        organ_map: label map on the same grid; best the organ result *before* the tumor overlay
            (it still holds the organ under the lesion); the final map works too, where only
            the ring can show the organ.
        exclude_component: count the ring only.

    Returns:
        The organ label (1..13), or 0 when no organ touches the lesion (e.g. a lower-abdomen
        lesion outside every organ). Ties go to the lower label.
    """
    component = np.asarray(component, bool)
    region = _dilate_box(component)
    if exclude_component:
        region &= ~component
    values = _select(organ_map, region)
    # 13 counting passes over the selected bytes: cheaper than bincount's cast to 8-byte integers
    counts = [np.count_nonzero(values == label) for label in ORGAN_CLASSES]
    if not any(counts):
        return 0
    return int(ORGAN_CLASSES[int(np.argmax(counts))])


def _dilate_box(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 3 x 3 x 3 box (26-neighbourhood), as three one-voxel shifts per axis
    (the box is separable), in the mask's own memory order."""
    grown = mask
    for axis in range(mask.ndim):
        lower = tuple(slice(None, -1) if a == axis else slice(None) for a in range(mask.ndim))
        upper = tuple(slice(1, None) if a == axis else slice(None) for a in range(mask.ndim))
        out = grown.copy(order="K")
        out[upper] |= grown[lower]
        out[lower] |= grown[upper]
        grown = out
    return grown


def _select(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values[mask]`` in the arrays' memory order (a NIfTI volume is Fortran-ordered: indexing it
    in C order strides through memory, several times slower); the order of the result is not
    the C order then, which counts and means do not mind."""
    if abs(mask.strides[0]) < abs(mask.strides[-1]):
        return values.T[mask.T]
    return values[mask]


def _bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)


def tumor_lesions(
    labels: np.ndarray,
    affine: np.ndarray,
    image: np.ndarray | None = None,
    organ_labels: np.ndarray | None = None,
    max_lesions: int | None = MAX_LESIONS,
) -> list[dict]:
    """Each tumor component (label 14, 26-connected), largest first.

    Args:
        labels: ``(X, Y, Z)`` final label map.
        affine: its affine.
        image: the CT in HU on the same grid (for each lesion's mean HU), optional.
        organ_labels: the organ map before the tumor overlay, same grid, optional (host organ).
        max_lesions: measure only this many of the largest (``None``: all); a network gone
            wrong can predict thousands of specks, and each measured lesion costs ~0.5 ms.

    Returns:
        dicts with ``index`` (1..), ``voxels``, ``volume_ml``, ``mean_hu``,
        ``longest_axial_diameter_mm``, ``diameter_slice`` (axial voxel index in the file),
        ``host_organ_label`` (0 none), ``host_organ`` (name or ``"none"``), ``centroid_mm`` (RAS).
    """
    return _lesions(labels, affine, image, organ_labels, max_lesions)[0]


def _lesions(labels, affine, image, organ_labels, max_lesions) -> tuple[list[dict], int]:
    """:func:`tumor_lesions` and the number of components (all of them, listed or not)."""
    tumor = labels == TUMOR
    if not tumor.any():
        return [], 0
    box = _bbox(tumor)
    # cc3d reads C and Fortran order alike: the box keeps the label map's order (no transposing copy)
    sub = np.asfortranarray(tumor[box]) if labels.flags.f_contiguous else np.ascontiguousarray(tumor[box])
    components, num = cc3d.connected_components(sub, connectivity=26, return_N=True)
    del tumor, sub  # the components are the lesions now (the peak memory of a case is here)
    # per-component voxel counts, boxes and centroids in one pass: each lesion is then measured in its own box
    stats = cc3d.statistics(components)
    sizes, boxes, centroids = np.asarray(stats["voxel_counts"]), stats["bounding_boxes"], np.asarray(stats["centroids"], float)
    ml = voxel_volume_ml(affine)
    axis = axial_axis(affine)
    offset = np.array([s.start for s in box])
    organ_sub = (organ_labels if organ_labels is not None else labels)[box]
    image_sub = image[box] if image is not None else None
    linear, origin = np.asarray(affine, float)[:3, :3], np.asarray(affine, float)[:3, 3]
    lesions = []
    order_ids = np.argsort(-sizes[1:], kind="stable") + 1
    for order, cid in enumerate(order_ids[:max_lesions], start=1):
        # the lesion's box grown by one voxel: room for the ring host_organ looks at
        local = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(boxes[cid], components.shape))
        comp = components[local] == cid
        corner = offset + np.array([s.start for s in local])
        diameter, slice_index = longest_axial_diameter(comp, affine)
        host = host_organ(comp, organ_sub[local], exclude_component=organ_labels is None)
        centroid = linear @ (centroids[cid] + offset) + origin
        lesions.append(
            {
                "index": order,
                "voxels": int(sizes[cid]),
                "volume_ml": float(sizes[cid] * ml),
                "mean_hu": float(_select(image_sub[local], comp).mean(dtype=np.float64)) if image_sub is not None else None,
                "longest_axial_diameter_mm": round(float(diameter), 3),
                "diameter_slice": int(slice_index + corner[axis]),
                "host_organ_label": host,
                "host_organ": ORGANS.get(host, "none"),
                "centroid_mm": [round(float(v), 2) for v in centroid],
            }
        )
    return lesions, int(num)


def case_report(
    labels: np.ndarray,
    affine: np.ndarray,
    image: np.ndarray | None = None,
    organ_labels: np.ndarray | None = None,
    case: str | None = None,
    source: str | None = None,
) -> dict:
    """Measure a FLARE label map.

    Args:
        labels: ``(X, Y, Z)`` uint8 label map (0..14) on the grid of ``affine``.
        affine: 4 x 4 voxel-to-world affine (mm).
        image: the CT in HU on the same grid (mean HU), optional.
        organ_labels: organ map before the tumor overlay (host organs), optional.
        case, source: case name and input path, recorded as they are.

    Returns:
        a JSON-ready dict: ``case``, ``source``, ``shape``, ``spacing_mm``, ``voxel_volume_ml``,
        ``organs`` (one entry per organ label 1..13, ``volume_ml`` 0 and ``mean_hu`` None when
        absent), ``tumors`` (``count`` of components, ``voxels``, ``total_volume_ml``, ``lesions``:
        :func:`tumor_lesions`, the :data:`MAX_LESIONS` largest, ``lesions_listed`` of them).
    """
    labels = np.asarray(labels)
    if labels.dtype != np.uint8:
        labels = labels.astype(np.uint8)
    ml = voxel_volume_ml(affine)
    counts, sums = label_statistics(labels, image)
    organs = [
        {
            "label": int(label),
            "name": ORGANS[label],
            "voxels": int(counts[label]),
            "volume_ml": float(counts[label] * ml),
            "mean_hu": (float(sums[label] / counts[label]) if counts[label] and image is not None else None),
        }
        for label in ORGAN_CLASSES
    ]
    lesions, count = _lesions(labels, affine, image, organ_labels, MAX_LESIONS)
    return {
        "case": case,
        "source": source,
        "shape": [int(s) for s in labels.shape],
        "spacing_mm": [float(s) for s in np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))],
        "voxel_volume_ml": ml,
        "organs": organs,
        "tumors": {
            "count": count,
            "voxels": int(counts[TUMOR]),
            "total_volume_ml": float(counts[TUMOR] * ml),
            "lesions_listed": len(lesions),
            "lesions": lesions,
        },
    }


def report_rows(report: dict) -> list[dict]:
    """The report as CSV rows (:data:`CSV_FIELDS`): one per organ, one per lesion, then one per
    input warning (``kind`` ``warning``, ``name`` the warning's kind, ``message`` its line)."""
    rows = [
        {"kind": "organ", "label": o["label"], "name": o["name"], "voxels": o["voxels"], "volume_ml": f"{o['volume_ml']:.3f}",
         "mean_hu": "" if o["mean_hu"] is None else f"{o['mean_hu']:.1f}", "longest_axial_diameter_mm": "", "host_organ": ""}
        for o in report["organs"]
    ]
    rows += [
        {"kind": "tumor", "label": TUMOR, "name": f"{TUMOR_NAME}_{t['index']}", "voxels": t["voxels"], "volume_ml": f"{t['volume_ml']:.3f}",
         "mean_hu": "" if t["mean_hu"] is None else f"{t['mean_hu']:.1f}",
         "longest_axial_diameter_mm": f"{t['longest_axial_diameter_mm']:.1f}", "host_organ": t["host_organ"]}
        for t in report["tumors"]["lesions"]
    ]
    rows += [{"kind": "warning", "name": w["kind"], "message": w["message"]} for w in report.get("warnings", [])]
    return rows


def write_report(report: dict, json_path: str | os.PathLike, csv_path: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """Write the report as JSON (everything) and CSV (:func:`report_rows`), each atomically."""
    written_json = write_text_atomic(json_path, json.dumps(report, indent=1) + "\n")
    written_csv = None
    if csv_path is not None:
        written_csv = write_csv_atomic(csv_path, CSV_FIELDS, report_rows(report))
    return written_json, written_csv
