import json

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations

from stmt_monai.io import load_image, load_label, save_label_map
from stmt_monai.labels import TUMOR
from stmt_monai.preprocessing.fingerprint import Fingerprint, foreground_fingerprint
from stmt_monai.preprocessing.geometry import CaseGeometry, orientation_codes, restore_label_map, to_canonical
from stmt_monai.preprocessing.roi import abdomen_roi
from stmt_monai.preprocessing.stage_input import prepare_volume
from stmt_monai.preprocessing.transforms import LoadStageInputd, RestoreLabelMapd, stage_transforms

LIVER, RIGHT_KIDNEY, SPLEEN, LEFT_KIDNEY = 1, 2, 3, 13


def dsc(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _dicom_mask_on_dicom_grid(real_dicom, real_dicom_organs):
    """The DICOM organ mask is stored LAS; bring it onto the DICOM series' own voxel grid."""
    image, affine = load_image(real_dicom)
    mask, mask_affine = load_image(real_dicom_organs)
    c_mask, c_mask_aff, _ = to_canonical(mask, mask_affine)
    _, c_aff, ornt = to_canonical(image, affine)
    assert np.allclose(c_mask_aff, c_aff, atol=1e-3)  # same voxels in world space
    inverse = orientations.ornt_transform(orientations.io_orientation(c_aff), ornt)
    return image, affine, orientations.apply_orientation(c_mask, inverse).astype(np.uint8)


@pytest.mark.parametrize("size,crop", [(128, False), (192, True)])
def test_round_trip_real_nifti(real_ct, real_organs, tmp_path, size, crop):
    image, affine = load_image(real_ct)
    labels, _ = load_label(real_organs, image.shape, affine)
    _, net_labels, geometry = prepare_volume(
        image, affine, (size,) * 3, roi_mask=labels if crop else None, labels=labels
    )
    assert tuple(net_labels.shape) == (1, size, size, size)
    restored = restore_label_map(net_labels, geometry)
    out = save_label_map(tmp_path / "restored.nii.gz", restored, geometry.affine)
    written = nib.load(str(out))
    original = nib.load(str(real_ct))
    assert written.shape == original.shape
    assert np.allclose(written.affine, original.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(original.affine)
    restored = np.asarray(written.dataobj)
    for organ in (LIVER, RIGHT_KIDNEY, SPLEEN, LEFT_KIDNEY):
        assert dsc(restored == organ, labels == organ) >= 0.9


@pytest.mark.parametrize("size,crop", [(128, False), (192, True)])
def test_round_trip_real_dicom(real_dicom, real_dicom_organs, tmp_path, size, crop):
    image, affine, labels = _dicom_mask_on_dicom_grid(real_dicom, real_dicom_organs)
    _, net_labels, geometry = prepare_volume(
        image, affine, (size,) * 3, roi_mask=labels if crop else None, labels=labels
    )
    restored = restore_label_map(net_labels, geometry)
    out = save_label_map(tmp_path / "restored.nii.gz", restored, geometry.affine)
    written = nib.load(str(out))
    assert written.shape == image.shape == (512, 512, 20)
    assert np.allclose(written.affine, affine, atol=1e-5)
    restored = np.asarray(written.dataobj)
    # 512 -> 128 in-plane is a 4x down-sampling: the large organs keep DSC >= 0.9
    for organ in (LIVER, SPLEEN):
        assert dsc(restored == organ, labels == organ) >= 0.9
    if crop:
        assert geometry.roi_shape[0] < 512  # the crop did crop


def test_other_orientation_gives_same_world_result(real_ct, real_organs):
    image, affine = load_image(real_ct)
    labels, _ = load_label(real_organs, image.shape, affine)
    ornt = np.array([[1, -1], [0, -1], [2, 1]])  # axes permuted and two flipped: "PLS"
    image2 = orientations.apply_orientation(image, ornt)
    labels2 = orientations.apply_orientation(labels, ornt)
    affine2 = affine @ orientations.inv_ornt_aff(ornt, image.shape)
    assert orientation_codes(affine2) == "PLS"
    x1, y1, g1 = prepare_volume(image, affine, (64, 64, 64), roi_mask=labels, labels=labels)
    x2, y2, g2 = prepare_volume(image2, affine2, (64, 64, 64), roi_mask=labels2, labels=labels2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # the network sees the same input
    r1, r2 = restore_label_map(y1, g1), restore_label_map(y2, g2)
    assert r2.shape == image2.shape
    # voxel for voxel in world space: same world position -> same label
    assert np.array_equal(orientations.apply_orientation(r1, ornt), r2)
    # and in LPS as written by a DICOM-minded tool
    lps = orientations.axcodes2ornt("LPS")
    to_lps = orientations.ornt_transform(orientations.io_orientation(affine), lps)
    image3 = orientations.apply_orientation(image, to_lps)
    affine3 = affine @ orientations.inv_ornt_aff(to_lps, image.shape)
    x3, _, g3 = prepare_volume(image3, affine3, (64, 64, 64))
    x1_whole, _, g1_whole = prepare_volume(image, affine, (64, 64, 64))
    assert torch.equal(x1_whole, x3)
    assert np.allclose(g3.canonical_affine, g1_whole.canonical_affine)


def test_fingerprint_reproducible_and_normalises(real_ct, real_organs, tmp_path):
    cases = [(real_ct, real_organs)]
    fp1 = foreground_fingerprint(cases, seed=3)
    fp2 = foreground_fingerprint(cases, seed=3)
    assert fp1 == fp2
    assert fp1.num_voxels == 10_000 and fp1.lower < fp1.mean < fp1.upper
    path = fp1.save(tmp_path / "fingerprint.json")
    assert Fingerprint.load(path) == fp1
    assert set(json.loads(path.read_text())) >= {"lower", "upper", "mean", "std"}
    image, affine = load_image(real_ct)
    labels, _ = load_label(real_organs, image.shape, affine)
    foreground = image[labels > 0]
    # nnU-Net's definition: percentiles, mean and sd of the (sampled) unclipped foreground
    rng = np.random.default_rng([3, 0])
    sample = rng.choice(foreground, 10_000, replace=False).astype(np.float64)
    assert np.isclose(fp1.mean, sample.mean()) and np.isclose(fp1.std, sample.std())
    assert np.allclose([fp1.lower, fp1.upper], np.percentile(sample, [0.5, 99.5]))
    normalised = fp1.normalize(foreground)
    assert abs(normalised.mean()) < 0.05
    # sd is below 1 after clipping: the sd counts the few stomach-gas voxels (-1000 HU)
    # that clipping then removes (measured: 0.53 on this CT)
    assert 0.45 < normalised.std() < 1.05
    # the MONAI ScaleIntensityRange form is the same map
    from monai.transforms import ScaleIntensityRange

    monai_form = ScaleIntensityRange(**fp1.scale_intensity_range(), clip=True)(torch.as_tensor(image[labels > 0]))
    assert np.allclose(monai_form.numpy(), normalised, atol=1e-4)


def test_abdomen_roi_margin_and_clamp():
    mask = np.zeros((50, 40, 30), np.uint8)
    mask[10:20, 5:15, 0:30] = 1
    start, end = abdomen_roi(mask, spacing_mm=(2.0, 1.0, 3.0), margin_mm=6.0)
    assert start == (7, 0, 0) and end == (23, 21, 30)  # 3, 6, 2 voxels; clamped to the image
    assert abdomen_roi(np.zeros((5, 5, 5)), (1, 1, 1)) == ((0, 0, 0), (5, 5, 5))
    rng = np.random.default_rng(0)
    s, e = abdomen_roi(mask, (2.0, 1.0, 3.0), margin_mm=6.0, jitter_mm=4.0, rng=rng)
    assert all(a <= 10 for a in s[:1]) and e[0] >= 20


def test_stage_targets(real_ct, real_organs, tmp_path):
    image, affine = load_image(real_ct)
    labels, _ = load_label(real_organs, image.shape, affine)
    labels[60:64, 40:44, 50:54] = TUMOR
    label_path = save_label_map(tmp_path / "with_tumor.nii.gz", labels, affine)
    fp = foreground_fingerprint([(real_ct, real_organs)])
    case = {"image": str(real_ct), "label": str(label_path)}
    abdomen = LoadStageInputd("abdomen", fp, (122, 101, 112))(case)
    assert set(abdomen["label"].unique().tolist()) == {0, 1}
    assert int(abdomen["label"].sum()) == int((labels > 0).sum())  # same grid: exact
    organ = LoadStageInputd("organ", fp, (64, 64, 64))(case)
    assert TUMOR not in organ["label"].unique().tolist()
    tumor = LoadStageInputd("tumor", fp, (64, 64, 64))(case)
    assert set(tumor["label"].unique().tolist()) == {0, 1}
    geometry = CaseGeometry.from_json(tumor["geometry"])
    assert geometry.roi_shape != tuple(image.shape)  # stage 2 crops


def test_transforms_restore_through_monai(real_ct):
    fp = Fingerprint(lower=-300, upper=300, mean=0, std=100)
    out = stage_transforms("abdomen", fp, (32, 32, 32), train=True)({"image": str(real_ct)})
    assert tuple(out["image"].shape) == (1, 32, 32, 32)
    restored = RestoreLabelMapd("pred")({"pred": torch.ones(1, 32, 32, 32), "geometry": out["geometry"]})
    assert tuple(restored["pred"].shape) == (1, 122, 101, 112) and int(restored["pred"].min()) == 1


# ----------------------------------------------------------------------------- stage-1 ROI
def _flip_to_lps(image, affine):
    """The same CT stored in LPS voxel order: flipped x and y, affine updated (same world)."""
    flip = np.eye(4)
    flip[0, 0], flip[1, 1] = -1, -1
    flip[0, 3], flip[1, 3] = image.shape[0] - 1, image.shape[1] - 1
    return np.ascontiguousarray(image[::-1, ::-1]), affine @ flip


def test_abdomen_roi_from_prediction_maps_box_and_drops_small_far_components():
    from stmt_monai.preprocessing.roi import abdomen_roi_from_prediction

    # canonical 100 x 80 x 60 voxels of 2 x 2 x 4 mm, network grid 50 x 40 x 30 (factor 2 per axis)
    geometry = CaseGeometry((100, 80, 60), np.diag([2.0, 2.0, 4.0, 1.0]), np.array([[0, 1], [1, 1], [2, 1]]),
                            (0, 0, 0), (100, 80, 60), (50, 40, 30))
    mask = np.zeros((50, 40, 30), np.uint8)
    mask[10:20, 10:30, 5:15] = 1  # 2000 voxels
    mask[45:47, 0:2, 28:30] = 1  # 8 voxels far away: < 10 % of the largest
    roi = abdomen_roi_from_prediction(mask, geometry, margin_mm=10.0)
    # box [20, 40) x [20, 60) x [10, 30) on the canonical grid, plus ceil(10 / spacing) = 5, 5, 3
    assert roi["start_voxel"] == [15, 15, 7] and roi["end_voxel"] == [45, 65, 33]
    assert roi["found"] and roi["num_components"] == 2 and roi["num_components_kept"] == 1
    assert np.allclose(roi["start_mm"], [29.0, 29.0, 26.0]) and np.allclose(roi["end_mm"], [89.0, 129.0, 130.0])
    assert roi["spacing_mm"] == [2.0, 2.0, 4.0] and roi["canonical_shape"] == [100, 80, 60]
    # keeping every component lets the far one stretch the box; the margin is clamped to the volume
    every = abdomen_roi_from_prediction(torch.as_tensor(mask)[None], geometry.to_json(), 10.0, min_component_fraction=0)
    assert every["start_voxel"] == [15, 0, 7] and every["end_voxel"] == [99, 65, 60]
    # nothing found: the whole volume, nothing cropped away
    empty = abdomen_roi_from_prediction(np.zeros((50, 40, 30)), geometry)
    assert not empty["found"] and empty["start_voxel"] == [0, 0, 0] and empty["end_voxel"] == [100, 80, 60]


def test_stage1_roi_covers_real_organs_in_any_orientation(real_ct, real_organs):
    """A perfect 128^3 abdomen mask gives a ROI holding every organ voxel of the real CT."""
    from stmt_monai.preprocessing.roi import abdomen_roi_from_prediction, roi_coverage
    from stmt_monai.preprocessing.stage_input import STAGE1_SIZE

    image, affine = load_image(real_ct)
    labels, _ = load_label(real_organs, image.shape, affine)
    rois = []
    for img, aff, lab in [(image, affine, labels), (*_flip_to_lps(image, affine), _flip_to_lps(labels, affine)[0])]:
        _, net_labels, geometry = prepare_volume(img, aff, STAGE1_SIZE, labels=lab)
        roi = abdomen_roi_from_prediction(net_labels > 0, geometry, margin_mm=0.0)
        assert roi_coverage(lab, aff, roi["start_voxel"], roi["end_voxel"]) == 1.0
        rois.append(roi)
    # canonical voxels and world mm do not depend on the file's voxel order
    assert rois[0]["start_voxel"] == rois[1]["start_voxel"] and rois[0]["end_voxel"] == rois[1]["end_voxel"]
    assert np.allclose(rois[0]["start_mm"], rois[1]["start_mm"]) and np.allclose(rois[0]["end_mm"], rois[1]["end_mm"])
    # the box is tight: within one network voxel (< 1 canonical voxel here) of the truth's box
    truth = np.argwhere(labels > 0)
    assert np.all(np.abs(np.asarray(rois[0]["start_voxel"]) - truth.min(0)) <= 1)
    assert np.all(np.abs(np.asarray(rois[0]["end_voxel"]) - (truth.max(0) + 1)) <= 1)
    # coverage counts the share inside: cutting the box in half along z loses voxels
    start, end = rois[0]["start_voxel"], list(rois[0]["end_voxel"])
    end[2] = (start[2] + end[2]) // 2
    assert 0.0 < roi_coverage(labels, affine, start, end) < 1.0
    assert roi_coverage(np.zeros_like(labels), affine, start, end) == 1.0


def test_abdomen_roid_writes_roi_json_and_load_targetd_reads_input_grid(real_ct, real_organs, tmp_path):
    from stmt_monai.preprocessing.transforms import AbdomenRoid, LoadTargetd

    fp = Fingerprint(lower=-300, upper=300, mean=0, std=100)
    case = stage_transforms("abdomen", fp, (64, 64, 64))({"image": str(real_ct), "label": str(real_organs)})
    out = AbdomenRoid("pred", output_dir=tmp_path)({**case, "pred": case["label"]})
    written = json.loads((tmp_path / "abdomen_ct_3mm_roi.json").read_text())
    assert written == out["abdomen_roi"] and written["case"] == "abdomen_ct_3mm" and written["found"]
    assert written["image"] == str(real_ct) and written["margin_mm"] == 10.0
    target = LoadTargetd("abdomen")(case)["label"]
    labels, _ = load_label(real_organs)
    assert tuple(target.shape) == (1, *labels.shape) and torch.equal(target[0], torch.from_numpy((labels > 0).astype(np.uint8)))


def test_roi_report_coverage_and_share_against_the_ideal_box(real_organs):
    from stmt_monai.io import load_label
    from stmt_monai.preprocessing.geometry import to_canonical
    from stmt_monai.preprocessing.roi import abdomen_roi, roi_report

    labels, affine = load_label(real_organs)
    labels = labels.copy()
    labels[labels == 3] = 14  # the spleen stands in for a tumor
    canonical, canonical_affine, _ = to_canonical(labels, affine)
    spacing = np.linalg.norm(canonical_affine[:3, :3], axis=0)
    start, end = abdomen_roi(canonical > 0, spacing, 10.0)
    whole = {"start_voxel": [0, 0, 0], "end_voxel": list(canonical.shape), "margin_mm": 10.0}
    report = roi_report(labels, affine, whole)
    assert report["organs"] == report["tumor"] == 1.0 and report["roi_share_of_volume"] == 1.0
    ideal = np.prod(np.subtract(end, start)) / labels.size
    assert report["truth_roi_share_of_volume"] == pytest.approx(ideal) and ideal < 1.0
    # the ideal box minus its upper half along the first axis: about half of the anatomy is out
    half = {"start_voxel": [int(v) for v in start], "end_voxel": [int((start[0] + end[0]) // 2), int(end[1]), int(end[2])], "margin_mm": 10.0}
    report = roi_report(labels, affine, half)
    assert 0.2 < report["organs"] < 0.8 and report["roi_share_of_volume"] == pytest.approx(ideal / 2, rel=0.05)
    assert roi_report(np.where(labels == 14, 0, labels), affine, half)["tumor"] is None


def test_resample_to_shape_keeps_the_field_of_view(real_ct, real_organs):
    from stmt_monai.preprocessing.geometry import resample_to_shape

    labels, affine = load_label(real_organs)
    shape = tuple(2 * s for s in labels.shape)
    resampled, new_affine = resample_to_shape(labels, affine, shape, labels=True)
    assert resampled.shape == shape and resampled.dtype == labels.dtype
    assert np.array_equal(resampled[::2, ::2, ::2], labels)  # each voxel became 2 x 2 x 2
    for corner in ([-0.5, -0.5, -0.5], np.subtract(labels.shape, 0.5)):
        new_corner = np.subtract(corner, -0.5) * 2 - 0.5
        assert np.allclose(affine @ [*corner, 1], new_affine @ [*new_corner, 1])
    image, image_affine = load_image(real_ct)
    small, small_affine = resample_to_shape(image, image_affine, (61, 50, 56))
    assert small.dtype == np.float32 and abs(float(small.mean()) - float(image.mean())) < 5  # HU
    assert np.allclose(np.linalg.norm(small_affine[:3, :3], axis=0), np.linalg.norm(image_affine[:3, :3], axis=0) * np.divide(image.shape, (61, 50, 56)))


# ----------------------------------------------------------------------------- writers keep the input's grid
@pytest.mark.parametrize("source", ["real_ct", "real_dicom"])
def test_restored_labels_carry_the_input_geometry_for_any_monai_writer(source, request, tmp_path):
    """LoadStageInputd gives the input's geometry under MONAI's meta keys and RestoreLabelMapd a
    MetaTensor carrying it: MONAI's stock SaveImaged then writes the labels on the input's exact
    grid (NIfTI file and DICOM series alike), as SaveLabelMapd does with FLARE names, uint8 values
    and, for a stage, FLARE labels (tumor 14), writing the ROI JSON beside the mask."""
    from monai.transforms import SaveImaged

    from stmt_monai.preprocessing.transforms import AbdomenRoid, SaveLabelMapd

    path = request.getfixturevalue(source)
    image, affine = load_image(path)
    fingerprint = {"lower": -350.0, "upper": 80.0, "mean": 30.0, "std": 65.0}
    case = stage_transforms("tumor", fingerprint, (32, 32, 32))({"image": str(path)})
    assert case["image_meta_dict"]["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(case["image_meta_dict"]["spatial_shape"], image.shape)
    pred = torch.zeros(1, 32, 32, 32)
    pred[:, 10:20, 10:20, 10:20] = 1
    case = AbdomenRoid("pred")({**case, "pred": pred})  # stage 1's ROI, to be written beside the mask
    case = RestoreLabelMapd("pred")(case)
    np.testing.assert_allclose(case["pred"].affine.numpy(), affine)

    SaveImaged("pred", output_dir=tmp_path / "stock", output_postfix="seg", separate_folder=False, resample=False, print_log=False)(case)
    out = SaveLabelMapd(tmp_path / "flare", "pred", stage="tumor")(case)
    assert torch.equal(out["pred"], case["pred"])  # the data keeps the channel values
    name = path.name.removesuffix(".nii.gz")
    stock = nib.load(tmp_path / "stock" / f"{name}_seg.nii.gz")
    flare = nib.load(out["pred_path"])
    assert out["pred_path"] == str(tmp_path / "flare" / f"{name}.nii.gz")
    for written in (stock, flare):
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    expected = case["pred"][0].numpy()
    np.testing.assert_array_equal(np.asarray(stock.dataobj), expected)
    assert flare.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(flare.dataobj), np.where(expected > 0, TUMOR, 0))
    assert sorted(p.name for p in (tmp_path / "flare").iterdir()) == sorted([f"{name}.nii.gz", f"{name}_roi.json"])  # no leftovers
