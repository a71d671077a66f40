"""Runners of a stage network: eager PyTorch, OpenVINO, ONNX Runtime and TorchScript, behind one protocol.

:class:`StageRunner` is all :class:`stmt_monai.inference.stage.StageModel` asks of a backend:
``predict`` takes the normalised ``(1, in_channels, *spatial_size)`` float32 input and returns
the argmax labels ``(*spatial_size)`` uint8 on the CPU, so each backend takes the argmax where it
is cheapest (OpenVINO inside its graph, torch on the device) and frees what it holds between
cases; ``describe`` says what ran (backend, precision, files).

- :class:`TorchRunner`: an eager or TorchScript module (fp16 autocast on CUDA);
- :class:`OpenVinoRunner`: OpenVINO's CPU runtime on an IR with the argmax appended
  (:func:`openvino_ir`: converted once per weights file and cached; :func:`int8_ir_path`: the
  NNCF int8 model ``stmt_monai.inference.export`` writes); precision per machine by
  :func:`cpu_precision`;
- :class:`OnnxNetwork`: an exported ``model.onnx`` run by ONNX Runtime on the CPU (optional
  ``export`` extra);
- :func:`exported_path`: the file of an export beside its weights; a missing export, or one older
  than its weights, is refused with the command that makes it (:func:`check_exported`);
- :func:`resolve_backend`: ``"auto"``: OpenVINO on the CPU when it is installed, torch on CUDA.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from stmt_monai.arrays import as_numpy, device_type, is_tensor

if TYPE_CHECKING:  # the OpenVINO path never imports torch (stmt_monai.arrays); the others import it where they run
    import torch

logger = logging.getLogger(__name__)


#: ``auto`` picks one (:func:`resolve_backend`); ``torchscript`` and ``onnx`` run the files
#: ``stmt-export`` writes beside the weights
BACKENDS = ("auto", "torch", "openvino", "torchscript", "onnx")


#: OpenVINO inference precisions: ``auto`` is :func:`cpu_precision`; ``int8`` runs the NNCF model
#: of :func:`stmt_monai.inference.export.export_int8`
PRECISIONS = ("auto", "f32", "bf16", "int8")


def cache_dir() -> Path:
    """Where converted and compiled models are cached: ``$STMT_MONAI_CACHE`` or ``~/.cache/stmt_monai``."""
    return Path(os.environ.get("STMT_MONAI_CACHE", Path.home() / ".cache" / "stmt_monai"))


def _file_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-1, memoised in the cache by (path, size, mtime)
    so that a warm start does not read every weights file again."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = cache_dir() / "digests" / f"{hashlib.sha1(str(path).encode()).hexdigest()[:16]}.json"
    stamp = [stat.st_size, stat.st_mtime_ns]
    try:
        record = json.loads(memo.read_text())
        if record["stamp"] == stamp:
            return record["digest"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    try:
        from stmt_monai.io import write_text_atomic

        write_text_atomic(memo, json.dumps({"path": str(path), "stamp": stamp, "digest": digest}))
    except OSError:  # a read-only cache only costs the re-read
        pass
    return digest


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str, device: str | torch.device = "cpu") -> str:
    """The backend that runs: ``"auto"`` is OpenVINO on the CPU when installed (about twice
    eager PyTorch's speed there), else torch (CUDA, or a CPU install without OpenVINO)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "openvino" if device_type(device) == "cpu" and openvino_available() else "torch"


def default_threads() -> int | None:
    """Threads of the OpenVINO and ONNX Runtime backends when none are given: ``OMP_NUM_THREADS``
    when set, else torch's count when torch is loaded anyway, else ``None`` (the runtime's own
    choice, one per physical core). Torch is not imported for this."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


#: CPU flags with native bf16 arithmetic (AVX-512 BF16 dot products; AMX tiles)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_precision(capabilities: Sequence[str] | None = None, flags: set[str] | None = None) -> str:
    """The fastest OpenVINO precision with unchanged results on this CPU: ``"bf16"`` where the
    hardware computes in bf16 (flags ``avx512_bf16`` or ``amx_bf16``, and OpenVINO lists ``BF16``
    in ``OPTIMIZATION_CAPABILITIES``), else ``"f32"`` (bf16 emulated on older AVX-512 CPUs is
    slower than f32). Agreement with f32 is checked by ``tests/test_backends.py`` and reported
    at paper size by ``benchmarks/cascade_speed.py``.

    Args:
        capabilities: OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` (default: asked of OpenVINO).
        flags: CPU flags (default :func:`cpu_flags`; where none can be read, OpenVINO's list decides).
    """
    if capabilities is None:
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    flags = cpu_flags() if flags is None else flags
    hardware = any(f in flags for f in BF16_FLAGS) if flags else True
    return "bf16" if "BF16" in capabilities and hardware else "f32"


def exported_path(weights_file: str | os.PathLike, backend: str) -> Path:
    """The export of ``weights_file`` a backend runs, same folder and stem
    (:mod:`stmt_monai.inference.export` writes them): ``"torchscript"`` ``.ts``, ``"onnx"``
    ``.onnx``, ``"openvino_int8"`` ``.int8.xml`` (with its ``.int8.bin``)."""
    suffixes = {"torchscript": ".ts", "onnx": ".onnx", "openvino_int8": ".int8.xml"}
    if backend not in suffixes:
        raise ValueError(f"no exported file for backend {backend!r}")
    return Path(weights_file).with_suffix(suffixes[backend])


def check_exported(weights_file: str | os.PathLike, backend: str, command: str) -> Path:
    """The export of ``weights_file`` for ``backend``; refuses a missing file or one older than
    the weights (``command`` makes it)."""
    weights_file = Path(weights_file)
    path = exported_path(weights_file, backend)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {backend} export of {weights_file}; make it with: {command}")
    if path.stat().st_mtime < weights_file.stat().st_mtime:
        raise RuntimeError(f"{path} is older than {weights_file}: re-export with: {command}")
    return path


# ----------------------------------------------------------------------------- the protocol
@runtime_checkable
class StageRunner(Protocol):
    """What a stage asks of a backend (:class:`stmt_monai.inference.stage.StageModel`)."""

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Argmax labels of one input.

        Args:
            x: ``(1, in_channels, *spatial_size)`` float32 normalised intensities.

        Returns:
            ``(*spatial_size)`` uint8 class indices, on the CPU.
        """
        ...

    def describe(self) -> dict:
        """``{"backend", "precision", ...}``: what runs (for reports and logs)."""
        ...


class TorchRunner:
    """An eager (or TorchScript) module on its device; argmax there, labels to the CPU.

    Args:
        network: eval-mode module on ``device`` (weights loaded).
        device: torch device of the inputs.
        amp: fp16 autocast (CUDA).
        backend: ``"torch"`` or ``"torchscript"`` (for :meth:`describe`).
        files: the files run, for :meth:`describe`.
    """

    def __init__(self, network: torch.nn.Module, device: torch.device, amp: bool = False, backend: str = "torch", files: dict | None = None):
        import torch

        self.network, self.device, self.amp, self.backend, self.files = network, torch.device(device), bool(amp), backend, files or {}

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        import torch

        x = torch.as_tensor(x).to(self.device, torch.float32, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            return self.network(x)[0].argmax(0).to(torch.uint8).cpu()

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": "fp16-autocast" if self.amp else "f32", **self.files}


class OnnxNetwork:
    """An exported ONNX network run by ONNX Runtime on the CPU (optional ``export`` extra).

    Args:
        path: the ``.onnx`` file (:func:`stmt_monai.inference.export.export_onnx`: one input, logits out).
        threads: intra-op threads (default :func:`default_threads`, else ONNX Runtime's choice).
        spatial_size: if given, the graph's fixed input size must be this one.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spatial_size: Sequence[int] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("backend 'onnx' needs the optional extra: pip install 'stmt-monai[export]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or default_threads() or 0)  # 0: ONNX Runtime's choice
        options.inter_op_num_threads = 1
        # no memory arena: ONNX Runtime's arena kept every network's peak buffers (peak RSS 6.5 GB
        # against torch's 4.1 GB for a 512 x 512 x 300 case, measured here)
        options.enable_cpu_mem_arena = False
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        if spatial_size is not None and list(shape[2:]) != [int(s) for s in spatial_size]:
            raise ValueError(f"{path}: exported for input {shape}, the bundle's spatial_size is {list(spatial_size)}: re-export")

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits of ``x`` (``(1, C, *spatial_size)``), on the CPU."""
        import torch

        return torch.from_numpy(self.session.run(None, {self.input_name: np.ascontiguousarray(as_numpy(x), np.float32)})[0])

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        import torch

        return self(x)[0].argmax(0).to(torch.uint8)

    def describe(self) -> dict:
        return {"backend": "onnx", "precision": "f32", "exported": str(self.path)}


# ----------------------------------------------------------------------------- OpenVINO
def openvino_ir(
    build_network: Callable[[], torch.nn.Module], spatial_size: Sequence[int], in_channels: int, cache_key: str
) -> Path:
    """The network's OpenVINO IR (fp32 weights, fixed input size, argmax appended by
    :func:`with_argmax`), converted once and cached.

    Converting a Res-UNet to OpenVINO's IR takes 30-70 s at paper size (minutes on a busy
    machine), so it is done once per weights file and network settings (``cache_key``) and kept
    in :func:`cache_dir` ``/openvino``; later processes find the file and never build the torch
    network (``build_network`` is only called on a miss).

    Args:
        build_network: returns the eval-mode module with its weights (CPU).
        spatial_size: the input size the IR is fixed to.
        in_channels: input channels.
        cache_key: identifies the weights and the network settings.

    Returns:
        the ``.xml`` path (``.bin`` beside it).
    """
    import openvino as ov

    spatial = tuple(int(s) for s in spatial_size)
    key = hashlib.sha1(f"{cache_key}|{spatial}|{in_channels}|argmax-u8|{ov.__version__}".encode()).hexdigest()[:16]
    cache = cache_dir() / "openvino"
    xml = cache / f"{key}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    logger.info("converting the network to OpenVINO IR once (cached in %s)", cache)
    import torch

    network = build_network().cpu().eval()
    # trace at a small valid size, then fix the input to the real one
    depth = sum(1 for m in network.modules() if isinstance(m, torch.nn.ConvTranspose3d))
    example = torch.zeros(1, in_channels, *[2**depth * 2] * len(spatial))
    model = ov.convert_model(network, example_input=example, input=[ov.PartialShape([1, in_channels] + [-1] * len(spatial))])
    model.reshape({model.inputs[0]: ov.PartialShape([1, in_channels, *spatial])})
    save_ir_atomic(with_argmax(model), xml)
    return xml


def save_ir_atomic(model, xml: str | os.PathLike) -> Path:
    """Save an OpenVINO model as ``xml`` + ``.bin`` (fp32 weights kept), each renamed into place."""
    import openvino as ov

    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))  # the .bin first: an .xml is only ever complete
        os.replace(tmp, xml)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return xml


def with_argmax(model):
    """The OpenVINO model with its logits replaced by their argmax over the channels, as u8.

    Taking the argmax inside the graph spares the copy of ``out_channels x 192^3`` float32
    logits (387 MB for the 14 organ classes) out of OpenVINO and a strided argmax over them in
    numpy. ``TopK`` with ``k=1`` and ``stable`` keeps the first of tied channels, as
    ``torch.argmax`` does.
    """
    import openvino as ov
    from openvino import opset13 as ops

    logits = model.get_results()[0].input_value(0)
    top = ops.topk(logits, ops.constant(np.int64(1)), axis=1, mode="max", sort="value", index_element_type=ov.Type.i32, stable=True)
    labels = ops.convert(top.output(1), ov.Type.u8)
    return ov.Model([labels], model.get_parameters(), f"{model.get_friendly_name()}_argmax")


class OpenVinoRunner:
    """A stage network run by OpenVINO's CPU runtime (the default on CPU, see :func:`resolve_backend`).

    The IR (:func:`openvino_ir`, or the NNCF int8 model; both end in the argmax,
    :func:`with_argmax`) is compiled for the CPU with ``CACHE_DIR``: the compiled blob is
    kept in :func:`cache_dir` ``/openvino/compiled``, so a later process loads it in a fraction of
    a second instead of compiling again. Inputs are shared with OpenVINO (no copy); its
    intermediate buffers are released after each call (three compiled 192^3 / 128^3 networks held
    7-8 GB together otherwise, measured here).

    Args:
        xml: the IR (``.xml`` with its ``.bin``), labels out.
        precision: ``"f32"``, ``"bf16"`` (OpenVINO's inference precision hint) or ``"int8"`` (an
            NNCF-quantised IR; its non-quantised operations run at :func:`cpu_precision`).
        threads: inference threads (default :func:`default_threads`, else OpenVINO's choice).
    """

    def __init__(self, xml: str | os.PathLike, precision: str = "f32", threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("backend 'openvino' needs OpenVINO: pip install 'stmt-monai[openvino]' (scripts/install.sh installs it)") from None
        if precision not in ("f32", "bf16", "int8"):
            raise ValueError(f"OpenVINO precision must be f32, bf16 or int8, got {precision!r}")
        self.xml, self.precision = Path(xml), precision
        core = ov.Core()
        hint = cpu_precision() if precision == "int8" else precision
        threads = threads or default_threads()
        config = {
            **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {}),
            "INFERENCE_PRECISION_HINT": hint,  # explicit: no silent bf16 where f32 was asked
            "PERFORMANCE_HINT": "LATENCY",
            "CACHE_DIR": str(cache_dir() / "openvino" / "compiled"),
        }
        # compiled from the path: with CACHE_DIR a warm start imports the blob and skips reading the IR
        self.compiled = core.compile_model(str(self.xml), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Labels in the kind of ``x``: a tensor for a tensor, an array for an array (the
        cascade's CPU path, which never imports torch)."""
        array = np.ascontiguousarray(as_numpy(x), np.float32)
        try:
            labels = self.request.infer([array], share_inputs=True, share_outputs=False)[0]
        finally:
            self.compiled.release_memory()
        labels = np.asarray(labels).reshape(labels.shape[2:])
        if is_tensor(x):
            import torch

            return torch.from_numpy(labels)
        return labels

    def describe(self) -> dict:
        return {"backend": "openvino", "precision": self.precision, "ir": str(self.xml)}


# ----------------------------------------------------------------------------- choosing one
def make_runner(
    backend: str,
    build_network: Callable[[], torch.nn.Module],
    weights_file: str | os.PathLike,
    spatial_size: Sequence[int],
    in_channels: int,
    network_key: str,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    amp: bool = False,
    precision: str = "auto",
    export_command: str = "stmt-export BUNDLE",
) -> StageRunner:
    """The runner of one stage network for ``backend`` (:data:`BACKENDS`, ``"auto"`` resolved).

    Args:
        backend: ``"auto"``, ``"torch"``, ``"openvino"`` (CPU), ``"torchscript"`` (``.ts`` beside the
            weights) or ``"onnx"`` (``.onnx``, CPU).
        build_network: returns the eval-mode module with its weights, on the CPU; called only
            when the backend needs it (not for an OpenVINO IR already cached, nor for exports).
        weights_file: the ``model.pt`` (exports are looked for beside it).
        spatial_size, in_channels: the network's fixed input.
        network_key: identifies the network settings (with the weights' digest: the IR cache key).
        device: ``cpu`` or ``cuda``; OpenVINO and ONNX run on the CPU only.
        threads: threads of OpenVINO and ONNX Runtime (default :func:`default_threads`).
        amp: fp16 autocast (torch and torchscript on CUDA).
        precision: OpenVINO only: ``"auto"`` (:func:`cpu_precision`), ``"f32"``, ``"bf16"`` or
            ``"int8"`` (the NNCF model :func:`exported_path` ``"openvino_int8"``).
        export_command: the command that makes a missing export (for the error message).
    """
    backend = resolve_backend(backend, device)
    if backend in ("openvino", "onnx") and device_type(device) != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU: use device='cpu'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision not in ("auto", "f32") and backend != "openvino":
        raise ValueError(f"precision {precision!r} is for the OpenVINO backend (torch: fp32, or fp16 autocast on CUDA with amp)")
    weights_file = Path(weights_file)
    if backend == "openvino":
        if precision == "int8":
            xml = check_exported(weights_file, "openvino_int8", export_command + " --formats openvino_int8")
        else:
            xml = openvino_ir(build_network, spatial_size, in_channels, f"{_file_digest(weights_file)}|{network_key}")
        return OpenVinoRunner(xml, cpu_precision() if precision == "auto" else precision, threads)
    if backend == "onnx":
        return OnnxNetwork(check_exported(weights_file, "onnx", export_command), threads=threads, spatial_size=spatial_size)
    import torch

    device = torch.device(device)
    if backend == "torchscript":
        path = check_exported(weights_file, "torchscript", export_command)
        return TorchRunner(torch.jit.load(str(path), map_location=device).eval(), device, amp, "torchscript", {"exported": str(path)})
    return TorchRunner(build_network().to(device).eval(), device, amp)
