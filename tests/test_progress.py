"""Progress lines of long work (stmt_monai.progress): validation, sliding window, pseudo labels."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from ignite.engine import Engine

from stmt_monai.networks import LoggedSlidingWindowInferer, sliding_window_inferer
from stmt_monai.progress import EngineProgress, ProgressLog, format_seconds

LINE = re.compile(r"^validation: (\d+)/4 cases \((\d+) %\), \d+:\d\d:\d\d elapsed(, ~\d+:\d\d:\d\d left)?$")


def test_format_seconds():
    assert format_seconds(83.4) == "0:01:23"
    assert format_seconds(3 * 3600 + 5) == "3:00:05"


def test_every_item_logged_with_time_left_until_the_last(caplog):
    caplog.set_level(logging.INFO, "stmt_monai.progress")
    progress = ProgressLog("validation", 4, every_s=0).start()
    for _ in range(4):
        progress.update()
    progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == progress.lines
    assert lines[0] == "validation: 4 cases"
    counted = [LINE.match(line) for line in lines[1:4]]
    assert all(counted), lines
    assert [int(m.group(1)) for m in counted] == [1, 2, 3]
    assert [int(m.group(2)) for m in counted] == [25, 50, 75]
    assert all(m.group(3) for m in counted)  # time left
    assert re.fullmatch(r"validation: 4 cases in \d+:\d\d:\d\d", lines[4]) and len(lines) == 5


def test_throttled_lines_keep_first_and_last():
    progress = ProgressLog("pseudo labels", 50, every_s=3600).start()
    for _ in range(50):
        progress.update(note="case")
    progress.finish()
    assert progress.lines[1].startswith("pseudo labels: 1/50 cases (2 %)") and progress.lines[1].endswith("[case]")
    assert progress.lines[2].startswith("pseudo labels: 50 cases in ") and len(progress.lines) == 3


def test_quiet_loop_logs_nothing_and_disabled_logs_nothing():
    quiet = ProgressLog("sliding window", 5, quiet_s=3600).start()
    disabled = ProgressLog("pseudo labels", 5, enabled=False).start()
    for _ in range(5):
        quiet.update()
        disabled.update()
    quiet.finish()
    disabled.finish()
    assert quiet.lines == [] and disabled.lines == []


def test_engine_progress_counts_the_validators_cases():
    engine = Engine(lambda engine, batch: batch)
    handler = EngineProgress("validation", every_s=0)
    handler.attach(engine)
    engine.run([1, 2, 3, 4], max_epochs=1)
    lines = handler.progress.lines
    assert lines[0] == "validation: 4 cases" and LINE.match(lines[3]) and lines[3].startswith("validation: 3/4")
    assert lines[4].startswith("validation: 4 cases in ")
    engine.run([1, 2, 3, 4], max_epochs=1)  # the next validation starts counting again
    assert handler.progress.lines[5] == "validation: 4 cases" and handler.progress.lines[6].startswith("validation: 1/4 cases")


@pytest.mark.parametrize("shape", [(1, 1, 50, 70, 33), (2, 1, 32, 32, 32), (1, 1, 20, 100, 96)])
def test_sliding_window_logs_each_window_batch(shape):
    inferer = sliding_window_inferer([32, 32, 32], sw_batch_size=3, log_after_s=0, log_every_s=0)
    assert isinstance(inferer, LoggedSlidingWindowInferer)
    calls = []

    def network(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    lines = []
    logger = logging.getLogger("stmt_monai.progress")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out = inferer(torch.zeros(shape), network)
    finally:
        logger.removeHandler(handler)
    assert out.shape == (shape[0], 2, *shape[2:])
    total = inferer.window_batches(torch.zeros(shape))
    assert total == len(calls)
    if total > 1:
        assert lines[-2].startswith(f"sliding window: {total - 1}/{total} window batches (")
    assert lines[-1].startswith(f"sliding window: {total} window batches in ")


def test_pseudo_labelling_logs_cases_done_and_kept(tiny_cohort, tmp_path, caplog):
    """The pseudo-label job logs its cases (here a random tiny teacher on a 12 mm grid); a rerun
    says how many it keeps."""
    from stmt_monai.networks import teacher_network
    from stmt_monai.training.pseudo_label import generate_pseudo_labels

    torch.manual_seed(0)
    teacher = teacher_network("res_unet_large", roi_size=[32, 32, 32], base_channels=4, num_downsamplings=2)
    inferer = sliding_window_inferer([32, 32, 32])
    args = (teacher, inferer, tiny_cohort.prepared / "datalist_pseudo_label_jobs.json", tiny_cohort.prepared / "fingerprint.json", tmp_path, [12, 12, 12])
    caplog.set_level(logging.INFO)
    summary = generate_pseudo_labels(*args)
    total = summary["predicted"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pseudo labels:")]
    assert total > 2 and lines[0] == f"pseudo labels: {total} cases"
    assert lines[1].startswith(f"pseudo labels: 1/{total} cases (") and "left [" in lines[1]
    assert lines[-1].startswith(f"pseudo labels: {total} cases in ")
    caplog.clear()
    generate_pseudo_labels(*args)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pseudo labels:")]
    assert lines[0] == f"pseudo labels: {total} of {total} cases already done (kept)"


def test_bundles_validation_handler_logs_the_validators_progress(caplog):
    """The trainers' ValidationHandler puts the progress on their validator: cases and total time."""
    from monai.engines import Evaluator

    from stmt_monai.training.handlers import ValidationHandler

    validator = Evaluator(device="cpu", val_data_loader=[1, 2, 3], iteration_update=lambda engine, batch: batch)  # 3 cases
    trainer = Engine(lambda engine, batch: batch)
    ValidationHandler(validator=validator, interval=1, epoch_level=True).attach(trainer)
    caplog.set_level(logging.INFO, "stmt_monai.progress")
    trainer.run([0], max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "stmt_monai.progress"]
    assert lines[0] == "validation: 3 cases" and lines[1].startswith("validation: 1/3 cases (33 %)")
    assert lines[-1].startswith("validation: 3 cases in ")
