"""stmt_monai.inference.checks and stmt-segment on implausible input (tests/bad_inputs.py):
each kind is a one-line warning in the log and the report (JSON and CSV), or with --strict a
failed case (the batch goes on, exit 1); a volume too large for the memory at hand is refused
before it is read."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from bad_inputs import DICOM, KINDS, mr_like, shipped_ct

from stmt_monai.cli import segment_main
from stmt_monai.inference import checks
from stmt_monai.io import ImageError, load_image
from stmt_monai.preprocessing.geometry import CaseGeometry


# ----------------------------------------------------------------------------- intensities
@pytest.fixture(scope="module")
def ct():
    return shipped_ct()[0]


def test_real_ct_passes(ct):
    assert checks.intensity_findings(ct) == []
    assert checks.intensity_findings(load_image(DICOM)[0]) == []
    # a body-tight crop (no air in the field of view) and scanner padding at -3024 are still CT
    assert checks.intensity_findings(ct[40:80, 35:65]) == []
    padded = ct.copy()
    padded[:10] = -3024.0
    assert checks.intensity_findings(padded) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda hu: (hu > -200).astype(np.float32), "holds only 2 distinct integer values (0, 1): a binary mask, not a CT"),
        (lambda hu: np.digitize(hu, [-200, 0, 100, 300]).astype(np.float32), "holds only 5 distinct integer values (0, 1, 2, 3, 4): a label map"),
        (mr_like, "MR-like or other non-CT values"),
        (lambda hu: hu + 1024, "stored DICOM values without their rescale: air and soft tissue sit about 1024 above their HU"),
        (lambda hu: hu + 1000, "sit about 1000 above their HU"),
        (lambda hu: hu + 32768, "sit about 32768 above their HU"),
        (lambda hu: (hu - hu.mean()) / hu.std(), "far narrower than CT HU"),
        (lambda hu: (hu + 1024) / 4096, "far narrower than CT HU"),
    ],
    ids=["binary-mask", "label-map", "mr-like", "raw-1024", "raw-1000", "raw-32768", "z-scored", "scaled-0-1"],
)
def test_values_that_are_not_hu_are_named(ct, change, expected):
    findings = checks.intensity_findings(np.asarray(change(ct), np.float32))
    assert len(findings) == 1 and findings[0].kind == "intensity" and expected in findings[0].message


# ----------------------------------------------------------------------------- spacing, non-finite
@pytest.mark.parametrize(
    "scale, expected",
    [
        (1e-3, "voxel spacing 0.003 x 0.003 x 0.003 mm is implausibly small (< 0.1 mm): written in metres? (x1000 = 3 x 3 x 3 mm)"),
        (
            0.1,
            (
                "the field of view spans only 36.6 mm at its widest (voxel spacing 0.3 x 0.3 x 0.3 mm): too small for an abdomen: "
                "written in centimetres? (x10 = 3 x 3 x 3 mm)"
            ),
        ),
        (4.0, "voxel spacing 12 x 12 x 12 mm is above 10 mm"),
        (0.02, "is implausibly small (< 0.1 mm) for a CT"),
    ],
)
def test_implausible_spacing_is_named(scale, expected):
    affine = np.diag([3.0 * scale] * 3 + [1.0])
    findings = checks.spacing_findings(affine, (122, 101, 112))
    assert [f.kind for f in findings] == ["spacing"] and expected in findings[0].message
    assert checks.spacing_findings(np.diag([0.7, 0.7, 5.0, 1.0]), (512, 512, 60)) == []
    assert checks.spacing_findings(np.diag([0.7, 0.7, 2.0, 1.0]), (512, 512, 20)) == []  # a thin slab is no spacing problem


def test_non_finite_voxels_are_counted_and_replaced(ct):
    image = ct.copy()
    image[..., :2] = np.nan
    image[0, 0, 5] = np.inf
    fixed, findings = checks.replace_non_finite(image)
    nan = 122 * 101 * 2
    assert np.isfinite(fixed).all() and fixed[0, 0, 0] == ct.min() and fixed[0, 0, 5] == ct.min()
    assert [f.kind for f in findings] == ["non_finite"]
    assert findings[0].message == f"{nan + 1:,} non-finite voxels ({nan:,} NaN, 1 Inf; 1.8 % of the volume) replaced by {ct.min():g}, the lowest finite value"
    with pytest.raises(ImageError, match="holds no finite voxel value"):
        checks.replace_non_finite(np.full((4, 4, 4), np.nan, np.float32))


# ----------------------------------------------------------------------------- field of view
def test_no_or_too_little_abdomen_in_the_field_of_view():
    geometry = CaseGeometry((100, 100, 100), np.diag([3.0, 3.0, 3.0, 1.0]), np.array([[0, 1], [1, 1], [2, 1]]), (0, 0, 0), (100, 100, 100), (50, 50, 50))
    mask = np.zeros((50, 50, 50), np.uint8)
    ml, findings = checks.field_of_view_findings(mask, geometry)
    assert ml == 0 and "stage 1 found no abdomen in the field of view" in findings[0].message
    mask[:10, :10, :10] = 1  # 1000 voxels of 6 mm: 216 ml
    ml, findings = checks.field_of_view_findings(mask, geometry)
    assert ml == pytest.approx(216.0) and "stage 1 found only 216 ml of abdomen" in findings[0].message
    mask[:20, :20, :10] = 1
    assert checks.field_of_view_findings(mask, geometry) == (pytest.approx(864.0), [])


# ----------------------------------------------------------------------------- memory
def test_peak_memory_is_estimated_from_the_header_and_refused_up_front(tmp_path, monkeypatch):
    from bad_inputs import CT

    assert checks.volume_header(CT) == ((122, 101, 112), 4)
    assert checks.volume_header(DICOM) == ((512, 512, 20), 2)
    need = checks.check_memory(CT, [(16, (192, 192, 192))])
    assert need == 122 * 101 * 112 * (4 + checks.BYTES_PER_VOXEL) + 32 * 16 * 192**3
    # the machine's free memory faked small: refused, both numbers said
    monkeypatch.setattr(checks, "available_bytes", lambda: 20_000_000)
    with pytest.raises(ImageError, match=r"too large for the memory at hand: 122 x 101 x 112 voxels need about 0.03 GB .* 0.02 GB available") as err:
        checks.check_memory(CT)
    assert err.value.path == str(CT)
    # a stated bound instead of what is available
    with pytest.raises(ImageError, match="GB allowed \\(--max_memory_gb\\)"):
        checks.check_memory(CT, [], limit_bytes=10_000_000)


# ----------------------------------------------------------------------------- stmt-segment
def _segment(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as status:
        segment_main([*map(str, args), "--weights", "demo", "--backend", "torch", "--threads", "1", "--progress", "False"])
    return status.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """One folder of implausible cases, as a user's batch might hold them."""
    folder = tmp_path_factory.mktemp("bad") / "in"
    for kind in ("mr_like", "spacing_in_metres", "nan_and_inf", "thin_slab", "all_nan"):
        path = KINDS[kind](folder / kind)
        path.rename(folder / f"{kind}.nii.gz")
        (folder / kind).rmdir()
    return folder


