"""The ablation trains every row through the bundles' own workflows, with its listed overrides.

A CI-sized smoke run (tiny cohort, tiny networks, one epoch) of
:func:`stmt_monai.evaluation.ablation.run_ablation`; the statistics are checked on made-up figures.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import cc3d
import numpy as np
import pytest

from stmt_monai.bundle import format_override, workflow_parser
from stmt_monai.data.datalists import load_datalist
from stmt_monai.evaluation import ablation
from stmt_monai.evaluation.ablation import (
    ORGAN_ROWS,
    ROW_NAMES,
    TUMOR_ROWS,
    AblationSettings,
    paired_difference,
    row_overrides,
    run_ablation,
)
from stmt_monai.inference.bundles import default_bundles_dir
from stmt_monai.io import case_name, load_label
from stmt_monai.labels import TUMOR
from stmt_monai.training.losses import SoftTargetMSELoss

TINY = AblationSettings(
    spatial_size=(16, 16, 16),
    base_channels=4,
    num_downsamplings=2,
    max_channels=16,
    organ_epochs=1,
    batches_per_epoch=1,
    tumor_epochs=1,
    val_interval=1,
    teacher_base_channels=4,
    teacher_num_downsamplings=2,
    teacher_roi_size=(16, 16, 16),
    teacher_spacing_mm=(12.0, 12.0, 12.0),
    teacher_epochs=1,
    teacher_batch_size=1,
    teacher_num_patches=1,
    parallel=2,
)


def _command(log_text: str, workflow: str) -> list[str]:
    """The first ``monai.bundle run`` command of ``workflow`` echoed in a run's log."""
    for line in log_text.splitlines():
        if line.startswith("$ ") and "monai.bundle" in line and f"/configs/{workflow}.json" in line:
            return shlex.split(line[2:])
    raise AssertionError(f"no {workflow} command in the log")


def _override(args: list[str], key: str):
    return args[args.index(f"--{key}") + 1] if f"--{key}" in args else None


