"""The synthetic FLARE23-like cohort (stmt_monai.synthetic.anatomy): reproducibility, policy, labels, anatomy."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_COHORT

from stmt_monai.inference.preview import overlay_figure
from stmt_monai.io import load_image, load_label
from stmt_monai.labels import KIDNEYS, ORGAN_CLASSES, ORGANS, TUMOR, TUMOR_HOST_ORGANS, label_name
from stmt_monai.synthetic.anatomy import source_volume
from stmt_monai.synthetic.annotation import annotation_plan, case_files, make_cohort
from stmt_monai.synthetic.case import generate_case, synthesize_case
from stmt_monai.synthetic.config import ANNOTATION_KINDS, CohortConfig
from stmt_monai.synthetic.preview import cohort_preview
from stmt_monai.synthetic.tumors import OUTSIDE

BY_NAME = {name: label for label, name in ORGANS.items()}
CONFIG = CohortConfig(**SMALL_COHORT)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _policy(root: Path) -> dict:
    return json.loads((root / "policy.json").read_text())


def _centroid_mm(labels: np.ndarray, affine: np.ndarray, label) -> np.ndarray:
    voxels = np.argwhere(np.isin(labels, label))
    return affine[:3, :3] @ voxels.mean(0) + affine[:3, 3]


# ----------------------------------------------------------------------------- reproducibility
def test_same_seed_same_cohort_byte_for_byte(small_cohort, tmp_path):
    # a second run, in parallel workers this time: the same bytes (gzip header without mtime/name)
    make_cohort(tmp_path / "again", CONFIG, seed=0, workers=2, progress=False)
    first, again = _files(small_cohort), _files(tmp_path / "again")
    assert len(first) == 2 * 12 + 4 + 2 * 4 + 12 + 4 + 1  # images+labels, unlabelled, val/test, truth, policy
    assert first.keys() == again.keys()
    assert all(first[k] == again[k] for k in first)


def test_different_seeds_differ(small_cohort, tmp_path):
    config = CohortConfig(**{**SMALL_COHORT, "num_labelled": 3, "num_unlabelled": 1, "num_validation": 0, "num_test": 0})
    make_cohort(tmp_path / "s1", config, seed=1, progress=False)
    other = _files(tmp_path / "s1")
    first = _files(small_cohort)
    images = [k for k in other if k.startswith("imagesTr/")]  # same names as the seed-0 cohort's first 3
    assert len(images) == 3
    assert all(first[k] != other[k] for k in images)


def test_generate_case_is_a_function_of_its_seed():
    a = generate_case(7, CONFIG)
    b = generate_case(7, CONFIG)
    c = generate_case(8, CONFIG)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])
    image, labels, affine = a
    assert image.dtype == np.int16 and labels.dtype == np.uint8 and affine.shape == (4, 4)


def test_default_size_case_is_fast():
    synthesize_case(0)  # warm: the source is read once per process
    start = time.perf_counter()
    case = synthesize_case([3, 1], CohortConfig(), num_tumors=3)
    assert time.perf_counter() - start < 2.0
    assert max(case.image.shape[:2]) == 96 and case.image.shape[2] <= 144


# ----------------------------------------------------------------------------- policy
def test_policy_follows_the_configured_shares(small_cohort):
    policy = _policy(small_cohort)
    labelled = {n: r for n, r in policy["cases"].items() if r["split"] == "labelled"}
    kinds = [r["annotation"] for r in labelled.values()]
    # 12 cases at 10/10/10/8/7/35/20 %: largest remainder gives 1,1,1,1,1,4,3
    expected = {"fully": 1, "liver_only": 1, "kidneys_only": 1, "pancreas_only": 1, "spleen_only": 1, "random_subset": 4, "none": 3}
    assert {k: kinds.count(k) for k in ANNOTATION_KINDS} == expected
    for record in labelled.values():
        organs = set(record["organs"])
        assert organs <= set(record["organs_in_truth"])
        fixed = ANNOTATION_KINDS[record["annotation"]]
        if fixed is not None:
            assert organs == set(fixed) & set(record["organs_in_truth"])
        else:
            assert 2 <= len(organs) < len(ORGAN_CLASSES)
    assert [r["organs"] for r in labelled.values() if r["annotation"] == "kidneys_only"] == [sorted(KIDNEYS)]
    annotated = [r for r in labelled.values() if r["tumor_annotated"]]
    assert len(annotated) == round(CONFIG.tumor_annotated_share * 12) == 8
    assert sum(r["unannotated_tumor"] for r in annotated) == round(CONFIG.unannotated_tumor_share * 8) == 2
    assert all(r["num_tumors"] >= 1 for r in annotated)
    counts = policy["counts"]
    assert (counts["labelled"], counts["unlabelled"], counts["validation"], counts["test"]) == (12, 4, 2, 2)
    assert counts["fully_organ_labelled"] == 1 and counts["non_organ_labelled"] == 3 + 4


def test_plan_guarantees_a_fully_labelled_case():
    plan = annotation_plan(CohortConfig(num_labelled=3, num_unlabelled=0, num_validation=0, num_test=0), seed=0)
    assert [p["annotation"] for p in plan].count("fully") == 1


def test_every_case_has_all_13_organs_and_an_esophagus(small_cohort):
    policy = _policy(small_cohort)
    for record in policy["cases"].values():
        assert record["organs_in_truth"] == list(ORGAN_CLASSES)
    image, labels, affine = source_volume()
    esophagus = labels == BY_NAME["esophagus"]
    assert 60 < esophagus.sum() < 600  # a 7 mm tube a few cm long, in 3 mm voxels
    # anterior of the aorta, above the stomach's centre, at the top of the volume
    assert _centroid_mm(labels, affine, BY_NAME["esophagus"])[1] > _centroid_mm(labels, affine, BY_NAME["aorta"])[1]
    assert np.argwhere(esophagus)[:, 2].max() == labels.shape[2] - 1


# ----------------------------------------------------------------------------- labels
def test_labels_lie_inside_the_image_and_the_body(small_cohort):
    policy = _policy(small_cohort)
    for name, record in policy["cases"].items():
        image_path, truth_path = case_files(small_cohort, name, record)
        image, affine = load_image(image_path)
        truth, _ = load_label(truth_path, image.shape, affine)  # same grid, or ImageError
        assert list(image.shape) == record["shape"]
        assert np.allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), record["spacing_mm"], atol=1e-3)
        # organ labels sit on the body (gas in the bowel and lung bases aside), not in the air around it
        assert (image[truth > 0] > -500).mean() > 0.9
        assert (truth == TUMOR).any() == (record["num_tumors"] > 0)
        if record["split"] == "labelled":  # the partial label is on the same grid too
            load_label(small_cohort / "labelsTr" / f"{name}.nii.gz", image.shape, affine)


def test_tumor_voxels_are_labelled_14_in_their_hosts():
    config = CohortConfig(size=48)
    sites = []
    for seed in range(6):
        case = synthesize_case([seed, 5], config, num_tumors=3)
        # every lesion voxel is TUMOR in the truth, and no TUMOR voxel is outside a lesion
        assert np.array_equal(case.labels == TUMOR, case.tumors > 0)
        assert sorted(np.unique(case.tumors[case.tumors > 0]).tolist()) == list(range(1, len(case.tumor_sites) + 1))
        sites += case.tumor_sites
    assert set(sites) <= {label_name(h) for h in TUMOR_HOST_ORGANS} | {OUTSIDE}
    assert len(set(sites)) >= 3


def test_lesions_outside_the_organs_are_in_the_lower_abdomen():
    config = CohortConfig(size=48, outside_tumor_share=1.0, upper_abdomen_share=0.0)
    case = synthesize_case([0, 9], config, num_tumors=2)
    assert case.tumor_sites == [OUTSIDE, OUTSIDE]
    kidney_top = np.argwhere(np.isin(case.labels, KIDNEYS))[:, 2].min()
    lesion_z = np.argwhere(case.tumors > 0)[:, 2]
    assert lesion_z.mean() < kidney_top  # below the kidneys
    hu = case.image[case.tumors > 0]
    assert -200 < np.median(hu) < 200  # soft tissue, not bone or gas


def test_partial_labels_are_a_subset_of_the_hidden_truth(small_cohort):
    policy = _policy(small_cohort)
    for name, record in policy["cases"].items():
        if record["split"] != "labelled":
            continue
        label, affine = load_label(small_cohort / "labelsTr" / f"{name}.nii.gz")
        truth, _ = load_label(small_cohort / "truth" / f"{name}.nii.gz", label.shape, affine)
        annotated = label > 0
        assert np.array_equal(label[annotated], truth[annotated])
        organs = sorted(int(v) for v in np.unique(label) if v in ORGANS)
        assert organs == record["organs"]
        # an annotated organ is annotated completely
        for organ in organs:
            assert np.array_equal(label == organ, truth == organ)
        assert (label == TUMOR).any() == record["tumor_annotated"]
        assert ((truth == TUMOR) & (label != TUMOR)).any() == record["unannotated_tumor"]


def test_validation_and_test_labels_are_the_full_truth(small_cohort):
    policy = _policy(small_cohort)
    held = [n for n, r in policy["cases"].items() if r["split"] in ("validation", "test")]
    assert len(held) == 4
    for name in held:
        record = policy["cases"][name]
        _, truth_path = case_files(small_cohort, name, record)
        truth, _ = load_label(truth_path)
        assert record["organs"] == list(ORGAN_CLASSES)
        assert (truth == TUMOR).any() == (record["num_tumors"] > 0)
    assert not (small_cohort / "truth" / f"{held[0]}.nii.gz").exists()


# ----------------------------------------------------------------------------- anatomy and grid
@pytest.mark.parametrize("seed", range(8))
def test_deformed_anatomy_keeps_organs_in_place(seed):
    image, labels, affine = generate_case([seed, 11], CONFIG, num_tumors=0)
    c = {name: _centroid_mm(labels, affine, BY_NAME[name]) for name in ("liver", "spleen", "right_kidney", "left_kidney", "aorta", "pancreas", "stomach")}
    body = _centroid_mm(image > -300, affine, True)
    # RAS: +x is the patient's right, +y anterior, +z superior
    assert c["liver"][0] > body[0] > c["spleen"][0]
    assert c["right_kidney"][0] > c["left_kidney"][0]
    assert c["stomach"][0] < c["liver"][0]
    assert c["liver"][2] > c["right_kidney"][2]
    assert c["aorta"][1] < c["pancreas"][1]  # aorta behind the pancreas
    assert affine[0, 0] > 0 and affine[1, 1] > 0 and affine[2, 2] > 0


def test_field_of_view_and_spacing_vary():
    config = CohortConfig(size=48, anisotropic_share=0.5, upper_abdomen_share=0.5)
    infos = [synthesize_case([s, 2], config, num_tumors=0).info for s in range(10)]
    assert {i["fov"] for i in infos} == {"upper_abdomen", "abdomen_pelvis"}
    extent_z = {i["fov"]: i["shape"][2] * i["spacing_mm"][2] for i in infos}
    assert extent_z["upper_abdomen"] < extent_z["abdomen_pelvis"]
    assert any(abs(i["spacing_mm"][2] - i["spacing_mm"][0]) > 0.5 for i in infos)
    assert all(max(i["shape"][:2]) == 48 and i["shape"][2] <= 72 for i in infos)
    assert len({i["phase"] for i in infos}) >= 2


# ----------------------------------------------------------------------------- pictures
def test_preview_png(small_cohort, tmp_path):
    path = cohort_preview(small_cohort, tmp_path / "cohort.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    image, labels, affine = generate_case(1, CONFIG)
    ras = overlay_figure(image, labels, tmp_path / "ras.png", affine=affine, title="x")
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, image.shape[0] - 1
    las = overlay_figure(image[::-1], labels[::-1], tmp_path / "las.png", affine=affine @ flip, title="x")
    assert ras.read_bytes() == las.read_bytes()  # drawn in canonical orientation, whatever the storage
    assert not list(tmp_path.glob(".*part*"))
