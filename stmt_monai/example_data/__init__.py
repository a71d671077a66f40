"""The real CT shipped with the package (from TotalSegmentator's example data, Apache-2.0: ``LICENSE-TotalSegmentator-Apache-2.0.txt``).

- ``abdomen_ct_3mm.nii.gz``: an abdominal CT resampled to 3 mm, HU, and
  ``abdomen_ct_3mm_organs.nii.gz`` its organ labels in FLARE numbering;
- ``abdomen_ct_dicom/``: a 20-slice DICOM CT series (512 x 512), with
  ``abdomen_ct_dicom_organs.nii.gz`` its organ labels on the series' grid.

Bundle configs take their default input from here (``"$stmt_monai.example_data.abdomen_ct()"``),
so that ``python -m monai.bundle run --config_file bundles/<b>/configs/inference.json`` runs as it is.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def abdomen_ct() -> str:
    """Path of the shipped 3 mm abdominal CT (NIfTI, HU)."""
    return str(FOLDER / "abdomen_ct_3mm.nii.gz")
