"""A synthetic FLARE23-like cohort made from one real abdominal CT and its organ mask.

The source is the TotalSegmentator CT shipped in ``stmt_monai/example_data`` (3 mm, RAS, HU,
non-contrast, abdomen down to the pelvis; FLARE organ labels, no esophagus, no tumor). Every
case is drawn from a seed (:func:`synthesize_case`):

- anatomy: a random affine (rotation, anisotropic scaling, translation) and a smooth elastic
  deformation (cubic B-spline field), applied to image and mask in one resampling
  (``scipy.ndimage.map_coordinates``, order 1 for HU, order 0 for labels) of the source in world
  coordinates, so the output grid (field of view, spacing) is independent of the source's;
- field of view: some cases upper abdomen only, some down to the pelvis; random in-plane margins
  (extra air or a tighter crop that never cuts an organ); output in-plane spacing follows from
  ``size`` voxels across the field of view; some cases get an anisotropic slice spacing;
- intensity: a contrast phase per case (per-organ HU shifts), global offset, blur and noise;
- tumors: 0..3 lobulated lesions (5..40 mm, mostly hypodense) in liver, kidneys, pancreas,
  spleen or stomach, and some outside every organ in the lower abdomen (the paper's hard case),
  all labelled :data:`~stmt_monai.labels.TUMOR`.

**Esophagus.** The source mask has no esophagus label. So that "fully organ labelled"
means what it means on FLARE (all 13 organ classes annotated), the source is given a plausible
abdominal esophagus once, before any case is drawn (:func:`source_volume`): a soft-tissue tube of
7 mm radius from the top slice, anterior-left of the aorta, down to the stomach's cardia, drawn
only on background voxels. Every case's full truth therefore holds all 13 organs (unless a
deformation squeezes a tiny one out of a coarse grid; the annotation set is always taken from
what is actually present, so policy and files agree).

**Annotation policy** (:func:`make_cohort`), as FLARE23 pools datasets: of the labelled cases a
small share is fully organ labelled, many are partial (single-organ datasets: liver only,
kidneys only (both kidneys), pancreas only, spleen only; and random organ subsets), some have no
organ label; most cases carry tumor annotations, some of those with a second tumor left
unannotated (background in the label, tumor in the hidden truth); plus an unlabelled pool.
Partial labels are always a subset of the hidden full truth (same value wherever they are > 0).

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

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from stmt_monai.io import load_image, load_label
from stmt_monai.synthetic.annotation import case_files
from stmt_monai.synthetic.tumors import OUTSIDE


def example_cases(policy: Mapping, n: int = 3) -> list[str]:
    """Names of ``n`` training cases that show the cohort's variety, for a preview figure.

    One case each, in this order: a lesion outside the organs, an upper-abdomen field of view,
    an anisotropic spacing, any lesion; within each, the case with the largest lesion (so the
    picture shows one).
    """
    cases = {k: v for k, v in sorted(policy["cases"].items()) if v["split"] in ("labelled", "unlabelled")}
    tests = [
        lambda r: OUTSIDE in r["tumor_sites"],
        lambda r: r["fov"] == "upper_abdomen",
        lambda r: abs(r["spacing_mm"][2] - r["spacing_mm"][0]) > 0.3,
        lambda r: True,
    ]
    chosen: list[str] = []
    for test in tests + [lambda r: True] * n:
        candidates = [name for name, r in cases.items() if name not in chosen and test(r)]
        if len(chosen) < n and candidates:
            chosen.append(max(candidates, key=lambda name: max(cases[name]["tumor_volumes_mm3"], default=0.0)))
    return chosen


def cohort_preview(cohort_dir: str | os.PathLike, path: str | os.PathLike, names: Sequence[str] | None = None, n: int = 3) -> Path:
    """PNG of a few cases of a written cohort (image with its full truth), one row each.

    Args:
        cohort_dir: folder written by :func:`make_cohort` (reads ``policy.json``).
        path: output PNG (e.g. ``docs/cohort_examples.png``).
        names: cases to show; default :func:`example_cases` (``n`` of them).
    """
    from stmt_monai.inference.preview import overlay_grid

    policy = json.loads((Path(cohort_dir) / "policy.json").read_text())
    rows = []
    for name in names or example_cases(policy, n):
        record = policy["cases"][name]
        image_path, truth_path = case_files(cohort_dir, name, record)
        image, affine = load_image(image_path)
        labels, _ = load_label(truth_path, image.shape, affine)
        spacing = " x ".join(f"{s:.1f}" for s in record["spacing_mm"])
        sites = ", ".join(s.replace("outside_organs_lower_abdomen", "outside organs") for s in record["tumor_sites"]) or "none"
        title = (
            f"{name} ({record['split']}, {record['annotation']}, {len(record['organs'])} organs annotated)\n"
            f"{record['fov'].replace('_', ' ')}, {record['phase'].replace('_', ' ')}, {spacing} mm\nlesions: {sites}"
        )
        rows.append({"image": image, "labels": labels, "affine": affine, "title": title})
    return overlay_grid(rows, path)
