"""Train the shipped demo weights: all three stages, on a generated cohort, on the CPU.

    stmt-train-demo                       # the shipped weights (seed 0)
    stmt-train-demo --work_dir /tmp/demo --epochs 2 --teacher_epochs 2   # a smoke run

In order (every training run is its bundle's own workflow, run by ``python -m monai.bundle run``):

1. a synthetic FLARE23-like cohort from the shipped real CT (``stmt_monai.synthetic.anatomy``) and its
   triage into the paper's categories, datalists and fingerprint (``stmt_monai.data.triage``);
2. ``configs/demo.json`` in each stage bundle (:func:`stmt_monai.inference.bundles.write_demo_config`):
   the reduced networks (:data:`DEMO_NETWORK`, :data:`DEMO_SIZES`) and ``ckpt_dir`` =
   ``models/demo``; every training run below layers it last, and the cascade layers it when it
   loads the demo weights, so both build the same network;
3. self-training steps 1-2 (paper section 2.2): pseudo labels for the partially labelled and
   unlabelled cases, corrected with the partial annotations
   (``stmt_monai.training.self_training.correct_pseudo_label``, annotated tumors kept):
   by default (``--teacher oracle``) the synthetic cohort's hidden full truth stands in for the
   organ teacher's prediction, because a teacher worth its name does not train in minutes on a
   CPU (30 epochs of a small one still scored a validation Dice of 0 here);
   ``--teacher train`` runs the ``organ_selftrain`` bundle's ``train_teacher`` and
   ``pseudo_label`` workflows instead (a small ``res_unet_large``, :data:`DEMO_TEACHER`);
4. self-training step 3 and the mean teacher: the three students through their bundles' ``train``
   workflows: ``coarse_abdomen`` and ``organ_selftrain`` on labelled + CPL + PL cases,
   ``tumor_meanteacher`` (mean teacher) on the tumor-annotated cases;
5. each ``models/demo/model.pt`` reduced to the network the cascade runs (the tumor bundle's
   ``inference_network``) in fp16, the training leftovers (checkpoints, teacher) deleted, and
   ``models/demo/demo_weights.json`` written (settings, epochs, sizes, sha256, seconds).

The demo weights are for running the pipeline on a fresh machine, not for any real measurement:
trained for minutes on synthetic cases derived from one CT. Train real weights with each
bundle's docs/README.md commands (``models/model.pt`` then takes precedence).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from stmt_monai.bundle import read_record, record_path, run_workflow
from stmt_monai.inference.bundles import (
    STAGE_BUNDLES,
    bundle_config,
    default_bundles_dir,
    load_weights,
    save_weights,
    write_demo_config,
)
from stmt_monai.synthetic.oracle import oracle_pseudo_labels

logger = logging.getLogger(__name__)

#: reduced Res-UNet of every demo network: 8 base channels, 4 down-samplings, at most 128
#: channels (1.42 M parameters, 2.9 MB in fp16; the paper's student has 16.7 M)
DEMO_NETWORK = {"base_channels": 8, "num_downsamplings": 4, "max_channels": 128}
#: demo input sizes (multiples of 2**4); the paper's are 128^3 and 192^3. A CPU trains the
#: organ student at 96^3 (batch 3, augmentations) at ~15 s an iteration: too slow for a demo
DEMO_SIZES = {"abdomen": [48, 48, 48], "organ": [64, 64, 64], "tumor": [64, 64, 64]}
#: optimiser of the demo students (SGD, Nesterov): the paper's lr 0.01 with momentum 0.99 needs
#: far more iterations than a CPU demo has: on the real CT at 48^3 it still predicted nothing
#: after 100 steps, where lr 0.05 with momentum 0.9 reached an abdomen Dice of 0.90 in 60. The
#: 13-organ student learns slowest (validation mean Dice 0.03 after 140 iterations at lr 0.05,
#: 0.10 after 280 at lr 0.1), so it gets a higher rate and more epochs (``organ_epochs``)
DEMO_OPTIMIZER = {
    "abdomen": {"learning_rate": 0.05, "momentum": 0.9},
    "organ": {"learning_rate": 0.2, "momentum": 0.9},
    "tumor": {"learning_rate": 0.05, "momentum": 0.9},
}
#: the organ teacher of the demo: the convolutional stand-in, small, on a coarse grid
DEMO_TEACHER = {
    "teacher_kind": "res_unet_large",
    "teacher_base_channels": "8",
    "teacher_num_downsamplings": "4",
    "teacher_roi_size": "[48,48,48]",
    "teacher_spacing_mm": "[5,5,5]",
}


def _run(bundle: Path, workflow: str, overrides: Mapping, log_dir: Path) -> float:
    """Run one bundle workflow with ``configs/demo.json`` layered last (:func:`stmt_monai.bundle.run_workflow`);
    its seconds. Its output goes to ``log_dir/<bundle>_<workflow>.log``.

    Raises:
        stmt_monai.bundle.WorkflowFailed: the workflow failed (the message names the log).
    """
    log = log_dir / f"{bundle.name}_{workflow}.log"
    log.unlink(missing_ok=True)
    logger.info("%s %s (log: %s)", bundle.name, workflow, log)
    seconds = run_workflow(bundle, workflow, overrides, log_file=log, demo=True)
    logger.info("%s %s: %.0f s", bundle.name, workflow, seconds)
    return seconds


def finalize(bundle: Path, record: Mapping) -> dict:
    """Keep only the inference network in fp16 and the fingerprint in ``models/demo``."""
    parser, _ = bundle_config(bundle, "demo")
    ckpt = Path(parser.get_parsed_content("ckpt_dir"))
    key = parser.get("inference_network")
    state = load_weights(ckpt / "model.pt", key)
    save_weights(ckpt / "model.pt", state, half=True)  # bare: the model zoo's model.pt
    for leftover in ckpt.iterdir():
        if leftover.name not in ("model.pt", record_path("model.pt").name, "fingerprint.json"):  # weights, their record
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    data = (ckpt / "model.pt").read_bytes()
    record = {
        **record,
        "what": "demo weights: trained on a synthetic cohort (stmt-train-demo), NOT for clinical use",
        "storage": "fp16 state dict (cast to fp32 on load)",
        "network": read_record(ckpt / "model.pt"),  # the record the training wrote beside the weights
        "inference_network": key,
        "model_bytes": len(data),
        "model_sha256": hashlib.sha256(data).hexdigest(),
    }
    (ckpt / "demo_weights.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def train_demo(
    work_dir: str = "data/demo",
    seed: int = 0,
    num_labelled: int = 16,
    num_unlabelled: int = 4,
    num_validation: int = 2,
    size: int = 64,
    fully_share: float = 0.3,
    teacher_epochs: int = 30,
    epochs: int = 25,
    organ_epochs: int = 150,
    tumor_epochs: int = 60,
    tumor_rampup_epochs: int = 20,
    val_interval: int = 5,
    teacher: str = "oracle",
    stages: str | tuple = tuple(STAGE_BUNDLES),
    bundles_dir: str | None = None,
) -> dict[str, dict]:
    """Make the cohort, train the three stages with their bundles, write the demo weights
    (``<bundle>/models/demo``); returns each trained stage's record (its ``demo_weights.json``).

    Args:
        work_dir: cohort, prepared datalists, pseudo labels and logs (not shipped).
        seed: cohort seed (training seeds are the bundles' own ``seed``).
        num_labelled, num_unlabelled, num_validation, size: cohort size (``CohortConfig``).
        fully_share: share of fully organ labelled cases (the teacher's training set; FLARE23
            has 10 %, more here so that a few minutes give the teacher enough cases).
        teacher_epochs: epochs of the organ teacher.
        epochs: epochs of the stage-1 student.
        organ_epochs: epochs of the organ student (validated every ``2 * val_interval``).
        tumor_epochs: epochs of the tumor mean teacher, validated once at the end (its
            validation Dice stays 0 at demo size, so "best" would mean "first").
        tumor_rampup_epochs: the tumor bundle's optional lambda ramp-up (off in the bundle by
            default): at 25 epochs without it the demo tumor network still marked hundreds of
            scattered false tumor voxels on the shipped CT.
        val_interval: epochs between validations (the best model is kept).
        teacher: ``oracle`` (the cohort's hidden truth as the teacher's prediction) or ``train``
            (the organ bundle's teacher and pseudo-label workflows).
        stages: the stages to train (``abdomen``, ``organ``, ``tumor``, comma-separated); the
            others keep their demo weights.
        bundles_dir: where the stage bundles are (default the repository's ``bundles/``).

    Raises:
        ValueError: unknown ``stages`` or ``teacher``.
        stmt_monai.bundle.WorkflowFailed: a training workflow failed (its log named).
    """
    from stmt_monai.data.triage import triage_dataset
    from stmt_monai.synthetic.annotation import make_cohort
    from stmt_monai.synthetic.config import CohortConfig

    start = time.perf_counter()
    work = Path(work_dir).resolve()
    bundles = Path(bundles_dir).resolve() if bundles_dir else default_bundles_dir()
    cohort, prepared, pseudo, logs = work / "cohort", work / "prepared", work / "pseudo_labels", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = CohortConfig(num_labelled=num_labelled, num_unlabelled=num_unlabelled, num_validation=num_validation, num_test=0, size=size, fully_share=fully_share)
    if not (cohort / "policy.json").exists():
        make_cohort(cohort, config, seed=seed, progress=False)
    triage_dataset(cohort, prepared, progress=False)
    logger.info("cohort and triage: %.0f s", time.perf_counter() - start)

    stages = stages.split(",") if isinstance(stages, str) else list(stages)
    if set(stages) - set(STAGE_BUNDLES):
        raise ValueError(f"--stages must be among {list(STAGE_BUNDLES)}, got {stages}")
    if teacher not in ("oracle", "train"):
        raise ValueError(f"--teacher must be 'oracle' or 'train', got {teacher!r}")
    roots = {stage: bundles / name for stage, name in STAGE_BUNDLES.items() if stage in stages}
    for stage, root in roots.items():
        write_demo_config(root, {**DEMO_NETWORK, "spatial_size": DEMO_SIZES[stage]})
        # a fresh start: no resume from an earlier demo run
        shutil.rmtree(root / "models" / "demo", ignore_errors=True)
    common = {
        "prepared_dir": prepared,
        "pseudo_label_dir": pseudo,
        "pseudo_datalist": pseudo / "datalist_pseudo_labelled.json",
        "num_workers": 0,
        "val_interval": val_interval,
    }
    # TensorBoard logs and evaluation outputs of the demo runs stay in work_dir
    where = {stage: {"log_dir": logs / f"tensorboard_{stage}", "output_dir": work / f"eval_{stage}"} for stage in roots}
    seconds = {}
    organ = bundles / STAGE_BUNDLES["organ"]
    if teacher == "train":
        seconds["organ_teacher"] = _run(organ, "train_teacher", {**common, **where["organ"], **DEMO_TEACHER, "teacher_max_epochs": teacher_epochs, "teacher_val_interval": val_interval}, logs)
        seconds["pseudo_label"] = _run(organ, "pseudo_label", {**common, **where["organ"], **DEMO_TEACHER, "progress": False}, logs)
    else:  # oracle
        clock = time.perf_counter()
        pseudo.mkdir(parents=True, exist_ok=True)
        oracle_pseudo_labels(cohort, prepared, pseudo)
        seconds["pseudo_label"] = time.perf_counter() - clock
    if "abdomen" in roots:
        seconds["abdomen"] = _run(roots["abdomen"], "train", {**common, **where["abdomen"], **DEMO_OPTIMIZER["abdomen"], "max_epochs": epochs}, logs)
    if "organ" in roots:
        organ_args = {**common, **where["organ"], **DEMO_OPTIMIZER["organ"], "max_epochs": organ_epochs, "val_interval": 2 * val_interval}
        seconds["organ"] = _run(organ, "train", organ_args, logs)
    if "tumor" in roots:
        tumor_args = {
            **where["tumor"], **DEMO_OPTIMIZER["tumor"], "prepared_dir": prepared, "roi_dir": pseudo, "num_workers": 0,
            "max_epochs": tumor_epochs, "val_interval": tumor_epochs, "lambda_rampup_epochs": tumor_rampup_epochs,
        }
        seconds["tumor"] = _run(roots["tumor"], "train", tumor_args, logs)
    record = {
        "cohort": {"seed": seed, "num_labelled": num_labelled, "num_unlabelled": num_unlabelled, "num_validation": num_validation, "size": size, "fully_share": fully_share},
        "optimizer": DEMO_OPTIMIZER,
        "epochs": {"abdomen": epochs, "organ": organ_epochs, "tumor": tumor_epochs, **({"organ_teacher": teacher_epochs} if teacher == "train" else {})},
        "teacher": DEMO_TEACHER if teacher == "train" else "oracle: the synthetic cohort's hidden truth, corrected with the partial annotations",
        "tumor_lambda_rampup_epochs": tumor_rampup_epochs,
        "train_seconds": {k: round(v) for k, v in seconds.items()},
    }
    records = {stage: finalize(root, record) for stage, root in roots.items()}
    total = sum(r["model_bytes"] for r in records.values())
    logger.info("done in %.0f s; demo weights %.1f MiB in %s/*/models/demo/", time.perf_counter() - start, total / 2**20, bundles)
    return records
