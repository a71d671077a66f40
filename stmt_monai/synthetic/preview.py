"""A picture of a few cases of a synthetic cohort (``docs/cohort_examples.png``).

:func:`example_cases` picks cases that show the cohort's variety (a lesion outside the organs,
an upper-abdomen field of view, an anisotropic spacing); :func:`cohort_preview` draws each one's
image with its full truth, one row per case, with :func:`stmt_monai.inference.preview.overlay_grid`.
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
