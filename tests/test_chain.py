"""The user's journey at tiny size: ``stmt-train`` on a generated cohort (killed during the organ
student and run again), then ``stmt-segment --weights trained`` on the shipped CT and the stage
bundles' own inference workflows on the same weights.

One chain run serves every test of this file (the module fixture): the first ``stmt-train`` is
killed (its whole process group) once the organ student has saved its first epoch, the second
finishes the chain. Networks are tiny (32^3 Res-UNets with 4 base channels, a 4-channel teacher
on a 12 mm grid), one or two epochs, one thread, and nothing is given at inference but the weights'
folder: the sizes come from the records the training wrote beside the weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stmt_monai.bundle import read_record, record_path
from stmt_monai.training.chain import STEP_NAMES, Chain, summary_table

#: the chain's shared overrides: a tiny network everywhere (the paper's are 128^3 / 192^3, 16
#: base channels, 5 down-samplings), a 4-channel Res-UNet teacher on 32^3 windows of a 12 mm grid
TINY_CHAIN = [
    "--spatial_size", "[32,32,32]", "--base_channels", "4", "--num_downsamplings", "3", "--num_workers", "0",
    "--teacher_kind", "res_unet_large", "--teacher_roi_size", "[32,32,32]", "--teacher_base_channels", "4",
    "--teacher_num_downsamplings", "2", "--teacher_spacing_mm", "[12,12,12]",
    "--max_epochs", "1", "--teacher_max_epochs", "1", "--organ_student.max_epochs", "2", "--threads", "1", "--echo", "False",
]
STMT_TRAIN = str(Path(sys.executable).parent / "stmt-train")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MODELS = "bundles/organ_selftrain/models"


def mtimes(paths) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def journey(small_cohort, tmp_path_factory):
    """Run ``stmt-train``, kill it during the organ student, run it again; what each run left."""
    work = tmp_path_factory.mktemp("chain") / "work"
    command = [STMT_TRAIN, "--data_root", str(small_cohort), "--work_dir", str(work), *TINY_CHAIN]
    first_log = work.parent / "first_run.txt"
    with first_log.open("w") as out:
        first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    student_epoch = work / MODELS / "checkpoint_last.pt"  # the organ student's resume state (the teacher's has its own name)
    while not student_epoch.exists() and first.poll() is None:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the chain and the bundle workflow it runs
    first.wait()
    killed_state = json.loads((work / "chain" / "organ_student.json").read_text())
    before = mtimes(
        [work / MODELS / "teacher.pt", work / MODELS / "teacher.json", work / "bundles/coarse_abdomen/models/model.pt"]
        + sorted((work / "pseudo_labels").glob("*.nii.gz"))
    )
    second = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert second.returncode == 0, (first_log.read_text() + second.stdout + second.stderr)[-4000:]
    return {"work": work, "killed_state": killed_state, "before": before, "second": second.stdout, "first": first_log.read_text()}


@pytest.mark.slow
def test_killed_during_organ_student_resumes_without_redoing_teacher_or_pseudo_labels(journey):
    work = journey["work"]
    assert journey["killed_state"]["status"] == "running", journey["first"][-2000:]  # killed mid-step
    out = journey["second"]
    for step in ("triage", "teacher", "pseudo_labels", "stage1"):
        assert f"stmt-train: {step}: done before" in out and f"{step}: done before" in out
    assert "organ_student: organ student (resuming)" in out
    assert "resumed from" in (work / "logs" / "organ_student.log").read_text()  # ResumableCheckpoint, epoch 1 of 2
    assert mtimes(Path(p) for p in journey["before"]) == journey["before"]  # teacher, stage 1 and pseudo labels untouched
    summary = json.loads((work / "summary.json").read_text())
    status = {row["step"]: row["status"] for row in summary["steps"]}
    assert status == {
        "triage": "skipped (done)", "teacher": "skipped (done)", "pseudo_labels": "skipped (done)", "stage1": "skipped (done)",
        "organ_student": "resumed", "tumor": "ran",
    }
    rows = {row["step"]: row for row in summary["steps"]}
    for step in ("teacher", "stage1", "organ_student", "tumor"):
        assert Path(rows[step]["weights"]).is_file() and 0 <= rows[step]["best_val_dice"] <= 1
    assert rows["pseudo_labels"]["pseudo_labels"].endswith(" PL")
    table = out[out.index("step "):]
    assert all(name in table for name in STEP_NAMES) and "best val Dice" in table
    # every step's progress reached the log: validation of each training, the pseudo-label cases
    for step in ("teacher", "stage1", "organ_student", "tumor"):
        assert "validation: 2 cases in " in (work / "logs" / f"{step}.log").read_text()
    assert "pseudo labels: " in (work / "logs" / "pseudo_labels.log").read_text()


@pytest.mark.slow
def test_weights_carry_their_network(journey):
    bundles = journey["work"] / "bundles"
    assert read_record(bundles / "coarse_abdomen/models/model.pt") == {
        "spatial_size": [32, 32, 32], "in_channels": 1, "out_channels": 2, "base_channels": 4, "num_downsamplings": 3, "max_channels": 320,
    }
    assert read_record(bundles / "organ_selftrain/models/teacher.pt")["teacher_base_channels"] == 4
    assert read_record(bundles / "tumor_meanteacher/models/model.pt")["spatial_size"] == [32, 32, 32]


@pytest.mark.slow
def test_stmt_segment_trained_weights_on_the_shipped_ct(journey, real_ct, tmp_path, capsys):
    from stmt_monai.cli import segment_main

    out = tmp_path / "out"
    bundles = journey["work"] / "bundles"
    with pytest.raises(SystemExit) as exit_info:
        segment_main([str(real_ct), str(out), "--weights", "trained", "--bundles_dir", str(bundles), "--progress", "False", "--backend", "torch"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    ct = nib.load(real_ct)
    mask = nib.load(out / "abdomen_ct_3mm.nii.gz")
    assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= set(range(15))
    report = json.loads((out / "abdomen_ct_3mm_report.json").read_text())
    assert "trained" in json.dumps(report)


@pytest.mark.slow
def test_stage_bundles_own_inference_on_the_chain_weights(journey, real_ct, tmp_path):
    """Each stage bundle's inference workflow (``python -m monai.bundle run``), with the record
    beside its weights as ``--args_file`` and no size given; stage 2 on stage 1's mask; stage 1's
    evaluation workflow likewise."""
    from stmt_monai.bundle import run_workflow

    bundles = journey["work"] / "bundles"
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "case_0000.nii.gz").symlink_to(real_ct)
    ct = nib.load(real_ct)
    outputs = {}
    for name, extra in (("coarse_abdomen", {}), ("organ_selftrain", {"roi_dir": tmp_path / "coarse_abdomen"}), ("tumor_meanteacher", {"roi_dir": tmp_path / "coarse_abdomen"})):
        outputs[name] = tmp_path / name
        run_workflow(
            bundles / name, "inference", {"input_dir": inputs, "output_dir": outputs[name], "num_workers": 0, "device": "cpu", **extra},
            log_file=tmp_path / f"{name}.log", threads=1, args_file=record_path(bundles / name / "models" / "model.pt"),
        )
        mask = nib.load(outputs[name] / "case.nii.gz")
        assert mask.shape == ct.shape and np.allclose(mask.affine, ct.affine), name
    # and the evaluation workflow (over train.json) scores the same weights on the validation cases
    bundle = bundles / "coarse_abdomen"
    run_workflow(
        bundle, "evaluate", {"prepared_dir": journey["work"] / "prepared", "output_dir": tmp_path / "eval", "num_workers": 0, "device": "cpu"},
        log_file=tmp_path / "evaluate.log", threads=1, args_file=record_path(bundle / "models" / "model.pt"),
    )
    assert "val_mean_dice" in (tmp_path / "eval" / "metrics.csv").read_text()


def test_per_step_overrides_and_settings(tmp_path):
    """``--<step>.<key>`` reaches one step; device and workers do not change what a step makes."""
    chain = Chain(tmp_path, tmp_path / "work", overrides={"max_epochs": 3, "organ_student.max_epochs": 5, "device": "cuda"})
    organ, stage1 = chain.step("organ_student"), chain.step("stage1")
    assert chain.overrides(organ)["max_epochs"] == 5 and chain.overrides(stage1)["max_epochs"] == 3
    assert chain.overrides(chain.step("tumor"))["roi_dir"] == str(tmp_path / "work" / "pseudo_labels")
    assert "device" not in chain.settings(stage1) and chain.settings(stage1)["max_epochs"] == 3
    with pytest.raises(ValueError, match="no step 'organ'"):
        Chain(tmp_path, tmp_path / "work", overrides={"organ.max_epochs": 5})
    table = summary_table([{"step": "stage1", "status": "ran", "seconds": 12.3, "best_val_dice": 0.5, "weights": "w/model.pt"}])
    assert table.splitlines()[2].split() == ["stage1", "ran", "12", "s", "0.5000", "w/model.pt"]


def test_unknown_override_is_refused_in_one_line(small_cohort, tmp_path, capsys):
    from stmt_monai.cli import train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--data_root", str(small_cohort), "--work_dir", str(tmp_path / "work"), "--max_epoch", "3", "--stage1.spatial_sise", "[32,32,32]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "stmt-train: --max_epoch --stage1.spatial_sise: no such config id in the bundles' workflows (a typo?); see each bundle's docs/README.md"
    assert not (tmp_path / "work" / "chain").exists()  # nothing ran
