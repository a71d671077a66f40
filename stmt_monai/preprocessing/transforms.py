"""MONAI transforms of StMt: the single preprocessing builder and the paper's augmentations.

:func:`stage_transforms` is the one builder that every bundle's train, evaluate and inference
configs call (``"$stmt_monai.preprocessing.transforms.stage_transforms(...)"`` or by ``_target_``): it loads a
case, brings it to canonical RAS order, crops the region of interest (stage 2), resamples to
the network size, clips and z-scores with the fingerprint, and maps the label to the stage's
target (:func:`stmt_monai.labels.stage_target_map`; paper section 2.1). With ``train=True`` it
appends the paper's online augmentations of section 3.2 (:func:`augmentations`).

The bundles' evaluate and inference configs undo it with the post-processing transforms here:
:class:`RestoreLabelMapd` (network-resolution labels back to the input's grid),
:class:`ToFlareLabelsd` (channel indices to FLARE labels), :class:`SaveLabelMapd`,
:class:`LoadTargetd` (the target at full resolution, for scoring) and :class:`AbdomenRoid`
(stage 1's region of interest, for stage 2).

The input's geometry travels as MONAI's writers and MONAI Label read it: :class:`LoadStageInputd`
puts the file's ``filename_or_obj``, ``affine`` (= ``original_affine``, RAS mm) and
``spatial_shape`` under ``image_meta_dict`` (:func:`case_meta`), and :class:`RestoreLabelMapd`
returns the restored labels as a :class:`~monai.data.MetaTensor` carrying them, so any MONAI
writer (``SaveImaged``, MONAI Label's ``Restored`` + ``Writer``) keeps the input's grid.
:class:`SaveLabelMapd` is MONAI's ``SaveImaged`` for label maps (FLARE names, uint8, atomic), so
MONAI Label's bundle task, which drops the bundle's ``SaveImaged`` and writes its own answer,
writes nothing into the bundle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapLabelValued,
    MapTransform,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    SaveImaged,
    SpatialPadd,
)
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys

from stmt_monai.io import atomic_write, case_name, load_image, load_label, write_text_atomic
from stmt_monai.labels import STAGES, stage_output_map, stage_target_map
from stmt_monai.preprocessing.fingerprint import Fingerprint
from stmt_monai.preprocessing.geometry import CaseGeometry
from stmt_monai.preprocessing.roi import (
    ROI_MARGIN_MM,
    ROI_MIN_COMPONENT_FRACTION,
    abdomen_roi_from_prediction,
)
from stmt_monai.preprocessing.stage_input import prepare_volume

IMAGE, LABEL, ROI, GEOMETRY, STREAM = "image", "label", "roi", "geometry", "stream"
#: key of the image's voxel-to-world affine between :class:`LoadCased` and :class:`LoadStageInputd`
IMAGE_AFFINE = "image_affine"
#: the input's metadata as MONAI names it (``<key>_meta_dict``; see :func:`case_meta`)
IMAGE_META = f"{IMAGE}_meta_dict"


#: value of an item's ``roi`` that means "no crop: the whole image is the region of interest"
#: (a tumor-only annotation has no organs to give the box, and the tumor's own box is not the abdomen)
WHOLE_IMAGE_ROI = "whole_image"


def as_fingerprint(fingerprint: Fingerprint | Mapping | str | os.PathLike) -> Fingerprint:
    """A :class:`Fingerprint` from itself, a dict, or a JSON file path (as configs give it)."""
    if isinstance(fingerprint, Fingerprint):
        return fingerprint
    if isinstance(fingerprint, Mapping):
        return Fingerprint(**fingerprint)
    return Fingerprint.load(fingerprint)


def case_meta(path: str | os.PathLike, affine: np.ndarray, shape: Sequence[int]) -> dict:
    """An input file's geometry under MONAI's metadata keys, as ``LoadImaged`` would give it.

    Args:
        path: the image file or DICOM folder (``filename_or_obj``: writers name outputs after it).
        affine: its 4 x 4 voxel-to-world matrix, RAS mm (``affine`` and ``original_affine``).
        shape: its spatial shape in the file's voxel order (``spatial_shape``).

    Returns:
        ``{"filename_or_obj", "affine", "original_affine", "spatial_shape", "original_channel_dim",
        "space"}``: what MONAI's ``SaveImaged`` and MONAI Label's ``Restored`` / ``Writer`` read
        to put a label map back on the input's grid.
    """
    affine = np.asarray(affine, dtype=np.float64)
    return {
        ImageMetaKey.FILENAME_OR_OBJ: str(path),
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(shape, dtype=np.int64),
        MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
        MetaKeys.SPACE: SpaceKeys.RAS.value,
    }


def target_lookup(stage: str) -> np.ndarray:
    """Lookup table (256 entries) mapping FLARE labels to the stage's training target."""
    lut = np.arange(256, dtype=np.uint8)
    for orig, new in zip(*stage_target_map(stage)):
        lut[orig] = new
    return lut


