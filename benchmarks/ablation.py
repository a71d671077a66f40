"""The paper's Table 3 ablation at CPU size, on a generated cohort with a FLARE-like annotation policy.

    python benchmarks/ablation.py --work_dir runs/ablation --seeds 2 --output runs/ablation/table.md
    python benchmarks/ablation.py --work_dir /tmp/abl_tiny --num_labelled 10 --num_unlabelled 4 \
        --num_test 3 --cohort_size 32 --epochs 2 --iterations 2 --teacher_epochs 2 --seeds 1   # minutes

Rows (paper Table 3), every student trained the same way except for its method:

| row | organ model | tumor model |
| --- | --- | --- |
| nnU-Net (all partial labels, supervised) | all labelled cases, labels as-is (unannotated organs = background) | all labelled cases, labels as-is (unannotated tumors = background) |
| FSO | fully organ labelled cases only | |
| self-training, partial | fully labelled + corrected pseudo labels (CPL) of partial cases | |
| self-training, partial + unlabelled | fully labelled + CPL + plain pseudo labels (PL) | |
| FST | | tumor-annotated cases, supervised (lambda = 0, student) |
| mean teacher | | tumor-annotated cases, eq. (2) (lambda = 1, EMA teacher) |
| StMt | the self-training (partial + unlabelled) organ model | the mean-teacher tumor model |

What is shared, and how (the script only wires ``stmt_monai`` objects):

- data: ``stmt_monai.synthetic.annotation.make_cohort`` (FLARE23 layout, hidden ``truth/``), triaged by
  ``stmt_monai.data.triage.triage_dataset`` (datalists and intensity fingerprint); one cohort for all
  seeds, so the seeds measure training noise on a fixed test set and rows compare paired;
- stage 2 only: each student sees the region of interest of its case: the bounding box (+ margin)
  of the case's *full truth* (a perfect stage 1), for every training and test case of every row;
  test predictions are restored to the test case's own grid (``restore_label_map``) and scored by
  ``stmt_monai.evaluation.metrics.flare_case_scores`` (DSC and NSD, FLARE rules) against the full labels;
  organ maps keep the largest component per class, tumors are laid over organs
  (``stmt_monai.inference.postprocessing``); rows with one model are scored on its classes only;
- the organ teacher: ``teacher_network("res_unet_large")`` at reduced width, trained on the fully
  organ labelled cases (whole CT at the cohort's median spacing, random patches, sliding window),
  then ``stmt_monai.training.pseudo_label.generate_pseudo_labels`` (CPL for partial cases, PL for the rest);
  one teacher per seed serves both self-training rows of that seed;
- students: ``res_unet``, ``stage_transforms(..., train=True)`` (the paper's augmentations),
  the optimiser of :class:`Params` (Adam by default, see there) with poly LR decay, a fixed number of iterations per epoch drawn by
  ``StreamBatchSampler`` (fully labelled / CPL / PL in equal shares; one stream for supervised
  rows), ``WeightedStreamsLoss`` with ``ORGAN_STREAM_WEIGHTS`` in ``SelfTrainingTrainer`` for
  organs; ``MeanTeacherTrainer`` with an ``ema_teacher`` (ignite ``EMAHandler``) for tumors,
  ``lambda_cpl`` 0 (FST, supervised) or 1 (mean teacher). The EMA is attached to every tumor row,
  so both networks of every tumor model are scored (the table uses the student for FST and the
  nnU-Net row, the teacher for the mean teacher, as the bundle infers).

Caching and resuming: the cohort, the teacher and its pseudo labels, each trained student and each
score are kept in ``work_dir`` with the settings they were made with; a rerun with the same
settings skips them, a changed setting redoes what depends on it. Results: ``work_dir/results.json``
and the markdown table (``--output``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import fire
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from ignite.engine import Events  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.engines import SupervisedTrainer  # noqa: E402
from monai.handlers import LrScheduleHandler, from_engine  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from stmt_monai.data.datalists import load_datalist, student_datalist
from stmt_monai.data.sampling import StreamBatchSampler
from stmt_monai.data.triage import DATALISTS, triage_dataset
from stmt_monai.evaluation.metrics import flare_case_scores, summarize
from stmt_monai.evaluation.scoring import voxel_spacing
from stmt_monai.inference.postprocessing import largest_component, overlay_tumor
from stmt_monai.io import load_label, save_label_map, write_text_atomic  # noqa: E402
from stmt_monai.labels import BACKGROUND, ORGAN_CLASSES, TUMOR  # noqa: E402
from stmt_monai.networks import res_unet, sliding_window_inferer, teacher_network  # noqa: E402
from stmt_monai.preprocessing.fingerprint import Fingerprint
from stmt_monai.preprocessing.geometry import CaseGeometry, restore_label_map
from stmt_monai.preprocessing.transforms import stage_transforms
from stmt_monai.synthetic.annotation import make_cohort
from stmt_monai.synthetic.config import CohortConfig
from stmt_monai.training.engines import MeanTeacherTrainer, SelfTrainingTrainer
from stmt_monai.training.losses import CPL, LABELLED, ORGAN_STREAM_WEIGHTS, PL, STREAMS, WeightedStreamsLoss, dice_ce_loss
from stmt_monai.training.mean_teacher import ema_teacher
from stmt_monai.training.pseudo_label import PSEUDO_DATALIST, generate_pseudo_labels, predict_case

# ----------------------------------------------------------------------------- the settings
#: what each organ student is trained on (everything else is shared by all organ students)
ORGAN_METHODS: dict[str, dict] = {
    "organ_nnunet": {"data": "all_labelled", "streams": [LABELLED]},
    "fso": {"data": "fully_labelled", "streams": [LABELLED]},
    "st_partial": {"data": "fully_labelled+pseudo", "streams": [LABELLED, CPL]},
    "st_partial_unlabelled": {"data": "fully_labelled+pseudo", "streams": [LABELLED, CPL, PL]},
}
#: what each tumor student is trained on, its lambda of eq. (2) and the network scored
TUMOR_METHODS: dict[str, dict] = {
    "tumor_nnunet": {"data": "all_labelled", "lambda_cpl": 0.0, "network": "student"},
    "fst": {"data": "tumor_annotated", "lambda_cpl": 0.0, "network": "student"},
    "mean_teacher": {"data": "tumor_annotated", "lambda_cpl": 1.0, "network": "teacher"},
}
METHOD_KEYS = ("data", "streams", "lambda_cpl", "network")
#: table row -> (organ setting, tumor setting), in the paper's order
ROWS: dict[str, tuple[str | None, str | None]] = {
    "nnU-Net (all partial labels, supervised)": ("organ_nnunet", "tumor_nnunet"),
    "FSO": ("fso", None),
    "Self-training with partial labels": ("st_partial", None),
    "Self-training with partial labels and unlabelled": ("st_partial_unlabelled", None),
    "FST": (None, "fst"),
    "Mean teacher": (None, "mean_teacher"),
    "StMt": ("st_partial_unlabelled", "mean_teacher"),
}
#: the paper's Table 3 (validation set, %): organ DSC, NSD, tumor DSC, NSD
PAPER = {
    "nnU-Net (all partial labels, supervised)": (38.76, 40.32, 46.8, 35.47),
    "FSO": (87.86, 94.27, None, None),
    "Self-training with partial labels": (89.1, 95.58, None, None),
    "Self-training with partial labels and unlabelled": (89.6, 96.19, None, None),
    "FST": (None, None, 46.69, 39.02),
    "Mean teacher": (None, None, 52.08, 42.82),
    "StMt": (89.6, 96.19, 52.08, 42.82),
}


@dataclasses.dataclass(frozen=True)
class Params:
    """Every size of the benchmark (the command line's options).

    The defaults fit about an hour on a shared 2-core CPU. Optimiser: the paper trains with SGD
    (Nesterov momentum 0.99, lr 0.01, poly decay, 500 epochs); over the few hundred iterations a
    CPU hour allows, that optimiser had not left the all-background start (organ DSC 0.06 after
    120 iterations, against 0.32 with Adam at lr 0.01, same network and data), so the default is
    Adam at lr 0.01 with the same poly decay, for every network of every row alike;
    ``--optimizer sgd --learning_rate 0.01`` gives the paper's.
    """

    num_labelled: int = 40
    num_unlabelled: int = 20
    num_test: int = 10
    cohort_size: int = 48
    cohort_seed: int = 0
    fully_share: float = 0.10
    spatial_size: int = 32
    base_channels: int = 8
    num_downsamplings: int = 3
    epochs: int = 40
    iterations: int = 6
    organ_batch_size: int = 3
    tumor_batch_size: int = 2
    optimizer: str = "adam"
    learning_rate: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    roi_jitter_mm: float = 10.0
    elastic: bool = True
    ema_decay: float = 0.99
    ema_warmup_iters: int = 0
    teacher_base_channels: int = 16
    teacher_num_downsamplings: int = 3
    teacher_patch: int = 32
    teacher_batch_size: int = 2
    teacher_epochs: int = 40
    teacher_iterations: int = 6
    device: str = "cpu"
    num_workers: int = 1


def cohort_config(p: Params) -> CohortConfig:
    # one validation case: triage then keeps every fully labelled case for training (without a
    # validation folder it holds some out); this benchmark uses no validation (last epoch scored)
    return CohortConfig(
        num_labelled=p.num_labelled,
        num_unlabelled=p.num_unlabelled,
        num_validation=1,
        num_test=p.num_test,
        size=p.cohort_size,
        fully_share=p.fully_share,
    )


def student_settings(p: Params, seed: int) -> dict[str, dict]:
    """Training set-up of every student: shared values of its stage plus its method's.

    Within a stage the settings differ only in :data:`METHOD_KEYS` (``tests/test_ablation.py``).
    """
    shared = {
        "spatial_size": [p.spatial_size] * 3,
        "base_channels": p.base_channels,
        "num_downsamplings": p.num_downsamplings,
        "epochs": p.epochs,
        "iterations_per_epoch": p.iterations,
        "optimizer": p.optimizer,
        "learning_rate": p.learning_rate,
        "momentum": p.momentum,
        "weight_decay": p.weight_decay,
        "poly_power": p.poly_power,
        "roi_jitter_mm": p.roi_jitter_mm,
        "elastic": p.elastic,
        "seed": seed,
        "device": p.device,
        "num_workers": p.num_workers,
    }
    organ = {**shared, "stage": "organ", "out_channels": len(ORGAN_CLASSES) + 1, "batch_size": p.organ_batch_size,
             "loss_weights": dict(ORGAN_STREAM_WEIGHTS)}
    tumor = {**shared, "stage": "tumor", "out_channels": 2, "batch_size": p.tumor_batch_size,
             "ema_decay": p.ema_decay, "ema_warmup_iters": p.ema_warmup_iters}
    settings = {name: {**organ, **method} for name, method in ORGAN_METHODS.items()}
    settings.update({name: {**tumor, **method} for name, method in TUMOR_METHODS.items()})
    return settings


def teacher_setting(p: Params, seed: int, spacing_mm: Sequence[float]) -> dict:
    """Training set-up of the organ teacher of one seed."""
    return {
        "kind": "res_unet_large",
        "base_channels": p.teacher_base_channels,
        "num_downsamplings": p.teacher_num_downsamplings,
        "patch": [p.teacher_patch] * 3,
        "spacing_mm": [round(float(s), 3) for s in spacing_mm],
        "batch_size": p.teacher_batch_size,
        "epochs": p.teacher_epochs,
        "iterations_per_epoch": p.teacher_iterations,
        "optimizer": p.optimizer,
        "learning_rate": p.learning_rate,
        "momentum": p.momentum,
        "weight_decay": p.weight_decay,
        "poly_power": p.poly_power,
        "elastic": p.elastic,
        "seed": seed,
        "device": p.device,
        "num_workers": p.num_workers,
    }


# ----------------------------------------------------------------------------- data
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, content) -> None:
    write_text_atomic(path, json.dumps(content, indent=1) + "\n")


def prepare_cohort(work: Path, p: Params) -> dict:
    """The cohort and its triage, made once per cohort setting."""
    cohort, prepared = work / "cohort", work / "cohort" / "prepared"
    config = dataclasses.asdict(cohort_config(p))
    policy = read_json(cohort / "policy.json")
    same = policy is not None and policy["seed"] == p.cohort_seed and json.loads(json.dumps(config)) == policy["config"]
    if not (same and (prepared / "triage.json").exists()):
        log(f"cohort: making {p.num_labelled} labelled / {p.num_unlabelled} unlabelled / {p.num_test} test cases at {p.cohort_size} voxels")
        policy = make_cohort(cohort, cohort_config(p), seed=p.cohort_seed, workers=2, progress=False)
        result = triage_dataset(cohort, prepared, progress=False)
        log("triage:\n" + result.table())
    return {"root": cohort, "prepared": prepared, "policy": policy, "triage": read_json(prepared / "triage.json")}


def with_truth_roi(items: Sequence[Mapping], data: dict, stream: str | None = None) -> list[dict]:
    """Items reduced to what the students read, each with its full truth's box as region of interest."""
    out = []
    for item in items:
        name = item["name"]
        out.append(
            {
                "image": str(item["image"]),
                "label": str(item["label"]),
                "roi": str(data["root"] / "truth" / f"{name}.nii.gz"),
                "name": name,
                "stream": stream or item["stream"],
            }
        )
    return out


def training_items(method: dict, data: dict, pseudo_datalist: Path | None) -> list[dict]:
    """The training list of one student (``method["data"]``, filtered by its streams)."""
    prepared = data["prepared"]
    if method["data"] == "all_labelled":
        cases = data["triage"]["cases"]
        items = [
            {"image": prepared / c["image"], "label": prepared / c["label"], "name": name}
            for name, c in sorted(cases.items())
            if c["label"] is not None and not c.get("held_out_for_validation")
        ]
        return with_truth_roi(items, data, LABELLED)
    if method["data"] == "fully_labelled":
        return with_truth_roi(load_datalist(prepared / DATALISTS["fully_labelled"]), data, LABELLED)
    if method["data"] == "tumor_annotated":
        return with_truth_roi(load_datalist(prepared / DATALISTS["tumor"]), data, LABELLED)
    if method["data"] == "fully_labelled+pseudo":
        items = student_datalist(prepared / DATALISTS["fully_labelled"], pseudo_datalist, streams=method["streams"])
        return with_truth_roi(items, data)
    raise ValueError(f"unknown training data {method['data']!r}")


def test_items(data: dict) -> list[dict]:
    return load_datalist(data["prepared"] / DATALISTS["validation"], "test")


# ----------------------------------------------------------------------------- training
def _loader(items: list[dict], transform, setting: Mapping, batch_size: int, streams: Sequence[str]) -> DataLoader:
    """Batches of ``batch_size`` with the streams in equal shares, a fixed number per epoch."""
    sampler = StreamBatchSampler(items, batch_size, num_batches=setting["iterations_per_epoch"], streams=streams, seed=setting["seed"])
    return DataLoader(Dataset(items, transform), batch_sampler=sampler, num_workers=setting["num_workers"])


def _optimisation(network: torch.nn.Module, setting: Mapping) -> tuple[torch.optim.Optimizer, LrScheduleHandler]:
    if setting["optimizer"] == "sgd":  # the paper's
        optimizer = torch.optim.SGD(
            network.parameters(), lr=setting["learning_rate"], momentum=setting["momentum"], nesterov=True,
            weight_decay=setting["weight_decay"],
        )
    elif setting["optimizer"] == "adam":
        optimizer = torch.optim.Adam(network.parameters(), lr=setting["learning_rate"], weight_decay=setting["weight_decay"])
    else:
        raise ValueError(f"unknown optimizer {setting['optimizer']!r}: sgd or adam")
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=setting["epochs"], power=setting["poly_power"])
    return optimizer, LrScheduleHandler(scheduler, print_lr=False)


