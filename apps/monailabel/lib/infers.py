"""MONAI Label inference task of the ``cascade`` bundle, the one thing MONAI Label's stock
``monaibundle`` app cannot serve (it chains three bundles; the stage bundles themselves are
served and trained by the stock app, see README.md beside this file).

:class:`CascadeInferTask`: ``stmt_monai.inference.cascade.Cascade`` (coarse abdomen, then the organ
and tumor students on the region of interest), CT in, FLARE label map (0 background, 1..13
organs, 14 tumor) out on the input's grid, written with :func:`stmt_monai.io.save_label_map`,
the writer of ``stmt-segment``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list, name_to_device

from stmt_monai.bundle import config_files
from stmt_monai.inference.bundles import bundle_config, weights_path
from stmt_monai.inference.cascade import Cascade
from stmt_monai.io import save_label_map

logger = logging.getLogger(__name__)


def write_label_map(labels: np.ndarray, affine: np.ndarray) -> str:
    """Write ``labels`` (``(X, Y, Z)``, uint8) with ``affine`` to a new temporary ``.nii.gz``.

    MONAI Label sends the file back to the client and then deletes it.
    """
    handle, path = tempfile.mkstemp(suffix=".nii.gz", prefix="stmt_")
    os.close(handle)
    return str(save_label_map(path, labels, affine))


class CascadeInferTask(InferTask):
    """The ``cascade`` bundle as one MONAI Label model: CT in, FLARE label map out.

    Builds the bundle's ``cascade`` id (:class:`stmt_monai.inference.cascade.Cascade` over the stage
    bundles it names) once per device, at the first request (or at start with ``preload``).
    Labels are the bundle's metadata ``channel_def`` of its first output, as MONAI Label reads
    bundles.

    Args:
        path: the ``cascade`` bundle folder.
        overrides: values for the bundle's ids (e.g. ``{"weights": "demo"}``).
        preload: load the networks on the CPU when the app starts.
    """

    def __init__(self, path: str | os.PathLike, overrides: dict[str, Any] | None = None, preload: bool = False):
        self.bundle_path = Path(path).resolve()
        self.overrides = dict(overrides or {})
        metadata = json.loads((self.bundle_path / "configs" / "metadata.json").read_text())
        _, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
        labels = {name: int(k) for k, name in pred["channel_def"].items() if name != "background"}
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=metadata.get("description", "StMt cascade"),
            config={"device": device_list()},
        )
        self.version = metadata.get("version")
        self._cascades: dict[str, tuple[tuple, Cascade]] = {}  # device -> (weights files' stamp, cascade)
        self._lock = threading.Lock()
        self.problem = self._check()
        if preload and not self.problem:
            self.cascade("cpu")

    def parser(self, device: str | None = None) -> ConfigParser:
        """The bundle's ``configs/inference.json`` with ``bundle_root`` absolute and the overrides."""
        parser = ConfigParser()
        parser.read_config([str(f) for f in config_files(self.bundle_path, "inference")])
        parser["bundle_root"] = str(self.bundle_path)
        for key, value in self.overrides.items():
            parser[key] = value
        if device is not None:
            parser["device"] = device
        return parser

    def weights_files(self) -> list[Path]:
        """The weights file each stage of the cascade loads (trained or demo, as ``weights``).

        Raises:
            FileNotFoundError: a stage bundle, or its weights, is missing.
        """
        parser = self.parser()
        weights = parser.get_parsed_content("weights")
        files = []
        for stage, root in parser.get_parsed_content("stage_bundles").items():
            path = weights_path(bundle_config(root, weights)[0])
            if not path.is_file():
                raise FileNotFoundError(f"stage {stage}: no weights {path} (train the bundle, or make the demo weights: stmt-train-demo)")
            files.append(path)
        return files

    def _check(self) -> str | None:
        """Why the cascade cannot run, else None."""
        try:
            self.weights_files()
        except (FileNotFoundError, ValueError) as err:
            return str(err)
        return None

    def is_valid(self) -> bool:
        if self.problem:
            logger.warning("cascade not served: %s", self.problem)
        return self.problem is None

    def info(self) -> dict[str, Any]:
        return {**super().info(), "version": self.version}

    def cascade(self, device: str) -> Cascade:
        """The bundle's loaded :class:`Cascade` on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``),
        loaded again when a stage's weights file changed (e.g. trained from MONAI Label)."""
        stamp = tuple((str(path), path.stat().st_mtime_ns) for path in self.weights_files())
        with self._lock:
            cached = self._cascades.get(device)
            if cached is None or cached[0] != stamp:
                cascade = self.parser(device).get_parsed_content("cascade")
                logger.info("cascade loaded on %s in %.1f s", device, cascade.load_seconds)
                self._cascades[device] = (stamp, cascade)
            return self._cascades[device][1]

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segment ``request["image"]`` (a CT file or DICOM series folder; MONAI Label has
        turned the image id into its path). Returns the label map's path and the result JSON
        (labels found, stage-1 region of interest, which weights, latencies in s)."""
        start = time.perf_counter()
        device = name_to_device(request.get("device"))
        cascade = self.cascade(device)
        loaded = time.perf_counter()
        result = cascade.segment(request["image"])
        segmented = time.perf_counter()
        path = write_label_map(result.labels, result.affine)
        end = time.perf_counter()
        return path, {
            "labels_found": sorted(int(v) for v in np.unique(result.labels) if v),
            "roi": result.roi,
            "weights": {stage: model.weights_kind for stage, model in cascade.models.items()},
            "latencies": {
                "load": round(loaded - start, 2),
                "infer": round(segmented - loaded, 2),
                "write": round(end - segmented, 2),
                "total": round(end - start, 2),
                "steps": {k: round(v, 2) for k, v in result.timings.items()},
            },
        }
