"""stmt_monai.inference.cascade: the cascade on real files (NIfTI and DICOM), with tiny networks."""

import copy

import cc3d
import numpy as np
import pytest
import torch
from cascade_helpers import FINGERPRINT, TINY, copy_bundles, random_bundles, trained_bundles

from stmt_monai.inference.batch import output_paths
from stmt_monai.inference.bundles import STAGE_BUNDLES, bundle_config, load_weights, random_weights, save_weights, write_demo_config
from stmt_monai.inference.cascade import Cascade
from stmt_monai.inference.outside_roi import outside_roi_tumors
from stmt_monai.inference.stage import StageModel
from stmt_monai.io import load_image, load_label
from stmt_monai.labels import ORGAN_CLASSES, TUMOR
from stmt_monai.preprocessing.geometry import resize, restore_label_map
from stmt_monai.preprocessing.stage_input import prepare_volume


@pytest.fixture(scope="module")
def random_cascade(tmp_path_factory):
    return Cascade(random_bundles(tmp_path_factory.mktemp("random_bundles")))


@pytest.fixture(scope="module")
def trained_cascade(tmp_path_factory, real_ct, real_organs):
    return Cascade(trained_bundles(tmp_path_factory.mktemp("trained_bundles"), real_ct, real_organs))


def organs_connected(labels: np.ndarray) -> dict[int, int]:
    """Components of each organ, counting a tumor laid over it as part of it (the paper lays the
    tumor over the organ result after the largest-component step, so a tumor may cut an organ)."""
    counts = {}
    for organ in ORGAN_CLASSES:
        if not (labels == organ).any():
            continue
        components = cc3d.connected_components((labels == organ) | (labels == TUMOR), connectivity=26)
        counts[organ] = len(np.setdiff1d(np.unique(components[labels == organ]), [0]))
    return counts


@pytest.mark.parametrize("case", ["real_ct", "real_dicom"])
def test_cascade_output_has_the_input_geometry(random_cascade, case, request):
    path = request.getfixturevalue(case)
    image, affine = load_image(path)
    result = random_cascade.segment(path)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.affine, affine)
    assert set(np.unique(result.labels)) <= set(range(15))
    assert (result.labels > 0).any()  # random networks still label something
    assert all(n == 1 for n in organs_connected(result.labels).values())
    # zero padding: nothing outside the region of interest (canonical box; this CT is RAS)
    if case == "real_ct":
        (x0, y0, z0), (x1, y1, z1) = result.roi["start_voxel"], result.roi["end_voxel"]
        inside = np.zeros(image.shape, bool)
        inside[x0:x1, y0:y1, z0:z1] = True
        assert not result.labels[~inside].any()
    assert {"read", "stage1", "organ", "tumor", "restore"} <= set(result.timings)


@pytest.mark.slow
def test_outside_tumors_are_added_only_outside_stage_1s_box(trained_cascade, real_ct, tmp_path):
    """``outside_tumors``: stage 1 fitted to the real CT gives a box smaller than the volume, a
    random tumor network marks noise everywhere; inside the box the labels are the default's,
    outside it exactly the whole-volume pass's tumors (and nothing without the step)."""
    tumor = StageModel.from_bundle(random_bundles(tmp_path) / STAGE_BUNDLES["tumor"], "tumor", backend=trained_cascade.backend)
    cascade = copy.copy(trained_cascade)
    cascade.models = {**trained_cascade.models, "tumor": tumor}
    default = cascade.segment(real_ct)
    cascade.outside_tumors = True
    result = cascade.segment(real_ct)
    start, end = result.roi["start_voxel"], result.roi["end_voxel"]
    inside = np.zeros(result.labels.shape, bool)
    inside[tuple(slice(s, e) for s, e in zip(start, end))] = True  # this CT is RAS: canonical = file order
    assert not inside.all()
    np.testing.assert_array_equal(result.labels[inside], default.labels[inside])
    assert not default.labels[~inside].any()
    image, affine = load_image(real_ct)
    direct = outside_roi_tumors(tumor, image, affine, (start, end))
    assert direct is not None and direct[~inside].any()
    np.testing.assert_array_equal(result.labels[~inside], np.where(direct[~inside] > 0, TUMOR, 0))
    assert "outside_tumors" in result.timings and "outside_tumors" not in default.timings
    assert result.organ_labels is not None and not result.organ_labels[~inside].any()


@pytest.mark.slow
def test_organs_land_where_the_real_ct_has_them(trained_cascade, real_ct, real_organs, real_dicom):
    """Networks fitted for seconds to the real CT (tests/cascade_helpers.py) and run through the
    whole cascade: measured liver DSC 0.92, right kidney 0.86, stomach 0.84 on this CT (the case
    they were fitted to; chance level for the liver, 3 % of the volume, is about 0.03). The floor
    0.75 leaves room for run-to-run variation; a flipped, transposed or shifted crop or restore
    gives < 0.3."""
    result = trained_cascade.segment(real_ct)
    truth, _ = load_label(real_organs)
    liver_pred, liver_true = result.labels == 1, truth == 1
    dsc = 2 * (liver_pred & liver_true).sum() / (liver_pred.sum() + liver_true.sum())
    assert dsc > 0.75, dsc
    assert not (result.labels == TUMOR).any()
    assert all(n == 1 for n in organs_connected(result.labels).values())
    # the DICOM series (another patient and scanner, 20 slices: the crop is thinner than the
    # network input, so the labels are filtered again on the input grid)
    image, affine = load_image(real_dicom)
    dicom = trained_cascade.segment(real_dicom)
    assert dicom.labels.shape == image.shape and np.array_equal(dicom.affine, affine)
    assert all(n == 1 for n in organs_connected(dicom.labels).values())