@pytest.mark.slow
def test_every_row_runs_through_the_bundle_workflows_with_its_overrides(small_cohort, tmp_path):
    work = tmp_path / "ablation"
    results = run_ablation(small_cohort, work, seeds=(0,), settings=TINY)
    seed_dir = work / "seed0"
    # the teacher and its pseudo labels: organ_selftrain's own train_teacher and pseudo_label
    teacher_log = (seed_dir / "teacher" / "teacher.log").read_text()
    assert "organ_selftrain/configs/train_teacher.json" in teacher_log
    assert (seed_dir / "pseudo_labels" / "datalist_pseudo_labelled.json").is_file()
    for row in ROW_NAMES:
        log = (seed_dir / row / f"{row}.log").read_text()
        bundle = "organ_selftrain" if row in ORGAN_ROWS else "tumor_meanteacher"
        train = _command(log, "train")
        assert f"bundles/{bundle}/configs/train.json" in " ".join(train)
        for key, value in row_overrides(row).items():  # the row's listed overrides, as given
            given = _override(train, key)
            assert given is not None, (row, key)
            if isinstance(value, str):
                assert given.endswith(value.split("}")[-1]), (row, key, given)
            else:
                assert given == format_override(value), (row, key, given)
        # and nothing else distinguishes the rows of a stage but those keys and their own folders
        assert _override(train, "max_epochs") == str(TINY.organ_epochs if row in ORGAN_ROWS else TINY.tumor_epochs)
        assert _override(train, "spatial_size") == "[16,16,16]"
        inference = _command(log, "inference")  # scored by the bundle's own inference workflow
        assert f"bundles/{bundle}/configs/inference.json" in " ".join(inference)
        assert (seed_dir / row / "models" / "model.pt").is_file()
        scores = results["rows"][row]["0"] if "0" in results["rows"][row] else results["rows"][row][0]
        key = "organ_dsc" if row in ORGAN_ROWS else "tumor_dsc"
        assert 0.0 <= scores[key] <= 100.0
    assert set(results["rows"]) == set(ROW_NAMES)
    assert set(results["lesions"]) == set(TUMOR_ROWS) == set(results["tumor_split"])
    # what the targets held, epoch by epoch, from the tumor bundle's own logging: every tumor row
    # logs the annotation and the student's tumor; only rows that use the teacher log its target
    for row in TUMOR_ROWS:
        curves = results["target_curves"][row][0]
        assert [epoch for epoch, _ in curves["annotated_tumor_pct"]] == list(range(1, TINY.tumor_epochs + 1))
        assert all(value > 0 for _, value in curves["annotated_tumor_pct"])
        assert ("extra_target_pct" in curves) == (row not in ("fst", "fst_x2", "fst_full")), row
        assert ("teacher_tumor_pct" in curves) == (row not in ("fst", "fst_x2", "fst_full", "mt_oracle")), row  # the oracle replaces it
    # the full-label upper bound: FST's cases, each labelled with its hidden truth (every lesion)
    full = load_datalist(_override(_command((seed_dir / "fst_full" / "fst_full.log").read_text(), "train"), "tumor_datalist"))
    tumor_cases = load_datalist(work / "prepared" / "datalist_tumor.json")
    assert [item["image"] for item in full] == [item["image"] for item in tumor_cases]
    assert [item["label"] for item in full] == [str(Path(small_cohort) / "truth" / f"{case_name(item['image'])}.nii.gz") for item in tumor_cases]
    assert not any("oracle" in item for item in full)  # the truth is the label, not a second target
    # a second call resumes: nothing is trained again
    before = {row: (seed_dir / row / "done.json").stat().st_mtime for row in ROW_NAMES}
    run_ablation(small_cohort, work, seeds=(0,), settings=TINY)
    assert before == {row: (seed_dir / row / "done.json").stat().st_mtime for row in ROW_NAMES}
    assert json.loads((work / "results.json").read_text())["rows"].keys() == results["rows"].keys()
    # another test set through the same inference (here the cohort's own, so the scores must agree)
    ablation.predict_held_out(small_cohort, work, Path(small_cohort) / "test", (0,), ("fso", "fst"), TINY, tag="again")
    assert (seed_dir / "fst" / "test_pred_student_again").is_dir()
    again = ablation.score_ablation(small_cohort, work, (0,), ("fso", "fst"), test_dir=Path(small_cohort) / "test", tag="again")
    assert (work / "results_again.json").is_file() and again["test_cases"] == results["test_cases"]
    for row in ("fso", "fst"):
        assert again["rows"][row] == results["rows"][row]
    # the mean teacher's extra target after training: the EMA teacher through the bundle's
    # inference on the row's training cases, united with the annotation
    targets = ablation.teacher_targets(small_cohort, work, 0, "mean_teacher", TINY)
    log = (seed_dir / "mean_teacher" / "train_teacher_pred.log").read_text()
    assert "mean_teacher.pt" in " ".join(_command(log, "inference"))
    assert targets["cases"] == len(tumor_cases) > 0
    assert targets["annotated"]["found"] == targets["annotated"]["total"] > 0  # the union holds every annotated lesion
    hidden, truth_voxels, annotated_voxels, teacher_voxels = 0, 0, 0, 0
    for item in tumor_cases:
        name = case_name(item["image"])
        truth, _ = load_label(Path(small_cohort) / "truth" / f"{name}.nii.gz")
        annotation, _ = load_label(item["label"], truth.shape)
        lesions, n = cc3d.connected_components(truth == TUMOR, connectivity=26, return_N=True)
        hidden += n - len(set(np.unique(lesions[annotation == TUMOR])) - {0})
        truth_voxels, annotated_voxels = truth_voxels + int((truth == TUMOR).sum()), annotated_voxels + int((annotation == TUMOR).sum())
        teacher_voxels += int((load_label(seed_dir / "mean_teacher" / "train_teacher_pred" / f"{name}.nii.gz", truth.shape)[0] == TUMOR).sum())
    assert targets["unannotated"]["total"] == hidden
    voxels = targets["voxels"]
    assert (voxels["truth"], voxels["annotated"], voxels["teacher"]) == (truth_voxels, annotated_voxels, teacher_voxels)
    assert voxels["truth"] >= voxels["annotated"] > 0 and 0 <= voxels["teacher_on_truth"] <= min(voxels["teacher"], voxels["truth"])
    # the last epoch's teacher (checkpoint_last.pt) through the same inference, into its own folder
    last = ablation.teacher_targets(small_cohort, work, 0, "mean_teacher", TINY, checkpoint="checkpoint_last.pt")
    assert "checkpoint_last.pt" in " ".join(_command((seed_dir / "mean_teacher" / "train_teacher_pred_checkpoint_last.log").read_text(), "inference"))
    assert last["cases"] == targets["cases"] and last["voxels"]["truth"] == voxels["truth"]