def _run(trainer, loader: DataLoader) -> tuple[float, list[float]]:
    """Run a trainer; the batch sampler is reshuffled every epoch; returns (seconds, epoch mean losses)."""
    sampler = loader.batch_sampler
    losses: list[list[float]] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: (sampler.set_epoch(e.state.epoch), losses.append([])))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses[-1].append(float(from_engine(["loss"], first=True)(e.state.output))))
    start = time.perf_counter()
    trainer.run()
    return time.perf_counter() - start, [round(float(np.mean(x)), 4) for x in losses]


def train_teacher(setting: dict, items: list[dict], fingerprint: Fingerprint) -> tuple[torch.nn.Module, dict]:
    """The organ teacher on the fully labelled cases (whole CT, fixed spacing, random patches)."""
    set_determinism(seed=setting["seed"])
    network = teacher_network(
        setting["kind"], out_channels=len(ORGAN_CLASSES) + 1, roi_size=setting["patch"],
        base_channels=setting["base_channels"], num_downsamplings=setting["num_downsamplings"],
    ).to(setting["device"])
    transform = stage_transforms(
        "organ", fingerprint, None, train=True, crop_roi=False, target_spacing_mm=setting["spacing_mm"],
        patch_size=setting["patch"], num_patches=1, elastic=setting["elastic"],
    )
    loader = _loader(items, transform, setting, setting["batch_size"], [LABELLED])
    optimizer, lr_handler = _optimisation(network, setting)
    trainer = SupervisedTrainer(
        device=setting["device"], max_epochs=setting["epochs"], train_data_loader=loader, network=network,
        optimizer=optimizer, loss_function=dice_ce_loss(), train_handlers=[lr_handler],
    )
    seconds, losses = _run(trainer, loader)
    return network, {"train_seconds": round(seconds, 1), "epoch_losses": losses}


