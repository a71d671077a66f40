"""stmt_monai.inference.outside_roi: the optional search for tumors outside stage 1's box."""

import numpy as np
import pytest
import torch
from cascade_helpers import FINGERPRINT, copy_bundles

from stmt_monai.inference.bundles import bundle_config, save_weights
from stmt_monai.inference.outside_roi import outside_roi_tumors, select_outside_components
from stmt_monai.inference.stage import StageModel
from stmt_monai.io import load_image
from stmt_monai.preprocessing.geometry import CaseGeometry, from_canonical, to_canonical


def test_components_outside_the_box_are_kept_and_cut_at_its_wall():
    tumor = np.zeros((40, 40, 40), np.uint8)
    box = ((10, 10, 10), (30, 30, 30))
    tumor[0:5, 0:5, 0:5] = 1  # all outside, 125 voxels: kept
    tumor[15:20, 15:20, 15:20] = 1  # all inside: the box pass's
    tumor[26:36, 18:22, 18:22] = 1  # 160 voxels, 4 of 10 rows inside: kept, its inside part dropped
    tumor[18:22, 18:22, 24:34] = 1  # 6 of 10 slices inside: dropped
    tumor[36:38, 36:38, 36:38] = 1  # outside but 8 voxels: below the volume floor
    kept = select_outside_components(tumor, box, voxel_ml=0.01, min_volume_ml=0.9)
    expected = np.zeros_like(tumor)
    expected[0:5, 0:5, 0:5] = 1
    expected[30:36, 18:22, 18:22] = 1
    np.testing.assert_array_equal(kept, expected)
    assert kept.dtype == np.uint8
    # the floor counts the voxels outside the box: the cut component has 96 x 0.01 ml there
    above = select_outside_components(tumor, box, voxel_ml=0.01, min_volume_ml=1.0)
    assert above[0:5, 0:5, 0:5].all() and not above[30:36].any()
    # a component half inside is dropped at the default share, kept with a looser one
    half = np.zeros((40, 40, 40), np.uint8)
    half[25:35, 0:4, 0:4] = 1
    half_box = ((0, 0, 0), (30, 40, 40))
    assert not select_outside_components(half, half_box, 0.01, min_volume_ml=0.0).any()
    assert select_outside_components(half, half_box, 0.01, min_volume_ml=0.0, max_inside_fraction=0.6)[30:35, 0:4, 0:4].all()
    assert not select_outside_components(np.zeros((8, 8, 8)), box, 0.01).any()


def _constant_tumor_stage(tmp_path, tumor_everywhere: bool) -> StageModel:
    """The tumor bundle's real network (tiny), its output bias set so that its argmax is tumor
    (or background) at every voxel, loaded as the cascade loads it."""
    root = copy_bundles(tmp_path) / "tumor_meanteacher"
    parser, _ = bundle_config(root, "demo")
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():
        last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-10.0, 10.0] if tumor_everywhere else [10.0, -10.0]))
    FINGERPRINT.save(parser.get_parsed_content("fingerprint"))
    save_weights(parser.get_parsed_content("ckpt_dir") + "/model.pt", network.state_dict(), key=parser.get("inference_network"))
    return StageModel.from_bundle(root, "tumor", weights="demo", backend="torch")


@pytest.mark.parametrize("case", ["real_ct", "real_dicom"])
def test_whole_volume_pass_fills_exactly_the_outside_of_the_box(tmp_path, case, request):
    """A tumor network that marks every voxel: its one component lies mostly outside a small box,
    so the step returns the input grid minus the box, in the file's voxel order (the DICOM series
    is not RAS), and nothing when the network marks nothing."""
    image, affine = load_image(request.getfixturevalue(case))
    canonical = to_canonical(image, affine, contiguous=False)
    shape = canonical[0].shape
    start = tuple(s // 4 for s in shape)
    end = tuple(s // 4 + max(s // 3, 1) for s in shape)
    model = _constant_tumor_stage(tmp_path, tumor_everywhere=True)
    mask = outside_roi_tumors(model, image, affine, (start, end), canonical=canonical, min_volume_ml=0.0)
    geometry = CaseGeometry(image.shape, affine, canonical[2], (0, 0, 0), shape, shape)  # file <-> canonical order
    assert mask.shape == image.shape and mask.dtype == np.uint8
    canonical_mask = to_canonical(mask, affine)[0]
    # never inside the box; everywhere beyond one network voxel of it (the box is rounded
    # outwards onto the coarse grid)
    rim = [int(np.ceil(s / n)) for s, n in zip(shape, model.spatial_size)]
    box = tuple(slice(s, e) for s, e in zip(start, end))
    grown = tuple(slice(max(s - r, 0), e + r) for s, e, r in zip(start, end, rim))
    assert not canonical_mask[box].any()
    beyond = np.ones(shape, bool)
    beyond[grown] = False
    assert canonical_mask[beyond].all() and canonical_mask.sum() > 0.5 * beyond.sum()
    assert set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(from_canonical(canonical_mask, geometry), mask)
    # the same without the caller's canonical view
    np.testing.assert_array_equal(outside_roi_tumors(model, image, affine, (start, end), min_volume_ml=0.0), mask)
    # the volume floor in ml: just below the outside's volume it is found, just above it not
    outside_ml = mask.sum() * float(np.prod(geometry.spacing)) / 1000.0
    assert outside_roi_tumors(model, image, affine, (start, end), min_volume_ml=0.8 * outside_ml) is not None
    assert outside_roi_tumors(model, image, affine, (start, end), min_volume_ml=1.25 * outside_ml) is None
    # a box covering the whole volume: nothing
    assert outside_roi_tumors(model, image, affine, ((0, 0, 0), shape), min_volume_ml=0.0) is None
    quiet = _constant_tumor_stage(tmp_path / "quiet", tumor_everywhere=False)
    assert outside_roi_tumors(quiet, image, affine, (start, end), min_volume_ml=0.0) is None
