"""bundles/coarse_abdomen: the docs/README.md commands on a tiny generated cohort.

Train, evaluate and inference run as subprocesses exactly as the bundle's README writes them,
with size overrides (32^3, 3 down-samplings, 4 base channels). One training run serves every
training check: it is killed after its first checkpoint and rerun, which must resume, lower the
loss and leave the best model, the resume checkpoint, the fingerprint and TensorBoard logs. The
metadata checks run in-process (the functions behind ``python -m monai.bundle verify_*``).
"""

import json
import re
import shutil
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import ENV, REPO, TINY, TINY_OPTIMIZER, config_default, oracle_pseudo_labels, with_overrides
from bundle_helpers import readme_commands as _readme_commands
from bundle_helpers import run_readme as _run_readme
from monai.bundle import ConfigParser

from stmt_monai.io import case_name, load_image
from stmt_monai.labels import ABDOMEN_CHANNELS
from stmt_monai.preprocessing.geometry import to_canonical

NAME = "coarse_abdomen"
BUNDLE = REPO / "bundles" / NAME
CONFIGS = BUNDLE / "configs"

#: epochs of the tests' training run (with TINY_OPTIMIZER: abdomen Dice 0.75, see DICE_FLOOR)
EPOCHS = 8
#: the trained tiny model's abdomen Dice at input resolution must reach this (0.75 measured on
#: the shared tiny cohort; an untrained or all-foreground one scores under 0.3)
DICE_FLOOR = 0.5

pytestmark = pytest.mark.slow


def readme_commands() -> dict[str, list[str]]:
    return _readme_commands(NAME)


def run_readme(kind: str, **overrides: str) -> str:
    return _run_readme(NAME, kind, **overrides)


# ----------------------------------------------------------------------------- tiny data
@pytest.fixture(scope="module")
def cohort(tiny_cohort, tmp_path_factory):
    """The shared tiny cohort (tests/conftest.py) and a pseudo-label datalist for it."""
    pseudo = tmp_path_factory.mktemp("coarse_abdomen_pseudo_labels")
    return {
        "root": tiny_cohort.root,
        "prepared": tiny_cohort.prepared,
        "pseudo_datalist": oracle_pseudo_labels(tiny_cohort.root, tiny_cohort.prepared, pseudo),
    }