def train_student(setting: dict, items: list[dict], fingerprint: Fingerprint) -> tuple[dict[str, torch.nn.Module], dict]:
    """One student of either stage; returns its networks (``student``, and ``teacher`` for tumors)."""
    set_determinism(seed=setting["seed"])  # same initial weights for every student of a stage and seed
    network = res_unet(
        out_channels=setting["out_channels"], base_channels=setting["base_channels"],
        num_downsamplings=setting["num_downsamplings"], input_size=setting["spatial_size"],
    ).to(setting["device"])
    transform = stage_transforms(
        setting["stage"], fingerprint, setting["spatial_size"], train=True,
        roi_jitter_mm=setting["roi_jitter_mm"], elastic=setting["elastic"],
    )
    streams = setting.get("streams", [LABELLED])
    loader = _loader(items, transform, setting, setting["batch_size"], streams)
    optimizer, lr_handler = _optimisation(network, setting)
    common = dict(
        device=setting["device"], max_epochs=setting["epochs"], train_data_loader=loader, network=network,
        optimizer=optimizer,
    )
    networks = {"student": network}
    if setting["stage"] == "organ":
        loss = WeightedStreamsLoss(setting["loss_weights"])
        trainer = SelfTrainingTrainer(**common, loss_function=loss, train_handlers=[lr_handler])
    else:
        ema = ema_teacher(network, setting["ema_decay"], warmup_iters=setting["ema_warmup_iters"])
        loss = WeightedStreamsLoss({LABELLED: 1.0, CPL: setting["lambda_cpl"]})
        trainer = MeanTeacherTrainer(**common, teacher=ema.ema_model, loss_function=loss, train_handlers=[lr_handler, ema])
        networks["teacher"] = ema.ema_model
    seconds, losses = _run(trainer, loader)
    return networks, {"train_seconds": round(seconds, 1), "epoch_losses": losses, "num_training_cases": len(items),
                      "streams": {s: sum(i["stream"] == s for i in items) for s in STREAMS}}


