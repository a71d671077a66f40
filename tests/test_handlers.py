"""stmt_monai.training.handlers: the best-model checkpoint keeps its best score across a resume;
a training run killed at any moment (mid-epoch, while writing a checkpoint...) resumes losing at
most one epoch, and an unreadable last checkpoint falls back to the previous one."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointLoader

from stmt_monai.training.handlers import BestCheckpoint, ResumableCheckpoint, ValidationHandler, image_path_meta


def _validator(score: float) -> Engine:
    engine = Engine(lambda engine, batch: None)
    engine.state.metrics = {"other": 0.0, "val_mean_dice": score}
    engine.state.key_metric_name = "val_mean_dice"
    return engine


def test_best_checkpoint_uses_key_metric_and_resumes_its_best(tmp_path):
    network = torch.nn.Linear(2, 1)
    best = BestCheckpoint(tmp_path / "model.pt", {"model": network})
    best(_validator(0.8))  # the key metric, not the first one in state.metrics
    assert best.best == 0.8 and (tmp_path / "model.pt").is_file()
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    trainer = Engine(lambda engine, batch: None)
    ResumableCheckpoint(tmp_path, {"network": network, "best_checkpoint": best}).save(trainer)

    # a new run: a fresh handler restored from the training checkpoint does not overwrite model.pt
    # with a worse model
    restarted = BestCheckpoint(tmp_path / "model.pt", {"model": torch.nn.Linear(2, 1)})
    CheckpointLoader(str(tmp_path / "checkpoint_last.pt"), {"network": network, "best_checkpoint": restarted})(trainer)
    assert restarted.best == 0.8
    restarted(_validator(0.5))
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], saved["weight"])
    restarted(_validator(0.9))
    assert restarted.best == 0.9 and not torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], saved["weight"])


def test_best_checkpoint_warns_while_the_metric_stays_at_zero(tmp_path, caplog):
    network = torch.nn.Linear(2, 1)
    best = BestCheckpoint(tmp_path / "model.pt", {"model": network})
    with caplog.at_level(logging.WARNING, logger="stmt_monai.training.handlers"):
        best(_validator(0.0))  # the first validation: saved, nothing to warn about yet
        assert (tmp_path / "model.pt").is_file() and not caplog.records
        first = torch.load(tmp_path / "model.pt", weights_only=True)["weight"].clone()
        with torch.no_grad():
            network.weight.add_(1.0)  # training moves on
        best(_validator(0.0))
        assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], first)  # still the first
        assert len(caplog.records) == 1 and "still 0.0000" in caplog.text and str(tmp_path / "model.pt") in caplog.text
        best(_validator(0.3))  # it learned: saved, and no more warnings
        best(_validator(0.2))
    assert len(caplog.records) == 1 and best.best == 0.3


def test_image_path_meta_names_cases_for_metrics_saver():
    assert image_path_meta([{"image_path": "a.nii.gz", "pred": 1}]) == [{"filename_or_obj": "a.nii.gz"}]


def test_resuming_a_finished_run_warns_and_trains_nothing(tmp_path, caplog):
    network = torch.nn.Linear(2, 1)
    iterations = []

    def trainer():
        engine = Engine(lambda engine, batch: iterations.append(engine.state.iteration))
        ResumableCheckpoint(tmp_path, {"network": network, "trainer": engine}).attach(engine)
        return engine

    trainer().run([0, 1], max_epochs=2)
    assert len(iterations) == 4 and (tmp_path / "checkpoint_last.pt").is_file()
    with caplog.at_level("WARNING", logger="stmt_monai.training.handlers"):
        trainer().run([0, 1], max_epochs=2)
    assert len(iterations) == 4  # resumed at epoch 2 of 2: nothing more
    assert "training already finished (epoch 2 of 2)" in caplog.text


def _poly_trainer(save_dir, max_epochs, lrs):
    """A trainer with SGD and the bundles' poly schedule over ``max_epochs``, recording each
    iteration's learning rate into ``lrs``."""
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max_epochs, power=0.9)
    engine = Engine(lambda engine, batch: lrs.append(optimizer.param_groups[0]["lr"]))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scheduler.step())
    save_dict = {"network": network, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": engine}
    ResumableCheckpoint(save_dir, save_dict).attach(engine)
    return engine


def test_a_run_resumed_with_a_longer_schedule_follows_the_new_schedule(tmp_path, caplog):
    """A finished 4-epoch run continued to 8 epochs learns at the 8-epoch poly schedule's rate,
    not at the 4-epoch schedule's 0 (the checkpoint's scheduler state used to win)."""
    first, resumed, fresh = [], [], []
    _poly_trainer(tmp_path, 4, first).run([0], max_epochs=4)
    assert first[-1] > 0
    with caplog.at_level("INFO", logger="stmt_monai.training.handlers"):
        _poly_trainer(tmp_path, 8, resumed).run([0], max_epochs=8)
    _poly_trainer(tmp_path / "fresh", 8, fresh).run([0], max_epochs=8)
    assert len(resumed) == 4 and min(resumed) > 0
    assert resumed == pytest.approx(fresh[4:])  # epochs 5-8 of an 8-epoch schedule
    assert "total_iters 4 -> 8" in caplog.text


@pytest.mark.parametrize("max_epochs, expected", [(3, [3]), (5, [5]), (7, [5, 7]), (10, [5, 10])])
def test_validation_handler_also_validates_after_an_off_interval_last_epoch(max_epochs, expected):
    validated = []
    validator = SupervisedEvaluator(device="cpu", val_data_loader=[0], network=torch.nn.Identity())
    validator.run = lambda epoch: validated.append(epoch)  # record the run(global_epoch) calls
    trainer = Engine(lambda engine, batch: None)
    ValidationHandler(interval=5, validator=validator).attach(trainer)
    trainer.run([0], max_epochs=max_epochs)
    assert validated == expected  # every 5th epoch, plus the last one if it was not among them


# ----------------------------------------------------------------------------- killed runs resume
HELPER = Path(__file__).with_name("resume_helpers.py")
MAX_EPOCHS = 5


@pytest.fixture()
def one_thread():
    """resume_helpers runs with one torch thread (bitwise equal results across processes)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _weights(network: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in network.state_dict().items()}


KILLS = {  # where the run is killed: the last epoch whose checkpoint is complete
    "iteration:3:2": 2,  # mid-epoch
    "writing:3": 2,  # half-way through writing epoch 3's checkpoint
    "replacing:3": 2,  # epoch 3's checkpoint written and the previous one kept, not yet renamed
    "saved:3": 3,  # just after epoch 3's checkpoint is in place
}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> Path:
    """One process trains a run per kill, each in a forked child killed by SIGKILL."""
    base = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HELPER), str(base), str(MAX_EPOCHS), *KILLS], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [word for kill in KILLS for word in (kill, "killed")], done.stdout + done.stderr
    return base


@pytest.mark.parametrize("kill", list(KILLS))
def test_a_run_killed_at_any_moment_resumes_losing_at_most_one_epoch(killed_runs, tmp_path, one_thread, kill):
    from resume_helpers import BATCHES, run

    folder = killed_runs / kill.replace(":", "_")
    # the checkpoint in place is complete (a kill while writing leaves only a hidden partial file)
    last = torch.load(folder / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == KILLS[kill] * BATCHES
    assert all(p.name.startswith(".") for p in folder.iterdir() if p.name not in ("checkpoint_last.pt", "checkpoint_last.prev.pt"))
    # resumed from there, it ends exactly where an uninterrupted run ends
    reference = _weights(run(str(tmp_path / "reference"), MAX_EPOCHS))
    resumed = _weights(run(str(folder), MAX_EPOCHS))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, one_thread, caplog):
    from resume_helpers import BATCHES, make_trainer, run

    reference = _weights(run(str(tmp_path / "reference"), MAX_EPOCHS))
    run(str(tmp_path / "run"), 3)
    last, previous = tmp_path / "run" / "checkpoint_last.pt", tmp_path / "run" / "checkpoint_last.prev.pt"
    assert torch.load(previous, weights_only=True)["trainer"]["iteration"] == 2 * BATCHES  # one epoch behind
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk
    with caplog.at_level("WARNING", logger="stmt_monai.training.handlers"):
        resumed = _weights(run(str(tmp_path / "run"), MAX_EPOCHS))
    assert "checkpoint_last.pt is unreadable: resuming from the previous checkpoint" in caplog.text
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    # neither readable: stop with both named, never a silent start from scratch
    last.write_bytes(b"garbage")
    previous.write_bytes(b"")
    trainer, _ = make_trainer(tmp_path / "run")
    with pytest.raises(RuntimeError, match="no readable checkpoint to resume from.*checkpoint_last.pt.*checkpoint_last.prev.pt"):
        trainer.run(trainer.data, max_epochs=MAX_EPOCHS)

    # deleting the last checkpoint starts over (as the bundle docs say), the stale previous one removed
    last.unlink()
    trainer, _ = make_trainer(tmp_path / "run")
    epochs = []
    trainer.add_event_handler(Events.STARTED, lambda engine: epochs.append(engine.state.epoch))
    trainer.run(trainer.data, max_epochs=1)
    assert epochs == [0] and not previous.exists()
