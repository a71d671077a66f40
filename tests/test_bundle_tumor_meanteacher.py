"""bundles/tumor_meanteacher: the EMA teacher, the real-time correction, and the README commands.

The engine tests run :class:`stmt_monai.training.engines.MeanTeacherTrainer` for one iteration on tiny
networks and check the numbers (EMA formula, corrected extra target). The bundle tests run train,
evaluate and inference as subprocesses exactly as the bundle's docs/README.md writes them, with
size overrides (32^3, 3 down-samplings, 4 base channels), on the shared tiny generated cohort
(``tiny_cohort``); the metadata checks run in-process (the functions behind
``python -m monai.bundle verify_*``).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from bundle_helpers import REPO, TINY
from bundle_helpers import run_readme as _run_readme

from stmt_monai.data.datalists import attach_roi
from stmt_monai.io import load_image, load_label, save_label_map
from stmt_monai.labels import TUMOR
from stmt_monai.preprocessing.transforms import WHOLE_IMAGE_ROI, LoadStageInputd, ToFlareLabelsd
from stmt_monai.training.engines import MeanTeacherTrainer
from stmt_monai.training.handlers import loss_terms
from stmt_monai.training.losses import CPL, LABELLED, TUMOR_STREAM_WEIGHTS, SoftTargetMSELoss, WeightedStreamsLoss, consistency_losses
from stmt_monai.training.mean_teacher import correct_tumor_pseudo_label, ema_teacher, sigmoid_rampup

NAME = "tumor_meanteacher"
BUNDLE = REPO / "bundles" / NAME
CONFIGS = BUNDLE / "configs"


# ----------------------------------------------------------------------------- the EMA teacher
class _BatchNormNet(torch.nn.Module):
    """A tiny segmentation net with a batch norm, so that the teacher has buffers to handle."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.BatchNorm3d(3), torch.nn.ReLU(), torch.nn.Conv3d(3, 2, 1)
        )

    def forward(self, x):
        return self.body(x)


def _batch(seed: int = 0, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(2, 1, size, size, size)
    label[:, :, 2:5, 2:5, 2:5] = 1
    return {"image": torch.randn(2, 1, size, size, size, generator=g) + 2 * label, "label": label}


@pytest.mark.parametrize(
    "ema_args, decay",
    [({"decay": 0.9}, 0.9), ({"decay": 0.99, "warmup_iters": 10, "warmup_decay": 0.5}, 0.5)],
    ids=["plain", "warmup_first_step"],
)
def test_ema_teacher_equals_formula_after_one_step(ema_args, decay):
    torch.manual_seed(0)
    student = _BatchNormNet()
    ema = ema_teacher(student, **ema_args)
    teacher = ema.ema_model
    before = copy.deepcopy(student.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), student.parameters()))  # starts as a copy
    trainer = MeanTeacherTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[_batch()],
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.5),
        loss_function=WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS),
        teacher=teacher,
        train_handlers=[ema],
    )
    trainer.run()
    assert trainer.state.iteration == 1
    after = student.state_dict()
    assert not torch.equal(before["body.0.weight"], after["body.0.weight"])  # the student did move
    for name, param in teacher.named_parameters():
        expected = decay * before[name] + (1 - decay) * after[name]
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-6)
        assert not param.requires_grad and param.grad is None  # the teacher is never trained
    # buffers are copied from the student, not averaged (batch-norm statistics of this step)
    for name, buffer in teacher.named_buffers():
        torch.testing.assert_close(buffer, after[name], rtol=0, atol=0)
    assert float(after["body.1.num_batches_tracked"]) == 1
    assert not teacher.training


def test_ema_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match="decay"):
        ema_teacher(_BatchNormNet(), decay=1.0)


# ----------------------------------------------------------------------------- real-time correction
def test_correct_tumor_pseudo_label_is_annotation_or_teacher():
    teacher = torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)
    teacher[..., 0, :, :] = 1  # teacher: tumor in slab x=0
    annotation = torch.zeros_like(teacher)
    annotation[..., :2, 0, 0] = 1  # annotation: x=0..1 at y=z=0 (one voxel the teacher missed)
    corrected = correct_tumor_pseudo_label(teacher, annotation)
    assert corrected.dtype == teacher.dtype
    assert bool((corrected[annotation > 0] == 1).all())  # annotated: tumor whatever the teacher says
    elsewhere = annotation == 0
    assert torch.equal(corrected[elsewhere], teacher[elsewhere])  # elsewhere: the teacher's prediction
    assert int(corrected.sum()) == 16 + 1


