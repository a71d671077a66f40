"""Training engines of StMt: MONAI's ``SupervisedTrainer`` with the paper's two objectives.

- :class:`SelfTrainingTrainer`: the student of self-training (stage 1 and organs). Each batch
  mixes fully labelled, CPL and PL cases; the loss sees each item's stream, eq. (1):
  ``L_o = L_ol + lambda1 L_cpl + lambda2 L_pl``.
- :class:`MeanTeacherTrainer`: the tumor student. At every iteration the EMA teacher predicts
  the batch (no gradient), the prediction is corrected in real time with the batch's tumor
  annotation, and becomes an extra target, eq. (2): ``L_t = L_tl + lambda L_cpl``. The
  teacher's weights follow the student by ignite's ``EMAHandler``.

Both only wrap ``SupervisedTrainer._iteration`` (device handling, AMP, gradient accumulation
and events stay MONAI's) by handing the extra information to the loss for one iteration.
"""

from __future__ import annotations

import functools

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from stmt_monai.training.losses import CPL, LABELLED
from stmt_monai.training.mean_teacher import correct_tumor_pseudo_label, sigmoid_rampup


class SelfTrainingTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose loss is called as ``loss(pred, label, stream=[...])``.

    The iteration output also holds the unweighted term of each stream present in the batch,
    ``loss_labelled``, ``loss_cpl``, ``loss_pl`` (``WeightedStreamsLoss.last_terms``), which
    :func:`stmt_monai.training.handlers.loss_terms` hands to the stats and TensorBoard handlers.

    Args:
        stream_key: batch key holding each item's stream name (``"labelled"``, ``"cpl"``, ``"pl"``),
            collated as a list of strings.
        *args, **kwargs: as ``monai.engines.SupervisedTrainer``; ``loss_function`` is a
            :class:`stmt_monai.training.losses.WeightedStreamsLoss`.
    """

    def __init__(self, *args, stream_key: str = "stream", **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_key = stream_key
        # a batch sampler (StreamBatchSampler) draws its order from the epoch number: without
        # this, every epoch would repeat the first epoch's batches (MONAI only sets the epoch of
        # a DistributedSampler)
        batch_sampler = getattr(self.data_loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: batch_sampler.set_epoch(engine.state.epoch))

    def _iteration(self, engine, batchdata):
        loss_function = engine.loss_function
        engine.loss_function = functools.partial(loss_function, stream=list(batchdata[self.stream_key]))
        try:
            output = super()._iteration(engine, batchdata)
        finally:
            engine.loss_function = loss_function
        # the unweighted terms L_ol, L_cpl, L_pl of eq. (1), for logging (handlers.loss_terms)
        terms = {f"loss_{name}": value for name, value in getattr(loss_function, "last_terms", {}).items()}
        for item in output if isinstance(output, list) else [output]:  # decollated: one dict per item
            item.update(terms)
        return output


class MeanTeacherTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for the mean teacher of tumor segmentation (paper Fig. 2b).

    Args:
        teacher: the EMA copy of the student (``ignite.handlers.EMAHandler(...).ema_model``).
        lambda_rampup_epochs: ramp the weight of the teacher's target up from 0 to its full value
            (``lambda``, the loss's ``"cpl"`` weight) over this many epochs, by
            :func:`stmt_monai.training.mean_teacher.sigmoid_rampup` (the usual mean-teacher consistency
            ramp-up, not in the paper); 0 for none. Without it an untrained teacher's tumor
            predictions (a random network marks 20-90 % of a volume as tumor) are targets from the
            first iteration, and the student can settle on them.
        oracle_key: an upper bound for ablations, not a training method: the batch key of a
            complete tumor label (e.g. a synthetic cohort's hidden truth, augmented with the image)
            that stands in for the teacher's prediction in the extra target (still corrected with
            the annotation); ``None`` (default): the teacher's prediction, as the paper.
        *args, **kwargs: as ``monai.engines.SupervisedTrainer``; ``loss_function`` is a
            :class:`stmt_monai.training.losses.WeightedStreamsLoss` with weights for ``"labelled"`` and
            ``"cpl"`` (``TUMOR_STREAM_WEIGHTS``), called as ``loss(pred, {"labelled": label,
            "cpl": corrected_teacher_label})``. With a ``"cpl"`` weight of 0 (lambda = 0) the teacher
            pass is skipped and the loss gets the annotation only: plain supervised training (FST),
            the paper's baseline, with the same bundle.

    The iteration output also holds ``loss_labelled`` and ``loss_cpl`` (the unweighted terms) and
    ``lambda_cpl`` (the weight used this iteration).
    """

    def __init__(self, *args, teacher: torch.nn.Module, lambda_rampup_epochs: float = 0.0, oracle_key: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.lambda_rampup_epochs = float(lambda_rampup_epochs)
        self.oracle_key = oracle_key

    @torch.no_grad()
    def teacher_pseudo_label(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The teacher's argmax on ``image``, corrected with the tumor annotation ``label``."""
        self.teacher.eval()
        logits = self.inferer(image, self.teacher)
        return correct_tumor_pseudo_label(logits.argmax(1, keepdim=True).to(label.dtype), label)

    @property
    def uses_teacher(self) -> bool:
        """False when the loss gives the teacher's target no weight (lambda = 0: FST)."""
        return float(getattr(self.loss_function, "weights", {}).get(CPL, 1.0)) > 0.0

    def rampup(self) -> float:
        """Factor of lambda at the current iteration: ramp-up over (fractional) epochs done."""
        epochs_done = (self.state.iteration - 1) / max(int(self.state.epoch_length or 1), 1)
        return sigmoid_rampup(epochs_done, self.lambda_rampup_epochs)

    def _iteration(self, engine, batchdata):
        loss_function = engine.loss_function
        weights = getattr(loss_function, "weights", None)
        lambda_cpl = 0.0
        if not self.uses_teacher:
            engine.loss_function = lambda pred, label: loss_function(pred, {LABELLED: label})
        else:
            image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
            if self.oracle_key is not None:
                oracle = batchdata[self.oracle_key].to(device=label.device, dtype=label.dtype)
                pseudo_label = correct_tumor_pseudo_label(oracle, label)
            else:
                pseudo_label = self.teacher_pseudo_label(image, label)
            engine.loss_function = lambda pred, label: loss_function(pred, {LABELLED: label, CPL: pseudo_label})
            lambda_cpl = float(weights[CPL]) if weights is not None else 1.0
            if weights is not None and self.lambda_rampup_epochs > 0:
                lambda_cpl *= self.rampup()
                loss_function.weights = {**weights, CPL: lambda_cpl}  # this iteration only
        try:
            output = super()._iteration(engine, batchdata)
        finally:
            engine.loss_function = loss_function
            if weights is not None:
                loss_function.weights = weights
        # the unweighted terms L_tl, L_cpl of eq. (2) and this iteration's lambda, for logging
        extra = {f"loss_{name}": value for name, value in getattr(loss_function, "last_terms", {}).items()}
        extra["lambda_cpl"] = lambda_cpl
        for item in output if isinstance(output, list) else [output]:
            item.update(extra)
        return output
