"""Pseudo labels of the self-training teacher: self-training step 2 (paper section 2.2, Fig. 2a).

The teacher, trained on the fully organ labelled cases (step 1), predicts every partially
labelled and unlabelled case; a partial case's prediction is corrected with its annotation
(:func:`stmt_monai.training.self_training.correct_pseudo_label`, the paper's exact rule) into a *corrected pseudo label* (CPL); an unlabelled case keeps its plain *pseudo label*
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
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from stmt_monai.data.datalists import load_datalist
from stmt_monai.io import case_name, load_label, save_label_map, write_text_atomic
from stmt_monai.labels import TUMOR
from stmt_monai.preprocessing.fingerprint import Fingerprint
from stmt_monai.preprocessing.geometry import CaseGeometry, restore_label_map
from stmt_monai.training.losses import CPL, PL
from stmt_monai.training.self_training import (
    annotated_organ_classes,
    correct_pseudo_label,
)

logger = logging.getLogger(__name__)


#: file name of the job's output datalist, in the pseudo-label folder
PSEUDO_DATALIST = "datalist_pseudo_labelled.json"


#: sub-folder of the uncorrected teacher predictions (``keep_raw=True``)
RAW_DIR = "raw"


def teacher_confidence(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Quality score of a pseudo label: the teacher's mean confidence in the organs it predicts.

    The mean, over the voxels the teacher labels as an organ (argmax > 0), of the softmax
    probability of that organ. 1.0 is a fully confident prediction; a case in which the teacher
    finds no organ at all scores 0.0 (an abdominal CT without organs is a failed prediction).

    Args:
        probabilities: ``(C, *spatial)`` softmax output of one case.
        labels: ``(*spatial)`` its argmax.

    Returns:
        The score in [0, 1].
    """
    foreground = labels > 0
    if not bool(foreground.any()):
        return 0.0
    top = probabilities.gather(0, labels[None].long())[0]
    return float(top[foreground].double().mean())


def keep_annotated_tumor(pseudo_label: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    """Write the annotation's tumor voxels (label 14) into a pseudo label, in place.

    The teacher predicts organs only; an annotated tumor is foreground for the stage-1 student,
    which reads the same pseudo labels (the organ student maps tumor to 0 on load).

    Args:
        pseudo_label: ``(X, Y, Z)`` FLARE labels, modified in place.
        annotation: the case's partial annotation on the same grid.

    Returns:
        ``pseudo_label``.
    """
    pseudo_label[np.asarray(annotation) == TUMOR] = TUMOR
    return pseudo_label


def predict_case(network: torch.nn.Module, inferer, data: Mapping, device: str | torch.device) -> tuple[np.ndarray, float]:
    """The teacher's label map of one preprocessed case, on the input file's own grid.

    Args:
        network: the teacher, on ``device``, in eval mode.
        inferer: its sliding-window inferer, ``inferer(image, network) -> logits``.
        data: output of the teacher's preprocessing: ``image`` ``(1, *spatial)`` normalised CT at
            the teacher's spacing and ``geometry`` (JSON of the :class:`CaseGeometry`).
        device: where to run the network.

    Returns:
        ``(labels, quality)``: ``(X, Y, Z)`` uint8 organ labels in the file's voxel order and
        :func:`teacher_confidence`.
    """
    image = torch.as_tensor(data["image"])[None].to(device)
    with torch.no_grad():
        probabilities = torch.softmax(inferer(image, network)[0].float(), dim=0)
        labels = probabilities.argmax(dim=0)
        quality = teacher_confidence(probabilities, labels)
    del probabilities
    return restore_label_map(labels.cpu(), CaseGeometry.from_json(data["geometry"])), quality


class _SafeLoad:
    """The teacher's preprocessing of one job item; a failure becomes ``{"error": ...}``.

    Picklable, so a DataLoader's workers can run it (prefetching the next cases while the
    teacher predicts), and a bad case does not end the job.
    """

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, item: Mapping) -> dict:
        try:
            inputs = {"image": item["image"], **({"roi": item["roi"]} if item.get("roi") is not None else {})}
            return {"item": dict(item), "data": self.preprocessing(inputs)}
        except Exception as err:  # noqa: BLE001 - any bad input is reported and skipped
            while err.__cause__ is not None:  # MONAI's Compose wraps the transform's own error
                err = err.__cause__
            return {"item": dict(item), "error": f"{type(err).__name__}: {err}"}


class _JobData(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Mapping], load: _SafeLoad):
        self.items, self.load = list(items), load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.load(self.items[index])


