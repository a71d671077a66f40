"""Time and peak memory of the whole cascade per case, as FLARE measures it (not a test).

    python benchmarks/cascade_speed.py --threads 2                       # paper-size networks, torch
    python benchmarks/cascade_speed.py --threads 2 --backends torch,openvino
    python benchmarks/cascade_speed.py --slices 300 --repeats 1          # quicker

Cases: the shipped real CT (122 x 101 x 112, 3 mm) resampled (trilinear) to 512 x 512 x N
(N = 300 and 600 by default; same field of view, so about 0.7 x 0.6 x 1.1 mm at N = 300),
written as int16 NIfTI into ``--work_dir`` once. Networks: the paper's sizes (student Res-UNet,
16 base channels, 5 down-samplings; 128^3 stage 1, 192^3 stage 2), from copies of the three
stage bundles' configs with random weights (timing does not depend on the weights; the region
of interest does a little: the report gives the box each run used).

Each run is one new process (``python -m stmt_monai.cli CASE OUT --overwrite``), so the time
includes start-up, imports, model loading, reading, the three networks, post-processing,
restore, writing the mask and the report, as FLARE's "running time per case" does. Peak RSS
is the child's ``ru_maxrss`` and CPU time its user + system time (``os.wait4``). The per-step split comes from the case's report.
OpenVINO runs are preceded by one untimed run that converts and caches the IR (its cost is
printed), as a deployment would do once.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not
from stmt_monai.inference.bundles import STAGE_BUNDLES, random_weights
from stmt_monai.io import load_image, save_nifti  # noqa: E402
from stmt_monai.preprocessing.fingerprint import foreground_fingerprint
from stmt_monai.preprocessing.geometry import resize

EXAMPLE = REPO / "stmt_monai" / "example_data"
CT, ORGANS = EXAMPLE / "abdomen_ct_3mm.nii.gz", EXAMPLE / "abdomen_ct_3mm_organs.nii.gz"


def make_case(work_dir: Path, slices: int) -> Path:
    """The real CT resampled to 512 x 512 x ``slices`` (int16 NIfTI, same field of view)."""
    path = work_dir / "cases" / f"ct512x512x{slices}_0000.nii.gz"
    if path.exists():
        return path
    image, affine = load_image(CT)
    size = (512, 512, slices)
    resampled = resize(torch.from_numpy(image)[None], size, "trilinear")[0].round().clamp(-1024, 3071).to(torch.int16).numpy()
    scale = np.asarray(image.shape, float) / np.asarray(size, float)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale
    # keep the field of view: voxel corners stay where they were
    new_affine[:3, 3] = affine[:3, :3] @ (0.5 * scale - 0.5) + affine[:3, 3]
    save_nifti(path, resampled, new_affine)
    return path


def make_bundles(work_dir: Path) -> Path:
    """Copies of the stage bundles' configs (paper sizes) with random weights."""
    dest = work_dir / "bundles"
    if all((dest / name / "models" / "model.pt").exists() for name in STAGE_BUNDLES.values()):
        return dest
    fingerprint = foreground_fingerprint([(CT, ORGANS)])
    for seed, name in enumerate(STAGE_BUNDLES.values()):
        shutil.rmtree(dest / name, ignore_errors=True)
        shutil.copytree(REPO / "bundles" / name / "configs", dest / name / "configs", ignore=shutil.ignore_patterns("demo.json"))
        random_weights(dest / name, fingerprint, weights="trained", seed=seed)
    return dest


def run_case(case: Path, out: Path, bundles: Path, threads: int, backend: str, env: dict, device: str = "cpu") -> dict:
    """One process segmenting one case: wall time, peak RSS, the report's step times."""
    command = [sys.executable, "-m", "stmt_monai.cli", str(case), str(out), "--bundles_dir", str(bundles),
               "--threads", str(threads), "--backend", backend, "--device", device, "--overwrite", "--progress", "False"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    log = proc.stdout.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log[-3000:]}")
    report = json.loads((out / f"{case.name[:-12]}_report.json").read_text())
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
        "steps_s": {"load_models": report["cascade"]["load_seconds"], **report["cascade"]["timings_s"]},
        "roi": [report["cascade"]["roi"]["start_voxel"], report["cascade"]["roi"]["end_voxel"]],
    }


def main(
    work_dir: str = "/tmp/stmt_cascade_speed",
    slices: str | int | tuple = (300, 600),
    threads: int = 2,
    backends: str | tuple = "torch",
    repeats: int = 1,
    omp_passive: bool = False,
    device: str = "cpu",
    output: str | None = None,
) -> list[dict]:
    """Run the benchmark and print a markdown table.

    Args:
        work_dir: cases, bundles, outputs and the OpenVINO cache go here (kept between runs).
        slices: slice counts of the 512 x 512 x N cases.
        threads: CPU threads (``--threads`` of stmt-segment; also OMP/MKL thread variables).
        backends: ``torch`` and/or ``openvino``, comma-separated.
        repeats: timed runs per case and backend (the table shows the median time, max RSS).
        omp_passive: ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning,
            so the CPU time measures work even on a machine shared with other jobs (where the
            wall time does not).
        device: ``cpu`` or ``cuda`` (stmt-segment's ``--device``).
        output: also write the rows as JSON here.
    """
    work = Path(work_dir)
    slices = [int(s) for s in (slices.split(",") if isinstance(slices, str) else np.atleast_1d(slices))]
    backends = backends.split(",") if isinstance(backends, str) else list(backends)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "STMT_MONAI_CACHE": str(work / "cache")}
    if omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    bundles = make_bundles(work)
    rows = []
    for n in slices:
        case = make_case(work, n)
        for backend in backends:
            if backend == "openvino":
                start = time.perf_counter()
                run_case(case, work / "out", bundles, threads, backend, env, device)
                print(f"openvino warm-up (IR conversion, once per weights; cached): {time.perf_counter() - start:.1f} s", flush=True)
            runs = [run_case(case, work / "out", bundles, threads, backend, env, device) for _ in range(repeats)]
            row = {
                "case": f"512 x 512 x {n}",
                "backend": backend,
                "wall_s": float(np.median([r["wall_s"] for r in runs])),
                "cpu_s": float(np.median([r["cpu_s"] for r in runs])),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                "runs": runs,
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), json.dumps(runs[-1]["steps_s"]), flush=True)
    where = f"CPU ({platform.processor() or platform.machine()}), {threads} threads, load average {os.getloadavg()[0]:.1f} at the end"
    if device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(0)}, {threads} CPU threads"
    print("\n| case | backend | time per case (s) | CPU time (s) | peak RSS (GB) | device |\n| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['case']} | {row['backend']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['peak_rss_gb']:.2f} | {where} |")
    if output:
        Path(output).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