def test_stage_model_reads_the_bundles(tmp_path):
    bundles = copy_bundles(tmp_path)
    tumor = bundles / "tumor_meanteacher"
    with pytest.raises(FileNotFoundError, match="stmt-train-demo"):
        StageModel.from_bundle(tumor, "tumor")
    parser, kind = bundle_config(tumor)
    assert kind == "demo" and parser.get_parsed_content("spatial_size") == TINY["spatial_size"]
    # the mean teacher's model.pt holds student and teacher; inference_network picks one; fp16 is cast back
    torch.manual_seed(0)
    student, teacher = parser.get_parsed_content("network_def"), parser.get_parsed_content("network_def")
    path = parser.get_parsed_content("ckpt_dir") + "/model.pt"
    FINGERPRINT.save(parser.get_parsed_content("fingerprint"))  # makes models/demo/
    torch.save({"student": student.state_dict(), "teacher": {k: v.half() for k, v in teacher.state_dict().items()}}, path)
    model = StageModel.from_bundle(tumor, "tumor", backend="torch")
    assert model.settings["inference_network"] == parser.get("inference_network")
    expected = {"teacher": teacher, "student": student}[parser.get("inference_network")].state_dict()
    for key, value in model.runner.network.state_dict().items():
        assert value.dtype == expected[key].dtype
        torch.testing.assert_close(value, expected[key], atol=1e-2, rtol=1e-3)
    assert model.fingerprint == FINGERPRINT
    # trained weights in models/ take precedence over the demo ones ("auto")
    organ = bundles / "organ_selftrain"
    random_weights(organ, FINGERPRINT, weights="trained")
    assert bundle_config(organ)[1] == "trained"
    assert StageModel.from_bundle(organ, "organ", backend="torch").spatial_size == (192, 192, 192)
    random_weights(organ, FINGERPRINT, weights="demo")
    assert StageModel.from_bundle(organ, "organ", weights="demo", backend="torch").spatial_size == (32, 32, 32)


def test_load_weights_unwraps_and_casts(tmp_path):
    net = torch.nn.Conv3d(1, 2, 3)
    save_weights(tmp_path / "a.pt", net.state_dict(), key="model", half=True)
    state = load_weights(tmp_path / "a.pt")
    assert state["weight"].dtype == torch.float32
    torch.testing.assert_close(state["weight"], net.weight.detach(), atol=1e-3, rtol=1e-3)
    torch.save({"student": net.state_dict(), "teacher": net.state_dict()}, tmp_path / "b.pt")
    with pytest.raises(KeyError, match="ema"):
        load_weights(tmp_path / "b.pt", key="ema")


def test_output_paths_use_flare_case_names(tmp_path):
    assert output_paths(tmp_path / "a_0000.nii.gz", "out")["mask"].name == "a.nii.gz"


def test_amp_is_for_cuda_only(tmp_path):
    bundles = random_bundles(tmp_path / "bundles")
    model = StageModel.from_bundle(bundles / "coarse_abdomen", "abdomen")
    assert model.amp is False and model.settings["amp"] is False  # CPU default: fp32
    with pytest.raises(ValueError, match="CUDA"):
        StageModel.from_bundle(bundles / "coarse_abdomen", "abdomen", amp=True)


def test_tumor_network_of_another_input_size_gets_its_own_crop(tmp_path, real_ct):
    """A tumor bundle at 48^3 beside a 32^3 organ bundle: the same ROI is resized to 48^3 for
    it and its labels come back onto the organ network's grid (nearest) before the overlay."""
    bundles = copy_bundles(tmp_path / "bundles")
    write_demo_config(bundles / "tumor_meanteacher", {**TINY, "spatial_size": [48, 48, 48]})
    for seed, name in enumerate(STAGE_BUNDLES.values()):
        random_weights(bundles / name, FINGERPRINT, seed=seed)
    cascade = Cascade(bundles)
    tumor = cascade.models["tumor"]
    assert tumor.spatial_size == (48, 48, 48) != cascade.models["organ"].spatial_size
    result = cascade.segment(real_ct)
    image, affine = load_image(real_ct, dtype=None)  # as the cascade reads it: float32 rounds differently
    assert result.labels.shape == image.shape
    # the tumor voxels are exactly the tumor network's own prediction on its own 48^3 crop,
    # brought to the organ grid and restored (the organs under them do not matter)
    box = (result.roi["start_voxel"], result.roi["end_voxel"])
    x3, _, _ = prepare_volume(image, affine, (48, 48, 48), roi_box=box)
    _, _, geometry2 = prepare_volume(image, affine, (32, 32, 32), roi_box=box)
    expected = restore_label_map(resize(tumor.predict(tumor.fingerprint.normalize(x3)), (32, 32, 32), "nearest"), geometry2)
    assert expected.any()  # random weights mark some tumor, so the comparison means something
    np.testing.assert_array_equal(result.labels == TUMOR, expected == 1)
