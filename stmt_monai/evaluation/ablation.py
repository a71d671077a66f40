"""The paper's ablation (Table 3) re-run through the bundles' own workflows on a generated cohort.

Every row trains with the workflow a user runs (``python -m monai.bundle run`` of
``organ_selftrain`` ``train_teacher`` / ``pseudo_label`` / ``train`` and ``tumor_meanteacher``
``train``, through :func:`stmt_monai.bundle.run_workflow`); a row differs from another only by the
config overrides listed in :data:`ROWS` (its datalists, its streams, lambda). Each trained model is
scored on the cohort's held-out test cases by the bundle's own ``inference`` workflow and the
FLARE23 metrics (:mod:`stmt_monai.evaluation.metrics`), tumors also lesion by lesion
(:mod:`stmt_monai.evaluation.lesions`).

Rows (the paper's Table 3, plus the oracle upper bounds):

============================  =====================================================================
``nnunet``                    organ student on every labelled case, partial labels as they are
                              (unannotated organs are background), supervised
``fso``                       organ student on the fully organ labelled cases only
``st_partial``                self-training: fully labelled + corrected pseudo labels (CPL)
``st_partial_unlabelled``     self-training: fully labelled + CPL + pseudo labels (PL), eq. (1)
``st_oracle``                 as ``st_partial_unlabelled``, the teacher replaced by the hidden truth
``fst``                       tumor student on the tumor-annotated cases, supervised (lambda = 0)
``mean_teacher``              the tumor mean teacher, eq. (2)
``mt_oracle``                 eq. (2) with the teacher's prediction replaced by the hidden truth
``mt_paper``                  eq. (2) with the paper's constant lambda from the first iteration and a
                              plain EMA (the bundle's default ramps lambda up and warms the EMA up)
``mt_confident``              eq. (2) with only the teacher's confident tumor (probability > 0.9)
                              in the extra target (``teacher_threshold``; 0.5, the argmax, is the
                              paper's and the default)
``mt_soft``                   eq. (2) with the original mean teacher's consistency: the squared
                              difference between the student's and the teacher's probabilities,
                              the teacher's corrected with the annotation (``teacher_target``
                              ``soft``; ``hard``, the paper's union target under Dice + CE, is
                              the default)
``mt_classic``                the original mean teacher's recipe in full: the soft target, the
                              teacher seeing its own noisy view (``teacher_noise_std`` 0.1, in
                              z-scored intensity) and a consistency weight lambda = 10
``fst_full``                  FST trained on the hidden truth of the same cases: every lesion
                              annotated (the upper bound of anything the unannotated lesions can
                              give a tumor student, whatever the teacher)
``fst_x2``                    FST with its loss doubled (``labelled`` weight 2): eq. (2)'s gradient
                              scale once lambda is 1, with FST's target, so that the mean teacher
                              can be compared with FST at the same SGD step size
============================  =====================================================================

Seeds change the networks' initialisation, batch order and augmentation of every run (teacher
included); the cohort and its test cases are the same for every seed, so rows compare paired
within a seed (:func:`paired_difference`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from stmt_monai.bundle import run_workflow
from stmt_monai.evaluation.lesions import detection_totals
from stmt_monai.io import case_name, find_cases, load_label, write_text_atomic
from stmt_monai.labels import ORGAN_CLASSES, TUMOR

logger = logging.getLogger(__name__)

ORGAN_ROWS = ("nnunet", "fso", "st_partial", "st_partial_unlabelled", "st_oracle")
TUMOR_ROWS = ("fst", "mean_teacher", "mt_oracle", "mt_paper", "mt_confident", "mt_soft", "mt_classic", "fst_x2", "fst_full")
ROW_NAMES = ORGAN_ROWS + TUMOR_ROWS
#: rows that train on the cohort's hidden truth: upper bounds, not methods
UPPER_BOUND_ROWS = ("st_oracle", "mt_oracle", "fst_full")
#: the paper's Table 3 (validation set, %): organ DSC / NSD and tumor DSC / NSD
PAPER_TABLE3: Mapping[str, dict[str, float]] = {
    "nnunet": {"organ_dsc": 38.76, "organ_nsd": 40.32, "tumor_dsc": 46.8, "tumor_nsd": 35.47},
    "fso": {"organ_dsc": 87.86, "organ_nsd": 94.27},
    "st_partial": {"organ_dsc": 89.1, "organ_nsd": 95.58},
    "st_partial_unlabelled": {"organ_dsc": 89.6, "organ_nsd": 96.19},
    "fst": {"tumor_dsc": 46.69, "tumor_nsd": 39.02},
    "mean_teacher": {"tumor_dsc": 52.08, "tumor_nsd": 42.82},
}
#: the paper's trends the ablation checks: (better row, worse row, metric)
TRENDS = (
    ("fso", "nnunet", "organ_dsc"),
    ("st_partial", "fso", "organ_dsc"),
    ("st_partial_unlabelled", "fso", "organ_dsc"),
    ("st_partial_unlabelled", "st_partial", "organ_dsc"),
    ("mean_teacher", "fst", "tumor_dsc"),
    ("st_oracle", "fso", "organ_dsc"),
    ("mt_oracle", "fst", "tumor_dsc"),
    ("mean_teacher", "mt_paper", "tumor_dsc"),
    ("mt_confident", "fst", "tumor_dsc"),
    ("mt_confident", "mean_teacher", "tumor_dsc"),
    ("mt_confident", "fst_x2", "tumor_dsc"),
    ("mt_soft", "fst", "tumor_dsc"),
    ("mt_soft", "mean_teacher", "tumor_dsc"),
    ("mt_classic", "fst", "tumor_dsc"),
    ("mt_classic", "mean_teacher", "tumor_dsc"),
    ("mt_classic", "mt_soft", "tumor_dsc"),
    ("mean_teacher", "fst_x2", "tumor_dsc"),
    ("fst", "fst_x2", "tumor_dsc"),
    ("fst_full", "fst", "tumor_dsc"),
    ("mt_oracle", "fst_full", "tumor_dsc"),
)
ORGAN_BUNDLE, TUMOR_BUNDLE = "organ_selftrain", "tumor_meanteacher"
DONE = "done.json"


@dataclasses.dataclass
class AblationSettings:
    """Sizes and schedule of an ablation run (every row of a stage gets the same).

    Args:
        spatial_size, base_channels, num_downsamplings, max_channels: the students' input and
            Res-UNet (the paper: 192^3, 16, 5, 320).
        organ_epochs, batches_per_epoch: organ students: epochs of ``batches_per_epoch`` batches
            (the same iterations for every organ row, whatever its number of cases).
        tumor_epochs: tumor students: epochs over the tumor-annotated cases.
        learning_rate, momentum: the students' SGD (Nesterov; poly decay over the epochs).
        val_interval: validation (and learning-curve point) every this many epochs.
        teacher_*: the organ teacher (``train_teacher``): network kind, width, depth, patch size,
            voxel spacing (finer than the students' whole-ROI resize), epochs, batch, patches
            per case, learning rate and momentum.
        teacher_seed: ``None``: a teacher per seed (its own initialisation and batches); a seed:
            the teacher of that seed serves every seed's self-training rows (one long teacher).
        device: ``cpu`` or ``cuda``.
        cpu_bf16: the students' forward passes under CPU bfloat16 autocast (default: where the
            CPU has native bf16, AVX512-BF16 or AMX).
        threads: torch threads per training process.
        parallel: training processes at once.
    """

    spatial_size: tuple[int, int, int] = (40, 40, 40)
    base_channels: int = 8
    num_downsamplings: int = 3
    max_channels: int = 128
    organ_epochs: int = 80
    batches_per_epoch: int = 10
    tumor_epochs: int = 50
    learning_rate: float = 0.2
    momentum: float = 0.9
    val_interval: int = 5
    teacher_kind: str = "res_unet_large"
    teacher_base_channels: int = 8
    teacher_num_downsamplings: int = 4
    teacher_roi_size: tuple[int, int, int] = (48, 48, 48)
    teacher_spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    teacher_epochs: int = 400
    teacher_batch_size: int = 2
    teacher_num_patches: int = 1
    teacher_learning_rate: float = 0.2
    teacher_momentum: float = 0.9
    teacher_seed: int | None = None
    device: str = "cpu"
    cpu_bf16: bool | None = None
    threads: int = 1
    parallel: int = 2

    def __post_init__(self):
        if self.cpu_bf16 is None:  # where the CPU computes in bf16 (the students' forward passes)
            from stmt_monai.inference.backends import BF16_FLAGS, cpu_flags

            self.cpu_bf16 = self.device == "cpu" and any(f in cpu_flags() for f in BF16_FLAGS)

    def student(self) -> dict:
        """Overrides shared by every student run."""
        return {
            "spatial_size": list(self.spatial_size),
            "base_channels": self.base_channels,
            "num_downsamplings": self.num_downsamplings,
            "max_channels": self.max_channels,
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
            "val_interval": self.val_interval,
            "num_workers": 0,
            "cache_rate": 1.0,
            "device": f"$torch.device('{self.device}')",
            "amp": self.device.startswith("cuda"),
            "cpu_bf16": bool(self.cpu_bf16),
        }

    def network(self) -> dict:
        return {k: self.student()[k] for k in ("spatial_size", "base_channels", "num_downsamplings", "max_channels", "device", "amp")}

    def teacher(self) -> dict:
        """Overrides of the teacher's workflows (``train_teacher`` and ``pseudo_label``)."""
        return {
            "teacher_kind": self.teacher_kind,
            "teacher_base_channels": self.teacher_base_channels,
            "teacher_num_downsamplings": self.teacher_num_downsamplings,
            "teacher_roi_size": list(self.teacher_roi_size),
            "teacher_spacing_mm": list(self.teacher_spacing_mm),
            "num_workers": 0,
            "device": f"$torch.device('{self.device}')",
        }

    def teacher_training(self) -> dict:
        """Overrides of ``train_teacher`` beyond :meth:`teacher`."""
        return {
            "teacher_max_epochs": self.teacher_epochs,
            "teacher_batch_size": self.teacher_batch_size,
            "teacher_num_patches": self.teacher_num_patches,
            "teacher_learning_rate": self.teacher_learning_rate,
            "momentum": self.teacher_momentum,
            "teacher_val_interval": max(self.teacher_epochs // 10, 1),
            "teacher_crop_roi": True,
            "cache_rate": 1.0,
            "amp": self.device.startswith("cuda"),
            "cpu_bf16": bool(self.cpu_bf16),
        }


# ----------------------------------------------------------------------------- the work folder
@dataclasses.dataclass(frozen=True)
class AblationPaths:
    """Where an ablation run keeps everything (``work_dir``) and reads its cohort."""

    cohort: Path
    work: Path

    @property
    def prepared(self) -> Path:
        return self.work / "prepared"

    @property
    def lists(self) -> Path:
        return self.work / "datalists"

    @property
    def oracle_pseudo(self) -> Path:
        return self.work / "oracle_pseudo_labels"

    def seed_dir(self, seed: int) -> Path:
        return self.work / f"seed{seed}"

    def run_dir(self, row: str, seed: int) -> Path:
        return self.seed_dir(seed) / row

    def teacher_dir(self, seed: int) -> Path:
        return self.seed_dir(seed) / "teacher"

    def pseudo_dir(self, seed: int) -> Path:
        return self.seed_dir(seed) / "pseudo_labels"

    @property
    def test_images(self) -> Path:
        return self.cohort / "test" / "images"

    @property
    def test_labels(self) -> Path:
        return self.cohort / "test" / "labels"


def _write_datalist(path: Path, items: Sequence[Mapping], key: str = "training") -> Path:
    return write_text_atomic(path, json.dumps({key: [dict(i) for i in items]}, indent=1) + "\n")


def prepare(paths: AblationPaths) -> dict:
    """Triage the cohort and write the datalists that only the ablation needs.

    - ``prepared/``: the triage of :func:`stmt_monai.data.triage.triage_dataset` (datalists,
      fingerprint), exactly what ``stmt-prepare-data`` writes for a user;
    - ``datalists/all_labelled.json``: every labelled case with its partial label as it is
      (the ``nnunet`` row);
    - ``datalists/tumor_oracle.json``: the tumor-annotated cases with ``oracle``, the hidden truth
      (the ``mt_oracle`` row);
    - ``datalists/tumor_full.json``: the same cases with the hidden truth as their ``label``
      (the ``fst_full`` row);
    - ``datalists/test_jobs.json``: the test images as pseudo-label jobs (the teacher's test score);
    - ``oracle_pseudo_labels/``: the hidden truth as the teacher's prediction, corrected as the
      teacher's is (:func:`stmt_monai.synthetic.oracle.oracle_pseudo_labels`, the ``st_oracle`` row).

    Returns:
        The triage counts.
    """
    from stmt_monai.data.datalists import load_datalist
    from stmt_monai.data.triage import triage_dataset
    from stmt_monai.synthetic.annotation import case_paths
    from stmt_monai.synthetic.oracle import oracle_pseudo_labels

    result = triage_dataset(paths.cohort, paths.prepared, progress=False)
    policy = json.loads((paths.cohort / "policy.json").read_text())
    labelled = []
    for name, record in sorted(policy["cases"].items()):
        if record["split"] == "labelled":
            files = case_paths(name, record["split"])
            labelled.append({"image": str(paths.cohort / files["image"]), "label": str(paths.cohort / files["label"]), "name": name})
    _write_datalist(paths.lists / "all_labelled.json", labelled)
    tumor = load_datalist(paths.prepared / "datalist_tumor.json")
    truth = [str(paths.cohort / "truth" / f"{case_name(item['image'])}.nii.gz") for item in tumor]
    _write_datalist(paths.lists / "tumor_oracle.json", [{**item, "oracle": t} for item, t in zip(tumor, truth)])
    _write_datalist(paths.lists / "tumor_full.json", [{**item, "label": t} for item, t in zip(tumor, truth)])
    jobs = [{"image": str(p), "name": case_name(p)} for p in find_cases(paths.test_images)]
    _write_datalist(paths.lists / "test_jobs.json", jobs)
    if not (paths.oracle_pseudo / "datalist_pseudo_labelled.json").is_file():
        oracle_pseudo_labels(paths.cohort, paths.prepared, paths.oracle_pseudo)
    return result.counts if hasattr(result, "counts") else {}


# ----------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class Step:
    """One run of a bundle workflow: ``name`` (unique within a seed), after the ``needs`` steps
    (``(seed, name)`` pairs)."""

    name: str
    bundle: str
    workflow: str
    overrides: dict
    needs: tuple[tuple[int, str], ...] = ()


def row_overrides(row: str) -> dict:
    """What distinguishes a row, as config overrides of its bundle's ``train`` workflow (the
    table of the report lists these). Paths are symbolic: ``{pseudo}`` the seed's teacher pseudo
    labels, ``{oracle}`` the oracle pseudo labels, ``{lists}`` the ablation's datalists."""
    return {
        "nnunet": {"labelled_datalist": "{lists}/all_labelled.json", "streams": ["labelled"]},
        "fso": {"streams": ["labelled"]},
        "st_partial": {"pseudo_datalist": "{pseudo}/datalist_pseudo_labelled.json", "streams": ["labelled", "cpl"]},
        "st_partial_unlabelled": {"pseudo_datalist": "{pseudo}/datalist_pseudo_labelled.json"},
        "st_oracle": {"pseudo_datalist": "{oracle}/datalist_pseudo_labelled.json"},
        "fst": {"lambda_cpl": 0.0},
        "mean_teacher": {},
        "mt_oracle": {
            "tumor_datalist": "{lists}/tumor_oracle.json",
            "label_keys": ["label", "oracle"],
            "oracle_key": "oracle",
        },
        "mt_paper": {"lambda_rampup_epochs": 0, "ema_warmup_iters": 0},
        "mt_confident": {"teacher_threshold": 0.9},
        "mt_soft": {"teacher_target": "soft"},
        "mt_classic": {"teacher_target": "soft", "teacher_noise_std": 0.1, "lambda_cpl": 10.0},
        "fst_x2": {"lambda_cpl": 0.0, "loss#weights#labelled": 2.0},
        "fst_full": {"tumor_datalist": "{lists}/tumor_full.json", "lambda_cpl": 0.0},
    }[row]


def _resolve(value, symbols: Mapping[str, str]):
    if isinstance(value, str):
        return value.format(**symbols)
    if isinstance(value, list):
        return [_resolve(v, symbols) for v in value]
    if isinstance(value, Mapping):
        return {k: _resolve(v, symbols) for k, v in value.items()}
    return value


def seed_steps(paths: AblationPaths, settings: AblationSettings, seed: int, rows: Sequence[str] = ROW_NAMES) -> list[Step]:
    """Every bundle run of one seed, with its dependencies: the teacher and its pseudo labels
    (self-training rows only; with ``settings.teacher_seed`` only for that seed), then one
    ``train`` per row."""
    teacher_seed = seed if settings.teacher_seed is None else int(settings.teacher_seed)
    symbols = {"pseudo": str(paths.pseudo_dir(teacher_seed)), "oracle": str(paths.oracle_pseudo), "lists": str(paths.lists)}
    steps: list[Step] = []
    teacher_dir = paths.teacher_dir(seed)
    if seed == teacher_seed and any(r in ("st_partial", "st_partial_unlabelled") for r in rows):
        steps.append(
            Step(
                "teacher",
                ORGAN_BUNDLE,
                "train_teacher",
                {
                    **settings.teacher(),
                    "prepared_dir": str(paths.prepared),
                    "ckpt_dir": str(teacher_dir / "models"),
                    "log_dir": str(teacher_dir / "logs"),
                    **settings.teacher_training(),
                    "seed": seed,
                },
            )
        )
        for name, jobs, out, roi_dir in (
            ("pseudo_labels", str(paths.prepared / "datalist_pseudo_label_jobs.json"), paths.pseudo_dir(seed), paths.cohort / "truth"),
            ("teacher_test", str(paths.lists / "test_jobs.json"), teacher_dir / "test_pred", paths.test_labels),
        ):
            steps.append(
                Step(
                    name,
                    ORGAN_BUNDLE,
                    "pseudo_label",
                    {
                        **settings.teacher(),
                        "ckpt_dir": str(teacher_dir / "models"),
                        "pseudo_label_jobs": jobs,
                        "pseudo_label_dir": str(out),
                        "roi_dir": str(roi_dir),  # the students' perfect stage 1, for the teacher too
                        "progress": False,
                    },
                    needs=((seed, "teacher"),),
                )
            )
    for row in rows:
        run = paths.run_dir(row, seed)
        common = {
            **settings.student(),
            "prepared_dir": str(paths.prepared),
            "ckpt_dir": str(run / "models"),
            "log_dir": str(run / "logs"),
            "roi_dir": str(paths.cohort / "truth"),  # a perfect stage 1: every row sees the same ROI
            "seed": seed,
        }
        if row in ORGAN_ROWS:
            common.update({"max_epochs": settings.organ_epochs, "train#batch_sampler#num_batches": settings.batches_per_epoch})
            needs = ((teacher_seed, "pseudo_labels"),) if row in ("st_partial", "st_partial_unlabelled") else ()
            steps.append(Step(row, ORGAN_BUNDLE, "train", {**common, **_resolve(row_overrides(row), symbols)}, needs))
        else:
            common["max_epochs"] = settings.tumor_epochs
            steps.append(Step(row, TUMOR_BUNDLE, "train", {**common, **_resolve(row_overrides(row), symbols)}))
    return steps


# ----------------------------------------------------------------------------- running
def _run_step(step: Step, paths: AblationPaths, seed: int, bundles_dir: Path, settings: AblationSettings) -> dict:
    """Run one step unless its ``done.json`` exists (an interrupted run resumes: the bundles'
    checkpoints resume training, the pseudo-label job skips finished cases)."""
    out = paths.teacher_dir(seed) if step.name in ("teacher", "pseudo_labels", "teacher_test") else paths.run_dir(step.name, seed)
    marker = out / (DONE if step.name not in ("pseudo_labels", "teacher_test") else f"{step.name}_{DONE}")
    if marker.is_file():
        return json.loads(marker.read_text())
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{step.name}.log"
    seconds = run_workflow(bundles_dir / step.bundle, step.workflow, step.overrides, log_file=log, threads=settings.threads)
    record = {"step": step.name, "bundle": step.bundle, "workflow": step.workflow, "overrides": step.overrides, "seconds": round(seconds, 1)}
    if step.bundle in (ORGAN_BUNDLE, TUMOR_BUNDLE) and step.workflow == "train":
        seconds = _predict_test(step.bundle, out, paths.test_images, paths.test_labels, "", settings, bundles_dir, log)
        record["inference_seconds"] = round(seconds, 1)
    write_text_atomic(marker, json.dumps(record, indent=1) + "\n")
    return record


def _predict_test(bundle: str, run: Path, images: Path, labels: Path, suffix: str, settings: AblationSettings, bundles_dir: Path, log: Path) -> float:
    """A trained run's model on a test set by the bundle's own ``inference`` workflow, into
    ``<run>/test_pred<suffix>`` (the region of interest from the test labels: a perfect stage 1);
    for a tumor row also its student, into ``test_pred_student<suffix>`` (``model.pt`` holds the
    teacher only). Returns the seconds of the first."""
    inference = {
        **settings.network(),
        "input_dir": str(images),
        "roi_dir": str(labels),
        "output_dir": str(run / f"test_pred{suffix}"),
        "model_path": str(run / "models" / "model.pt"),
        "fingerprint": str(run / "models" / "fingerprint.json"),
        "num_workers": 0,
    }
    seconds = run_workflow(bundles_dir / bundle, "inference", inference, log_file=log, threads=settings.threads)
    if bundle == TUMOR_BUNDLE:
        student = {"inference_network": "student", "model_path": str(run / "models" / "mean_teacher.pt")}
        inference.update({**student, "output_dir": str(run / f"test_pred_student{suffix}")})
        run_workflow(bundles_dir / bundle, "inference", inference, log_file=log, threads=settings.threads)
    return seconds


def predict_held_out(
    cohort_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    test_dir: str | os.PathLike,
    seeds: Sequence[int],
    rows: Sequence[str],
    settings: AblationSettings,
    bundles_dir: str | os.PathLike | None = None,
    tag: str | None = None,
) -> None:
    """Every finished run of ``rows`` on another test set (``test_dir/images``, ``test_dir/labels``,
    e.g. more generated cases than the cohort's 12), for :func:`score_ablation` ``test_dir``: the
    same bundle inference as the cohort's test, into ``<run>/test_pred_<tag>`` (default tag: the
    folder's name). Runs whose predictions are all there are skipped."""
    from stmt_monai.inference.bundles import default_bundles_dir

    paths = AblationPaths(Path(cohort_dir).resolve(), Path(work_dir).resolve())
    test = Path(test_dir).resolve()
    suffix, names = f"_{tag or test.name}", [case_name(p) for p in find_cases(test / "labels")]
    bundles = Path(bundles_dir) if bundles_dir else default_bundles_dir()
    for seed in seeds:
        for row in rows:
            run = paths.run_dir(row, seed)
            if not (run / DONE).is_file() or all((run / f"test_pred{suffix}" / f"{n}.nii.gz").is_file() for n in names):
                continue
            bundle = ORGAN_BUNDLE if row in ORGAN_ROWS else TUMOR_BUNDLE
            _predict_test(bundle, run, test / "images", test / "labels", suffix, settings, bundles, run / f"test{suffix}.log")


def run_ablation(
    cohort_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    settings: AblationSettings | None = None,
    rows: Sequence[str] = ROW_NAMES,
    bundles_dir: str | os.PathLike | None = None,
    on_done: Callable[[int, str, dict], None] | None = None,
) -> dict:
    """Train every row for every seed (``settings.parallel`` processes at once), resuming what an
    earlier call left, then score them all (:func:`score_ablation`).

    Returns:
        :func:`score_ablation`'s results, also written to ``work_dir/results.json``.
    """
    from stmt_monai.inference.bundles import default_bundles_dir

    settings = settings or AblationSettings()
    paths = AblationPaths(Path(cohort_dir).resolve(), Path(work_dir).resolve())
    bundles = Path(bundles_dir) if bundles_dir else default_bundles_dir()
    paths.work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.work / "settings.json", json.dumps(dataclasses.asdict(settings), indent=1) + "\n")
    prepare(paths)
    start = time.perf_counter()
    teacher_seeds = [] if settings.teacher_seed is None or settings.teacher_seed in seeds else [int(settings.teacher_seed)]
    pending = {(seed, step.name): step for seed in seeds for step in seed_steps(paths, settings, seed, rows)}
    for seed in teacher_seeds:  # a shared teacher of a seed that trains no row itself
        pending.update({(seed, s.name): s for s in seed_steps(paths, settings, seed, rows) if s.bundle == ORGAN_BUNDLE and s.workflow != "train"})
    # long chains first: the teachers, then the rows in the given order, seed by seed
    order = sorted(pending, key=lambda k: (k[1] not in ("teacher", "pseudo_labels"), k[0]))
    finished: set[tuple[int, str]] = set()
    running: dict[Future, tuple[int, str]] = {}
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=max(1, settings.parallel)) as pool:
        while order or running:
            ready = [k for k in order if all(need in finished for need in pending[k].needs)]
            while ready and len(running) < max(1, settings.parallel):
                key = ready.pop(0)
                order.remove(key)
                logger.info("ablation: start seed %d %s", *key)
                running[pool.submit(_run_step, pending[key], paths, key[0], bundles, settings)] = key
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                record = future.result()  # a failed workflow stops the ablation (its log names it)
                with lock:
                    finished.add(key)
                logger.info("ablation: seed %d %s done (%.0f s)", key[0], key[1], record.get("seconds", 0))
                if on_done is not None:
                    on_done(key[0], key[1], record)
    results = score_ablation(cohort_dir, work_dir, seeds, rows)
    results["wall_seconds_this_call"] = round(time.perf_counter() - start, 1)
    return results


