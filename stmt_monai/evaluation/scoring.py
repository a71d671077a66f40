"""Score a folder of predicted label maps against a folder of ground truth, as FLARE23 does.

Paper section 3.1, by the official FLARE23 rules. The scores themselves come from
:mod:`stmt_monai.evaluation.metrics` (DSC, NSD, the empty / DSC < 0.2 / slice-range rules, the summary);
this module pairs the files, reads one case at a time, lists every case it cannot score with a
one-line reason instead of stopping, and writes the tables.

Files pair by FLARE case name (:func:`stmt_monai.io.case_name`): ground truth ``<case>.nii.gz``,
prediction ``<case>.nii.gz`` (an image-style ``<case>_0000.nii.gz`` pairs too). Voxel spacing
is the ground truth's, from its header.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stmt_monai.evaluation.metrics import flare_case_scores, scores_to_rows, summarize
from stmt_monai.io import ImageError, cases_by_name, find_cases, load_label, write_csv_atomic, write_text_atomic
from stmt_monai.labels import LABELS, ORGAN_CLASSES, TUMOR, label_name

#: files written by :func:`evaluate_folder` into ``out_dir``
PER_CASE_CSV = "per_case.csv"


SUMMARY_CSV = "summary.csv"


SUMMARY_MD = "summary.md"


PROBLEMS_CSV = "problems.csv"


def find_label_files(folder: str | os.PathLike) -> tuple[dict[str, Path], list[dict]]:
    """Label files of a folder by FLARE case name (:func:`stmt_monai.io.find_cases`, no DICOM).

    Returns:
        ``(files, problems)``: ``{case: path}`` sorted by case, and one ``{"case", "reason"}``
        per case name that two files share (neither is used).
    """
    files, shared = cases_by_name(find_cases(folder, dicom=False, allow_empty=True))
    problems = [{"case": case, "reason": f"several files in {folder}: {', '.join(p.name for p in paths)}"} for case, paths in shared.items()]
    return files, problems


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes: the column norms of a 4 x 4 affine.

    For a NIfTI file this is the header's ``pixdim`` (what the official code reads with
    ``header.get_zooms()``), also for oblique or flipped orientations.
    """
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def score_case(
    gt_path: str | os.PathLike,
    pred_path: str | os.PathLike,
    classes: Iterable[int] = tuple(LABELS),
    check_affine: bool = True,
) -> dict[int, dict[str, float]]:
    """FLARE23 scores of one prediction file against its ground-truth file.

    Args:
        gt_path: ground-truth label map (FLARE numbers 0..14); its header gives the spacing.
        pred_path: predicted label map on the same voxel grid.
        classes: label numbers to score.
        check_affine: also require the prediction's affine to match the ground truth's within
            1e-3 mm (the official code compares arrays only; a prediction written in another
            orientation would otherwise be scored voxel by voxel against the wrong anatomy).

    Returns:
        ``{label: {"dsc", "nsd"}}`` as :func:`stmt_monai.evaluation.metrics.flare_case_scores`.

    Raises:
        ImageError: either file unreadable or not a FLARE label map, or the prediction's
            shape (or affine) differs from the ground truth's.
    """
    gt, gt_affine = load_label(gt_path)
    pred, _ = load_label(pred_path, image_shape=gt.shape, image_affine=gt_affine if check_affine else None)
    return flare_case_scores(gt, pred, voxel_spacing(gt_affine), classes)