def data_overrides(cohort) -> dict[str, str]:
    return {"prepared_dir": str(cohort["prepared"]), "pseudo_datalist": str(cohort["pseudo_datalist"])}


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """One training run of the README train command (tiny size, 4 epochs), interrupted: killed
    (SIGKILL) once its first checkpoint is written, then the same command run again to the end.

    Returns the bundle root, the epochs the killed run had completed, and both runs' logs.
    """
    bundle_root = tmp_path_factory.mktemp("coarse_abdomen_bundle")
    overrides = dict(bundle_root=str(bundle_root), max_epochs=str(EPOCHS), val_interval="1", **TINY, **TINY_OPTIMIZER, **data_overrides(cohort))
    checkpoint = bundle_root / "models" / "checkpoint_last.pt"
    killed_log = bundle_root / "killed_run.log"
    with open(killed_log, "w") as log:
        proc = subprocess.Popen(with_overrides(readme_commands()["train"], **overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + 300
            while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.kill()
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed: " + killed_log.read_text()[-2000:]
    killed_at = epoch_of(torch.load(checkpoint, map_location="cpu", weights_only=False))
    return {
        "bundle_root": bundle_root,
        "checkpoint": checkpoint,
        "killed_at": killed_at,
        "killed_log": killed_log.read_text(),
        "log": run_readme("train", **overrides),
    }


def epoch_of(checkpoint: dict) -> int:
    """Epochs done, from an ignite trainer state dict (it stores iterations, not epochs)."""
    return checkpoint["trainer"]["iteration"] // checkpoint["trainer"]["epoch_length"]


# ----------------------------------------------------------------------------- tests
def test_readme_has_every_command():
    assert set(readme_commands()) == {
        "train", "evaluate", "inference", "verify_metadata", "verify_net_in_out network_def",
        "torchrun multi_gpu_train", "ckpt_export network_def", "scripts/export.py",
    }


def test_metadata_matches_config():
    """(verify_metadata and channel_def against stmt_monai/labels.py: tests/test_conformance.py)"""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    config = json.loads((CONFIGS / "inference.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert {int(k): v for k, v in pred["channel_def"].items()} == dict(ABDOMEN_CHANNELS)
    assert pred["num_channels"] == config["out_channels"] == len(ABDOMEN_CHANNELS)
    assert image["num_channels"] == config["in_channels"] == 1
    assert image["spatial_shape"] == pred["spatial_shape"] == config_default("coarse_abdomen", "spatial_size") == [128, 128, 128]
    assert meta["version"] in meta["changelog"]


def test_train_writes_best_model_checkpoint_fingerprint_and_tensorboard(trained, cohort):
    models = trained["bundle_root"] / "models"
    assert (models / "model.pt").is_file()
    checkpoint = torch.load(models / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert set(checkpoint) == {"network", "optimizer", "lr_scheduler", "trainer", "best_checkpoint"}
    assert epoch_of(checkpoint) == EPOCHS
    assert checkpoint["best_checkpoint"]["best"] > DICE_FLOOR  # validation Dice at network resolution
    # the fingerprint travels with the model, so inference normalises exactly as training did
    assert json.loads((models / "fingerprint.json").read_text()) == json.loads(
        (cohort["prepared"] / "fingerprint.json").read_text()
    )
    assert list((trained["bundle_root"] / "logs").glob("events.out.tfevents.*"))
    assert "val_mean_dice" in trained["log"] and f"Epoch: {EPOCHS}/{EPOCHS}" in trained["log"]


def test_train_killed_then_rerun_resumes_from_its_checkpoint(trained):
    """The rerun of the killed training continues from the checkpoint's epoch, not from epoch 1."""
    done = trained["killed_at"]
    assert 1 <= done < EPOCHS
    assert f"resumed from {trained['checkpoint']} at epoch {done}" in trained["log"]
    assert f"Epoch: {done + 1}/{EPOCHS}" in trained["log"] and f"Epoch: 1/{EPOCHS}" not in trained["log"]


def test_train_datalist_streams_and_running_without_pseudo_labels(cohort, tmp_path):
    """The student's list: labelled + the pseudo-label job's cases; ``--pseudo_datalist "[]"`` (the
    README's way to train without pseudo labels) leaves the labelled stream only."""

    def datalist(**overrides):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.json"))
        parser.update({"bundle_root": str(tmp_path), "prepared_dir": str(cohort["prepared"]), **overrides})
        return parser.get_parsed_content("train#datalist")

    fully = json.loads((cohort["prepared"] / "datalist_fully_labelled.json").read_text())["training"]
    pseudo = json.loads(cohort["pseudo_datalist"].read_text())["training"]
    streams = [item["stream"] for item in datalist(pseudo_datalist=str(cohort["pseudo_datalist"]))]
    assert streams == ["labelled"] * len(fully) + [item["stream"] for item in pseudo]
    assert {"cpl", "pl"} <= set(streams)
    assert [item["stream"] for item in datalist(pseudo_datalist=[])] == ["labelled"] * len(fully)


def epoch_losses(log: str, epoch: int) -> list[float]:
    """The iteration losses of ``epoch`` that the StatsHandler logged."""
    return [float(v) for v in re.findall(rf"Epoch: {epoch}/{EPOCHS}, Iter: \d+/\d+ -- loss: ([\d.]+)", log)]


def test_loss_decreases(trained):
    """Mean loss of the last epoch well below the first's (each epoch mixes the streams alike)."""
    first, last = epoch_losses(trained["killed_log"], 1), epoch_losses(trained["log"], EPOCHS)
    assert first and last
    assert np.mean(last) < 0.8 * np.mean(first), (first, last)


def test_evaluate_scores_model_at_input_resolution(trained, cohort):
    out = trained["bundle_root"] / "eval"
    run_readme("evaluate", bundle_root=str(trained["bundle_root"]), **TINY, prepared_dir=str(cohort["prepared"]))
    dice = float((out / "metrics.csv").read_text().split(",")[1])
    assert DICE_FLOOR < dice <= 1.0
    rows = (out / "val_mean_dice_raw.csv").read_text().strip().splitlines()[1:]
    validation = json.loads((cohort["prepared"] / "datalist_validation.json").read_text())["validation"]
    assert len(rows) == len(validation)
    for item in validation:
        label = nib.load(cohort["prepared"] / item["label"])
        pred = nib.load(out / "predictions" / f"{item['name']}.nii.gz")
        assert pred.shape == label.shape and np.allclose(pred.affine, label.affine, atol=1e-4)


def test_inference_writes_mask_and_roi_at_input_geometry(trained, cohort, real_ct, real_dicom, tmp_path):
    """Generated NIfTI cases, the real CT and the real DICOM series (LPS, 512 x 512) in one folder:
    each gets its mask on its own grid and its ROI in canonical voxels and RAS mm."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(real_ct, inputs / "real_0000.nii.gz")
    shutil.copytree(real_dicom, inputs / "real_dicom")
    for image in sorted((cohort["root"] / "test" / "images").iterdir()):
        shutil.copy(image, inputs / image.name)
    out = tmp_path / "outputs"
    run_readme("inference", bundle_root=str(trained["bundle_root"]), input_dir=str(inputs), output_dir=str(out), **TINY)
    for image_path in sorted(inputs.iterdir()):
        name = case_name(image_path)
        image, affine = load_image(image_path)
        mask = nib.load(out / f"{name}.nii.gz")
        assert mask.shape == image.shape and np.allclose(mask.affine, affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
        roi = json.loads((out / f"{name}_roi.json").read_text())
        assert roi["case"] == name and roi["margin_mm"] == 10.0
        start, end, shape = (np.asarray(roi[k]) for k in ("start_voxel", "end_voxel", "canonical_shape"))
        assert np.all(0 <= start) and np.all(start < end) and np.all(end <= shape)
        assert roi["found"] or (np.all(start == 0) and np.all(end == shape))
        # world corners: the box's outer voxel faces on the canonical (RAS) grid
        _, canonical_affine, _ = to_canonical(image, affine)
        assert tuple(shape) == nib.as_closest_canonical(mask).shape
        assert np.allclose(roi["start_mm"], canonical_affine[:3, :3] @ (start - 0.5) + canonical_affine[:3, 3], atol=1e-3)
        assert np.allclose(roi["end_mm"], canonical_affine[:3, :3] @ (end - 0.5) + canonical_affine[:3, 3], atol=1e-3)
