"""Generate a synthetic FLARE23-like cohort from the shipped real CT (stmt_monai.synthetic.anatomy).

    python scripts/make_cohort.py --out data/cohort --num_labelled 60 --num_unlabelled 24 \
        --num_validation 8 --num_test 8 --size 96 --seed 0 [--workers 2] [--preview docs/cohort_examples.png]

Any other field of ``stmt_monai.synthetic.config.CohortConfig`` can be set the same way (``--fully_share 0.2``).
Prints the triage-style counts of the annotation policy, the time taken and the disk used.
``--preview PATH`` also draws three of the generated cases with their full truth
(``docs/cohort_examples.png`` is made with the defaults and ``--preview``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stmt_monai.data.triage import format_table
from stmt_monai.synthetic.annotation import make_cohort
from stmt_monai.synthetic.config import CohortConfig
from stmt_monai.synthetic.preview import cohort_preview


def main(out: str = "data/cohort", seed: int = 0, workers: int = 1, preview: str | None = None, progress: bool = True, **config) -> None:
    """Write the cohort to ``out``; ``config`` holds CohortConfig fields (num_labelled, size, ...)."""
    fields = {f.name: f for f in dataclasses.fields(CohortConfig)}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        sys.exit(f"unknown option(s) {unknown}; CohortConfig fields: {sorted(fields)}")
    cfg = CohortConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    start = time.perf_counter()
    policy = make_cohort(out, cfg, seed=seed, workers=workers, progress=progress)
    seconds = time.perf_counter() - start
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    megabytes = sum(p.stat().st_size for p in files) / 2**20
    n = len(policy["cases"])
    print(format_table(policy["counts"]))
    print(f"{n} cases in {seconds:.1f} s ({seconds / max(n, 1):.2f} s per case, {workers} worker(s)); "
          f"{len(files)} files, {megabytes:.1f} MiB in {out}")
    if preview:
        print(f"preview: {cohort_preview(out, preview)}")


if __name__ == "__main__":
    fire.Fire(main)
