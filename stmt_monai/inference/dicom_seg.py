"""A FLARE label map as a DICOM Segmentation object (DICOM SEG) of the series it was made from.

What PACS viewers and OHIF read back: one segment per label present, named after the FLARE label
(:data:`stmt_monai.labels.LABELS`) and coded with SNOMED CT concepts (:func:`segment_codes`: the
segmented property category, "Anatomical Structure" for the organs and "Morphologically Altered
Structure" for the tumor, and type, from pydicom's code dictionary, with a laterality modifier for
the kidneys and adrenal glands), one frame per source slice and segment that holds it, each frame
referencing its source CT image. Written with highdicom.

:func:`write_dicom_seg` re-encodes the NIfTI mask of a DICOM case (``stmt-segment --dicom_seg``):
each source slice's pixels are mapped through the slice's position and orientation (DICOM LPS
mm) to the mask's voxels (its affine, RAS mm), so the SEG holds exactly the mask's labels on the
source grid, whatever voxel order the mask was written in.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from stmt_monai.io import ImageError, atomic_write
from stmt_monai.labels import LABELS, TUMOR

#: name of a case's DICOM SEG beside its mask: ``<case>_seg.dcm``
SEG_SUFFIX = "_seg.dcm"
#: DICOM LPS <-> NIfTI RAS (flip the first two world axes)
_LPS = np.array([-1.0, -1.0, 1.0])


@functools.lru_cache(maxsize=1)
def segment_codes() -> Mapping[int, tuple]:
    """``{FLARE label: (category, type, laterality modifier or None)}``, SNOMED CT concepts from
    pydicom's code dictionary (built on first use: it imports highdicom), for every label of
    :data:`stmt_monai.labels.LABELS`."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    sct = codes.SCT
    anatomy = sct.AnatomicalStructure
    # DICOM CID 7150 (segmentation property categories); pydicom's dictionary lacks its name
    altered = CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
    types = {
        "liver": (sct.Liver, None),
        "right_kidney": (sct.Kidney, sct.Right),
        "spleen": (sct.Spleen, None),
        "pancreas": (sct.Pancreas, None),
        "aorta": (sct.Aorta, None),
        "inferior_vena_cava": (sct.InferiorVenaCava, None),
        "right_adrenal_gland": (sct.AdrenalGland, sct.Right),
        "left_adrenal_gland": (sct.AdrenalGland, sct.Left),
        "gallbladder": (sct.Gallbladder, None),
        "esophagus": (sct.Esophagus, None),
        "stomach": (sct.Stomach, None),
        "duodenum": (sct.Duodenum, None),
        "left_kidney": (sct.Kidney, sct.Left),
    }
    table = {number: (anatomy, *types[name]) for number, name in LABELS.items() if number != TUMOR}
    table[TUMOR] = (altered, sct.Neoplasm, None)
    return MappingProxyType(table)


