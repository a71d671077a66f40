"""Training engines of StMt: MONAI's ``SupervisedTrainer`` with the paper's two objectives.

- :class:`SelfTrainingTrainer`: the student of self-training (stage 1 and organs). Each batch
  mixes fully labelled, CPL and PL cases; the loss sees each item's stream, eq. (1):
  ``L_o = L_ol + lambda1 L_cpl + lambda2 L_pl``.
- :class:`MeanTeacherTrainer`: the tumor student. At every iteration the EMA teacher predicts
  the batch (no gradient), the prediction is corrected in real time with the batch's tumor
  annotation, and becomes an extra target, eq. (2): ``L_t = L_tl + lambda L_cpl``. The
  teacher's weights follow the student by ignite's ``EMAHandler``.

Both only wrap ``SupervisedTrainer._iteration`` (device handling, AMP, gradient accumulation
and events stay MONAI's) by handing the extra information to the loss for one iteration. On a CPU
with bfloat16 support (AVX512-BF16 or AMX), ``cpu_bf16=True`` runs the network's forward pass
under ``torch.autocast("cpu", torch.bfloat16)`` (MONAI's ``amp`` is CUDA's fp16 autocast): the
3D convolutions of a 40^3 student train ~1.7x faster on an AVX512-BF16 CPU (measured here); the
loss is computed in float32.
"""

from __future__ import annotations

import functools

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys

from stmt_monai.training.losses import CPL, LABELLED, check_teacher_target
from stmt_monai.training.mean_teacher import correct_tumor_pseudo_label, sigmoid_rampup


