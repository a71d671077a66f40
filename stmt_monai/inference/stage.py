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
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from stmt_monai.arrays import device_type
from stmt_monai.bundle import record_path
from stmt_monai.inference.backends import StageRunner, cache_dir, make_runner, resolve_backend
from stmt_monai.inference.bundles import DEMO_CONFIG, bundle_config, load_network, weights_path
from stmt_monai.preprocessing.fingerprint import Fingerprint

if TYPE_CHECKING:  # the OpenVINO path never imports torch (stmt_monai.arrays)
    import numpy as np
    import torch


@dataclasses.dataclass
class StageModel:
    """One stage's network, ready to predict.

    Attributes:
        stage: ``"abdomen"``, ``"organ"`` or ``"tumor"``.
        network: the backend's runner (:class:`~stmt_monai.inference.backends.StageRunner`:
            normalised input in, argmax labels out), also :attr:`runner`.
        spatial_size: network input size, e.g. ``(192, 192, 192)``.
        fingerprint: intensity fingerprint the network was trained with.
        weights_path, weights_kind: the ``model.pt`` loaded and ``"trained"`` / ``"demo"``.
        settings: the bundle values used (channels, sizes, margins), for logs and reports.
        device: device of the network's inputs (``"cpu"``, or a ``torch.device``).
    """

    stage: str
    network: object
    spatial_size: tuple[int, int, int]
    fingerprint: Fingerprint
    weights_path: Path
    weights_kind: str
    settings: dict
    device: str | torch.device = "cpu"
    amp: bool = False

    @property
    def runner(self) -> StageRunner:
        """The backend's runner (:class:`~stmt_monai.inference.backends.StageRunner`)."""
        return self.network

    @classmethod
    def from_bundle(
        cls,
        bundle_root: str | os.PathLike,
        stage: str,
        device: str | torch.device = "cpu",
        weights: str = "auto",
        backend: str = "auto",
        threads: int | None = None,
        amp: bool | None = None,
        precision: str = "auto",
    ) -> "StageModel":
        """Read the bundle (:func:`stage_spec`) and make the backend's runner of its network.

        Args:
            bundle_root: the stage bundle's folder.
            stage: ``"abdomen"``, ``"organ"`` or ``"tumor"``.
            device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
            weights: ``"auto"``, ``"trained"`` or ``"demo"`` (see :func:`bundle_config`).
            backend: ``"auto"`` (OpenVINO on the CPU when installed, else torch), ``"torch"``,
                ``"openvino"`` (CPU), ``"torchscript"`` (``model.ts`` beside the weights) or
                ``"onnx"`` (``model.onnx``, CPU); see :func:`stmt_monai.inference.backends.make_runner`.
            threads: CPU threads of the OpenVINO and ONNX Runtime backends (default
                :func:`~stmt_monai.inference.backends.default_threads`).
            amp: run the network under fp16 autocast; default: on CUDA with the torch and
                torchscript backends (it lowers the peak GPU memory), off on the CPU.
            precision: OpenVINO's: ``"auto"`` (bf16 where the CPU has it, else f32), ``"f32"``,
                ``"bf16"``, ``"int8"`` (the NNCF model ``stmt-export --formats openvino_int8`` writes).

        Raises:
            FileNotFoundError: no weights file or fingerprint, with what to do about it.
        """
        backend = resolve_backend(backend, device)
        if backend in ("torch", "torchscript") or device_type(device) == "cuda":
            import torch

            device = torch.device(device)
        if amp is None:
            amp = device_type(device) == "cuda" and backend in ("torch", "torchscript")
        if amp and device_type(device) != "cuda":
            raise ValueError("amp (fp16 autocast) is for CUDA devices")
        spec = stage_spec(bundle_root, weights)
        path, kind = Path(spec["weights"]), spec["weights_kind"]
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no weights for stage {stage!r}; train the bundle {Path(bundle_root).name} "
                "(its docs/README.md) or make the demo weights (stmt-train-demo)"
            )
        fingerprint = Fingerprint.load(spec["fingerprint"])
        spatial_size = tuple(int(s) for s in spec["spatial_size"])

        def build_network() -> torch.nn.Module:
            # only when the backend needs the torch module (not for a cached OpenVINO IR)
            return load_network(bundle_root, kind)[0]

        runner = make_runner(
            backend, build_network, path, spatial_size, int(spec["in_channels"]), spec["network_signature"], device, threads, bool(amp),
            precision, export_command=f"stmt-export {bundle_root} --weights {kind}",
        )
        settings = {**spec["settings"], "amp": bool(amp), **runner.describe()}
        return cls(stage, runner, spatial_size, fingerprint, path, kind, settings, device, bool(amp))

    def predict(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Argmax labels at network resolution.

        Args:
            image: ``(1, *spatial_size)`` normalised intensities (CPU or ``device``), a tensor or
                an array.

        Returns:
            ``(*spatial_size)`` uint8 class indices, on the CPU: a tensor, or with the OpenVINO
            backend the kind of ``image`` (an array for an array).
        """
        return self.network.predict(image[None])


#: bundle ids copied into a stage's ``settings`` (for logs and reports)
SETTINGS_IDS = ("base_channels", "num_downsamplings", "out_channels", "roi_margin_mm", "min_component_fraction")


def _network_signature(parser) -> str:
    """The network's definition with the values of the ids it refers to (part of the key of the
    cached OpenVINO IR, with the weights' digest)."""
    definition = parser.get("network_def")
    refs = sorted(set(re.findall(r"@([A-Za-z_][A-Za-z0-9_#]*)", json.dumps(definition))))
    return json.dumps({"network_def": definition, **{r: parser.get_parsed_content(r) for r in refs}}, sort_keys=True, default=str)


def _stamp(path: Path) -> list | None:
    try:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return None


def stage_spec(bundle_root: str | os.PathLike, weights: str = "auto") -> dict:
    """What the cascade needs of a stage bundle, read once with MONAI's config parser and then
    cached (:func:`stmt_monai.inference.backends.cache_dir` ``/bundles``).

    Parsing a bundle config imports ``monai.bundle`` (2-3 s of a process's start-up); the record
    is reused while the bundle's config files, its trained weights file and the chosen weights
    file keep their size and modification time, so a warm start imports no MONAI at all.

    Returns:
        ``{"weights", "weights_kind", "fingerprint", "spatial_size", "in_channels",
        "inference_network", "network_signature", "settings", "stamps"}``.
    """
    root = Path(bundle_root).resolve()
    configs = root / "configs"
    config_stamps = {str(f): _stamp(f) for f in sorted(configs.glob("*.json"))}
    record_file = cache_dir() / "bundles" / f"{hashlib.sha1(f'{root}|{weights}'.encode()).hexdigest()[:16]}.json"
    try:
        record = json.loads(record_file.read_text())
        if record["config_stamps"] == config_stamps and all(_stamp(Path(p)) == s for p, s in record["file_stamps"].items()):
            return record
    except (OSError, ValueError, KeyError):
        pass
    parser, kind = bundle_config(root, weights)
    path = weights_path(parser)
    trained = path
    if kind == "demo" and (configs / DEMO_CONFIG).is_file():
        try:
            trained = weights_path(bundle_config(root, "trained")[0])
        except FileNotFoundError:  # models/model.pt is the link a fresh clone has to the demo weights
            trained = root / "models" / "model.pt"
    key = parser.get("inference_network")
    spatial_size = [int(s) for s in parser.get_parsed_content("spatial_size")]
    record = {
        "weights": str(path),
        "weights_kind": kind,
        "fingerprint": str(parser.get_parsed_content("fingerprint")),
        "spatial_size": spatial_size,
        "in_channels": int(parser.get_parsed_content("in_channels")),
        "inference_network": key,
        "network_signature": _network_signature(parser),
        "settings": {
            "bundle": str(root),
            "weights": str(path),
            "weights_kind": kind,
            "spatial_size": spatial_size,
            **{k: parser.get(k) for k in SETTINGS_IDS if k in parser},
            **({"inference_network": key} if key else {}),
        },
        "config_stamps": config_stamps,
        # "auto" turns to the trained weights when they appear, and any weights change re-keys the IR
        "file_stamps": {str(p): _stamp(p) for p in {path, trained, record_path(path)}},
    }
    if path.is_file():  # a missing file is reported by the caller; nothing to remember yet
        try:
            from stmt_monai.io import write_text_atomic

            write_text_atomic(record_file, json.dumps(record))
        except OSError:
            pass
    return record
