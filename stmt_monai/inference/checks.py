"""Is this input a CT the cascade can segment? Plausibility checks before and just after stage 1.

The networks segment anything they are given: a binary mask, an MR volume, a CT whose spacing
is in metres all come out as organ masks and a report with wrong numbers. These checks say so,
each as an :class:`~stmt_monai.io.InputWarning` (a kind and one line) that
:func:`stmt_monai.inference.batch.segment_case` logs and writes into the report's ``warnings``;
with ``strict`` (``stmt-segment --strict``) the first one fails the case instead
(:func:`raise_if_strict`).

Before the networks (:func:`check_input`):

- ``non_finite``: NaN / Inf voxels are counted and replaced by the lowest finite value (air or
  padding); a volume without any finite voxel is refused;
- ``intensity``: the values are not CT Hounsfield units (:func:`intensity_findings`): judged from
  robust percentiles and the air (-1000 HU) and fat / soft-tissue (-200..300 HU) populations of a
  voxel sample, not from one threshold: a label map or mask (few distinct integers), a range
  far narrower than HU (normalised, scaled, PET), stored DICOM values without their rescale
  (the same populations 1000, 1024 or 32768 higher), MR-like (no negative values, no fat or
  soft tissue near 0);
- ``spacing``: a voxel size below :data:`MIN_SPACING_MM` or a field of view narrower than
  :data:`MIN_FIELD_OF_VIEW_MM` (metres or centimetres written as mm), or a voxel size above
  :data:`MAX_SPACING_MM`.

Before reading (:func:`check_memory`): the cascade's peak memory, estimated from the header's
shape (:func:`estimate_peak_bytes`), against the memory available (``psutil``) or a stated
bound; a case that does not fit is refused up front with both numbers rather than killed by the
operating system midway.

After stage 1 (:func:`field_of_view_findings`): ``field_of_view``: stage 1 found no abdomen, or
less than :data:`MIN_ABDOMEN_ML` of it. The mask is still written (stage 2 runs on the whole
volume when stage 1 finds nothing, as before), and the warning says that it is unreliable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from stmt_monai.io import ImageError, InputWarning

logger = logging.getLogger(__name__)


#: voxel sizes outside this range (mm) are not those of a clinical CT
MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 10.0


#: a field of view narrower than this at its widest (mm) holds no abdomen (a spacing in cm, say)
MIN_FIELD_OF_VIEW_MM = 100.0


#: less abdomen than this (ml, stage 1's mask) is "too little of it": the organs of a whole adult
#: abdomen fill about 2-4 l (the demo weights find 2.1 l on the shipped CT, 0.5 l on its 4 cm DICOM slab)
MIN_ABDOMEN_ML = 300.0


#: the path of an :class:`ImageError` about a volume given as an array (the caller names the file)
VOLUME = "<volume>"


#: voxels sampled at most by the intensity check (a regular stride through the volume)
SAMPLE_VOXELS = 2_000_000


#: HU ranges of the populations every abdominal CT has
AIR_HU = (-1100.0, -850.0)
TISSUE_HU = (-200.0, 300.0)
FAT_HU = (-150.0, -50.0)
SOFT_TISSUE_HU = (-50.0, 150.0)


#: offsets of stored DICOM values from HU (RescaleIntercept -1024, -1000; unsigned with -32768)
RAW_OFFSETS = (1024.0, 1000.0, 32768.0)


#: bytes per voxel of the input at the cascade's peak outside the networks: the float32 volume,
#: its canonical copy, the stage-2 crop, and the uint8 label maps restored to full size
BYTES_PER_VOXEL = 16


#: bytes of network activations per (base channel x network input voxel) of the largest stage:
#: 512 x 512 x 300 at the paper's sizes peaks at 4.1 GB RSS, ~3.4 GB of it the 192^3 networks (16 channels)
NETWORK_BYTES_PER_CHANNEL_VOXEL = 32


# ----------------------------------------------------------------------------- helpers
def _sample(image: np.ndarray, max_voxels: int = SAMPLE_VOXELS) -> np.ndarray:
    """A regular-stride sample of the volume's voxels (a view per axis, then raveled)."""
    stride = max(1, int(np.ceil((image.size / max_voxels) ** (1 / 3))))
    return np.asarray(image[::stride, ::stride, ::stride], np.float32).ravel()


def _fraction(values: np.ndarray, low: float, high: float) -> float:
    return float(np.mean((values >= low) & (values <= high))) if values.size else 0.0


