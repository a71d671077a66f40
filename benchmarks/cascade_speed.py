"""Time, CPU time and peak memory of the whole cascade per case, as FLARE measures it (not a test).

    python benchmarks/cascade_speed.py                      # the issue's table: 512 x 512 x 300 and x 600,
                                                            # torch fp32, OpenVINO f32, default, int8; paper-size networks
    python benchmarks/cascade_speed.py --quick              # the same end to end at toy size (about a minute)
    python benchmarks/cascade_speed.py --configs default,int8 --slices 300 --output rows.json
    python benchmarks/cascade_speed.py --configs "default,outside tumors" --repeats 3   # the optional step's cost

What it prints, in one run:

- the machine: CPU model, its SIMD flags that matter (AVX2, AVX-512, VNNI, BF16, AMX), OpenVINO's
  ``OPTIMIZATION_CAPABILITIES`` and the precision ``--precision auto`` picks on it;
- one-time costs: the int8 export (NNCF calibration, :func:`stmt_monai.inference.export.export_int8`)
  and each configuration's first run (OpenVINO IR conversion and compilation, cached on disk);
- per case size and configuration: the whole process's wall time (one new ``stmt-segment``
  process per case: start-up, imports, model loading, reading, the three networks,
  post-processing, restore, writing the mask and the report, as FLARE's "running time per case"),
  its CPU time (user + system) and peak RSS (``os.wait4``), the per-case time in a batch (one
  process segmenting ``--batch`` copies of the case; the time between consecutive cases once
  running) and the step split (start-up = wall time - model loading - the case's steps);
- agreement of each configuration's label map with torch fp32 on the same case (share of equal
  voxels, over the whole volume and over the voxels either labels), at paper size: bf16 / int8
  against fp32.

Cases: the shipped real CT (122 x 101 x 112, 3 mm) resampled (trilinear) to 512 x 512 x N (same
field of view), int16 NIfTI, written into ``--work_dir`` once. Networks: the paper's sizes
(student Res-UNet, 16 base channels, 5 down-samplings; 128^3 stage 1, 192^3 stage 2), copies of
the three stage bundles' configs with random weights (timing does not depend on the weights; the
region of interest does a little: the rows give the box each run used). ``--quick``: 96 x 96 x N
cases and the reduced demo networks (8 channels, 4 down-samplings, 48^3 / 64^3), random weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np

from stmt_monai.evaluation.efficiency import measure_command
from stmt_monai.inference.backends import cpu_flags, cpu_model, cpu_precision, openvino_available
from stmt_monai.inference.batch import output_paths
from stmt_monai.inference.bundles import STAGE_BUNDLES, random_weight_bundles
from stmt_monai.io import load_image, load_label, save_nifti
from stmt_monai.preprocessing.fingerprint import foreground_fingerprint
from stmt_monai.preprocessing.geometry import resample_to_shape

EXAMPLE = Path(__file__).resolve().parents[1] / "stmt_monai" / "example_data"
CT, ORGANS = EXAMPLE / "abdomen_ct_3mm.nii.gz", EXAMPLE / "abdomen_ct_3mm_organs.nii.gz"
#: configuration -> stmt-segment arguments
CONFIGS = {
    "torch fp32": ["--backend", "torch"],
    "openvino f32": ["--backend", "openvino", "--precision", "f32"],
    "default": [],
    "int8": ["--backend", "openvino", "--precision", "int8"],
    # not in the paper, off by default: the tumor network once more over the whole volume
    "outside tumors": ["--outside_tumors", "True"],
}
#: CPU flags that decide the OpenVINO precision and speed
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
#: the case's steps in the report (``cascade.timings_s``), in order, then the report and exit
STEPS = ("read", "stage1", "stage2_input", "organ", "tumor", "outside_tumors", "restore", "write", "report_and_exit")


def machine() -> dict:
    """CPU model, cores, the flags of :data:`FLAGS` it has, OpenVINO's version, its CPU
    ``OPTIMIZATION_CAPABILITIES`` and the precision ``--precision auto`` picks."""
    flags = cpu_flags()
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]}
    if openvino_available():
        import openvino as ov

        capabilities = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        info.update(openvino=ov.__version__, openvino_capabilities=capabilities, auto_precision=cpu_precision(capabilities, flags))
    return info


def make_case(work_dir: Path, slices: int, side: int = 512) -> Path:
    """The real CT resampled to ``side`` x ``side`` x ``slices`` (int16 NIfTI, same field of view)."""
    path = work_dir / "cases" / f"ct{side}x{side}x{slices}_0000.nii.gz"
    if not path.exists():
        image, affine = load_image(CT)
        resampled, new_affine = resample_to_shape(image, affine, (side, side, slices))
        save_nifti(path, np.clip(np.round(resampled), -1024, 3071).astype(np.int16), new_affine)
    return path


def make_bundles(work_dir: Path, quick: bool = False) -> tuple[Path, str]:
    """Copies of the stage bundles' configs with random weights: the paper's sizes (``trained``),
    or with ``quick`` the reduced demo networks (``demo``). Returns the folder and the weights kind."""
    dest, weights = work_dir / "bundles", "demo" if quick else "trained"
    model = "models/demo/model.pt" if quick else "models/model.pt"
    if not all((dest / name / model).exists() for name in STAGE_BUNDLES.values()):
        random_weight_bundles(dest, foreground_fingerprint([(CT, ORGANS)]), weights=weights)
    return dest, weights


def _segment_command(inputs: Path, out: Path, bundles: Path, weights: str, threads: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "stmt_monai.cli", str(inputs), str(out), "--bundles_dir", str(bundles), "--weights", weights,
            "--threads", str(threads), "--overwrite", "--progress", "False", *args]  # fmt: skip


def run_case(case: Path, out: Path, bundles: Path, weights: str, threads: int, args: list[str], env: dict) -> dict:
    """One new process segmenting one case (:func:`stmt_monai.evaluation.efficiency.measure_command`):
    wall and CPU time, peak RSS, the report's step times (start-up = wall - load - steps), the
    box, the backend and precision that ran, the mask."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{case.name}.log"
    measured = measure_command(_segment_command(case, out, bundles, weights, threads, args), gpu=False, log_path=log, env=env)
    if measured["returncode"]:
        raise RuntimeError(f"stmt-segment {case} {' '.join(args)} failed:\n{log.read_text(errors='replace')[-3000:]}")
    paths = output_paths(case, out)  # stmt-segment's own naming of a case's outputs
    cascade = json.loads(paths["report_json"].read_text())["cascade"]
    steps = {"load_models": cascade["load_seconds"], **cascade["timings_s"]}
    # stmt-segment records its start-up (Python, imports) before loading; the rest of the wall
    # time is the report, written after its own timings, and the process's exit
    start_up = cascade.get("start_up_seconds")
    rest = measured["wall_s"] - sum(steps.values())
    steps["start_up"] = rest if start_up is None else start_up
    steps["report_and_exit"] = 0.0 if start_up is None else max(rest - start_up, 0.0)
    return {
        "wall_s": measured["wall_s"],
        "cpu_s": measured["cpu_s"],
        # the process tree's resident memory sampled every 0.1 s (as FLARE samples); the kernel's
        # high-water mark would count this benchmark's own memory at the fork (over 1 GB here)
        "peak_rss_gb": measured["peak_rss_mb"] * 2**20 / 1e9,
        "steps_s": steps,
        "roi": [cascade["roi"]["start_voxel"], cascade["roi"]["end_voxel"]],
        "backend": cascade["backend"],
        "precision": cascade["precision"],
        "mask": str(paths["mask"]),
    }


