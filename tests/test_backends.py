"""stmt_monai.inference.backends: the runners behind one protocol, the automatic backend and
precision, the OpenVINO IR and compiled-model caches, agreement of each precision with fp32."""

import numpy as np
import pytest
import torch
from cascade_helpers import random_bundles

from stmt_monai.inference import stage as stage_module
from stmt_monai.inference.backends import (
    OpenVinoRunner,
    StageRunner,
    TorchRunner,
    cpu_precision,
    openvino_available,
    resolve_backend,
)
from stmt_monai.inference.cascade import Cascade
from stmt_monai.inference.stage import StageModel
from stmt_monai.labels import ORGAN_CLASSES


def test_auto_backend_is_openvino_on_cpu_and_torch_on_cuda():
    assert openvino_available()  # scripts/install.sh installs it: the default path is tested, never skipped
    assert resolve_backend("auto", "cpu") == "openvino"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt")


def test_precision_follows_the_hardware():
    assert cpu_precision(["FP32", "BF16", "INT8"], {"avx512f", "avx512_bf16"}) == "bf16"
    assert cpu_precision(["FP32", "BF16", "INT8"], {"avx512f", "amx_bf16", "amx_tile"}) == "bf16"
    # OpenVINO may list BF16 where the CPU only emulates it (AVX-512 without BF16): f32 is faster there
    assert cpu_precision(["FP32", "BF16", "INT8"], {"avx512f", "avx512_vnni"}) == "f32"
    assert cpu_precision(["FP32", "INT8"], {"avx2"}) == "f32"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_openvino_agrees_with_torch_on_the_real_ct_and_loads_from_its_cache(tmp_path, monkeypatch, real_ct):
    """The shipped demo weights on the shipped CT: OpenVINO f32 and the machine's precision
    (bf16 where the CPU has it) label >= 99.5 % of voxels as torch fp32 does. A second load reads
    the cached IR and compiled blob: no bundle parsing (no MONAI import) and no conversion."""
    monkeypatch.setenv("STMT_MONAI_CACHE", str(tmp_path / "cache"))
    reference = Cascade(backend="torch", weights="demo", threads=1).segment(real_ct).labels
    labels = {}
    for precision in ("f32", "auto"):
        cascade = Cascade(backend="auto", weights="demo", threads=1, precision=precision)
        assert cascade.backend == "openvino" and all(isinstance(m.runner, OpenVinoRunner) for m in cascade.models.values())
        labels[cascade.precision] = cascade.segment(real_ct).labels
    assert cascade.precision == cpu_precision()
    for precision, result in labels.items():
        assert (result == reference).mean() >= 0.995, precision
        for organ in ORGAN_CLASSES:
            if (reference == organ).sum() > 100:
                assert dice(result == organ, reference == organ) > 0.95, (precision, organ)
    assert len(list((tmp_path / "cache" / "openvino").glob("*.xml"))) == 3
    assert list((tmp_path / "cache" / "openvino" / "compiled").iterdir())  # compiled blobs

    def no_parsing(*args, **kwargs):
        raise AssertionError("a warm start parsed a bundle config")

    monkeypatch.setattr(stage_module, "bundle_config", no_parsing)
    warm = Cascade(backend="openvino", weights="demo", threads=1)
    np.testing.assert_array_equal(warm.segment(real_ct).labels, labels[warm.precision])


def test_every_backend_is_a_stage_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("STMT_MONAI_CACHE", str(tmp_path / "cache"))
    bundles = random_bundles(tmp_path / "bundles")
    torch_model = StageModel.from_bundle(bundles / "organ_selftrain", "organ", backend="torch")
    ov_model = StageModel.from_bundle(bundles / "organ_selftrain", "organ", precision="f32")
    x = torch.randn(1, *torch_model.spatial_size)
    for model, kind in ((torch_model, TorchRunner), (ov_model, OpenVinoRunner)):
        assert isinstance(model.runner, StageRunner) and isinstance(model.runner, kind)
        labels = model.predict(x)
        assert labels.shape == torch_model.spatial_size and labels.dtype == torch.uint8
        assert model.settings["backend"] == model.runner.describe()["backend"]
    assert (ov_model.predict(x) == torch_model.predict(x)).float().mean() > 0.999
    with pytest.raises(ValueError, match="CPU"):
        StageModel.from_bundle(bundles / "organ_selftrain", "organ", device="meta", backend="openvino")
    with pytest.raises(ValueError, match="OpenVINO"):
        StageModel.from_bundle(bundles / "organ_selftrain", "organ", backend="torch", precision="bf16")


@pytest.fixture(scope="module")
def int8_bundles(tmp_path_factory, small_cohort):
    """The shipped demo bundles copied, with NNCF int8 models calibrated on a folder of
    generated cases (the user's-own-folder path); the organ one through ``export_bundle``
    (``stmt-export --formats openvino_int8``)."""
    import shutil

    from stmt_monai.inference.bundles import STAGE_BUNDLES, default_bundles_dir
    from stmt_monai.inference.export import INT8, export_bundle, export_int8

    dest = tmp_path_factory.mktemp("int8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STMT_MONAI_CACHE", str(dest / "cache"))
        for name in STAGE_BUNDLES.values():
            shutil.copytree(default_bundles_dir() / name / "configs", dest / name / "configs")
            shutil.copytree(default_bundles_dir() / name / "models" / "demo", dest / name / "models" / "demo")
        with pytest.raises(FileNotFoundError, match="openvino_int8"):
            Cascade(dest, weights="demo", precision="int8")
        export_int8(dest, "demo", small_cohort / "imagesTr", stages=["abdomen", "tumor"], threads=1)
        assert export_bundle(dest / "organ_selftrain", "demo", [INT8], calibration=small_cohort / "imagesTr")[INT8].name == "model.int8.xml"
    return dest


def test_int8_and_machine_precision_keep_the_labels(int8_bundles, monkeypatch, real_ct, small_cohort):
    """Gate of the faster precisions, demo weights: label maps agree with OpenVINO f32 on
    >= 99.5 % of the shipped CT's voxels, and the mean organ DSC on the generated cohort's
    validation and test cases moves by at most 0.5 points."""
    from stmt_monai.io import find_cases, load_image, load_label

    monkeypatch.setenv("STMT_MONAI_CACHE", str(int8_bundles / "cache"))
    cascades = {p: Cascade(int8_bundles, weights="demo", precision=p, threads=1) for p in ("f32", "auto", "int8")}
    assert cascades["int8"].describe()["stages"]["organ"]["ir"].endswith("model.int8.xml")
    reference = cascades["f32"].segment(real_ct).labels
    for precision in ("auto", "int8"):
        assert (cascades[precision].segment(real_ct).labels == reference).mean() >= 0.995, precision
    scores = {p: [] for p in cascades}
    for split in ("validation", "test"):
        for path in find_cases(small_cohort / split / "images"):
            image, affine = load_image(path)
            truth, _ = load_label(small_cohort / split / "labels" / path.name.replace("_0000", ""))
            for precision, cascade in cascades.items():
                labels = cascade.segment_array(image, affine).labels
                scores[precision].append(np.mean([dice(labels == k, truth == k) for k in ORGAN_CLASSES if (truth == k).any()]))
    assert np.mean(scores["f32"]) > 0.5  # the demo networks segment organs: the comparison means something
    for precision in ("auto", "int8"):
        assert abs(np.mean(scores[precision]) - np.mean(scores["f32"])) <= 0.005, (precision, scores)
