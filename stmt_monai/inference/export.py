"""Export a stage bundle's network: TorchScript (MONAI's ``ckpt_export``) and ONNX.

The exported files go beside the weights they were made from (``models/model.pt`` ->
``models/model.ts``, ``models/model.onnx``; demo weights: ``models/demo/``), which is where the
cascade's ``torchscript`` and ``onnx`` backends (:class:`stmt_monai.inference.stage.StageModel`) look.

- TorchScript: ``monai.bundle.ckpt_export`` (``torch.jit.script``; metadata and configs saved in
  the file), the same as ``python -m monai.bundle ckpt_export network_def ...`` in the bundles'
  READMEs, with the bundle's config layering (:func:`stmt_monai.inference.bundles.bundle_config`).
- ONNX: ``torch.onnx.export`` (the dynamo exporter, onnxscript) at the bundle's fixed input
  ``(1, in_channels, *spatial_size)``; run by ONNX Runtime.

``stmt-export`` is the command line over :func:`export_bundle`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from stmt_monai.bundle import config_files as bundle_config_files
from stmt_monai.bundle import read_record
from stmt_monai.inference.backends import exported_path, save_ir_atomic
from stmt_monai.inference.bundles import (
    STAGE_BUNDLES,
    load_network,
    weights_path,
)
from stmt_monai.io import atomic_write

logger = logging.getLogger(__name__)


#: export formats, named as the cascade backends that run them (``exported_path`` gives the file)
FORMATS = ("torchscript", "onnx")


#: the NNCF int8 OpenVINO model (:func:`export_int8`; run by ``--precision int8``), not in the default formats:
#: it calibrates by running the cascade
INT8 = "openvino_int8"


#: names of the ONNX graph's input and output (the bundles' metadata keys)
ONNX_INPUT, ONNX_OUTPUT = "image", "pred"


def config_files(bundle_root: str | os.PathLike, kind: str) -> list[str]:
    """The config files :func:`stmt_monai.inference.bundles.bundle_config` reads for weights ``kind``
    (:func:`stmt_monai.bundle.config_files` of the inference workflow)."""
    return [str(f) for f in bundle_config_files(bundle_root, "inference", demo=kind == "demo")]


#: the network an export starts from: built and loaded as the cascade does (``(network, parser, kind)``)
bundle_network = load_network


def example_input(parser, batch: int = 1) -> torch.Tensor:
    """Zeros of the bundle's network input, ``(batch, in_channels, *spatial_size)``."""
    size = [int(s) for s in parser.get_parsed_content("spatial_size")]
    return torch.zeros(batch, int(parser.get_parsed_content("in_channels")), *size)


def stored_key(ckpt: str | os.PathLike, key: str | None) -> str:
    """``ckpt_export``'s ``key_in_ckpt``: ``key`` when ``ckpt`` stores the network under it (a
    tumor bundle trained before 0.3.0: ``{"student", "teacher"}``), else ``""`` (a bare state
    dict, the model zoo's ``model.pt``)."""
    if not key:
        return ""
    stored = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    return key if isinstance(stored.get(key), dict) else ""