# ----------------------------------------------------------------------------- prediction and scores
@torch.no_grad()
def predict_test(network: torch.nn.Module, stage: str, setting: Mapping, items: list[dict], fingerprint: Fingerprint, out_dir: Path) -> None:
    """Segment every test case's region of interest; write the label map on the case's own grid."""
    transform = stage_transforms(stage, fingerprint, setting["spatial_size"], train=False)
    network.eval()
    for item in items:
        data = transform(item)
        labels = network(data["image"][None].to(setting["device"])).argmax(1)[0].cpu()
        if stage == "organ":
            labels = largest_component(labels)
        geometry = CaseGeometry.from_json(data["geometry"])
        restored = restore_label_map(labels, geometry)
        if stage == "tumor":
            restored = np.where(restored > 0, TUMOR, BACKGROUND).astype(np.uint8)
        save_label_map(out_dir / f"{item['name']}.nii.gz", restored, geometry.affine)


def score(items: list[dict], organ_dir: Path | None, tumor_dir: Path | None) -> dict:
    """FLARE scores of the predictions in ``organ_dir`` (organs) and / or ``tumor_dir`` (tumor laid
    over the organs), against the test cases' full labels; only the predicted classes are scored."""
    classes = (ORGAN_CLASSES if organ_dir else ()) + ((TUMOR,) if tumor_dir else ())
    case_scores = {}
    for item in items:
        truth, affine = load_label(item["label"])
        pred = np.zeros_like(truth)
        if organ_dir:
            pred, _ = load_label(organ_dir / f"{item['name']}.nii.gz", truth.shape, affine)
        if tumor_dir:
            tumor, _ = load_label(tumor_dir / f"{item['name']}.nii.gz", truth.shape, affine)
            pred = overlay_tumor(pred, tumor == TUMOR)
        case_scores[item["name"]] = flare_case_scores(truth, pred, voxel_spacing(affine), classes)
    summary = summarize(case_scores)
    return {"summary": summary, "cases": case_scores}