WARNED = {
    "mr_like": ("intensity", "MR-like or other non-CT values"),
    "spacing_in_metres": ("spacing", "written in metres?"),
    "nan_and_inf": ("non_finite", "123,223 non-finite voxels (123,220 NaN, 3 Inf"),
    "thin_slab": ("field_of_view", "of abdomen (a whole abdomen's organs fill about 2-4 l"),
}


@pytest.mark.slow
def test_stmt_segment_warns_in_log_and_report_and_strict_fails(bad_folder, tmp_path, capsys, caplog):
    with caplog.at_level("WARNING"):
        code, err = _segment([bad_folder, tmp_path / "out"], capsys)
    log = [f"{r.levelname} {r.getMessage()}" for r in caplog.records]
    assert code == 1  # all_nan cannot be segmented at all
    assert "4 written, 0 skipped" in err and "1 failed" in err and "4 written with input warnings" in err
    assert f"{bad_folder / 'all_nan.nii.gz'}: holds no finite voxel value (all NaN or Inf)" in err
    for case, (kind, words) in WARNED.items():
        # the log: one line naming the file
        assert sum(line.startswith(f"WARNING {bad_folder / case}.nii.gz: ") for line in log) == 1, case
        assert any(line.startswith(f"WARNING {bad_folder / case}.nii.gz: ") and words in line for line in log), case
        # the report: JSON and CSV
        report = json.loads((tmp_path / "out" / f"{case}_report.json").read_text())
        assert [w["kind"] for w in report["warnings"]] == [kind] and words in report["warnings"][0]["message"]
        rows = list(csv.DictReader((tmp_path / "out" / f"{case}_report.csv").open()))
        assert [(r["name"], words in r["message"]) for r in rows if r["kind"] == "warning"] == [(kind, True)]
        assert (tmp_path / "out" / f"{case}.nii.gz").is_file()  # the mask is written, its report says why to doubt it
    # NaN replaced before the networks: the mask has the input's grid and labels
    mask = nib.load(tmp_path / "out" / "nan_and_inf.nii.gz")
    assert mask.shape == (122, 101, 112) and np.asarray(mask.dataobj).max() > 0

    code, err = _segment([bad_folder, tmp_path / "strict", "--strict"], capsys)
    assert code == 1 and "0 written, 0 skipped" in err and "5 failed" in err
    for case, (kind, words) in WARNED.items():
        line = next(line for line in err.splitlines() if line.startswith(f"{bad_folder / case}.nii.gz: --strict: {kind}: "))
        assert words in line
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())


@pytest.mark.slow
def test_stmt_segment_refuses_what_does_not_fit_before_reading(bad_folder, tmp_path, capsys, monkeypatch):
    from stmt_monai.inference import cascade

    def never(*args, **kwargs):
        raise AssertionError("a refused case must not be read")

    monkeypatch.setattr(cascade, "load_image", never)
    code, err = _segment([bad_folder / "mr_like.nii.gz", tmp_path / "out", "--max_memory_gb", "0.02"], capsys)
    assert code == 1 and "0 written, 0 skipped" in err and "1 failed" in err
    assert "mr_like.nii.gz: too large for the memory at hand: 122 x 101 x 112 voxels need about" in err
    assert "0.02 GB allowed (--max_memory_gb); refused before reading" in err
    assert not (tmp_path / "out" / "mr_like.nii.gz").exists()


@pytest.mark.slow
def test_a_dicom_series_with_a_missing_slice_gets_its_mask_on_the_full_grid(tmp_path, capsys):
    from bad_inputs import missing_slice

    series = missing_slice(tmp_path)
    code, err = _segment([series, tmp_path / "out"], capsys)
    assert code == 0 and "Non uniform" not in err
    mask = nib.load(tmp_path / "out" / "series.nii.gz")
    _, affine = load_image(DICOM)
    assert mask.shape == (512, 512, 20) and np.allclose(mask.affine, affine)
    report = json.loads((tmp_path / "out" / "series_report.json").read_text())
    assert [w["kind"] for w in report["warnings"]] == ["dicom"] and "1 slice(s) missing" in report["warnings"][0]["message"]
