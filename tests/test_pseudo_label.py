"""Self-training steps 2 and 3: the correction rule, the pseudo-label job, the student's batches
and its weighted loss (paper section 2.2, Fig. 2a, eq. (1)).

The correction rule is tested on hand-made arrays; the job (``stmt_monai.training.pseudo_label``) on a
tiny generated cohort with teachers whose output is known exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.inferers import SimpleInferer

from stmt_monai.data.datalists import student_datalist
from stmt_monai.data.sampling import StreamBatchSampler
from stmt_monai.io import load_label, save_label_map
from stmt_monai.labels import ORGAN_CLASSES, TUMOR
from stmt_monai.training.losses import CPL, LABELLED, ORGAN_STREAM_WEIGHTS, PL, WeightedStreamsLoss, dice_ce_loss
from stmt_monai.training.pseudo_label import PSEUDO_DATALIST, RAW_DIR, generate_pseudo_labels, keep_annotated_tumor, teacher_confidence
from stmt_monai.training.self_training import annotated_organ_classes, correct_pseudo_label

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "organ_selftrain" / "configs"
#: the teacher's input spacing in these tests: a coarse grid keeps every case a few thousand voxels
SPACING = [12.0, 12.0, 12.0]


# ----------------------------------------------------------------------------- the correction rule
def test_correction_on_a_hand_made_case():
    """Paper: A = annotated organ classes; pseudo voxels in A -> 0; annotated voxels written."""
    pseudo = np.array([[1, 1, 2, 2, 3, 3, 0, 5]], np.uint8)[None]
    annotation = np.array([[1, 0, 0, 2, 0, 0, 14, 0]], np.uint8)[None]  # A = {1, 2}; tumor annotated
    assert annotated_organ_classes(annotation) == (1, 2)
    corrected = correct_pseudo_label(pseudo, annotation)
    # voxel 1: teacher's liver outside the liver annotation -> 0; voxel 2: teacher's kidney -> 0;
    # classes 3, 5 (not in A) keep the teacher's value; the tumor is not an organ class: not written
    assert corrected.tolist() == [[[1, 0, 0, 2, 3, 3, 0, 5]]]
    assert corrected.dtype == pseudo.dtype and pseudo.tolist() == [[[1, 1, 2, 2, 3, 3, 0, 5]]]  # input untouched
    # the job then writes the annotated tumor in (stage 1's target is every label > 0)
    assert keep_annotated_tumor(corrected, annotation).tolist() == [[[1, 0, 0, 2, 3, 3, 14, 5]]]


def test_annotation_wins_over_an_unannotated_class_of_the_teacher():
    pseudo = np.array([[[3, 3, 3, 3]]], np.uint8)  # teacher: spleen everywhere
    annotation = np.array([[[0, 1, 1, 0]]], np.uint8)  # A = {1}: liver annotated where the teacher saw spleen
    assert correct_pseudo_label(pseudo, annotation).tolist() == [[[3, 1, 1, 3]]]


def test_explicit_annotated_set_and_unlabelled_case():
    pseudo = np.array([[[1, 2, 4, 0]]], np.uint8)
    annotation = np.array([[[0, 0, 4, 4]]], np.uint8)
    # A given explicitly (e.g. from the triage datalist) is the same as A read from the annotation
    assert correct_pseudo_label(pseudo, annotation, (4,)).tolist() == correct_pseudo_label(pseudo, annotation).tolist()
    assert correct_pseudo_label(pseudo, annotation).tolist() == [[[1, 2, 4, 4]]]
    # no annotated organ (A empty): the pseudo label is kept as is (PL)
    empty = np.zeros_like(annotation)
    assert correct_pseudo_label(pseudo, empty).tolist() == pseudo.tolist()
    with pytest.raises(ValueError, match="differ in shape"):
        correct_pseudo_label(pseudo, annotation[..., :2])


@pytest.mark.parametrize("seed", range(5))
def test_correction_rule_holds_on_random_volumes(seed):
    """The three properties of the issue, on random 3D label maps and random annotated sets."""
    rng = np.random.default_rng(seed)
    shape = (9, 8, 7)
    pseudo = rng.integers(0, 14, shape).astype(np.uint8)  # the teacher never predicts tumor
    truth = rng.integers(0, 15, shape).astype(np.uint8)
    classes = tuple(sorted(rng.choice(ORGAN_CLASSES, rng.integers(1, 13), replace=False).tolist()))
    annotation = np.where(np.isin(truth, classes + (TUMOR,)), truth, 0).astype(np.uint8)
    a = annotated_organ_classes(annotation)
    corrected = correct_pseudo_label(pseudo, annotation)
    for c in a:
        # every annotated class is exactly its annotation: no pseudo value of A outside it
        assert np.array_equal(corrected == c, annotation == c)
    annotated = np.isin(annotation, a)
    outside = ~annotated & ~np.isin(pseudo, a)
    # everywhere else the teacher's value stands; pseudo voxels of A outside the annotation are 0
    assert np.array_equal(corrected[outside], pseudo[outside])
    assert np.all(corrected[~annotated & np.isin(pseudo, a)] == 0)


# ----------------------------------------------------------------------------- the student's batches
def stream_items(counts: dict[str, int]) -> list[dict]:
    return [{"image": f"{s}{i}", "stream": s} for s, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("counts", [{LABELLED: 2, CPL: 11, PL: 29}, {LABELLED: 5, CPL: 5, PL: 5}, {LABELLED: 1, CPL: 40, PL: 3}])
def test_batches_hold_the_three_kinds_in_equal_proportion(counts):
    data = stream_items(counts)
    sampler = StreamBatchSampler(data, batch_size=3, seed=1)
    batches = list(sampler)
    assert len(batches) == math.ceil(len(data) / 3)
    for batch in batches:  # batch size 3 (Table 2): one case of each kind in every batch
        assert sorted(data[i]["stream"] for i in batch) == sorted([LABELLED, CPL, PL])
    # batch size 6: two of each
    for batch in StreamBatchSampler(data, batch_size=6, seed=1):
        assert Counter(data[i]["stream"] for i in batch) == {LABELLED: 2, CPL: 2, PL: 2}
    # a small stream repeats evenly, a large one is sampled without repeats before it is used up
    for stream, n in counts.items():
        seen = Counter(data[i]["image"] for batch in batches for i in batch if data[i]["stream"] == stream)
        if n >= len(batches):
            assert max(seen.values()) == 1
        else:
            assert len(seen) == n and max(seen.values()) - min(seen.values()) <= 1
    # each epoch draws other batches (set_epoch, called by SelfTrainingTrainer at every epoch start)
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_student_datalist_batches_collate(tmp_path):
    """Labelled and pseudo-labelled items carry different extra fields; mixed batches still collate."""
    labelled = [{"image": "a.nii.gz", "label": "a_seg.nii.gz", "name": "a", "tumor": True}]
    pseudo = [
        {"image": "b.nii.gz", "label": "b.nii.gz", "name": "b", "stream": CPL, "annotated_classes": [1, 2], "quality": 0.9},
        {"image": "c.nii.gz", "label": "c.nii.gz", "name": "c", "stream": PL, "annotated_classes": [], "quality": 0.8},
    ]
    items = student_datalist(labelled, pseudo)
    assert [i["stream"] for i in items] == [LABELLED, CPL, PL]
    assert all(set(i) == {"image", "label", "name", "stream"} for i in items)
    batch = next(iter(DataLoader(Dataset(items), batch_sampler=StreamBatchSampler(items, batch_size=3))))
    assert sorted(batch["stream"]) == sorted([LABELLED, CPL, PL])
    assert [i["stream"] for i in student_datalist(labelled, pseudo, streams=(LABELLED, CPL))] == [LABELLED, CPL]


# ----------------------------------------------------------------------------- the student's loss
def test_each_kind_of_loss_is_weighted_as_specified():
    """L_o = L_ol + lambda1 L_cpl + lambda2 L_pl, lambda1 = 1, lambda2 = 0.5, on known inputs."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 14, 4, 4, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 14, (3, 1, 4, 4, 4), generator=g).double()
    base = dice_ce_loss()
    term = [float(base(logits[i : i + 1], target[i : i + 1])) for i in range(3)]
    loss = WeightedStreamsLoss(ORGAN_STREAM_WEIGHTS)
    total = float(loss(logits, target, [PL, LABELLED, CPL]))
    assert total == pytest.approx(term[1] + 1.0 * term[2] + 0.5 * term[0], rel=1e-12)
    assert loss.last_terms == pytest.approx({LABELLED: term[1], CPL: term[2], PL: term[0]}, rel=1e-12)
    # a hand-computable case: a perfect prediction has ~0 loss, so only the other terms count
    perfect = torch.nn.functional.one_hot(target[:, 0].long(), 14).permute(0, 4, 1, 2, 3).double() * 100.0
    mixed = torch.cat([perfect[:1], logits[1:2], perfect[2:]])
    assert float(loss(mixed, target, [LABELLED, PL, CPL])) == pytest.approx(0.5 * term[1], abs=1e-4)


