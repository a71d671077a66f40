"""The annotation policy of a synthetic cohort and the cohort written in FLARE23's layout.

**Annotation policy** (:func:`annotation_plan`, :func:`make_cohort`), as FLARE23 pools datasets
(the categories of the paper's Fig. 1): of the labelled cases a small share is fully organ
labelled, many are partial (single-organ datasets: liver only, kidneys only (both kidneys),
pancreas only, spleen only; and random organ subsets), some have no organ label; most cases
carry tumor annotations, some of those with a second tumor left unannotated (background in the
label, tumor in the hidden truth); plus an unlabelled pool. Partial labels are always a subset of
the hidden full truth (same value wherever they are > 0).

Output (FLARE23 layout)::

    imagesTr/<name>_0000.nii.gz  labelsTr/<name>.nii.gz   labelled training cases (partial labels)
    unlabeled/<name>_0000.nii.gz                           the unlabelled pool
    validation/images, validation/labels                   fully labelled (all organs and tumors)
    test/images, test/labels                               fully labelled
    truth/<name>.nii.gz                                    hidden full truth of every training case
    policy.json                                            each case's category and the counts

Images are int16 HU, labels uint8; files are byte-for-byte reproducible from the seed
(nibabel writes gzip with mtime 0 and no file name).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from stmt_monai.data.triage import LAYOUT, category_counts
from stmt_monai.io import save_label_map, save_nifti, write_text_atomic
from stmt_monai.labels import BACKGROUND, ORGAN_CLASSES, ORGANS, TUMOR
from stmt_monai.synthetic.case import synthesize_case
from stmt_monai.synthetic.config import ANNOTATION_KINDS, CohortConfig


# ----------------------------------------------------------------------------- the cohort
def _largest_remainder(shares: dict[str, float], n: int) -> dict[str, int]:
    """Integer counts summing to ``n`` closest to ``shares * n``."""
    raw = {k: v * n for k, v in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], list(raw).index(k)))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def annotation_plan(config: CohortConfig, seed: int) -> list[dict]:
    """The policy of every case before drawing it: split, name, annotation kind, tumor plan.

    Labelled cases get exact annotation-kind counts (largest remainder, at least one fully
    labelled case when there are two or more), shuffled; tumor-annotated ones get 1..3 lesions,
    a share of those a second unannotated lesion (2..3 lesions, the last left out).
    """
    rng = np.random.default_rng([seed, 0])
    plan: list[dict] = []
    n_lab = config.num_labelled
    counts = _largest_remainder(config.annotation_shares(), n_lab)
    if n_lab >= 2 and counts["fully"] == 0:
        donor = max(counts, key=counts.get)
        counts[donor] -= 1
        counts["fully"] += 1
    kinds = [k for k, c in counts.items() for _ in range(c)]
    kinds = [kinds[i] for i in rng.permutation(n_lab)]
    n_tumor = int(round(config.tumor_annotated_share * n_lab))
    annotated = set(rng.permutation(n_lab)[:n_tumor].tolist())
    n_second = int(round(config.unannotated_tumor_share * n_tumor))
    second = set(sorted(annotated)[i] for i in rng.permutation(len(annotated))[:n_second])
    probs = np.asarray(config.tumor_count_probs, float)
    probs = probs / probs.sum()
    for i in range(n_lab):
        kind = kinds[i]
        subset = ANNOTATION_KINDS[kind]
        if subset is None:  # random subset: 2..12 organs
            subset = tuple(sorted(rng.choice(ORGAN_CLASSES, rng.integers(2, len(ORGAN_CLASSES)), replace=False).tolist()))
        if i in second:
            n_t, n_annot = int(rng.integers(2, 4)), None
        elif i in annotated:
            n_t = int(rng.choice([1, 2, 3], p=probs[1:] / probs[1:].sum()))
            n_annot = n_t
        else:
            n_t, n_annot = int(rng.choice(len(probs), p=probs)), 0
        if n_annot is None:
            n_annot = n_t - 1
        plan.append({"split": "labelled", "annotation": kind, "annotate_organs": list(subset), "num_tumors": n_t, "annotate_tumors": n_annot})
    for split, n in (("unlabelled", config.num_unlabelled), ("validation", config.num_validation), ("test", config.num_test)):
        for _ in range(n):
            plan.append({"split": split, "num_tumors": int(rng.choice(len(probs), p=probs))})
    train = 0
    per_split = {"validation": 0, "test": 0}
    for index, entry in enumerate(plan):
        entry["seed"] = [int(seed), 1, index]
        if entry["split"] in ("labelled", "unlabelled"):
            train += 1
            entry["name"] = f"FLARE23Syn_{train:04d}"
        else:
            per_split[entry["split"]] += 1
            prefix = "FLARE23SynVal" if entry["split"] == "validation" else "FLARE23SynTs"
            entry["name"] = f"{prefix}_{per_split[entry['split']]:04d}"
    return plan


def _make_one(out_dir: str, config: CohortConfig, entry: dict) -> dict:
    """Generate one planned case, write its files, return its policy record."""
    case = synthesize_case(entry["seed"], config, entry["num_tumors"])
    out = Path(out_dir)
    name, split = entry["name"], entry["split"]
    paths = case_paths(name, split)
    record = {"split": split, **case.info}
    present = sorted(int(v) for v in np.unique(case.labels) if v in ORGANS)
    record["organs_in_truth"] = present
    if split == "labelled":
        organs = sorted(set(entry["annotate_organs"]) & set(present))
        annotated_lesions = np.arange(1, entry["annotate_tumors"] + 1)
        keep = np.isin(case.labels, organs) | ((case.labels == TUMOR) & np.isin(case.tumors, annotated_lesions))
        partial = np.where(keep, case.labels, BACKGROUND).astype(np.uint8)
        tumor_annotated = bool((partial == TUMOR).any())
        record.update(
            annotation=entry["annotation"],
            organs=organs,
            tumor_annotated=tumor_annotated,
            unannotated_tumor=bool(((case.labels == TUMOR) & (partial != TUMOR)).any()),
        )
        save_nifti(out / paths["image"], case.image, case.affine, dtype=np.int16)
        save_label_map(out / paths["label"], partial, case.affine)
        save_label_map(out / paths["truth"], case.labels, case.affine)
    elif split == "unlabelled":
        record.update(annotation="unlabelled", organs=[], tumor_annotated=False, unannotated_tumor=bool(case.info["num_tumors"]))
        save_nifti(out / paths["image"], case.image, case.affine, dtype=np.int16)
        save_label_map(out / paths["truth"], case.labels, case.affine)
    else:
        record.update(annotation="full_truth", organs=present, tumor_annotated=bool(case.info["num_tumors"]), unannotated_tumor=False)
        save_nifti(out / paths["image"], case.image, case.affine, dtype=np.int16)
        save_label_map(out / paths["label"], case.labels, case.affine)
    return record


def make_cohort(out_dir: str | os.PathLike, config: CohortConfig = CohortConfig(), seed: int = 0, workers: int = 1, progress: bool = True) -> dict:
    """Generate a cohort in FLARE23 layout under ``out_dir`` (see the module docstring).

    Args:
        out_dir: output folder (created); synthetic case files of an earlier run there that this
            cohort does not have are deleted, so the folder holds exactly this cohort.
        config: counts, size and policy (:class:`CohortConfig`).
        seed: the same seed and config give the same files, byte for byte.
        workers: processes generating cases in parallel (the output does not depend on it).
        progress: show a tqdm progress bar.

    Returns:
        the policy written to ``out_dir/policy.json``: ``{"seed", "config", "counts", "cases"}``,
        ``cases`` mapping each name to its split, annotation kind, annotated organ set
        (``organs``), ``tumor_annotated``, ``unannotated_tumor``, lesion sites, field of view,
        spacing and phase; ``counts`` in the format of :func:`stmt_monai.data.triage.category_counts`.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = annotation_plan(config, seed)
    bar = tqdm(total=len(plan), desc="cohort", unit="case", disable=not progress)
    records: dict[str, dict] = {}
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_make_one, str(out), config, entry) for entry in plan]
            for entry, future in zip(plan, futures):
                records[entry["name"]] = future.result()
                bar.update()
    else:
        for entry in plan:
            records[entry["name"]] = _make_one(str(out), config, entry)
            bar.update()
    bar.close()
    _remove_stale_cases(out, records)
    training = [
        {"organs": r["organs"], "tumor": r["tumor_annotated"], "labelled": r["split"] == "labelled"}
        for r in records.values()
        if r["split"] in ("labelled", "unlabelled")
    ]
    counts = category_counts(training)
    counts["validation"] = config.num_validation
    counts["test"] = config.num_test
    policy = {"seed": int(seed), "config": dataclasses.asdict(config), "counts": counts, "cases": records}
    write_text_atomic(out / "policy.json", json.dumps(policy, indent=1) + "\n")
    return policy


