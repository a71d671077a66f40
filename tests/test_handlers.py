"""stmt_monai.training.handlers: the best-model checkpoint keeps its best score across a resume."""

import pytest
import torch
from ignite.engine import Engine
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


@pytest.mark.parametrize("max_epochs, expected", [(3, [3]), (5, [5]), (7, [5, 7]), (10, [5, 10])])
def test_validation_handler_also_validates_after_an_off_interval_last_epoch(max_epochs, expected):
    validated = []
    validator = SupervisedEvaluator(device="cpu", val_data_loader=[0], network=torch.nn.Identity())
    validator.run = lambda epoch: validated.append(epoch)  # record the run(global_epoch) calls
    trainer = Engine(lambda engine, batch: None)
    ValidationHandler(interval=5, validator=validator).attach(trainer)
    trainer.run([0], max_epochs=max_epochs)
    assert validated == expected  # every 5th epoch, plus the last one if it was not among them