def test_bundle_loss_takes_lambdas_from_named_keys():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    loss = parser.get_parsed_content("loss")
    assert loss.weights == dict(ORGAN_STREAM_WEIGHTS) == {LABELLED: 1.0, CPL: 1.0, PL: 0.5}
    parser["lambda1"], parser["lambda2"] = 0.7, 0.25
    parser.parse(reset=True)
    assert parser.get_parsed_content("loss").weights == {LABELLED: 1.0, CPL: 0.7, PL: 0.25}


# ----------------------------------------------------------------------------- the job
class ConstantTeacher(torch.nn.Module):
    """A teacher whose softmax is known: class ``label`` with logit ``margin``, others 0."""

    def __init__(self, label: int, margin: float = 4.0, num_classes: int = 14):
        super().__init__()
        self.label, self.margin, self.num_classes = label, margin, num_classes
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to move to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[2:], dtype=x.dtype)
        logits[:, self.label] = self.margin
        return logits + 0 * self.weight

    def confidence(self) -> float:
        return math.exp(self.margin) / (math.exp(self.margin) + self.num_classes - 1)


@pytest.fixture(scope="module")
def cohort(tiny_cohort):
    """The shared tiny generated cohort (tests/conftest.py): ``(root, prepared)``."""
    return Path(tiny_cohort.root), Path(tiny_cohort.prepared)