def case_paths(name: str, split: str) -> dict[str, str]:
    """Relative paths of a case's files by kind (``image``, ``label``, ``truth``) in the layout."""
    if split == "labelled":
        return {
            "image": f"{LAYOUT['images']}/{name}_0000.nii.gz",
            "label": f"{LAYOUT['labels']}/{name}.nii.gz",
            "truth": f"{LAYOUT['truth']}/{name}.nii.gz",
        }
    if split == "unlabelled":
        return {"image": f"{LAYOUT['unlabelled']}/{name}_0000.nii.gz", "truth": f"{LAYOUT['truth']}/{name}.nii.gz"}
    return {"image": f"{LAYOUT[split + '_images']}/{name}_0000.nii.gz", "label": f"{LAYOUT[split + '_labels']}/{name}.nii.gz"}


def _remove_stale_cases(out: Path, records: Mapping[str, Mapping]) -> None:
    """Delete synthetic case files of an earlier run in ``out`` that are not files of this cohort."""
    keep = {out / p for name, r in records.items() for p in case_paths(name, r["split"]).values()}
    for folder in set(LAYOUT.values()):
        for path in (out / folder).glob("FLARE23Syn*.nii.gz"):
            if path not in keep:
                path.unlink()


def case_files(cohort_dir: str | os.PathLike, name: str, record: Mapping) -> tuple[Path, Path]:
    """``(image, full_truth)`` paths of a case of a cohort written by :func:`make_cohort`."""
    paths = case_paths(name, record["split"])
    return Path(cohort_dir) / paths["image"], Path(cohort_dir) / paths.get("truth", paths.get("label"))
