"""Semi-supervision of StMt: corrected pseudo labels, three-stream batches, the EMA teacher.

Paper section 2.2 (Fig. 2a, 2b); SPEC.md "Organs by self-training" and "Tumors by mean teacher".

- :func:`correct_pseudo_label`: step 3 of self-training, the paper's exact rule.
- :func:`correct_tumor_pseudo_label`: the mean teacher's real-time correction.
- :class:`StreamBatchSampler`: every batch holds fully labelled, corrected pseudo-labelled
  (CPL) and pseudo-labelled (PL) cases in equal proportions.
- :func:`student_datalist`: the student's training list, each case tagged with its stream.
- :func:`ema_teacher`: the mean teacher's EMA of the student (ignite's ``EMAHandler``).
- :func:`attach_roi`: the stage-2 region of interest of each tumor case (organ pseudo label,
  the case's own organ labels, or the whole image).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from stmt_monai.labels import ORGAN_CLASSES


def annotated_organ_classes(annotation: np.ndarray) -> tuple[int, ...]:
    """The set A of a partial annotation: organ classes with at least one annotated voxel."""
    present = set(np.unique(np.asarray(annotation)).tolist())
    return tuple(c for c in ORGAN_CLASSES if c in present)


def correct_pseudo_label(
    pseudo_label: np.ndarray, annotation: np.ndarray, annotated_classes: Iterable[int] | None = None
) -> np.ndarray:
    """Correct a teacher's pseudo label with a partial annotation (paper Fig. 2a, step 2).

    Rule (paper, section 2.2): let A be the set of organ classes annotated in the partial label.
    In the pseudo label, set voxels whose value is in A to 0; then write every annotated voxel's
    label (a class in A) at its position. Classes outside A keep the teacher's value, except
    where an annotated voxel overwrites them.

    Args:
        pseudo_label: ``(X, Y, Z)`` integer organ labels predicted by the teacher.
        annotation: ``(X, Y, Z)`` partial annotation on the same grid (0 = not annotated).
        annotated_classes: A; by default the organ classes present in ``annotation``
            (:func:`annotated_organ_classes`). Labels outside A in the annotation, such as the
            tumor, are not written.

    Returns:
        The corrected pseudo label (CPL), same shape and dtype as ``pseudo_label``.
    """
    pseudo_label = np.asarray(pseudo_label)
    annotation = np.asarray(annotation)
    if pseudo_label.shape != annotation.shape:
        raise ValueError(f"pseudo label {pseudo_label.shape} and annotation {annotation.shape} differ in shape")
    classes = np.asarray(
        tuple(annotated_classes) if annotated_classes is not None else annotated_organ_classes(annotation),
        dtype=annotation.dtype if annotation.dtype.kind in "iu" else np.int64,
    )
    corrected = pseudo_label.copy()
    corrected[np.isin(corrected, classes)] = 0
    annotated = np.isin(annotation, classes)
    corrected[annotated] = annotation[annotated]
    return corrected