def jobs_of(cohort) -> list[dict]:
    prepared = cohort[1]
    return json.loads((prepared / "datalist_pseudo_label_jobs.json").read_text())["training"]


def few_jobs(cohort) -> list[dict]:
    """Two partial and two unlabelled jobs, paths absolute (a list instead of the datalist JSON)."""
    prepared = cohort[1]
    jobs = [j for j in jobs_of(cohort) if j["kind"] == "partial"][:2] + [j for j in jobs_of(cohort) if j["kind"] == "unlabelled"][:2]
    return [{**j, **{k: str(prepared / j[k]) for k in ("image", "label") if j.get(k)}} for j in jobs]


def run_job(cohort, out, teacher, jobs=None, **kwargs):
    root, prepared = cohort
    return generate_pseudo_labels(
        teacher, SimpleInferer(), prepared / "datalist_pseudo_label_jobs.json" if jobs is None else jobs,
        prepared / "fingerprint.json", out, SPACING, "cpu", progress=False, **kwargs,
    )


def test_job_writes_corrected_and_plain_pseudo_labels(cohort, tmp_path):
    jobs = jobs_of(cohort)
    kinds = Counter(j["kind"] for j in jobs)
    assert kinds["partial"] >= 2 and kinds["unlabelled"] >= 2
    teacher = ConstantTeacher(label=1)  # liver everywhere
    summary = run_job(cohort, tmp_path, teacher, keep_raw=True)
    assert summary["predicted"] == len(jobs) and summary["skipped"] == 0 and summary["failed"] == []
    datalist = json.loads((tmp_path / PSEUDO_DATALIST).read_text())
    records = {r["name"]: r for r in datalist["training"]}
    assert set(records) == {j["name"] for j in jobs} and datalist["excluded_low_quality"] == []
    for job in jobs:
        record = records[job["name"]]
        image = nib.load(cohort[1] / job["image"])
        out = nib.load(tmp_path / record["label"])
        assert out.shape == image.shape and np.allclose(out.affine, image.affine, atol=1e-5)
        assert (tmp_path / record["image"]).resolve() == (cohort[1] / job["image"]).resolve()  # relative paths
        raw = np.asarray(nib.load(tmp_path / RAW_DIR / record["label"]).dataobj)
        assert np.all(raw == 1)  # the teacher's prediction, on the input grid
        pseudo = np.asarray(out.dataobj)
        assert record["quality"] == pytest.approx(teacher.confidence(), abs=1e-5)
        if job["kind"] == "partial":
            annotation, _ = load_label(cohort[1] / job["label"])
            a = annotated_organ_classes(annotation)
            assert record["stream"] == CPL and record["annotated_classes"] == list(a) == job["organs"]
            expected = keep_annotated_tumor(correct_pseudo_label(raw, annotation, a), annotation)
            assert np.array_equal(pseudo, expected)
            for c in a:
                assert np.array_equal(pseudo == c, annotation == c)
            assert np.array_equal(pseudo == TUMOR, annotation == TUMOR)
        else:
            assert record["stream"] == PL and record["annotated_classes"] == []
            if job.get("label"):  # non-organ labelled: the teacher's organs, the annotated tumor kept
                annotation, _ = load_label(cohort[1] / job["label"])
                assert np.array_equal(pseudo == TUMOR, annotation == TUMOR) and np.all(pseudo[annotation != TUMOR] == 1)
            else:
                assert np.all(pseudo == 1)
    # the student reads it: fully labelled + CPL + PL, with paths it can open
    items = student_datalist(cohort[1] / "datalist_fully_labelled.json", tmp_path / PSEUDO_DATALIST)
    assert Counter(i["stream"] for i in items) == {
        LABELLED: len(json.loads((cohort[1] / "datalist_fully_labelled.json").read_text())["training"]),
        CPL: kinds["partial"],
        PL: kinds["unlabelled"],
    }
    assert all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)


