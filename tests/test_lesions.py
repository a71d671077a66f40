"""stmt_monai.evaluation.lesions: per-lesion found / missed / false components."""

import numpy as np
import pytest

from stmt_monai.evaluation.lesions import detection_totals, lesion_detection
from stmt_monai.labels import TUMOR


def _case():
    """Three true lesions (27, 8 and 1 voxels), the first annotated; a prediction that finds the
    first with 1 voxel, misses the second, and adds one false component of 2 voxels."""
    truth = np.zeros((20, 20, 20), bool)
    truth[1:4, 1:4, 1:4] = True  # 27 voxels
    truth[10:12, 10:12, 10:12] = True  # 8 voxels
    truth[18, 18, 18] = True  # 1 voxel
    pred = np.zeros_like(truth)
    pred[3, 3, 3] = True  # one voxel of the first lesion
    pred[18, 18, 18] = True
    pred[6, 6, 14:16] = True  # false: 2 voxels, touching no lesion
    annotation = np.zeros_like(truth)
    annotation[1:4, 1:4, 1:4] = True
    return truth, pred, annotation


def test_found_missed_and_false_components_with_volumes():
    truth, pred, annotation = _case()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 voxels
    result = lesion_detection(truth, pred, affine, annotation=annotation)
    assert (result["found"], result["missed"], result["false_components"]) == (2, 1, 1)
    assert result["false_volume_ml"] == pytest.approx(2 * 8 / 1000)
    assert [lesion["volume_ml"] for lesion in result["lesions"]] == pytest.approx([27 * 0.008, 8 * 0.008, 0.008])
    assert [lesion["found"] for lesion in result["lesions"]] == [True, False, True]
    assert [lesion["annotated"] for lesion in result["lesions"]] == [True, False, False]
    assert result["annotated"] == {"found": 1, "total": 1} and result["unannotated"] == {"found": 1, "total": 2}
    # a spacing instead of the affine, and label maps instead of masks, give the same counts
    labels = lambda mask: np.where(mask, TUMOR, 0).astype(np.uint8)  # noqa: E731
    again = lesion_detection(labels(truth), labels(pred), (2.0, 2.0, 2.0))
    assert (again["found"], again["missed"], again["false_components"]) == (2, 1, 1) and "annotated" not in again


def test_overlap_rule_and_merged_components():
    truth, pred, _ = _case()
    # at least 2 predicted voxels per lesion: the 1-voxel hits no longer count
    assert lesion_detection(truth, pred, min_overlap_voxels=2)["found"] == 0
    # one predicted slab over the first two lesions finds both and is no false component
    slab = np.zeros_like(truth)
    slab[1:12, 1:12, 1:12] = True
    result = lesion_detection(truth, slab)
    assert (result["found"], result["missed"], result["false_components"]) == (2, 1, 0)
    # nothing predicted, nothing true
    empty = np.zeros_like(truth)
    assert lesion_detection(empty, empty) | {"lesions": None} == {"found": 0, "missed": 0, "false_components": 0, "false_volume_ml": 0.0, "lesions": None}
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_detection(truth, truth[:-1])


def test_totals_over_cases():
    truth, pred, annotation = _case()
    one = lesion_detection(truth, pred, annotation=annotation)
    totals = detection_totals({"a": one, "b": one})
    assert totals["found"] == 4 and totals["missed"] == 2 and totals["false_components_per_case"] == 1.0
    assert totals["detection_rate"] == pytest.approx(4 / 6)
    assert totals["unannotated"] == {"found": 2, "total": 4, "rate": 0.5}
