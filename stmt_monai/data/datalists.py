"""Datalists of the training workflows: MONAI datalist JSON in, lists of case dicts out.

- :func:`load_datalist`: one section of a datalist JSON, paths made absolute;
- :func:`student_datalist`: the self-training student's list (paper section 2.2, self-training
  step 3): the fully labelled cases and the pseudo-label job's output, each case tagged with its
  stream (``labelled``, ``cpl`` or ``pl``) for :class:`~stmt_monai.data.sampling.StreamBatchSampler`
  and the three terms of eq. (1);
- :func:`attach_roi`: the stage-2 region of interest of each case of the tumor student's list
  (an organ pseudo label or stage-1 mask, the case's own organ labels, or the whole image).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stmt_monai.io import case_name, image_datalist, load_label
from stmt_monai.labels import ORGAN_CLASSES
from stmt_monai.training.losses import CPL, LABELLED, PL, STREAMS


def load_datalist(path: str | os.PathLike, key: str = "training") -> list[dict]:
    """A MONAI datalist section with paths made absolute against the JSON's folder."""
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: datalist not found")
    if key not in json.loads(path.read_text()):
        return []
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(path.parent))


def student_datalist(
    labelled: str | os.PathLike | Sequence[Mapping],
    pseudo_labelled: str | os.PathLike | Sequence[Mapping] | None,
    streams: Sequence[str] = STREAMS,
    labelled_key: str = "training",
    pseudo_key: str = "training",
    roi_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """The student's training list: fully labelled cases plus the pseudo-label job's output.

    Args:
        labelled: datalist JSON (or list) of fully labelled cases; tagged ``stream="labelled"``.
        pseudo_labelled: datalist JSON (or list) written by the pseudo-label job, whose items carry
            ``stream`` = ``"cpl"`` (corrected, from partial cases) or ``"pl"`` (unlabelled).
        streams: the streams to keep (e.g. ``("labelled", "cpl")`` for self-training without the
            unlabelled cases, a row of the paper's ablation; ``("labelled",)`` trains on the labelled
            list alone, and ``pseudo_labelled`` is then not read).
        roi_dir: folder of masks ``<case>.nii.gz`` whose bounding box (+ margin) is each case's
            stage-2 region of interest (e.g. stage 1's predictions); ``None``: each case's own
            label gives it (:func:`attach_roi`).

    Returns:
        Items ``{"image", "label", "stream", ...}``: each item keeps only the fields that every
        item has (e.g. ``name``), because a DataLoader collates a batch of dicts key by key and
        the streams are mixed within a batch (the fully labelled list carries ``tumor``, the
        pseudo-labelled one ``annotated_classes`` and ``quality`` of varying length).
    """

    def _items(source, key):
        if source is None:
            return []
        if isinstance(source, (str, os.PathLike)):
            return load_datalist(source, key)
        return [dict(item) for item in source]

    unknown = set(streams) - set(STREAMS)
    if unknown:
        raise ValueError(f"unknown streams {sorted(unknown)}: expected some of {list(STREAMS)}")
    items = [{**item, "stream": LABELLED} for item in _items(labelled, labelled_key)] if LABELLED in streams else []
    for item in _items(pseudo_labelled, pseudo_key) if {CPL, PL} & set(streams) else []:
        if item.get("stream") not in (CPL, PL):
            raise ValueError(f"pseudo-labelled item {item.get('image')} has no stream 'cpl' or 'pl'")
        items.append(dict(item))
    items = [item for item in items if item["stream"] in streams]
    if roi_dir is not None:
        items = attach_roi(items, roi_dir)
    shared = set.intersection(*(set(item) for item in items)) if items else set()
    return [{key: value for key, value in item.items() if key in shared} for item in items]


def _has_organ_labels(item: Mapping) -> bool:
    if "organs" in item:  # triage datalists carry the annotated organ set
        return bool(item["organs"])
    labels, _ = load_label(item["label"])
    return bool(np.isin(labels, ORGAN_CLASSES).any())


def attach_roi(
    datalist: str | os.PathLike | Sequence[Mapping],
    roi_dir: str | os.PathLike | None = None,
    key: str = "training",
) -> list[dict]:
    """Give each case of a tumor-stage list its stage-2 region of interest (``roi`` key).

    The tumor student sees the region of interest of stage 2, the abdomen box; a tumor-annotated
    case may have no organ labels, so its box cannot come from its label alone. Per item, the
    first that applies:

    1. ``roi_dir/<case>.nii.gz`` exists (the organ pseudo label of ``organ_selftrain``, or a
       stage-1 abdomen mask, same case name): ``roi`` is that path (its bounding box + margin);
    2. the item already has a ``roi``: kept;
    3. the item has no label (inference), or a label with organ voxels: no ``roi`` (without a label
       the whole image is used; with one, its organs + tumor give the box, as in validation);
    4. a tumor-only label: ``roi`` = :data:`~stmt_monai.preprocessing.transforms.WHOLE_IMAGE_ROI` (no crop),
       since the tumor's own box is not the abdomen.

    Args:
        datalist: a MONAI datalist JSON (section ``key``), a list of items ``{"image", "label"?}``,
            a folder of images, a DICOM series folder or one image file (:func:`stmt_monai.io.find_cases`).
        roi_dir: folder of masks named ``<case>.nii.gz`` on the images' grids; ``None`` for none.
        key: datalist section to read from a JSON.

    Returns:
        New items (paths absolute for a JSON, as MONAI resolves them) with ``roi`` where needed.
    """
    from stmt_monai.preprocessing.transforms import WHOLE_IMAGE_ROI

    source = datalist
    if isinstance(datalist, (str, os.PathLike)):
        path = Path(datalist)
        if path.is_file() and path.suffix == ".json":
            source = load_datalist(path, key)
        elif path.exists():  # a folder of images, a DICOM series folder or one image file
            source = image_datalist(path)
        else:
            raise FileNotFoundError(f"{path}: no datalist, image or folder of images")
    items = []
    for item in source:
        item = dict(item)
        roi = Path(roi_dir) / f"{case_name(item['image'])}.nii.gz" if roi_dir else None
        if roi is not None and roi.exists():
            item["roi"] = str(roi)
        elif item.get("roi") is None and item.get("label") is not None and not _has_organ_labels(item):
            item["roi"] = WHOLE_IMAGE_ROI
        items.append(item)
    return items