def read_series(folder: str | os.PathLike, shape: Sequence[int] | None = None) -> list:
    """The images of a DICOM series folder as pydicom datasets, in slice order (along the slice
    normal). A folder with several series: the one whose grid has ``shape`` (rows x columns x
    slices, in any axis order), else the largest.

    Raises:
        ImageError: no DICOM image in the folder, or no series with that grid.
    """
    import pydicom

    series: dict[str, list] = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if "ImagePositionPatient" not in dataset or "PixelData" not in dataset:
            continue
        # anonymisers often blank the dataset's SOP UIDs and keep the file meta's
        for tag, meta in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not dataset.get(tag) and getattr(dataset, "file_meta", None) is not None and dataset.file_meta.get(meta):
                setattr(dataset, tag, dataset.file_meta.get(meta))
        missing = [tag for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not dataset.get(tag)]
        if missing:
            raise ImageError(path, f"no {', '.join(missing)} (anonymised?): a DICOM SEG must reference the source images by them")
        series.setdefault(str(dataset.SeriesInstanceUID), []).append(dataset)
    if not series:
        raise ImageError(folder, "no DICOM image to reference in a DICOM SEG")
    candidates = list(series.values())
    if shape is not None:
        size = sorted(int(s) for s in shape)
        candidates = [s for s in candidates if sorted((int(s[0].Rows), int(s[0].Columns), len(s))) == size] or []
        if not candidates:
            raise ImageError(folder, f"no DICOM series has the mask's grid {tuple(shape)}")
    images = max(candidates, key=len)
    normal = np.cross(*np.reshape(np.asarray(images[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(images, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))


def slice_labels(labels: np.ndarray, affine: np.ndarray, image) -> np.ndarray:
    """The labels at each pixel of one DICOM image: ``(Rows, Columns)``.

    Pixel ``(r, c)`` lies at ``ImagePositionPatient + c * ΔC * row_direction + r * ΔR *
    column_direction`` (LPS mm; ``PixelSpacing = [ΔR, ΔC]``), taken to the mask's voxel by the
    inverse of its ``affine`` (RAS mm) and read by nearest voxel; outside the mask is 0.
    """
    rows, cols = int(image.Rows), int(image.Columns)
    row_dir, col_dir = np.reshape(np.asarray(image.ImageOrientationPatient, float), (2, 3))
    spacing_r, spacing_c = (float(v) for v in image.PixelSpacing)
    # world (LPS) -> mask voxel is affine, so each pixel's voxel is origin + r * step_r + c * step_c
    to_voxel = np.linalg.inv(np.asarray(affine, float))
    origin = to_voxel[:3, :3] @ (np.asarray(image.ImagePositionPatient, float) * _LPS) + to_voxel[:3, 3]
    step_r = to_voxel[:3, :3] @ (col_dir * spacing_r * _LPS)
    step_c = to_voxel[:3, :3] @ (row_dir * spacing_c * _LPS)
    out = np.zeros((rows, cols), dtype=labels.dtype)
    voxel = [np.rint(o + np.arange(rows)[:, None] * sr + np.arange(cols)[None, :] * sc).astype(np.int64) for o, sr, sc in zip(origin, step_r, step_c)]
    inside = np.ones((rows, cols), bool)
    for index, size in zip(voxel, labels.shape):
        inside &= (index >= 0) & (index < size)
    out[inside] = labels[tuple(index[inside] for index in voxel)]
    return out


def write_dicom_seg(
    mask: str | os.PathLike,
    series: str | os.PathLike,
    output: str | os.PathLike,
    series_number: int = 999,
    algorithm: str = "StMt cascade (stmt-monai)",
) -> Path:
    """Write a FLARE label map as the DICOM SEG of the DICOM series it was made from.

    Args:
        mask: the label map (NIfTI, 0 background, FLARE labels 1..14) on the series' grid, as
            ``stmt-segment`` writes it.
        series: the DICOM series folder it was made from (:func:`read_series`).
        output: the ``.dcm`` to write (atomically).
        series_number: the SEG series' number.
        algorithm: the algorithm name recorded with each segment.

    Returns:
        ``output``.

    Raises:
        ImageError: the series or the mask cannot be used (no DICOM image with the mask's grid, no
            label at all, a label not in FLARE's table).
    """
    import highdicom as hd
    import nibabel as nib
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    import stmt_monai

    image = nib.load(str(mask))
    labels = np.asarray(image.dataobj).astype(np.uint8)
    sources = read_series(series, labels.shape)
    present = [int(v) for v in np.unique(labels) if v]
    unknown = [v for v in present if v not in LABELS]
    if unknown:
        raise ImageError(mask, f"labels {unknown} are not FLARE labels (1..{max(LABELS)})")
    if not present:
        raise ImageError(mask, "no label to write as a DICOM SEG segment")
    # segment numbers 1..N in label order (DICOM's), a frame per source image
    numbers = np.zeros(256, dtype=np.uint8)
    numbers[present] = np.arange(1, len(present) + 1)
    frames = np.stack([numbers[slice_labels(labels, image.affine, source)] for source in sources])
    algorithm_id = hd.AlgorithmIdentificationSequence(name=algorithm, version=stmt_monai.__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, label in enumerate(present, start=1):
        category, kind, modifier = segment_codes()[label]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=LABELS[label],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
        )
        if modifier is not None:
            description.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(modifier)]
        descriptions.append(description)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="stmt-monai",
        manufacturer_model_name="StMt cascade",
        software_versions=stmt_monai.__version__,
        device_serial_number="none",
        content_description="FLARE23 organs and tumor",
        omit_empty_frames=True,
    )
    with atomic_write(output) as tmp:
        seg.save_as(tmp)
    return Path(output)
