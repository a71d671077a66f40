"""The networks of StMt, built from MONAI's own classes.

Paper sections 2.2 and 3.2:

- the **student** of every stage (coarse abdomen, organs, tumor; also the EMA teacher of the
  tumor mean teacher) is a small Res-UNet: residual units, 16 base channels, 5 down-samplings
  and 5 up-samplings, run on the whole volume (128^3 in stage 1, 192^3 in stage 2).
  :func:`res_unet` builds it as a :class:`monai.networks.nets.DynUNet` with the nnU-Net
  conventions (3x3x3 kernels, stride-2 down-sampling, 2x2x2 transposed-convolution
  up-sampling, instance norm, leaky ReLU 0.01, channels doubling from the base and capped at
  320);
- the **teacher** of self-training (organs and stage 1) is a large, accurate network used with
  sliding-window inference. The paper's PHTrans (a CNN + Swin Transformer hybrid inside
  nnU-Net's default setup) is not in MONAI; :func:`teacher_network` offers MONAI's nearest
  stand-ins: ``"swin_unetr"`` (SwinUNETR v2, a Swin encoder with a residual convolution block
  per stage, i.e. also a CNN + Swin hybrid) and ``"res_unet_large"`` (the student's
  architecture at nnU-Net's default width, 32 base channels);
- :func:`sliding_window_inferer` is the teachers' inferer with nnU-Net's defaults (half-patch
  overlap, Gaussian weighting);
- :func:`count_parameters` and :func:`forward_flops` measure a network's size and cost
  (``benchmarks/network_cost.py`` compares them with the paper's Table 2).

All networks take ``(B, in_channels, *spatial)`` and return logits ``(B, out_channels, *spatial)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import DynUNet, SwinUNETR
from torch.utils.flop_counter import FlopCounterMode

#: paper section 3.2: the student's base channels and number of down-/up-samplings
STUDENT_BASE_CHANNELS = 16
STUDENT_NUM_DOWNSAMPLINGS = 5
#: nnU-Net caps the channels of a 3D U-Net at 320
MAX_CHANNELS = 320
#: nnU-Net's default width, used by the large convolutional teacher
TEACHER_BASE_CHANNELS = 32

TEACHER_KINDS = ("swin_unetr", "res_unet_large")
#: training patch (= sliding-window ROI) of each teacher, in voxels. SwinUNETR's usual CT patch
#: (MONAI's BTCV recipe); 128^3 for the convolutional teacher, nnU-Net's patch for a roughly
#: isotropic abdominal CT at its default memory target. Both are divisible by 2**5.
TEACHER_ROI_SIZE: MappingProxyType = MappingProxyType(
    {"swin_unetr": (96, 96, 96), "res_unet_large": (128, 128, 128)}
)
#: SwinUNETR's feature size in MONAI's BTCV / model-zoo recipe
SWIN_FEATURE_SIZE = 48
#: SwinUNETR always halves the resolution 5 times (patch embedding + 4 patch mergings)
SWIN_NUM_DOWNSAMPLINGS = 5

# nnU-Net's normalisation and non-linearity (InstanceNorm with affine, LeakyReLU 0.01)
_NORM = ("INSTANCE", {"affine": True})
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def check_input_size(spatial_size: Sequence[int], num_downsamplings: int) -> tuple[int, ...]:
    """Check that a U-Net with ``num_downsamplings`` stride-2 steps accepts ``spatial_size``.

    Every spatial dimension must be divisible by ``2 ** num_downsamplings``: otherwise the
    up-sampled features no longer match the skip connections (DynUNet fails deep inside with a
    size mismatch; SwinUNETR raises its own error only at the first forward pass). The coarsest
    level must also hold more than one voxel, as instance norm cannot normalise a single voxel
    (e.g. 32^3 is too small for 5 down-samplings, 64 x 32 x 32 is not).

    Args:
        spatial_size: input size in voxels, spatial dimensions only, e.g. ``(192, 192, 192)``.
        num_downsamplings: number of stride-2 down-samplings of the network (5 in the paper).

    Returns:
        ``spatial_size`` as a tuple of ints.

    Raises:
        ValueError: a dimension is not a positive multiple of ``2 ** num_downsamplings``, or the
            coarsest level would be a single voxel.
    """
    if num_downsamplings < 0:
        raise ValueError(f"num_downsamplings must be >= 0, got {num_downsamplings}")
    size = tuple(int(s) for s in spatial_size)
    factor = 2**num_downsamplings
    bad = [s for s in size if s <= 0 or s % factor]
    if bad:
        raise ValueError(
            f"input spatial size {size} is not valid for a network with {num_downsamplings} "
            f"down-samplings: every dimension must be a positive multiple of 2**{num_downsamplings} "
            f"= {factor} (offending: {bad})"
        )
    if all(s == factor for s in size):
        raise ValueError(
            f"input spatial size {size} leaves a single voxel after {num_downsamplings} down-samplings, "
            "which instance norm cannot normalise: make at least one dimension larger"
        )
    return size


def unet_filters(base_channels: int, num_downsamplings: int, max_channels: int = MAX_CHANNELS) -> list[int]:
    """Channels per resolution level: ``base_channels`` doubling per level, capped at ``max_channels``.

    Args:
        base_channels: channels of the full-resolution level.
        num_downsamplings: number of down-samplings; the result has ``num_downsamplings + 1`` levels.
        max_channels: cap on any level's channels.

    Returns:
        e.g. ``[16, 32, 64, 128, 256, 320]`` for the paper's student.
    """
    return [min(base_channels * 2**level, max_channels) for level in range(num_downsamplings + 1)]


def res_unet(
    in_channels: int = 1,
    out_channels: int = 2,
    base_channels: int = STUDENT_BASE_CHANNELS,
    num_downsamplings: int = STUDENT_NUM_DOWNSAMPLINGS,
    max_channels: int = MAX_CHANNELS,
    spatial_dims: int = 3,
    dropout: float | None = None,
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
    input_size: Sequence[int] | None = None,
) -> DynUNet:
    """The paper's student Res-UNet, as a MONAI :class:`~monai.networks.nets.DynUNet`.

    Residual units (``res_block=True``) at every level, a full-resolution first level
    (stride 1), then ``num_downsamplings`` stride-2 levels and as many 2x2x2 transposed-conv
    up-samplings; 3x3x3 kernels, instance norm, leaky ReLU 0.01 (nnU-Net's choices). The paper's
    student: ``base_channels=16, num_downsamplings=5`` -> channels 16, 32, 64, 128, 256, 320.

    Args:
        in_channels: input channels (1: CT).
        out_channels: output classes with background (2: abdomen or tumor; 14: organs).
        base_channels: channels of the full-resolution level.
        num_downsamplings: number of stride-2 down-samplings (and up-samplings).
        max_channels: cap on the channels of any level.
        spatial_dims: 3 for volumes (2 works too).
        dropout: dropout rate inside the blocks, ``None`` for none (nnU-Net uses none).
        deep_supervision: DynUNet's deep supervision; off in the paper's setup. When on, the
            training-mode output is stacked ``(B, 1 + deep_supr_num, out_channels, *spatial)``.
        deep_supr_num: number of extra deep-supervision heads.
        input_size: if given, the spatial input size the network will see; checked with
            :func:`check_input_size` now, so a config with a bad size fails at build time.

    Returns:
        The network: ``(B, in_channels, *spatial) -> (B, out_channels, *spatial)`` logits, every
        spatial dimension a multiple of ``2 ** num_downsamplings``.
    """
    if num_downsamplings < 1:
        raise ValueError(f"num_downsamplings must be >= 1, got {num_downsamplings}")
    if input_size is not None:
        check_input_size(input_size, num_downsamplings)
    strides = [1] + [2] * num_downsamplings
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * len(strides),
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=unet_filters(base_channels, num_downsamplings, max_channels),
        dropout=dropout,
        norm_name=_NORM,
        act_name=_ACT,
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
        res_block=True,
    )


def teacher_roi_size(kind: str) -> tuple[int, ...]:
    """Default training patch / sliding-window ROI (voxels) of a teacher ``kind``."""
    if kind not in TEACHER_ROI_SIZE:
        raise ValueError(f"unknown teacher kind {kind!r}: expected one of {TEACHER_KINDS}")
    return tuple(TEACHER_ROI_SIZE[kind])


def teacher_network(
    kind: str = "swin_unetr",
    in_channels: int = 1,
    out_channels: int = 14,
    roi_size: Sequence[int] | None = None,
    feature_size: int = SWIN_FEATURE_SIZE,
    base_channels: int = TEACHER_BASE_CHANNELS,
    num_downsamplings: int = STUDENT_NUM_DOWNSAMPLINGS,
    use_v2: bool = True,
) -> torch.nn.Module:
    """The self-training teacher (step 1): large, accurate, used with a sliding window.

    The paper's teacher is PHTrans inside nnU-Net's default configuration; MONAI has no PHTrans,
    so two stand-ins are offered:

    - ``"swin_unetr"``: :class:`~monai.networks.nets.SwinUNETR` (``use_v2=True`` by default: a
      residual convolution block before each Swin stage, so a CNN + Swin hybrid like PHTrans).
      The installed MONAI takes no ``img_size``: the input only has to be divisible by 32.
    - ``"res_unet_large"``: :func:`res_unet` at nnU-Net's default width (32 base channels,
      capped at 320, 5 down-samplings).

    Args:
        kind: ``"swin_unetr"`` or ``"res_unet_large"``.
        in_channels: input channels (1: CT).
        out_channels: output classes with background (14: organs; 2: stage-1 abdomen).
        roi_size: training patch / sliding-window ROI, checked for divisibility; default
            :data:`TEACHER_ROI_SIZE` of the kind.
        feature_size: SwinUNETR's embedding size (a multiple of 12); ``"swin_unetr"`` only.
        base_channels: full-resolution channels; ``"res_unet_large"`` only.
        num_downsamplings: down-samplings; ``"res_unet_large"`` only (SwinUNETR always has 5).
        use_v2: SwinUNETR v2 (residual conv block per stage); ``"swin_unetr"`` only.

    Returns:
        The network: ``(B, in_channels, *roi_size) -> (B, out_channels, *roi_size)`` logits.
    """
    roi = teacher_roi_size(kind) if roi_size is None else tuple(int(s) for s in roi_size)
    if kind == "swin_unetr":
        check_input_size(roi, SWIN_NUM_DOWNSAMPLINGS)
        return SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            spatial_dims=len(roi),
            use_v2=use_v2,
        )
    if kind == "res_unet_large":
        return res_unet(
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            num_downsamplings=num_downsamplings,
            spatial_dims=len(roi),
            input_size=roi,
        )
    raise ValueError(f"unknown teacher kind {kind!r}: expected one of {TEACHER_KINDS}")


class WeightsMismatch(ValueError):
    """Weights that do not fit the network built for them; ``str()`` is one line that names the
    weights file, the differing tensors (counted, the first named) and the keys the weights were
    trained with (their record, :func:`stmt_monai.bundle.read_record`), never PyTorch's dump."""


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """How a state dict ``found`` differs from a network's ``expected`` one; ``None`` if it fits.

    Returns:
        e.g. ``"24 tensors of another shape (first input_block.conv1.conv.weight: weights
        [4, 1, 3, 3, 3], network [16, 1, 3, 3, 3]), 8 missing (first ...)"``.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors of another shape (first {k}: weights {list(found[k].shape)}, network {list(expected[k].shape)})")
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    return ", ".join(parts) or None


def mismatch_message(source, problem: str) -> str:
    """The one line of a :class:`WeightsMismatch`: the file, ``problem``, and what its record says."""
    from stmt_monai.bundle import read_record, record_path

    record, where = {}, record_path(source)
    try:
        record = read_record(source)
    except ValueError:
        pass
    if record:
        keys = ", ".join(f"{k}={v}" for k, v in record.items())
        hint = f"they were trained with {keys} ({where}): build the network with those (monai.bundle run: --args_file {where})"
    else:
        hint = f"no record of their network beside them ({where}): give the network keys they were trained with (--base_channels ... --spatial_size ...)"
    return f"{source}: the weights do not fit the network built from the config: {problem}; {hint}"


def load_network_state(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source) -> torch.nn.Module:
    """``network.load_state_dict(state)`` (strict) with a one-line :class:`WeightsMismatch` when
    they do not fit.

    Args:
        network: the module built from a bundle config.
        state: its weights (a state dict, e.g. :func:`stmt_monai.inference.bundles.load_weights`).
        source: the weights file, named in the error (its record gives the hint).

    Returns:
        ``network``.
    """
    problem = describe_mismatch(network.state_dict(), state)
    if problem:
        raise WeightsMismatch(mismatch_message(source, problem))
    network.load_state_dict(state)
    return network


class LoggedSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's :class:`~monai.inferers.SlidingWindowInferer` that logs its progress through a
    slow case (:class:`stmt_monai.progress.ProgressLog`): window batches done and time left,
    once the case has run ``log_after_s`` seconds, then every ``log_every_s``; quick cases log
    nothing. A whole CT through the SwinUNETR teacher takes minutes on a CPU.

    Args:
        log_after_s, log_every_s: see above.
        args, kwargs: those of :class:`~monai.inferers.SlidingWindowInferer`.
    """

    def __init__(self, *args, log_after_s: float = 30.0, log_every_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_after_s, self.log_every_s = float(log_after_s), float(log_every_s)

    def window_batches(self, inputs: torch.Tensor) -> int:
        """Forward passes the inferer makes on ``inputs`` ``(B, C, *spatial)``: MONAI's scan
        (windows overlapping by ``overlap``, the image padded to at least one window) in
        batches of ``sw_batch_size``."""
        roi = [int(r) for r in self.roi_size]
        windows = 1
        for size, r in zip(inputs.shape[2:], roi):
            size = max(int(size), r)
            interval = max(int(r * (1 - self.overlap)), 1) if size > r else r
            windows *= (-(-(size - r) // interval) + 1) if size > r else 1
        return -(-(windows * inputs.shape[0]) // int(self.sw_batch_size))

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        from stmt_monai.progress import ProgressLog

        progress = ProgressLog("sliding window", self.window_batches(inputs), "window batches", self.log_every_s, self.log_after_s).start()

        def counted(window, *a, **k):
            out = network(window, *a, **k)
            progress.update()
            return out

        result = super().__call__(inputs, counted, *args, **kwargs)
        progress.finish()
        return result


def sliding_window_inferer(
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    mode: str = "gaussian",
    **kwargs,
) -> SlidingWindowInferer:
    """The teachers' sliding-window inferer, with nnU-Net's defaults.

    Windows of ``roi_size`` overlapping by half a window, blended with Gaussian weights
    (sigma = 1/8 of the window, MONAI's default ``sigma_scale=0.125`` equals nnU-Net's).
    A case that runs longer than 30 s logs its progress (:class:`LoggedSlidingWindowInferer`).

    Args:
        roi_size: window size in voxels (the teacher's training patch).
        sw_batch_size: windows per forward pass.
        overlap: fraction of a window shared with its neighbour (nnU-Net: 0.5).
        mode: blending, ``"gaussian"`` (nnU-Net) or ``"constant"``.
        kwargs: passed on to :class:`LoggedSlidingWindowInferer` (``log_after_s``) and
            :class:`monai.inferers.SlidingWindowInferer` (``sw_device``, ``device``, ...).

    Returns:
        The inferer: ``inferer(image (B, C, *spatial), network) -> (B, out_channels, *spatial)``.
    """
    return LoggedSlidingWindowInferer(
        roi_size=tuple(int(s) for s in roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, **kwargs
    )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (weights and biases) of ``model``.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def forward_flops(
    model: torch.nn.Module, input_shape: Sequence[int], device: str | torch.device | None = "meta"
) -> int:
    """Floating-point operations of one forward pass, measured by ``torch.utils.flop_counter``.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`: convolutions (transposed
    included), matrix products (linear layers, attention's ``q @ k^T`` and ``attn @ v``) and
    scaled-dot-product attention, at **2 FLOPs per multiply-add**. Normalisation, activations,
    softmax, additions and interpolation are not counted (a few percent of a U-Net's total).
    Halve the number for multiply-accumulates (MACs), the unit of many papers' "FLOPs".

    Args:
        model: the network; it is not modified (a copy is moved to ``device`` and run in eval mode).
        input_shape: full input shape ``(B, C, *spatial)``; FLOPs scale linearly with ``B``.
        device: where to run the counting pass. ``"meta"`` (default) computes shapes only, so it
            is instant and needs no memory; pass ``None`` to run on the model's own device.

    Returns:
        Total FLOPs of one forward pass of the whole batch.
    """
    net = copy.deepcopy(model)
    if device is None:
        device = next(net.parameters()).device
    net = net.to(device).eval()
    x = torch.zeros(tuple(int(s) for s in input_shape), device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return int(counter.get_total_flops())
