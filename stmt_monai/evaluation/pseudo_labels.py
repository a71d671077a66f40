"""How good are the organ teacher's pseudo labels, raw and corrected, against a full truth?

Self-training (paper section 2.2) stands or falls with its pseudo labels. On a cohort whose full
organ truth is known (the synthetic cohort's ``truth/``, :mod:`stmt_monai.synthetic.anatomy`) each
pseudo label of the ``pseudo_label`` workflow (:data:`~stmt_monai.training.pseudo_label.PSEUDO_DATALIST`,
its training and excluded cases) is scored organ by organ with FLARE's DSC
(:func:`stmt_monai.evaluation.metrics.dice`: both empty = 1, one empty = 0), tumor voxels taken as
background in both. The organ DSC of a case is the mean over the 13 organs, as FLARE summarises;
for the partially labelled cases (stream ``cpl``) it is also split into the annotated classes A,
which the correction (self-training step 2) makes exact, and the others, where the teacher alone
speaks. The raw predictions (``raw/``, written with ``keep_raw``) are scored the same way, so the
correction's gain shows; and the teacher's quality score is checked as a ranking of the cases
(Spearman correlation with the raw organ DSC).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stmt_monai.evaluation.metrics import dice
from stmt_monai.io import load_label
from stmt_monai.labels import ORGAN_CLASSES, TUMOR
from stmt_monai.training.pseudo_label import PSEUDO_DATALIST, RAW_DIR


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def organ_scores(truth: np.ndarray, labels: np.ndarray, annotated: Sequence[int] = ()) -> dict[str, float]:
    """Organ DSC of one label map against the truth, ``(X, Y, Z)`` FLARE label maps.

    Returns:
        ``{"all", "in_A", "not_A"}``: the mean DSC of the 13 organs, of those in ``annotated``
        (NaN if none) and of the others (NaN if none).
    """
    truth, labels = np.where(truth == TUMOR, 0, truth), np.where(labels == TUMOR, 0, labels)
    scores = {c: dice(truth == c, labels == c) for c in ORGAN_CLASSES}
    a = set(int(c) for c in annotated)
    return {
        "all": _mean(list(scores.values())),
        "in_A": _mean([s for c, s in scores.items() if c in a]),
        "not_A": _mean([s for c, s in scores.items() if c not in a]),
    }


def score_pseudo_labels(pseudo_dir: str | os.PathLike, truth_dir: str | os.PathLike) -> list[dict]:
    """Score every pseudo label of a ``pseudo_label`` run against the full truth.

    Args:
        pseudo_dir: the run's output folder (its :data:`PSEUDO_DATALIST`, the pseudo labels and,
            if kept, ``raw/``).
        truth_dir: the full truth, ``<case>.nii.gz`` on the same grids.

    Returns:
        one row per case (training, then excluded for low quality): ``name``, ``stream``,
        ``quality``, ``num_annotated`` (classes in A), ``excluded`` and, for ``corrected`` (the
        written pseudo label) and ``raw`` (NaN without ``raw/``), the organ DSC
        ``<kind>``, ``<kind>_in_A`` and ``<kind>_not_A`` (:func:`organ_scores`).

    Raises:
        ImageError: a pseudo label or truth file that cannot be read, or not on the truth's grid.
    """
    pseudo_dir, truth_dir = Path(pseudo_dir), Path(truth_dir)
    content = json.loads((pseudo_dir / PSEUDO_DATALIST).read_text())
    records = [(r, False) for r in content.get("training", [])] + [(r, True) for r in content.get("excluded_low_quality", [])]
    rows = []
    for record, excluded in records:
        name, annotated = record["name"], record.get("annotated_classes", [])
        truth, affine = load_label(truth_dir / f"{name}.nii.gz")
        row = {"name": name, "stream": record["stream"], "quality": record.get("quality", math.nan), "num_annotated": len(annotated), "excluded": excluded}
        raw_path = pseudo_dir / RAW_DIR / Path(record["label"]).name
        for kind, path in (("corrected", pseudo_dir / record["label"]), ("raw", raw_path)):
            if path.is_file():
                scores = organ_scores(truth, load_label(path, truth.shape, affine)[0], annotated)
            else:
                scores = dict.fromkeys(("all", "in_A", "not_A"), math.nan)
            row |= {kind: scores["all"], f"{kind}_in_A": scores["in_A"], f"{kind}_not_A": scores["not_A"]}
        rows.append(row)
    return rows


def summarize_pseudo_labels(rows: Sequence[dict]) -> dict[str, dict]:
    """Per stream (``cpl``, ``pl``): the cases and the mean of each score of
    :func:`score_pseudo_labels` (NaN scores left out), and ``spearman_quality_raw``: the rank
    correlation of the teacher's quality score with the raw organ DSC (NaN under 3 cases)."""
    from scipy.stats import spearmanr

    keys = [f"{kind}{part}" for kind in ("raw", "corrected") for part in ("", "_in_A", "_not_A")]
    summary = {}
    for stream in sorted({r["stream"] for r in rows}):
        group = [r for r in rows if r["stream"] == stream]
        entry = {"cases": len(group)}
        for key in keys:
            entry[key] = _mean([r[key] for r in group if not math.isnan(r[key])])
        pairs = [(r["quality"], r["raw"]) for r in group if not (math.isnan(r["quality"]) or math.isnan(r["raw"]))]
        entry["spearman_quality_raw"] = float(spearmanr(*zip(*pairs)).statistic) if len(pairs) >= 3 else math.nan
        summary[stream] = entry
    return summary
