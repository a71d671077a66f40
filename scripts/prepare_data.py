"""Triage a dataset into the paper's categories and write every stage's datalists (stmt_monai.data.triage).

    python scripts/prepare_data.py --data_root data/cohort --out_dir data/cohort/prepared

``--data_root`` is a FLARE23-layout folder (imagesTr, labelsTr, unlabeled, optional validation/ and
test/) or a MONAI datalist JSON. Prints the counts table and every skipped file; exits non-zero
only when nothing at all could be read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stmt_monai.data.triage import triage_dataset


def main(
    data_root: str,
    out_dir: str | None = None,
    fingerprint: bool = True,
    validation_share: float = 0.2,
    fingerprint_cases: int = 100,
    verify_images: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Triage ``data_root`` into ``out_dir`` (default ``<data_root>/prepared``); see stmt_monai.triage."""
    try:
        result = triage_dataset(
            data_root,
            out_dir,
            fingerprint=fingerprint,
            validation_share=validation_share,
            fingerprint_cases=fingerprint_cases,
            verify_images=verify_images,
            seed=seed,
            progress=progress,
        )
    except ValueError as err:
        sys.exit(f"prepare_data: {err}")
    print(result.table())
    for failure in result.failed:
        print(f"skipped: {failure['error']}")
    for kind, path in sorted(result.outputs.items()):
        print(f"{kind}: {path}")
    if not result.cases and not result.validation and not result.test:
        sys.exit("prepare_data: no case could be read")


if __name__ == "__main__":
    fire.Fire(main)