def test_job_is_resumable_and_survives_bad_cases(cohort, tmp_path):
    teacher = ConstantTeacher(label=3)
    jobs = few_jobs(cohort)
    first = run_job(cohort, tmp_path, teacher, jobs)
    assert first["predicted"] == len(jobs)
    # a rerun skips everything; a lost output is predicted again, and only it
    assert run_job(cohort, tmp_path, teacher, jobs)["skipped"] == len(jobs)
    (tmp_path / f"{jobs[0]['name']}.nii.gz").unlink()
    again = run_job(cohort, tmp_path, teacher, jobs)
    assert (again["predicted"], again["skipped"]) == (1, len(jobs) - 1)
    # bad cases are reported and skipped; the others are written; the datalist stays valid
    image = Path(jobs[0]["image"])
    save_label_map(tmp_path / "small.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4))
    bad = [
        {"image": str(tmp_path / "missing_0000.nii.gz"), "name": "missing", "kind": "unlabelled"},
        {"image": str(image), "label": str(tmp_path / "small.nii.gz"), "name": "wrong_grid", "kind": "partial"},
    ]
    good = [{"image": str(image), "name": "good", "kind": "unlabelled"}]
    other = tmp_path / "other"
    summary = generate_pseudo_labels(teacher, SimpleInferer(), bad + good, cohort[1] / "fingerprint.json", other, SPACING, progress=False)
    assert {f["name"] for f in summary["failed"]} == {"missing", "wrong_grid"} and summary["predicted"] == 1
    datalist = json.loads((other / PSEUDO_DATALIST).read_text())
    assert [r["name"] for r in datalist["training"]] == ["good"]
    errors = {f["name"]: f["error"] for f in datalist["failed"]}
    assert "no such file" in errors["missing"] and "differs from its image" in errors["wrong_grid"]
    assert not (other / "missing.nii.gz").exists() and not (other / "wrong_grid.nii.gz").exists()


class KillingTeacher(ConstantTeacher):
    """A constant teacher that kills its own process (SIGKILL) in its ``kill_at``-th forward."""

    def __init__(self, label: int, kill_at: int):
        super().__init__(label)
        self.kill_at, self.calls = kill_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def test_a_killed_job_resumes_where_it_stopped(cohort, tmp_path):
    """Killed (SIGKILL) while predicting its third case: the first two are on disk and in a valid
    datalist, nothing is half-written, and the rerun predicts only the last two."""
    jobs = few_jobs(cohort)
    pid = os.fork()
    if pid == 0:  # the child runs the job until the kill; one thread, as DataLoader workers do
        try:
            torch.set_num_threads(1)
            run_job(cohort, tmp_path, KillingTeacher(label=3, kill_at=3), jobs)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    done = [j["name"] for j in jobs[:2]]
    assert [r["name"] for r in json.loads((tmp_path / PSEUDO_DATALIST).read_text())["training"]] == done
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted([PSEUDO_DATALIST] + [f"{n}.nii.gz" for n in done])
    teacher = KillingTeacher(label=3, kill_at=0)  # never kills; counts its cases
    summary = run_job(cohort, tmp_path, teacher, jobs)
    assert (summary["predicted"], summary["skipped"], teacher.calls) == (2, 2, 2)
    assert [r["name"] for r in json.loads((tmp_path / PSEUDO_DATALIST).read_text())["training"]] == [j["name"] for j in jobs]


def test_quality_threshold_is_off_by_default_and_drops_the_worst(cohort, tmp_path):
    confident, unsure = ConstantTeacher(label=1, margin=6.0), ConstantTeacher(label=1, margin=0.5)
    assert teacher_confidence(torch.softmax(confident(torch.zeros(1, 1, 2, 2, 2))[0].detach(), 0), torch.ones(2, 2, 2, dtype=torch.long)) == pytest.approx(confident.confidence())
    # background everywhere: the teacher finds no organ: quality 0
    assert teacher_confidence(torch.softmax(torch.zeros(14, 2, 2, 2), 0), torch.zeros(2, 2, 2, dtype=torch.long)) == 0.0
    jobs = few_jobs(cohort)
    run_job(cohort, tmp_path / "a", unsure, jobs)
    assert len(json.loads((tmp_path / "a" / PSEUDO_DATALIST).read_text())["training"]) == len(jobs)
    threshold = (unsure.confidence() + confident.confidence()) / 2
    summary = run_job(cohort, tmp_path / "a", unsure, jobs, quality_threshold=threshold)
    # no new prediction needed: the stored scores are compared with the new threshold
    assert summary["skipped"] == len(jobs) and sorted(summary["excluded"]) == sorted(j["name"] for j in jobs)
    datalist = json.loads((tmp_path / "a" / PSEUDO_DATALIST).read_text())
    assert datalist["training"] == [] and datalist["quality_threshold"] == threshold
    assert len(datalist["excluded_low_quality"]) == len(jobs)
    summary = run_job(cohort, tmp_path / "a", confident, jobs, quality_threshold=threshold, overwrite=True)
    assert summary["predicted"] == len(jobs) and summary["excluded"] == []