# ----------------------------------------------------------------------------- scoring
def score_predictions(pred_dir: str | os.PathLike, label_dir: str | os.PathLike, classes: Sequence[int], organ_postprocessing: bool) -> dict:
    """FLARE DSC / NSD of a folder of predictions on the test labels, for ``classes`` only.

    With ``organ_postprocessing`` the organ map first keeps the largest connected component of
    each organ, as the cascade does (paper section 2.3). Tumor classes also get lesion detection.

    Returns:
        ``{"summary": metrics.summarize(...), "cases": {case: {label: {"dsc", "nsd"}}}, "lesions":
        {case: lesion_detection(...)}}`` (``lesions`` only when the tumor is scored).
    """
    from stmt_monai.evaluation.metrics import flare_case_scores, summarize
    from stmt_monai.evaluation.scoring import voxel_spacing
    from stmt_monai.inference.postprocessing import largest_component

    cases, lesions = {}, {}
    for label_path in find_cases(label_dir):
        name = case_name(label_path)
        truth, affine = load_label(label_path)
        pred, _ = load_label(Path(pred_dir) / f"{name}.nii.gz", truth.shape)
        if organ_postprocessing:
            pred = largest_component(pred)
        spacing = voxel_spacing(affine)
        cases[name] = flare_case_scores(truth, pred, spacing, classes)
        if TUMOR in classes:
            from stmt_monai.evaluation.lesions import lesion_detection

            lesions[name] = lesion_detection(truth == TUMOR, pred == TUMOR, affine)
    out = {"summary": summarize(cases), "cases": {c: {int(k): v for k, v in s.items()} for c, s in cases.items()}}
    if lesions:
        out["lesions"] = lesions
    return out


