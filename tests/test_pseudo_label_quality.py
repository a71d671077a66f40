"""stmt_monai.evaluation.pseudo_labels: pseudo labels scored against the cohort's hidden truth."""

import json
import math
import shutil

import numpy as np
import pytest

from stmt_monai.evaluation.pseudo_labels import organ_scores, score_pseudo_labels, summarize_pseudo_labels
from stmt_monai.io import load_label, save_label_map
from stmt_monai.synthetic.oracle import oracle_pseudo_labels
from stmt_monai.training.pseudo_label import PSEUDO_DATALIST, RAW_DIR


def test_organ_scores_split_annotated_classes():
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[:4] = 1  # liver
    truth[4:6] = 2  # right kidney
    truth[6:, :, :2] = 14  # tumor: background for the organ scores
    labels = truth.copy()
    labels[4:6] = 0  # the kidney missed
    scores = organ_scores(truth, labels, annotated=[1])
    assert scores["in_A"] == 1.0  # the liver, exact
    assert scores["not_A"] == pytest.approx(11 / 12)  # 11 absent organs (both empty = 1), the kidney 0
    assert scores["all"] == pytest.approx(12 / 13)


def test_oracle_pseudo_labels_score_one_and_a_damaged_raw_label_less(tiny_cohort, tmp_path):
    pseudo = tmp_path / "pseudo"
    oracle_pseudo_labels(tiny_cohort.root, tiny_cohort.prepared, pseudo)
    records = json.loads((pseudo / PSEUDO_DATALIST).read_text())["training"]
    # a "raw" prediction of the first case: its pseudo label with the liver erased
    first = records[0]
    raw, affine = load_label(pseudo / first["label"])
    save_label_map(pseudo / RAW_DIR / first["label"], np.where(raw == 1, 0, raw), affine)
    rows = score_pseudo_labels(pseudo, tiny_cohort.root / "truth")
    assert [r["name"] for r in rows] == [r["name"] for r in records]
    assert all(r["corrected"] == pytest.approx(1.0) for r in rows)  # the hidden truth, corrected: exact
    assert rows[0]["raw"] == pytest.approx(12 / 13)  # the liver's DSC 0, the other organs 1
    assert all(math.isnan(r["raw"]) for r in rows[1:])  # no raw prediction kept
    summary = summarize_pseudo_labels(rows)
    assert set(summary) == {r["stream"] for r in rows}
    assert sum(s["cases"] for s in summary.values()) == len(rows)
    assert summary[first["stream"]]["raw"] == pytest.approx(12 / 13)
    # a truth file missing is an error naming it
    shutil.rmtree(tmp_path / "truth", ignore_errors=True)
    (tmp_path / "truth").mkdir()
    with pytest.raises(ValueError, match="no such file"):
        score_pseudo_labels(pseudo, tmp_path / "truth")