def _job_items(jobs: str | os.PathLike | Sequence[Mapping], key: str = "training") -> list[dict]:
    items = load_datalist(jobs, key) if isinstance(jobs, (str, os.PathLike)) else [dict(i) for i in jobs]
    for item in items:
        item.setdefault("name", case_name(item["image"]))
    names = [item["name"] for item in items]
    if len(set(names)) != len(names):
        raise ValueError("pseudo-label jobs hold duplicate case names; each case's output is <name>.nii.gz")
    return items


def _previous_records(datalist: Path) -> dict[str, dict]:
    """Records of a previous run's datalist, by case name (none if missing or unreadable)."""
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        return {}
    return {r["name"]: r for key in ("training", "excluded_low_quality") for r in content.get(key, []) if "name" in r}


def generate_pseudo_labels(
    network: torch.nn.Module,
    inferer,
    jobs: str | os.PathLike | Sequence[Mapping],
    fingerprint: Fingerprint | Mapping | str | os.PathLike,
    out_dir: str | os.PathLike,
    teacher_spacing_mm: Sequence[float],
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    quality_threshold: float | None = None,
    keep_raw: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    jobs_key: str = "training",
    roi_dir: str | os.PathLike | None = None,
) -> dict:
    """Predict, correct and write the pseudo label of every job case (self-training step 2).

    For each case: the teacher's preprocessing (whole CT, canonical RAS, resampled to
    ``teacher_spacing_mm``, clipped and z-scored with ``fingerprint``), sliding-window
    prediction, argmax, restored to the file's grid. With an annotation (``label``), the set A
    of annotated organ classes is taken from it and the prediction is corrected
    (:func:`~stmt_monai.training.self_training.correct_pseudo_label`), then annotated tumor voxels are
    written in (:func:`keep_annotated_tumor`): stream ``"cpl"``. Without annotated organs, the
    prediction is kept as is: stream ``"pl"``.

    Args:
        network: the trained teacher (``stmt_monai.networks.teacher_network``), on ``device``.
        inferer: its sliding-window inferer (``stmt_monai.networks.sliding_window_inferer``).
        jobs: datalist JSON (``datalist_pseudo_label_jobs.json`` of ``stmt-prepare-data``) or
            its items: ``{"image", "label" (partial annotation, optional), "name", "kind"}``.
        fingerprint: the intensity fingerprint the teacher was trained with (object, dict, path).
        out_dir: output folder: ``<name>.nii.gz`` per case and :data:`PSEUDO_DATALIST`.
        teacher_spacing_mm: the teacher's input voxel size (mm), as in its training.
        device: where the teacher runs.
        overwrite: predict every case again, even those already done.
        quality_threshold: if given, cases whose :func:`teacher_confidence` is below it are left
            out of the datalist's ``training`` list (listed under ``excluded_low_quality``; their
            files are still written, so another threshold needs no new prediction). ``None``
            (default, the paper): every case is used.
        keep_raw: also write the uncorrected predictions as ``raw/<name>.nii.gz`` (for
            measuring what the correction gains, ``benchmarks/pseudo_label_quality.py``).
        num_workers: DataLoader workers that load and resample the next cases meanwhile.
        progress: log the progress (cases done, time left; :class:`stmt_monai.progress.ProgressLog`),
            as plain lines that read the same in a terminal and a log file.
        jobs_key: datalist key of the jobs.
        roi_dir: for a teacher trained on the region of interest (``train_teacher``'s
            ``teacher_crop_roi``): masks ``<name>.nii.gz`` (e.g. stage 1's predictions) whose
            bounding box + margin is each case's region; the teacher predicts inside it and the
            pseudo label is background outside it. A case without a mask is predicted whole.
            ``None`` (default): the whole CT, as before stage 1 exists.

    Returns:
        Summary ``{"datalist", "predicted", "skipped", "failed", "excluded", "cpl", "pl"}``:
        the datalist path, counts of predicted / skipped cases, the failures
        (``[{"name", "image", "error"}]``), names below the quality threshold, and the number
        of each stream in ``training``.

    The datalist (MONAI format, paths relative to ``out_dir``) is
    ``{"training": [{"image", "label", "name", "stream", "annotated_classes", "quality"}, ...],
    "excluded_low_quality": [...], "failed": [...], ...}``, read by
    :func:`stmt_monai.data.datalists.student_datalist`.
    """
    from stmt_monai.preprocessing.transforms import stage_transforms
    from stmt_monai.progress import ProgressLog

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datalist_path = out / PSEUDO_DATALIST
    items = _job_items(jobs, jobs_key)
    previous = {} if overwrite else _previous_records(datalist_path)

    def done(item: Mapping) -> bool:
        name = item["name"]
        files = [out / f"{name}.nii.gz"] + ([out / RAW_DIR / f"{name}.nii.gz"] if keep_raw else [])
        return name in previous and all(f.exists() for f in files)

    records: dict[str, dict] = {item["name"]: previous[item["name"]] for item in items if done(item)}
    todo = [item for item in items if item["name"] not in records]
    failed: list[dict] = []
    spacing = [float(s) for s in teacher_spacing_mm]

    def write_datalist() -> None:
        ordered = [records[item["name"]] for item in items if item["name"] in records]
        passed = [quality_threshold is None or r["quality"] >= quality_threshold for r in ordered]
        content = {
            "description": "organ teacher pseudo labels: 'cpl' corrected with the partial annotation, 'pl' plain",
            "teacher_spacing_mm": spacing,
            "quality_score": "teacher confidence: mean softmax probability of the predicted organ over predicted organ voxels",
            "quality_threshold": quality_threshold,
            "training": [r for r, ok in zip(ordered, passed) if ok],
            "excluded_low_quality": [r for r, ok in zip(ordered, passed) if not ok],
            "failed": failed,
        }
        write_text_atomic(datalist_path, json.dumps(content, indent=1) + "\n")

    if roi_dir is not None:
        from stmt_monai.data.datalists import attach_roi

        todo = attach_roi(todo, roi_dir)
    preprocessing = stage_transforms(
        "organ", fingerprint, None, train=False, crop_roi=roi_dir is not None, target_spacing_mm=spacing
    )
    loader = torch.utils.data.DataLoader(
        _JobData(todo, _SafeLoad(preprocessing)), batch_size=None, num_workers=int(num_workers)
    )
    network.eval()
    bar = ProgressLog("pseudo labels", len(todo), log=logger, enabled=progress)
    if progress and len(items) > len(todo):
        logger.info(f"pseudo labels: {len(items) - len(todo)} of {len(items)} cases already done (kept)")
    bar.start()

    def counted(cases):
        for loaded in cases:
            yield loaded
            bar.update(note=loaded["item"]["name"])  # after the case's body, failed or not

    for loaded in counted(loader):
        item = loaded["item"]
        name = item["name"]
        try:
            if "error" in loaded:
                raise RuntimeError(loaded["error"])
            raw, quality = predict_case(network, inferer, loaded["data"], device)
            geometry = CaseGeometry.from_json(loaded["data"]["geometry"])
            classes: tuple[int, ...] = ()
            pseudo = raw
            if item.get("label"):
                annotation, _ = load_label(item["label"], geometry.shape, geometry.affine)
                classes = annotated_organ_classes(annotation)
                pseudo = keep_annotated_tumor(correct_pseudo_label(raw, annotation, classes), annotation)
                if item.get("kind") == "partial" and not classes:
                    logger.warning(f"{name}: listed as partial but its annotation holds no organ: plain pseudo label")
            if keep_raw:
                save_label_map(out / RAW_DIR / f"{name}.nii.gz", raw, geometry.affine)
            save_label_map(out / f"{name}.nii.gz", pseudo, geometry.affine)
        except Exception as err:  # noqa: BLE001 - report the case and go on with the others
            message = str(err) if "error" in loaded else f"{type(err).__name__}: {err}"
            logger.error(f"pseudo label of {name} failed: {message}")
            failed.append({"name": name, "image": os.path.relpath(item["image"], out), "error": message})
            continue
        records[name] = {
            "image": os.path.relpath(item["image"], out),
            "label": f"{name}.nii.gz",
            "name": name,
            "stream": CPL if classes else PL,
            "annotated_classes": list(classes),
            "quality": round(quality, 6),
        }
        write_datalist()
    bar.finish()
    write_datalist()

    kept = json.loads(datalist_path.read_text())
    excluded = [r["name"] for r in kept["excluded_low_quality"]]
    summary = {
        "datalist": str(datalist_path),
        "predicted": len(todo) - len(failed),
        "skipped": len(items) - len(todo),
        "failed": failed,
        "excluded": excluded,
        "cpl": sum(r["stream"] == CPL for r in kept["training"]),
        "pl": sum(r["stream"] == PL for r in kept["training"]),
    }
    logger.info(
        f"pseudo labels in {out}: {summary['predicted']} predicted, {summary['skipped']} already done, "
        f"{len(failed)} failed; training list {summary['cpl']} CPL + {summary['pl']} PL"
    )
    if quality_threshold is not None:
        logger.info(f"quality threshold {quality_threshold}: {len(excluded)} case(s) left out: {', '.join(excluded) or '-'}")
    for failure in failed:
        logger.info(f"failed: {failure['name']}: {failure['error']}")
    return summary
