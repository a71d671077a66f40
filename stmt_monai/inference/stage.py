"""The StMt cascade at inference (paper Fig. 2c; SPEC.md, "Inference"): CT in, FLARE label map out.

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
   file's own voxel order (:func:`stmt_monai.preprocessing.geometry.restore_label_map`).

The argmax is always taken at network resolution: an argmax over a full-resolution 14-channel
probability map of a 512 x 512 x 300 CT costs ~17 s on 2 CPU cores and ~9 GB, labels restored
with nearest cost well under a second.

Each stage's network is read from its bundle (:class:`StageModel`): ``configs/common.json`` and
``configs/inference.json`` layered with :class:`monai.bundle.ConfigParser` (ids ``network_def``,
``spatial_size``, ``fingerprint``, ``ckpt_dir``/``model_path``, ``inference_network``), and,
for the shipped demo weights, ``configs/demo.json`` on top (see :func:`bundle_config`).

:class:`Cascade` loads the three networks once; :func:`segment_case` writes one case's mask,
report and optional preview; :func:`segment_folder` runs a file, a folder or a DICOM series
folder (used by the ``cascade`` bundle and by ``stmt-segment``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from stmt_monai.inference.backends import (
    BACKENDS,
    OpenVinoNetwork,
    _exported_network,
    _file_digest,
    exported_path,
)
from stmt_monai.inference.bundles import bundle_config, load_weights, weights_path
from stmt_monai.preprocessing.fingerprint import Fingerprint


@dataclasses.dataclass
class StageModel:
    """One stage's network, ready to predict.

    Attributes:
        stage: ``"abdomen"``, ``"organ"`` or ``"tumor"``.
        network: the module (eval mode, on ``device``), or an OpenVINO compiled model wrapper.
        spatial_size: network input size, e.g. ``(192, 192, 192)``.
        fingerprint: intensity fingerprint the network was trained with.
        weights_path, weights_kind: the ``model.pt`` loaded and ``"trained"`` / ``"demo"``.
        settings: the bundle values used (channels, sizes, margins), for logs and reports.
        device: torch device of the network's inputs.
    """

    stage: str
    network: object
    spatial_size: tuple[int, int, int]
    fingerprint: Fingerprint
    weights_path: Path
    weights_kind: str
    settings: dict
    device: torch.device = torch.device("cpu")
    amp: bool = False

    @classmethod
    def from_bundle(
        cls,
        bundle_root: str | os.PathLike,
        stage: str,
        device: str | torch.device = "cpu",
        weights: str = "auto",
        backend: str = "torch",
        threads: int | None = None,
        amp: bool | None = None,
    ) -> "StageModel":
        """Build the bundle's network and load its weights.

        Args:
            bundle_root: the stage bundle's folder.
            stage: ``"abdomen"``, ``"organ"`` or ``"tumor"``.
            device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
            weights: ``"auto"``, ``"trained"`` or ``"demo"`` (see :func:`bundle_config`).
            backend: ``"torch"``, ``"openvino"`` (CPU only; see :class:`OpenVinoNetwork`),
                ``"torchscript"`` (``model.ts`` beside the weights) or ``"onnx"`` (``model.onnx``,
                CPU, :class:`OnnxNetwork`); the exported files come from ``scripts/export.py``.
            threads: CPU threads of the OpenVINO and ONNX Runtime backends (default torch's).
            amp: run the network under fp16 autocast; default: on CUDA with the torch and
                torchscript backends (it lowers the peak GPU memory), off on the CPU.

        Raises:
            FileNotFoundError: no weights file or fingerprint, with what to do about it.
        """
        device = torch.device(device)
        if amp is None:
            amp = device.type == "cuda" and backend in ("torch", "torchscript")
        if amp and device.type != "cuda":
            raise ValueError("amp (fp16 autocast) is for CUDA devices")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend in ("openvino", "onnx") and device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU: use device='cpu'")
        parser, kind = bundle_config(bundle_root, weights)
        path = weights_path(parser)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no weights for stage {stage!r}; train the bundle {Path(bundle_root).name} "
                "(its docs/README.md) or make the demo weights (python scripts/train_demo.py)"
            )
        fingerprint = Fingerprint.load(parser.get_parsed_content("fingerprint"))
        network = parser.get_parsed_content("network_def")
        key = parser.get("inference_network")
        network.load_state_dict(load_weights(path, key))
        network = network.to(device).eval()
        spatial_size = tuple(int(s) for s in parser.get_parsed_content("spatial_size"))
        settings = {
            "bundle": str(Path(bundle_root).resolve()),
            "weights": str(path),
            "weights_kind": kind,
            "spatial_size": list(spatial_size),
            **{k: parser.get(k) for k in ("base_channels", "num_downsamplings", "out_channels", "roi_margin_mm", "min_component_fraction") if k in parser},
            **({"inference_network": key} if key else {}),
            "amp": bool(amp),
        }
        if backend == "openvino":
            network = OpenVinoNetwork(network, spatial_size, cache_key=_file_digest(path), threads=threads)
        elif backend in ("torchscript", "onnx"):
            network = _exported_network(path, backend, device, spatial_size, threads, f"python scripts/export.py {bundle_root} --weights {kind}")
            settings["exported"] = str(exported_path(path, backend))
        return cls(stage, network, spatial_size, fingerprint, path, kind, settings, device, bool(amp))

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Argmax labels at network resolution.

        Args:
            image: ``(1, *spatial_size)`` normalised intensities (CPU or ``device``).

        Returns:
            ``(*spatial_size)`` uint8 class indices, on the CPU.
        """
        x = image[None].to(self.device, torch.float32)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            labels = self.network(x)[0].argmax(0).to(torch.uint8).cpu()
        if isinstance(self.network, OpenVinoNetwork):
            self.network.release_memory()
        return labels
