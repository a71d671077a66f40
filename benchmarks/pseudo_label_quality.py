"""How good are the organ teacher's pseudo labels, raw and corrected, against the hidden truth?

    python benchmarks/pseudo_label_quality.py --cohort_dir data/cohort --pseudo_dir data/pseudo_labels \
        [--output benchmarks/results/pseudo_label_quality.md]

Reads the job's datalist (``<pseudo_dir>/datalist_pseudo_labelled.json``, training and excluded
cases), the uncorrected predictions (``<pseudo_dir>/raw/``, written by the ``pseudo_label``
workflow with ``--keep_raw True``), the written pseudo labels, and the synthetic cohort's hidden
full truth (``<cohort_dir>/truth/<case>.nii.gz``, ``stmt_monai.synthetic.anatomy``). Per case, the DSC of each
of the 13 organs (``stmt_monai.evaluation.metrics.dice``: FLARE's rule, both empty = 1, one empty = 0) is
averaged into the organ DSC, as FLARE summarises; the table gives its mean per stream for the raw
and the written (corrected) pseudo labels, split into annotated (A) and unannotated classes for
the partial cases, and how well the quality score (teacher confidence) ranks the cases (Spearman
correlation with the raw organ DSC).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from stmt_monai.evaluation.metrics import dice
from stmt_monai.io import load_label  # noqa: E402
from stmt_monai.labels import ORGAN_CLASSES  # noqa: E402
from stmt_monai.training.pseudo_label import PSEUDO_DATALIST, RAW_DIR


def organ_dice(truth: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """DSC of each organ class (1..13) of one case; tumor voxels are background in both."""
    return {c: dice(truth == c, labels == c) for c in ORGAN_CLASSES}


def _spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    rx, ry = (np.argsort(np.argsort(v)).astype(float) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def score_cases(cohort_dir: str | Path, pseudo_dir: str | Path) -> list[dict]:
    """One row per pseudo-labelled case: stream, quality, organ DSC raw / corrected (all, A, not A)."""
    cohort_dir, pseudo_dir = Path(cohort_dir), Path(pseudo_dir)
    content = json.loads((pseudo_dir / PSEUDO_DATALIST).read_text())
    rows = []
    for record in content["training"] + content.get("excluded_low_quality", []):
        name = record["name"]
        truth, _ = load_label(cohort_dir / "truth" / f"{name}.nii.gz")
        raw, _ = load_label(pseudo_dir / RAW_DIR / f"{name}.nii.gz", truth.shape)
        written, _ = load_label(pseudo_dir / record["label"], truth.shape)
        a = set(record["annotated_classes"])
        row = {"name": name, "stream": record["stream"], "quality": record["quality"], "num_annotated": len(a)}
        for kind, labels in (("raw", raw), ("corrected", written)):
            scores = organ_dice(truth, labels)
            row[kind] = float(np.mean(list(scores.values())))
            row[f"{kind}_in_A"] = float(np.mean([scores[c] for c in a])) if a else float("nan")
            row[f"{kind}_not_A"] = float(np.mean([scores[c] for c in ORGAN_CLASSES if c not in a]))
        rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> str:
    """Markdown table: organ DSC (%) per stream, raw vs corrected."""

    def mean(values) -> str:
        values = [v for v in values if v == v]  # drop NaN
        return f"{100 * np.mean(values):.2f}" if values else "-"

    lines = [
        "| stream | cases | organ DSC raw | organ DSC corrected | classes in A: raw -> corrected | other classes: raw -> corrected | Spearman(quality, raw DSC) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stream, label in (("cpl", "partial (CPL)"), ("pl", "unlabelled (PL)")):
        group = [r for r in rows if r["stream"] == stream]
        if not group:
            continue
        in_a = f"{mean(r['raw_in_A'] for r in group)} -> {mean(r['corrected_in_A'] for r in group)}" if stream == "cpl" else "-"
        lines.append(
            f"| {label} | {len(group)} | {mean(r['raw'] for r in group)} | {mean(r['corrected'] for r in group)} | {in_a} | "
            f"{mean(r['raw_not_A'] for r in group)} -> {mean(r['corrected_not_A'] for r in group)} | "
            f"{_spearman([r['quality'] for r in group], [r['raw'] for r in group]):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(cohort_dir: str = "data/cohort", pseudo_dir: str = "data/pseudo_labels", output: str | None = None) -> None:
    """Score the pseudo labels of ``pseudo_dir`` against ``cohort_dir/truth``; print (and write) the table."""
    rows = score_cases(cohort_dir, pseudo_dir)
    table = summary_table(rows)
    print(table, end="")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(table + "\n" + json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