def _looks_like_hu(values: np.ndarray) -> bool:
    """Air and / or fat at their HU, and a body (values above -500) centred on fat and soft
    tissue with a good share of soft tissue proper (-50..150 HU: organs, muscle)."""
    body = values[values > -500.0]
    if body.size < 0.02 * values.size:
        return False
    centred = TISSUE_HU[0] <= float(np.median(body)) <= TISSUE_HU[1]
    soft = _fraction(body, *SOFT_TISSUE_HU) >= 0.15
    air_or_fat = _fraction(values, *AIR_HU) >= 0.01 or _fraction(values, *FAT_HU) >= 0.03
    bounded = float(np.percentile(values, 99.5)) <= 4000.0
    return centred and soft and air_or_fat and bounded


def _air_offset_error(values: np.ndarray) -> float:
    """How far the air population of HU-like values sits from -1000 (median, in HU)."""
    air = values[(values >= AIR_HU[0]) & (values <= AIR_HU[1])]
    return abs(float(np.median(air)) + 1000.0) if air.size else 0.0


def _percentiles(values: np.ndarray) -> str:
    p = np.percentile(values, [0.5, 50, 99.5])
    return "/".join(f"{v:.4g}" for v in p)


# ----------------------------------------------------------------------------- the checks
def replace_non_finite(image: np.ndarray) -> tuple[np.ndarray, list[InputWarning]]:
    """NaN and +-Inf voxels replaced by the lowest finite value.

    Args:
        image: ``(X, Y, Z)`` volume of any type; an integer one is returned as it is (it cannot
            hold NaN), a float one is copied only when it has non-finite voxels and is read-only.

    Returns:
        ``(image, findings)``; one ``non_finite`` finding when there were any.

    Raises:
        ImageError: no finite voxel at all (path :data:`VOLUME`; the caller names the file).
    """
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        return image, []
    finite = np.isfinite(image)
    bad = int(image.size - np.count_nonzero(finite))
    if not bad:
        return image, []
    if bad == image.size:
        raise ImageError(VOLUME, "holds no finite voxel value (all NaN or Inf)")
    nan = int(np.count_nonzero(np.isnan(image)))
    fill = float(image[finite].min())
    if not image.flags.writeable:
        image = image.copy()
    image[~finite] = fill
    share = 100.0 * bad / image.size
    kinds = ", ".join(f"{n:,} {k}" for n, k in ((nan, "NaN"), (bad - nan, "Inf")) if n)
    return image, [
        InputWarning("non_finite", f"{bad:,} non-finite voxels ({kinds}; {share:.2g} % of the volume) replaced by {fill:g}, the lowest finite value")
    ]


def intensity_findings(image: np.ndarray) -> list[InputWarning]:
    """``intensity`` findings: is this volume in CT Hounsfield units?

    Args:
        image: ``(X, Y, Z)`` values, finite.

    Returns:
        [] for a plausible CT, else one finding saying what the values look like instead.
    """
    values = _sample(image)
    values = values[np.isfinite(values)]
    if not values.size:
        return []
    distinct = np.unique(values[: 1_000_000])
    if distinct.size <= 32 and np.all(np.mod(distinct, 1) == 0):
        shown = ", ".join(f"{v:g}" for v in distinct[:8]) + (", ..." if distinct.size > 8 else "")
        what = "a binary mask" if distinct.size <= 2 else "a label map"
        return [InputWarning("intensity", f"holds only {distinct.size} distinct integer values ({shown}): {what}, not a CT")]
    p05, p995 = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if p995 - p05 < 100.0:
        return [
            InputWarning(
                "intensity",
                f"intensities span only {p05:.3g} to {p995:.3g} (0.5 to 99.5 percentile), far narrower than CT HU (air -1000, soft tissue 0-100): "
                "normalised, rescaled or not a CT",
            )
        ]
    if _looks_like_hu(values):
        return []
    offsets = [offset for offset in RAW_OFFSETS if _looks_like_hu(values - offset)]
    if offsets:
        offset = min(offsets, key=lambda o: _air_offset_error(values - o))
        return [
            InputWarning(
                "intensity",
                f"intensities look like stored DICOM values without their rescale: air and soft tissue sit about {offset:g} above their HU "
                f"(percentiles 0.5/50/99.5 = {_percentiles(values)}); apply RescaleIntercept (about {-offset:g}) when converting",
            )
        ]
    if p05 >= -100.0:
        return [
            InputWarning(
                "intensity",
                f"intensities are not CT HU: no air near -1000 and no fat or soft tissue near 0 (percentiles 0.5/50/99.5 = {_percentiles(values)}): MR-like or other non-CT values",
            )
        ]
    return [InputWarning("intensity", f"intensities are not CT HU: no air near -1000 and no fat or soft tissue near 0 (percentiles 0.5/50/99.5 = {_percentiles(values)})")]


