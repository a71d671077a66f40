"""FLARE-style efficiency: known sleeps, allocations and CPU work measured by one process each;
the GPU (NVML) path where a device is present."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stmt_monai.evaluation.efficiency import (
    EFFICIENCY_CSV,
    SUMMARY_CSV,
    SUMMARY_MD,
    GPUUnavailable,
    NvmlMemory,
    case_command,
    measure_command,
    measure_folder,
)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# allocate and touch 300 MB (a bytes repeat writes every page), hold it for 0.5 s
ALLOCATE_300MB = "import time; block = b'x' * (300 * 2**20); time.sleep(0.5)"


def _python(code: str) -> list[str]:
    return [PY, "-c", code]


def test_sleep_wall_time():
    result = measure_command(_python("import time; time.sleep(1.0)"), gpu=False)
    assert result["wall_s"] == pytest.approx(1.0, abs=0.3)
    assert result["cpu_s"] < 0.5
    assert result["returncode"] == 0 and not result["timed_out"]


def test_peak_rss_of_an_allocation():
    result = measure_command(_python(ALLOCATE_300MB), gpu=False)
    assert 300 <= result["peak_rss_mb"] < 600
    assert result["maxrss_mb"] >= 300  # kernel cross-check (reads high by the parent's size)


def test_process_tree_memory_and_cpu():
    """A wrapper that starts the real work as a child: the grandchild's memory and CPU count."""
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    wrapper = (
        "import subprocess, sys\n"
        f"for code in ({ALLOCATE_300MB!r}, {busy!r}): subprocess.run([sys.executable, '-c', code])"
    )
    result = measure_command(_python(wrapper), gpu=False)
    assert 300 <= result["peak_rss_mb"] < 600
    assert result["cpu_s"] >= 0.6


def test_exit_status_and_timeout():
    assert measure_command(_python("raise SystemExit(3)"), gpu=False)["returncode"] == 3
    result = measure_command(_python("import time; time.sleep(30)"), gpu=False, timeout_s=0.5)
    assert result["timed_out"] and result["returncode"] != 0
    assert result["wall_s"] < 2


def test_case_command_placeholders():
    argv = case_command('seg --in {input} --out "{output}/{case}.nii.gz" -c "x = {1: 2}"', "/d/a_0000.nii.gz", "/o u")
    assert argv == ["seg", "--in", "/d/a_0000.nii.gz", "--out", "/o u/a.nii.gz", "-c", "x = {1: 2}"]


def test_measure_folder(tmp_path):
    """One process per case; a failing case is measured and listed; CSVs and the CLI."""
    inputs, outputs = tmp_path / "ct", tmp_path / "out"
    inputs.mkdir()
    for case in ("case_a", "case_b"):
        (inputs / f"{case}_0000.nii.gz").write_bytes(b"stand-in CT")
    (inputs / "readme.txt").write_text("not a case")
    # copies the input to {output}/{case}.nii.gz after 0.2 s; fails for case_b
    script = (
        "import shutil, sys, time; time.sleep(0.2); src, out, case = sys.argv[1:]; "
        "shutil.copy(src, out + '/' + case + '.nii.gz'); sys.exit(case == 'case_b')"
    )
    template = f'{PY} -c "{script}" {{input}} {{output}} {{case}}'
    rows, summary = measure_folder(template, inputs, outputs, gpu=False, progress=False)
    assert [r["case"] for r in rows] == ["case_a", "case_b"]
    assert [r["returncode"] for r in rows] == [0, 1]
    assert all(0.2 <= r["wall_s"] < 1.5 for r in rows)
    assert (outputs / "case_a.nii.gz").read_bytes() == b"stand-in CT"
    assert summary["num_cases"] == 2 and summary["num_failed"] == 1 and summary["over_time_limit"] == 0
    with open(outputs / EFFICIENCY_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == ["case_a", "case_b"] and float(table[0]["wall_s"]) >= 0.2
    assert (outputs / SUMMARY_CSV).exists() and (outputs / "logs" / "case_a.log").exists()
    assert "- case_b: exit status 1" in (outputs / SUMMARY_MD).read_text()

    report = tmp_path / "report"
    cli = [str(Path(PY).with_name("stmt-efficiency")), template, str(inputs), str(outputs), f"--report_dir={report}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "| wall_s |" in result.stdout and "2 cases, 1 failed" in result.stdout
    assert (report / EFFICIENCY_CSV).exists()


def _gpu() -> NvmlMemory:
    try:
        return NvmlMemory()
    except GPUUnavailable as err:
        pytest.skip(f"GPU path not exercised: {err}")


def test_gpu_memory_sampled_with_nvml():
    """Total-minus-free samples every 0.1 s: max and AUC = sum x 0.1 (a 1 GiB tensor if torch sees CUDA)."""
    gpu = _gpu()
    try:
        baseline = gpu.used_mb()
    finally:
        gpu.close()
    code = (
        "import time, torch\n"
        "if torch.cuda.is_available():\n"
        "    x = torch.ones(2**28, device='cuda'); torch.cuda.synchronize()\n"
        "time.sleep(1.0)"
    )
    cuda = subprocess.run(_python("import torch; print(torch.cuda.is_available())"), capture_output=True, text=True)
    result = measure_command(_python(code), gpu=True)
    assert result["gpu_samples"] == pytest.approx(result["wall_s"] / 0.1, abs=3)
    assert result["gpu_max_mb"] > 0
    # AUC = sum of samples x 0.1 lies between (samples x 0.1) x the smallest and the largest sample
    assert result["gpu_auc_mb_s"] <= result["gpu_max_mb"] * result["gpu_samples"] * 0.1 + 1e-6
    if cuda.stdout.strip() == "True":
        assert result["gpu_max_mb"] >= baseline + 1024  # the 1 GiB tensor, plus the CUDA context


class _TraceGPU(NvmlMemory):
    """A made-up device-memory trace in place of NVML: 100, 400, 900, ... MB, one value a sample."""

    def __init__(self):  # no NVML: the samples come from the trace
        self.samples: list[float] = []

    def used_mb(self) -> float:
        self.samples.append(100.0 * (len(self.samples) + 1) ** 2)
        return self.samples[-1]

    def close(self) -> None:
        pass


def test_gpu_auc_is_the_sum_of_samples_times_the_poll_interval():
    """FLARE's area under the GPU memory curve: sum of the 0.1 s samples x 0.1 s, and the maximum
    sample, on a made-up trace (whatever number of samples the run's length gives)."""
    trace = _TraceGPU()
    result = measure_command(_python("import time; time.sleep(0.5)"), gpu=trace, poll_interval=0.1)
    assert result["gpu_samples"] == len(trace.samples) >= 2
    assert result["gpu_auc_mb_s"] == pytest.approx(0.1 * sum(trace.samples), rel=1e-12)
    assert result["gpu_max_mb"] == max(trace.samples) == trace.samples[-1]
