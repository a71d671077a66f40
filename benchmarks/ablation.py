"""The paper's Table 3 re-run through the bundles on a generated cohort (``docs/ablation.md``).

    python benchmarks/ablation.py --work_dir /work/ablation --seeds 3                  # ~100 min, 2 CPU cores
    python benchmarks/ablation.py --work_dir /tmp/abl --seeds 3 --report_only True    # tables and charts again
    python benchmarks/ablation.py --work_dir runs/abl_gpu --device cuda --threads 4 \\
        --spatial_size 96 --base_channels 16 --num_downsamplings 4 --organ_epochs 200    # larger, on a GPU

Each row is a run of the bundles' own workflows (``organ_selftrain`` ``train_teacher``,
``pseudo_label``, ``train``; ``tumor_meanteacher`` ``train``; each then its ``inference``), by
:func:`stmt_monai.evaluation.ablation.run_ablation`; this script makes the cohort, calls it, and
prints and draws the results (``--output``: markdown; ``--json_output``: the figures as
``{"rows": {row: {seed: {"organ_dsc", "tumor_dsc"}}}}``; ``--chart_dir``: PNG charts).
Interrupted runs resume: every finished bundle run is kept in ``work_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import fire
import numpy as np

from stmt_monai.evaluation.ablation import (
    ORGAN_ROWS,
    PAPER_TABLE3,
    ROW_NAMES,
    TRENDS,
    TUMOR_ROWS,
    UPPER_BOUND_ROWS,
    AblationSettings,
    ablation_json,
    paired_difference,
    row_overrides,
    run_ablation,
    predict_held_out,
    score_ablation,
    teacher_targets,
)
from stmt_monai.inference.backends import cpu_model
from stmt_monai.labels import ORGANS, TUMOR
from stmt_monai.synthetic.annotation import make_cohort
from stmt_monai.synthetic.config import CohortConfig

#: the ablation's cohort: FLARE23's proportions (10 % of the labelled cases fully organ labelled,
#: 70 % partial, a third of all cases unlabelled); patients that differ more than the generator's
#: defaults (scale 0.8-1.2, elastic 4-16 mm, rotation 15 deg: one real CT is all it deforms; with
#: its defaults even the oracle self-training row did not beat FSO in a pilot, docs/ablation.md); lesions a 40^3 student can see (15-45 mm); half of the
#: tumor-annotated cases with a second lesion left unannotated (FLARE23 pools single-cancer datasets)
COHORT = CohortConfig(
    num_labelled=40,
    num_unlabelled=20,
    num_validation=4,
    num_test=12,
    size=96,
    scale_range=(0.8, 1.2),
    elastic_mm=(4.0, 16.0),
    max_rotation_deg=15.0,
    tumor_diameter_mm=(15.0, 45.0),
    unannotated_tumor_share=0.5,
)
#: the generator's seed of ``--held_out`` test cases (the cohort itself is seed 0)
HELD_OUT_SEED = 1000
LABELS = {
    "nnunet": "nnU-Net (all partial labels, supervised)",
    "fso": "FSO",
    "st_partial": "Self-training with partial labels",
    "st_partial_unlabelled": "Self-training with partial labels and unlabelled",
    "st_oracle": "Self-training, oracle pseudo labels (upper bound)",
    "fst": "FST",
    "mean_teacher": "Mean teacher",
    "mt_oracle": "Mean teacher, oracle target (upper bound)",
    "mt_paper": "Mean teacher, the paper's constant lambda, plain EMA",
    "mt_confident": "Mean teacher, only the teacher's confident tumor (p > 0.9)",
    "mt_soft": "Mean teacher, soft target (MSE to the teacher's probabilities)",
    "mt_classic": "Mean teacher, the original recipe (soft target, noisy teacher view, lambda 10)",
    "fst_x2": "FST, loss doubled (the mean teacher's step size)",
    "fst_full": "FST on every lesion annotated (the hidden truth; upper bound)",
}


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def markdown(results: dict, settings: AblationSettings, seeds: list[int], wall_s: float | None) -> str:
    rows = results["rows"]
    out = ["| row | organ DSC | organ NSD | tumor DSC | tumor NSD | paper organ DSC | paper tumor DSC | overrides of the bundle's `train` |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in ROW_NAMES:
        if row not in rows:
            continue
        scores = list(rows[row].values())
        cells = [_cell([s[m] for s in scores if m in s]) for m in ("organ_dsc", "organ_nsd", "tumor_dsc", "tumor_nsd")]
        paper = PAPER_TABLE3.get(row, {})
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in row_overrides(row).items()) or "(none: the bundle's defaults)"
        out.append(f"| {LABELS[row]} | " + " | ".join(cells) + f" | {paper.get('organ_dsc', '—')} | {paper.get('tumor_dsc', '—')} | {overrides} |")
    out += ["", f"%, mean ± sd over seeds {seeds} on {len(next(iter(results['runs'].values()), {}) and seeds)} seed(s), {results.get('test_cases', 12)} test cases; "
            "paper: Table 3 (FLARE23 validation).", ""]
    out += ["Paired differences (same seed, same test cases), points of %:", "",
            "| comparison | metric | per seed | mean | 95 % interval | paper | verdict |", "| --- | --- | --- | ---: | --- | ---: | --- |"]
    for better, worse, metric in TRENDS:
        diff = paired_difference(rows, better, worse, metric)
        if diff is None:
            continue
        low, high = diff["ci95"]
        paper = PAPER_TABLE3.get(better, {}).get(metric), PAPER_TABLE3.get(worse, {}).get(metric)
        paper_diff = f"{paper[0] - paper[1]:+.2f}" if None not in paper else "—"
        verdict = "holds" if low > 0 else ("reversed" if high < 0 else "not shown")
        per_seed = ", ".join(f"{d:+.1f}" for d in diff["per_seed"])
        out.append(f"| {LABELS[better]} − {LABELS[worse]} | {metric} | {per_seed} | {diff['mean']:+.1f} | [{low:+.1f}, {high:+.1f}] | {paper_diff} | {verdict} |")
    if results.get("teacher"):
        out += ["", "Organ teacher (test organ DSC %) beside FSO, per seed:", "", "| seed | teacher | FSO |", "| --- | ---: | ---: |"]
        for seed, t in sorted(results["teacher"].items(), key=lambda kv: str(kv[0])):
            fso = results["rows"].get("fso", {}).get(seed, {}).get("organ_dsc", math.nan)
            out.append(f"| {seed} | {t['organ_dsc']:.1f} | {fso:.1f} |")
    if results.get("lesions"):
        out += ["", "Tumor lesions on the test cases (scored network / student):", "",
                "| row | seed | found | missed | false components per case | DSC on the cases with tumor | tumor-free cases without a false tumor | student: tumor DSC, found, missed, false per case |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for row in TUMOR_ROWS:
            for seed, les in sorted(results["lesions"].get(row, {}).items(), key=lambda kv: str(kv[0])):
                st = results["student"][row][seed]
                split = results.get("tumor_split", {}).get(row, {}).get(seed)
                split_cells = f"{split['tumor_dsc_present']:.1f} | {split['tumor_free_clean']} / {split['tumor_free_cases']}" if split else "— | —"
                out.append(f"| {LABELS[row]} | {seed} | {les['found']} | {les['missed']} | {les['false_components_per_case']:.2f} | {split_cells} | "
                           f"{st['tumor_dsc']:.1f}, {st['found']}, {st['missed']}, {st['false_components_per_case']:.2f} |")
    if results.get("targets"):
        out += ["", "The extra target of eq. (2) after training: each row's EMA teacher on its own training cases, united with "
                "the annotation, against the hidden truth (what the mean teacher's second term teaches):", "",
                "| row | seed | unannotated lesions in the target | false components per case | teacher's tumor voxels: on the truth / all (truth, annotated) |",
                "| --- | --- | ---: | ---: | ---: |"]
        for row in TUMOR_ROWS:
            for seed, t in sorted(results["targets"].get(row, {}).items(), key=lambda kv: str(kv[0])):
                v = t.get("voxels")
                volume = f"{v['teacher_on_truth']} / {v['teacher']} ({v['truth']}, {v['annotated']})" if v else "—"
                out.append(f"| {LABELS[row]} | {seed} | {t['unannotated']['found']} / {t['unannotated']['total']} | {t['false_components_per_case']:.2f} | {volume} |")
    names = {**{k: v[:6] for k, v in ORGANS.items()}, TUMOR: "tumor"}
    out += ["", "Per-class test DSC (%, mean over seeds):", "", "| row | " + " | ".join(names[c] for c in sorted(names)) + " |", "|---" * (len(names) + 1) + "|"]
    for row in ROW_NAMES:
        per = results["per_class"].get(row)
        if not per:
            continue
        cells = []
        for c in sorted(names):
            values = [v[c] for v in per.values() if c in v]
            cells.append(f"{np.mean(values):.0f}" if values else "")
        out.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    seconds = {row: [r.get("seconds", 0) for r in runs.values()] for row, runs in results["runs"].items()}
    out += ["", "Seconds per training run (mean over seeds): " + ", ".join(f"{row} {np.mean(s):.0f}" for row, s in seconds.items())]
    if wall_s is not None:
        out.append(f"Wall time of the whole run: {wall_s / 60:.1f} min.")
    out += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items())]
    return "\n".join(out) + "\n"


def charts(results: dict, chart_dir: Path, prefix: str = "ablation") -> list[Path]:
    """The table as a bar chart with the seeds as points, the validation learning curves and, where
    the tumor runs logged them, what their targets held epoch by epoch (``<prefix>_*.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chart_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        path = chart_dir / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def held(panels, key):  # a panel per stage that the results hold (an organ-only run draws no empty tumor panel)
        return [p for p in panels if any(r in results[key] for r in p[0])] or list(panels[:1])

    stages = held(((ORGAN_ROWS, "organ_dsc", "organ DSC (%)"), (TUMOR_ROWS, "tumor_dsc", "tumor DSC (%)")), "rows")
    widths = [max(1, sum(r in results["rows"] for r in rows)) for rows, _, _ in stages]
    fig, axes = plt.subplots(1, len(stages), figsize=(4 + 4 * len(stages), 4.2), gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (rows, metric, title) in zip(axes[0], stages):
        present = [r for r in rows if r in results["rows"]]
        for i, row in enumerate(present):
            values = [s[metric] for s in results["rows"][row].values()]
            ax.bar(i, np.mean(values), color="#d9d9d9" if row in UPPER_BOUND_ROWS else "#9ecae1", edgecolor="k")
            ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
            paper = PAPER_TABLE3.get(row, {}).get(metric)
            if paper is not None:
                ax.scatter([i], [paper], marker="_", s=400, color="#d62728", zorder=4)
        ax.set_xticks(range(len(present)), [r.replace("_", "\n") for r in present], fontsize=8)
        ax.set_title(title + "; dots: seeds, red: paper")
        ax.set_ylim(0, 100)
    written.append(save(fig, "table"))
    groups = held(((ORGAN_ROWS, "organ students"), (TUMOR_ROWS, "tumor students")), "curves")
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (rows, title) in zip(axes[0], groups):
        for k, row in enumerate(r for r in rows if r in results["curves"]):
            for j, curve in enumerate(results["curves"][row].values()):
                if curve:
                    epochs, dice = zip(*curve)
                    ax.plot(epochs, dice, color=f"C{k}", alpha=0.8, label=row if j == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mean Dice (network resolution)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    written.append(save(fig, "curves"))
    target_curves = results.get("target_curves") or {}
    if target_curves:
        panels = (("student_tumor_pct", "the student's tumor (argmax, % of voxels)"), ("extra_target_pct", "extra target beyond the annotation (% of voxels)"))
        annotated = next((c["annotated_tumor_pct"] for runs in target_curves.values() for c in runs.values() if "annotated_tumor_pct" in c), None)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, (tag, title) in zip(axes, panels):
            for k, row in enumerate(r for r in TUMOR_ROWS if r in target_curves):
                for j, (seed, curves) in enumerate(sorted(target_curves[row].items(), key=lambda kv: str(kv[0]))):
                    if tag in curves:
                        epochs, values = zip(*curves[tag])
                        ax.plot(epochs, values, color=f"C{k}", linestyle=("-", "--", ":", "-.")[j % 4], label=f"{row}, seed {seed}")
            if annotated:
                ax.axhline(np.mean([v for _, v in annotated]), color="k", linewidth=0.8, label="annotated tumor")
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.legend(fontsize=7)
        written.append(save(fig, "targets"))
    return written


def main(
    work_dir: str = "runs/ablation",
    seeds: int | list = 3,
    rows: str = ",".join(ROW_NAMES),
    cohort_dir: str | None = None,
    report_only: bool = False,
    output: str | None = None,
    json_output: str | None = None,
    chart_dir: str | None = None,
    chart_prefix: str = "ablation",
    cohort_size: int | None = None,
    targets: bool = False,
    targets_checkpoint: str = "mean_teacher.pt",
    held_out: int = 0,
    **settings,
) -> None:
    """Run (or resume) the ablation and print its tables.

    Args:
        work_dir: where every run is kept (resumable).
        seeds: a count n (seeds 0 .. n-1), or a list of seeds (``--seeds "[1]"``).
        rows: comma-separated rows (:data:`stmt_monai.evaluation.ablation.ROW_NAMES`).
        cohort_dir: an existing cohort; default ``work_dir/cohort``, made from :data:`COHORT`.
        report_only: only score what is there and print.
        output, json_output, chart_dir: also write the markdown, the JSON figures, the PNG charts.
        chart_prefix: the charts' file names, ``<chart_prefix>_table.png`` etc.
        cohort_size: voxels across the generated cohort's larger in-plane axis (default 96).
        held_out: score on this many extra generated test cases (the cohort's settings, another
            seed; made once in ``work_dir/held_out<N>``) instead of the cohort's 12: every finished
            run predicts them with its bundle's inference (:func:`~stmt_monai.evaluation.ablation.predict_held_out`).
        targets: also score what each tumor row's extra target holds after training
            (:func:`~stmt_monai.evaluation.ablation.teacher_targets`; the oracle row's is the truth).
        targets_checkpoint: the teacher those targets come from: ``mean_teacher.pt`` (the best
            validation epoch's) or ``checkpoint_last.pt`` (the last epoch's).
        settings: any :class:`~stmt_monai.evaluation.ablation.AblationSettings` field, e.g.
            ``--organ_epochs 40 --device cuda --spatial_size 64``.
    """
    if "spatial_size" in settings and isinstance(settings["spatial_size"], int):
        settings["spatial_size"] = (settings["spatial_size"],) * 3
    settings_obj = AblationSettings(**settings)
    work = Path(work_dir)
    cohort = Path(cohort_dir) if cohort_dir else work / "cohort"
    # a count (seeds 0 .. n-1) or the seeds themselves ("[1, 2]": fire gives a list)
    seed_list = [int(v) for v in seeds] if isinstance(seeds, (list, tuple)) else list(range(int(seeds)))
    # fire hands "a,b" over as a tuple
    row_list = [r.strip() for r in (rows.split(",") if isinstance(rows, str) else rows) if str(r).strip()]
    start = time.perf_counter()
    if not report_only:
        if not (cohort / "policy.json").is_file():
            config = dataclasses.replace(COHORT, size=int(cohort_size)) if cohort_size else COHORT
            make_cohort(cohort, config, seed=0, workers=2)
        run_ablation(cohort, work, seed_list, settings_obj, row_list)
    test_dir = tag = None
    if held_out:
        tag = f"held_out{int(held_out)}"
        if not (work / tag / "policy.json").is_file():
            config = dataclasses.replace(COHORT, size=int(cohort_size)) if cohort_size else COHORT
            config = dataclasses.replace(config, num_labelled=0, num_unlabelled=0, num_validation=0, num_test=int(held_out))
            make_cohort(work / tag, config, seed=HELD_OUT_SEED, workers=2)
        test_dir = work / tag / "test"
        predict_held_out(cohort, work, test_dir, seed_list, row_list, settings_obj, tag=tag)
    results = score_ablation(cohort, work, seed_list, row_list, test_dir=test_dir, tag=tag)
    if targets:
        for row in (r for r in row_list if r in TUMOR_ROWS and r != "mt_oracle"):
            for seed in seed_list:
                if (work / f"seed{seed}" / row / "done.json").is_file():
                    results.setdefault("targets", {}).setdefault(row, {})[seed] = teacher_targets(cohort, work, seed, row, settings_obj, checkpoint=targets_checkpoint)
    wall = None if report_only else time.perf_counter() - start
    text = markdown(results, settings_obj, seed_list, wall)
    text += f"\nMachine: {platform.machine()}, {cpu_model()}, torch threads per run {settings_obj.threads}\n"
    print(text)
    if output:
        Path(output).write_text(text)
    if json_output:
        Path(json_output).write_text(json.dumps(ablation_json(results), indent=1) + "\n")
    if chart_dir:
        for path in charts(results, Path(chart_dir), chart_prefix):
            print("chart:", path)


if __name__ == "__main__":
    fire.Fire(main)
