"""Tests of stmt_monai.networks: shapes, exact sizes of the paper-size networks, the inferer."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets import DynUNet, SwinUNETR

from stmt_monai.networks import (
    TEACHER_KINDS,
    check_input_size,
    count_parameters,
    forward_flops,
    res_unet,
    sliding_window_inferer,
    teacher_network,
    teacher_roi_size,
    unet_filters,
)

# Exact parameter counts of the default configurations. A change to the architecture (blocks,
# widths, norms, biases) changes these numbers and must be a deliberate edit here.
STUDENT_PARAMS = {2: 16_715_970, 14: 16_716_174}  # base 16, 5 down-samplings, in 1
TEACHER_PARAMS = {"swin_unetr": 72_762_656, "res_unet_large": 31_419_406}  # in 1, out 14


def test_student_filters_follow_the_paper():
    assert unet_filters(16, 5) == [16, 32, 64, 128, 256, 320]
    assert unet_filters(32, 5) == [32, 64, 128, 256, 320, 320]
    net = res_unet()
    assert isinstance(net, DynUNet)
    assert net.filters == [16, 32, 64, 128, 256, 320]
    assert net.strides == [1, 2, 2, 2, 2, 2]
    assert not net.deep_supervision
    # residual units at every encoder level and the bottleneck
    assert all(isinstance(b, UnetResBlock) for b in [net.input_block, *net.downsamples, net.bottleneck])


@pytest.mark.parametrize("out_channels", [2, 14])
def test_student_parameter_count(out_channels):
    assert count_parameters(res_unet(in_channels=1, out_channels=out_channels)) == STUDENT_PARAMS[out_channels]


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_teacher_parameter_count(kind):
    assert count_parameters(teacher_network(kind)) == TEACHER_PARAMS[kind]


def test_teacher_kinds_are_the_promised_classes():
    assert isinstance(teacher_network("swin_unetr", feature_size=12), SwinUNETR)
    large = teacher_network("res_unet_large", base_channels=4, num_downsamplings=2, roi_size=(32, 32, 32))
    assert isinstance(large, DynUNet) and large.filters == [4, 8, 16]
    with pytest.raises(ValueError, match="unknown teacher kind"):
        teacher_network("phtrans")


def test_tiny_student_forward_shape():
    torch.manual_seed(0)
    net = res_unet(in_channels=1, out_channels=3, base_channels=4, num_downsamplings=3).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 3, 32, 32, 32)
    assert torch.isfinite(y).all()


def test_check_input_size():
    with pytest.raises(ValueError, match=r"multiple of 2\*\*5 = 32"):
        check_input_size((100, 100, 100), 5)
    with pytest.raises(ValueError, match="down-samplings"):
        res_unet(input_size=(192, 192, 100))
    assert check_input_size((192, 128, 96), 5) == (192, 128, 96)
    assert check_input_size([100, 100, 100], 2) == (100, 100, 100)
    with pytest.raises(ValueError, match="single voxel"):
        check_input_size((32, 32, 32), 5)  # instance norm at a 1^3 bottleneck
    assert check_input_size((64, 32, 32), 5) == (64, 32, 32)
    with pytest.raises(ValueError):
        teacher_network("swin_unetr", roi_size=(80, 96, 96))


def test_forward_flops_counts_multiply_adds_twice():
    # one 3x3x3 convolution 1 -> 2 channels, no bias: 27 * 1 * 2 multiply-adds per output voxel
    conv = torch.nn.Conv3d(1, 2, 3, padding=1, bias=False)
    assert forward_flops(conv, (1, 1, 8, 8, 8)) == 2 * 27 * 2 * 8**3
    assert forward_flops(conv, (3, 1, 8, 8, 8)) == 3 * 2 * 27 * 2 * 8**3


def test_forward_flops_meta_equals_real_run():
    net = res_unet(base_channels=4, num_downsamplings=3)
    meta = forward_flops(net, (1, 1, 32, 32, 32))
    assert meta == forward_flops(net, (1, 1, 32, 32, 32), device=None)
    assert meta > 0
    # the paper-size student is counted without allocating anything (meta device)
    assert forward_flops(res_unet(out_channels=2), (1, 1, 128, 128, 128)) == 245_544_517_632


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_tiny_teacher_with_sliding_window(kind):
    """A tiny teacher, sliding-window inference on a volume larger than (and not a multiple of) the ROI."""
    torch.manual_seed(0)
    roi = (64, 32, 32)  # SwinUNETR always down-samples 5 times: 2 x 1 x 1 voxels at the bottom
    if kind == "swin_unetr":
        net = teacher_network(kind, out_channels=3, roi_size=roi, feature_size=12)
    else:
        net = teacher_network(kind, out_channels=3, roi_size=roi, base_channels=4, num_downsamplings=3)
    net.eval()
    inferer = sliding_window_inferer(roi)
    assert isinstance(inferer, SlidingWindowInferer)
    assert inferer.overlap == 0.5 and inferer.mode == "gaussian" and inferer.sw_batch_size == 2
    x = torch.randn(1, 1, 80, 40, 32)  # 2 x 2 x 1 windows
    with torch.inference_mode():
        assert net(torch.randn(1, 1, *roi)).shape == (1, 3, *roi)
        y = inferer(x, net)
    assert y.shape == (1, 3, 80, 40, 32)
    assert torch.isfinite(y).all()


def test_teacher_roi_sizes():
    assert teacher_roi_size("swin_unetr") == (96, 96, 96)
    assert teacher_roi_size("res_unet_large") == (128, 128, 128)
    with pytest.raises(ValueError):
        teacher_roi_size("unet")
