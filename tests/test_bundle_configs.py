"""The bundles' standalone configs: one truth in several files, and the paper's settings.

Each workflow config a MONAI tool reads (``inference.json``, ``train.json``, the organ bundle's
``train_teacher.json`` and ``pseudo_label.json``) stands alone, so the values they share are
written in each. These tests keep them from drifting apart:

- every top-level key two standalone configs of a bundle both define has the same value there
  (the network, input size, fingerprint, paths, paper settings...), and ``evaluate.json`` agrees
  with ``inference.json`` on the keys it adds over ``train.json``;
- training, validation and inference build the same preprocessing (stage, input size, region
  of interest; only the training jitter and augmentations differ);
- the defaults are the paper's (Table 2 and section 3.2), and the training preprocessing
  appends exactly the augmentation chain of
  :func:`stmt_monai.preprocessing.transforms.augmentations`, with its probabilities and ranges
  (issue 13, item 8: the paper's settings must not drift silently).
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch
from bundle_helpers import BUNDLE_NAMES, BUNDLES
from monai.bundle import ConfigParser
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets import DynUNet
from monai.transforms import (
    Compose,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)

from stmt_monai.bundle import LAYERED_OVER, MULTI_GPU_PREFIX, config_files, workflows
from stmt_monai.inference.bundles import STAGE_BUNDLES
from stmt_monai.preprocessing.transforms import LoadStageInputd, augmentations
from stmt_monai.training.losses import CPL, LABELLED, PL

#: a workflow's own parts, different in each config by design (a training config's ``train`` and
#: ``validate`` sections, its steps, its imports, the data it reads (``dataset_dir``), whether it
#: trains a new model (``new_model``))
OWN_STEPS = {"imports", "initialize", "run", "finalize", "train", "validate", "new_model", "dataset_dir"}
#: a fingerprint for resolving preprocessing without a trained bundle's fingerprint.json
FINGERPRINT = {"lower": -350.0, "upper": 80.0, "mean": 30.0, "std": 65.0}


def raw(bundle: str, workflow: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / f"{workflow}.json").read_text())


def standalone(bundle: str) -> list[str]:
    return [w for w in workflows(BUNDLES / bundle) if w not in LAYERED_OVER]


def parser(bundle: str, workflow: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(f) for f in config_files(BUNDLES / bundle, workflow)])
    p["bundle_root"] = str(BUNDLES / bundle)
    for key, value in overrides.items():
        p[key] = value
    return p


def defaults(bundle: str, workflow: str, tmp_path, **overrides) -> ConfigParser:
    """The config's own values: no weights record to follow (``models/model.pt`` of a fresh
    clone is the shipped demo network's, which ``stmt_monai.bundle.recorded`` would give)."""
    return parser(bundle, workflow, model_path=str(tmp_path / "none" / "model.pt"), **overrides)


def flat(transform) -> list:
    """The transforms of a (nested) Compose, in order."""
    if isinstance(transform, Compose):
        return [t for inner in transform.transforms for t in flat(inner)]
    return [transform]


def load_settings(transform) -> dict:
    """What the stage's preprocessing does to a case (its :class:`LoadStageInputd`)."""
    (load,) = [t for t in flat(transform) if isinstance(t, LoadStageInputd)]
    return {
        "stage": load.stage,
        "spatial_size": load.spatial_size,
        "roi_margin_mm": load.roi_margin_mm,
        "crop_roi": load.crop_roi,
        "target_spacing_mm": load.target_spacing_mm,
        "fingerprint": load.fingerprint,
    }


