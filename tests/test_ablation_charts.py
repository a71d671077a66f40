"""The ablation's charts (``benchmarks/ablation.py``): one panel per stage that the results hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib.image

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("ablation_benchmark", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(rows: dict) -> dict:
    curve = [[5, 0.1], [10, 0.4], [15, 0.6]]
    return {
        "rows": rows,
        "curves": {row: {seed: curve for seed in per_seed} for row, per_seed in rows.items()},
    }


def _width(path: Path) -> int:
    return matplotlib.image.imread(path).shape[1]


def test_an_organ_only_run_draws_no_empty_tumor_panel(tmp_path):
    charts = _benchmark().charts
    organ = {"fso": {0: {"organ_dsc": 70.0}, 1: {"organ_dsc": 72.0}}, "st_oracle": {0: {"organ_dsc": 78.0}, 1: {"organ_dsc": 77.0}}}
    tumor = {"fst": {0: {"tumor_dsc": 20.0}, 1: {"tumor_dsc": 25.0}}}
    only = charts(_results(organ), tmp_path / "organ", "abl")
    both = charts(_results({**organ, **tumor}), tmp_path / "both", "abl")
    assert [p.name for p in only] == [p.name for p in both] == ["abl_table.png", "abl_curves.png"]
    # one panel is half as wide as two, in the table and in the learning curves
    for one, two in zip(only, both):
        assert _width(one) < 0.75 * _width(two), (one.name, _width(one), _width(two))