def evaluate_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    classes: Iterable[int] | int = tuple(LABELS),
    check_affine: bool = True,
    progress: bool = True,
) -> tuple[list[dict], dict, list[dict]]:
    """Score every ground-truth case that has a prediction, one case in memory at a time.

    A case without prediction, a prediction without ground truth, an unreadable file or a
    shape / affine mismatch is not scored and is listed in ``problems``; the others are scored.

    Args:
        pred_dir: folder of predictions ``<case>.nii.gz``.
        gt_dir: folder of ground truth ``<case>.nii.gz``.
        out_dir: if given, write ``per_case.csv`` (one row per case: ``<name>_dsc`` columns then
            ``<name>_nsd`` columns, as the official CSV), ``summary.csv``, ``summary.md`` and
            ``problems.csv`` there (atomically).
        classes: label numbers to score (one number or several); default the 13 organs and tumor.
        check_affine: see :func:`score_case`.
        progress: show a progress bar.

    Returns:
        ``(rows, summary, problems)``: ``rows`` from :func:`stmt_monai.evaluation.metrics.scores_to_rows`
        (one per case and class: case, label, name, dsc, nsd, as fractions in [0, 1]);
        ``summary`` from :func:`stmt_monai.evaluation.metrics.summarize`; ``problems`` one
        ``{"case", "reason"}`` per case left out, the reason one line.
    """
    classes = (int(classes),) if isinstance(classes, (int, np.integer)) else tuple(int(c) for c in classes)
    unknown = [c for c in classes if c not in LABELS]
    if unknown:
        raise ValueError(f"unknown FLARE classes {unknown}; expected numbers in {list(LABELS)}")
    gt_files, problems = find_label_files(gt_dir)
    pred_files, pred_problems = find_label_files(pred_dir)
    problems += pred_problems
    problems += [
        {"case": case, "reason": f"prediction {path} has no ground truth in {gt_dir}"}
        for case, path in pred_files.items()
        if case not in gt_files
    ]
    case_scores: dict[str, dict[int, dict[str, float]]] = {}
    for case, gt_path in tqdm(gt_files.items(), desc="FLARE23 evaluation", unit="case", disable=not progress):
        pred_path = pred_files.get(case)
        if pred_path is None:
            problems.append({"case": case, "reason": f"no prediction in {pred_dir} (expected {case}.nii.gz)"})
            continue
        try:
            case_scores[case] = score_case(gt_path, pred_path, classes, check_affine)
        except ImageError as err:
            problems.append({"case": case, "reason": str(err)})
    problems.sort(key=lambda p: p["case"])
    summary = summarize(case_scores)
    if out_dir is not None:
        write_evaluation(out_dir, case_scores, summary, problems, classes)
    return scores_to_rows(case_scores), summary, problems


def summary_rows(summary: Mapping) -> list[dict]:
    """Summary as table rows: each class, then the organ mean (before the tumor), as fractions.

    Args:
        summary: the result of :func:`stmt_monai.evaluation.metrics.summarize`.

    Returns:
        ``{"label", "name", "dsc", "nsd"}`` per row; the organ row has label ``"organs"`` and
        name ``"organ_mean"`` (mean of the organ class averages).
    """
    per_class = summary["per_class"]
    rows = [
        {"label": label, "name": label_name(label), "dsc": s["dsc"], "nsd": s["nsd"]}
        for label, s in per_class.items()
        if label in ORGAN_CLASSES
    ]
    if rows:
        rows.append({"label": "organs", "name": "organ_mean", "dsc": summary["organ_dsc"], "nsd": summary["organ_nsd"]})
    if TUMOR in per_class:
        tumor = {"dsc": summary["tumor_dsc"], "nsd": summary["tumor_nsd"]}
        rows.append({"label": TUMOR, "name": label_name(TUMOR)} | tumor)
    return rows


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def summary_markdown(summary: Mapping, problems: Sequence[Mapping] = ()) -> str:
    """Markdown table of the summary (DSC and NSD in %), followed by the list of problems."""
    lines = [
        f"FLARE23 evaluation: {summary['num_cases']} cases scored, {len(problems)} not scored",
        "",
        "| class | name | DSC (%) | NSD (%) |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [
        f"| {r['label']} | {r['name']} | {_percent(r['dsc'])} | {_percent(r['nsd'])} |" for r in summary_rows(summary)
    ]
    if problems:
        lines += ["", "Not scored:"] + [f"- {p['case']}: {p['reason']}" for p in problems]
    return "\n".join(lines) + "\n"


def write_evaluation(
    out_dir: str | os.PathLike,
    case_scores: Mapping[str, Mapping[int, Mapping[str, float]]],
    summary: Mapping,
    problems: Sequence[Mapping],
    classes: Sequence[int],
) -> None:
    """Write ``per_case.csv``, ``summary.csv``, ``summary.md`` and ``problems.csv`` into ``out_dir``."""
    out_dir = Path(out_dir)
    names = {label: label_name(label) for label in classes}
    columns = ["case"] + [f"{n}_dsc" for n in names.values()] + [f"{n}_nsd" for n in names.values()]
    per_case = [
        {"case": case}
        | {f"{names[label]}_{metric}": s[metric] for metric in ("dsc", "nsd") for label, s in scores.items()}
        for case, scores in case_scores.items()
    ]
    write_csv_atomic(out_dir / PER_CASE_CSV, columns, per_case)
    write_csv_atomic(out_dir / SUMMARY_CSV, ["label", "name", "dsc", "nsd"], summary_rows(summary))
    write_text_atomic(out_dir / SUMMARY_MD, summary_markdown(summary, problems))
    write_csv_atomic(out_dir / PROBLEMS_CSV, ["case", "reason"], problems)