class _FixedTeacher(torch.nn.Module):
    """Predicts tumor exactly in ``mask`` (logits +-5), whatever the input."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        one = self.mask.expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([5 * (1 - 2 * one), 5 * (2 * one - 1)], dim=1)


class _RecordingLoss(torch.nn.Module):
    """A base loss that records every target it is called with."""

    def __init__(self):
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def forward(self, logits, target):
        self.targets.append(target.detach().clone())
        return logits.float().pow(2).mean()


class _RecordingSoftLoss(_RecordingLoss):
    """A recording loss whose target is a probability map (as ``SoftTargetMSELoss``'s)."""

    soft_target = True


def _one_step(weights: dict, teacher: torch.nn.Module, batch: dict, stream_losses=None, **trainer_args) -> _RecordingLoss:
    student = torch.nn.Conv3d(1, 2, 1)
    recorder = _RecordingLoss()
    if stream_losses is not None:  # record the streams with their own loss into the same list
        for loss in stream_losses.values():
            loss.targets = recorder.targets
    trainer = MeanTeacherTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_function=WeightedStreamsLoss(weights, base_loss=recorder, stream_losses=stream_losses),
        teacher=teacher,
        **trainer_args,
    )
    trainer.run()
    recorder.output = trainer.state.output
    return recorder


def test_extra_target_is_teacher_corrected_with_annotation():
    batch = _batch()
    annotation = batch["label"]  # tumor annotated at [2:5]^3
    teacher_mask = torch.zeros(1, 1, 8, 8, 8)
    teacher_mask[..., 3:7, 3:7, 3:7] = 1  # overlaps the annotation and finds an unannotated part
    recorder = _one_step(dict(TUMOR_STREAM_WEIGHTS), _FixedTeacher(teacher_mask), batch)
    labelled, extra = recorder.targets  # L_tl on the annotation, L_cpl on the corrected teacher label
    torch.testing.assert_close(labelled, annotation)
    assert bool((extra[annotation > 0] == 1).all())  # annotated voxels: tumor though the teacher missed some
    outside = annotation == 0
    expected_outside = teacher_mask.expand_as(annotation)[outside]
    torch.testing.assert_close(extra[outside], expected_outside)  # elsewhere the teacher stands
    assert int(extra[0].sum()) == 27 + 64 - 8  # the union of the two cubes
    # the logged volumes (% of the batch's voxels): the teacher's 4^3 cube, the 3^3 annotation, and
    # what the corrected target adds beyond the annotation (the cube minus the 2^3 overlap)
    output = recorder.output[0] if isinstance(recorder.output, list) else recorder.output
    voxels = 8**3
    assert output["teacher_tumor_pct"] == pytest.approx(100 * 64 / voxels)
    assert output["annotated_tumor_pct"] == pytest.approx(100 * 27 / voxels)
    assert output["extra_target_pct"] == pytest.approx(100 * (64 - 8) / voxels)
    items = recorder.output if isinstance(recorder.output, list) else [recorder.output]
    student_tumor = torch.stack([item["pred"].argmax(0) == 1 for item in items]).float().mean()
    assert output["student_tumor_pct"] == pytest.approx(100 * float(student_tumor))
    logged = loss_terms(recorder.output)
    assert {"loss", "loss_labelled", "loss_cpl", "lambda_cpl", "extra_target_pct", "teacher_tumor_pct"} <= set(logged)