# ----------------------------------------------------------------------------- one truth
def test_every_bundle_has_standalone_inference_and_train_configs():
    for name in BUNDLE_NAMES:
        have = set(workflows(BUNDLES / name))
        assert "inference" in have and not (BUNDLES / name / "configs" / "common.json").exists()
        if name != "cascade":
            assert {"train", "evaluate"} <= have
            assert [f.name for f in config_files(BUNDLES / name, "evaluate")] == ["train.json", "evaluate.json"]
            assert [f.name for f in config_files(BUNDLES / name, "train", multi_gpu=True)] == ["train.json", f"{MULTI_GPU_PREFIX}train.json"]
        for workflow in standalone(name):
            assert [f.name for f in config_files(BUNDLES / name, workflow)] == [f"{workflow}.json"]
            # nothing it refers to is left for another file to define
            config = raw(name, workflow)
            missing = {ref.split("#")[0] for ref in re.findall(r"@([A-Za-z_][\w#]*)", json.dumps(config))} - set(config)
            assert not missing, f"{name}/{workflow}.json refers to {missing}"


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_standalone_configs_agree_on_every_shared_key(name):
    configs = {w: raw(name, w) for w in standalone(name)}
    for (a, first), (b, second) in itertools.combinations(configs.items(), 2):
        for key in (set(first) & set(second)) - OWN_STEPS:
            assert first[key] == second[key], f"{name}: {key!r} differs between {a}.json and {b}.json"
    if "evaluate" in workflows(BUNDLES / name):
        evaluate, inference = raw(name, "evaluate"), configs["inference"]
        for key in (set(evaluate) & set(inference)) - OWN_STEPS:
            assert evaluate[key] == inference[key], f"{name}: {key!r} differs between evaluate.json and inference.json"


@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_training_validation_and_inference_preprocess_alike(name):
    infer = load_settings(parser(name, "inference", fingerprint=FINGERPRINT).get_parsed_content("preprocessing"))
    train = parser(name, "train", fingerprint=FINGERPRINT)
    assert load_settings(train.get_parsed_content("validate#preprocessing")) == infer
    assert load_settings(train.get_parsed_content("train#preprocessing")) == infer


# ----------------------------------------------------------------------------- the paper
#: Table 2 and section 3.2, per stage bundle: input size, batch size, loss weights of the streams
PAPER = {
    "coarse_abdomen": {"spatial_size": (128, 128, 128), "batch_size": 2, "weights": {LABELLED: 1.0, CPL: 1.0, PL: 0.5}},
    "organ_selftrain": {"spatial_size": (192, 192, 192), "batch_size": 3, "weights": {LABELLED: 1.0, CPL: 1.0, PL: 0.5}},
    "tumor_meanteacher": {"spatial_size": (192, 192, 192), "batch_size": 2, "weights": {LABELLED: 1.0, CPL: 1.0}},
}


@pytest.mark.parametrize("name", list(PAPER))
def test_training_defaults_are_the_papers(name, tmp_path):
    """SGD with Nesterov momentum 0.99, initial lr 0.01, poly decay, 500 epochs; batch sizes
    2/3/2; lambda1 = 1, lambda2 = 0.5 (self-training, eq. (1)), lambda = 1 and EMA decay 0.99
    (mean teacher, eq. (2))."""
    paper = PAPER[name]
    p = defaults(name, "train", tmp_path, network="$torch.nn.Linear(1, 1)")  # the optimiser without the 3D network
    optimizer = p.get_parsed_content("optimizer")
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["nesterov"], group["momentum"], group["lr"]) == (True, 0.99, 0.01)
    scheduler = p.get_parsed_content("lr_scheduler")
    assert type(scheduler) is torch.optim.lr_scheduler.PolynomialLR
    assert (scheduler.total_iters, scheduler.power) == (500, 0.9)
    assert p.get_parsed_content("train#trainer#max_epochs") == p.get_parsed_content("max_epochs") == 500
    assert p.get_parsed_content("batch_size") == paper["batch_size"]
    assert tuple(p.get_parsed_content("spatial_size")) == paper["spatial_size"]
    assert p.get_parsed_content("loss").weights == paper["weights"]
    if name == "tumor_meanteacher":
        ema = p.get_parsed_content("ema")
        assert ema.momentum == pytest.approx(1 - 0.99)  # ignite's momentum is 1 - decay
        assert p["train#trainer#teacher"] == "@teacher" and p["teacher"] == "$@ema.ema_model"
        # the one documented deviation (bundle README, docs/ablation.md): lambda ramped up over 10
        # epochs and the EMA warmed up over 100 iterations; the paper's constant lambda and plain
        # EMA are `--lambda_rampup_epochs 0 --ema_warmup_iters 0`
        assert (p.get_parsed_content("lambda_rampup_epochs"), p.get_parsed_content("ema_warmup_iters")) == (10, 100)
        assert p.get_parsed_content("lambda_cpl") == 1.0
        # the paper's extra target: the teacher's label map under Dice + CE (no soft-target loss)
        assert p.get_parsed_content("teacher_target") == "hard" and p["train#trainer#teacher_target"] == "@teacher_target"
        assert len(p.get_parsed_content("loss").stream_losses) == 0


