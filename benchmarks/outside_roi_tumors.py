"""Tumors outside stage 1's box: what the cascade's optional whole-volume pass finds (not a test).

    python benchmarks/outside_roi_tumors.py --runs "runs/ablation_tumor64/seed*/fst" \\
        --work_dir runs/outside_roi --output docs/outside_roi_tumors.json

The cascade looks for tumors only inside the box around stage 1's abdomen; ``--outside_tumors``
(:mod:`stmt_monai.inference.outside_roi`) runs the tumor network once more over the whole volume and
adds the tumors it finds outside that box. This measures, for each trained tumor model given:

- on held-out generated cases (the ablation's cohort settings, :data:`ablation.COHORT`, with half of
  the lesions placed outside the organs in the lower abdomen, ``--outside_share``), stage 1's
  box being the true organs' box plus the cascade's 10 mm margin (a perfect stage 1, as in the
  ablation): the lesions lying mostly outside that box, how many the step recovers (a predicted
  voxel on the lesion), the false components it adds (touching no true lesion) per case, on cases
  without such a lesion and on all;
- the same for each ``--min_volume_ml`` (the step's floor on a component's volume outside the box).

Its seconds per case at paper size come from ``benchmarks/cascade_speed.py --configs "default,outside
tumors"`` (one process per case, the default beside it in the same run).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import shutil
import sys
import time
from pathlib import Path

import cc3d
import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import COHORT

from stmt_monai.evaluation.lesions import lesion_detection
from stmt_monai.inference.backends import cpu_model
from stmt_monai.inference.bundles import default_bundles_dir
from stmt_monai.inference.outside_roi import OUTSIDE_MIN_VOLUME_ML, outside_roi_tumors
from stmt_monai.inference.postprocessing import CONNECTIVITY
from stmt_monai.inference.stage import StageModel
from stmt_monai.io import case_name, find_cases, load_image, load_label
from stmt_monai.labels import ORGAN_CLASSES, TUMOR
from stmt_monai.preprocessing.geometry import to_canonical
from stmt_monai.preprocessing.roi import ROI_MARGIN_MM, abdomen_roi
from stmt_monai.synthetic.annotation import make_cohort


def tumor_stage(run_dir: Path, work: Path, backend: str) -> StageModel:
    """The tumor bundle's configs with a trained run's ``models/`` (as the cascade loads a stage)."""
    root = work / "bundles" / "_".join(run_dir.resolve().parts[-2:])
    if not (root / "configs").is_dir():
        shutil.copytree(default_bundles_dir() / "tumor_meanteacher" / "configs", root / "configs")
    if not (root / "models").exists():
        (root / "models").symlink_to((run_dir / "models").resolve(), target_is_directory=True)
    return StageModel.from_bundle(root, "tumor", weights="trained", backend=backend)


def score_case(truth: np.ndarray, inside_box: np.ndarray, pred: np.ndarray | None) -> dict:
    """Lesions mostly outside the box, how many ``pred`` touches, and its false components
    (:func:`~stmt_monai.evaluation.lesions.lesion_detection`'s); all three on one grid."""
    lesions, n = cc3d.connected_components(truth == TUMOR, connectivity=CONNECTIVITY, return_N=True)
    total = np.bincount(lesions.ravel(), minlength=n + 1)
    in_box = np.bincount(lesions[inside_box], minlength=n + 1)
    outside = [i for i in range(1, n + 1) if in_box[i] < 0.5 * total[i]]
    pred = np.zeros(truth.shape, bool) if pred is None else pred > 0
    hit = set(np.unique(lesions[pred]).tolist()) - {0}
    false = lesion_detection(truth == TUMOR, pred)["false_components"]
    return {"outside_lesions": len(outside), "recovered": sum(i in hit for i in outside), "false_components": false}


def main(
    runs: str,
    work_dir: str = "runs/outside_roi",
    num_cases: int = 48,
    seed: int = 1,
    outside_share: float = 0.5,
    min_volume_ml: str | float | tuple = (0.1, OUTSIDE_MIN_VOLUME_ML, 2.0),
    backend: str = "torch",
    output: str | None = None,
) -> dict:
    """Score every run matched by ``runs`` (a glob of tumor training runs, each with ``models/``).

    Args:
        runs: e.g. ``"runs/ablation_tumor64/seed*/fst"``.
        work_dir: held-out cases (``cases/``, made once) and the bundle copies.
        num_cases, seed, outside_share: the held-out cases: how many, the generator's seed, the
            share of lesions placed outside the organs (the ablation's cohort: 0.15).
        min_volume_ml: the step's volume floors to score (comma-separated).
        backend: the tumor network's backend (``torch``: no OpenVINO conversion per run).
        output: also write the results as JSON here.
    """
    work = Path(work_dir)
    cases_dir = work / "cases"
    config = dataclasses.replace(COHORT, num_labelled=0, num_unlabelled=0, num_validation=0, num_test=int(num_cases), outside_tumor_share=float(outside_share))
    if not (cases_dir / "policy.json").is_file():
        make_cohort(cases_dir, config, seed=int(seed), workers=2)
    floors = [float(v) for v in (min_volume_ml.split(",") if isinstance(min_volume_ml, str) else np.atleast_1d(min_volume_ml))]
    images = find_cases(cases_dir / "test" / "images")
    run_dirs = sorted(Path(p) for p in glob.glob(runs) if (Path(p) / "models" / "model.pt").is_file())
    if not run_dirs:
        raise FileNotFoundError(f"{runs}: no tumor training run with models/model.pt")
    results = {"cases": len(images), "seed": int(seed), "outside_share": float(outside_share), "cpu": cpu_model(), "runs": {}}
    for run in run_dirs:
        model = tumor_stage(run, work, backend)
        per_floor = {floor: [] for floor in floors}
        seconds = []
        for path in images:
            image, affine = load_image(path)
            truth, _ = load_label(cases_dir / "test" / "labels" / f"{case_name(path)}.nii.gz", image.shape, affine)
            canonical = to_canonical(image, affine, contiguous=False)
            spacing = np.sqrt((canonical[1][:3, :3] ** 2).sum(0))
            truth = to_canonical(truth, affine, contiguous=False)[0]  # scored on the canonical grid, as the box is
            box = abdomen_roi(np.isin(truth, ORGAN_CLASSES), spacing, ROI_MARGIN_MM)  # a perfect stage 1 and the cascade's margin
            inside = np.zeros(truth.shape, bool)
            inside[tuple(slice(s, e) for s, e in zip(*box))] = True
            for floor in floors:
                start = time.perf_counter()
                pred = outside_roi_tumors(model, image, affine, box, canonical=canonical, min_volume_ml=floor)
                if floor == floors[0]:
                    seconds.append(time.perf_counter() - start)
                per_floor[floor].append(score_case(truth, inside, None if pred is None else to_canonical(pred, affine, contiguous=False)[0]))
        rows = {}
        for floor, scores in per_floor.items():
            without = [s for s in scores if s["outside_lesions"] == 0]
            rows[str(floor)] = {
                "outside_lesions": sum(s["outside_lesions"] for s in scores),
                "recovered": sum(s["recovered"] for s in scores),
                "cases_with_outside_lesions": len(scores) - len(without),
                "false_components_per_case_without": round(sum(s["false_components"] for s in without) / max(len(without), 1), 3),
                "false_components_per_case": round(sum(s["false_components"] for s in scores) / len(scores), 3),
            }
        results["runs"][str(run)] = {"spatial_size": list(model.spatial_size), "seconds_per_case": round(float(np.median(seconds)), 3), "floors": rows}
    print(f"{len(images)} held-out cases (seed {seed}, outside share {outside_share}); CPU: {results['cpu']}\n")
    print("| run | floor (ml) | outside lesions recovered | false components per case (cases without / all) | s per case |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for run, r in results["runs"].items():
        for floor, row in r["floors"].items():
            print(f"| {run} | {floor} | {row['recovered']} / {row['outside_lesions']} | "
                  f"{row['false_components_per_case_without']:.2f} / {row['false_components_per_case']:.2f} | {r['seconds_per_case']:.2f} |")
    if output:
        Path(output).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    fire.Fire(main)
