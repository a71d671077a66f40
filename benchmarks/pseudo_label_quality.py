"""How good are the organ teacher's pseudo labels, raw and corrected, against the hidden truth?

    python benchmarks/pseudo_label_quality.py --cohort_dir data/cohort --pseudo_dir data/pseudo_labels \
        [--output benchmarks/results/pseudo_label_quality.md]

The scores are :func:`stmt_monai.evaluation.pseudo_labels.score_pseudo_labels` (the pseudo labels of
``pseudo_dir``, with the raw predictions the ``pseudo_label`` workflow keeps with ``--keep_raw True``,
against the synthetic cohort's hidden truth ``<cohort_dir>/truth/``); the table gives their mean per
stream, raw and corrected, split into annotated (A) and unannotated classes for the partial cases,
and how well the quality score (teacher confidence) ranks the cases (Spearman correlation with the
raw organ DSC).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from stmt_monai.evaluation.pseudo_labels import score_pseudo_labels, summarize_pseudo_labels


def summary_table(rows: list[dict]) -> str:
    """Markdown table: organ DSC (%) per stream, raw vs corrected."""
    summary = summarize_pseudo_labels(rows)

    def pct(value: float) -> str:
        return "-" if value != value else f"{100 * value:.2f}"  # NaN: no such cases

    lines = [
        "| stream | cases | organ DSC raw | organ DSC corrected | classes in A: raw -> corrected | other classes: raw -> corrected | Spearman(quality, raw DSC) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stream, label in (("cpl", "partial (CPL)"), ("pl", "unlabelled (PL)")):
        if stream not in summary:
            continue
        s = summary[stream]
        in_a = f"{pct(s['raw_in_A'])} -> {pct(s['corrected_in_A'])}" if stream == "cpl" else "-"
        lines.append(
            f"| {label} | {s['cases']} | {pct(s['raw'])} | {pct(s['corrected'])} | {in_a} | "
            f"{pct(s['raw_not_A'])} -> {pct(s['corrected_not_A'])} | {s['spearman_quality_raw']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(cohort_dir: str = "data/cohort", pseudo_dir: str = "data/pseudo_labels", output: str | None = None) -> None:
    """Score the pseudo labels of ``pseudo_dir`` against ``cohort_dir/truth``; print (and write) the table."""
    rows = score_pseudo_labels(pseudo_dir, Path(cohort_dir) / "truth")
    table = summary_table(rows)
    print(table, end="")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(table + "\n" + json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