def pseudo_label_quality(data: dict, pseudo_dir: Path) -> dict:
    """Organ DSC / NSD of the written pseudo labels against the hidden truth, per stream."""
    content = read_json(pseudo_dir / PSEUDO_DATALIST) or {"training": []}
    by_stream: dict[str, dict] = {}
    for record in content["training"]:
        truth, affine = load_label(data["root"] / "truth" / f"{record['name']}.nii.gz")
        pseudo, _ = load_label(pseudo_dir / record["label"], truth.shape, affine)
        pseudo = np.where(pseudo == TUMOR, BACKGROUND, pseudo)
        by_stream.setdefault(record["stream"], {})[record["name"]] = flare_case_scores(truth, pseudo, voxel_spacing(affine), ORGAN_CLASSES)
    return {s: {k: summarize(c)[k] for k in ("organ_dsc", "organ_nsd", "num_cases")} for s, c in by_stream.items()}


# ----------------------------------------------------------------------------- one seed
def median_spacing(data: dict) -> np.ndarray:
    """Median voxel size of the training cases (mm): the teacher's input spacing, as nnU-Net chooses it."""
    return np.median([c["spacing_mm"] for c in data["triage"]["cases"].values()], axis=0)


def is_current(record: dict | None, setting: dict, teacher: dict | None) -> bool:
    """A cached student result made with ``setting`` and, for self-training, pseudo labels of ``teacher``."""
    uses_teacher = setting["data"] == "fully_labelled+pseudo"
    return record is not None and record["setting"] == setting and record.get("teacher") == (teacher if uses_teacher else None)


def run_teacher(seed_dir: Path, p: Params, seed: int, data: dict, fingerprint: Fingerprint) -> tuple[Path, dict]:
    """Teacher and pseudo labels of one seed (cached); returns the pseudo-label datalist and the record."""
    setting = teacher_setting(p, seed, median_spacing(data))
    out = seed_dir / "teacher"
    pseudo_dir = out / "pseudo_labels"
    record = read_json(out / "result.json")
    if record is not None and record["setting"] == setting and (pseudo_dir / PSEUDO_DATALIST).exists():
        return pseudo_dir / PSEUDO_DATALIST, record
    log(f"seed {seed}: teacher ({setting['kind']}, {setting['base_channels']} channels, patch {setting['patch']}, "
        f"spacing {setting['spacing_mm']} mm, {setting['epochs']} x {setting['iterations_per_epoch']} iterations)")
    items = with_truth_roi(load_datalist(data["prepared"] / DATALISTS["fully_labelled"]), data, LABELLED)
    network, record = train_teacher(setting, items, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out / "model.pt")
    inferer = sliding_window_inferer(setting["patch"])
    start = time.perf_counter()
    summary = generate_pseudo_labels(
        network, inferer, data["prepared"] / DATALISTS["pseudo_label_jobs"], fingerprint, pseudo_dir,
        setting["spacing_mm"], device=setting["device"], overwrite=True, progress=False,
    )
    record["pseudo_label_seconds"] = round(time.perf_counter() - start, 1)
    record["pseudo_labels"] = {k: summary[k] for k in ("cpl", "pl")} | {"failed": len(summary["failed"])}
    record["pseudo_label_quality"] = pseudo_label_quality(data, pseudo_dir)
    # the teacher itself on the test cases (whole CT, its own preprocessing): how good are its labels?
    transform = stage_transforms("organ", fingerprint, None, crop_roi=False, target_spacing_mm=setting["spacing_mm"])
    tests = test_items(data)
    for item in tests:
        labels, _ = predict_case(network, inferer, transform({"image": item["image"]}), setting["device"])
        _, affine = load_label(item["label"])
        save_label_map(out / "test" / f"{item['name']}.nii.gz", largest_component(labels), affine)
    record["test"] = score(tests, out / "test", None)["summary"]
    record["setting"] = setting
    write_json(out / "result.json", record)
    log(f"seed {seed}: teacher done in {record['train_seconds']:.0f} s (+ {record['pseudo_label_seconds']:.0f} s pseudo labels); "
        f"test organ DSC {record['test']['organ_dsc']:.3f}; pseudo labels {record['pseudo_label_quality']}")
    return pseudo_dir / PSEUDO_DATALIST, record