def run_batch(case: Path, batch: int, work_dir: Path, bundles: Path, weights: str, threads: int, args: list[str], env: dict) -> float:
    """Seconds per case once a process runs: one process segments ``batch`` copies of the case;
    the time between its first and last mask, over ``batch - 1``."""
    inputs, out = work_dir / "batch" / f"in_{case.name}", work_dir / "batch" / "out"
    inputs.mkdir(parents=True, exist_ok=True)
    for i in range(batch):
        copy = inputs / f"copy{i}_0000.nii.gz"
        if not copy.exists():
            shutil.copyfile(case, copy)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / "batch.log"
    measured = measure_command(_segment_command(inputs, out, bundles, weights, threads, args), gpu=False, log_path=log, env=env)
    if measured["returncode"]:
        raise RuntimeError(f"stmt-segment batch {' '.join(args)} failed:\n{log.read_text(errors='replace')[-3000:]}")
    written = sorted(p.stat().st_mtime for p in out.glob("copy*.nii.gz"))
    return (written[-1] - written[0]) / (len(written) - 1)


def _median_and_range(median: float, runs: list[float]) -> str:
    """``"14.6"`` for one run, ``"14.6 (14.1-15.3)"`` (median, fastest-slowest) for several."""
    return f"{median:.1f}" if len(runs) < 2 else f"{median:.1f} ({min(runs):.1f}-{max(runs):.1f})"


