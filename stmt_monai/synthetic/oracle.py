"""Pseudo labels of the self-training teacher: steps 2 and 3 of self-training (paper Fig. 2a).

SPEC.md, "Organs by self-training": the teacher, trained on the fully organ labelled cases,
predicts every partially labelled and unlabelled case; a partial case's prediction is corrected
with its annotation (:func:`stmt_monai.training.self_training.correct_pseudo_label`, the paper's exact
rule) into a *corrected pseudo label* (CPL); an unlabelled case keeps its plain *pseudo label*
(PL). :func:`generate_pseudo_labels` is the batch job behind the ``pseudo_label`` workflow of
``bundles/organ_selftrain``:

- one case at a time (nothing is held all at once), the teacher's fixed-spacing whole-CT input
  from :func:`stmt_monai.preprocessing.transforms.stage_transforms` (no region-of-interest crop: unlabelled
  cases have none before stage 1), sliding-window inference, argmax, back to the file's own
  grid (:func:`stmt_monai.preprocessing.geometry.restore_label_map`), correction at the annotation's own
  resolution, atomic NIfTI write;
- resumable: a case whose pseudo label and datalist record exist is skipped; the datalist is
  rewritten (atomically) after every case, so a killed job leaves a valid datalist;
- a bad case (unreadable file, label on another grid...) is reported and skipped;
- beyond the paper (its own future work, section 4.5): a quality score per case (the teacher's
  confidence, :func:`teacher_confidence`) and an optional threshold that leaves the worst cases
  out of the student's datalist. Off by default.

Label space: pseudo labels are FLARE label maps (organs 1..13) because one organ teacher serves
both self-training stages: the stage-1 student reads them as "every label > 0 is abdomen", the
organ student maps tumor to 0 on load (:func:`stmt_monai.labels.stage_target_map`). The teacher
never predicts tumor; a partial case's *annotated* tumor (label 14) is kept in its written
pseudo label (:func:`keep_annotated_tumor`), since stage 1's target is every label > 0.
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
