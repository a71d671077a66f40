"""The cascade's fast non-network steps give what the plain ones give: numpy resampling of views
(stage inputs without a float32 or reoriented copy), the device-side reorientation, the label
map restored straight into file order, one-call NIfTI reading and ISA-L writing."""

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations

from stmt_monai.io import read_nifti, save_label_map, save_nifti
from stmt_monai.preprocessing.geometry import (
    CaseGeometry,
    canonical_tensor,
    from_canonical,
    resize,
    resize_linear,
    resize_nearest,
    restore_label_map,
    to_canonical,
)
from stmt_monai.preprocessing.stage_input import prepare_volume

RNG = np.random.default_rng(0)
VOLUME = RNG.integers(-1000, 1500, (41, 37, 23)).astype(np.int16)
#: C order, Fortran order (NIfTI's), a flipped and transposed view, a cropped view
VIEWS = [VOLUME, np.asfortranarray(VOLUME), VOLUME[::-1].transpose(2, 0, 1), VOLUME[:, ::-1, 3:20]]


@pytest.mark.parametrize("view", range(len(VIEWS)))
@pytest.mark.parametrize("size", [(16, 20, 9), (64, 48, 40), (41, 12, 23)])
def test_numpy_resampling_is_torch_interpolate(view, size):
    volume = VIEWS[view]
    size = size[: volume.ndim]
    reference = resize(torch.from_numpy(np.ascontiguousarray(volume).astype(np.float32))[None], size)[0].numpy()
    out = resize_linear(volume, size)
    assert out.shape == reference.shape and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    labels = (volume % 15).astype(np.uint8)
    expected = resize(torch.from_numpy(np.ascontiguousarray(labels)), size, "nearest").numpy()
    np.testing.assert_array_equal(resize_nearest(labels, size), expected)


ORIENTATIONS = [np.diag([sx, sy, sz, 1.0])[:, list(p) + [3]] for p in itertools.permutations(range(3)) for sx, sy, sz in [(1, 1, 1), (-1, -1, 1), (1, -1, -1)]]


@pytest.mark.parametrize("affine", ORIENTATIONS[::2], ids=lambda a: "".join(nib.aff2axcodes(a)))
def test_device_reorientation_and_direct_restore(affine):
    volume = np.asfortranarray(VOLUME)
    canonical, canonical_affine, ornt = to_canonical(volume, affine)
    np.testing.assert_array_equal(canonical_tensor(volume, ornt, "cpu").numpy(), canonical)
    view, _, _ = to_canonical(volume, affine, contiguous=False)
    assert np.shares_memory(view, volume)
    # stage input from the tensor (the CUDA path) == from the numpy view (the CPU path)
    box = ((3, 2, 1), (21, 20, 19))  # inside every orientation's canonical shape
    x_host, _, geometry = prepare_volume(volume, affine, (16, 16, 16), roi_box=box, canonical=(view, canonical_affine, ornt))
    x_device, _, _ = prepare_volume(volume, affine, (16, 16, 16), roi_box=box, canonical=(canonical_tensor(volume, ornt, "cpu"), canonical_affine, ornt))
    np.testing.assert_allclose(x_device.numpy(), x_host.numpy(), atol=1e-2)
    # restore: written into the file-order output through its canonical view
    labels = RNG.integers(0, 15, (16, 16, 16)).astype(np.uint8)
    restored = restore_label_map(labels, geometry)
    full = np.zeros(geometry.canonical_shape, np.uint8)
    full[tuple(slice(s, e) for s, e in zip(*box))] = resize(torch.from_numpy(labels), geometry.roi_shape, "nearest").numpy()
    np.testing.assert_array_equal(restored, from_canonical(full, geometry))
    assert restored.flags.f_contiguous and isinstance(geometry, CaseGeometry)


def test_nifti_read_whole_and_written_with_isal(tmp_path, real_ct, real_organs):
    for path in (real_ct, real_organs):  # int32 HU; uint8 labels with header extensions (data offset 13168)
        array, affine = read_nifti(path)
        image = nib.load(str(path))
        np.testing.assert_array_equal(array, np.asarray(image.dataobj))
        np.testing.assert_allclose(affine, image.affine)
        assert array.flags.f_contiguous and not array.flags.writeable  # a view of the decompressed bytes
    # intensity scaling: nibabel applies it
    scaled = nib.Nifti1Image(VOLUME, np.eye(4))
    scaled.header.set_slope_inter(0.5, -10.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_allclose(read_nifti(tmp_path / "scaled.nii.gz")[0], VOLUME * 0.5 - 10.0)
    # written: a label map that nibabel (zlib) reads back exactly, and plain .nii as well
    labels = np.asfortranarray((VOLUME % 15).astype(np.uint8))
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for name in ("mask.nii.gz", "mask.nii"):
        written = save_label_map(tmp_path / name, labels, affine)
        back = nib.load(str(written))
        np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
        np.testing.assert_allclose(back.affine, affine)
        assert back.get_data_dtype() == np.uint8
    assert (tmp_path / "mask.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
    save_nifti(tmp_path / "image.nii.gz", VOLUME, affine)
    np.testing.assert_array_equal(read_nifti(tmp_path / "image.nii.gz")[0], VOLUME)