def run_student(
    seed_dir: Path, name: str, setting: dict, data: dict, fingerprint: Fingerprint, pseudo_datalist: Path | None, teacher: dict | None
) -> dict:
    """Train (unless cached), predict and score one student of one seed (``teacher``: the setting
    of the teacher whose pseudo labels ``pseudo_datalist`` holds)."""
    out = seed_dir / name
    record = read_json(out / "result.json")
    if is_current(record, setting, teacher):
        return record
    items = training_items(setting, data, pseudo_datalist)
    log(f"seed {setting['seed']}: {name}: {len(items)} training cases, {setting['epochs']} x {setting['iterations_per_epoch']} iterations")
    networks, record = train_student(setting, items, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    tests = test_items(data)
    record["scores"] = {}
    for kind, network in networks.items():
        torch.save(network.state_dict(), out / f"{kind}.pt")
        predict_test(network, setting["stage"], setting, tests, fingerprint, out / f"pred_{kind}")
        dirs = {"organ_dir": out / f"pred_{kind}", "tumor_dir": None} if setting["stage"] == "organ" else {"organ_dir": None, "tumor_dir": out / f"pred_{kind}"}
        record["scores"][kind] = score(tests, **dirs)["summary"]
    record["setting"] = setting
    record["teacher"] = teacher if setting["data"] == "fully_labelled+pseudo" else None
    write_json(out / "result.json", record)
    s = record["scores"][setting.get("network", "student")]
    key = "organ" if setting["stage"] == "organ" else "tumor"
    log(f"seed {setting['seed']}: {name} done in {record['train_seconds']:.0f} s: {key} DSC {s[key + '_dsc']:.3f} NSD {s[key + '_nsd']:.3f}")
    return record


def row_scores(seed_dir: Path, settings: dict[str, dict], data: dict, done: Sequence[str]) -> dict[str, dict]:
    """Every table row of one seed whose models are in ``done``, scored from their written predictions."""
    tests = test_items(data)
    rows = {}
    for row, (organ, tumor) in ROWS.items():
        if (organ and organ not in done) or (tumor and tumor not in done):
            continue
        organ_dir = seed_dir / organ / f"pred_{settings[organ].get('network', 'student')}" if organ else None
        tumor_dir = seed_dir / tumor / f"pred_{settings[tumor]['network']}" if tumor else None
        s = score(tests, organ_dir, tumor_dir)["summary"]
        scored = [k for k in ("organ_dsc", "organ_nsd") if organ] + [k for k in ("tumor_dsc", "tumor_nsd") if tumor]
        rows[row] = {k: (s[k] if k in scored and not math.isnan(s[k]) else None) for k in ("organ_dsc", "organ_nsd", "tumor_dsc", "tumor_nsd")}
        rows[row]["per_class_dsc"] = {str(c): v["dsc"] for c, v in s["per_class"].items()}
    return rows


def collect(work: Path, p: Params, seeds: Sequence[int], data: dict) -> dict:
    """Results of every seed from what is on disk: the rows whose models were trained with the
    current settings (an interrupted run gives the rows finished so far), and the diagnostics."""
    results = {"params": dataclasses.asdict(p), "seeds": list(seeds), "num_test": p.num_test,
               "counts": data["policy"]["counts"], "rows": {}, "diagnostics": {}}
    for seed in seeds:
        seed_dir = work / f"seed{seed}"
        settings = student_settings(p, seed)
        teacher_now = teacher_setting(p, seed, median_spacing(data))
        students = {}
        for name, setting in settings.items():
            record = read_json(seed_dir / name / "result.json")
            if is_current(record, setting, teacher_now):
                students[name] = record
        teacher = read_json(seed_dir / "teacher" / "result.json") or {}
        if teacher.get("setting") != teacher_now:
            teacher = {}
        results["rows"][str(seed)] = row_scores(seed_dir, settings, data, list(students))
        results["diagnostics"][str(seed)] = {"teacher": teacher, "students": students}
    results["train_seconds"] = round(sum(
        d["teacher"].get("train_seconds", 0) + d["teacher"].get("pseudo_label_seconds", 0)
        + sum(r["train_seconds"] for r in d["students"].values())
        for d in results["diagnostics"].values()
    ), 1)
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    return results


# ----------------------------------------------------------------------------- report
def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _cell(values: list[float]) -> str:
    mean, sd = _mean_sd(values)
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.1f}" + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}")