class _ProbabilityTeacher(torch.nn.Module):
    """Tumor probability ``sigmoid(z)`` at every voxel for a fixed map ``z`` (logits 0 and z)."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, x):
        z = self.z.expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(z), z], dim=1)


def test_soft_target_is_the_teachers_probability_corrected_with_annotation():
    batch = _batch()
    annotation = batch["label"]
    z = torch.linspace(-4, 4, 8**3).reshape(1, 1, 8, 8, 8)
    recorder = _one_step(dict(TUMOR_STREAM_WEIGHTS), _ProbabilityTeacher(z), batch, {CPL: _RecordingSoftLoss()}, teacher_target="soft")
    labelled, extra = recorder.targets
    torch.testing.assert_close(labelled, annotation)
    assert extra.dtype == torch.float32
    assert bool((extra[annotation > 0] == 1).all())  # annotated voxels: certain tumor
    probability = torch.sigmoid(z).expand_as(annotation)
    outside = annotation == 0
    torch.testing.assert_close(extra[outside], probability[outside])  # elsewhere the teacher's probability
    output = recorder.output[0] if isinstance(recorder.output, list) else recorder.output
    # the soft extra target's volume is its expected tumor outside the annotation
    assert output["extra_target_pct"] == pytest.approx(100 * float(probability[outside].sum()) / annotation.numel(), rel=1e-5)
    assert output["teacher_tumor_pct"] == pytest.approx(100 * float((probability > 0.5).float().mean()))


class _InputRecordingTeacher(_FixedTeacher):
    """A :class:`_FixedTeacher` that keeps every input it was given."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return super().forward(x)


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
def test_teacher_sees_the_students_image_plus_noise_of_teacher_noise_std(noise_std):
    """``teacher_noise_std``: the original mean teacher's second view, the student's image plus
    Gaussian noise of that sd (0: the very image the student sees)."""
    batch = _batch(size=16)
    teacher = _InputRecordingTeacher(torch.zeros(1, 1, 16, 16, 16))
    _one_step(dict(TUMOR_STREAM_WEIGHTS), teacher, batch, teacher_noise_std=noise_std)
    (seen,) = teacher.inputs
    noise = seen - batch["image"]
    if noise_std == 0.0:
        assert bool((noise == 0).all())
    else:
        assert float(noise.mean()) == pytest.approx(0.0, abs=0.05)  # 8,192 draws: sd of the mean 0.0055
        assert float(noise.std()) == pytest.approx(noise_std, rel=0.05)


def test_teacher_target_must_match_the_loss():
    student = torch.nn.Conv3d(1, 2, 1)
    common = {
        "device": torch.device("cpu"),
        "max_epochs": 1,
        "train_data_loader": [_batch()],
        "network": student,
        "optimizer": torch.optim.SGD(student.parameters(), lr=0.1),
        "teacher": copy.deepcopy(student),
    }
    hard_loss = WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS)
    soft_loss = WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS, stream_losses=consistency_losses("soft"))
    assert isinstance(soft_loss.loss_of(CPL), SoftTargetMSELoss)
    MeanTeacherTrainer(loss_function=soft_loss, teacher_target="soft", **common)
    MeanTeacherTrainer(loss_function=hard_loss, **common)
    with pytest.raises(ValueError, match="consistency_losses"):
        MeanTeacherTrainer(loss_function=hard_loss, teacher_target="soft", **common)  # Dice + CE on probabilities
    with pytest.raises(ValueError, match="consistency_losses"):
        MeanTeacherTrainer(loss_function=soft_loss, **common)  # MSE to a label map
    with pytest.raises(ValueError, match="teacher_target"):
        MeanTeacherTrainer(loss_function=hard_loss, teacher_target="union", **common)