def agreement(mask: str | Path, reference: str | Path) -> dict:
    """Share of equal voxels of two label maps: over the whole volume and over the voxels that
    either labels (> 0)."""
    a, _ = load_label(mask)
    b, _ = load_label(reference, a.shape)
    labelled = (a > 0) | (b > 0)
    return {"all_voxels": float((a == b).mean()), "labelled_voxels": float((a == b)[labelled].mean()) if labelled.any() else 1.0}


def main(
    work_dir: str = "/tmp/stmt_cascade_speed",
    slices: str | int | tuple = (300, 600),
    configs: str | tuple = ("torch fp32", "openvino f32", "default", "int8"),
    threads: int = 2,
    repeats: int = 1,
    batch: int = 3,
    quick: bool = False,
    output: str | None = None,
) -> list[dict]:
    """Run the benchmark and print the machine, the one-time costs and a markdown table.

    Args:
        work_dir: cases, bundles, outputs, the int8 models and the OpenVINO cache (kept between runs).
        slices: slice counts of the 512 x 512 x N cases (``--quick``: 96 x 96 x N; default 40, 60).
        configs: comma-separated names of :data:`CONFIGS` (default: all but ``outside tumors``,
            the optional step ``docs/outside_roi_tumors.md`` times against ``default``).
        threads: CPU threads (``--threads`` of stmt-segment; also OMP / MKL thread variables).
        repeats: timed single-case processes per case and configuration (median time and step times, max RSS).
        batch: cases in the batch run (its per-case time); 0 skips it.
        quick: toy size end to end: 96 x 96 x N cases and the reduced demo networks.
        output: also write the rows as JSON here.
    """
    work = Path(work_dir) / ("quick" if quick else "paper")
    work.mkdir(parents=True, exist_ok=True)
    if quick and slices == (300, 600):
        slices = (40, 60)
    slices = [int(s) for s in (slices.split(",") if isinstance(slices, str) else np.atleast_1d(slices))]
    configs = configs.split(",") if isinstance(configs, str) else list(configs)
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "STMT_MONAI_CACHE": str(work / "cache")}
    os.environ["STMT_MONAI_CACHE"] = env["STMT_MONAI_CACHE"]  # the int8 export below uses the same cache
    info = machine()
    print("machine:", json.dumps(info), flush=True)
    bundles, weights = make_bundles(work, quick)
    one_time = {}
    if "int8" in configs:
        start = time.perf_counter()
        calibration = 1 if quick else 3
        # in a child process: this one stays small (the child processes' memory starts from it)
        code = "import sys; from stmt_monai.inference.export import export_int8; export_int8(sys.argv[1], sys.argv[2], threads=int(sys.argv[3]), num_cases=int(sys.argv[4]))"
        exported = subprocess.run([sys.executable, "-c", code, str(bundles), weights, str(threads), str(calibration)], env=env)
        one_time[f"int8 export (NNCF, calibrated on the shipped CT + {calibration} generated cases)"] = time.perf_counter() - start
        if exported.returncode:  # the other rows still come
            print(f"int8 export failed (exit {exported.returncode}, its output above): no int8 rows", flush=True)
            configs.remove("int8")
    rows = []
    for n in slices:
        case = make_case(work, n, side=96 if quick else 512)
        label = f"{96 if quick else 512} x {96 if quick else 512} x {n}"
        masks = {}
        for config in configs:
            args = CONFIGS[config]
            out = work / "out" / config.replace(" ", "_")
            if n == slices[0]:  # first run: converts and compiles once (cached), as a deployment does once
                start = time.perf_counter()
                run_case(case, out, bundles, weights, threads, args, env)
                one_time[f"{config}: first run (conversion, compilation; cached)"] = time.perf_counter() - start
            runs = [run_case(case, out, bundles, weights, threads, args, env) for _ in range(repeats)]
            masks[config] = runs[-1]["mask"]
            row = {
                "case": label,
                "config": config,
                "backend": runs[-1]["backend"],
                "precision": runs[-1]["precision"],
                "wall_s": float(np.median([r["wall_s"] for r in runs])),
                "cpu_s": float(np.median([r["cpu_s"] for r in runs])),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                "batch_per_case_s": run_batch(case, batch, work, bundles, weights, threads, args, env) if batch > 1 else None,
                "steps_s": {step: float(np.median([r["steps_s"][step] for r in runs])) for step in runs[-1]["steps_s"]},
                "wall_s_runs": [round(r["wall_s"], 2) for r in runs],
                "roi": runs[-1]["roi"],
            }
            # keep the mask: the agreement is measured against the fp32 one once all have run
            kept = work / "masks" / f"{n}_{config.replace(' ', '_')}.nii.gz"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(masks[config], kept)
            masks[config] = str(kept)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "steps_s"}), json.dumps({k: round(v, 2) for k, v in row["steps_s"].items()}), flush=True)
        reference = masks.get("torch fp32") or masks.get("openvino f32")
        for row in rows[-len(configs) :]:
            if reference is not None:
                row["agreement_with_fp32"] = agreement(masks[row["config"]], reference)
    print("\nmachine:", info["cpu"], f"({info['cores']} cores; flags {', '.join(info['flags']) or 'none of ' + ', '.join(FLAGS)});",
          f"OpenVINO {info.get('openvino', 'not installed')} capabilities {info.get('openvino_capabilities')}, auto precision {info.get('auto_precision')};",
          f"{threads} threads; load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print("one-time costs:", "; ".join(f"{k} {v:.1f} s" for k, v in one_time.items()))
    header = ["case", "config", "backend / precision", "whole process (s; median (range) of the repeats)", "CPU (s)", "peak RSS (GB)", "per case in a batch (s)",
              "equal voxels vs fp32 (all / labelled)", "start-up", "load", *STEPS]  # fmt: skip
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        agree = row.get("agreement_with_fp32")
        cells = [
            row["case"], row["config"], f"{row['backend']} / {row['precision']}", _median_and_range(row["wall_s"], row["wall_s_runs"]), f"{row['cpu_s']:.1f}",
            f"{row['peak_rss_gb']:.2f}", "-" if row["batch_per_case_s"] is None else f"{row['batch_per_case_s']:.1f}",
            "-" if agree is None else f"{100 * agree['all_voxels']:.3f} % / {100 * agree['labelled_voxels']:.2f} %",
            f"{row['steps_s']['start_up']:.2f}", f"{row['steps_s']['load_models']:.2f}", *(f"{row['steps_s'].get(s, 0.0):.2f}" for s in STEPS),
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if output:
        Path(output).write_text(json.dumps({"machine": info, "one_time_s": one_time, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