def tumor_split(scored: Mapping) -> dict:
    """A tumor row's FLARE DSC split by the kind of test case (what the mean over all hides).

    FLARE scores a case without tumor 1 when the prediction has none and 0 otherwise, so one
    false component on a tumor-free case costs as much as missing a whole case's tumors.

    Args:
        scored: :func:`score_predictions` of a tumor row (``cases`` and ``lesions``).

    Returns:
        ``{"tumor_dsc_present"}``: mean DSC (%) over the cases with a tumor, ``"tumor_free_clean"``
        and ``"tumor_free_cases"``: the tumor-free cases predicted without tumor, and their number.
    """
    present, clean, free = [], 0, 0
    for name, scores in scored["cases"].items():
        dsc = scores[TUMOR]["dsc"]
        lesion = scored["lesions"][name]
        if lesion["found"] + lesion["missed"]:
            present.append(dsc)
        else:
            free += 1
            clean += int(dsc == 1.0)
    return {"tumor_dsc_present": 100 * float(np.mean(present)) if present else math.nan, "tumor_free_clean": clean, "tumor_free_cases": free}


def learning_curve(log_dir: str | os.PathLike, tag: str = "val_mean_dice") -> list[tuple[int, float]]:
    """``(epoch, value)`` of a TensorBoard scalar written by the bundle's validation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points.update({int(e.step): float(e.value) for e in accumulator.Scalars(tag)})
    return sorted(points.items())


#: what the tumor trainer logs each iteration about its targets (``MeanTeacherTrainer.tumor_volumes``)
TARGET_TAGS = ("annotated_tumor_pct", "student_tumor_pct", "teacher_tumor_pct", "extra_target_pct", "lambda_cpl")


def training_curves(log_dir: str | os.PathLike, epoch_length: int, tags: Sequence[str] = TARGET_TAGS) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch means of scalars the trainer logs every iteration (TensorBoard step = iteration).

    Args:
        log_dir: the run's ``logs`` folder.
        epoch_length: iterations per epoch; iteration ``i`` (from 1) belongs to epoch ``ceil(i / epoch_length)``.
        tags: the scalars; one the run did not log is left out.

    Returns:
        ``{tag: [(epoch, mean over the epoch's iterations)]}``.
    """
    if epoch_length < 1:
        raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
    curves = {}
    for tag in tags:
        by_epoch: dict[int, list[float]] = {}
        for step, value in learning_curve(log_dir, tag):
            by_epoch.setdefault(math.ceil(step / epoch_length), []).append(value)
        if by_epoch:
            curves[tag] = [(epoch, float(np.mean(values))) for epoch, values in sorted(by_epoch.items())]
    return curves


