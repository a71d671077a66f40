"""Triage of a training set into the paper's data categories, and the datalists of each stage.

Paper section 2 and Fig. 1: every training case is sorted twice, by its
organ labels into *fully organ labelled* (all 13 organ classes present in the label map),
*partially organ labelled* (some) and *non-organ labelled* (none; unlabelled scans count here
too), and by its tumor label into *tumor annotated* and *not tumor annotated*.

:func:`triage_dataset` streams over a dataset, one label map in memory at a time (images are
checked by their header and the length of their voxel data, :func:`check_data_length`, or read
in full with ``verify_images``), records for every labelled case the set A of organ classes
present and whether a tumor label is present, skips and reports each bad case with its reason
(so that none stops a training run midway: an unreadable or truncated image or label, a label
of another shape or affine than its image, label values outside 0..14, an image without its
label), and writes into ``out_dir``:

- ``triage.json``: the counts table, each case's set A / tumor flag / category, the failures;
- ``datalist_fully_labelled.json``: stage 1 and organ-teacher training (fully organ labelled);
- ``datalist_pseudo_label_jobs.json``: cases the organ teacher pseudo-labels, each with
  ``"kind": "partial"`` (with its label and ``"organs"``: the set A used to correct the
  pseudo label) or ``"kind": "unlabelled"`` (unlabelled scans; non-organ labelled cases, with their label so that
  an annotated tumor is kept in the pseudo label);
- ``datalist_tumor.json``: tumor-annotated cases (mean-teacher training);
- ``datalist_validation.json``: the ``validation`` folder (and ``test`` if present) if the
  dataset has one, else a held-out share of the fully labelled cases, chosen by the SHA-1 of
  the case name (deterministic, stable when cases are added) and left out of every training
  datalist and of the fingerprint;
- ``fingerprint.json``: :func:`stmt_monai.preprocessing.fingerprint.foreground_fingerprint` over a
  deterministic sample (SHA-1 order, at most ``fingerprint_cases``) of the labelled training
  cases whose label has any foreground voxel.

Datalists are MONAI datalist JSON (``{"training": [{"image": ..., "label": ...}, ...]}``) with
paths relative to the datalist's own folder, which is where
``monai.data.load_decathlon_datalist(path, True, key)`` resolves them by default
(``base_dir`` = the file's folder). The training datalists also carry a ``validation`` key (the
same cases as ``datalist_validation.json``), so one file serves a bundle's train and validate.

Input is a folder in FLARE23 layout (:data:`LAYOUT`: ``imagesTr/*_0000.nii.gz``,
``labelsTr/*.nii.gz``, ``unlabeled/*_0000.nii.gz``, optional ``validation/{images,labels}`` and
``test/{images,labels}``) or a MONAI datalist JSON (``training`` entries with ``image`` and
optional ``label``; optional ``unlabeled``/``unlabelled``, ``validation``, ``test``; relative paths
resolved from the JSON's folder, as MONAI does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from stmt_monai.io import (
    NIFTI_SUFFIXES,
    ImageError,
    case_name,
    find_cases,
    load_image,
    load_label,
    write_text_atomic,
)
from stmt_monai.labels import ORGAN_CLASSES, TUMOR

#: FLARE23 folder layout (relative to the dataset root), shared with the synthetic cohort
LAYOUT: dict[str, str] = {
    "images": "imagesTr",
    "labels": "labelsTr",
    "unlabelled": "unlabeled",
    "validation_images": "validation/images",
    "validation_labels": "validation/labels",
    "test_images": "test/images",
    "test_labels": "test/labels",
    "truth": "truth",
}


#: other spellings of the unlabelled folder that are accepted
UNLABELLED_FOLDERS = ("unlabeled", "unlabelled", "unlabeledTr", "unlabelledTr")


FULLY, PARTIAL, NON_ORGAN = "fully_organ_labelled", "partially_organ_labelled", "non_organ_labelled"


ORGAN_CATEGORIES = (FULLY, PARTIAL, NON_ORGAN)


TUMOR_ANNOTATED, NOT_TUMOR_ANNOTATED = "tumor_annotated", "not_tumor_annotated"


DATALISTS = {
    "fully_labelled": "datalist_fully_labelled.json",
    "pseudo_label_jobs": "datalist_pseudo_label_jobs.json",
    "tumor": "datalist_tumor.json",
    "validation": "datalist_validation.json",
}


# ----------------------------------------------------------------------------- categories
def organ_category(organs: Iterable[int]) -> str:
    """``fully_organ_labelled`` (all 13 organ classes), ``partially_organ_labelled`` or ``non_organ_labelled``."""
    present = set(int(o) for o in organs) & set(ORGAN_CLASSES)
    if present == set(ORGAN_CLASSES):
        return FULLY
    return PARTIAL if present else NON_ORGAN


def category_counts(cases: Iterable[Mapping]) -> dict:
    """The Fig. 1 counts of training cases.

    Args:
        cases: mappings with ``organs`` (set A), ``tumor`` (tumor label present) and ``labelled``
            (False for an unlabelled scan, which counts as non-organ labelled, not tumor annotated).

    Returns:
        ``{"total", "labelled", "unlabelled", "fully_organ_labelled", "partially_organ_labelled",
        "non_organ_labelled", "tumor_annotated", "not_tumor_annotated", "table"}``; ``table`` maps each
        organ category to ``{"tumor_annotated": n, "not_tumor_annotated": n}``.
    """
    table = {c: {TUMOR_ANNOTATED: 0, NOT_TUMOR_ANNOTATED: 0} for c in ORGAN_CATEGORIES}
    labelled = unlabelled = 0
    for case in cases:
        if case.get("labelled", True):
            labelled += 1
        else:
            unlabelled += 1
        tumor = bool(case["tumor"]) and case.get("labelled", True)
        table[organ_category(case["organs"])][TUMOR_ANNOTATED if tumor else NOT_TUMOR_ANNOTATED] += 1
    counts = {"total": labelled + unlabelled, "labelled": labelled, "unlabelled": unlabelled}
    counts.update({c: sum(table[c].values()) for c in ORGAN_CATEGORIES})
    counts[TUMOR_ANNOTATED] = sum(row[TUMOR_ANNOTATED] for row in table.values())
    counts[NOT_TUMOR_ANNOTATED] = sum(row[NOT_TUMOR_ANNOTATED] for row in table.values())
    counts["table"] = table
    return counts


def format_table(counts: Mapping, failed: int = 0, validation_source: str | None = None) -> str:
    """The counts as a small markdown table (organ categories x tumor annotation)."""
    table = counts["table"]
    names = {
        FULLY: "fully organ labelled (all 13)",
        PARTIAL: "partially organ labelled",
        NON_ORGAN: f"non-organ labelled (incl. {counts['unlabelled']} unlabelled)",
    }
    lines = [
        "| training cases | tumor annotated | not tumor annotated | total |",
        "| --- | ---: | ---: | ---: |",
    ]
    for c in ORGAN_CATEGORIES:
        lines.append(f"| {names[c]} | {table[c][TUMOR_ANNOTATED]} | {table[c][NOT_TUMOR_ANNOTATED]} | {counts[c]} |")
    lines.append(f"| total | {counts[TUMOR_ANNOTATED]} | {counts[NOT_TUMOR_ANNOTATED]} | {counts['total']} |")
    extra = f"validation: {counts.get('validation', 0)}"
    if validation_source:
        extra += f" ({validation_source})"
    extra += f"; test: {counts.get('test', 0)}; failed (skipped): {failed}"
    return "\n".join(lines) + "\n" + extra


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass
class CaseRecord:
    """One case as triage found it.

    Attributes:
        name: case name (``FLARE23_0001``).
        image, label: absolute paths (``label`` None for an unlabelled scan).
        organs: set A, the organ classes present in the label (sorted).
        tumor: a tumor voxel is present in the label.
        shape, spacing_mm: image grid.
        held_out: kept for validation (no validation folder) and out of the training datalists.
    """

    name: str
    image: str
    label: str | None
    organs: list[int] = dataclasses.field(default_factory=list)
    tumor: bool = False
    shape: list[int] = dataclasses.field(default_factory=list)
    spacing_mm: list[float] = dataclasses.field(default_factory=list)
    held_out: bool = False

    @property
    def labelled(self) -> bool:
        return self.label is not None

    @property
    def organ_category(self) -> str:
        return organ_category(self.organs)


@dataclasses.dataclass
class TriageResult:
    """What :func:`triage_dataset` found and wrote.

    Attributes:
        cases: training cases (labelled and unlabelled) that could be read.
        validation, test: cases of the validation / test folders (empty if none).
        failed: ``{"path", "error"}`` per skipped file (the one-line :class:`ImageError` message).
        counts: :func:`category_counts` of ``cases`` plus ``validation`` and ``test`` sizes.
        validation_source: ``"folder"``, ``"held_out_fully_labelled"`` or ``"none"``.
        outputs: written file kind -> path.
    """

    cases: list[CaseRecord]
    validation: list[CaseRecord]
    test: list[CaseRecord]
    failed: list[dict]
    counts: dict
    validation_source: str
    outputs: dict[str, str]

    def table(self) -> str:
        return format_table(self.counts, len(self.failed), self.validation_source)


# ----------------------------------------------------------------------------- discovery
def _cases(folder: Path, dicom: bool = True) -> list[Path]:
    """:func:`stmt_monai.io.find_cases` of a layout folder; an absent folder has none."""
    return find_cases(folder, dicom=dicom, allow_empty=True) if folder.is_dir() else []


def _pairs(images_dir: Path, labels_dir: Path, failed: list[dict]) -> list[tuple[str, str, str]]:
    """``(name, image, label)`` for each image with its label; unpaired files go to ``failed``."""
    labels = {case_name(p): p for p in _cases(labels_dir, dicom=False)}
    pairs, seen = [], set()
    for image in _cases(images_dir):
        name = case_name(image)
        seen.add(name)
        if name in labels:
            pairs.append((name, str(image), str(labels[name])))
        else:
            failed.append(_failure(ImageError(image, f"no label file {name}.nii.gz in {labels_dir}")))
    for name, label in labels.items():
        if name not in seen:
            failed.append(_failure(ImageError(label, f"label without an image in {images_dir}")))
    return pairs


def _failure(err: ImageError) -> dict:
    return {"path": err.path, "error": str(err)}


@dataclasses.dataclass
class Inventory:
    """Files of a dataset, before reading any: lists of ``(name, image, label_or_None)``."""

    training: list[tuple[str, str, str | None]]
    validation: list[tuple[str, str, str | None]]
    test: list[tuple[str, str, str | None]]
    failed: list[dict]


def discover(root_or_datalist: str | os.PathLike) -> Inventory:
    """List a dataset's cases from a FLARE23-layout folder or a MONAI datalist JSON.

    Raises:
        ValueError: neither a folder with ``imagesTr`` / an unlabelled folder, nor a datalist JSON.
    """
    root = Path(root_or_datalist)
    failed: list[dict] = []
    if root.is_file():
        return _discover_datalist(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such dataset folder or datalist JSON")
    training: list = list(_pairs(root / LAYOUT["images"], root / LAYOUT["labels"], failed))
    for folder in UNLABELLED_FOLDERS:
        training += [(case_name(p), str(p), None) for p in _cases(root / folder)]
    if not training and not failed:
        raise ValueError(f"{root}: no {LAYOUT['images']}/*_0000.nii.gz or {LAYOUT['unlabelled']}/*_0000.nii.gz: not a FLARE23-layout folder")
    validation = _pairs(root / LAYOUT["validation_images"], root / LAYOUT["validation_labels"], failed)
    test = _pairs(root / LAYOUT["test_images"], root / LAYOUT["test_labels"], failed)
    return Inventory(training, validation, test, failed)


def _discover_datalist(path: Path) -> Inventory:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a datalist JSON ({err})") from None
    base = path.parent

    def entries(key: str) -> list[tuple[str, str, str | None]]:
        out = []
        for item in data.get(key) or []:
            item = {"image": item} if isinstance(item, str) else item
            image = os.path.normpath(os.path.join(base, item["image"]))
            label = item.get("label")
            label = os.path.normpath(os.path.join(base, label)) if label else None
            out.append((case_name(image), image, label))
        return out

    training = entries("training") + entries("unlabeled") + entries("unlabelled")
    if not training:
        raise ValueError(f"{path}: datalist has no 'training' or 'unlabeled' entries")
    return Inventory(training, entries("validation"), entries("test"), [])


# ----------------------------------------------------------------------------- reading
def check_data_length(path: str | os.PathLike, header) -> None:
    """Raise :class:`ImageError` when a NIfTI's voxel data is shorter than its header says.

    A truncated download or copy has a good header, so header-only triage would pass it and the
    training run would fail when it first loads it. Reading every image in full costs minutes on
    a FLARE-sized set; this costs one ``stat`` (uncompressed) or the gzip trailer's length field
    (the last 4 bytes), and streams the file once only when that field disagrees (a truncated
    file, or a gzip of several members).

    Args:
        path: the NIfTI file.
        header: its nibabel header (data offset, shape and type give the length needed).
    """
    import gzip
    import zlib

    need = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * np.dtype(header.get_data_dtype()).itemsize
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
        size = os.fstat(f.fileno()).st_size
        if compressed and size >= 20:
            f.seek(-4, os.SEEK_END)
            trailer = int.from_bytes(f.read(4), "little")  # uncompressed length mod 2^32 (RFC 1952)
    if not compressed:
        if size < need:
            raise ImageError(path, f"voxel data cut short: the file holds {size:,} of the {need:,} bytes its header needs (truncated)")
        return
    if size >= 20 and trailer == need % 2**32:
        return
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise ImageError(path, f"voxel data cut short or corrupt ({type(err).__name__}: {err})") from None
    if total < need:
        raise ImageError(path, f"voxel data cut short: {total:,} of the {need:,} bytes its header needs (truncated)")


def _image_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an image from its header only (NIfTI; the data's length checked by
    :func:`check_data_length`); other formats are loaded."""
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        array, affine = load_image(path)
        return tuple(array.shape), affine
    if not path.exists():
        raise ImageError(path, "no such file or folder")
    try:
        image = nib.load(str(path))
        shape, affine = tuple(int(s) for s in image.shape), np.asarray(image.affine, float)
    except Exception as err:  # nibabel raises many kinds for a bad file
        raise ImageError(path, f"not a readable NIfTI image ({type(err).__name__}: {err})") from None
    check_data_length(path, image.header)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 2:
        raise ImageError(path, f"expected a 3D volume, got an array of shape {shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageError(path, "has a degenerate voxel-to-world affine")
    return shape, affine


def inspect_case(name: str, image: str, label: str | None, verify_image: bool = False) -> CaseRecord:
    """Read one case: the image's header (or all of it with ``verify_image``), the label in full.

    Returns:
        a :class:`CaseRecord` with set A (organ classes present) and the tumor flag.

    Raises:
        ImageError: unreadable image or label, or a label not on the image's grid.
    """
    if verify_image:
        array, affine = load_image(image, dtype=np.int16)
        shape = tuple(array.shape)
        del array
    else:
        shape, affine = _image_header(image)
    record = CaseRecord(name, str(image), None if label is None else str(label))
    record.shape = [int(s) for s in shape]
    record.spacing_mm = [round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))]
    if label is not None:
        labels, _ = load_label(label, shape, affine)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=TUMOR + 1))
        record.organs = sorted(int(v) for v in present if v in ORGAN_CLASSES)
        record.tumor = bool(TUMOR in present)
    return record


