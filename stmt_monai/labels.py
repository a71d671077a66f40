"""The FLARE22/23 label set, in one place.

Every label number in the project comes from here: the 13 abdominal organs in FLARE order,
the pan-cancer tumor class, the official NSD tolerances, and the target maps of each stage
(paper section 2.1: stage 1 -> one abdomen class; organ target with tumor -> 0;
tumor target with organs -> 0).
"""

from __future__ import annotations

from types import MappingProxyType

BACKGROUND = 0

#: FLARE label order, 1..13 organs and 14 tumor (lesion).
ORGANS: MappingProxyType = MappingProxyType(
    {
        1: "liver",
        2: "right_kidney",
        3: "spleen",
        4: "pancreas",
        5: "aorta",
        6: "inferior_vena_cava",
        7: "right_adrenal_gland",
        8: "left_adrenal_gland",
        9: "gallbladder",
        10: "esophagus",
        11: "stomach",
        12: "duodenum",
        13: "left_kidney",
    }
)
TUMOR = 14
TUMOR_NAME = "tumor"

#: every foreground class, organs then tumor
LABELS: MappingProxyType = MappingProxyType({**ORGANS, TUMOR: TUMOR_NAME})
ORGAN_CLASSES: tuple[int, ...] = tuple(ORGANS)
NUM_ORGANS = len(ORGANS)
#: number -> name, with background, as the final label map of the cascade has it
ALL_CHANNELS: MappingProxyType = MappingProxyType({BACKGROUND: "background", **LABELS})

#: official FLARE23 NSD tolerances in mm, per class
NSD_TOLERANCE_MM: MappingProxyType = MappingProxyType(
    {1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0, 8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0, 14: 2.0}
)
#: aorta, IVC, esophagus: scored only within the ground truth's slice range (official FLARE code)
SLICE_RANGE_CLASSES: tuple[int, ...] = (5, 6, 10)

#: organs whose annotation sets define the single-organ datasets FLARE23 pools (LiTS, KiTS, MSD...)
KIDNEYS: tuple[int, ...] = (2, 13)
#: organs that host tumors in the synthetic cohort (liver, kidneys, pancreas, spleen, stomach)
TUMOR_HOST_ORGANS: tuple[int, ...] = (1, 2, 13, 4, 3, 11)

# --- what each network predicts (channel index -> name), shared by bundles' channel_def ---
#: stage 1, coarse abdomen (binary)
ABDOMEN_CHANNELS: MappingProxyType = MappingProxyType({0: "background", 1: "abdomen"})
#: stage 2 organ student / teacher: background + 13 organs, channel index == FLARE label
ORGAN_CHANNELS: MappingProxyType = MappingProxyType({BACKGROUND: "background", **ORGANS})
#: stage 2 tumor student / teacher: background + tumor
TUMOR_CHANNELS: MappingProxyType = MappingProxyType({0: "background", 1: TUMOR_NAME})

STAGES = ("abdomen", "organ", "tumor")


def stage_channels(stage: str) -> MappingProxyType:
    """Channel definition (index -> name) of the network of ``stage`` (``abdomen|organ|tumor``)."""
    return {"abdomen": ABDOMEN_CHANNELS, "organ": ORGAN_CHANNELS, "tumor": TUMOR_CHANNELS}[stage]


def stage_target_map(stage: str) -> tuple[list[int], list[int]]:
    """Label mapping of a stage's training target, as ``(orig_labels, target_labels)``.

    Suited to ``monai.transforms.MapLabelValue``: stage 1 maps every label > 0 to 1; the organ
    target sets tumor to 0; the tumor target sets organs to 0 and tumor to channel 1.
    """
    if stage == "abdomen":
        return list(LABELS), [1] * len(LABELS)
    if stage == "organ":
        return [TUMOR], [BACKGROUND]
    if stage == "tumor":
        return list(LABELS), [BACKGROUND] * NUM_ORGANS + [1]
    raise ValueError(f"unknown stage {stage!r}: expected one of {STAGES}")


def stage_output_map(stage: str) -> tuple[list[int], list[int]]:
    """Label mapping from a stage network's channel indices to FLARE labels, ``(channels, labels)``.

    The inverse of :func:`stage_target_map` on the network's output, suited to
    ``monai.transforms.MapLabelValue``: stage 1's channel 1 stays 1 (abdomen, not a FLARE class);
    organ channels are FLARE numbers already; the tumor network's channel 1 becomes :data:`TUMOR`
    (14), so a tumor prediction written with it is a FLARE label map.
    """
    if stage == "abdomen":
        return [BACKGROUND, 1], [BACKGROUND, 1]
    if stage == "organ":
        return list(ORGAN_CHANNELS), list(ORGAN_CHANNELS)
    if stage == "tumor":
        return [BACKGROUND, 1], [BACKGROUND, TUMOR]
    raise ValueError(f"unknown stage {stage!r}: expected one of {STAGES}")


def label_name(label: int) -> str:
    """Name of a FLARE label number (0 is ``background``)."""
    return ALL_CHANNELS[int(label)]
