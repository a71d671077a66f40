"""stmt_monai.inference.postprocessing: largest component per organ class, tumor overlay."""

import numpy as np
import pytest
import torch
from monai.transforms import KeepLargestConnectedComponent

from stmt_monai.inference.postprocessing import largest_component, overlay_tumor
from stmt_monai.labels import ORGAN_CLASSES, TUMOR


def test_largest_component_keeps_the_biggest_piece_of_each_organ():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 1  # liver, 512 voxels
    labels[15:17, 15:17, 15:17] = 1  # liver island, 8 voxels
    labels[12:14, 2:4, 2:4] = 3  # spleen: two pieces of 8 and 27 voxels
    labels[2:5, 14:17, 14:17] = 3
    labels[18, 18, 18] = TUMOR  # not an organ: untouched, even as a single voxel
    labels[18, 0, 18] = TUMOR
    out = largest_component(labels)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    assert (out == 1).sum() == 512 and (out[15:17, 15:17, 15:17] == 0).all()
    assert (out == 3).sum() == 27 and (out[2:5, 14:17, 14:17] == 3).all()
    assert (out == TUMOR).sum() == 2


def test_largest_component_26_connectivity_and_tensor_input():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = 2  # diagonal neighbours: one component under 26-connectivity
    labels[5, 5, 5] = 2
    out = largest_component(torch.from_numpy(labels)[None])
    assert out.shape == (6, 6, 6)
    assert out[1, 1, 1] == out[2, 2, 2] == 2 and out[5, 5, 5] == 0
    assert (largest_component(labels, connectivity=6) == 2).sum() == 1


def test_largest_component_equals_monai_keep_largest_connected_component():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 40, 40), np.uint8)
    for label in ORGAN_CLASSES:
        for _ in range(3):
            c = rng.integers(3, 37, 3)
            r = rng.integers(1, 4)
            labels[c[0] - r : c[0] + r, c[1] - r : c[1] + r, c[2] - r : c[2] + r] = label
    idx = rng.integers(0, 40, (300, 3))
    labels[tuple(idx.T)] = rng.integers(1, 14, 300)  # speckle
    monai = KeepLargestConnectedComponent(applied_labels=list(ORGAN_CLASSES), independent=True, connectivity=3)
    expected = monai(torch.from_numpy(labels)[None])[0].numpy()
    np.testing.assert_array_equal(largest_component(labels), expected)


def test_overlay_tumor_writes_tumor_over_organs():
    organs = np.zeros((4, 4, 4), np.uint8)
    organs[:2] = 1
    tumor = np.zeros((4, 4, 4), np.uint8)
    tumor[1:3, 0, 0] = 1
    out = overlay_tumor(organs, torch.from_numpy(tumor))
    assert out[1, 0, 0] == TUMOR and out[2, 0, 0] == TUMOR and out[0, 0, 0] == 1 and out[3, 1, 1] == 0
    assert organs[1, 0, 0] == 1  # input untouched
    with pytest.raises(ValueError, match="differ in shape"):
        overlay_tumor(organs, tumor[:2])
