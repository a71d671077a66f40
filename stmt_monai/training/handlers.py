"""Ignite handlers of the StMt training workflows: checkpoints, resume, validation, logging.

- :class:`ResumableCheckpoint`: the whole training state every epoch, and resume from it;
- :class:`BestCheckpoint`: ``models/model.pt`` whenever the validator's key metric improves;
- :class:`ValidationHandler`: MONAI's, plus a validation after an off-interval last epoch;
- :func:`loss_terms`, :func:`image_path_meta`: what ``StatsHandler`` / ``TensorBoardStatsHandler``
  log (the total loss and each stream's term of eq. (1) or (2)) and how ``MetricsSaver`` names
  cases.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a kill during a save can
leave a truncated file that the next run fails to load. These handlers write to a temporary
name and rename, save on rank 0 only under torch.distributed, and resume from the last
checkpoint through MONAI's ``CheckpointLoader``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from monai.handlers import ValidationHandler as _MonaiValidationHandler
from torch.optim.lr_scheduler import LRScheduler

from stmt_monai.bundle import write_record
from stmt_monai.io import atomic_write
from stmt_monai.networks import WeightsMismatch, describe_mismatch, mismatch_message
from stmt_monai.progress import EngineProgress
from stmt_monai.training.distributed import is_main_process

logger = logging.getLogger(__name__)


def _state_dict(obj):
    if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
        obj = obj.module
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def save_checkpoint(path: str | os.PathLike, save_dict: Mapping, keep_previous: str | os.PathLike | None = None) -> Path | None:
    """``torch.save`` of ``{name: obj.state_dict()}`` atomically, on the main process only.

    Args:
        path: the checkpoint file.
        save_dict: ``{name: object with state_dict()}``.
        keep_previous: where the checkpoint being replaced is kept (a hard link, else a copy,
            itself put in place atomically); at every moment of a save, ``path`` or
            ``keep_previous`` holds a complete checkpoint.
    """
    if not is_main_process():
        return None
    final = Path(path)
    with atomic_write(final) as tmp:
        torch.save({name: _state_dict(obj) for name, obj in save_dict.items()}, tmp)
        if keep_previous is not None and final.exists():
            _keep_copy(final, Path(keep_previous))
    return final


def _keep_copy(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source`` (hard link where the file system allows), atomically."""
    with atomic_write(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


# what a scheduler's state_dict holds about where the run is, as opposed to the schedule itself
_SCHEDULE_POSITION = ("last_epoch",)


def _schedule_settings(scheduler: LRScheduler) -> dict:
    """The schedule a run was configured with (``total_iters``, ``power``, ``base_lrs``...):
    the public entries of its ``state_dict`` except its position (``last_epoch``)."""
    return {k: v for k, v in scheduler.state_dict().items() if not k.startswith("_") and k not in _SCHEDULE_POSITION}


def _keep_schedule(scheduler: LRScheduler, configured: Mapping, checkpoint: Path) -> None:
    """After a resume, the run's own schedule wins over the checkpoint's; the checkpoint gives
    only the position in it.

    ``load_state_dict`` restores a scheduler whole, so a run resumed with a longer schedule (a
    finished 800-epoch teacher continued to ``teacher_max_epochs`` 1600, say) would keep the old
    ``total_iters`` and, past it, train at learning rate 0. Here the configured settings are put
    back and the optimizer's learning rate set to the schedule's closed form at the restored
    epoch; a scheduler without a closed form keeps the checkpoint's rate and says so.
    """
    saved = _schedule_settings(scheduler)
    changed = {k: (saved.get(k), v) for k, v in configured.items() if saved.get(k) != v}
    if not changed:
        return
    for key, (_, value) in changed.items():
        setattr(scheduler, key, value)
    what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    if closed_form is None:
        logger.warning(f"{checkpoint}: this run's learning-rate schedule differs from the checkpoint's ({what}); "
                       f"{type(scheduler).__name__} has no closed form, so the learning rate continues from the checkpoint's")
        return
    lrs = closed_form()
    for group, lr, base in zip(scheduler.optimizer.param_groups, lrs, scheduler.base_lrs):
        group["lr"], group["initial_lr"] = lr, base
    scheduler._last_lr = [float(lr) for lr in lrs]
    logger.info(f"{checkpoint}: this run's learning-rate schedule, not the checkpoint's ({what}): "
                f"learning rate {', '.join(f'{float(lr):.4g}' for lr in lrs)} at epoch {scheduler.last_epoch}")


class ResumableCheckpoint:
    """Save the whole training state every ``save_interval`` epochs; resume from it at start.

    Attach to the trainer. ``save_dict`` holds what to save and restore (network, optimizer,
    lr scheduler, the trainer itself so the epoch count resumes, an EMA teacher...).

    A run killed at any moment resumes from the last completed save, losing at most
    ``save_interval`` epochs: each save is written under a temporary name and renamed, and the
    checkpoint it replaces is kept as ``<name>.prev.pt`` (:attr:`previous`), so one of the two is
    always complete. A last checkpoint that is unreadable (truncated by a full disk or a copy,
    say) falls back to the previous one with a warning; if neither loads, the run stops with
    both files named rather than silently training from scratch.

    The learning-rate schedule is this run's, not the checkpoint's: a run resumed with more
    epochs than it was started with continues on the longer poly schedule from the epoch it
    stopped at (the checkpoint gives the position only; the change is logged).

    Args:
        save_dir: folder of ``filename``.
        save_dict: ``{name: object with state_dict()}``.
        filename: checkpoint file name (``checkpoint_last.pt``).
        save_interval: epochs between saves.
        resume: load ``save_dir/filename`` at ``Events.STARTED`` if it exists.
        map_location: as ``torch.load`` (e.g. ``"cpu"``).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping,
        filename: str = "checkpoint_last.pt",
        save_interval: int = 1,
        resume: bool = True,
        map_location=None,
    ):
        self.path = Path(save_dir) / filename
        self.previous = self.path.with_name(f"{Path(filename).stem}.prev{Path(filename).suffix or '.pt'}")
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.resume = bool(resume)
        self.map_location = map_location
        self._saved_at: int | None = None  # iteration of the last save

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def load(self, engine: Engine) -> None:
        """Restore :attr:`path` into ``save_dict``, or :attr:`previous` when :attr:`path` is unreadable.

        No :attr:`path` means a fresh start (deleting it is how a user starts over), so a
        :attr:`previous` left beside nothing is removed rather than resumed.
        """
        if not self.path.exists():
            if self.previous.exists():
                logger.info(f"{self.path} is absent: training from scratch; removed the stale {self.previous.name}")
                self.previous.unlink(missing_ok=True)
            return
        problems = []
        for candidate in (self.path, self.previous):
            if not candidate.exists():
                continue
            try:  # a truncated or garbled file fails here, before any object is touched
                torch.load(candidate, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
                problems.append(f"{candidate}: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
                logger.warning(f"unreadable checkpoint {problems[-1]}")
                continue
            if candidate != self.path:
                logger.warning(
                    f"{self.path} is unreadable: resuming from the previous checkpoint {candidate} "
                    f"(up to {self.save_interval} more epoch(s) are trained again)"
                )
            schedules = {name: _schedule_settings(obj) for name, obj in self.save_dict.items() if isinstance(obj, LRScheduler)}
            try:
                CheckpointLoader(str(candidate), self.save_dict, map_location=self.map_location, strict=True)(engine)
            except RuntimeError as err:
                if "state_dict" not in str(err):
                    raise
                raise WeightsMismatch(self._mismatch(candidate)) from None
            for name, settings in schedules.items():
                _keep_schedule(self.save_dict[name], settings, candidate)
            break
        else:
            raise RuntimeError(f"no readable checkpoint to resume from ({'; '.join(problems)}); delete them to train from scratch")
        logger.info(f"resumed from {candidate} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")
        if engine.state.max_epochs is not None and engine.state.epoch >= engine.state.max_epochs:
            # a finished run resumes into nothing: say so rather than end silently
            logger.warning(
                f"{self.path}: training already finished (epoch {engine.state.epoch} of {engine.state.max_epochs}); "
                "nothing to train. Delete it to train again from scratch"
            )

    def _mismatch(self, checkpoint: Path) -> str:
        """One line: which networks of ``save_dict`` the saved state does not fit, and how."""
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        problems = []
        for name, obj in self.save_dict.items():
            if isinstance(obj, torch.nn.Module) and isinstance(saved.get(name), Mapping):
                problem = describe_mismatch(_state_dict(obj), saved[name])
                if problem:
                    problems.append(f"{name}: {problem}")
        return (
            f"{checkpoint}: the training state of an earlier run does not fit this run's network ({'; '.join(problems) or 'other keys'}); "
            "give the network keys that run was given, or delete it to train afresh"
        )

    def save(self, engine: Engine) -> None:
        if self._saved_at == engine.state.iteration:
            return  # the last epoch, saved at EPOCH_COMPLETED, again at COMPLETED: nothing new
        save_checkpoint(self.path, self.save_dict, keep_previous=self.previous)
        self._saved_at = engine.state.iteration


class ValidationHandler(_MonaiValidationHandler):
    """MONAI's ``ValidationHandler`` that also validates after the last epoch when that epoch is
    not a multiple of ``interval``.

    With MONAI's own, a run shorter than ``interval`` epochs (e.g. ``--max_epochs 2`` with the
    bundles' ``val_interval`` 5) never validates, so :class:`BestCheckpoint` never writes
    ``model.pt``; and the last epochs of any run are never scored. Same arguments as
    ``monai.handlers.ValidationHandler``; the extra validation is for ``epoch_level`` only.

    The validator logs its progress (cases done, time left; :class:`stmt_monai.progress.EngineProgress`)
    on the main process, so that a long validation does not look like a hang.
    """

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.epoch_level:
            engine.add_event_handler(Events.COMPLETED, self._after_last_epoch)
        if self.validator is not None and is_main_process():
            EngineProgress("validation").attach(self.validator)

    def _after_last_epoch(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self(engine)


class BestCheckpoint:
    """Save ``save_dict`` when the validator's key metric improves (``models/model.pt``).

    Attach to the evaluator. A single object is saved as its bare state dict (the MONAI
    model-zoo convention for ``model.pt``); several as ``{name: state_dict}``.

    With ``record``, the network and input-size keys the run was given are written beside the
    weights each time (``model.pt`` -> ``model.json``, :func:`stmt_monai.bundle.write_record`),
    so that inference, evaluation, export and MONAI Label build the same network without the
    user repeating the training's overrides.

    Args:
        save_path: output file.
        save_dict: ``{name: module}``.
        metric_name: key of ``engine.state.metrics``; default the evaluator's key metric.
        record: ``{config id: value}`` of the network, e.g. ``{"spatial_size": "@spatial_size",
            "base_channels": "@base_channels", ...}`` in a bundle config.

    A NaN metric (no validation case holds the target: the tumor bundle's validation over cases
    without a tumor) selects nothing: it is logged as such and the latest weights are saved. A
    metric that stays at 0 keeps the first validation's weights, with a warning at every later
    validation (a tumor student can train for many epochs at Dice 0, and ``model.pt`` is then an
    early network, not the last one).

    Its ``state_dict`` holds the best value, so it can be resumed with the rest of the training.
    """

    def __init__(self, save_path: str | os.PathLike, save_dict: Mapping, metric_name: str | None = None, record: Mapping | None = None):
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.metric_name = metric_name
        self.record = dict(record) if record else None
        self.best = -float("inf")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict:
        """The best value so far: put this handler in the trainer's :class:`ResumableCheckpoint`
        so that a resumed run does not overwrite ``model.pt`` with a worse model."""
        return {"best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = float(state["best"])

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None) or next(iter(engine.state.metrics))
        value = float(engine.state.metrics[name])
        if math.isnan(value):
            # no validation case holds the target (the tumor bundle's Dice over the cases with a
            # tumor, stmt_monai.evaluation.metrics.PresentDiceMetric): nothing to select on
            if is_main_process():
                logger.info(f"{name}: nan, no validation label holds the target (no tumor): not scored; saving this epoch's weights")
        elif value > self.best:
            self.best = value
        else:
            if self.best <= 0.0 and is_main_process():
                logger.warning(
                    f"{name} is still {value:.4f}, as at the first validation: {self.save_path} holds that epoch's weights "
                    "(the model has not yet segmented the target in any validation case; see the training log's target volumes)"
                )
            return
        if self.record is not None and is_main_process():
            write_record(self.save_path, self.record)
        if len(self.save_dict) == 1 and is_main_process():
            with atomic_write(self.save_path) as tmp:
                torch.save(_state_dict(next(iter(self.save_dict.values()))), tmp)
        else:
            save_checkpoint(self.save_path, self.save_dict)
        if is_main_process() and not math.isnan(value):
            logger.info(f"{name} improved to {value:.4f}: saved {self.save_path}")


class WeightsLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for a bundle's inference and evaluation: weights that do not
    fit the network built from the config stop the run with one line naming the weights file,
    the differing tensors and the network keys the weights were trained with (their record,
    ``models/model.json``, to pass as ``--args_file``), instead of PyTorch's state-dict dump.
    Same arguments as ``monai.handlers.CheckpointLoader``."""

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            checkpoint = torch.load(self.load_path, map_location="cpu", weights_only=True)
            problems = []
            for name, obj in self.load_dict.items():
                state = checkpoint.get(name, checkpoint) if len(self.load_dict) == 1 else checkpoint.get(name, {})
                problem = describe_mismatch(_state_dict(obj), state)
                if problem:
                    problems.append(problem if len(self.load_dict) == 1 else f"{name}: {problem}")
            raise WeightsMismatch(mismatch_message(self.load_path, "; ".join(problems) or str(err).splitlines()[0])) from None


def image_path_meta(batch: Sequence[Mapping]) -> list[dict]:
    """``MetricsSaver(batch_transform=...)``: each decollated item's input path as its file name.

    :class:`stmt_monai.preprocessing.transforms.LoadStageInputd` keeps the input path under ``image_path``
    (its tensors carry no MONAI meta data), which is what ``MetricsSaver`` names cases by.
    """
    return [{"filename_or_obj": item["image_path"]} for item in batch]


def loss_terms(output: Sequence[Mapping] | Mapping) -> dict[str, float]:
    """``StatsHandler`` / ``TensorBoardStatsHandler`` ``output_transform``: the iteration's loss, its
    per-stream terms and, from the mean teacher, lambda and the tumor volumes of its targets.

    Args:
        output: the trainer's (decollated) iteration output; :class:`stmt_monai.training.engines.SelfTrainingTrainer`
            puts the unweighted terms there as ``loss_labelled``, ``loss_cpl``, ``loss_pl``;
            :class:`stmt_monai.training.engines.MeanTeacherTrainer` also ``lambda_cpl`` and
            ``*_tumor_pct`` / ``extra_target_pct``.

    Returns:
        ``{"loss": total, "loss_<stream>": term, ...}`` as floats (each logged as its own scalar).
    """
    first = output[0] if isinstance(output, Sequence) else output
    return {
        key: float(value)
        for key, value in first.items()
        if key == "loss" or key.startswith(("loss_", "lambda_")) or key.endswith("_pct")
    }