def export_torchscript(bundle_root: str | os.PathLike, weights: str = "auto", filepath: str | os.PathLike | None = None) -> Path:
    """TorchScript of the bundle's network by ``monai.bundle.ckpt_export`` (scripted).

    Args:
        bundle_root: the stage bundle.
        weights: ``"auto"``, ``"trained"`` or ``"demo"`` (:func:`stmt_monai.inference.bundles.bundle_config`).
        filepath: output; default :func:`exported_path` of the weights, ``.ts``.

    Returns:
        The written file. Its state dict is checked against the weights (``ckpt_export`` skips
        keys it cannot match without an error).
    """
    from monai.bundle import ckpt_export

    network, parser, kind = bundle_network(bundle_root, weights)
    ckpt = weights_path(parser)
    final = Path(filepath) if filepath is not None else exported_path(ckpt, "torchscript")
    with atomic_write(final) as tmp:
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp),
            ckpt_file=str(ckpt),
            meta_file=str(Path(bundle_root).resolve() / "configs" / "metadata.json"),
            config_file=config_files(bundle_root, kind),
            key_in_ckpt=stored_key(ckpt, parser.get("inference_network")),
            bundle_root=str(Path(bundle_root).resolve()),
            **read_record(ckpt),  # the network the weights were trained with
        )
        exported = torch.jit.load(str(tmp), map_location="cpu").state_dict()
        expected = network.state_dict()
        if exported.keys() != expected.keys() or any(not torch.equal(exported[k], expected[k]) for k in expected):
            raise RuntimeError(f"{ckpt}: ckpt_export did not carry the weights over (key_in_ckpt?)")
    return final


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial axes of ``(B, C, *spatial)``, one axis at a time (keepdim)."""
    for axis in range(x.ndim - 1, 1, -1):
        x = x.mean(axis, keepdim=True)
    return x


class AxiswiseInstanceNorm(torch.nn.Module):
    """Instance norm for export whose statistics are means taken one spatial axis at a time.

    The same maths as ``torch.nn.InstanceNorm3d`` without running statistics (the students'
    norm), but ONNX Runtime's ``InstanceNormalization`` (and a one-step ``ReduceMean`` over the
    whole volume alike) sums a channel's 192^3 voxels in float32 in one run, which loses the mean
    where a channel is nearly constant, as the air around a CT makes many early feature maps:
    the exported student's logits were up to 1.7e-3 (real CT, 64^3) and 1.9e-3 (192^3) off
    PyTorch's. Averaging over one axis at a time keeps every float32 sum short: within 1.5e-5 of
    PyTorch, at the same ONNX Runtime speed (measured here, 1 thread: 8.9 s vs 9.2 s per 192^3
    forward of the paper's student).

    Args:
        norm: the ``InstanceNorm`` module to replace (its ``eps``, ``weight``, ``bias`` are shared).
    """

    def __init__(self, norm: torch.nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        if norm.track_running_stats:
            raise ValueError("instance norm with running statistics is not supported")
        self.eps, self.weight, self.bias = float(norm.eps), norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - _spatial_mean(x)
        y = centred * torch.rsqrt(_spatial_mean(centred.square()) + self.eps)
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


def with_axiswise_instance_norm(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with every instance norm replaced by :class:`AxiswiseInstanceNorm`."""
    network = copy.deepcopy(network)
    for module in list(network.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.modules.instancenorm._InstanceNorm):
                setattr(module, name, AxiswiseInstanceNorm(child))
    return network


def export_onnx(network: torch.nn.Module, example: torch.Tensor, filepath: str | os.PathLike, axiswise_norm: bool = True) -> Path:
    """ONNX of ``network`` at the fixed input shape of ``example`` (written atomically).

    Args:
        network: the eval-mode module, on the CPU.
        example: an input of the shape the graph is fixed to, ``(1, C, X, Y, Z)``.
        filepath: output ``.onnx``.
        axiswise_norm: export instance norms as :class:`AxiswiseInstanceNorm`, so that ONNX
            Runtime agrees with PyTorch to ~1e-5 on real CTs; ``False`` keeps ONNX's
            ``InstanceNormalization`` op (up to ~2e-3 off).

    Returns:
        The written file; graph input ``"image"``, output ``"pred"`` (logits).
    """
    if axiswise_norm:
        network = with_axiswise_instance_norm(network)
    with atomic_write(filepath) as tmp, torch.no_grad():
        torch.onnx.export(
            network.eval(), (example,), str(tmp), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], dynamo=True, external_data=False
        )
    return Path(filepath)