def _paper(value) -> str:
    return "—" if value is None else f"{value:.2f}"


#: the trends the paper reports, as (worse row, better row, metrics) pairs
TRENDS = (
    ("nnU-Net (all partial labels, supervised)", "FSO", ("organ_dsc", "organ_nsd")),
    ("FSO", "Self-training with partial labels", ("organ_dsc", "organ_nsd")),
    ("Self-training with partial labels", "Self-training with partial labels and unlabelled", ("organ_dsc", "organ_nsd")),
    ("FSO", "Self-training with partial labels and unlabelled", ("organ_dsc", "organ_nsd")),
    ("FST", "Mean teacher", ("tumor_dsc", "tumor_nsd")),
)
#: short organ names for the per-class table
_SHORT = {1: "liver", 2: "R kid", 3: "spleen", 4: "panc", 5: "aorta", 6: "IVC", 7: "R adr", 8: "L adr", 9: "gallb",
          10: "esoph", 11: "stom", 12: "duod", 13: "L kid", 14: "tumor"}


def markdown(results: dict, annotated: Mapping[int, int] | None = None) -> str:
    """The ablation table (mean ± sd over seeds, %), paired differences, per-class DSC, diagnostics.

    Args:
        results: :func:`collect`'s output.
        annotated: number of labelled training cases annotating each class, for the per-class table.
    """
    seeds = results["seeds"]
    per_seed = results["rows"]
    metrics = ("organ_dsc", "organ_nsd", "tumor_dsc", "tumor_nsd")
    lines = [
        "| method | organ DSC | organ NSD | tumor DSC | tumor NSD | paper organ DSC / NSD | paper tumor DSC / NSD |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in ROWS:
        values = {k: [per_seed[str(s)].get(row, {}).get(k) for s in seeds] for k in metrics}
        paper = PAPER[row]
        lines.append(
            f"| {row} | {_cell(values['organ_dsc'])} | {_cell(values['organ_nsd'])} | {_cell(values['tumor_dsc'])} "
            f"| {_cell(values['tumor_nsd'])} | {_paper(paper[0])} / {_paper(paper[1])} | {_paper(paper[2])} / {_paper(paper[3])} |"
        )
    done = {row: sum(row in per_seed[str(s)] for s in seeds) for row in ROWS}
    lines += ["", f"%, mean ± sd over the seeds ({', '.join(map(str, seeds))}) on {results['num_test']} test cases; "
              "rows finished for fewer seeds: " + (", ".join(f"{r} ({n})" for r, n in done.items() if n < len(seeds)) or "none") + "."]
    lines += ["", "Paired differences (better row − worse row, same seed and test cases), in points of %:", "",
              "| comparison | metric | per seed | mean | sd of the two rows over seeds |", "| --- | --- | --- | ---: | ---: |"]
    for worse, better, keys in TRENDS:
        for key in keys:
            diffs, spread = [], []
            for s in seeds:
                a, b = per_seed[str(s)].get(worse, {}).get(key), per_seed[str(s)].get(better, {}).get(key)
                if a is not None and b is not None:
                    diffs.append(100 * (b - a))
            for row in (worse, better):
                sd = _mean_sd([per_seed[str(s)].get(row, {}).get(key) for s in seeds])[1]
                spread.append("—" if math.isnan(sd) else f"{100 * sd:.1f}")
            if diffs:
                lines.append(f"| {better} − {worse} | {key.replace('_', ' ')} | {', '.join(f'{d:+.1f}' for d in diffs)} "
                             f"| {np.mean(diffs):+.1f} | {' / '.join(spread)} |")
    classes = list(ORGAN_CLASSES) + [TUMOR]
    lines += ["", "Per-class DSC (%, mean over seeds):", "",
              "| method | " + " | ".join(_SHORT[c] for c in classes) + " |", "| --- |" + " ---: |" * len(classes)]
    if annotated:
        lines.append("| *labelled training cases annotating it* | " + " | ".join(str(annotated.get(c, 0)) for c in classes) + " |")
    for row in ROWS:
        cells = []
        for c in classes:
            values = [per_seed[str(s)][row]["per_class_dsc"].get(str(c)) for s in seeds if row in per_seed[str(s)]]
            values = [v for v in values if v is not None and not math.isnan(v)]
            cells.append(f"{100 * np.mean(values):.0f}" if values else "")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Diagnostics per seed:", "", "| seed | teacher: test organ DSC | pseudo labels vs hidden truth, organ DSC: CPL / PL "
              "| tumor models, test tumor DSC: student / EMA teacher | seconds: teacher + pseudo labels; students |",
              "| --- | ---: | --- | --- | --- |"]
    for s in seeds:
        d = results["diagnostics"].get(str(s), {})
        teacher = d.get("teacher", {})
        q = teacher.get("pseudo_label_quality", {})
        quality = " / ".join(f"{100 * q[k]['organ_dsc']:.1f}" if k in q else "—" for k in (CPL, PL))
        students = d.get("students", {})
        tumor = "; ".join(
            f"{n}: {100 * r['scores']['student']['tumor_dsc']:.1f} / {100 * r['scores']['teacher']['tumor_dsc']:.1f}"
            for n, r in students.items() if "teacher" in r.get("scores", {})
        )
        times = ", ".join(f"{n} {r['train_seconds']:.0f}" for n, r in students.items())
        t_dsc = f"{100 * teacher['test']['organ_dsc']:.1f}" if "test" in teacher else "—"
        t_sec = f"{teacher['train_seconds']:.0f} + {teacher['pseudo_label_seconds']:.0f}" if "train_seconds" in teacher else "—"
        lines.append(f"| {s} | {t_dsc} | {quality} | {tumor} | {t_sec}; {times} |")
    lines += ["", f"Training and pseudo-labelling time in all: {results['train_seconds'] / 60:.0f} min ({results['machine']})."]
    return "\n".join(lines) + "\n"