def score_ablation(
    cohort_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    rows: Sequence[str] = ROW_NAMES,
    test_dir: str | os.PathLike | None = None,
    tag: str | None = None,
) -> dict:
    """Score every finished run and write ``work_dir/results.json``.

    With ``test_dir`` (after :func:`predict_held_out`, the same ``tag``) the runs are scored on
    that test set instead of the cohort's, and written to ``work_dir/results_<tag>.json``; the
    organ teacher is scored on the cohort's test set only.

    Returns:
        ``{"rows": {row: {seed: {"organ_dsc", "organ_nsd", ...}}}, "per_class": ..., "teacher": {seed:
        test scores}, "curves": {row: {seed: [(epoch, dice)]}}, "runs": {row: {seed: record}},
        "lesions": {row: {seed: totals}}, "student": {row: {seed: tumor scores}}, "tumor_split": {row:
        {seed: tumor_split(...)}}, "target_curves": {row: {seed: training_curves(...)}}}``; DSC / NSD in %.
    """
    paths = AblationPaths(Path(cohort_dir).resolve(), Path(work_dir).resolve())
    test_labels, suffix = paths.test_labels, ""
    if test_dir is not None:  # another test set, predicted by predict_held_out
        test_labels, suffix = Path(test_dir).resolve() / "labels", f"_{tag or Path(test_dir).resolve().name}"
    results: dict = {"test_cases": len(find_cases(test_labels)), "rows": {}, "per_class": {}, "teacher": {}, "curves": {}, "runs": {}, "lesions": {}, "student": {}, "tumor_split": {}, "target_curves": {}}
    for seed in seeds:
        teacher_pred = paths.teacher_dir(seed) / "test_pred"
        if test_dir is None and (paths.teacher_dir(seed) / f"teacher_test_{DONE}").is_file():
            summary = score_predictions(teacher_pred, paths.test_labels, ORGAN_CLASSES, organ_postprocessing=True)["summary"]
            results["teacher"][seed] = {"organ_dsc": 100 * summary["organ_dsc"], "organ_nsd": 100 * summary["organ_nsd"]}
        for row in rows:
            run = paths.run_dir(row, seed)
            if not (run / DONE).is_file():
                continue
            organ = row in ORGAN_ROWS
            scored = score_predictions(run / f"test_pred{suffix}", test_labels, ORGAN_CLASSES if organ else (TUMOR,), organ_postprocessing=organ)
            summary = scored["summary"]
            keys = ("organ_dsc", "organ_nsd") if organ else ("tumor_dsc", "tumor_nsd")
            results["rows"].setdefault(row, {})[seed] = {k: 100 * summary[k] for k in keys}
            results["per_class"].setdefault(row, {})[seed] = {int(c): 100 * v["dsc"] for c, v in summary["per_class"].items()}
            results["curves"].setdefault(row, {})[seed] = learning_curve(run / "logs")
            results["runs"].setdefault(row, {})[seed] = json.loads((run / DONE).read_text())
            if not organ:
                iterations = learning_curve(run / "logs", "loss")
                if iterations:  # what the targets held, epoch by epoch (bundles that log it)
                    epoch_length = max(1, iterations[-1][0] // int(results["runs"][row][seed]["overrides"]["max_epochs"]))
                    results["target_curves"].setdefault(row, {})[seed] = training_curves(run / "logs", epoch_length)
                results["lesions"].setdefault(row, {})[seed] = detection_totals(scored["lesions"])
                results["tumor_split"].setdefault(row, {})[seed] = tumor_split(scored)
                student = score_predictions(run / f"test_pred_student{suffix}", test_labels, (TUMOR,), organ_postprocessing=False)
                results["student"].setdefault(row, {})[seed] = {"tumor_dsc": 100 * student["summary"]["tumor_dsc"], **detection_totals(student["lesions"])}
    write_text_atomic(paths.work / f"results{suffix}.json", json.dumps(results, indent=1, default=float) + "\n")
    return results


def teacher_targets(
    cohort_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    seed: int,
    row: str,
    settings: AblationSettings,
    bundles_dir: str | os.PathLike | None = None,
    checkpoint: str = "mean_teacher.pt",
) -> dict:
    """What a tumor row's extra target of eq. (2) holds after training (the mean teacher's "why").

    The row's EMA teacher segments the row's own training cases by the bundle's ``inference``
    workflow (the same region of interest as in training); its tumor, united with the annotation
    as the real-time correction does (:func:`~stmt_monai.training.mean_teacher.correct_tumor_pseudo_label`),
    is scored against the cohort's hidden truth lesion by lesion
    (:func:`~stmt_monai.evaluation.lesions.lesion_detection`): the unannotated lesions it adds (what
    the target should teach), and its false components (what it teaches wrongly). The teacher's
    tumor is its argmax (``teacher_threshold`` 0.5).

    Args:
        checkpoint: the teacher's file in ``<run>/models``: ``mean_teacher.pt`` (the best validation
            epoch's) or ``checkpoint_last.pt`` (the last epoch's; where validation Dice never rose
            above its first value, the best is the first validation's, an untrained teacher).

    Returns:
        :func:`~stmt_monai.evaluation.lesions.detection_totals` of the corrected targets (with
        ``"unannotated"``), plus ``"cases"`` and ``"voxels"``: the tumor voxels of the teacher's own
        prediction (``"teacher"``), of it on the hidden truth (``"teacher_on_truth"``), of the truth and
        of the annotation, summed over the cases. Predictions are kept in
        ``<run>/train_teacher_pred`` (``train_teacher_pred_<checkpoint stem>`` for another checkpoint).
    """
    from stmt_monai.data.datalists import load_datalist
    from stmt_monai.evaluation.lesions import lesion_detection
    from stmt_monai.inference.bundles import default_bundles_dir

    paths = AblationPaths(Path(cohort_dir).resolve(), Path(work_dir).resolve())
    run = paths.run_dir(row, seed)
    if not (run / DONE).is_file():
        raise FileNotFoundError(f"{run}: the row {row!r} of seed {seed} has not finished")
    items = load_datalist(paths.prepared / "datalist_tumor.json")
    jobs = _write_datalist(paths.lists / "tumor_train_jobs.json", [{"image": i["image"], "name": case_name(i["image"])} for i in items])
    out = run / ("train_teacher_pred" if checkpoint == "mean_teacher.pt" else f"train_teacher_pred_{Path(checkpoint).stem}")
    if not all((out / f"{case_name(i['image'])}.nii.gz").is_file() for i in items):
        bundles = Path(bundles_dir) if bundles_dir else default_bundles_dir()
        overrides = {
            **settings.network(),
            "input_dir": str(jobs),
            "roi_dir": str(paths.cohort / "truth"),
            "output_dir": str(out),
            "model_path": str(run / "models" / checkpoint),
            "fingerprint": str(run / "models" / "fingerprint.json"),
            "inference_network": "teacher",
            "num_workers": 0,
        }
        run_workflow(bundles / TUMOR_BUNDLE, "inference", overrides, log_file=out.with_suffix(".log"), threads=settings.threads)
    cases, voxels = {}, dict.fromkeys(("teacher", "teacher_on_truth", "truth", "annotated"), 0)
    for item in items:
        name = case_name(item["image"])
        truth, affine = load_label(paths.cohort / "truth" / f"{name}.nii.gz")
        annotation, _ = load_label(item["label"], truth.shape)
        pred, _ = load_label(out / f"{name}.nii.gz", truth.shape)
        target = (pred == TUMOR) | (annotation == TUMOR)  # the real-time correction: the union
        cases[name] = lesion_detection(truth == TUMOR, target, affine, annotation=annotation == TUMOR)
        for key, mask in (("teacher", pred == TUMOR), ("teacher_on_truth", (pred == TUMOR) & (truth == TUMOR)), ("truth", truth == TUMOR), ("annotated", annotation == TUMOR)):
            voxels[key] += int(np.count_nonzero(mask))
    return {**detection_totals(cases), "voxels": voxels}


# ----------------------------------------------------------------------------- statistics
def paired_difference(rows: Mapping[str, Mapping], better: str, worse: str, metric: str) -> dict | None:
    """Paired difference ``better - worse`` of ``metric`` over the seeds both rows have.

    Returns:
        ``{"per_seed": [...], "mean", "sd", "ci95": (low, high), "n"}`` (Student-t interval of the
        mean difference; ``sd`` and the interval NaN for one seed), or None if no seed is shared.
    """
    from scipy import stats

    seeds = sorted(set(rows.get(better, {})) & set(rows.get(worse, {})), key=str)
    diffs = [rows[better][s][metric] - rows[worse][s][metric] for s in seeds]
    diffs = [d for d in diffs if not math.isnan(d)]
    if not diffs:
        return None
    n = len(diffs)
    mean = float(np.mean(diffs))
    sd = float(np.std(diffs, ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    return {"per_seed": diffs, "mean": mean, "sd": sd, "ci95": (mean - half, mean + half), "n": n}


def ablation_json(results: Mapping) -> dict:
    """The claim's figures as ``{"rows": {ROW: {SEED: {"organ_dsc": %, "tumor_dsc": %}}}}``."""
    return {
        "rows": {
            row: {str(seed): {k: round(v, 2) for k, v in scores.items() if k in ("organ_dsc", "tumor_dsc")} for seed, scores in seeds.items()}
            for row, seeds in results["rows"].items()
        }
    }


def clear_row(work_dir: str | os.PathLike, row: str, seeds: Sequence[int]) -> None:
    """Remove a row's runs (to retrain it after a change)."""
    for seed in seeds:
        shutil.rmtree(Path(work_dir) / f"seed{seed}" / row, ignore_errors=True)
