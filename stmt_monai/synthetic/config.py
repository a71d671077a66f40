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
