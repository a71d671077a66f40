"""bundles/organ_selftrain: every docs/README.md command on a tiny generated cohort.

The five workflows (train_teacher -> pseudo_label -> train -> evaluate, inference) run as
subprocesses exactly as the bundle's README writes them, with size overrides (a 4-channel
teacher on 32^3 patches at 12 mm, a 4-channel student at 32^3); the metadata checks run
in-process (the functions behind ``python -m monai.bundle verify_*``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO, TINY, TINY_OPTIMIZER, TINY_TEACHER, config_default
from bundle_helpers import readme_commands as _readme_commands
from bundle_helpers import run_readme as _run_readme

from stmt_monai.io import load_label, save_label_map
from stmt_monai.labels import ORGAN_CHANNELS, TUMOR
from stmt_monai.networks import teacher_roi_size
from stmt_monai.training.pseudo_label import PSEUDO_DATALIST, RAW_DIR, keep_annotated_tumor
from stmt_monai.training.self_training import annotated_organ_classes, correct_pseudo_label

NAME = "organ_selftrain"
BUNDLE = REPO / "bundles" / NAME
CONFIGS = BUNDLE / "configs"
WORKFLOWS = ("train_teacher", "pseudo_label", "train", "evaluate", "inference")
#: and a 4-channel student at 32^3 (3 down-samplings: 5 would leave one voxel), Adam
TINY_STUDENT = {**TINY, **TINY_OPTIMIZER}
#: epochs of the student: enough for the liver (liver Dice 0.42 measured after 3 epochs; an
#: untrained student or one trained on misplaced labels scores about 0.1)
STUDENT_EPOCHS = 3
#: the trained tiny student's liver Dice at input resolution must reach this
LIVER_DICE_FLOOR = 0.25

pytestmark = pytest.mark.slow


def readme_commands() -> dict[str, list[str]]:
    return _readme_commands(NAME)


def run_readme(kind: str, **overrides: str) -> str:
    return _run_readme(NAME, kind, **overrides)


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def cohort(tiny_cohort):
    """The shared tiny generated cohort (tests/conftest.py): ``(root, prepared)``."""
    return Path(tiny_cohort.root), Path(tiny_cohort.prepared)


@pytest.fixture(scope="module")
def pipeline(cohort, tmp_path_factory):
    """Steps 1-3 of the README: teacher (1 epoch), pseudo labels (with the raw predictions),
    student (:data:`STUDENT_EPOCHS`, lambda2 = 0.25 to see the weights act), in a temporary bundle root."""
    root, prepared = cohort
    bundle_root = tmp_path_factory.mktemp("organ_selftrain_bundle")
    pseudo_dir = tmp_path_factory.mktemp("pseudo_labels")
    data = {"bundle_root": str(bundle_root), "prepared_dir": str(prepared)}
    logs = {
        "train_teacher": run_readme(
            "train_teacher", teacher_max_epochs="1", teacher_val_interval="1", **TINY_TEACHER, **data
        ),
        "pseudo_label": run_readme(
            "pseudo_label", pseudo_label_dir=str(pseudo_dir), keep_raw="True", progress="False", **TINY_TEACHER, **data
        ),
        "train": run_readme(
            "train", pseudo_label_dir=str(pseudo_dir), max_epochs=str(STUDENT_EPOCHS), val_interval="1", lambda2="0.25", **TINY_STUDENT, **data
        ),
    }
    return {"bundle_root": bundle_root, "pseudo_dir": pseudo_dir, "logs": logs}


# ----------------------------------------------------------------------------- metadata
def test_readme_has_every_command():
    assert set(readme_commands()) == {
        *WORKFLOWS, "verify_metadata", "verify_net_in_out network_def", "verify_net_in_out teacher_def",
        "torchrun multi_gpu_train_teacher", "torchrun multi_gpu_train", "ckpt_export network_def", "scripts/export.py",
    }


def test_metadata_matches_labels_and_config():
    """(verify_metadata and verify_net_in_out: tests/test_conformance.py)"""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    common = json.loads((CONFIGS / "train.json").read_text())
    teacher = json.loads((CONFIGS / "train_teacher.json").read_text())
    assert meta["version"] in meta["changelog"]
    for name, size in (("network_data_format", config_default("organ_selftrain", "spatial_size", "train")), ("teacher_data_format", list(teacher_roi_size(teacher["teacher_kind"])))):
        image, pred = meta[name]["inputs"]["image"], meta[name]["outputs"]["pred"]
        assert {int(k): v for k, v in pred["channel_def"].items()} == dict(ORGAN_CHANNELS)
        assert pred["num_channels"] == common["out_channels"] == teacher["out_channels"] == len(ORGAN_CHANNELS) == 14
        assert image["num_channels"] == common["in_channels"] == 1
        assert image["spatial_shape"] == pred["spatial_shape"] == size
    assert [config_default("organ_selftrain", k, "train") for k in ("spatial_size", "base_channels", "num_downsamplings")] == [[192, 192, 192], 16, 5]
    assert (common["batch_size"], common["lambda1"], common["lambda2"]) == (3, 1.0, 0.5)


# ----------------------------------------------------------------------------- workflows
def test_train_teacher_writes_best_teacher_and_resumable_checkpoint(pipeline, cohort):
    models = pipeline["bundle_root"] / "models"
    assert (models / "teacher.pt").is_file()
    checkpoint = torch.load(models / "teacher_checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert set(checkpoint) == {"network", "optimizer", "lr_scheduler", "trainer", "best_checkpoint"}
    assert checkpoint["trainer"]["iteration"] == checkpoint["trainer"]["epoch_length"]  # the epoch is done
    assert json.loads((models / "fingerprint.json").read_text()) == json.loads((cohort[1] / "fingerprint.json").read_text())
    log = pipeline["logs"]["train_teacher"]
    assert "teacher_val_mean_dice" in log and "Epoch: 1/1" in log and "saved" in log
    assert list((pipeline["bundle_root"] / "logs" / "teacher").glob("events.out.tfevents.*"))


def test_pseudo_label_writes_cpl_and_pl_beside_a_datalist(pipeline, cohort):
    root, prepared = cohort
    jobs = json.loads((prepared / "datalist_pseudo_label_jobs.json").read_text())["training"]
    datalist = json.loads((pipeline["pseudo_dir"] / PSEUDO_DATALIST).read_text())
    records = {r["name"]: r for r in datalist["training"]}
    assert set(records) == {j["name"] for j in jobs} and datalist["failed"] == []
    for job in jobs:
        record = records[job["name"]]
        image = nib.load(prepared / job["image"])
        pseudo_image = nib.load(pipeline["pseudo_dir"] / record["label"])
        assert pseudo_image.shape == image.shape and np.allclose(pseudo_image.affine, image.affine, atol=1e-5)
        raw, _ = load_label(pipeline["pseudo_dir"] / RAW_DIR / record["label"])
        pseudo = np.asarray(pseudo_image.dataobj)
        assert TUMOR not in raw  # the teacher predicts organs only
        if job["kind"] == "partial":
            annotation, _ = load_label(prepared / job["label"])
            assert record["stream"] == "cpl" and record["annotated_classes"] == list(annotated_organ_classes(annotation))
            assert np.array_equal(pseudo, keep_annotated_tumor(correct_pseudo_label(raw, annotation), annotation))
        else:  # unlabelled, or labelled without organs: the teacher's prediction, an annotated tumor written in
            assert record["stream"] == "pl" and record["annotated_classes"] == []
            expected = keep_annotated_tumor(raw.copy(), load_label(prepared / job["label"])[0]) if job.get("label") else raw
            assert np.array_equal(pseudo, expected)
    assert "already done" in pipeline["logs"]["pseudo_label"]


def test_train_student_logs_weighted_terms_and_saves_model(pipeline):
    models = pipeline["bundle_root"] / "models"
    assert (models / "model.pt").is_file()
    checkpoint = torch.load(models / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == STUDENT_EPOCHS * checkpoint["trainer"]["epoch_length"]
    assert set(checkpoint) == {"network", "optimizer", "lr_scheduler", "trainer", "best_checkpoint"}
    log = pipeline["logs"]["train"]
    assert "val_mean_dice" in log and f"Epoch: {STUDENT_EPOCHS}/{STUDENT_EPOCHS}" in log
    # every iteration logs L_o and its terms: L_o = L_ol + lambda1 L_cpl + lambda2 L_pl (lambda2 = 0.25 here)
    rows = re.findall(r"loss: ([\d.]+) loss_cpl: ([\d.]+) loss_labelled: ([\d.]+) loss_pl: ([\d.]+)", log)
    assert len(rows) >= 2
    for total, cpl, labelled, pl in (map(float, row) for row in rows):
        assert total == pytest.approx(labelled + 1.0 * cpl + 0.25 * pl, abs=3e-4)


def test_evaluate_scores_the_student_at_input_resolution(pipeline, cohort):
    bundle_root = pipeline["bundle_root"]
    run_readme("evaluate", bundle_root=str(bundle_root), prepared_dir=str(cohort[1]), **TINY_STUDENT)
    out = bundle_root / "eval"
    assert 0.0 <= float((out / "metrics.csv").read_text().split(",")[1]) <= 1.0
    header, *rows = (out / "val_mean_dice_raw.csv").read_text().strip().splitlines()
    assert header.split(",")[1:] == [f"class{i}" for i in range(13)] + ["mean"]  # organs 1..13
    liver = [float(row.split(",")[1]) for row in rows]  # class0: the liver
    assert min(liver) > LIVER_DICE_FLOOR, liver
    validation = json.loads((cohort[1] / "datalist_validation.json").read_text())["validation"]
    assert len(rows) == len(validation)
    for item in validation:
        label = nib.load(cohort[1] / item["label"])
        pred = nib.load(out / "predictions" / f"{item['name']}.nii.gz")
        assert pred.shape == label.shape and np.allclose(pred.affine, label.affine, atol=1e-4)


def test_inference_roi_in_organ_map_out_at_input_geometry(pipeline, cohort, real_ct, tmp_path):
    root, prepared = cohort
    inputs, rois, out = tmp_path / "inputs", tmp_path / "rois", tmp_path / "out"
    inputs.mkdir()
    validation = json.loads((prepared / "datalist_validation.json").read_text())["validation"]
    image_path = prepared / validation[0]["image"]
    shutil.copy(image_path, inputs / image_path.name)
    shutil.copy(real_ct, inputs / "real_0000.nii.gz")  # no stage-1 mask: the whole image
    image = nib.load(image_path)
    mask = np.zeros(image.shape, np.uint8)
    mask[8:20, 6:18, 4:14] = 1  # a stage-1 mask: its box + 10 mm is the region of interest
    save_label_map(rois / f"{validation[0]['name']}.nii.gz", mask, image.affine)
    run_readme(
        "inference", bundle_root=str(pipeline["bundle_root"]), input_dir=str(inputs), output_dir=str(out),
        roi_dir=str(rois), **TINY_STUDENT,
    )
    for path in sorted(inputs.iterdir()):
        name = path.name[: -len("_0000.nii.gz")]
        source, pred = nib.load(path), nib.load(out / f"{name}.nii.gz")
        assert pred.shape == source.shape and np.allclose(pred.affine, source.affine, atol=1e-4)
        labels = np.asarray(pred.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) <= set(range(14))
    labels = np.asarray(nib.load(out / f"{validation[0]['name']}.nii.gz").dataobj)
    spacing = np.sqrt((image.affine[:3, :3] ** 2).sum(0))  # RAS cohort image: file order == canonical
    margin = np.ceil(10.0 / spacing).astype(int)
    box = np.zeros_like(mask, bool)
    lo, hi = np.maximum(np.array([8, 6, 4]) - margin, 0), np.array([20, 18, 14]) + margin
    box[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    assert not labels[~box].any()  # nothing outside the region of interest
