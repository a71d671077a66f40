"""stmt-segment (stmt_monai.cli): batches, failures, skipping, outputs and reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cascade_helpers import REPO, random_bundles

from stmt_monai.cli import segment, segment_main
from stmt_monai.inference.batch import shard_cases
from stmt_monai.io import load_image, save_nifti
from stmt_monai.preprocessing.roi import roi_coverage


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return random_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture()
def mixed_folder(tmp_path, real_ct):
    """One good CT, one corrupt file, one 2D image."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good_0000.nii.gz").write_bytes(real_ct.read_bytes())
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file" * 10)
    save_nifti(folder / "flat.nii.gz", np.zeros((64, 64, 1), np.int16), np.eye(4))
    return folder


def test_folder_with_bad_cases_goes_on_and_exits_1(bundles, mixed_folder, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        segment_main([str(mixed_folder), str(out), "--bundles_dir", str(bundles), "--progress", "False"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "1 written, 0 skipped" in err and "2 failed" in err
    lines = {Path(line.split(": ", 1)[0]).name: line for line in err.splitlines() if ": " in line and "in/" in line}
    assert "not a readable NIfTI image" in lines["corrupt.nii.gz"]
    assert "expected a 3D volume, got an array of shape (64, 64, 1)" in lines["flat.nii.gz"]
    # the good case: FLARE name, input geometry, report and no leftovers of atomic writes
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "good_report.csv", "good_report.json"]
    image, affine = load_image(mixed_folder / "good_0000.nii.gz")
    mask = nib.load(out / "good.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, affine)
    assert mask.get_data_dtype() == np.uint8


def test_progress_bar_counts_every_case_failed_or_not(bundles, mixed_folder, tmp_path, capsys):
    """stmt-segment's bar (tqdm, on stderr): its last state counts the three cases, the two that
    failed included; with ``--progress False`` there is none."""
    segment(str(mixed_folder), str(tmp_path / "out"), bundles_dir=str(bundles), progress=True)
    err = capsys.readouterr().err
    states = [line.strip() for line in err.replace("\r", "\n").splitlines() if line.startswith("stmt-segment:") and "|" in line]
    assert states, err
    assert states[-1].startswith("stmt-segment: 100%|") and "| 3/3 [" in states[-1] and states[-1].endswith(("case]", "case/s]"))  # s/case or case/s
    segment(str(mixed_folder), str(tmp_path / "out2"), bundles_dir=str(bundles), progress=False)
    assert "|" not in capsys.readouterr().err


def test_shards_split_a_folder_into_disjoint_shares(bundles, real_ct, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}_0000.nii.gz").write_bytes(real_ct.read_bytes())
    out = tmp_path / "out"
    first = segment(str(folder), str(out), bundles_dir=str(bundles), progress=False, shard="0/2")
    assert [Path(p).name for p in first.written] == ["a_0000.nii.gz", "c_0000.nii.gz"]
    with pytest.raises(SystemExit) as exit_info:  # the command line, as a second process would run it
        segment_main([str(folder), str(out), "--bundles_dir", str(bundles), "--progress", "False", "--shard", "1/2"])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert shard_cases(["x", "y"], None) == ["x", "y"]
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(ValueError, match="shard"):
            shard_cases(["x"], bad)


def test_report_volumes_match_the_written_mask(bundles, real_dicom, tmp_path):
    result = segment(str(real_dicom), str(tmp_path), bundles_dir=str(bundles), preview=True, progress=False)
    assert result.ok and len(result.written) == 1
    mask = nib.load(tmp_path / "abdomen_ct_dicom.nii.gz")
    labels = np.asarray(mask.dataobj)
    voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
    report = json.loads((tmp_path / "abdomen_ct_dicom_report.json").read_text())
    for organ in report["organs"]:
        assert organ["voxels"] == int((labels == organ["label"]).sum())
        assert organ["volume_ml"] == pytest.approx(organ["voxels"] * voxel_ml, rel=1e-9)
    assert report["tumors"]["total_volume_ml"] == pytest.approx((labels == 14).sum() * voxel_ml)
    png = tmp_path / "abdomen_ct_dicom_preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_output_is_skipped_unless_overwrite(bundles, real_ct, tmp_path):
    first = segment(str(real_ct), str(tmp_path), bundles_dir=str(bundles), progress=False)
    mask = tmp_path / "abdomen_ct_3mm.nii.gz"
    assert first.written and mask.exists()
    os.utime(mask, (0, 0))
    again = segment(str(real_ct), str(tmp_path), bundles_dir=str(bundles), progress=False)
    assert again.skipped == [str(real_ct)] and mask.stat().st_mtime == 0
    redo = segment(str(real_ct), str(tmp_path), bundles_dir=str(bundles), overwrite=True, progress=False)
    assert redo.written == [str(real_ct)] and mask.stat().st_mtime > 0


#: a process in which importing torch fails, then stmt-segment with the arguments given
_WITHOUT_TORCH = """
import sys

class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported on the OpenVINO path: " + name)

sys.meta_path.insert(0, RefuseTorch())
from stmt_monai.cli import segment_main

segment_main(sys.argv[1:])
"""


def test_the_default_cpu_path_never_imports_torch(bundles, real_ct, tmp_path):
    """OpenVINO on the CPU runs on NumPy arrays only (torch is ~1.2 s of a process's start-up):
    once the first run has converted the networks (with torch) and cached them, a process that
    cannot import torch segments the case, with the same labels."""
    env = {**os.environ, "STMT_MONAI_CACHE": str(tmp_path / "cache")}
    common = ["--bundles_dir", str(bundles), "--backend", "openvino", "--threads", "1", "--progress", "False"]
    first = subprocess.run([sys.executable, "-m", "stmt_monai.cli", str(real_ct), str(tmp_path / "first"), *common], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, str(real_ct), str(tmp_path / "second"), *common], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((tmp_path / "second" / "abdomen_ct_3mm_report.json").read_text())
    assert report["cascade"]["backend"] == "openvino"
    a, b = (np.asarray(nib.load(tmp_path / run / "abdomen_ct_3mm.nii.gz").dataobj) for run in ("first", "second"))
    np.testing.assert_array_equal(a, b)


def test_missing_weights_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        segment_main(["x.nii.gz", str(tmp_path), "--bundles_dir", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert "not a stage bundle" in capsys.readouterr().err


def test_console_commands_are_declared_and_importable():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["stmt-segment"] == "stmt_monai.cli:segment_main"
    commands = ("stmt-prepare-data", "stmt-make-cohort", "stmt-evaluate", "stmt-efficiency", "stmt-export", "stmt-train-demo")
    assert set(commands) <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_commands_score_a_folder_and_say_what_is_wrong_in_one_line(real_organs, tmp_path, capsys):
    """stmt-evaluate on a prediction equal to the truth: DSC 100 %; a missing folder: exit 2, one line."""
    from stmt_monai.cli import evaluate_main

    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "case.nii.gz").write_bytes(real_organs.read_bytes())
    evaluate_main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--classes", "1,2", "--progress", "False"])
    out = capsys.readouterr().out
    assert "1 cases scored, 0 not scored" in out and "| 1 | liver | 100.00 | 100.00 |" in out
    assert (tmp_path / "pred" / "eval" / "per_case.csv").read_text().startswith("case,liver_dsc,right_kidney_dsc")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(tmp_path / "pred"), str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"stmt-evaluate: {tmp_path / 'missing'}: no such file or folder\n"


def _readme_main_job() -> list[str]:
    """The main-job command of README.md's set-up, as written (after ``&&``)."""
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if "stmt-segment stmt_monai/example_data" in line]
    assert lines, "README.md lost its main-job command"
    command = lines[0].split("&&")[-1].split()
    assert command[0] == ".venv/bin/stmt-segment"
    return command[1:]


@pytest.mark.slow
def test_readme_main_job_runs_with_the_shipped_demo_weights(real_ct, real_organs, tmp_path, monkeypatch):
    """README's main job, as written, with the demo weights shipped in bundles/*/models/demo.

    Floors: the demo networks (trained by stmt-train-demo on a synthetic cohort generated
    from this very CT, so this is no held-out score) gave liver DSC 0.95, kidneys 0.93, spleen
    0.93 against the CT's organ mask; 0.85 / 0.8 catch weights that do not load, a wrong
    network size in configs/demo.json, or a broken crop / restore (which give < 0.3)."""
    args = _readme_main_job()
    monkeypatch.chdir(REPO)
    out = tmp_path / args[1]
    with pytest.raises(SystemExit) as exit_status:  # the console script's own entry point and flag parsing
        segment_main([args[0], str(out), *args[2:]])
    assert exit_status.value.code == 0
    mask = nib.load(out / "abdomen_ct_3mm.nii.gz")
    image = nib.load(real_ct)
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert (out / "abdomen_ct_3mm_preview.png").stat().st_size > 10_000
    report = json.loads((out / "abdomen_ct_3mm_report.json").read_text())
    assert {stage["weights_kind"] for stage in report["cascade"]["stages"].values()} == {"demo"}
    labels, truth = np.asarray(mask.dataobj), np.asarray(nib.load(real_organs).dataobj)
    # stage 1 finds the abdomen: every organ voxel of the CT inside the region of interest, which crops
    roi = report["cascade"]["roi"]
    assert roi["found"] and roi_coverage(truth, image.affine, roi["start_voxel"], roi["end_voxel"]) == 1.0, roi
    assert np.prod(np.subtract(roi["end_voxel"], roi["start_voxel"])) < 0.6 * truth.size, roi  # 0.34 measured
    dsc = {c: 2 * ((labels == c) & (truth == c)).sum() / ((labels == c).sum() + (truth == c).sum()) for c in (1, 2, 3, 13)}
    assert dsc[1] > 0.85 and min(dsc.values()) > 0.8, dsc
