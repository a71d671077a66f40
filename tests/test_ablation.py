"""benchmarks/ablation.py: the settings differ only by their method, and a tiny setting runs end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("ablation", None)


def test_settings_of_a_stage_differ_only_by_the_method(ablation):
    settings = ablation.student_settings(ablation.Params(), seed=3)
    for stage, methods in (("organ", ablation.ORGAN_METHODS), ("tumor", ablation.TUMOR_METHODS)):
        shared = [
            {k: v for k, v in settings[name].items() if k not in ablation.METHOD_KEYS} for name in methods
        ]
        assert all(s == shared[0] for s in shared), stage
        assert shared[0]["stage"] == stage and shared[0]["seed"] == 3
        # ... and each method is a different one
        method_parts = [json.dumps({k: settings[name].get(k) for k in ablation.METHOD_KEYS}, sort_keys=True) for name in methods]
        assert len(set(method_parts)) == len(methods)
    # the paper's methods: FSO / nnU-Net supervised on one stream, self-training adds CPL then PL;
    # FST is the mean-teacher trainer with lambda 0, the mean teacher lambda 1 scored by its EMA teacher
    assert settings["fso"]["streams"] == settings["organ_nnunet"]["streams"] == ["labelled"]
    assert settings["st_partial"]["streams"] == ["labelled", "cpl"]
    assert settings["st_partial_unlabelled"]["streams"] == ["labelled", "cpl", "pl"]
    assert settings["fst"]["lambda_cpl"] == 0.0 and settings["mean_teacher"]["lambda_cpl"] == 1.0
    assert settings["mean_teacher"]["network"] == "teacher" and settings["fst"]["network"] == "student"
    # every table row is built from settings that exist, StMt from the two semi-supervised ones
    for organ, tumor in ablation.ROWS.values():
        assert organ in (None, *ablation.ORGAN_METHODS) and tumor in (None, *ablation.TUMOR_METHODS)
    assert ablation.ROWS["StMt"] == ("st_partial_unlabelled", "mean_teacher")


TINY = dict(
    num_labelled=6,
    num_unlabelled=0,
    num_test=1,
    cohort_size=32,
    fully_share=0.34,
    spatial_size=16,
    base_channels=4,
    num_downsamplings=2,
    epochs=1,
    iterations=1,
    num_workers=0,
)


@pytest.mark.slow
def test_one_tiny_setting_runs_end_to_end_and_resumes(ablation, tmp_path):
    start = time.perf_counter()
    results = ablation.run(work_dir=str(tmp_path), seeds=1, settings="fso", output=str(tmp_path / "table.md"), **TINY)
    assert time.perf_counter() - start < 30
    row = results["rows"]["0"]["FSO"]
    assert 0.0 <= row["organ_dsc"] <= 1.0 and 0.0 <= row["organ_nsd"] <= 1.0
    assert row["tumor_dsc"] is None  # an organ-only row scores organs only
    assert set(results["rows"]["0"]) == {"FSO"}
    record = json.loads((tmp_path / "seed0" / "fso" / "result.json").read_text())
    assert record["setting"]["streams"] == ["labelled"] and record["num_training_cases"] >= 1
    assert len(list((tmp_path / "seed0" / "fso" / "pred_student").glob("*.nii.gz"))) == 1
    table = (tmp_path / "table.md").read_text()
    assert "| FSO |" in table and "87.86 / 94.27" in table
    # a rerun with the same settings reuses the trained student
    weights = tmp_path / "seed0" / "fso" / "student.pt"
    mtime = weights.stat().st_mtime_ns
    again = ablation.run(work_dir=str(tmp_path), seeds=1, settings="fso", **TINY)
    assert weights.stat().st_mtime_ns == mtime
    assert again["rows"]["0"]["FSO"]["organ_dsc"] == pytest.approx(row["organ_dsc"])