def run_exported(path: str | os.PathLike, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Logits of an exported network (``.ts`` by torch.jit, ``.onnx`` by ONNX Runtime) on ``x``."""
    path = Path(path)
    if path.suffix == ".onnx":
        from stmt_monai.inference.backends import OnnxNetwork

        return OnnxNetwork(path, threads=threads)(x)
    with torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu").eval()(x)


def max_abs_difference(network: torch.nn.Module, paths: Sequence[str | os.PathLike], x: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference of each export's logits from the eager network's on ``x``."""
    with torch.no_grad():
        reference = network(x)
    return {str(p): float((run_exported(p, x) - reference).abs().max()) for p in paths}


def export_bundle(
    bundle_root: str | os.PathLike,
    weights: str = "auto",
    formats: Sequence[str] = FORMATS,
    check: bool = True,
    calibration: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Export a stage bundle's network beside its weights (``model.ts``, ``model.onnx``).

    Args:
        bundle_root: ``bundles/coarse_abdomen``, ``organ_selftrain`` or ``tumor_meanteacher``
            (the tumor bundle's ``inference_network`` entry of ``model.pt``, the teacher by default).
        weights: ``"auto"``, ``"trained"`` or ``"demo"``.
        formats: any of ``"torchscript"``, ``"onnx"`` and ``"openvino_int8"`` (:func:`export_int8`,
            which needs the other two stage bundles beside this one).
        check: compare each export with the eager network on a random input of the network's
            size; the largest absolute difference is logged.
        calibration: ``openvino_int8``: a CT file or folder to calibrate on (default: generated
            cases and the shipped CT, :func:`calibration_images`).

    Returns:
        ``{format: path}``.
    """
    formats = [formats] if isinstance(formats, str) else list(formats)
    network, parser, kind = bundle_network(bundle_root, weights)
    written = {}
    for fmt in formats:
        if fmt == "torchscript":
            written[fmt] = export_torchscript(bundle_root, kind)
        elif fmt == "onnx":
            written[fmt] = export_onnx(network, example_input(parser), exported_path(weights_path(parser), "onnx"))
        elif fmt == INT8:
            stage = {name: stage for stage, name in STAGE_BUNDLES.items()}.get(Path(bundle_root).resolve().name)
            if stage is None:
                raise ValueError(f"{bundle_root}: int8 calibration runs the cascade, so the bundle must be one of {sorted(STAGE_BUNDLES.values())} beside the other two")
            written[fmt] = export_int8(Path(bundle_root).resolve().parent, kind, calibration, stages=[stage])[stage]
            continue  # checked against f32 on its calibration cases, not on random input
        else:
            raise ValueError(f"format must be one of {FORMATS + (INT8,)}, got {fmt!r}")
        logger.info("%s: %s", fmt, written[fmt])
    if check and written.keys() - {INT8}:
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(tuple(example_input(parser).shape)).astype(np.float32))
        for path, diff in max_abs_difference(network, [p for f, p in written.items() if f != INT8], x).items():
            logger.info("%s: max |exported - eager| = %.3g", path, diff)
    return written


# ----------------------------------------------------------------------------- int8 (NNCF)
#: generated calibration cases (besides the shipped CT) when no folder is given
CALIBRATION_CASES = 3


def calibration_images(source: str | os.PathLike | None = None, num_cases: int = CALIBRATION_CASES, seed: int = 1000, size: int = 96):
    """CT volumes to calibrate int8 quantisation on, one at a time.

    Args:
        source: a CT file or a folder of CTs (:func:`stmt_monai.io.find_cases`; at most
            ``num_cases`` of them, first by name); default: the shipped real CT and ``num_cases``
            generated cases (:func:`stmt_monai.synthetic.case.generate_case`, seeds from ``seed``,
            not the cohort's training seeds).
        num_cases: how many cases.
        seed: first seed of the generated cases.
        size: in-plane voxels of the generated cases.

    Yields:
        ``(name, image, affine)``: HU volume in its file's voxel order and its RAS affine.
    """
    from stmt_monai.io import find_cases, load_image

    if source is not None:
        for path in find_cases(source)[:num_cases]:
            image, affine = load_image(path)
            yield str(path), image, affine
        return
    from stmt_monai.synthetic.case import generate_case
    from stmt_monai.synthetic.config import CohortConfig

    shipped = Path(__file__).resolve().parents[1] / "example_data" / "abdomen_ct_3mm.nii.gz"
    image, affine = load_image(shipped)
    yield str(shipped), image, affine
    for k in range(num_cases):
        image, _, affine = generate_case(seed + k, CohortConfig(size=size))
        yield f"generated seed {seed + k}", image, affine


class RecordingRunner:
    """A :class:`~stmt_monai.inference.backends.StageRunner` that keeps a copy of each input
    it is given (the calibration data of its stage) and predicts with the runner it wraps."""

    def __init__(self, runner):
        self.runner, self.inputs = runner, []

    def predict(self, x):
        self.inputs.append(np.array(torch.as_tensor(x), np.float32))
        return self.runner.predict(x)

    def describe(self) -> dict:
        return self.runner.describe()


def kept_in_f32(model) -> list[str]:
    """The operations of an OpenVINO model that int8 quantisation leaves in f32: the final argmax
    (TopK -> Convert -> Result: quantising the logits before it would move labels) and the first
    and last convolutions (the CT's HU input and the class logits; the usual choice, and measured:
    demo weights, generated validation and test cases, organ DSC moved +0.75 points with every
    convolution int8 and +0.06 with these two in f32; agreement with f32 on the shipped CT
    99.87 % -> 99.90 %). The two cost little: one input channel, and a 1 x 1 x 1 head."""
    ops = list(model.get_ordered_ops())
    convolutions = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    argmax = [op.get_friendly_name() for op in ops if op.get_type_name() in ("TopK", "Convert", "Result")]
    return argmax + convolutions[:1] + convolutions[-1:]


def export_int8(
    bundles_dir: str | os.PathLike,
    weights: str = "auto",
    calibration: str | os.PathLike | None = None,
    stages: Sequence[str] | None = None,
    num_cases: int = CALIBRATION_CASES,
    threads: int | None = None,
) -> dict[str, Path]:
    """int8 post-training quantisation (NNCF) of the stage networks' OpenVINO models.

    The cascade runs in OpenVINO f32 on the calibration cases (:func:`calibration_images`) and
    each stage's network inputs are recorded as the cascade makes them (stage 1: the whole CT at
    128^3; stage 2: the crop stage 1 found, at 192^3); ``nncf.quantize`` calibrates each
    stage's f32 IR (:func:`stmt_monai.inference.backends.openvino_ir`) on its inputs (the final
    argmax and the first and last convolutions stay f32, :func:`kept_in_f32`). The int8 IR goes beside the weights
    (``model.int8.xml`` / ``.bin``, :func:`stmt_monai.inference.backends.exported_path`), with
    ``model.int8.json`` (calibration cases, NNCF version); ``--precision int8`` runs it.

    Args:
        bundles_dir: the folder of the three stage bundles.
        weights: ``"auto"``, ``"trained"`` or ``"demo"``.
        calibration: a CT file or folder (default: generated cases and the shipped CT).
        stages: which of ``"abdomen"``, ``"organ"``, ``"tumor"`` (default all three).
        num_cases: calibration cases.
        threads: OpenVINO threads.

    Returns:
        ``{stage: int8 .xml}``.
    """
    import json

    import nncf
    import openvino as ov

    from stmt_monai.inference.cascade import Cascade
    from stmt_monai.io import write_text_atomic

    stages = list(stages or STAGE_BUNDLES)
    cascade = Cascade(bundles_dir, backend="openvino", precision="f32", weights=weights, threads=threads)
    for model in cascade.models.values():
        model.network = RecordingRunner(model.network)
    names = []
    for name, image, affine in calibration_images(calibration, num_cases):
        cascade.segment_array(image, affine)
        names.append(name)
    written = {}
    for stage in stages:
        model = cascade.models[stage]
        inputs = model.network.inputs
        f32 = ov.Core().read_model(model.network.describe()["ir"])
        quantized = nncf.quantize(
            f32, nncf.Dataset(inputs), subset_size=len(inputs), ignored_scope=nncf.IgnoredScope(names=kept_in_f32(f32), validate=False)
        )
        xml = exported_path(model.weights_path, INT8)
        save_ir_atomic(quantized, xml)
        record = {"calibration": names, "inputs": len(inputs), "nncf": nncf.__version__, "openvino": ov.__version__, "weights": str(model.weights_path)}
        write_text_atomic(xml.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
        logger.info("%s int8: %s (calibrated on %d inputs)", stage, xml, len(inputs))
        written[stage] = xml
    return written
