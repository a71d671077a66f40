"""One stage of the cascade, ready to predict: a bundle's network, weights, input size and fingerprint.

:meth:`StageModel.from_bundle` reads a stage bundle (:func:`stmt_monai.inference.bundles.bundle_config`:
ids ``network_def``, ``spatial_size``, ``fingerprint``, ``model_path`` / ``ckpt_dir`` and, for
the tumor bundle, ``inference_network``), loads its weights and wraps the network for the chosen
backend (eager torch, :mod:`stmt_monai.inference.backends` for OpenVINO, ONNX Runtime and
TorchScript; fp16 autocast on CUDA by default). :meth:`StageModel.predict` takes the normalised
``(1, *spatial_size)`` input and returns the argmax labels ``(*spatial_size)`` at network
resolution, so every backend gives the cascade the same thing.
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