class Bf16Forward(torch.nn.Module):
    """A network whose forward pass runs under CPU bfloat16 autocast, returning float32 logits.

    Holds no weights of its own (``module`` is the trained network), so optimiser, checkpoints and
    the EMA teacher keep referring to ``module``.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        return out.float() if torch.is_tensor(out) else out


class _CpuBf16:
    """Mixin: ``cpu_bf16`` runs ``engine.network`` as :class:`Bf16Forward` during the iteration."""

    def _init_bf16(self, cpu_bf16: bool) -> None:
        self.cpu_bf16 = bool(cpu_bf16)
        if self.cpu_bf16 and torch.device(self.state.device).type != "cpu":
            raise ValueError("cpu_bf16 is for CPU training; on CUDA use amp")

    def _bf16_iteration(self, engine, batchdata):
        if not self.cpu_bf16:
            return SupervisedTrainer._iteration(self, engine, batchdata)
        network = engine.network
        engine.network = Bf16Forward(network)
        try:
            return SupervisedTrainer._iteration(self, engine, batchdata)
        finally:
            engine.network = network


class TeacherTrainer(_CpuBf16, SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` with ``cpu_bf16`` (:class:`Bf16Forward`): the self-training
    teacher's trainer (self-training step 1: plain supervised training on the fully labelled cases).

    Args:
        cpu_bf16: forward pass under CPU bfloat16 autocast.
        *args, **kwargs: as ``monai.engines.SupervisedTrainer``.
    """

    def __init__(self, *args, cpu_bf16: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_bf16(cpu_bf16)

    def _iteration(self, engine, batchdata):
        return self._bf16_iteration(engine, batchdata)


class SelfTrainingTrainer(_CpuBf16, SupervisedTrainer):
    """``SupervisedTrainer`` whose loss is called as ``loss(pred, label, stream=[...])``.

    The iteration output also holds the unweighted term of each stream present in the batch,
    ``loss_labelled``, ``loss_cpl``, ``loss_pl`` (``WeightedStreamsLoss.last_terms``), which
    :func:`stmt_monai.training.handlers.loss_terms` hands to the stats and TensorBoard handlers.

    Args:
        stream_key: batch key holding each item's stream name (``"labelled"``, ``"cpl"``, ``"pl"``),
            collated as a list of strings; a batch without it is fully labelled.
        cpu_bf16: forward pass under CPU bfloat16 autocast (:class:`Bf16Forward`).
        *args, **kwargs: as ``monai.engines.SupervisedTrainer``; ``loss_function`` is a
            :class:`stmt_monai.training.losses.WeightedStreamsLoss`.
    """

    def __init__(self, *args, stream_key: str = "stream", cpu_bf16: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_key = stream_key
        self._init_bf16(cpu_bf16)
        # a batch sampler (StreamBatchSampler) draws its order from the epoch number: without
        # this, every epoch would repeat the first epoch's batches (MONAI only sets the epoch of
        # a DistributedSampler)
        batch_sampler = getattr(self.data_loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: batch_sampler.set_epoch(engine.state.epoch))

    def _iteration(self, engine, batchdata):
        loss_function = engine.loss_function
        # a batch without stream tags (MONAI Label's datastore cases) is fully labelled
        streams = batchdata.get(self.stream_key) or [LABELLED] * len(batchdata[CommonKeys.IMAGE])
        engine.loss_function = functools.partial(loss_function, stream=list(streams))
        try:
            output = self._bf16_iteration(engine, batchdata)
        finally:
            engine.loss_function = loss_function
        # the unweighted terms L_ol, L_cpl, L_pl of eq. (1), for logging (handlers.loss_terms)
        terms = {f"loss_{name}": value for name, value in getattr(loss_function, "last_terms", {}).items()}
        for item in output if isinstance(output, list) else [output]:  # decollated: one dict per item
            item.update(terms)
        return output


class MeanTeacherTrainer(_CpuBf16, SupervisedTrainer):
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
        cpu_bf16: student and teacher forward passes under CPU bfloat16 autocast (:class:`Bf16Forward`).
        teacher_threshold: the teacher's tumor is where its tumor probability exceeds this (0.5: its
            argmax, the paper); a higher value keeps only its confident tumor in the extra target.
        teacher_noise_std: sd of Gaussian noise added to the teacher's input (0: the student's view,
            the paper; the original mean teacher perturbs the two views differently).
        teacher_target: ``"hard"`` (the paper): the extra target is the teacher's tumor (probability
            above ``teacher_threshold``) corrected with the annotation, a label map; ``"soft"``: the
            teacher's tumor probability corrected the same way (1 where annotated, the teacher's
            probability elsewhere), for a loss whose ``cpl`` term takes probabilities
            (:class:`stmt_monai.training.losses.SoftTargetMSELoss`, the original mean teacher's
            consistency; ``teacher_threshold`` then only counts ``teacher_tumor_pct``).
        *args, **kwargs: as ``monai.engines.SupervisedTrainer``; ``loss_function`` is a
            :class:`stmt_monai.training.losses.WeightedStreamsLoss` with weights for ``"labelled"`` and
            ``"cpl"`` (``TUMOR_STREAM_WEIGHTS``), called as ``loss(pred, {"labelled": label,
            "cpl": corrected_teacher_label})``. With a ``"cpl"`` weight of 0 (lambda = 0) the teacher
            pass is skipped and the loss gets the annotation only: plain supervised training (FST),
            the paper's baseline, with the same bundle.

    The iteration output also holds ``loss_labelled`` and ``loss_cpl`` (the unweighted terms),
    ``lambda_cpl`` (the weight used this iteration) and what the targets and the prediction hold,
    in % of the batch's voxels (:meth:`tumor_volumes`): ``annotated_tumor_pct``,
    ``student_tumor_pct`` and, when the teacher is used, ``teacher_tumor_pct`` (its tumor before
    the correction) and ``extra_target_pct`` (tumor in the corrected target beyond the
    annotation: all that eq. (2)'s second term adds to the first).
    """

    def __init__(
        self,
        *args,
        teacher: torch.nn.Module,
        lambda_rampup_epochs: float = 0.0,
        oracle_key: str | None = None,
        cpu_bf16: bool = False,
        teacher_threshold: float = 0.5,
        teacher_noise_std: float = 0.0,
        teacher_target: str = "hard",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_bf16(cpu_bf16)
        if not 0.0 <= float(teacher_threshold) < 1.0:
            raise ValueError(f"teacher_threshold must be in [0, 1), got {teacher_threshold}")
        check_teacher_target(teacher_target)
        loss_of = getattr(self.loss_function, "loss_of", None)
        soft_loss = bool(getattr(loss_of(CPL), "soft_target", False)) if loss_of is not None else False
        if soft_loss != (teacher_target == "soft"):
            raise ValueError(
                f"teacher_target={teacher_target!r} but the loss's {CPL!r} term takes "
                f"{'probabilities' if soft_loss else 'a label map'}: build the loss with "
                f"stream_losses=stmt_monai.training.losses.consistency_losses({teacher_target!r})"
            )
        self.teacher_target = teacher_target
        self.teacher_threshold, self.teacher_noise_std = float(teacher_threshold), float(teacher_noise_std)
        self.teacher = teacher
        self.lambda_rampup_epochs = float(lambda_rampup_epochs)
        self.oracle_key = oracle_key

    @torch.no_grad()
    def teacher_pseudo_label(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The teacher's tumor on ``image``, corrected with the tumor annotation ``label``.

        The teacher sees ``image`` plus Gaussian noise of sd ``teacher_noise_std`` (0: the
        student's own view); its tumor is where its softmax tumor probability exceeds
        ``teacher_threshold`` (0.5: the argmax of two classes), or with ``teacher_target="soft"``
        that probability itself (float, 1 where annotated).
        """
        self.teacher.eval()
        if self.teacher_noise_std > 0:
            image = image + self.teacher_noise_std * torch.randn_like(image)
        logits = self.inferer(image, Bf16Forward(self.teacher) if self.cpu_bf16 else self.teacher)
        probability = torch.softmax(logits.float(), dim=1)[:, 1:2]
        tumor = probability > self.teacher_threshold
        self._teacher_tumor_pct = 100.0 * float(tumor.float().mean())
        if self.teacher_target == "soft":
            return correct_tumor_pseudo_label(probability, label)
        return correct_tumor_pseudo_label(tumor.to(label.dtype), label)

    @staticmethod
    @torch.no_grad()
    def tumor_volumes(label: torch.Tensor, pred: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, float]:
        """Tumor in the iteration's annotation, the student's prediction and the extra target.

        Args:
            label: ``(B, 1, ...)`` tumor annotation of the batch.
            pred: ``(B, 2, ...)`` the student's logits.
            target: ``(B, 1, ...)`` the corrected extra target of eq. (2) (a label map, or the soft
                target's probabilities), or ``None`` (FST).

        Returns:
            ``annotated_tumor_pct``, ``student_tumor_pct`` (its argmax) and, with ``target``,
            ``extra_target_pct`` (target tumor outside the annotation; of a soft target, its
            expected volume: the sum of its probabilities there), in % of the batch's voxels.
        """
        annotated = label > 0
        volumes = {
            "annotated_tumor_pct": 100.0 * float(annotated.float().mean()),
            "student_tumor_pct": 100.0 * float((pred.argmax(dim=1, keepdim=True) == 1).float().mean()),
        }
        if target is not None:
            volumes["extra_target_pct"] = 100.0 * float((target.float() * ~annotated).mean())
        return volumes

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
        lambda_cpl, pseudo_label, self._teacher_tumor_pct = 0.0, None, None
        if not self.uses_teacher:
            engine.loss_function = lambda pred, label: loss_function(pred, {LABELLED: label})
        else:
            image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
            if self.oracle_key is not None:
                oracle = batchdata[self.oracle_key].to(device=label.device, dtype=torch.float32 if self.teacher_target == "soft" else label.dtype)
                pseudo_label = correct_tumor_pseudo_label(oracle, label)
            else:
                pseudo_label = self.teacher_pseudo_label(image, label)
            engine.loss_function = lambda pred, label: loss_function(pred, {LABELLED: label, CPL: pseudo_label})
            lambda_cpl = float(weights[CPL]) if weights is not None else 1.0
            if weights is not None and self.lambda_rampup_epochs > 0:
                lambda_cpl *= self.rampup()
                loss_function.weights = {**weights, CPL: lambda_cpl}  # this iteration only
        try:
            output = self._bf16_iteration(engine, batchdata)
        finally:
            engine.loss_function = loss_function
            if weights is not None:
                loss_function.weights = weights
        # the unweighted terms L_tl, L_cpl of eq. (2) and this iteration's lambda, for logging
        extra = {f"loss_{name}": value for name, value in getattr(loss_function, "last_terms", {}).items()}
        extra["lambda_cpl"] = lambda_cpl
        items = output if isinstance(output, list) else [output]
        # the batch's prediction and label (a decollated output: its items stacked again)
        pred, label = (torch.stack([item[key] for item in output]) if isinstance(output, list) else output[key] for key in (CommonKeys.PRED, CommonKeys.LABEL))
        extra.update(self.tumor_volumes(label, pred.detach(), pseudo_label))
        if self._teacher_tumor_pct is not None:
            extra["teacher_tumor_pct"] = self._teacher_tumor_pct
        for item in items:
            item.update(extra)
        return output