def test_lambda_zero_is_plain_supervised_training():
    class _NeverCalled(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher must not run when lambda = 0")

    recorder = _one_step({LABELLED: 1.0, CPL: 0.0}, _NeverCalled(), _batch())
    assert len(recorder.targets) == 1  # L_tl only: FST
    output = recorder.output[0] if isinstance(recorder.output, list) else recorder.output
    assert "extra_target_pct" not in output and "teacher_tumor_pct" not in output  # no teacher, no target
    assert output["annotated_tumor_pct"] == pytest.approx(100 * 27 / 8**3)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(30, 10) == sigmoid_rampup(0, 0) == 1.0


def test_lambda_rampup_scales_the_teacher_term_only_for_that_iteration():
    weights = dict(TUMOR_STREAM_WEIGHTS)
    recorder = _one_step(weights, _FixedTeacher(torch.zeros(1, 1, 8, 8, 8)), _batch(), lambda_rampup_epochs=10)
    output = recorder.output[0] if isinstance(recorder.output, list) else recorder.output  # decollated per item
    assert output["lambda_cpl"] == pytest.approx(math.exp(-5))  # first iteration: epoch 0 of 10
    # the recording base loss gives both terms the same value v: total = (1 + lambda) * v
    assert float(output["loss"]) == pytest.approx((1 + math.exp(-5)) * output["loss_labelled"], rel=1e-5)
    assert output["loss_cpl"] == pytest.approx(output["loss_labelled"])


# ----------------------------------------------------------------------------- pieces of the bundle
def test_to_flare_labels_writes_tumor_as_14():
    pred = torch.tensor([[[[0, 1], [1, 0]]]])
    out = ToFlareLabelsd("pred", stage="tumor")({"pred": pred})["pred"]
    assert out.dtype == torch.uint8
    assert out.flatten().tolist() == [0, TUMOR, TUMOR, 0]


def test_attach_roi_rules(tmp_path, real_ct, real_organs):
    organs, affine = load_label(real_organs)
    tumor_only = tmp_path / "tumor_only.nii.gz"
    blob = np.zeros_like(organs)
    blob[60:64, 50:54, 60:64] = TUMOR
    save_label_map(tumor_only, blob, affine)
    roi_dir = tmp_path / "rois"
    save_label_map(roi_dir / "CaseA.nii.gz", organs, affine)
    items = [
        {"image": str(real_ct), "label": str(real_organs)},  # organs annotated: the label gives the box
        {"image": str(real_ct), "label": str(tumor_only)},  # tumor only: whole image
        {"image": str(real_ct), "label": str(tumor_only), "organs": [1]},  # triage says organs: trusted
        {"image": "/x/CaseA_0000.nii.gz", "label": str(tumor_only)},  # a pseudo label in roi_dir
        {"image": str(real_ct)},  # inference, no label: nothing
    ]
    out = attach_roi(items, roi_dir)
    assert [item.get("roi") for item in out] == [None, WHOLE_IMAGE_ROI, None, str(roi_dir / "CaseA.nii.gz"), None]
    # the whole-image ROI is not cropped; the tumor's own box would be 4 voxels + margin
    load = LoadStageInputd("tumor", {"lower": -100, "upper": 200, "mean": 50, "std": 50}, (32, 32, 32))
    whole = json.loads(load(dict(out[1]))["geometry"])
    assert whole["roi_start"] == [0, 0, 0] and whole["roi_end"] == list(load_image(real_ct)[0].shape)
    cropped = json.loads(load({"image": str(real_ct), "label": str(tumor_only)})["geometry"])
    assert np.subtract(cropped["roi_end"], cropped["roi_start"]).max() < 15


# ----------------------------------------------------------------------------- README commands
def run_readme(kind: str, **overrides: str) -> str:
    """The README's ``kind`` command at tiny size (:data:`bundle_helpers.TINY`) with ``overrides``."""
    return _run_readme(NAME, kind, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def tumor_data(tiny_cohort, tmp_path_factory):
    """The shared tiny generated cohort, triaged (``datalist_tumor.json``: 8 tumor-annotated cases,
    two of them without organ labels, so trained on the whole image), plus a ``rois`` folder holding
    organ masks (the organ pseudo label's stand-in: the hidden truth without tumor) for the first
    training case and the first test case."""
    out = tmp_path_factory.mktemp("tumor_meanteacher")
    training = json.loads((tiny_cohort.prepared / "datalist_tumor.json").read_text())["training"]
    first_test = sorted((tiny_cohort.root / "test" / "labels").glob("*.nii.gz"))[0]
    for name, truth_path in ((training[0]["name"], tiny_cohort.root / "truth" / f"{training[0]['name']}.nii.gz"), (first_test.name[:-7], first_test)):
        truth, affine = load_label(truth_path)
        save_label_map(out / "rois" / f"{name}.nii.gz", np.where(truth == TUMOR, 0, truth), affine)
    assert any(not item["organs"] for item in training)  # the whole-image ROI is exercised
    return {"root": tiny_cohort.root, "prepared": tiny_cohort.prepared, "rois": out / "rois", "test_roi_case": first_test.name, "out": out}


@pytest.fixture(scope="module")
def trained(tumor_data):
    """One epoch of the README's train command; returns the output folders."""
    out = tumor_data["out"] / "run"
    dirs = {"ckpt_dir": out / "models", "log_dir": out / "logs", "output_dir": out / "eval"}
    log = run_readme(
        "train",
        prepared_dir=str(tumor_data["prepared"]),
        roi_dir=str(tumor_data["rois"]),
        max_epochs="1",
        val_interval="1",
        **{k: str(v) for k, v in dirs.items()},
    )
    return {"log": log, **dirs}


@pytest.mark.slow
def test_train_keeps_student_and_teacher(trained):
    assert "val_dice_student" in trained["log"] and "val_dice_teacher" in trained["log"]
    best = torch.load(trained["ckpt_dir"] / "mean_teacher.pt", map_location="cpu", weights_only=True)
    assert set(best) == {"student", "teacher"}
    assert best["student"].keys() == best["teacher"].keys()
    # model.pt: the network the bundle serves (inference_network, the teacher), bare as the model zoo stores it
    served = torch.load(trained["ckpt_dir"] / "model.pt", map_location="cpu", weights_only=True)
    assert served.keys() == best["teacher"].keys() and all(torch.equal(served[k], best["teacher"][k]) for k in served)
    last = torch.load(trained["ckpt_dir"] / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert {"network", "teacher", "optimizer", "lr_scheduler", "trainer", "best_checkpoint"} <= set(last)
    # a few iterations at decay 0.99: the teacher moved, but only a little of the way to the student
    assert any(not torch.equal(best["student"][k], best["teacher"][k]) for k in best["student"])
    assert (trained["ckpt_dir"] / "fingerprint.json").exists()  # inference normalises with the training numbers


@pytest.mark.slow
def test_evaluate_scores_both_networks(trained, tumor_data):
    dirs = {k: str(v) for k, v in trained.items() if k != "log"}
    run_readme("evaluate", prepared_dir=str(tumor_data["prepared"]), **dirs)
    metrics = dict(line.split(",") for line in (trained["output_dir"] / "metrics.csv").read_text().split())
    assert {"val_mean_dice", "val_dice_student", "val_dice_teacher"} <= set(metrics)
    assert float(metrics["val_mean_dice"]) == float(metrics["val_dice_teacher"])  # default inference_network
    validation = sorted(p.name for p in (tumor_data["root"] / "validation" / "labels").glob("*.nii.gz"))
    assert sorted(p.name for p in (trained["output_dir"] / "predictions").iterdir()) == validation
    for name in validation:
        pred, affine = load_label(trained["output_dir"] / "predictions" / name)
        truth, truth_affine = load_label(tumor_data["root"] / "validation" / "labels" / name)
        assert pred.shape == truth.shape and np.allclose(affine, truth_affine)
        assert set(np.unique(pred).tolist()) <= {0, TUMOR}


@pytest.mark.slow
def test_inference_writes_flare_tumor_map_on_input_grid(trained, tumor_data):
    out = tumor_data["out"] / "inference"
    images = tumor_data["root"] / "test" / "images"
    run_readme(
        "inference",
        input_dir=str(images),
        roi_dir=str(tumor_data["rois"]),
        ckpt_dir=str(trained["ckpt_dir"]),
        output_dir=str(out),
        inference_network="student",
    )
    names = {p.name.replace("_0000.nii.gz", ".nii.gz") for p in images.iterdir()}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        image, affine = load_image(images / name.replace(".nii.gz", "_0000.nii.gz"))
        pred, pred_affine = load_label(out / name)
        assert pred.shape == image.shape and np.allclose(pred_affine, affine)
        assert set(np.unique(pred).tolist()) <= {0, TUMOR}
    # the case with a mask in roi_dir: nothing is predicted outside its box + 10 mm margin
    pred, affine = load_label(out / tumor_data["test_roi_case"])
    organs = load_label(tumor_data["rois"] / tumor_data["test_roi_case"])[0] > 0
    margin = np.ceil(10.0 / np.sqrt((affine[:3, :3] ** 2).sum(0))).astype(int)
    outside = np.ones(pred.shape, bool)
    outside[tuple(slice(max(int(a.min()) - m, 0), int(a.max()) + 1 + m) for a, m in zip(np.nonzero(organs), margin))] = False
    assert not pred[outside].any()