def annotation_counts(data: dict) -> dict[int, int]:
    """Labelled training cases whose label holds each class (organs from triage's set A, tumor)."""
    cases = [c for c in data["triage"]["cases"].values() if c["label"] is not None]
    counts = {c: sum(c in case["organs"] for case in cases) for c in ORGAN_CLASSES}
    counts[TUMOR] = sum(bool(case["tumor"]) for case in cases)
    return counts


# ----------------------------------------------------------------------------- command line
def run(
    work_dir: str = "runs/ablation",
    seeds: int | str | Sequence[int] = 2,
    settings: str | Sequence[str] = "all",
    output: str | None = None,
    threads: int = 1,
    report_only: bool = False,
    **sizes,
) -> dict:
    """Run (or resume) the ablation and print its table.

    Args:
        work_dir: cache of the cohort, teachers, students, predictions and ``results.json``.
        seeds: a number n (seeds 0..n-1), or a list: ``--seeds "[1]"`` (one seed, 1), ``--seeds 0,2``.
        settings: ``all`` or a comma list of student settings (``organ_nnunet, fso, st_partial,
            st_partial_unlabelled, tumor_nnunet, fst, mean_teacher``); self-training settings train
            the teacher first.
        output: also write the markdown table to this file.
        report_only: train nothing: tabulate what ``work_dir`` holds for these settings (the rows
            an interrupted run finished).
        threads: ``torch.set_num_threads``; 1 by default: on a shared 2-core machine two
            threads per process were 5x slower than one (threads wait for each other).
        sizes: any field of :class:`Params` (cohort sizes, ``spatial_size``, ``base_channels``,
            ``epochs``, ``iterations``, teacher sizes, ``ema_warmup_iters``...).
    """
    fields = {f.name for f in dataclasses.fields(Params)}
    unknown = sorted(set(sizes) - fields)
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; sizes are {sorted(fields)}")
    p = Params(**sizes)
    torch.set_num_threads(int(threads))
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    elif isinstance(seeds, str):
        seeds = [int(s) for s in seeds.split(",") if s.strip()]
    else:
        seeds = [int(s) for s in seeds]
    names = list(ORGAN_METHODS) + list(TUMOR_METHODS)
    if settings != "all":
        wanted = settings.split(",") if isinstance(settings, str) else list(settings)
        bad = sorted(set(wanted) - set(names))
        if bad:
            raise SystemExit(f"unknown setting(s) {bad}; settings are {names}")
        names = [n for n in names if n in wanted]
    work = Path(work_dir).resolve()
    start = time.perf_counter()
    data = prepare_cohort(work, p)
    fingerprint = Fingerprint.load(data["prepared"] / "fingerprint.json")
    for seed in seeds if not report_only else []:
        seed_dir = work / f"seed{seed}"
        all_settings = student_settings(p, seed)
        pseudo_datalist, teacher = None, {}
        if any(all_settings[n]["data"] == "fully_labelled+pseudo" for n in names):
            pseudo_datalist, teacher = run_teacher(seed_dir, p, seed, data, fingerprint)
        for name in names:
            run_student(seed_dir, name, all_settings[name], data, fingerprint, pseudo_datalist, teacher.get("setting"))
        write_json(work / "results.json", collect(work, p, seeds, data))
    results = collect(work, p, seeds, data)
    if not report_only:  # a tabulation keeps the training run's results.json
        results["seconds"] = round(time.perf_counter() - start, 1)
        write_json(work / "results.json", results)
    table = markdown(results, annotation_counts(data))
    print(table)
    if output:
        write_text_atomic(output, table)
    log(f"ablation done in {time.perf_counter() - start:.0f} s")
    return results


@functools.wraps(run)
def main(*args, **kwargs) -> None:
    """Command line of :func:`run`; returns nothing, so that fire prints only the table."""
    run(*args, **kwargs)


if __name__ == "__main__":
    fire.Fire(main)
