"""Folder evaluation by the FLARE23 rules: made cases with known scores, the real CT's mask,
the special cases (empty, DSC < 0.2, slice-range cut), and cases that cannot be scored."""

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stmt_monai.evaluation.metrics import flare_case_scores
from stmt_monai.evaluation.scoring import PER_CASE_CSV, PROBLEMS_CSV, SUMMARY_CSV, SUMMARY_MD, evaluate_folder, voxel_spacing
from stmt_monai.io import save_label_map
from stmt_monai.labels import LABELS, TUMOR

REPO = Path(__file__).resolve().parents[1]
LIVER, SPLEEN, AORTA, GALLBLADDER = 1, 3, 5, 9


def _box(shape, low, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, lo + n) for lo, n in zip(low, size))] = True
    return mask


def _write_case(folder: Path, case: str, labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    return save_label_map(folder / f"{case}.nii.gz", labels, np.diag([*spacing, 1.0]))


def _scores(rows) -> dict:
    return {(r["case"], r["label"]): (r["dsc"], r["nsd"]) for r in rows}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def dirs(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    return gt, pred, tmp_path / "eval"


def test_known_scores(dirs):
    """Hand-computed DSC / NSD, with the spacing taken from the ground truth's header."""
    gt_dir, pred_dir, out_dir = dirs
    shape = (40, 20, 20)
    cube = _box(shape, (2, 5, 5), (10, 10, 10))
    # liver: prediction shifted by one voxel (1 mm): DSC = 2 * 900 / 2000; every surface point
    # lies within 1 mm of the other surface, far inside the 5 mm tolerance
    gt = cube * LIVER
    pred = np.roll(cube, 1, axis=0) * LIVER
    _write_case(gt_dir, "shift", gt.astype(np.uint8))
    _write_case(pred_dir, "shift", pred.astype(np.uint8))
    # gallbladder (2 mm): prediction = the cube plus a copy of it 4 voxels away. Copy's surface
    # = the cube's (a translation), all of it > 2 mm from the ground truth: DSC = NSD = 2/3.
    # With 0.375 mm voxels along axis 0 (exact in float32) the gap is 1.5 mm: part of the copy counts.
    copy = _box(shape, (16, 5, 5), (10, 10, 10))
    gt2, pred2 = (cube * GALLBLADDER).astype(np.uint8), ((cube | copy) * GALLBLADDER).astype(np.uint8)
    for case, spacing in (("copy_1mm", (1.0, 1.0, 1.0)), ("copy_0375mm", (0.375, 1.0, 1.0))):
        _write_case(gt_dir, case, gt2, spacing)
        _write_case(pred_dir, case, pred2, spacing)

    rows, summary, problems = evaluate_folder(pred_dir, gt_dir, out_dir, classes=(LIVER, GALLBLADDER), progress=False)
    scores = _scores(rows)
    assert problems == []
    assert scores["shift", LIVER] == (pytest.approx(0.9), pytest.approx(1.0))
    assert scores["copy_1mm", GALLBLADDER] == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    dsc, nsd = scores["copy_0375mm", GALLBLADDER]
    assert dsc == pytest.approx(2 / 3) and 2 / 3 + 0.01 < nsd < 1
    assert nsd == pytest.approx(flare_case_scores(gt2, pred2, (0.375, 1.0, 1.0), (GALLBLADDER,))[GALLBLADDER]["nsd"])
    # classes absent from both: 1 (liver in the copy cases, gallbladder in the shift case)
    assert scores["copy_1mm", LIVER] == (1.0, 1.0) and scores["shift", GALLBLADDER] == (1.0, 1.0)
    # summary = class means over cases; organ mean = mean of the class means
    liver_dsc = (0.9 + 1 + 1) / 3
    gallbladder_dsc = (1 + 2 / 3 + 2 / 3) / 3
    assert summary["per_class"][LIVER]["dsc"] == pytest.approx(liver_dsc)
    assert summary["organ_dsc"] == pytest.approx((liver_dsc + gallbladder_dsc) / 2)
    assert summary["num_cases"] == 3 and math.isnan(summary["tumor_dsc"])

    per_case = {r["case"]: r for r in _read_csv(out_dir / PER_CASE_CSV)}
    assert list(per_case["shift"]) == ["case", "liver_dsc", "gallbladder_dsc", "liver_nsd", "gallbladder_nsd"]
    assert float(per_case["shift"]["liver_dsc"]) == pytest.approx(0.9)
    summary_csv = _read_csv(out_dir / SUMMARY_CSV)
    assert [r["name"] for r in summary_csv] == ["liver", "gallbladder", "organ_mean"]
    assert float(summary_csv[-1]["dsc"]) == pytest.approx(summary["organ_dsc"])
    assert "| organs | organ_mean |" in (out_dir / SUMMARY_MD).read_text()


def test_flare_special_cases(dirs):
    """Empty masks, NSD = 0 below DSC 0.2 (not 0.1), and the slice-range cut of the aorta."""
    gt_dir, pred_dir, _ = dirs
    shape = (40, 16, 40)
    gt, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    # spleen only in gt -> 0, 0; liver only in pred -> 0, 0; gallbladder in neither -> 1, 1
    gt[_box(shape, (2, 2, 2), (4, 4, 4))] = SPLEEN
    pred[_box(shape, (30, 2, 2), (4, 4, 4))] = LIVER
    # tumor: 20-voxel-long boxes overlapping in 3 of 20 rows -> DSC 0.15, surfaces touch within
    # the 2 mm tolerance, yet NSD = 0 by the DSC < 0.2 rule
    gt[_box(shape, (10, 2, 10), (20, 4, 4))] = TUMOR
    pred[_box(shape, (27, 2, 10), (13, 4, 4))] = TUMOR
    pred[_box(shape, (0, 8, 10), (7, 4, 4))] = TUMOR  # 7 more voxels of rows, far off: |P| = |G|
    # aorta: gt spans slices 20..29 of axis 2; pred = the same tube over slices 15..35 minus the
    # gt's last slice. Cut to the gt's [z_min, z_max) = [20, 29) both agree exactly.
    gt[_box(shape, (10, 10, 20), (4, 4, 10))] = AORTA
    pred[_box(shape, (10, 10, 15), (4, 4, 21))] = AORTA
    pred[10:14, 10:14, 29] = 0
    _write_case(gt_dir, "special", gt)
    _write_case(pred_dir, "special", pred)

    rows, summary, problems = evaluate_folder(pred_dir, gt_dir, progress=False)
    scores = _scores(rows)
    assert problems == [] and len(rows) == len(LABELS)
    assert scores["special", SPLEEN] == (0.0, 0.0)
    assert scores["special", LIVER] == (0.0, 0.0)
    assert scores["special", GALLBLADDER] == (1.0, 1.0)
    dsc, nsd = scores["special", TUMOR]
    assert dsc == pytest.approx(0.15) and nsd == 0.0
    assert scores["special", AORTA] == (1.0, 1.0)
    assert summary["tumor_dsc"] == pytest.approx(0.15)


def test_real_mask_against_itself(dirs, real_organs):
    gt_dir, pred_dir, out_dir = dirs
    shutil.copy(real_organs, gt_dir / "real_case.nii.gz")
    shutil.copy(real_organs, pred_dir / "real_case.nii.gz")
    rows, summary, problems = evaluate_folder(pred_dir, gt_dir, out_dir, progress=False)
    assert problems == [] and len(rows) == len(LABELS)
    assert all(r["dsc"] == 1.0 and r["nsd"] == 1.0 for r in rows)
    assert summary["organ_dsc"] == summary["organ_nsd"] == summary["tumor_dsc"] == 1.0
    # spacing from the header: the shipped mask is 3 mm isotropic
    import nibabel as nib

    assert voxel_spacing(nib.load(str(real_organs)).affine) == pytest.approx((3.0, 3.0, 3.0))


def test_problem_cases_are_listed_not_fatal(dirs):
    gt_dir, pred_dir, out_dir = dirs
    labels = (_box((12, 12, 12), (3, 3, 3), (5, 5, 5)) * LIVER).astype(np.uint8)
    for case in ("good", "missing", "shape", "unreadable", "values", "moved"):
        _write_case(gt_dir, case, labels)
    _write_case(pred_dir, "good", labels)
    _write_case(pred_dir, "shape", labels[:, :, :10])
    (pred_dir / "unreadable.nii.gz").write_bytes(b"not a nifti")
    _write_case(pred_dir, "values", labels * 20)
    save_label_map(pred_dir / "moved.nii.gz", labels, np.diag([1.0, 1.0, 1.0, 1.0]) @ np.diag([-1, 1, 1, 1]))
    _write_case(pred_dir, "orphan", labels)
    (pred_dir / "notes.txt").write_text("ignored")

    rows, summary, problems = evaluate_folder(pred_dir, gt_dir, out_dir, classes=LIVER, progress=False)
    assert summary["num_cases"] == 1 and _scores(rows) == {("good", LIVER): (1.0, 1.0)}
    reasons = {p["case"]: p["reason"] for p in problems}
    assert set(reasons) == {"missing", "shape", "unreadable", "values", "moved", "orphan"}
    assert "no prediction" in reasons["missing"]
    assert "shape (12, 12, 10) differs" in reasons["shape"]
    assert "not a readable NIfTI" in reasons["unreadable"]
    assert "outside the FLARE labels" in reasons["values"]
    assert "affine differs" in reasons["moved"]
    assert "no ground truth" in reasons["orphan"]
    assert all("\n" not in r for r in reasons.values())
    assert {r["case"] for r in _read_csv(out_dir / PROBLEMS_CSV)} == set(reasons)
    # the official code compares arrays only: without the affine check the moved case is scored
    rows, _, problems = evaluate_folder(pred_dir, gt_dir, classes=LIVER, check_affine=False, progress=False)
    assert ("moved", LIVER) in _scores(rows) and "moved" not in {p["case"] for p in problems}


def test_cli(dirs, real_organs):
    gt_dir, pred_dir, out_dir = dirs
    shutil.copy(real_organs, gt_dir / "case_a.nii.gz")
    shutil.copy(real_organs, pred_dir / "case_a.nii.gz")
    shutil.copy(real_organs, gt_dir / "case_b.nii.gz")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [str(Path(sys.executable).with_name("stmt-evaluate")), str(pred_dir), str(gt_dir), f"--out_dir={out_dir}"]
    cmd.append("--classes=1,2,14")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| 1 | liver | 100.00 | 100.00 |" in result.stdout
    assert "| organs | organ_mean | 100.00 | 100.00 |" in result.stdout
    assert "case_b: no prediction" in result.stdout
    assert "FLARE23 evaluation" in result.stderr  # the progress bar
    assert [r["case"] for r in _read_csv(out_dir / PER_CASE_CSV)] == ["case_a"]
    assert len(_read_csv(out_dir / SUMMARY_CSV)) == 4  # liver, right kidney, organ mean, tumor
