"""Stage 1 (bundles/coarse_abdomen) on a small generated cohort, on the CPU: DSC, ROI coverage, time.

    python benchmarks/coarse_abdomen_cpu.py --out /tmp/coarse_abdomen_bench --max_epochs 20 --val_interval 5
    python benchmarks/coarse_abdomen_cpu.py --out /tmp/coarse_abdomen_bench --max_epochs 10 \
        --spatial_size 64 --base_channels 8 --size 64 --num_labelled 12 --num_unlabelled 4   # shorter

The figures of the first command are in bundles/coarse_abdomen/docs/README.md ("Benchmark"):
its training took 1074 CPU-seconds (54 per epoch), 41 minutes of wall time on 2 CPU cores
shared with other jobs.

Steps, each with the project's own entry points:

1. a synthetic FLARE23-layout cohort (``stmt_monai.synthetic.annotation.make_cohort``, as ``stmt-make-cohort``)
   and its datalists and fingerprint (``stmt_monai.data.triage.triage_dataset``, as ``stmt-prepare-data``);
2. pseudo labels for the partial and unlabelled cases, in the organ teacher's datalist format, with
   the cohort's hidden truth standing in for the teacher ("oracle teacher": organs of the truth,
   corrected with the partial annotation exactly as ``correct_pseudo_label`` does). The real
   teacher is organ_selftrain's; this isolates stage 1 from the teacher's quality;
3. the bundle's workflows as its README runs them (:func:`stmt_monai.bundle.run_workflow`): train at
   reduced size, evaluate ``models/model.pt`` on the validation cases (Dice at the input's
   resolution) and on the held-out test cases, inference on the test cases and the real CT;
4. ROI coverage (:func:`stmt_monai.preprocessing.roi.roi_report`): share of each case's organ
   (1..13) and tumor (14) voxels inside ``<case>_roi.json``, and the box's share of the volume.

The real CT is the cohort's source (every generated case is a deformation of it), so its figures
show the full-size, real-intensity path, not generalisation to a new patient.
Prints a markdown summary; writes ``<out>/results.json``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
from pathlib import Path

import fire
import numpy as np

from stmt_monai.bundle import epoch_seconds, run_workflow
from stmt_monai.evaluation.metrics import dice
from stmt_monai.inference.bundles import default_bundles_dir
from stmt_monai.io import load_label
from stmt_monai.preprocessing.roi import roi_report
from stmt_monai.synthetic.oracle import oracle_pseudo_labels

BUNDLE = default_bundles_dir() / "coarse_abdomen"
EXAMPLE = Path(__file__).resolve().parents[1] / "stmt_monai" / "example_data"
REAL_CT, REAL_ORGANS = EXAMPLE / "abdomen_ct_3mm.nii.gz", EXAMPLE / "abdomen_ct_3mm_organs.nii.gz"


def run(workflow: str, overrides: dict, log_path: Path) -> tuple[str, float]:
    """Run the bundle's ``workflow`` (:func:`stmt_monai.bundle.run_workflow`), its output in ``log_path``.

    Returns:
        ``(output, cpu_seconds)``: the output, and the CPU time (user + system, all cores) the
        workflow used, which depends far less than wall time on what else the machine runs.
    """
    log_path.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = run_workflow(BUNDLE, workflow, overrides, log_file=log_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(f"  {log_path.name}: {seconds:.0f} s wall, {cpu_s:.0f} s CPU", flush=True)
    return log_path.read_text(), cpu_s


def main(
    out: str = "/tmp/coarse_abdomen_bench",
    seed: int = 0,
    size: int = 64,
    num_labelled: int = 12,
    num_unlabelled: int = 4,
    num_validation: int = 4,
    num_test: int = 6,
    fully_share: float = 0.34,
    spatial_size: int = 64,
    base_channels: int = 8,
    num_downsamplings: int = 5,
    max_epochs: int = 20,
    val_interval: int = 5,
    num_workers: int = 1,
    fresh: bool = True,
) -> None:
    """Run the benchmark in ``out`` (removed first when ``fresh``) and print its summary."""
    from stmt_monai.data.triage import triage_dataset
    from stmt_monai.synthetic.annotation import make_cohort
    from stmt_monai.synthetic.config import CohortConfig

    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cohort, prepared, bundle_root = out / "cohort", out / "cohort" / "prepared", out / "bundle"
    config = CohortConfig(num_labelled=num_labelled, num_unlabelled=num_unlabelled, num_validation=num_validation,
                          num_test=num_test, size=size, fully_share=fully_share)
    print("cohort and datalists", flush=True)
    make_cohort(cohort, config, seed=seed, progress=False)
    triage = triage_dataset(cohort, prepared, progress=False)
    pseudo = oracle_pseudo_labels(cohort, prepared, out / "pseudo_labels")
    sizes = {"spatial_size": f"[{spatial_size},{spatial_size},{spatial_size}]", "base_channels": base_channels,
             "num_downsamplings": num_downsamplings, "num_workers": num_workers}

    print("bundle", flush=True)
    load_before = os.getloadavg()[0]
    log, train_cpu_s = run("train", dict(bundle_root=bundle_root, prepared_dir=prepared, pseudo_datalist=pseudo,
                             max_epochs=max_epochs, val_interval=val_interval, **sizes), out / "train.log")
    load_after = os.getloadavg()[0]
    epoch_s, validation_s = epoch_seconds(log, "SelfTrainingTrainer"), epoch_seconds(log, "Evaluator")
    val_dice = [float(v) for v in re.findall(r"Metrics -- val_mean_dice: ([\d.]+)", log)]
    first_losses = [float(v) for v in re.findall(r"Epoch: 1/\d+, Iter: \d+/\d+ -- loss: ([\d.]+)", log)]
    last_losses = [float(v) for v in re.findall(rf"Epoch: {max_epochs}/\d+, Iter: \d+/\d+ -- loss: ([\d.]+)", log)]

    dsc = {}
    for split in ("validation", "test"):
        eval_dir = out / f"eval_{split}"
        run("evaluate", dict(bundle_root=bundle_root, prepared_dir=prepared,
                           validation_key=split, output_dir=eval_dir, **sizes), out / f"evaluate_{split}.log")
        rows = (eval_dir / "val_mean_dice_raw.csv").read_text().strip().splitlines()[1:]
        dsc[split] = [float(r.split(",")[1]) for r in rows]

    inputs = out / "inference_inputs"
    inputs.mkdir(exist_ok=True)
    shutil.copy(REAL_CT, inputs / "real_ct_0000.nii.gz")
    truth = {"real_ct": REAL_ORGANS}
    for image in sorted((cohort / "test" / "images").iterdir()):
        shutil.copy(image, inputs / image.name)
        name = image.name[: -len("_0000.nii.gz")]
        truth[name] = cohort / "test" / "labels" / f"{name}.nii.gz"
    infer_dir = out / "inference"
    start = time.perf_counter()
    _, inference_cpu_s = run("inference", dict(bundle_root=bundle_root, input_dir=inputs, output_dir=infer_dir, **sizes), out / "inference.log")
    inference_s = time.perf_counter() - start
    cover = {name: roi_report(*load_label(path), json.loads((infer_dir / f"{name}_roi.json").read_text())) for name, path in truth.items()}
    real_mask, _ = load_label(infer_dir / "real_ct.nii.gz")
    real_truth, _ = load_label(REAL_ORGANS)
    real_dsc = dice(real_truth > 0, real_mask > 0)

    generated = [v for k, v in cover.items() if k != "real_ct"]
    results = {
        "settings": {"cohort": {"size": size, "num_labelled": num_labelled, "num_unlabelled": num_unlabelled,
                                "num_validation": num_validation, "num_test": num_test, "fully_share": fully_share,
                                "seed": seed, "counts": triage.counts},
                     "spatial_size": spatial_size, "base_channels": base_channels, "num_downsamplings": num_downsamplings,
                     "max_epochs": max_epochs, "val_interval": val_interval, "num_workers": num_workers,
                     "training_items": len(json.loads(pseudo.read_text())["training"])
                     + len(json.loads((prepared / "datalist_fully_labelled.json").read_text())["training"])},
        "epoch_seconds": epoch_s,
        "train_cpu_seconds": train_cpu_s,
        "load_average_1min_before_after_training": [load_before, load_after],
        "cpu_cores": os.cpu_count(),
        "validation_seconds": validation_s,
        "val_dice_during_training": val_dice,
        "loss_first_epoch": float(np.mean(first_losses)),
        "loss_last_epoch": float(np.mean(last_losses)),
        "dsc_input_resolution": dsc,
        "real_ct_dsc": real_dsc,
        "roi_coverage": cover,
        "inference_seconds_total": inference_s,
        "inference_cpu_seconds": inference_cpu_s,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))

    train_s = np.asarray(epoch_s)
    print(f"\n| what | figure |\n| --- | --- |")
    print(f"| training items (labelled + CPL + PL) | {results['settings']['training_items']} |")
    print(f"| time per epoch (incl. validation when due), wall, mean / median | {train_s.mean():.1f} s / {np.median(train_s):.1f} s "
          f"({os.cpu_count()} cores, load average {load_before:.1f} -> {load_after:.1f}) |")
    print(f"| CPU time per epoch (whole training run incl. start-up / epochs) | {train_cpu_s / max_epochs:.1f} s |")
    print(f"| training loss, epoch 1 -> epoch {max_epochs} (mean) | {results['loss_first_epoch']:.3f} -> {results['loss_last_epoch']:.3f} |")
    print(f"| val Dice during training (network resolution) | {', '.join(f'{v:.3f}' for v in val_dice)} |")
    for split, values in dsc.items():
        print(f"| abdomen DSC, {split} ({len(values)} cases, input resolution), mean (min) | {np.mean(values):.3f} ({np.min(values):.3f}) |")
    print(f"| abdomen DSC, real CT (organs > 0 as truth) | {real_dsc:.3f} |")
    print(f"| ROI organ coverage, {len(generated)} held-out generated cases, mean (min) | "
          f"{np.mean([c['organs'] for c in generated]):.4f} ({np.min([c['organs'] for c in generated]):.4f}) |")
    tumors = [c["tumor"] for c in generated if c["tumor"] is not None]
    if tumors:
        print(f"| ROI tumor coverage, {len(tumors)} held-out cases with tumors, mean (min) | {np.mean(tumors):.4f} ({np.min(tumors):.4f}) |")
    print(f"| ROI organ coverage, real CT | {cover['real_ct']['organs']:.4f} |")
    print(f"| ROI share of the volume, generated mean / real CT (truth's box + margin: generated / real) | "
          f"{np.mean([c['roi_share_of_volume'] for c in generated]):.2f} / {cover['real_ct']['roi_share_of_volume']:.2f} "
          f"({np.mean([c['truth_roi_share_of_volume'] for c in generated]):.2f} / {cover['real_ct']['truth_roi_share_of_volume']:.2f}) |")
    print(f"| inference, {len(truth)} cases incl. start-up | {inference_s:.0f} s wall, {inference_cpu_s:.0f} s CPU |")


if __name__ == "__main__":
    fire.Fire(main)
