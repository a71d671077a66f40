"""Oracle pseudo labels of a synthetic cohort: its hidden full truth in place of the organ teacher.

:func:`oracle_pseudo_labels` writes what self-training step 2 writes (paper section 2.2; the
files and datalist of :func:`stmt_monai.training.pseudo_label.generate_pseudo_labels`, corrected
by the same :func:`~stmt_monai.training.self_training.correct_pseudo_label`), but with the cohort's
``truth/`` (tumor removed) as the teacher's prediction: a teacher with no errors, for the demo
weights, benchmarks and tests, where training a real teacher would take hours. A real dataset
has no hidden truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stmt_monai.io import load_label, save_label_map, write_text_atomic
from stmt_monai.labels import TUMOR
from stmt_monai.training.losses import CPL, PL
from stmt_monai.training.pseudo_label import PSEUDO_DATALIST, keep_annotated_tumor
from stmt_monai.training.self_training import (
    annotated_organ_classes,
    correct_pseudo_label,
)


def oracle_pseudo_labels(
    cohort_root: str | os.PathLike,
    prepared_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_per_stream: Mapping[str, int] | None = None,
) -> Path:
    """Pseudo labels of a *synthetic* cohort with its hidden full truth standing in for the
    organ teacher's prediction (benchmarks, tests and the demo weights; a real dataset has no
    hidden truth, and :func:`generate_pseudo_labels` is the real step).

    Same correction and output format as :func:`generate_pseudo_labels`: the "prediction" is
    the truth without tumor (the teacher predicts organs only); a job with an annotation is
    corrected with it (:func:`~stmt_monai.training.self_training.correct_pseudo_label`) and its
    annotated tumor written in (stream ``cpl`` if it annotates organs, else ``pl``).

    Args:
        cohort_root: the cohort folder (``stmt_monai.synthetic.annotation.make_cohort``; ``truth/<case>.nii.gz``).
        prepared_dir: triage output (``datalist_pseudo_label_jobs.json``; paths relative to it).
        out_dir: where ``<case>.nii.gz`` and :data:`PSEUDO_DATALIST` are written.
        max_per_stream: at most this many cases of a stream (e.g. ``{"cpl": 3, "pl": 2}``), to
            keep tests short; default all.

    Returns:
        The datalist's path.
    """
    root, prepared, out = Path(cohort_root), Path(prepared_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    left = dict(max_per_stream) if max_per_stream is not None else None
    records = []
    for job in json.loads((prepared / "datalist_pseudo_label_jobs.json").read_text())["training"]:
        truth, affine = load_label(root / "truth" / f"{job['name']}.nii.gz")
        pseudo, classes = np.where(truth == TUMOR, 0, truth).astype(np.uint8), ()
        if job.get("label"):
            annotation, _ = load_label(prepared / job["label"])
            classes = annotated_organ_classes(annotation)
            pseudo = keep_annotated_tumor(correct_pseudo_label(pseudo, annotation, classes), annotation)
        stream = CPL if classes else PL
        if left is not None:
            if not left.get(stream):
                continue
            left[stream] -= 1
        save_label_map(out / f"{job['name']}.nii.gz", pseudo, affine)
        records.append(
            {
                "image": str((prepared / job["image"]).resolve()),
                "label": f"{job['name']}.nii.gz",
                "name": job["name"],
                "stream": stream,
                "annotated_classes": [int(c) for c in classes],
                "quality": 1.0,
            }
        )
    path = out / PSEUDO_DATALIST
    write_text_atomic(path, json.dumps({"training": records}, indent=1) + "\n")
    return path
