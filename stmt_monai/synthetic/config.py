"""What a synthetic cohort is made of: :class:`CohortConfig` and :class:`SyntheticCase`.

:class:`CohortConfig` holds the number of cases per split, the grid size, the ranges of every
random draw (affine, elastic field, field of view, slice spacing, noise, blur, lesions) and the
annotation policy: the share of labelled cases of each kind in :data:`ANNOTATION_KINDS` (fully
organ labelled, liver / kidneys / pancreas / spleen only, a random organ subset, no organ: the
categories of the paper's Fig. 1, as FLARE23 pools single-organ datasets) and the shares of
tumor-annotated cases and of unannotated second tumors. :class:`SyntheticCase` is one drawn case
(image, full truth, affine, lesions).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stmt_monai.labels import KIDNEYS, ORGAN_CLASSES, ORGANS

_BY_NAME = {name: label for label, name in ORGANS.items()}


LIVER, SPLEEN, PANCREAS = _BY_NAME["liver"], _BY_NAME["spleen"], _BY_NAME["pancreas"]


AORTA, STOMACH, ESOPHAGUS = _BY_NAME["aorta"], _BY_NAME["stomach"], _BY_NAME["esophagus"]


#: annotation kinds of labelled cases and the organ set each annotates (None: drawn per case)
ANNOTATION_KINDS: dict[str, tuple[int, ...] | None] = {
    "fully": ORGAN_CLASSES,
    "liver_only": (LIVER,),
    "kidneys_only": KIDNEYS,
    "pancreas_only": (PANCREAS,),
    "spleen_only": (SPLEEN,),
    "random_subset": None,
    "none": (),
}


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """How many cases, how large, and the annotation policy of a synthetic cohort.

    Args:
        num_labelled, num_unlabelled, num_validation, num_test: cases per split.
        size: voxels across the larger in-plane axis of the output grid (the other axes follow the
            field of view; the slice axis is capped at ``1.5 * size``).
        anisotropic_share: share of cases whose slice spacing differs from the in-plane spacing.
        z_spacing_mm: range of that slice spacing (mm).
        upper_abdomen_share: share of cases whose field of view stops above the pelvis.
        fully_share, liver_only_share, kidneys_only_share, pancreas_only_share, spleen_only_share,
            random_subset_share, no_organ_share: annotation policy of the labelled cases
            (normalised to sum 1; counts by largest remainder, so they are exact).
        tumor_annotated_share: share of labelled cases with tumor annotations (each has >= 1 tumor).
        unannotated_tumor_share: share of the tumor-annotated cases that hold a second tumor which
            is left unannotated.
        tumor_count_probs: probabilities of 0, 1, 2, 3 lesions in cases without tumor annotation
            (unlabelled, validation, test, not tumor annotated).
        outside_tumor_share: share of lesions placed outside the organs in the lower abdomen
            (when the field of view reaches below the kidneys).
        tumor_diameter_mm: lesion diameter range (uniform), mm.
        hypodense_share: share of lesions darker than their host organ.
        max_rotation_deg, scale_range, max_translation_mm: random affine (rotation about the
            field of view's centre, anisotropic scaling, and a shift of the patient in world
            coordinates, which moves the output grid's origin with it).
        elastic_mm, elastic_grid_mm: peak displacement range and control-point spacing of the
            elastic field.
        noise_hu, blur_voxels: ranges of Gaussian noise sd (HU) and blur sigma (voxels).
    """

    num_labelled: int = 60
    num_unlabelled: int = 24
    num_validation: int = 8
    num_test: int = 8
    size: int = 96
    anisotropic_share: float = 0.3
    z_spacing_mm: tuple[float, float] = (2.5, 5.0)
    upper_abdomen_share: float = 0.35
    fully_share: float = 0.10
    liver_only_share: float = 0.10
    kidneys_only_share: float = 0.10
    pancreas_only_share: float = 0.08
    spleen_only_share: float = 0.07
    random_subset_share: float = 0.35
    no_organ_share: float = 0.20
    tumor_annotated_share: float = 0.70
    unannotated_tumor_share: float = 0.20
    tumor_count_probs: tuple[float, float, float, float] = (0.25, 0.40, 0.25, 0.10)
    outside_tumor_share: float = 0.15
    tumor_diameter_mm: tuple[float, float] = (5.0, 40.0)
    hypodense_share: float = 0.8
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.88, 1.12)
    max_translation_mm: float = 10.0
    elastic_mm: tuple[float, float] = (0.0, 8.0)
    elastic_grid_mm: float = 60.0
    noise_hu: tuple[float, float] = (0.0, 25.0)
    blur_voxels: tuple[float, float] = (0.0, 0.8)

    def annotation_shares(self) -> dict[str, float]:
        """Annotation kind -> share of labelled cases (keys of :data:`ANNOTATION_KINDS`)."""
        shares = {
            "fully": self.fully_share,
            "liver_only": self.liver_only_share,
            "kidneys_only": self.kidneys_only_share,
            "pancreas_only": self.pancreas_only_share,
            "spleen_only": self.spleen_only_share,
            "random_subset": self.random_subset_share,
            "none": self.no_organ_share,
        }
        total = sum(shares.values())
        if total <= 0 or min(shares.values()) < 0:
            raise ValueError(f"annotation shares must be >= 0 and not all 0, got {shares}")
        return {k: v / total for k, v in shares.items()}


@dataclasses.dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
        image: ``(X, Y, Z)`` int16 HU.
        labels: ``(X, Y, Z)`` uint8 full truth (the 13 organs, every lesion :data:`TUMOR`).
        affine: 4 x 4 voxel-to-world RAS affine (mm).
        tumors: ``(X, Y, Z)`` uint8 tumor instance map (0 none, 1..n lesion number).
        tumor_sites: host organ name per lesion (or ``"outside_organs_lower_abdomen"``).
        info: how the case was drawn (field of view, shape, spacing, phase, lesion sites and
            volumes), JSON-ready.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    tumors: np.ndarray
    tumor_sites: list[str]
    info: dict
