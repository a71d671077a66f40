"""Runners of a stage network other than eager PyTorch: OpenVINO, ONNX Runtime and TorchScript.

- :class:`OpenVinoNetwork`: a PyTorch network converted once to OpenVINO's IR (cached per
  weights file) and run by OpenVINO's CPU runtime (optional ``openvino`` extra);
- :class:`OnnxNetwork`: an exported ``model.onnx`` run by ONNX Runtime on the CPU (optional
  ``export`` extra);
- :func:`exported_path`: the ``.ts`` / ``.onnx`` file that ``scripts/export.py``
  (:mod:`stmt_monai.inference.export`) writes beside a weights file; a missing export, or one
  older than its weights, is refused with the command that makes it.

Each is called like the torch module: ``(1, in_channels, *spatial_size)`` float32 in, logits
``(1, out_channels, *spatial_size)`` out. :class:`stmt_monai.inference.stage.StageModel` chooses
one by its ``backend`` (:data:`BACKENDS`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


#: ``torchscript`` and ``onnx`` run the files ``scripts/export.py`` writes beside the weights
BACKENDS = ("torch", "openvino", "torchscript", "onnx")


def _file_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def exported_path(weights_file: str | os.PathLike, backend: str) -> Path:
    """The export of ``weights_file`` that backend ``"torchscript"`` (``.ts``) or ``"onnx"``
    (``.onnx``) runs: same folder and stem (:mod:`stmt_monai.inference.export` writes it)."""
    suffixes = {"torchscript": ".ts", "onnx": ".onnx"}
    if backend not in suffixes:
        raise ValueError(f"no exported file for backend {backend!r}")
    return Path(weights_file).with_suffix(suffixes[backend])


def _exported_network(weights_file: Path, backend: str, device: torch.device, spatial_size, threads: int | None, command: str):
    """The exported network of ``weights_file`` for ``backend``; refuses a missing or stale file
    (``command`` makes it)."""
    path = exported_path(weights_file, backend)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {backend} export of {weights_file}; make it with: {command}")
    if path.stat().st_mtime < weights_file.stat().st_mtime:
        raise RuntimeError(f"{path} is older than {weights_file}: re-export with: {command}")
    if backend == "onnx":
        return OnnxNetwork(path, threads=threads, spatial_size=spatial_size)
    return torch.jit.load(str(path), map_location=device).eval()


class OnnxNetwork:
    """An exported ONNX network run by ONNX Runtime on the CPU (optional ``export`` extra).

    Args:
        path: the ``.onnx`` file (:func:`stmt_monai.inference.export.export_onnx`: one input, logits out).
        threads: intra-op threads (default ``torch.get_num_threads()``).
        spatial_size: if given, the graph's fixed input size must be this one.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spatial_size: Sequence[int] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("backend 'onnx' needs the optional extra: pip install 'stmt-monai[export]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # no memory arena: ONNX Runtime's arena kept every network's peak buffers (peak RSS 6.5 GB
        # against torch's 4.1 GB for a 512 x 512 x 300 case, measured here)
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        if spatial_size is not None and list(shape[2:]) != [int(s) for s in spatial_size]:
            raise ValueError(f"{path}: exported for input {shape}, the bundle's spatial_size is {list(spatial_size)}: re-export")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (``(1, C, *spatial_size)``), on the CPU."""
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


class OpenVinoNetwork:
    """A PyTorch network run by OpenVINO's CPU runtime (optional ``openvino`` extra).

    Measured here on 2 CPU cores: the paper's student forward at 192^3 about twice as fast as
    eager PyTorch (fp32, logits within ~2e-3 relative, argmax agreeing on >99.9 % of voxels).
    Converting a DynUNet to OpenVINO's IR takes 30-70 s (minutes on a busy machine), so the IR
    is converted once per weights file and cached (``$STMT_MONAI_CACHE`` or
    ``~/.cache/stmt_monai``, ``openvino/``); later processes only read and compile it (about 1 s).
    Intermediate buffers are released after each call (:meth:`release_memory`).

    Args:
        network: the eval-mode module (weights loaded).
        spatial_size: the fixed input size the IR is compiled for.
        cache_key: identifies the weights (the digest of ``model.pt``).
        threads: inference threads (default ``torch.get_num_threads()``).
    """

    def __init__(self, network: torch.nn.Module, spatial_size: Sequence[int], cache_key: str, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("backend 'openvino' needs the optional extra: pip install 'stmt-monai[openvino]'") from None
        spatial = tuple(int(s) for s in spatial_size)
        in_channels = next(network.parameters()).shape[1]
        arch = hashlib.sha1(f"{network}|{spatial}|{in_channels}|{ov.__version__}".encode()).hexdigest()[:12]
        cache = Path(os.environ.get("STMT_MONAI_CACHE", Path.home() / ".cache" / "stmt_monai")) / "openvino"
        xml = cache / f"{cache_key}_{arch}.xml"
        core = ov.Core()
        if not xml.is_file():
            logger.info("converting the network to OpenVINO IR once (cached in %s)", cache)
            # trace at a small valid size, then fix the input to the real one
            depth = sum(1 for m in network.modules() if isinstance(m, torch.nn.ConvTranspose3d))
            example = torch.zeros(1, in_channels, *[2 ** depth * 2] * len(spatial))
            model = ov.convert_model(network.cpu(), example_input=example, input=[ov.PartialShape([1, in_channels] + [-1] * len(spatial))])
            model.reshape({model.inputs[0]: ov.PartialShape([1, in_channels, *spatial])})
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{xml.stem}.{os.getpid()}.xml"
            ov.save_model(model, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(tmp, xml)
        config = {
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "INFERENCE_PRECISION_HINT": "f32",  # no silent bf16 on CPUs that have it
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (``(1, C, *spatial_size)``); valid until :meth:`release_memory`."""
        return torch.from_numpy(self.compiled(x.cpu().numpy())[0])

    def release_memory(self) -> None:
        """Free the intermediate buffers (the compiled model keeps them between calls otherwise:
        three compiled 192^3 / 128^3 networks held 7-8 GB together, measured here)."""
        self.compiled.release_memory()