@pytest.mark.parametrize("name", list(PAPER))
def test_student_network_is_the_papers(name, tmp_path):
    """The student (section 3.2): a Res-UNet with 16 base channels and 5 down-samplings, run on
    the whole input (128^3 stage 1, 192^3 stage 2), built as the stock MONAI Label app and the
    model zoo's checks build it: ``network_def`` of ``inference.json`` alone."""
    p = defaults(name, "inference", tmp_path)
    network = p.get_parsed_content("network_def")
    assert isinstance(network, DynUNet) and isinstance(network.input_block, UnetResBlock)  # residual units
    assert network.filters[0] == 16 and len(network.strides) - 1 == 5
    assert all(np.all(np.asarray(s) == 2) for s in network.strides[1:])
    assert tuple(p.get_parsed_content("spatial_size")) == PAPER[name]["spatial_size"]


#: the paper's online augmentations (section 3.2) with nnU-Net's probabilities and ranges, as
#: ``augmentations`` defines them: (transform, probability, what is drawn)
AUGMENTATIONS = [
    (RandAffined, 0.2, lambda t: (t.rand_affine.rand_affine_grid.rotate_range, t.rand_affine.rand_affine_grid.scale_range),
     ((np.deg2rad(30),) * 3, (0.3,) * 3)),
    (Rand3DElasticd, 0.2, lambda t: (t.rand_3d_elastic.sigma_range, t.rand_3d_elastic.magnitude_range), ((9.0, 13.0), (0.0, 200.0))),
    (RandGaussianNoised, 0.1, lambda t: (t.rand_gaussian_noise.mean, t.rand_gaussian_noise.std), (0.0, 0.1)),
    (RandGaussianSmoothd, 0.2, lambda t: (t.rand_smooth.sigma_x, t.rand_smooth.sigma_y, t.rand_smooth.sigma_z), ((0.5, 1.0),) * 3),
    (RandScaleIntensityd, 0.15, lambda t: t.scaler.factors, (-0.25, 0.25)),  # brightness x0.75..1.25
    (RandScaleIntensityFixedMeand, 0.15, lambda t: (t.scaler.factors, t.preserve_range), ((-0.25, 0.25), True)),  # contrast
    (RandSimulateLowResolutiond, 0.25, lambda t: t.zoom_range, (0.5, 1.0)),
    (RandAdjustContrastd, 0.3, lambda t: (t.adjuster.gamma, t.adjuster.retain_stats), ((0.7, 1.5), True)),  # gamma
]


def close(a, b) -> bool:
    """``a == b`` for nested tuples of numbers, with a float tolerance (degrees to radians)."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=0))


def check_augmentations(transforms: list) -> None:
    random = [t for t in transforms if type(t) in {a[0] for a in AUGMENTATIONS}]
    assert [type(t) for t in random] == [a[0] for a in AUGMENTATIONS]
    for t, (kind, prob, drawn, expected) in zip(random, AUGMENTATIONS):
        assert t.prob == prob, kind.__name__
        assert close(drawn(t), expected), f"{kind.__name__}: {drawn(t)} != {expected}"


def test_augmentation_chain_is_the_papers():
    check_augmentations(augmentations(("image", "label"), (32, 32, 32)))


@pytest.mark.parametrize("name", list(PAPER))
def test_every_student_trains_with_the_augmentation_chain(name):
    train = parser(name, "train", fingerprint=FINGERPRINT).get_parsed_content("train#preprocessing")
    check_augmentations(flat(train))
    assert not [t for t in flat(parser(name, "train", fingerprint=FINGERPRINT).get_parsed_content("validate#preprocessing")) if type(t) in {a[0] for a in AUGMENTATIONS}]
