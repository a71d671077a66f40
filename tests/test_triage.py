"""Triage (stmt_monai.data.triage, stmt-prepare-data): categories, datalists, failures."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImaged

from stmt_monai.data.triage import FULLY, NON_ORGAN, PARTIAL, category_counts, organ_category, triage_dataset
from stmt_monai.io import load_label
from stmt_monai.labels import KIDNEYS, ORGAN_CLASSES, TUMOR
from stmt_monai.preprocessing.fingerprint import Fingerprint

REPO = Path(__file__).resolve().parents[1]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def triaged(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return triage_dataset(small_cohort, out, progress=False), out


def _copy_cohort(src: Path, dst: Path, folders=("imagesTr", "labelsTr", "unlabeled")) -> Path:
    for folder in folders:
        shutil.copytree(src / folder, dst / folder)
    return dst


# ----------------------------------------------------------------------------- categories
def test_organ_categories():
    assert organ_category(ORGAN_CLASSES) == FULLY
    assert organ_category(ORGAN_CLASSES[:1]) == PARTIAL
    assert organ_category([]) == NON_ORGAN
    counts = category_counts(
        [
            {"organs": ORGAN_CLASSES, "tumor": True},
            {"organs": KIDNEYS, "tumor": False},
            {"organs": [], "tumor": True},
            {"organs": [], "tumor": False, "labelled": False},
        ]
    )
    assert counts["table"][FULLY] == {"tumor_annotated": 1, "not_tumor_annotated": 0}
    assert (counts[NON_ORGAN], counts["unlabelled"], counts["tumor_annotated"], counts["total"]) == (2, 1, 2, 4)


def test_triage_recovers_the_generator_policy(small_cohort, triaged):
    result, out = triaged
    policy = _json(small_cohort / "policy.json")
    report = _json(out / "triage.json")
    assert report["counts"] == policy["counts"] == result.counts
    assert result.failed == [] and result.validation_source == "folder"
    training = {n: r for n, r in policy["cases"].items() if r["split"] in ("labelled", "unlabelled")}
    assert set(report["cases"]) == set(training)
    for name, record in training.items():
        found = report["cases"][name]
        assert found["organs"] == record["organs"], name  # the set A of every case
        assert found["tumor"] == record["tumor_annotated"], name
        assert (found["label"] is None) == (record["split"] == "unlabelled")
    assert "| fully organ labelled (all 13) | 1 | 0 | 1 |" in result.table()


def test_datalists_load_in_monai(small_cohort, triaged):
    result, out = triaged
    policy = _json(small_cohort / "policy.json")["cases"]
    fully = load_decathlon_datalist(out / "datalist_fully_labelled.json", True, "training")
    assert [d["name"] for d in fully] == [n for n, r in policy.items() if r.get("annotation") == "fully"]
    data = LoadImaged(["image", "label"], image_only=True)(fully[0])
    assert tuple(data["image"].shape) == tuple(data["label"].shape) == tuple(policy[fully[0]["name"]]["shape"])

    jobs = load_decathlon_datalist(out / "datalist_pseudo_label_jobs.json", True, "training")
    partial = [j for j in jobs if j["kind"] == "partial"]
    unlabelled = [j for j in jobs if j["kind"] == "unlabelled"]
    assert len(partial) == result.counts[PARTIAL] and len(unlabelled) == result.counts[NON_ORGAN]
    for job in partial:
        assert job["organs"] == policy[job["name"]]["organs"]
        labels, _ = load_label(job["label"])
        assert sorted(int(v) for v in np.unique(labels) if v in ORGAN_CLASSES) == job["organs"]
    for job in unlabelled:  # unlabelled scans without a label; non-organ labelled cases with theirs (tumor only)
        assert Path(job["image"]).is_file()
        assert ("label" in job) == (policy[job["name"]]["split"] == "labelled")
        if "label" in job:
            assert job["organs"] == [] and set(np.unique(load_label(job["label"])[0]).tolist()) <= {0, TUMOR}

    tumor = load_decathlon_datalist(out / "datalist_tumor.json", True, "training")
    assert sorted(d["name"] for d in tumor) == sorted(n for n, r in policy.items() if r["split"] == "labelled" and r["tumor_annotated"])
    assert all(TUMOR in np.unique(load_label(d["label"])[0]) for d in tumor)

    validation = load_decathlon_datalist(out / "datalist_validation.json", True, "validation")
    test = load_decathlon_datalist(out / "datalist_validation.json", True, "test")
    assert len(validation) == len(test) == 2 and all(Path(d["label"]).is_file() for d in validation + test)
    # paths are relative to the datalist's folder, so the prepared folder can move with the data
    raw = _json(out / "datalist_tumor.json")["training"][0]
    assert not os.path.isabs(raw["image"]) and not os.path.isabs(raw["label"])

    fingerprint = Fingerprint.load(out / "fingerprint.json")
    assert fingerprint.num_cases == sum(1 for r in policy.values() if r["split"] == "labelled" and (r["organs"] or r["tumor_annotated"]))
    assert -1024 <= fingerprint.lower < fingerprint.mean < fingerprint.upper <= 3071


# ----------------------------------------------------------------------------- failures
def test_triage_survives_corrupt_files(small_cohort, tmp_path):
    root = _copy_cohort(small_cohort, tmp_path / "data")
    label = root / "labelsTr" / "FLARE23Syn_0002.nii.gz"
    label.write_bytes(label.read_bytes()[:600])  # truncated: header fine, voxel data cut
    (root / "imagesTr" / "FLARE23Syn_0003_0000.nii.gz").write_bytes(b"not a nifti at all")
    (root / "labelsTr" / "FLARE23Syn_0005.nii.gz").unlink()  # an image without its label
    (root / "unlabeled" / "FLARE23Syn_0014_0000.nii.gz").write_bytes(gzip.compress(b"\0" * 100))

    result = triage_dataset(root, tmp_path / "prepared", progress=False)
    failed = {Path(f["path"]).name: f["error"] for f in result.failed}
    assert set(failed) == {"FLARE23Syn_0002.nii.gz", "FLARE23Syn_0003_0000.nii.gz", "FLARE23Syn_0005_0000.nii.gz", "FLARE23Syn_0014_0000.nii.gz"}
    assert all("\n" not in e for e in failed.values())
    assert "no label file" in failed["FLARE23Syn_0005_0000.nii.gz"]
    assert result.counts["total"] == 16 - 4
    assert {c.name for c in result.cases}.isdisjoint({"FLARE23Syn_0002", "FLARE23Syn_0003", "FLARE23Syn_0005", "FLARE23Syn_0014"})
    report = _json(tmp_path / "prepared" / "triage.json")
    assert len(report["failed"]) == 4 and "failed (skipped): 4" in result.table()
    # no validation folder here: fully labelled cases would be held out, but there is only one
    assert result.validation_source == "none"


def test_truncated_image_data(small_cohort, tmp_path):
    root = _copy_cohort(small_cohort, tmp_path / "data")
    policy = _json(small_cohort / "policy.json")["cases"]
    name = next(n for n, r in policy.items() if r["split"] == "labelled" and r["organs"])
    image = root / "imagesTr" / f"{name}_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:2000])
    # header-only triage passes it, but the fingerprint reads it in full: reported and dropped
    result = triage_dataset(root, tmp_path / "a", progress=False)
    assert [Path(f["path"]).name for f in result.failed] == [image.name]
    assert name not in {c.name for c in result.cases}
    jobs = _json(tmp_path / "a" / "datalist_pseudo_label_jobs.json")["training"]
    assert name not in {d["name"] for d in jobs}
    # verify_images finds it in the first pass
    result = triage_dataset(root, tmp_path / "b", fingerprint=False, verify_images=True, progress=False)
    assert [Path(f["path"]).name for f in result.failed] == [image.name]


# ----------------------------------------------------------------------------- datalist input
def test_datalist_input_and_held_out_validation(small_cohort, tmp_path):
    # a MONAI datalist with paths relative to its own folder: the validation and test cases (fully
    # labelled) and two partial ones as training, the unlabelled pool as "unlabeled"
    policy = _json(small_cohort / "policy.json")["cases"]
    base = os.path.relpath(small_cohort, tmp_path)
    full = [(f"validation/images/{n}_0000.nii.gz", f"validation/labels/{n}.nii.gz") for n, r in policy.items() if r["split"] == "validation"]
    full += [(f"test/images/{n}_0000.nii.gz", f"test/labels/{n}.nii.gz") for n, r in policy.items() if r["split"] == "test"]
    partial = [(f"imagesTr/{n}_0000.nii.gz", f"labelsTr/{n}.nii.gz") for n in ("FLARE23Syn_0002", "FLARE23Syn_0003")]
    unlabelled = [f"{base}/unlabeled/{n}_0000.nii.gz" for n, r in policy.items() if r["split"] == "unlabelled"]
    datalist = {
        "training": [{"image": f"{base}/{i}", "label": f"{base}/{l}"} for i, l in full + partial],
        "unlabeled": [{"image": u} for u in unlabelled[:2]] + unlabelled[2:],  # both spellings of an entry
    }
    path = tmp_path / "my_datalist.json"
    path.write_text(json.dumps(datalist))
    result = triage_dataset(path, None, fingerprint=False, validation_share=0.25, progress=False)
    out = tmp_path / "prepared"  # default: beside the datalist
    assert result.counts[FULLY] == 4 and result.counts["unlabelled"] == 4 and result.failed == []
    assert result.validation_source == "held_out_fully_labelled"
    held = [c.name for c in result.cases if c.held_out]
    assert len(held) == 1 and [c.name for c in result.validation] == held
    training = load_decathlon_datalist(out / "datalist_fully_labelled.json", True, "training")
    assert len(training) == 3 and held[0] not in {d["name"] for d in training}
    assert all(Path(d["image"]).is_file() for d in training)
    assert [d["name"] for d in load_decathlon_datalist(out / "datalist_validation.json", True, "validation")] == held
    again = triage_dataset(path, tmp_path / "again", fingerprint=False, validation_share=0.25, progress=False)
    assert [c.name for c in again.validation] == held  # chosen by name, not by chance


# ----------------------------------------------------------------------------- command line
def test_prepare_data_cli(small_cohort, tmp_path):
    root = _copy_cohort(small_cohort, tmp_path / "data")
    (root / "labelsTr" / "FLARE23Syn_0004.nii.gz").write_bytes(b"garbage")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("stmt-prepare-data")), "--data_root", str(root), "--out_dir", str(tmp_path / "p"), "--progress", "False", "--fingerprint", "False"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "| total |" in run.stdout and "skipped:" in run.stdout and "FLARE23Syn_0004.nii.gz" in run.stdout
    assert (tmp_path / "p" / "datalist_tumor.json").is_file()
    empty = subprocess.run(
        [str(Path(sys.executable).with_name("stmt-prepare-data")), "--data_root", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=120,
    )
    assert empty.returncode != 0 and "no such dataset" in empty.stderr


# ----------------------------------------------------------------------------- bad cases in a datalist
def test_each_kind_of_bad_case_in_a_datalist_is_caught_with_its_reason(small_cohort, tmp_path):
    """Every case triage passes loads; every bad one is listed with its reason, none reaches training."""
    import nibabel as nib

    from stmt_monai.io import load_image

    policy = _json(small_cohort / "policy.json")["cases"]
    names = [n for n, r in policy.items() if r["split"] == "labelled"][:10]
    data = tmp_path / "data"
    entries = []
    for n in names:
        for kind, src in (("images", small_cohort / "imagesTr" / f"{n}_0000.nii.gz"), ("labels", small_cohort / "labelsTr" / f"{n}.nii.gz")):
            (data / kind).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, data / kind / src.name)
        entries.append({"image": f"data/images/{n}_0000.nii.gz", "label": f"data/labels/{n}.nii.gz"})
    good, bad = names[:2], dict(zip(["unreadable", "truncated_gz", "truncated_nii", "shape", "affine", "value_15", "value_float", "missing"], names[2:]))

    def label_of(name):
        image = nib.load(data / "labels" / f"{name}.nii.gz")
        return np.asarray(image.dataobj), image.affine

    (data / "images" / f"{bad['unreadable']}_0000.nii.gz").write_bytes(b"not a NIfTI file")
    image = data / "images" / f"{bad['truncated_gz']}_0000.nii.gz"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) * 7 // 10])  # a download cut short
    image = data / "images" / f"{bad['truncated_nii']}_0000.nii.gz"
    plain = data / "images" / f"{bad['truncated_nii']}_0000.nii"
    plain.write_bytes(gzip.decompress(image.read_bytes())[:-5000])
    image.unlink()
    entries[names.index(bad["truncated_nii"])]["image"] = f"data/images/{plain.name}"
    labels, affine = label_of(bad["shape"])
    shape = labels.shape
    nib.save(nib.Nifti1Image(labels[:-4], affine), data / "labels" / f"{bad['shape']}.nii.gz")
    labels, affine = label_of(bad["affine"])
    nib.save(nib.Nifti1Image(labels, affine @ np.diag([1.0, 1.0, 1.01, 1.0])), data / "labels" / f"{bad['affine']}.nii.gz")
    labels, affine = label_of(bad["value_15"])
    labels[0, 0, 0] = 15
    nib.save(nib.Nifti1Image(labels, affine), data / "labels" / f"{bad['value_15']}.nii.gz")
    labels, affine = label_of(bad["value_float"])
    nib.save(nib.Nifti1Image(labels.astype(np.float32) * 0.5, affine), data / "labels" / f"{bad['value_float']}.nii.gz")
    (data / "images" / f"{bad['missing']}_0000.nii.gz").unlink()
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))

    result = triage_dataset(tmp_path / "datalist.json", tmp_path / "prepared", fingerprint=False, progress=False)
    failed = {Path(f["path"]).name: f["error"].split(": ", 1)[1] for f in result.failed}
    assert all("\n" not in e for e in failed.values())
    reasons = {
        f"{bad['unreadable']}_0000.nii.gz": "not a readable NIfTI image",
        f"{bad['truncated_gz']}_0000.nii.gz": "voxel data cut short or corrupt (EOFError",
        f"{bad['truncated_nii']}_0000.nii": "voxel data cut short: the file holds",
        f"{bad['shape']}.nii.gz": f"label shape {(shape[0] - 4, *shape[1:])} differs from its image's {shape}",
        f"{bad['affine']}.nii.gz": "label affine differs from its image's (not on the same voxel grid)",
        f"{bad['value_15']}.nii.gz": "holds values outside the FLARE labels 0..14",
        f"{bad['value_float']}.nii.gz": "holds values outside the FLARE labels 0..14",
        f"{bad['missing']}_0000.nii.gz": "no such file or folder",
    }
    assert set(failed) == set(reasons)
    for name, reason in reasons.items():
        assert failed[name].startswith(reason), (name, failed[name])
    assert sorted(c.name for c in result.cases) == sorted(good)
    # what triage passed, training can load (the cut-short image would fail there otherwise)
    for kind in ("fully_labelled", "pseudo_label_jobs", "tumor"):
        for item in load_decathlon_datalist(result.outputs[kind], True, "training"):
            load_image(item["image"])
            if item.get("label"):
                load_label(item["label"])
    with pytest.raises(Exception):  # the truncated image passes a header-only read, fails a full one
        load_image(data / "images" / f"{bad['truncated_gz']}_0000.nii.gz")