def test_training_curves_average_each_epochs_iterations(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    for iteration, value in enumerate([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 5.0], start=1):
        writer.add_scalar("extra_target_pct", value, iteration)
    writer.add_scalar("val_mean_dice", 0.5, 2)  # an epoch-level scalar: not one of the tags
    writer.close()
    curves = ablation.training_curves(tmp_path, epoch_length=3)
    assert curves == {"extra_target_pct": [(1, 2.0), (2, 20.0), (3, 5.0)]}  # the last epoch unfinished
    with pytest.raises(ValueError, match="epoch_length"):
        ablation.training_curves(tmp_path, epoch_length=0)


def test_tumor_split_separates_cases_with_tumor_from_tumor_free_ones():
    scored = {
        "cases": {"a": {TUMOR: {"dsc": 0.5}}, "b": {TUMOR: {"dsc": 1.0}}, "c": {TUMOR: {"dsc": 0.0}}, "d": {TUMOR: {"dsc": 0.0}}},
        "lesions": {"a": {"found": 1, "missed": 0}, "b": {"found": 0, "missed": 0}, "c": {"found": 0, "missed": 0}, "d": {"found": 0, "missed": 2}},
    }
    # a and d hold tumors (d's missed); b and c none, c with a false tumor (DSC 0 by FLARE's rule)
    assert ablation.tumor_split(scored) == {"tumor_dsc_present": 25.0, "tumor_free_clean": 1, "tumor_free_cases": 2}


def test_fst_x2_doubles_fst_loss_in_the_tumor_bundle_config():
    """The nested override reaches the loss the bundle's trainer uses: FST's target, twice the weight."""
    weights = {}
    for row in ("fst", "fst_x2", "mean_teacher"):
        parser = workflow_parser(default_bundles_dir() / ablation.TUMOR_BUNDLE, "train", row_overrides(row))
        weights[row] = dict(parser.get_parsed_content("loss").weights)
    assert weights == {
        "fst": {"labelled": 1.0, "cpl": 0.0},
        "fst_x2": {"labelled": 2.0, "cpl": 0.0},
        "mean_teacher": {"labelled": 1.0, "cpl": 1.0},
    }


def test_mt_soft_gives_the_teacher_term_the_soft_target_loss_in_the_tumor_bundle_config():
    """The mean teacher's weights, its teacher term the squared difference of probabilities."""
    losses = {}
    for row in ("mean_teacher", "mt_soft"):
        parser = workflow_parser(default_bundles_dir() / ablation.TUMOR_BUNDLE, "train", row_overrides(row))
        losses[row] = parser.get_parsed_content("loss")
        assert parser.get_parsed_content("train#trainer#teacher_target") == ("soft" if row == "mt_soft" else "hard")
    assert dict(losses["mt_soft"].weights) == dict(losses["mean_teacher"].weights) == {"labelled": 1.0, "cpl": 1.0}
    assert isinstance(losses["mt_soft"].loss_of("cpl"), SoftTargetMSELoss)
    assert not isinstance(losses["mean_teacher"].loss_of("cpl"), SoftTargetMSELoss)


def test_mt_classic_is_the_soft_target_with_a_noisy_teacher_view_and_lambda_10():
    """The original mean teacher's recipe reaches the bundle's loss and trainer; the mean teacher
    row keeps the paper's clean view and lambda 1."""
    for row, (target, noise, cpl) in {"mean_teacher": ("hard", 0.0, 1.0), "mt_classic": ("soft", 0.1, 10.0)}.items():
        parser = workflow_parser(default_bundles_dir() / ablation.TUMOR_BUNDLE, "train", row_overrides(row))
        loss = parser.get_parsed_content("loss")
        assert parser.get_parsed_content("train#trainer#teacher_target") == target
        assert parser.get_parsed_content("train#trainer#teacher_noise_std") == noise
        assert dict(loss.weights) == {"labelled": 1.0, "cpl": cpl}
        assert isinstance(loss.loss_of("cpl"), SoftTargetMSELoss) == (target == "soft")


def test_fst_full_is_fst_with_another_datalist_in_the_tumor_bundle_config(tmp_path):
    """The upper bound changes FST's labels only: lambda 0 (no teacher term), the same loss."""
    parsed = {}
    for row in ("fst", "fst_full"):
        overrides = ablation._resolve(row_overrides(row), {"lists": str(tmp_path)})
        parser = workflow_parser(default_bundles_dir() / ablation.TUMOR_BUNDLE, "train", overrides)
        parsed[row] = (dict(parser.get_parsed_content("loss").weights), parser.get_parsed_content("tumor_datalist"))
    assert parsed["fst"][0] == parsed["fst_full"][0] == {"labelled": 1.0, "cpl": 0.0}
    assert parsed["fst"][1].endswith("datalist_tumor.json") and parsed["fst_full"][1] == str(tmp_path / "tumor_full.json")
    assert set(row_overrides("fst_full")) - set(row_overrides("fst")) == {"tumor_datalist"}


def test_paired_difference_gives_the_t_interval_of_the_mean():
    rows = {
        "a": {0: {"m": 80.0}, 1: {"m": 82.0}, 2: {"m": 81.0}},
        "b": {0: {"m": 77.0}, 1: {"m": 78.0}, 2: {"m": 79.0}},
    }
    diff = paired_difference(rows, "a", "b", "m")
    assert diff["per_seed"] == [3.0, 4.0, 2.0] and diff["n"] == 3
    assert diff["mean"] == pytest.approx(3.0) and diff["sd"] == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert diff["ci95"] == pytest.approx((3.0 - half, 3.0 + half))
    assert paired_difference(rows, "a", "missing", "m") is None


def test_rows_differ_only_by_their_listed_keys(tmp_path):
    paths = ablation.AblationPaths(tmp_path / "cohort", tmp_path / "work")
    steps = {s.name: s for s in ablation.seed_steps(paths, AblationSettings(), 0)}
    for rows in (ORGAN_ROWS, TUMOR_ROWS):
        shared = []
        for row in rows:
            own = set(row_overrides(row))
            shared.append({k: v for k, v in steps[row].overrides.items() if k not in own and k not in ("ckpt_dir", "log_dir")})
        assert all(s == shared[0] for s in shared), rows
    # the paper's rows: FSO on the labelled stream, self-training adds CPL then PL; FST is lambda 0
    assert steps["fso"].overrides["streams"] == ["labelled"]
    assert steps["st_partial"].overrides["streams"] == ["labelled", "cpl"]
    assert "streams" not in steps["st_partial_unlabelled"].overrides  # the bundle's default: all three
    assert steps["fst"].overrides["lambda_cpl"] == 0.0 and "lambda_cpl" not in steps["mean_teacher"].overrides
    assert steps["mt_confident"].overrides["teacher_threshold"] == 0.9 and "teacher_threshold" not in steps["mean_teacher"].overrides
    assert steps["fst_x2"].overrides["lambda_cpl"] == 0.0 and steps["fst_x2"].overrides["loss#weights#labelled"] == 2.0
    assert steps["fst_full"].overrides["tumor_datalist"] == str(paths.lists / "tumor_full.json") and steps["fst_full"].overrides["lambda_cpl"] == 0.0
    assert steps["mt_soft"].overrides["teacher_target"] == "soft" and "teacher_target" not in steps["mean_teacher"].overrides
    assert {k: steps["mt_classic"].overrides[k] for k in ("teacher_target", "teacher_noise_std", "lambda_cpl")} == {
        "teacher_target": "soft",
        "teacher_noise_std": 0.1,
        "lambda_cpl": 10.0,
    }
    assert steps["st_partial"].needs == ((0, "pseudo_labels"),) and steps["fso"].needs == ()
    # one teacher for every seed: seed 2's self-training waits for seed 0's pseudo labels
    shared = {s.name: s for s in ablation.seed_steps(paths, AblationSettings(teacher_seed=0), 2)}
    assert "teacher" not in shared and shared["st_partial_unlabelled"].needs == ((0, "pseudo_labels"),)
    assert shared["st_partial_unlabelled"].overrides["pseudo_datalist"].startswith(str(paths.pseudo_dir(0)))