def spacing_findings(affine: np.ndarray, shape: Sequence[int] | None = None) -> list[InputWarning]:
    """``spacing`` findings: voxel sizes outside :data:`MIN_SPACING_MM` .. :data:`MAX_SPACING_MM`,
    or (given the shape) a field of view under :data:`MIN_FIELD_OF_VIEW_MM` at its widest.

    A spacing that fits once multiplied by 1000 or 10 is named as metres or centimetres.
    """
    spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
    extent = spacing * np.asarray(shape[:3], float) if shape is not None else None
    shown = " x ".join(f"{s:.4g}" for s in spacing)
    small = spacing.min() < MIN_SPACING_MM
    narrow = extent is not None and extent.max() < MIN_FIELD_OF_VIEW_MM
    if small or narrow:
        what = (
            f"voxel spacing {shown} mm is implausibly small (< {MIN_SPACING_MM:g} mm)"
            if small
            else f"the field of view spans only {extent.max():.3g} mm at its widest (voxel spacing {shown} mm): too small for an abdomen"
        )
        for factor, unit in ((1000.0, "metres"), (10.0, "centimetres")):
            scaled = spacing * factor
            if MIN_SPACING_MM <= scaled.min() and scaled.max() <= MAX_SPACING_MM and (extent is None or extent.max() * factor >= MIN_FIELD_OF_VIEW_MM):
                return [
                    InputWarning(
                        "spacing",
                        f"{what}: written in {unit}? (x{factor:g} = {' x '.join(f'{s:.3g}' for s in scaled)} mm); "
                        f"volumes in the report are off by {factor ** 3:g}x",
                    )
                ]
        return [InputWarning("spacing", f"{what} for a CT")]
    if spacing.max() > MAX_SPACING_MM:
        return [InputWarning("spacing", f"voxel spacing {shown} mm is above {MAX_SPACING_MM:g} mm: too coarse for organ segmentation, or not in mm")]
    return []


def check_input(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[InputWarning]]:
    """The checks before the networks: non-finite voxels (replaced), intensities, spacing.

    Args:
        image: ``(X, Y, Z)`` volume.
        affine: its 4 x 4 voxel-to-world affine (mm).

    Returns:
        ``(image, findings)``: every voxel finite (integer volumes as they are, float ones as
        float32); the findings in that order.

    Raises:
        ImageError: no finite voxel.
    """
    image, findings = replace_non_finite(image)
    findings += intensity_findings(image)
    findings += spacing_findings(affine, image.shape)
    return image, findings


def field_of_view_findings(mask_net, geometry, min_abdomen_ml: float = MIN_ABDOMEN_ML) -> tuple[float, list[InputWarning]]:
    """``field_of_view`` findings from stage 1's abdomen mask.

    Args:
        mask_net: ``(X', Y', Z')`` (or with a leading channel) stage-1 labels at network resolution.
        geometry: the stage-1 input's :class:`~stmt_monai.preprocessing.geometry.CaseGeometry`.
        min_abdomen_ml: less abdomen than this is reported.

    Returns:
        ``(abdomen_ml, findings)``: the abdomen's volume in ml, and a finding when there is none
        or too little of it.
    """
    mask = np.asarray(mask_net.detach().cpu() if hasattr(mask_net, "detach") else mask_net)
    mask = mask.reshape(mask.shape[-3:]) > 0
    voxel_ml = float(np.prod(np.asarray(geometry.roi_shape) * geometry.spacing / np.asarray(mask.shape))) / 1000.0
    ml = float(np.count_nonzero(mask)) * voxel_ml
    if ml == 0.0:
        return ml, [
            InputWarning(
                "field_of_view",
                "stage 1 found no abdomen in the field of view: stage 2 ran on the whole volume; the mask is written but unreliable",
            )
        ]
    if ml < min_abdomen_ml:
        return ml, [
            InputWarning(
                "field_of_view",
                f"stage 1 found only {ml:.0f} ml of abdomen (a whole abdomen's organs fill about 2-4 l; below {min_abdomen_ml:g} ml is too little): "
                "the field of view holds little of the abdomen; the mask is written, organs outside the field of view are missing",
            )
        ]
    return ml, []


