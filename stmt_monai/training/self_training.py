"""Correction of the teacher's pseudo labels with partial annotations (self-training step 2).

Paper section 2.2, Fig. 2a: "in step 2), we use partial annotations to correct pseudo-labels".

- :func:`annotated_organ_classes`: the set A of organ classes annotated in a partial label;
- :func:`correct_pseudo_label`: the paper's rule: voxels of the pseudo label whose value is in A
  are set to 0, then every annotated voxel's label is written at its position. The result is a
  corrected pseudo label (CPL); an unlabelled case keeps its plain pseudo label (PL).

Label maps are ``(X, Y, Z)`` integer arrays in FLARE numbering, on the annotation's own grid.
The job that predicts and corrects every case is :mod:`stmt_monai.training.pseudo_label`.
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
