"""The two-stage inference of StMt (paper Fig. 2c, section 2.3): CT in, FLARE label map out.

1. stage 1 (bundle ``coarse_abdomen``): the whole CT, canonical RAS order, resized to 128^3,
   normalised with the stage's fingerprint; argmax at network resolution gives the abdomen;
2. region of interest: the abdomen's bounding box mapped back to the original grid, plus a
   margin in mm (:func:`stmt_monai.preprocessing.roi.abdomen_roi_from_prediction`);
3. stage 2: that box cropped from the original-resolution CT and resized to 192^3 once for both
   students (``organ_selftrain`` and ``tumor_meanteacher``; normalised once if their
   fingerprints are equal); argmax of each at network resolution;
4. post-processing at network resolution: largest connected component per organ class, tumor
   laid over the organs (:mod:`stmt_monai.inference.postprocessing`);
5. nearest-neighbour restore into the crop and zero padding to the input's exact shape, in the
   file's own voxel order (:func:`stmt_monai.preprocessing.geometry.restore_label_map`);
6. optional, beyond the paper (``outside_tumors``, off by default): the tumor network once more
   over the whole volume, for lesions outside stage 1's box (:mod:`stmt_monai.inference.outside_roi`).

The argmax is always taken at network resolution: an argmax over a full-resolution 14-channel
probability map of a 512 x 512 x 300 CT costs ~17 s on 2 CPU cores and ~9 GB, labels restored
with nearest cost well under a second.

:class:`Cascade` loads the three stages once (each a
:class:`~stmt_monai.inference.stage.StageModel` read from its bundle) and segments any number of
cases; :class:`CascadeResult` is one case's labels, ROI and step timings. Writing the outputs of a
file, folder or DICOM series is :mod:`stmt_monai.inference.batch`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stmt_monai.arrays import as_numpy, device_type
from stmt_monai.inference.backends import resolve_backend
from stmt_monai.inference.bundles import STAGE_BUNDLES, default_bundles_dir
from stmt_monai.inference.checks import (
    VOLUME,
    check_input,
    check_memory,
    field_of_view_findings,
    network_sizes,
    raise_if_strict,
)
from stmt_monai.inference.outside_roi import outside_roi_tumors
from stmt_monai.inference.postprocessing import largest_component, overlay_tumor
from stmt_monai.inference.stage import StageModel
from stmt_monai.io import ImageError, InputWarning, load_image
from stmt_monai.preprocessing.geometry import canonical_tensor, resize_nearest, restore_label_map, to_canonical
from stmt_monai.preprocessing.roi import (
    ROI_MARGIN_MM,
    ROI_MIN_COMPONENT_FRACTION,
    abdomen_roi_from_prediction,
)
from stmt_monai.preprocessing.stage_input import prepare_volume

if TYPE_CHECKING:  # the CPU path with OpenVINO never imports torch (stmt_monai.arrays)
    import torch

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the cascade
@dataclasses.dataclass
class CascadeResult:
    """One case through the cascade.

    Attributes:
        labels: ``(X, Y, Z)`` uint8 FLARE label map (0..14) in the input file's voxel order.
        affine: the input's 4 x 4 RAS affine (write ``labels`` with it).
        image: ``(X, Y, Z)`` HU of the input, in the file's own type and memory order (for the
            report and preview; read-only when read from a NIfTI file).
        organ_labels: the organ result before the tumor overlay, on the same grid, when the
            cascade found a tumor (the report names each tumor's host organ from it), else None.
        roi: stage 1's region of interest (:func:`abdomen_roi_from_prediction`'s dict), with
            ``abdomen_ml``, the volume of stage 1's abdomen.
        timings: seconds per step.
        warnings: the input's :class:`~stmt_monai.io.InputWarning` s, from reading and from the
            plausibility checks (:mod:`stmt_monai.inference.checks`).
    """

    labels: np.ndarray
    affine: np.ndarray
    image: np.ndarray
    organ_labels: np.ndarray | None
    roi: dict
    timings: dict
    warnings: list = dataclasses.field(default_factory=list)


class Cascade:
    """The three StMt stages, loaded once, chained on any number of cases.

    Args:
        bundles_dir: folder holding ``coarse_abdomen``, ``organ_selftrain`` and
            ``tumor_meanteacher`` (default :func:`default_bundles_dir`).
        device: ``"cpu"`` or ``"cuda"``.
        threads: the networks' CPU threads (OpenVINO's and ONNX Runtime's; ``torch.set_num_threads``
            where torch runs); default :func:`~stmt_monai.inference.backends.default_threads`.
        backend: ``"auto"`` (default: OpenVINO on the CPU when installed, torch on CUDA),
            ``"torch"``, ``"openvino"`` (CPU), ``"torchscript"`` or ``"onnx"`` (CPU): see
            :meth:`StageModel.from_bundle`.
        weights: ``"auto"``, ``"trained"`` or ``"demo"`` (:func:`bundle_config`).
        margin_mm: ROI margin; default the ``coarse_abdomen`` bundle's ``roi_margin_mm``.
        bundles: per-stage bundle folders overriding ``bundles_dir`` (``{"organ": path}``).
        amp: fp16 autocast of the networks; default on CUDA (torch / torchscript backends), where
            it lowers the peak GPU memory; off on the CPU.
        precision: OpenVINO's inference precision: ``"auto"`` (bf16 where the CPU computes in
            bf16, else f32), ``"f32"``, ``"bf16"`` or ``"int8"`` (NNCF models from ``stmt-export``).
        outside_tumors: also look for tumors outside stage 1's box, with one more tumor-network
            pass over the whole volume (:mod:`stmt_monai.inference.outside_roi`; not in the paper,
            off by default: ``docs/outside_roi_tumors.md`` measures it).
    """

    def __init__(
        self,
        bundles_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        backend: str = "auto",
        weights: str = "auto",
        margin_mm: float | None = None,
        bundles: Mapping[str, str | os.PathLike] | None = None,
        amp: bool | None = None,
        precision: str = "auto",
        outside_tumors: bool = False,
    ):
        start = time.perf_counter()
        resolved = resolve_backend(backend, device)
        if device_type(device) == "cuda" or resolved in ("torch", "torchscript"):
            import torch  # only where torch runs: the CPU path with OpenVINO starts ~1.2 s sooner without it

            if threads:
                torch.set_num_threads(int(threads))
            device = torch.device(device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("device 'cuda' asked for but torch sees no CUDA device")
        root = Path(bundles_dir) if bundles_dir is not None else default_bundles_dir()
        paths = {stage: Path((bundles or {}).get(stage, root / name)) for stage, name in STAGE_BUNDLES.items()}
        self.models = {
            stage: StageModel.from_bundle(path, stage, device, weights, backend, threads, amp, precision) for stage, path in paths.items()
        }
        abdomen = self.models["abdomen"].settings
        self.margin_mm = float(margin_mm if margin_mm is not None else abdomen.get("roi_margin_mm", ROI_MARGIN_MM))
        self.min_component_fraction = float(abdomen.get("min_component_fraction", ROI_MIN_COMPONENT_FRACTION))
        self.device, self.backend = device, resolved
        self.outside_tumors = bool(outside_tumors)
        self.precision = self.models["organ"].settings.get("precision", "f32")
        self.load_seconds = time.perf_counter() - start

    def describe(self) -> dict:
        """The settings of the three stages (for reports and logs)."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": str(self.device),
            "roi_margin_mm": self.margin_mm,
            "outside_tumors": self.outside_tumors,
            "load_seconds": round(self.load_seconds, 3),
            # set by stmt-segment: the process's start-up before the models (None elsewhere)
            "start_up_seconds": None if getattr(self, "start_up_seconds", None) is None else round(self.start_up_seconds, 3),
            "stages": {stage: model.settings for stage, model in self.models.items()},
        }

    def segment(self, path: str | os.PathLike, strict: bool = False, max_memory_bytes: int | None = None) -> CascadeResult:
        """Segment one CT file or DICOM series (see :meth:`segment_array`).

        Before reading, the case's peak memory is estimated from its header and the case refused
        if it does not fit (:func:`~stmt_monai.inference.checks.check_memory`).

        Args:
            path: a CT file, a DICOM series folder or a :class:`~stmt_monai.dicom.DicomSeries`.
            strict: a warning of reading or of the plausibility checks fails the case.
            max_memory_bytes: the memory bound; default the memory available now.

        Raises:
            ImageError: the input cannot be read, is not a 3D volume, does not fit in memory, or
                (``strict``) raised a warning.
        """
        return self.segment_loaded(path, self.read(path, max_memory_bytes), strict)

    def read(self, path: str | os.PathLike, max_memory_bytes: int | None = None) -> dict:
        """The reading half of :meth:`segment` (a batch reads the next case while the networks
        run on this one): memory check, then the volume in the file's own type (int16 for most
        CTs; the cascade only reads it).

        Returns:
            ``{"image", "affine", "warnings", "seconds"}`` for :meth:`segment_loaded`.
        """
        start = time.perf_counter()
        check_memory(path, network_sizes(self.models), max_memory_bytes)
        warnings: list[InputWarning] = []
        image, affine = load_image(path, dtype=None, warnings=warnings)
        return {"image": image, "affine": affine, "warnings": warnings, "seconds": time.perf_counter() - start}

    def segment_loaded(self, path: str | os.PathLike, loaded: dict, strict: bool = False) -> CascadeResult:
        """The networks' half of :meth:`segment` on what :meth:`read` returned for ``path``."""
        image, affine, warnings, read = loaded["image"], loaded["affine"], loaded["warnings"], loaded["seconds"]
        try:
            result = self.segment_array(image, affine, strict=strict, warnings=warnings)
        except ImageError as err:
            if err.path != VOLUME:
                raise
            raise ImageError(path, err.problem) from None
        result.timings = {"read": read, **result.timings}
        return result

    def segment_array(self, image: np.ndarray, affine: np.ndarray, strict: bool = False, warnings: list | None = None) -> CascadeResult:
        """Segment a CT volume.

        Args:
            image: ``(X, Y, Z)`` HU, in its file's voxel order.
            affine: its 4 x 4 RAS affine.
            strict: the first warning fails the case (:func:`~stmt_monai.inference.checks.raise_if_strict`).
            warnings: warnings so far (of reading); the checks' are appended.

        Returns:
            :class:`CascadeResult` with labels on exactly the input's grid.

        Raises:
            ImageError: (path ``"<volume>"``) no finite voxel, or ``strict`` and a warning.
        """
        t = {}
        clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            t[name] = now - clock
            clock = now

        warnings = [] if warnings is None else warnings
        image, found = check_input(image, affine)  # non-finite voxels replaced, HU and spacing judged
        warnings += found
        raise_if_strict(warnings, strict, VOLUME)
        abdomen, organ, tumor = self.models["abdomen"], self.models["organ"], self.models["tumor"]
        # stage 1: whole volume at 128^3
        canonical = to_canonical(image, affine, contiguous=False)  # a view, once for the three networks
        if device_type(self.device) == "cuda":
            # uploaded once (file type, memory order), reoriented, cropped and resampled on the device
            canonical = (canonical_tensor(image, canonical[2], self.device), *canonical[1:])
        x1, _, geometry1 = prepare_volume(image, affine, abdomen.spatial_size, canonical=canonical, as_tensor=False)
        mask = abdomen.predict(abdomen.fingerprint.normalize(x1))
        lap("stage1")
        roi = abdomen_roi_from_prediction(mask, geometry1, self.margin_mm, self.min_component_fraction)
        roi["abdomen_ml"], found = field_of_view_findings(mask, geometry1)
        if not any(w.kind == "spacing" for w in warnings):  # millilitres mean nothing on a wrong spacing
            warnings += found
            raise_if_strict(found, strict, VOLUME)
        box = (roi["start_voxel"], roi["end_voxel"])
        # stage 2: one crop and resize for both students when their sizes agree
        x2, _, geometry2 = prepare_volume(image, affine, organ.spatial_size, roi_box=box, canonical=canonical, as_tensor=False)
        organ_in = organ.fingerprint.normalize(x2)
        same_size = tumor.spatial_size == organ.spatial_size
        if same_size:
            tumor_in = organ_in if tumor.fingerprint == organ.fingerprint else tumor.fingerprint.normalize(x2)
        else:
            x3, _, _ = prepare_volume(image, affine, tumor.spatial_size, roi_box=box, canonical=canonical, as_tensor=False)
            tumor_in = tumor.fingerprint.normalize(x3)
            del x3
        del x2
        if not self.outside_tumors:
            del canonical  # the whole reoriented volume (on CUDA, on the device) is not needed by the networks
        lap("stage2_input")
        organ_net = largest_component(organ.predict(organ_in))
        lap("organ")
        tumor_net = tumor.predict(tumor_in)
        # same crop, other size: nearest onto the organ network's grid
        tumor_net = as_numpy(tumor_net) if same_size else resize_nearest(as_numpy(tumor_net), organ.spatial_size)
        del organ_in, tumor_in
        lap("tumor")
        outside = None
        if self.outside_tumors:  # on the input's grid, never inside the box
            outside = outside_roi_tumors(tumor, image, affine, box, canonical=canonical)
            del canonical
            lap("outside_tumors")
        organ_labels = restore_label_map(organ_net, geometry2)
        if any(r < n for r, n in zip(geometry2.roi_shape, geometry2.network_size)):
            # nearest down-sampling (a crop thinner than the network input) can split a component
            organ_labels = largest_component(organ_labels)
        tumor_labels = restore_label_map(tumor_net, geometry2) if tumor_net.any() else None
        if outside is not None:
            tumor_labels = outside if tumor_labels is None else np.maximum(tumor_labels, outside, out=tumor_labels)
        if tumor_labels is not None:
            # restore(overlay(organs, tumor)) == overlay(restore(organs), restore(tumor)): nearest is voxelwise
            labels = overlay_tumor(organ_labels, tumor_labels)
        else:
            labels, organ_labels = organ_labels, None
        lap("restore")
        return CascadeResult(labels, np.asarray(affine, float), image, organ_labels, roi, t, warnings)
