"""Score a folder of predicted label maps against ground truth by the official FLARE23 rules.

    python scripts/evaluate.py --pred_dir out/ --gt_dir labels/ --out_dir eval/
    python scripts/evaluate.py out/ labels/ --classes=5,6,10   # aorta, IVC, esophagus only

Files pair by case name (``<case>.nii.gz`` in both folders). Writes ``per_case.csv``,
``summary.csv``, ``summary.md`` and ``problems.csv`` into ``out_dir`` (default
``<pred_dir>/eval``) and prints the summary table; a missing or mismatched case is listed,
not fatal. See :func:`stmt_monai.evaluation.scoring.evaluate_folder`.
"""

from __future__ import annotations

from pathlib import Path

import fire

from stmt_monai.evaluation.scoring import evaluate_folder, summary_markdown
from stmt_monai.labels import LABELS


def main(
    pred_dir: str, gt_dir: str, out_dir: str | None = None, classes=tuple(LABELS), check_affine: bool = True
) -> None:
    """Evaluate ``pred_dir`` against ``gt_dir``; see the module docstring.

    Args:
        pred_dir: folder of predictions ``<case>.nii.gz``.
        gt_dir: folder of ground truth ``<case>.nii.gz`` (its headers give the spacing).
        out_dir: folder for the tables; default ``<pred_dir>/eval``.
        classes: FLARE label numbers to score, e.g. ``--classes=1,2,3``; default 1..14.
        check_affine: require the prediction's affine to match the ground truth's.
    """
    out_dir = Path(pred_dir) / "eval" if out_dir is None else Path(out_dir)
    _, summary, problems = evaluate_folder(pred_dir, gt_dir, out_dir, classes=classes, check_affine=check_affine)
    print(summary_markdown(summary, problems), end="")
    print(f"tables written to {out_dir}")


if __name__ == "__main__":
    fire.Fire(main)
