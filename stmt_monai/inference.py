"""The StMt cascade at inference (paper Fig. 2c; SPEC.md, "Inference"): CT in, FLARE label map out.

1. stage 1 (bundle ``coarse_abdomen``): the whole CT, canonical RAS order, resized to 128^3,
   normalised with the stage's fingerprint; argmax at network resolution gives the abdomen;
2. region of interest: the abdomen's bounding box mapped back to the original grid, plus a
   margin in mm (:func:`stmt_monai.preprocessing.abdomen_roi_from_prediction`);
3. stage 2: that box cropped from the original-resolution CT and resized to 192^3 once for both
   students (``organ_selftrain`` and ``tumor_meanteacher``; normalised once if their
   fingerprints are equal); argmax of each at network resolution;
4. post-processing at network resolution: largest connected component per organ class, tumor
   laid over the organs (:mod:`stmt_monai.postprocessing`);
5. nearest-neighbour restore into the crop and zero padding to the input's exact shape, in the
   file's own voxel order (:func:`stmt_monai.preprocessing.restore_label_map`).

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
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from stmt_monai.io import ITK_SUFFIXES, NIFTI_SUFFIXES, ImageError, atomic_path, case_name, load_image, save_label_map
from stmt_monai.postprocessing import largest_component, overlay_tumor
from stmt_monai.preprocessing import (
    ROI_MARGIN_MM,
    ROI_MIN_COMPONENT_FRACTION,
    Fingerprint,
    abdomen_roi_from_prediction,
    prepare_volume,
    resize,
    restore_label_map,
    to_canonical,
)

logger = logging.getLogger(__name__)

#: stage -> bundle folder name under ``bundles/``
STAGE_BUNDLES: Mapping[str, str] = {"abdomen": "coarse_abdomen", "organ": "organ_selftrain", "tumor": "tumor_meanteacher"}
#: override file of the shipped demo weights, layered last (``configs/demo.json``)
DEMO_CONFIG = "demo.json"
#: which weights a bundle's network is built for: ``auto`` (trained ``models/model.pt`` if there,
#: else the demo weights), ``trained``, ``demo``
WEIGHTS = ("auto", "trained", "demo")
#: ``torchscript`` and ``onnx`` run the files ``scripts/export.py`` writes beside the weights
BACKENDS = ("torch", "openvino", "torchscript", "onnx")
#: output names beside ``<case>.nii.gz``
REPORT_JSON, REPORT_CSV, PREVIEW_PNG = "_report.json", "_report.csv", "_preview.png"


def default_bundles_dir() -> Path:
    """The repository's ``bundles/`` folder next to the package (an editable install's checkout)."""
    return Path(__file__).resolve().parents[1] / "bundles"


# ----------------------------------------------------------------------------- bundles
def bundle_config(bundle_root: str | os.PathLike, weights: str = "auto"):
    """Read a stage bundle's inference configuration.

    Layers ``configs/common.json``, ``configs/inference.json`` (if present) and, for the demo
    weights, ``configs/demo.json``; ``bundle_root`` is set to the absolute path so the bundle's
    relative ids (``ckpt_dir``, ``fingerprint``) resolve from any working directory.

    Which weights (``weights``):

    - ``"trained"``: the bundle's own ``models/model.pt`` (``model_path`` id if defined, else
      ``ckpt_dir``/model.pt), network as ``common.json`` defines it (the paper's sizes);
    - ``"demo"``: ``configs/demo.json`` layered on top; it redefines the network's size keys
      (``base_channels``, ``num_downsamplings``, ``network_def#max_channels``, ``spatial_size``)
      and ``ckpt_dir`` (``models/demo``), exactly as ``scripts/train_demo.py`` trained them;
    - ``"auto"``: ``"trained"`` if the trained weights file exists, else ``"demo"`` if the bundle
      has ``configs/demo.json``, else ``"trained"`` (whose missing file is then reported).

    Returns:
        ``(parser, kind)``: the :class:`monai.bundle.ConfigParser` and ``"trained"`` or ``"demo"``.
    """
    from monai.bundle import ConfigParser

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    root = Path(bundle_root).resolve()
    configs = root / "configs"
    if not (configs / "common.json").is_file():
        raise FileNotFoundError(f"{root}: not a stage bundle (no configs/common.json)")
    files = [configs / "common.json"] + ([configs / "inference.json"] if (configs / "inference.json").is_file() else [])
    demo_file = configs / DEMO_CONFIG

    def parse(extra: list[Path]):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files + extra])
        parser["bundle_root"] = str(root)
        return parser

    kind = weights
    if weights == "auto":
        kind = "trained"
        if not weights_path(parse([])).is_file() and demo_file.is_file():
            kind = "demo"
    if kind == "demo" and not demo_file.is_file():
        raise FileNotFoundError(f"{root}: no {DEMO_CONFIG} (demo weights not installed; run scripts/train_demo.py)")
    return parse([demo_file] if kind == "demo" else []), kind


def weights_path(parser) -> Path:
    """The weights file a parsed bundle config points at: ``model_path``, else ``<ckpt_dir>/model.pt``."""
    if "model_path" in parser:
        return Path(parser.get_parsed_content("model_path"))
    return Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"


def load_weights(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """A network's state dict from a bundle's ``model.pt``, as float32.

    ``model.pt`` may be a bare state dict (the model-zoo convention) or ``{name: state_dict}``
    (``BestCheckpoint`` with several objects, e.g. the mean teacher's ``{"student", "teacher"}``);
    ``key`` picks the entry (the tumor bundle's ``inference_network``), and a one-entry dict
    (``{"model": sd}``) is unwrapped. Half-precision tensors (the shipped demo weights are
    stored in fp16) are cast to float32.
    """
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if key is not None and key in checkpoint:
        checkpoint = checkpoint[key]
    elif key is not None and all(isinstance(v, Mapping) for v in checkpoint.values()):
        raise KeyError(f"{path}: no {key!r} entry (has {sorted(checkpoint)})")
    elif len(checkpoint) == 1 and isinstance(next(iter(checkpoint.values())), Mapping):
        checkpoint = next(iter(checkpoint.values()))
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in checkpoint.items()}


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


def _file_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def exported_path(weights_file: str | os.PathLike, backend: str) -> Path:
    """The export of ``weights_file`` that backend ``"torchscript"`` (``.ts``) or ``"onnx"``
    (``.onnx``) runs: same folder and stem (:mod:`stmt_monai.export` writes it)."""
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
        path: the ``.onnx`` file (:func:`stmt_monai.export.export_onnx`: one input, logits out).
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


def write_demo_config(bundle_root: str | os.PathLike, settings: Mapping) -> Path:
    """Write a bundle's ``configs/demo.json``: the overrides of its demo network.

    ``settings`` holds bundle ids (``base_channels``, ``num_downsamplings``, ``spatial_size``,
    ``network_def#max_channels``, ...); ``ckpt_dir`` is set to ``models/demo`` so the demo
    weights and fingerprint never mix with trained ones in ``models/``. Training with this file
    layered (``scripts/train_demo.py``) and :func:`bundle_config` (``weights="demo"``) then build
    the same network.
    """
    from stmt_monai.io import write_text_atomic

    config = {"ckpt_dir": "$@bundle_root + '/models/demo'", **dict(settings)}
    return write_text_atomic(Path(bundle_root) / "configs" / DEMO_CONFIG, json.dumps(config, indent=4) + "\n")


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor], key: str | None = None, half: bool = False) -> Path:
    """Write a state dict as a bundle's ``model.pt`` (atomically).

    Args:
        path: output file.
        state: the network's state dict.
        key: store as ``{key: state}`` (the tumor bundle's ``inference_network``), else bare.
        half: store floating-point tensors as fp16 (the demo weights; :func:`load_weights`
            casts them back to fp32).
    """
    converted: dict = {}

    def convert(v: torch.Tensor) -> torch.Tensor:
        # one copy per shared tensor (DynUNet lists its blocks twice in its state dict), as torch.save does
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride())
        if key not in converted:
            converted[key] = v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()
        return converted[key]

    state = {k: convert(v) for k, v in state.items()}
    tmp, final = atomic_path(path)
    try:
        torch.save({key: state} if key else state, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def random_weights(bundle_root: str | os.PathLike, fingerprint: Fingerprint, weights: str = "demo", seed: int = 0) -> Path:
    """Give a bundle randomly initialised weights and a fingerprint (tests and timing benchmarks).

    Builds the bundle's network as :func:`bundle_config` does for ``weights`` and writes its
    initial state to the weights path (under the ``inference_network`` key where the bundle
    has one) and ``fingerprint`` beside it.
    """
    parser, _ = bundle_config(bundle_root, weights)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    path = weights_path(parser)
    fingerprint.save(parser.get_parsed_content("fingerprint"))
    return save_weights(path, network.state_dict(), key=parser.get("inference_network"))


# ----------------------------------------------------------------------------- the cascade
@dataclasses.dataclass
class CascadeResult:
    """One case through the cascade.

    Attributes:
        labels: ``(X, Y, Z)`` uint8 FLARE label map (0..14) in the input file's voxel order.
        affine: the input's 4 x 4 RAS affine (write ``labels`` with it).
        image: ``(X, Y, Z)`` float32 HU of the input (for the report and preview).
        organ_labels: the organ result before the tumor overlay, on the same grid, when the
            cascade found a tumor (the report names each tumor's host organ from it), else None.
        roi: stage 1's region of interest (:func:`abdomen_roi_from_prediction`'s dict).
        timings: seconds per step.
    """

    labels: np.ndarray
    affine: np.ndarray
    image: np.ndarray
    organ_labels: np.ndarray | None
    roi: dict
    timings: dict


class Cascade:
    """The three StMt stages, loaded once, chained on any number of cases.

    Args:
        bundles_dir: folder holding ``coarse_abdomen``, ``organ_selftrain`` and
            ``tumor_meanteacher`` (default :func:`default_bundles_dir`).
        device: ``"cpu"`` or ``"cuda"``.
        threads: ``torch.set_num_threads`` (and OpenVINO's threads); default unchanged.
        backend: ``"torch"`` (default), ``"openvino"`` (CPU), ``"torchscript"`` or ``"onnx"`` (CPU):
            see :meth:`StageModel.from_bundle`.
        weights: ``"auto"``, ``"trained"`` or ``"demo"`` (:func:`bundle_config`).
        margin_mm: ROI margin; default the ``coarse_abdomen`` bundle's ``roi_margin_mm``.
        bundles: per-stage bundle folders overriding ``bundles_dir`` (``{"organ": path}``).
        amp: fp16 autocast of the networks; default on CUDA (torch / torchscript backends), where
            it lowers the peak GPU memory; off on the CPU.
    """

    def __init__(
        self,
        bundles_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        backend: str = "torch",
        weights: str = "auto",
        margin_mm: float | None = None,
        bundles: Mapping[str, str | os.PathLike] | None = None,
        amp: bool | None = None,
    ):
        start = time.perf_counter()
        if threads:
            torch.set_num_threads(int(threads))
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for but torch sees no CUDA device")
        root = Path(bundles_dir) if bundles_dir is not None else default_bundles_dir()
        paths = {stage: Path((bundles or {}).get(stage, root / name)) for stage, name in STAGE_BUNDLES.items()}
        self.models = {
            stage: StageModel.from_bundle(path, stage, device, weights, backend, threads, amp) for stage, path in paths.items()
        }
        abdomen = self.models["abdomen"].settings
        self.margin_mm = float(margin_mm if margin_mm is not None else abdomen.get("roi_margin_mm", ROI_MARGIN_MM))
        self.min_component_fraction = float(abdomen.get("min_component_fraction", ROI_MIN_COMPONENT_FRACTION))
        self.device, self.backend = device, backend
        self.load_seconds = time.perf_counter() - start

    def describe(self) -> dict:
        """The settings of the three stages (for reports and logs)."""
        return {
            "backend": self.backend,
            "device": str(self.device),
            "roi_margin_mm": self.margin_mm,
            "load_seconds": round(self.load_seconds, 3),
            "stages": {stage: model.settings for stage, model in self.models.items()},
        }

    def segment(self, path: str | os.PathLike) -> CascadeResult:
        """Segment one CT file or DICOM series folder (see :meth:`segment_array`).

        Raises:
            ImageError: the input cannot be read or is not a 3D volume.
        """
        start = time.perf_counter()
        image, affine = load_image(path)
        read = time.perf_counter() - start
        result = self.segment_array(image, affine)
        result.timings = {"read": read, **result.timings}
        return result

    def segment_array(self, image: np.ndarray, affine: np.ndarray) -> CascadeResult:
        """Segment a CT volume.

        Args:
            image: ``(X, Y, Z)`` HU, in its file's voxel order.
            affine: its 4 x 4 RAS affine.

        Returns:
            :class:`CascadeResult` with labels on exactly the input's grid.
        """
        t = {}
        clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            t[name] = now - clock
            clock = now

        image = np.asarray(image, np.float32)
        abdomen, organ, tumor = self.models["abdomen"], self.models["organ"], self.models["tumor"]
        # stage 1: whole volume at 128^3
        canonical = to_canonical(image, affine)  # once for the three networks
        x1, _, geometry1 = prepare_volume(image, affine, abdomen.spatial_size, canonical=canonical)
        mask = abdomen.predict(abdomen.fingerprint.normalize(x1))
        lap("stage1")
        roi = abdomen_roi_from_prediction(mask, geometry1, self.margin_mm, self.min_component_fraction)
        box = (roi["start_voxel"], roi["end_voxel"])
        # stage 2: one crop and resize for both students when their sizes agree
        x2, _, geometry2 = prepare_volume(image, affine, organ.spatial_size, roi_box=box, canonical=canonical)
        organ_in = organ.fingerprint.normalize(x2)
        same_size = tumor.spatial_size == organ.spatial_size
        if same_size:
            tumor_in = organ_in if tumor.fingerprint == organ.fingerprint else tumor.fingerprint.normalize(x2)
        else:
            x3, _, _ = prepare_volume(image, affine, tumor.spatial_size, roi_box=box, canonical=canonical)
            tumor_in = tumor.fingerprint.normalize(x3)
            del x3
        del x2, canonical  # the whole reoriented volume is not needed by the networks
        lap("stage2_input")
        organ_net = largest_component(organ.predict(organ_in))
        lap("organ")
        tumor_net = tumor.predict(tumor_in)
        # same crop, other size: nearest onto the organ network's grid
        tumor_net = (tumor_net if same_size else resize(tumor_net, organ.spatial_size, "nearest")).numpy()
        del organ_in, tumor_in
        lap("tumor")
        organ_labels = restore_label_map(organ_net, geometry2)
        if any(r < n for r, n in zip(geometry2.roi_shape, geometry2.network_size)):
            # nearest down-sampling (a crop thinner than the network input) can split a component
            organ_labels = largest_component(organ_labels)
        if tumor_net.any():
            # restore(overlay(organs, tumor)) == overlay(restore(organs), restore(tumor)): nearest is voxelwise
            labels = overlay_tumor(organ_labels, restore_label_map(tumor_net, geometry2))
        else:
            labels, organ_labels = organ_labels, None
        lap("restore")
        return CascadeResult(labels, np.asarray(affine, float), image, organ_labels, roi, t)


# ----------------------------------------------------------------------------- cases and outputs
def _holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` itself holds a DICOM series (ITK's "no series" warning silenced)."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_cases(input: str | os.PathLike) -> list[Path]:
    """The cases of an input: a file is one case; a folder holding DICOM files is one case (a
    series); any other folder gives each ``.nii``/``.nii.gz``/``.mha``/``.nrrd`` file and each
    DICOM series sub-folder in it (hidden names skipped), sorted.

    Raises:
        ImageError: missing input, or a folder without any case.
    """
    path = Path(input)
    if not path.exists():
        raise ImageError(path, "no such file or folder")
    if path.is_file() or _holds_dicom(path):
        return [path]
    cases = [
        p
        for p in sorted(path.iterdir())
        if not p.name.startswith(".") and ((p.is_file() and p.name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES)) or (p.is_dir() and _holds_dicom(p)))
    ]
    if not cases:
        raise ImageError(path, f"holds no image ({', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)} or DICOM series folder)")
    return cases


def output_paths(case: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Where a case's outputs go: ``mask`` (``<case>.nii.gz``, FLARE naming), ``report_json``,
    ``report_csv`` and ``preview`` (``<case>_report.json`` / ``.csv``, ``<case>_preview.png``)."""
    name, out = case_name(case), Path(output_dir)
    return {
        "mask": out / f"{name}.nii.gz",
        "report_json": out / f"{name}{REPORT_JSON}",
        "report_csv": out / f"{name}{REPORT_CSV}",
        "preview": out / f"{name}{PREVIEW_PNG}",
    }


def segment_case(
    cascade: Cascade,
    case: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    preview: bool = False,
    report: bool = True,
) -> dict:
    """Segment one case and write its outputs (each written atomically).

    Args:
        cascade: the loaded :class:`Cascade`.
        case: a CT file or DICOM series folder.
        output_dir: destination; see :func:`output_paths`.
        overwrite: redo a case whose mask exists (otherwise it is skipped).
        preview: also write the PNG preview.
        report: write the JSON / CSV report.

    Returns:
        ``{"case", "status": "written" | "skipped", "outputs": {kind: path}, "timings"}``.

    Raises:
        ImageError: the input cannot be used (other errors propagate as they are).
    """
    from stmt_monai import report as case_report

    paths = output_paths(case, output_dir)
    if paths["mask"].exists() and not overwrite:
        return {"case": str(case), "status": "skipped", "outputs": {"mask": str(paths["mask"])}, "timings": {}}
    result = cascade.segment(case)
    clock = time.perf_counter()
    written = {"mask": save_label_map(paths["mask"], result.labels, result.affine)}
    timings = dict(result.timings)
    timings["write"] = time.perf_counter() - clock
    if report:
        clock = time.perf_counter()
        summary = case_report.case_report(
            result.labels, result.affine, result.image, organ_labels=result.organ_labels, case=case_name(case), source=str(case)
        )
        summary["cascade"] = {**cascade.describe(), "roi": result.roi, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
        written["report_json"], written["report_csv"] = case_report.write_report(summary, paths["report_json"], paths["report_csv"])
        timings["report"] = time.perf_counter() - clock
    if preview:
        from stmt_monai.visualize import overlay_figure

        clock = time.perf_counter()
        written["preview"] = overlay_figure(
            result.image, result.labels, paths["preview"], affine=result.affine, title=case_name(case), center=_organ_center(result)
        )
        timings["preview"] = time.perf_counter() - clock
    return {"case": str(case), "status": "written", "outputs": {k: str(v) for k, v in written.items()}, "timings": timings}


def _organ_center(result: CascadeResult) -> tuple[int, int, int] | None:
    """Canonical voxel the preview's slices pass through: the centre of the organs' bounding box
    (a single tumor would otherwise pull the views off the organs); None: the viewer's default."""
    from stmt_monai.preprocessing import to_canonical

    canonical, _, _ = to_canonical(result.labels, result.affine)
    found = np.argwhere(canonical[::2, ::2, ::2] > 0) * 2
    if not found.size:
        return None
    return tuple(int(v) for v in (found.min(0) + found.max(0)) // 2)


@dataclasses.dataclass
class BatchResult:
    """What a batch did: ``written`` and ``skipped`` case paths, ``failed`` as ``(case, reason)``."""

    written: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_if_failed(self) -> "BatchResult":
        """Raise ``RuntimeError`` listing ``case: reason`` lines if some case failed (the
        ``cascade`` bundle's ``run`` ends with it so that a failed case fails the run), else
        return self."""
        if self.failed:
            lines = "\n".join(f"{case}: {reason}" for case, reason in self.failed)
            raise RuntimeError(f"{len(self.failed)} of {len(self.failed) + len(self.written) + len(self.skipped)} cases failed:\n{lines}")
        return self


def failure_reason(case: str | os.PathLike, err: BaseException) -> str:
    """One-line reason of a failed case (``ImageError`` already names the file)."""
    if isinstance(err, ImageError):
        return err.problem
    return " ".join(f"{type(err).__name__}: {err}".split())


def shard_cases(cases: Sequence[Path], shard: str | None) -> list[Path]:
    """Share ``"i/n"`` of ``cases``: every n-th case from the i-th (0-based).

    n processes (one per GPU, or per machine) given shards ``0/n`` ... ``n-1/n`` segment
    disjoint sets of cases that together are all of them; ``None`` keeps every case.

    Raises:
        ValueError: ``shard`` is not ``"i/n"`` with ``0 <= i < n``.
    """
    if shard is None:
        return list(cases)
    try:
        index, count = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard must be 'i/n' (e.g. 0/2), got {shard!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return list(cases)[index::count]


def segment_folder(
    cascade: Cascade,
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    preview: bool = False,
    progress: bool = True,
    shard: str | None = None,
) -> BatchResult:
    """Segment every case of ``input`` (:func:`list_cases`) into ``output_dir``.

    A case that fails is recorded (path, reason) and the batch goes on. With ``shard`` ``"i/n"``
    only that share of the cases (:func:`shard_cases`), to split a batch across processes.

    Returns:
        :class:`BatchResult`; its ``failed`` list is empty when all went well.
    """
    from tqdm import tqdm

    result = BatchResult()
    try:
        cases = shard_cases(list_cases(input), shard)
    except ImageError as err:
        result.failed.append((str(input), err.problem))
        return result
    for case in tqdm(cases, desc="stmt-segment", unit="case", disable=not progress):
        try:
            outcome = segment_case(cascade, case, output_dir, overwrite=overwrite, preview=preview)
        except Exception as err:  # noqa: BLE001 - one bad case must not stop the batch
            logger.debug("case %s failed", case, exc_info=True)
            result.failed.append((str(case), failure_reason(case, err)))
            logger.warning("%s: %s", case, result.failed[-1][1])
            continue
        logger.info("%s: %s %s", case, outcome["status"], outcome["outputs"]["mask"])
        (result.written if outcome["status"] == "written" else result.skipped).append(str(case))
        result.timings[str(case)] = outcome["timings"]
    return result


__all__ = [
    "BACKENDS",
    "BatchResult",
    "Cascade",
    "CascadeResult",
    "OnnxNetwork",
    "OpenVinoNetwork",
    "STAGE_BUNDLES",
    "StageModel",
    "bundle_config",
    "default_bundles_dir",
    "exported_path",
    "list_cases",
    "load_weights",
    "output_paths",
    "random_weights",
    "save_weights",
    "segment_case",
    "segment_folder",
    "shard_cases",
    "write_demo_config",
]