# ----------------------------------------------------------------------------- memory
def volume_header(path) -> tuple[tuple[int, ...], int]:
    """Shape ``(X, Y, Z)`` and bytes per stored voxel of an input, from its header only.

    Args:
        path: a NIfTI / ITK file, a DICOM series folder or a :class:`~stmt_monai.dicom.DicomSeries`.

    Raises:
        ImageError: the header cannot be read (the same file fails to load as well).
    """
    from stmt_monai import formats

    if not isinstance(path, (str, os.PathLike)) or Path(path).is_dir():
        from stmt_monai import dicom  # SimpleITK: only for DICOM (a NIfTI case does not import it)

        return tuple(dicom.series_shape(path)), 2
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file or folder")
    kind = formats.sniff(path) or formats.by_name(path)
    if kind in ("nifti", "nifti-gz"):
        import nibabel as nib

        with formats.content_alias(path, kind) as alias:
            try:
                header = nib.load(str(alias)).header
            except Exception as err:  # noqa: BLE001 - nibabel raises many kinds for a bad file
                raise ImageError(path, f"not a readable NIfTI image ({type(err).__name__}: {err})") from None
            return tuple(int(s) for s in header.get_data_shape()), int(np.dtype(header.get_data_dtype()).itemsize)
    import SimpleITK as sitk

    from stmt_monai.dicom import itk_messages

    reader = sitk.ImageFileReader()
    try:
        if kind in formats.SUFFIXES:
            with formats.content_alias(path, kind) as alias, itk_messages():
                reader.SetFileName(str(alias))
                reader.ReadImageInformation()
        else:
            with itk_messages():
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageError(path, f"not a readable image ({str(err).strip().splitlines()[-1]})") from None
    itemsize = int(np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())).dtype).itemsize)
    return tuple(int(s) for s in reader.GetSize()), itemsize


def estimate_peak_bytes(shape: Sequence[int], stored_itemsize: int = 2, network_sizes: Iterable[tuple[int, Sequence[int]]] = ()) -> int:
    """The cascade's peak memory for one case above the process at rest, in bytes.

    ``N x (stored bytes + BYTES_PER_VOXEL)`` (the file's array while it is converted, then the
    float32 volume, its canonical copy, the stage-2 crop and the full-size label maps) plus the
    largest network's activations (``NETWORK_BYTES_PER_CHANNEL_VOXEL x channels x input voxels``).

    Args:
        shape: the input's ``(X, Y, Z)``.
        stored_itemsize: bytes per voxel in the file (2 for int16 CT).
        network_sizes: ``(base_channels, spatial_size)`` of each stage.
    """
    voxels = int(np.prod([int(s) for s in shape[:3]]))
    network = max((NETWORK_BYTES_PER_CHANNEL_VOXEL * int(c) * int(np.prod(size)) for c, size in network_sizes), default=0)
    return voxels * (int(stored_itemsize) + BYTES_PER_VOXEL) + network


def available_bytes() -> int:
    """Memory the system can give this process now (``psutil.virtual_memory().available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def network_sizes(models) -> list[tuple[int, tuple[int, ...]]]:
    """``(base_channels, spatial_size)`` of each loaded stage (``{stage: StageModel}``), for
    :func:`estimate_peak_bytes`; 32 channels where a bundle does not say."""
    return [(int(m.settings.get("base_channels") or 32), tuple(m.spatial_size)) for m in models.values()]


def check_memory(path, network_sizes: Iterable[tuple[int, Sequence[int]]] = (), limit_bytes: int | None = None) -> int | None:
    """Refuse a case whose estimated peak does not fit, before reading its voxels.

    Args:
        path: the case (anything :func:`volume_header` reads).
        network_sizes: as :func:`estimate_peak_bytes`.
        limit_bytes: the bound to stay within; default :func:`available_bytes` (at this moment).

    Returns:
        the estimate in bytes; None when the header cannot be read (reading the case will say why).

    Raises:
        ImageError: the estimate exceeds the bound (both numbers in the message).
    """
    try:
        shape, itemsize = volume_header(path)
    except ImageError:
        return None
    need = estimate_peak_bytes(shape, itemsize, network_sizes)
    bound, source = (int(limit_bytes), "allowed (--max_memory_gb)") if limit_bytes is not None else (available_bytes(), "available")
    if need > bound:
        raise ImageError(
            path,
            f"too large for the memory at hand: {' x '.join(str(s) for s in shape[:3])} voxels need about {need / 1e9:.2f} GB at the cascade's peak, "
            f"{bound / 1e9:.2f} GB {source}; refused before reading (free memory, or crop or resample the volume)",
        )
    return need


# ----------------------------------------------------------------------------- strict
def raise_if_strict(findings: Sequence[InputWarning], strict: bool, path: str | os.PathLike) -> None:
    """With ``strict``, the first finding fails the case (``ImageError`` naming ``path``)."""
    if strict and findings:
        first = findings[0]
        more = f" (and {len(findings) - 1} more warning(s))" if len(findings) > 1 else ""
        raise ImageError(path, f"--strict: {first.kind}: {first.message}{more}")