def _sha1_order(names: Sequence[str]) -> list[int]:
    return sorted(range(len(names)), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())


# ----------------------------------------------------------------------------- triage
def triage_dataset(
    root_or_datalist: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    fingerprint: bool = True,
    validation_share: float = 0.2,
    fingerprint_cases: int = 100,
    verify_images: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> TriageResult:
    """Sort a dataset into the paper's categories and write the datalists of every stage.

    Args:
        root_or_datalist: FLARE23-layout folder or MONAI datalist JSON.
        out_dir: where the JSON files go (default ``<root>/prepared``, or ``prepared/`` beside
            the datalist JSON).
        fingerprint: also compute ``fingerprint.json`` (reads the sampled images in full).
        validation_share: without a validation folder, share of the fully labelled cases held
            out for validation (at least one when there are two or more).
        fingerprint_cases: at most this many labelled cases enter the fingerprint.
        verify_images: read every image in full (also finds corrupt data within a file of the
            right length; slower) instead of its header and data length only.
        seed: voxel sampling seed of the fingerprint.
        progress: show a tqdm progress bar.

    Returns:
        a :class:`TriageResult`; the files are written to ``out_dir``.

    Raises:
        ValueError: the input is not a dataset at all. Unreadable cases are not an error: they are
            listed in ``failed`` and skipped.
    """
    from tqdm import tqdm

    root = Path(root_or_datalist)
    out = Path(out_dir) if out_dir is not None else (root / "prepared" if root.is_dir() else root.parent / "prepared")
    out.mkdir(parents=True, exist_ok=True)
    inventory = discover(root)
    failed = list(inventory.failed)
    found: dict[str, list[CaseRecord]] = {"training": [], "validation": [], "test": []}
    jobs = [(split, entry) for split in found for entry in getattr(inventory, split)]
    for split, (name, image, label) in tqdm(jobs, desc="triage", unit="case", disable=not progress):
        try:
            found[split].append(inspect_case(name, image, label, verify_images))
        except ImageError as err:
            failed.append(_failure(err))
    cases, validation, test = found["training"], found["validation"], found["test"]

    # validation: the folder, else a deterministic held-out share of the fully labelled cases
    if validation:
        validation_source = "folder"
    else:
        fully = [c for c in cases if c.labelled and c.organ_category == FULLY]
        n_hold = 0 if len(fully) < 2 else min(max(1, int(round(validation_share * len(fully)))), len(fully) - 1)
        for i in _sha1_order([c.name for c in fully])[:n_hold]:
            fully[i].held_out = True
        validation = [c for c in fully if c.held_out]
        validation_source = "held_out_fully_labelled" if validation else "none"

    outputs: dict[str, str] = {}
    if fingerprint:
        fp = _fingerprint(cases, fingerprint_cases, seed, failed)
        if fp is not None:
            outputs["fingerprint"] = str(fp.save(out / "fingerprint.json"))

    counts = category_counts({"organs": c.organs, "tumor": c.tumor, "labelled": c.labelled} for c in cases)
    counts["validation"] = len(validation)
    counts["test"] = len(test)
    outputs.update(_write_datalists(out, cases, validation, test, validation_source))
    result = TriageResult(cases, validation, test, failed, counts, validation_source, outputs)

    def describe(c: CaseRecord) -> dict:
        d = {"image": os.path.relpath(c.image, out), "label": None if c.label is None else os.path.relpath(c.label, out)}
        d.update(organs=c.organs, tumor=c.tumor, shape=c.shape, spacing_mm=c.spacing_mm)
        if c.label is not None:
            d["organ_category"] = c.organ_category
        if c.held_out:
            d["held_out_for_validation"] = True
        return d

    report = {
        "source": str(root.resolve()),
        "counts": counts,
        "validation_source": validation_source,
        "failed": failed,
        "outputs": {k: os.path.relpath(v, out) for k, v in outputs.items()},
        "cases": {c.name: describe(c) for c in cases},
        "validation": {c.name: describe(c) for c in found["validation"]},
        "test": {c.name: describe(c) for c in test},
    }
    outputs["triage"] = str(write_text_atomic(out / "triage.json", json.dumps(report, indent=1) + "\n"))
    return result


def _fingerprint(cases: list[CaseRecord], max_cases: int, seed: int, failed: list[dict]):
    """Fingerprint over a SHA-1-ordered sample of labelled training cases with foreground.

    A case whose image turns out unreadable here is moved to ``failed`` (and dropped from
    ``cases``), and the fingerprint is retried without it.
    """
    from stmt_monai.preprocessing.fingerprint import foreground_fingerprint

    while True:
        usable = [c for c in cases if c.labelled and not c.held_out and (c.organs or c.tumor)]
        sample = [usable[i] for i in _sha1_order([c.name for c in usable])[:max_cases]]
        if not sample:
            return None
        try:
            return foreground_fingerprint([(c.image, c.label) for c in sample], seed=seed)
        except ImageError as err:
            bad = [c for c in sample if err.path in (c.image, c.label)]
            if not bad:
                raise
            failed.append(_failure(err))
            cases.remove(bad[0])


def _write_datalists(out: Path, cases: list[CaseRecord], validation: list[CaseRecord], test: list[CaseRecord], validation_source: str) -> dict[str, str]:
    def rel(path: str) -> str:
        return os.path.relpath(path, out)

    def labelled_entry(c: CaseRecord, **extra) -> dict:
        return {"image": rel(c.image), "label": rel(c.label), "name": c.name, **extra}

    val_entries = [labelled_entry(c) for c in validation]
    training = [c for c in cases if not c.held_out]
    fully = [labelled_entry(c, tumor=c.tumor) for c in training if c.labelled and c.organ_category == FULLY]
    jobs = []
    for c in training:
        if c.labelled and c.organ_category == PARTIAL:
            jobs.append(labelled_entry(c, kind="partial", organs=c.organs))
        elif not c.labelled:
            jobs.append({"image": rel(c.image), "name": c.name, "kind": "unlabelled"})
        elif c.organ_category == NON_ORGAN:
            # no organ annotated: a plain pseudo label, but an annotated tumor is written into it
            # (stage 1 reads these pseudo labels: the tumor is abdomen foreground)
            jobs.append(labelled_entry(c, kind="unlabelled", organs=[]))
    tumor = [labelled_entry(c, organs=c.organs) for c in training if c.labelled and c.tumor]
    lists = {
        "fully_labelled": {
            "description": "fully organ labelled cases (all 13 organs): stage 1 and organ teacher training",
            "training": fully,
            "validation": val_entries,
        },
        "pseudo_label_jobs": {
            "description": "cases the organ teacher pseudo-labels: kind 'partial' (corrected with its label's organ set 'organs') or 'unlabelled'",
            "training": jobs,
        },
        "tumor": {"description": "tumor annotated cases: tumor mean-teacher training", "training": tumor, "validation": val_entries},
        "validation": {"description": f"validation cases ({validation_source})", "validation": val_entries},
    }
    if test:
        lists["validation"]["test"] = [labelled_entry(c) for c in test]
    return {kind: str(write_text_atomic(out / DATALISTS[kind], json.dumps(data, indent=1) + "\n")) for kind, data in lists.items()}