class LoadCased(MapTransform):
    """Read a case's files: the deterministic first half of :class:`LoadStageInputd`.

    ``image`` (path: NIfTI, ITK file or DICOM folder) becomes the ``(X, Y, Z)`` float32 HU array in
    the file's voxel order, with its affine under ``image_affine`` and its path under
    ``image_path``; each other key (label maps, e.g. ``label``) becomes its uint8 array on the same
    grid (path under ``<key>_path``); ``roi`` (a mask path) becomes its array. Items already read
    pass unchanged. A ``CacheDataset`` keeps this transform's output (it is not random), so a
    training run reads and decompresses each file once (the region-of-interest jitter, the
    resize and the augmentations that follow stay random).

    Args:
        keys: the image key first, then the label keys.
        roi_key: the key of the region-of-interest mask (or :data:`WHOLE_IMAGE_ROI`).
    """

    def __init__(self, keys: KeysCollection = (IMAGE, LABEL), roi_key: str = ROI, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.roi_key = roi_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_key, *label_keys = self.keys
        if isinstance(d[image_key], np.ndarray):
            return d
        image_path = d[image_key]
        image, affine = load_image(image_path)
        d[image_key], d[IMAGE_AFFINE], d["image_path"] = image, affine, str(image_path)
        for key in label_keys:
            if d.get(key) is not None:
                d[f"{key}_path"] = str(d[key])
                d[key], _ = load_label(d[key], image.shape, affine)
        roi = d.get(self.roi_key)
        if roi is not None and not isinstance(roi, np.ndarray) and roi != WHOLE_IMAGE_ROI:
            d[self.roi_key], _ = load_label(roi, image.shape, affine)
        return d


class LoadStageInputd(MapTransform, Randomizable):
    """Prepare a case for one stage's network (paper section 2.1).

    Input dict: ``image`` (a path, or the arrays of :class:`LoadCased`, which this transform
    runs first when given paths), optional label keys (``label``; e.g. also ``oracle``), optional
    ``roi`` (a mask on the image's grid whose bounding box is the stage-2 region of interest, or
    :data:`WHOLE_IMAGE_ROI` for no crop; without it the first label gives the box in stage 2).
    Output dict: ``image`` ``(1, *spatial_size)`` float32 normalised; each label ``(1,
    *spatial_size)`` uint8 stage target, all cropped with the same box; ``geometry`` a JSON string
    of the :class:`~stmt_monai.preprocessing.geometry.CaseGeometry` (collates as a list of
    strings), used by :class:`RestoreLabelMapd`; paths are kept under ``image_path`` /
    ``<label key>_path``; ``image_meta_dict`` holds the input file's geometry under MONAI's keys
    (:func:`case_meta`), which MONAI's writers and MONAI Label read.

    Args:
        stage: ``"abdomen"`` (whole volume), ``"organ"`` or ``"tumor"`` (region of interest).
        fingerprint: :class:`Fingerprint`, dict or JSON path.
        spatial_size: network input size, e.g. (128,128,128) stage 1, (192,192,192) stage 2.
        keys: the image key, then the label keys.
        roi_margin_mm: margin around the region of interest (stage 2).
        roi_jitter_mm: training: random change of each side's margin, uniform in +-this.
        crop_roi: crop to the region of interest (default: stage 2 yes, stage 1 no).
        target_spacing_mm: resample to this voxel size instead of ``spatial_size`` (give
            ``spatial_size=None``): the teacher's fixed-spacing input for sliding windows.
    """

    def __init__(
        self,
        stage: str,
        fingerprint: Fingerprint | Mapping | str | os.PathLike,
        spatial_size: Sequence[int],
        keys: KeysCollection = (IMAGE, LABEL),
        roi_margin_mm: float = ROI_MARGIN_MM,
        roi_jitter_mm: float = 0.0,
        crop_roi: bool | None = None,
        target_spacing_mm: Sequence[float] | None = None,
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: expected one of {STAGES}")
        self.stage = stage
        self.fingerprint = as_fingerprint(fingerprint)
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.target_spacing_mm = target_spacing_mm
        self.roi_margin_mm = float(roi_margin_mm)
        self.roi_jitter_mm = float(roi_jitter_mm)
        self.crop_roi = stage != "abdomen" if crop_roi is None else bool(crop_roi)
        self.lut = torch.from_numpy(target_lookup(stage))
        self.load = LoadCased(keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = self.load(data)
        image_key, *label_keys = self.keys
        image, affine = d[image_key], d.pop(IMAGE_AFFINE)
        labels = {key: d[key] for key in label_keys if isinstance(d.get(key), np.ndarray)}
        roi_mask = None
        if self.crop_roi:
            roi = d.get(ROI)
            if isinstance(roi, np.ndarray):
                roi_mask = roi
            elif roi is None and labels:
                roi_mask = next(iter(labels.values()))
        net_image, net_labels, geometry = prepare_volume(
            image,
            affine,
            self.spatial_size,
            roi_mask=roi_mask,
            margin_mm=self.roi_margin_mm,
            jitter_mm=self.roi_jitter_mm,
            rng=self.R,
            labels=list(labels.values()),
            target_spacing_mm=self.target_spacing_mm,
        )
        d[image_key] = self.fingerprint.normalize(net_image).float()
        d[f"{image_key}_meta_dict"] = case_meta(d["image_path"], affine, image.shape)
        for key, net_label in zip(labels, net_labels):
            d[key] = self.lut[net_label.long()]
        d.pop(ROI, None)
        d[GEOMETRY] = geometry.to_json()
        return d


def augmentations(
    keys: KeysCollection = (IMAGE, LABEL),
    spatial_size: Sequence[int] | None = None,
    elastic: bool = True,
) -> list:
    """The paper's online augmentations as MONAI transforms (section 3.2).

    Rotation and scaling (one affine resampling), Gaussian noise, Gaussian blur, brightness
    (multiplicative), contrast (scaling about the mean), low-resolution simulation, gamma, and
    elastic deformation. Probabilities and ranges follow nnU-Net's defaults, which the paper
    trains with; elastic deformation, off in nnU-Net v2, is on because the paper lists it.
    The image is ``keys[0]``; every other key is a label map (nearest interpolation).
    """
    image_key, label_keys = keys[0], list(keys[1:])
    all_keys = [image_key, *label_keys]
    modes = ["bilinear"] + ["nearest"] * len(label_keys)
    rotation = np.deg2rad(30.0)
    return [
        RandAffined(
            all_keys,
            prob=0.2,
            rotate_range=(rotation, rotation, rotation),
            scale_range=(0.3, 0.3, 0.3),  # factor 0.7..1.3 (nnU-Net: 0.7..1.4)
            mode=modes,
            padding_mode="border",
            spatial_size=spatial_size,
            allow_missing_keys=True,
        ),
        Rand3DElasticd(
            all_keys,
            sigma_range=(9.0, 13.0),
            magnitude_range=(0.0, 200.0) if elastic else (0.0, 0.0),
            prob=0.2 if elastic else 0.0,
            mode=modes,
            padding_mode="border",
            spatial_size=spatial_size,
            allow_missing_keys=True,
        ),
        RandGaussianNoised(image_key, prob=0.1, std=0.1),
        RandGaussianSmoothd(image_key, prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(image_key, prob=0.15, factors=(-0.25, 0.25)),  # brightness x0.75..1.25
        RandScaleIntensityFixedMeand(image_key, prob=0.15, factors=(-0.25, 0.25), preserve_range=True),  # contrast
        RandSimulateLowResolutiond(image_key, prob=0.25, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd(image_key, prob=0.3, gamma=(0.7, 1.5), retain_stats=True),  # gamma
    ]


def stage_transforms(
    stage: str,
    fingerprint: Fingerprint | Mapping | str | os.PathLike,
    spatial_size: Sequence[int],
    train: bool = False,
    roi_margin_mm: float = ROI_MARGIN_MM,
    roi_jitter_mm: float = 0.0,
    elastic: bool = True,
    label_keys: Sequence[str] = (LABEL,),
    crop_roi: bool | None = None,
    target_spacing_mm: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    num_patches: int = 1,
) -> Compose:
    """The preprocessing of one stage, for training (``train=True``: with augmentations),
    evaluation and inference alike.

    Args:
        stage: ``"abdomen"``, ``"organ"`` or ``"tumor"``.
        fingerprint: intensity fingerprint (object, dict or JSON path).
        spatial_size: network input size.
        train: append the paper's online augmentations.
        roi_margin_mm, roi_jitter_mm: stage-2 region of interest margin and its training jitter.
        elastic: include elastic deformation among the augmentations.
        label_keys: label maps that follow the image through the augmentations.
        crop_roi: crop the region of interest (default: stages 2 yes, stage 1 no).
        target_spacing_mm: the teacher's fixed-spacing input instead of ``spatial_size``.
        patch_size, num_patches: training of a patch-based network (the teacher): random
            ``patch_size`` crops, half of them centred on foreground, as nnU-Net samples.
    """
    keys = (IMAGE, *label_keys)
    load = LoadStageInputd(
        stage,
        fingerprint,
        spatial_size,
        keys=keys,
        roi_margin_mm=roi_margin_mm,
        roi_jitter_mm=roi_jitter_mm,
        crop_roi=crop_roi,
        target_spacing_mm=target_spacing_mm,
    )
    # file reading first, on its own: a CacheDataset keeps it (the rest is random in training)
    steps = [LoadCased(keys), load]
    if train and patch_size is not None:
        steps += [
            SpatialPadd((IMAGE, *label_keys), spatial_size=patch_size, allow_missing_keys=True),
            RandCropByPosNegLabeld(
                (IMAGE, *label_keys),
                label_key=label_keys[0],
                spatial_size=patch_size,
                pos=1,
                neg=1,
                num_samples=num_patches,
                allow_smaller=False,
            ),
        ]
    if train:
        steps += augmentations((IMAGE, *label_keys), patch_size or spatial_size, elastic=elastic)
    steps.append(EnsureTyped((IMAGE, *label_keys), allow_missing_keys=True, track_meta=False))
    return Compose(steps)


class RestoreLabelMapd(MapTransform):
    """Post-processing: a network-resolution label map back to the input file's grid.

    Reads ``geometry`` (JSON string from :class:`LoadStageInputd`) and replaces ``keys``
    (``(1, X', Y', Z')`` labels) with ``(1, X, Y, Z)`` uint8 labels in the input's voxel order, as
    a :class:`~monai.data.MetaTensor` whose metadata is the input's (``meta_key``, else built
    from the geometry; :func:`case_meta`): its affine is the input file's, so MONAI's writers
    keep the input's grid.
    """

    def __init__(self, keys: KeysCollection = ("pred",), geometry_key: str = GEOMETRY, meta_key: str = IMAGE_META):
        super().__init__(keys)
        self.geometry_key, self.meta_key = geometry_key, meta_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from stmt_monai.preprocessing.geometry import CaseGeometry, restore_label_map

        d = dict(data)
        geometry = CaseGeometry.from_json(d[self.geometry_key])
        meta = dict(d.get(self.meta_key) or case_meta(d.get("image_path", ""), geometry.affine, geometry.shape))
        affine = torch.as_tensor(np.asarray(geometry.affine, dtype=np.float64))
        for key in self.key_iterator(d):
            value = d[key]
            value = value.detach().cpu().as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value).detach().cpu()
            labels = torch.from_numpy(restore_label_map(value, geometry))[None]
            d[key] = MetaTensor(labels, meta={**meta, MetaKeys.AFFINE: affine})
        return d


class ToFlareLabelsd(MapLabelValued):
    """A stage network's label map (channel indices) as FLARE labels, e.g. tumor channel 1 -> 14.

    MONAI's :class:`~monai.transforms.MapLabelValued` with the mapping of
    :func:`stmt_monai.labels.stage_output_map`; output uint8.

    Args:
        keys: label maps to convert (``"pred"``).
        stage: ``"abdomen"``, ``"organ"`` or ``"tumor"``.
    """

    def __init__(self, keys: KeysCollection = ("pred",), stage: str = "tumor", allow_missing_keys: bool = False):
        orig, target = stage_output_map(stage)
        super().__init__(keys, orig, target, dtype=np.uint8, allow_missing_keys=allow_missing_keys)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer, writing to a temporary name beside the file and renaming it into
    place, so that an interrupted run never leaves a half-written label map."""

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        with atomic_write(filename) as tmp:
            super().write(tmp, verbose=verbose, **obj_kwargs)


def flare_output_name(meta: Mapping, saver=None) -> dict:
    """``SaveImaged``'s ``output_name_formatter`` for FLARE names: ``<case>`` of the input
    (``FLARE23_0001_0000.nii.gz`` -> ``FLARE23_0001``; a DICOM folder by its name)."""
    return {"subject": case_name(meta[ImageMetaKey.FILENAME_OR_OBJ]), "idx": meta.get(ImageMetaKey.PATCH_INDEX)}


class SaveLabelMapd(SaveImaged):
    """Write label maps on the input's grid as ``<output_dir>/<case><output_postfix>.nii.gz``.

    MONAI's :class:`~monai.transforms.SaveImaged` for the restored labels of
    :class:`RestoreLabelMapd` (a ``MetaTensor`` with the input's affine and name): FLARE case
    names (:func:`flare_output_name`), uint8, no resampling, written atomically
    (:class:`AtomicNibabelWriter`). Being a ``SaveImaged``, it is what MONAI Label's bundle
    inference drops (it returns the label map to its client instead).

    Args:
        output_dir: destination folder.
        keys: label key (``"pred"``).
        output_postfix: appended to the case name (``""`` gives FLARE's ``<case>.nii.gz``).
        stage: write the stage's channel indices as FLARE labels (:class:`ToFlareLabelsd`, e.g.
            the tumor channel 1 as 14); the data keeps the channel indices.
        roi_key: when the data holds stage 1's region of interest there (:class:`AbdomenRoid`),
            it is written beside the mask as ``<case>_roi.json`` (atomically).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        keys: KeysCollection = ("pred",),
        output_postfix: str = "",
        stage: str | None = None,
        roi_key: str = "abdomen_roi",
    ):
        super().__init__(
            keys,
            output_dir=output_dir,
            output_postfix=output_postfix,
            output_ext=".nii.gz",
            output_dtype=np.uint8,
            resample=False,
            separate_folder=False,
            print_log=False,
            output_name_formatter=flare_output_name,
            writer=AtomicNibabelWriter,
            savepath_in_metadict=True,
        )
        self.output_dir = output_dir
        self.to_flare = ToFlareLabelsd(keys, stage) if stage is not None else None
        self.roi_key = roi_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        written = super().__call__(self.to_flare(d) if self.to_flare is not None else d)
        for key in self.key_iterator(d):
            d[f"{key}_path"] = str(written[key].meta[MetaKeys.SAVED_TO])
        if isinstance(d.get(self.roi_key), Mapping):
            roi = d[self.roi_key]
            write_text_atomic(os.path.join(self.output_dir, f"{roi['case']}_roi.json"), json.dumps(roi, indent=1) + "\n")
        return d


class LoadTargetd(MapTransform):
    """The stage's training target on the input file's own grid, to score at full resolution.

    Replaces ``keys`` (``"label"``) with the label map read from ``path_key`` (``"label_path"``,
    set by :class:`LoadStageInputd`) and mapped to the stage's target
    (:func:`stmt_monai.labels.stage_target_map`), as a ``(1, X, Y, Z)`` uint8 tensor in the
    file's voxel order: the grid :class:`RestoreLabelMapd` restores predictions to.

    Args:
        stage: ``"abdomen"``, ``"organ"`` or ``"tumor"``.
        keys: label key(s) to replace.
        path_key: key of the label file's path.
    """

    def __init__(self, stage: str, keys: KeysCollection = (LABEL,), path_key: str = "label_path"):
        super().__init__(keys)
        self.lut = torch.from_numpy(target_lookup(stage))
        self.path_key = path_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        labels, _ = load_label(d[self.path_key])
        for key in self.key_iterator(d):
            d[key] = self.lut[torch.from_numpy(labels).long()][None]
        return d


class AbdomenRoid(MapTransform):
    """Stage 1's output for the cascade: the region of interest, kept and optionally saved.

    Reads ``keys`` (``"pred"``: the discrete ``(1, X', Y', Z')`` abdomen mask at network
    resolution, i.e. before :class:`RestoreLabelMapd`) and ``geometry``, stores the dict of
    :func:`stmt_monai.preprocessing.roi.abdomen_roi_from_prediction` plus ``case`` and ``image``
    under ``roi_key`` and, with an ``output_dir``, writes it as
    ``<output_dir>/<case><output_postfix>.json`` (atomically).

    Args:
        keys: the mask key (one).
        output_dir: where the JSON goes; ``None`` keeps the ROI in the dict only.
        margin_mm: margin around the abdomen box, mm.
        min_component_fraction: components below this share of the largest one are ignored.
        roi_key: output key of the ROI dict.
        geometry_key, image_path_key: where the case's geometry and input path are.
        output_postfix: appended to the case name (``<case>_roi.json``).
    """

    def __init__(
        self,
        keys: KeysCollection = ("pred",),
        output_dir: str | os.PathLike | None = None,
        margin_mm: float = ROI_MARGIN_MM,
        min_component_fraction: float = ROI_MIN_COMPONENT_FRACTION,
        roi_key: str = "abdomen_roi",
        geometry_key: str = GEOMETRY,
        image_path_key: str = "image_path",
        output_postfix: str = "_roi",
    ):
        super().__init__(keys)
        self.output_dir = output_dir
        self.margin_mm, self.min_component_fraction = float(margin_mm), float(min_component_fraction)
        self.roi_key, self.geometry_key, self.image_path_key = roi_key, geometry_key, image_path_key
        self.output_postfix = output_postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        geometry = CaseGeometry.from_json(d[self.geometry_key])
        for key in self.key_iterator(d):
            name = case_name(d[self.image_path_key])
            roi = abdomen_roi_from_prediction(d[key], geometry, self.margin_mm, self.min_component_fraction)
            d[self.roi_key] = {"case": name, "image": str(d[self.image_path_key]), **roi}
            if self.output_dir is not None:
                path = os.path.join(self.output_dir, f"{name}{self.output_postfix}.json")
                write_text_atomic(path, json.dumps(d[self.roi_key], indent=1) + "\n")
        return d
