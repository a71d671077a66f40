"""stmt_monai.inference.export and the cascade's ``torchscript`` / ``onnx`` backends: real ``ckpt_export``,
real ``torch.onnx.export`` and ONNX Runtime, on the real CT.

The stage bundles are copied with reduced networks (``configs/demo.json``, random weights, see
tests/cascade_helpers.py); the real CT is resampled to each network's input the way the cascade
feeds it (``prepare_volume`` + the fingerprint).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from cascade_helpers import FINGERPRINT, random_bundles

from stmt_monai.inference.backends import exported_path
from stmt_monai.inference.bundles import STAGE_BUNDLES, weights_path
from stmt_monai.inference.cascade import Cascade
from stmt_monai.inference.export import AxiswiseInstanceNorm, bundle_network, example_input, export_bundle, max_abs_difference
from stmt_monai.inference.stage import StageModel
from stmt_monai.io import load_image
from stmt_monai.preprocessing.stage_input import prepare_volume

#: reduced networks, still 4 down-samplings at 64^3 (the demo weights' shape, 4 base channels)
REDUCED = {"base_channels": 4, "num_downsamplings": 4, "network_def#max_channels": 64, "spatial_size": [64, 64, 64]}
#: agreement asked of an export, on logits
TOLERANCE = 1e-4


def test_axiswise_instance_norm_is_instance_norm():
    """The norm ONNX export swaps in computes what torch's InstanceNorm3d does, to float32
    rounding, also on a nearly constant channel (the case that made ONNX Runtime's op inexact)."""
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm3d(3, affine=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 16, 12, 8)
    x[:, 1] = 50.0 + 1e-3 * x[:, 1]  # large mean, tiny spread
    torch.testing.assert_close(AxiswiseInstanceNorm(norm)(x), norm(x), atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="running statistics"):
        AxiswiseInstanceNorm(torch.nn.InstanceNorm3d(3, track_running_stats=True))


@pytest.fixture(scope="module")
def exported_bundles(tmp_path_factory):
    """The three stage bundles at :data:`REDUCED` size with random weights, each exported to
    ``models/demo/model.ts`` (ckpt_export) and ``model.onnx``."""
    pytest.importorskip("onnxruntime")
    root = random_bundles(tmp_path_factory.mktemp("export") / "bundles", REDUCED)
    for name in STAGE_BUNDLES.values():
        export_bundle(root / name, "demo", check=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_BUNDLES))
def test_exports_agree_with_eager_network_on_the_real_ct(exported_bundles, real_ct, stage):
    torch.set_num_threads(1)
    bundle = exported_bundles / STAGE_BUNDLES[stage]
    network, parser, kind = bundle_network(bundle, "demo")
    assert kind == "demo"
    image, affine = load_image(real_ct)
    x, _, _ = prepare_volume(image, affine, tuple(example_input(parser).shape[2:]))
    x = FINGERPRINT.normalize(x)[None]  # (1, 1, 64, 64, 64)
    weights = weights_path(parser)
    paths = [exported_path(weights, "torchscript"), exported_path(weights, "onnx")]
    diffs = max_abs_difference(network, paths, x)
    print(f"{stage}: max |exported - eager| logits: " + ", ".join(f"{os.path.basename(p)} {d:.2e}" for p, d in diffs.items()))
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
    with torch.no_grad():
        assert float(network(x).abs().max()) > 0.1  # logits of a real size, so the tolerance means something


@pytest.mark.slow
def test_cascade_from_exported_models_gives_the_torch_label_map(exported_bundles, real_ct):
    """Backends ``onnx`` and ``torchscript`` load the exported files and give the label map of
    eager PyTorch on the real CT; a missing or stale export is refused with the command to make it."""
    labels = {}
    for backend in ("torch", "onnx", "torchscript"):
        cascade = Cascade(exported_bundles, backend=backend, weights="demo", threads=1)
        labels[backend] = cascade.segment(real_ct).labels
        if backend != "torch":
            assert cascade.describe()["stages"]["organ"]["exported"].endswith(".onnx" if backend == "onnx" else ".ts")
    assert len(np.unique(labels["torch"])) > 2  # random weights still give several classes
    for backend in ("onnx", "torchscript"):
        assert np.array_equal(labels[backend], labels["torch"]), f"{backend}: {(labels[backend] != labels['torch']).sum()} voxels differ"

    organ = exported_bundles / STAGE_BUNDLES["organ"]
    weights = organ / "models" / "demo" / "model.pt"
    later = exported_path(weights, "onnx").stat().st_mtime + 60
    os.utime(weights, (later, later))  # weights newer than their export
    with pytest.raises(RuntimeError, match="re-export with: stmt-export"):
        StageModel.from_bundle(organ, "organ", weights="demo", backend="onnx")
    exported_path(weights, "onnx").unlink()
    with pytest.raises(FileNotFoundError, match="no onnx export"):
        StageModel.from_bundle(organ, "organ", weights="demo", backend="onnx")
