"""Seconds per case: the StMt cascade against nnU-Net v2's default inference, same case, same machine.

    python benchmarks/speed_vs_nnunet.py --nnunet_python /work/nnunet-venv/bin/python --threads 2

nnU-Net is a benchmark dependency only, in its own environment (never a runtime dependency of
``stmt_monai``)::

    python3 -m venv /work/nnunet-venv
    /work/nnunet-venv/bin/pip install torch==2.13.0 nnunetv2    # CPU torch wheel; nnunetv2 2.8.1

The case: the shipped real CT (``stmt_monai/example_data/abdomen_ct_3mm.nii.gz``, 122 x 101 x 112
at 3 mm) resampled over its own field of view to 512 x 512 x 300 voxels (trilinear, int16 HU),
the size of a typical FLARE abdominal CT; the organ mask beside it is resampled the same way
(nearest) so nnU-Net's fingerprint has foreground.

nnU-Net side (run by ``--nnunet_python`` in a subprocess: this same file, ``_nnunet_worker``):

1. a one-case ``nnUNet_raw`` dataset of that case with the 15 FLARE23 labels; nnU-Net's own
   ``DatasetFingerprintExtractor`` and default ``ExperimentPlanner`` (plain U-Net, 8 GB target)
   plan ``3d_fullres`` for it: target spacing = the case's own spacing (the median of a
   one-case dataset) unless ``--nnunet_target_spacing`` overrides it (e.g. FLARE's
   ``2.5,0.8,0.8``, z first as nnU-Net orders axes);
2. the planned network from ``get_network_from_plans`` with random weights, inside an
   ``nnUNetPredictor`` (step 0.5, Gaussian weighting, mirroring over the 3 axes on or off);
3. measured for real: start-up (imports, planning files read, network built), nnU-Net's
   preprocessing of the case (read, crop, CT normalisation, resampling to the target
   spacing), the final logits division, and the export (softmax / argmax back to the original
   geometry, NIfTI written) of a full-size logits array;
4. measured on a subset and extrapolated: the sliding window. ``patches`` patches (and
   ``mirrored_patches`` with the 8 mirrored forward passes) are run exactly as nnU-Net's loop
   does (forward, Gaussian weighting, accumulation into the full-size half-precision logits),
   the median seconds per patch times nnU-Net's own patch count
   (``_internal_get_sliding_window_slicers``, i.e. ``compute_steps_for_sliding_window``).

Cascade side: the ``stmt-segment`` command as a user runs it (default backend and precision),
one whole fresh process per run on the same file (start-up, model loading, both stages, the
label map and the per-case report written), with copies of the three bundles at the paper's
sizes (128^3 stage 1, 192^3 stage 2, 16 base channels) holding random weights. A first run
converts and caches the compiled models (its time is reported apart); the table gives the
median of the timed runs after it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CT = ROOT / "stmt_monai" / "example_data" / "abdomen_ct_3mm.nii.gz"
EXAMPLE_ORGANS = ROOT / "stmt_monai" / "example_data" / "abdomen_ct_3mm_organs.nii.gz"
#: the case size the issue asks for (voxels, file axis order)
CASE_SHAPE = (512, 512, 300)
NNUNET_DATASET_ID = 999
NNUNET_DATASET_NAME = f"Dataset{NNUNET_DATASET_ID:03d}_StMtSpeedCase"


# ----------------------------------------------------------------------------- nnU-Net worker
def _nnunet_worker(config_file: str) -> None:
    """Plan, build and time nnU-Net's default 3d_fullres inference; runs under nnU-Net's own Python.

    Imports only nnU-Net's environment (numpy, torch, nnunetv2), never ``stmt_monai``.

    Args:
        config_file: JSON with ``work_dir``, ``case``, ``label_file``, ``labels`` (name -> int),
            ``threads``, ``patches``, ``mirrored_patches``, ``target_spacing`` (list or null),
            ``time_export`` and ``out_json`` (where the measurements go).
    """
    started = time.perf_counter()
    cfg = json.loads(Path(config_file).read_text())
    work = Path(cfg["work_dir"])
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[var] = str(work / sub)  # read by nnunetv2.paths at import
        (work / sub).mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import_s, import_cpu_s = time.perf_counter() - started, time.process_time()
    result: dict = {"nnunetv2_version": _version("nnunetv2"), "torch": torch.__version__, "threads": torch.get_num_threads()}

    # --- the one-case raw dataset, its fingerprint and nnU-Net's default plan (training-time work, not timed per case)
    raw = work / "raw" / NNUNET_DATASET_NAME
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    image_file, label_file = raw / "imagesTr" / "case_0000.nii.gz", raw / "labelsTr" / "case.nii.gz"
    for src, dst in ((cfg["case"], image_file), (cfg["label_file"], label_file)):
        dst.unlink(missing_ok=True)
        dst.symlink_to(Path(src).resolve())
    dataset_json = {"channel_names": {"0": "CT"}, "labels": cfg["labels"], "numTraining": 1, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    t = time.perf_counter()
    DatasetFingerprintExtractor(NNUNET_DATASET_ID, num_processes=1).run(overwrite_existing=True)
    spacing = cfg["target_spacing"]
    planner = ExperimentPlanner(NNUNET_DATASET_ID, overwrite_target_spacing=None if spacing is None else [float(s) for s in spacing])
    plans = planner.plan_experiment()
    result["planning_s"] = time.perf_counter() - t
    cpu = time.process_time()

    # --- start-up as a prediction run has it: plans read, network built, predictor ready
    t = time.perf_counter()
    plans_manager = PlansManager(plans)
    config = plans_manager.get_configuration("3d_fullres")
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = get_network_from_plans(
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        1,
        label_manager.num_segmentation_heads,
        allow_init=True,
        deep_supervision=False,
    ).eval()
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.manual_initialization(
        network, plans_manager, config, [network.state_dict()], dataset_json, "nnUNetTrainer", (0, 1, 2)
    )
    result["startup_s"] = import_s + time.perf_counter() - t
    result["startup_cpu_s"] = import_cpu_s + time.process_time() - cpu
    result["plan"] = {
        "network": config.network_arch_class_name.rsplit(".", 1)[-1],
        "features_per_stage": list(config.network_arch_init_kwargs["features_per_stage"]),
        "n_stages": config.network_arch_init_kwargs["n_stages"],
        "patch_size": list(config.patch_size),
        "spacing": [round(float(s), 4) for s in config.spacing],
        "batch_size": config.batch_size,
        "num_segmentation_heads": label_manager.num_segmentation_heads,
        "params_M": sum(p.numel() for p in network.parameters()) / 1e6,
    }

    # --- preprocessing, measured for real (what predict_from_files does per case before the network)
    t, cpu = time.perf_counter(), time.process_time()
    preprocessor = config.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case([str(image_file)], None, plans_manager, config, dataset_json)
    data = torch.from_numpy(data).to(torch.float32)
    result["preprocess_s"] = time.perf_counter() - t
    result["preprocess_cpu_s"] = time.process_time() - cpu
    result["preprocessed_shape"] = list(data.shape[1:])

    # --- the sliding window: nnU-Net's own slicers; a subset of patches timed with its loop body
    slicers = predictor._internal_get_sliding_window_slicers(data.shape[1:])
    result["num_patches"] = len(slicers)
    with torch.inference_mode():
        predicted_logits = torch.zeros((label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half)
        n_predictions = torch.zeros(data.shape[1:], dtype=torch.half)
        gaussian = compute_gaussian(tuple(config.patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))

        def one_patch(sl, mirroring: bool) -> tuple[float, float]:
            predictor.use_mirroring = mirroring
            start, cpu = time.perf_counter(), time.process_time()
            workon = torch.clone(data[sl][None], memory_format=torch.contiguous_format)
            prediction = predictor._internal_maybe_mirror_and_predict(workon)[0]
            prediction *= gaussian
            predicted_logits[sl] += prediction
            n_predictions[sl[1:]] += gaussian
            return time.perf_counter() - start, time.process_time() - cpu

        # patches spread over the volume (the cost of a dense convolution does not depend on content)
        def spread(n: int) -> list:
            idx = np.linspace(0, len(slicers) - 1, max(n, 1)).round().astype(int)
            return [slicers[i] for i in idx]

        # no untimed warm-up: the first patch is one of the run's own, and the median is used
        plain = [one_patch(sl, False) for sl in spread(cfg["patches"])]
        mirrored = [one_patch(sl, True) for sl in spread(cfg["mirrored_patches"])] if cfg["mirrored_patches"] else []
        result["patch_s"] = {"no_mirroring": [w for w, _ in plain], "mirroring": [w for w, _ in mirrored]}
        result["patch_cpu_s"] = {"no_mirroring": [c for _, c in plain], "mirroring": [c for _, c in mirrored]}

        t, cpu = time.perf_counter(), time.process_time()
        torch.div(predicted_logits, n_predictions, out=predicted_logits)
        torch.any(torch.isinf(predicted_logits))
        result["finalize_s"] = time.perf_counter() - t
        result["finalize_cpu_s"] = time.process_time() - cpu

        if cfg["time_export"]:
            t, cpu = time.perf_counter(), time.process_time()
            segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
                predicted_logits, plans_manager, config, label_manager, properties, return_probabilities=False
            )
            rw = plans_manager.image_reader_writer_class()
            rw.write_seg(segmentation, str(work / "nnunet_prediction.nii.gz"), properties)
            result["export_s"] = time.perf_counter() - t
            result["export_cpu_s"] = time.process_time() - cpu
    Path(cfg["out_json"]).write_text(json.dumps(result, indent=1))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------- the case
def make_case(work_dir: Path, shape: tuple[int, int, int] = CASE_SHAPE) -> tuple[Path, Path]:
    """Resample the shipped real CT (and its organ mask) over the same field of view to ``shape``.

    Args:
        work_dir: folder for ``case_512x512x300.nii.gz`` (int16 HU) and its label file (uint8).
        shape: output voxels in the file's axis order.

    Returns:
        ``(ct_path, label_path)``; the affine keeps the field of view (voxel-centre convention of
        ``align_corners=False``), so the spacing is ``3 mm * old / new`` per axis.
    """
    from stmt_monai.io import load_image, load_label, save_nifti
    from stmt_monai.preprocessing.geometry import resample_to_shape

    work_dir.mkdir(parents=True, exist_ok=True)
    name = "x".join(str(s) for s in shape)
    ct_path, label_path = work_dir / f"case_{name}.nii.gz", work_dir / f"case_{name}_organs.nii.gz"
    if ct_path.exists() and label_path.exists():
        return ct_path, label_path
    ct, affine = load_image(EXAMPLE_CT)
    labels, _ = load_label(EXAMPLE_ORGANS, ct.shape, affine)
    resampled, new_affine = resample_to_shape(ct, affine, shape)
    save_nifti(ct_path, np.round(resampled).astype(np.int16), new_affine)
    save_nifti(label_path, resample_to_shape(labels, affine, shape, labels=True)[0], new_affine, dtype=np.uint8)
    return ct_path, label_path



# ----------------------------------------------------------------------------- the two sides
def run_nnunet(
    nnunet_python: str,
    ct_path: Path,
    label_path: Path,
    work_dir: Path,
    threads: int,
    patches: int,
    mirrored_patches: int,
    target_spacing: list[float] | None,
    time_export: bool,
) -> dict:
    """Run :func:`_nnunet_worker` under nnU-Net's interpreter; returns its measurements (seconds)."""
    from stmt_monai.labels import ALL_CHANNELS

    config = {
        "work_dir": str(work_dir / "nnunet"),
        "case": str(ct_path),
        "label_file": str(label_path),
        "labels": {name: number for number, name in ALL_CHANNELS.items()},
        "threads": threads,
        "patches": patches,
        "mirrored_patches": mirrored_patches,
        "target_spacing": target_spacing,
        "time_export": time_export,
        "out_json": str(work_dir / "nnunet_result.json"),
    }
    config_file = work_dir / "nnunet_config.json"
    config_file.write_text(json.dumps(config, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "nnUNet_def_n_proc": "1"}
    subprocess.run([nnunet_python, str(Path(__file__).resolve()), "_nnunet_worker", str(config_file)], check=True, env=env)
    return json.loads(Path(config["out_json"]).read_text())


def nnunet_totals(r: dict) -> dict[str, dict]:
    """Seconds per case of nnU-Net without / with mirroring: measured parts + extrapolated window.

    Wall seconds (``total_s``) and CPU seconds of the process (``total_cpu_s``, all threads: less
    sensitive to other jobs sharing the cores).
    """
    parts = ("startup", "preprocess", "finalize", "export")
    fixed = sum(r.get(f"{p}_s", 0.0) for p in parts)
    fixed_cpu = sum(r.get(f"{p}_cpu_s", 0.0) for p in parts)
    out = {}
    for key in ("no_mirroring", "mirroring"):
        times = r["patch_s"][key]
        if not times:
            continue
        per_patch = statistics.median(times)
        per_patch_cpu = statistics.median(r["patch_cpu_s"][key])
        out[key] = {
            "per_patch_s": per_patch,
            "per_patch_cpu_s": per_patch_cpu,
            "measured_patches": len(times),
            "window_s": per_patch * r["num_patches"],
            "total_s": fixed + per_patch * r["num_patches"],
            "total_cpu_s": fixed_cpu + per_patch_cpu * r["num_patches"],
        }
    return out

def paper_size_bundles(work_dir: Path) -> Path:
    """Copies of the three stage bundles' configs with random weights at the paper's sizes
    (:func:`stmt_monai.inference.bundles.random_weight_bundles`: ``common`` sizes, 128^3 / 192^3,
    16 base channels) in ``work_dir/bundles``; the repository's ``bundles/`` is never written to."""
    from stmt_monai.inference.bundles import random_weight_bundles
    from stmt_monai.preprocessing.fingerprint import Fingerprint

    fingerprint = Fingerprint(lower=-1000.0, upper=1500.0, mean=60.0, std=180.0)  # typical CT numbers; timing only
    return random_weight_bundles(work_dir / "bundles", fingerprint)


def run_cascade(ct_path: Path, work_dir: Path, threads: int, repeats: int = 3) -> dict:
    """Time ``stmt-segment`` as a user runs it, one whole fresh process per run (start-up, model
    loading, both stages, the label map and the per-case report written), default backend and
    precision, by ``cascade_speed.py``'s :func:`run_case`: one first run that converts and caches
    the compiled models, then ``repeats`` timed runs (the median).

    Returns:
        ``{"total_s", "cpu_s", "first_run_s", "runs", "load_s", "timings", "backend", "precision"}``:
        median wall and CPU (user + system, all threads) seconds, the first run's wall seconds,
        every timed run, and the last run's model loading and step seconds.
    """
    from cascade_speed import run_case  # this folder's other benchmark: the same command, timed the same way

    bundles = paper_size_bundles(work_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "STMT_MONAI_CACHE": str(work_dir / "cache")}
    runs = [run_case(ct_path, work_dir / "cascade_out", bundles, "trained", threads, [], env) for _ in range(1 + int(repeats))]
    timed = runs[1:]
    return {
        "total_s": statistics.median(r["wall_s"] for r in timed),
        "cpu_s": statistics.median(r["cpu_s"] for r in timed),
        "first_run_s": runs[0]["wall_s"],
        "runs": [{"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]} for r in timed],
        "load_s": timed[-1]["steps_s"]["load_models"],
        "timings": timed[-1]["steps_s"],
        "backend": timed[-1]["backend"],
        "precision": timed[-1]["precision"],
    }


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    """CPU model, cores, load and library versions, for the result file."""
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version()}


def report(nn: dict, cascade: dict, info: dict, threads: int) -> str:
    """The markdown result: one table (method, what was measured, s / case, extrapolated?, ratio) and notes."""
    totals = nnunet_totals(nn)
    plan = nn["plan"]
    base = cascade["total_s"]
    fixed = f"start-up {nn['startup_s']:.1f} + preprocessing {nn['preprocess_s']:.1f} + logits division {nn['finalize_s']:.1f}"
    fixed += f" + export {nn['export_s']:.1f} s" if "export_s" in nn else " s (export not timed)"
    rows = [
        "| method | what is measured | seconds / case (wall) | CPU seconds / case | extrapolated? | ratio to the cascade (wall) | ratio (CPU) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
        f"| StMt cascade (`stmt-segment`, default {cascade['backend']} {cascade['precision']}, paper sizes 128^3 / 192^3, base 16, "
        f"random weights) | the whole process, start-up and model loading ({cascade['load_s']:.1f} s) to the label map and the "
        f"per-case report written; median of {len(cascade['runs'])} runs after a first run ({cascade['first_run_s']:.1f} s) "
        f"that compiled and cached the models | {base:.1f} | {cascade['cpu_s']:.1f} | no, measured | 1.0 | 1.0 |",
    ]
    names = {"no_mirroring": "without mirroring", "mirroring": "with mirroring (8 forward passes per patch)"}
    for key, t in totals.items():
        rows.append(
            f"| nnU-Net v2 3d_fullres, {names[key]} | {fixed} measured; sliding window = median of "
            f"{t['measured_patches']} timed patch(es) {t['per_patch_s']:.1f} s x {nn['num_patches']} patches = {t['window_s']:.0f} s "
            f"| {t['total_s']:.0f} | {t['total_cpu_s']:.0f} | sliding window yes ({t['measured_patches']} of {nn['num_patches']} patches run) "
            f"| {t['total_s'] / base:.0f} | {t['total_cpu_s'] / cascade['cpu_s']:.0f} |"
        )
    cpu = {k: statistics.median(v) for k, v in nn.get("patch_cpu_s", {}).items() if v}
    notes = [
        "",
        f"Case: the shipped real CT (122 x 101 x 112 at 3 mm) resampled over its field of view to 512 x 512 x 300 "
        f"(spacing {nn['plan_case_spacing']}), int16 NIfTI; both methods read the same file.",
        f"nnU-Net {nn['nnunetv2_version']} (own environment, torch {nn['torch']}), default `ExperimentPlanner` on a "
        f"one-case dataset of this file: 3d_fullres {plan['network']}, {plan['n_stages']} stages, features "
        f"{plan['features_per_stage']}, {plan['params_M']:.1f} M parameters, patch {plan['patch_size']} at spacing "
        f"{plan['spacing']} (z, y, x), {plan['num_segmentation_heads']} outputs; preprocessed shape "
        f"{nn['preprocessed_shape']}; step 0.5 gives {nn['num_patches']} patches "
        "(nnU-Net's own `_internal_get_sliding_window_slicers`); Gaussian weighting; mirroring over 3 axes.",
        "Timed patches run nnU-Net's loop body (copy of the patch, `_internal_maybe_mirror_and_predict`, Gaussian "
        "weighting, accumulation into the full-size fp16 logits), spread evenly over the volume.",
        f"CPU seconds per patch (process time, less sensitive to other load): "
        + ", ".join(f"{names[k]} {v:.1f}" for k, v in cpu.items())
        + ".",
        f"Planning (fingerprint + plan, training-time work) took {nn['planning_s']:.0f} s and is not counted.",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} (cascade) / {nn['torch']} (nnU-Net), "
        f"{threads} threads each (`torch.set_num_threads`, OMP_NUM_THREADS). Load average (1 / 5 / 15 min) before the "
        f"run {' / '.join(f'{v:.1f}' for v in info['load_before'])}, at its end {' / '.join(f'{v:.1f}' for v in info['load_avg'])} "
        "(the benchmark's own 2 threads make about 2): "
        + ("nothing else ran. " if info["load_before"][0] < 1.0 else "other jobs shared the cores, so wall seconds are inflated by contention; ")
        + "The CPU seconds (user + system of each process, all its threads) are the figure least sensitive to other load.",
        "Random weights for both: the cascade's ROI (stage 1's abdomen box) then depends on what a random network "
        "predicts, but stage 2 always runs at 192^3, so its cost does not.",
    ]
    notes.append(
        "The export ran on the logits of the timed patches only (most of the volume 0 / 0): its values mean "
        "nothing, its cost (softmax, argmax, crop reverted, NIfTI written at 512 x 512 x 300) is the full one."
    )
    return "\n".join(rows) + "\n" + "\n- ".join(notes) + "\n"


def main(
    nnunet_python: str = "/work/nnunet-venv/bin/python",
    threads: int = 2,
    patches: int = 2,
    mirrored_patches: int = 1,
    nnunet_target_spacing: tuple[float, float, float] | None = None,
    time_export: bool = True,
    work_dir: str = "/tmp/stmt_speed_vs_nnunet",
    output: str = str(ROOT / "docs" / "speed_vs_nnunet.md"),
    skip_cascade: bool = False,
    report_only: bool = False,
    cascade_repeats: int = 3,
) -> None:
    """Time both methods on the 512 x 512 x 300 case and write the markdown table.

    Args:
        nnunet_python: interpreter of the environment that has ``nnunetv2``.
        threads: CPU threads of each method.
        patches: sliding-window patches timed without mirroring.
        mirrored_patches: patches timed with mirroring (8 forward passes each; 0 to skip).
        nnunet_target_spacing: override nnU-Net's target spacing (z, y, x mm), e.g. ``2.5,0.8,0.8``.
        time_export: time nnU-Net's export of a full-size logits array (needs ~10 GB RAM).
        work_dir: scratch folder (the case, nnU-Net's folders, copied bundles, outputs).
        output: markdown result file ("" for none).
        skip_cascade: nnU-Net side only (the cascade row is then missing).
        report_only: run nothing; rewrite the table from the last run's JSON files in ``work_dir``.
        cascade_repeats: timed ``stmt-segment`` runs after the first (the median is reported).
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ct_path, label_path = make_case(work)
    import nibabel as nib

    load_before = os.getloadavg()
    zooms = nib.load(str(ct_path)).header.get_zooms()
    cascade_json, nnunet_json = work / "cascade_result.json", work / "nnunet_result.json"
    if report_only:
        cascade, nn = json.loads(cascade_json.read_text()), json.loads(nnunet_json.read_text())
    else:
        cascade = None if skip_cascade else run_cascade(ct_path, work, threads, cascade_repeats)
        if cascade:
            cascade_json.write_text(json.dumps(cascade, indent=1))
            print(f"cascade: {cascade['total_s']:.1f} s wall, {cascade['cpu_s']:.1f} s CPU", flush=True)
        spacing = None if nnunet_target_spacing is None else [float(s) for s in nnunet_target_spacing]
        nn = run_nnunet(nnunet_python, ct_path, label_path, work, threads, patches, mirrored_patches, spacing, time_export)
    nn["plan_case_spacing"] = " x ".join(f"{z:.3f}" for z in zooms) + " mm"
    nnunet_json.write_text(json.dumps(nn, indent=1))
    if cascade is None:
        print(json.dumps(nnunet_totals(nn), indent=1))
        return
    text = "# Speed: the StMt cascade against nnU-Net v2's default inference\n\n"
    text += "`python benchmarks/speed_vs_nnunet.py --nnunet_python /work/nnunet-venv/bin/python --threads 2`\n\n"
    machine_json = work / "machine.json"
    if not report_only:
        machine_json.write_text(json.dumps({**machine(), "load_before": load_before}, indent=1))  # load average at the end of the run
    text += report(nn, cascade, json.loads(machine_json.read_text()), threads)
    print(text)
    if output:
        Path(output).write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_nnunet_worker":  # nnU-Net's interpreter: no fire, no stmt_monai
        _nnunet_worker(sys.argv[2])
    else:
        import fire

        fire.Fire(main)
