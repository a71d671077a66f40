"""The mean teacher of the tumor network (paper section 2.2, Fig. 2b, eq. (2)).

- :func:`ema_teacher`: the teacher, an exponential moving average (EMA) of the student's weights
  (ignite's ``EMAHandler``; decay :data:`EMA_DECAY`, which the paper does not give);
- :func:`correct_tumor_pseudo_label`: the real-time correction of the teacher's prediction with
  the batch's tumor annotation; the result is the target of ``L_cpl`` in eq. (2);
- :func:`sigmoid_rampup`: the optional ramp-up of lambda (not in the paper; off by default).

:class:`stmt_monai.training.engines.MeanTeacherTrainer` uses them at every iteration.
"""

from __future__ import annotations

import math

import torch


def correct_tumor_pseudo_label(teacher_labels: torch.Tensor, tumor_annotation: torch.Tensor) -> torch.Tensor:
    """Real-time correction of the mean teacher's tumor prediction (paper Fig. 2b).

    Annotated tumor voxels are tumor whatever the teacher says; elsewhere the teacher's
    prediction stands, so tumors the annotation missed stay in the extra target. (The organ
    rule would erase every teacher tumor voxel outside the annotation, i.e. turn the extra
    target into the annotation itself; for one class "correct" can only mean this union.)

    Args:
        teacher_labels: ``(B, 1, X, Y, Z)`` binary tumor labels (argmax of the teacher).
        tumor_annotation: same shape, 1 where a tumor is annotated.

    Returns:
        ``(B, 1, X, Y, Z)`` corrected pseudo label (same dtype as ``teacher_labels``).
    """
    return torch.where(tumor_annotation > 0, torch.ones_like(teacher_labels), teacher_labels)


def sigmoid_rampup(current: float, length: float) -> float:
    """The sigmoid-shaped ramp-up of semi-supervised weights (Laine and Aila 2017, used by the mean
    teacher): ``exp(-5 (1 - t)^2)`` with ``t = current / length`` clipped to ``[0, 1]``.

    Args:
        current: progress, e.g. epochs done (fractional).
        length: progress at which the ramp reaches 1; ``<= 0`` means no ramp-up (always 1).

    Returns:
        A factor in ``(0, 1]``: ``exp(-5) = 0.0067`` at the start, 1 from ``length`` on.
    """
    if length <= 0:
        return 1.0
    t = min(max(float(current) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


#: mean-teacher EMA decay of the tumor bundle (teacher = decay * teacher + (1 - decay) * student)
EMA_DECAY = 0.99


def ema_teacher(
    student: torch.nn.Module,
    decay: float = EMA_DECAY,
    warmup_iters: int = 0,
    warmup_decay: float = 0.5,
    handle_buffers: str = "copy",
):
    """The mean teacher: an exponential moving average of the student's weights (paper Fig. 2b).

    After every training iteration (``Events.ITERATION_COMPLETED``, once attached to the trainer),
    each teacher parameter becomes ``decay * teacher + (1 - decay) * student``. The teacher starts
    as a copy of the student and is in eval mode. This is ignite's
    :class:`~ignite.handlers.EMAHandler`, whose ``momentum`` is ``1 - decay``.

    Warm-up (off by default, not in the paper): a randomly initialised teacher marks large parts
    of every volume as tumor, and with ``decay`` 0.99 it takes a few hundred iterations to forget
    its start. With ``warmup_iters > 0`` the decay rises linearly from ``warmup_decay`` to
    ``decay`` over the first ``warmup_iters`` iterations (EMAHandler's own momentum warm-up), so
    the teacher follows the student closely while both are untrained, as the original mean
    teacher does (Tarvainen and Valpola 2017: decay ``min(1 - 1 / (step + 1), decay)``). The
    warm-up counter is not checkpointed: a resumed run warms up again.

    Buffers are not averaged: with ``handle_buffers="copy"`` the teacher takes the student's
    buffers as they are after each step (the students' instance norm keeps no running statistics,
    so today there are none; batch-norm statistics would be copied, not averaged).

    Args:
        student: the network being trained (a ``DistributedDataParallel`` is unwrapped).
        decay: EMA decay in ``(0, 1)``; 0.99 averages over roughly the last 100 iterations.
        warmup_iters: iterations of the decay warm-up; 0 for none (the paper's plain EMA).
        warmup_decay: decay at the first iteration of the warm-up.
        handle_buffers: ``"copy"``, ``"update"`` (EMA of float buffers too) or ``"ema_train"``
            (see ``EMAHandler``).

    Returns:
        The ``EMAHandler``: attach it to the trainer (MONAI ``train_handlers``); the teacher is its
        ``ema_model``.
    """
    from ignite.handlers import EMAHandler

    for name, value in (("decay", decay), ("warmup_decay", warmup_decay)):
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"EMA {name} must be in (0, 1), got {value}")
    warmup = {}
    if int(warmup_iters) > 0:
        warmup = {"momentum_warmup": 1.0 - float(warmup_decay), "warmup_iters": int(warmup_iters)}
    return EMAHandler(student, momentum=1.0 - float(decay), handle_buffers=handle_buffers, **warmup)


def attach_teacher(ema, trainer) -> None:
    """Attach the mean teacher (:func:`ema_teacher`) to ``trainer``.

    At the start of a run the teacher takes the student's weights, then follows eq. (2) after
    every iteration. A run that starts from loaded weights (MONAI Label's ``pretrained``, whose
    loader runs first) so averages from them rather than from the random initialisation; a
    resumed run's checkpoint (:class:`stmt_monai.training.handlers.ResumableCheckpoint`, attached
    after this) then restores the teacher it had.

    Args:
        ema: the ``EMAHandler`` of :func:`ema_teacher`.
        trainer: the training engine (:class:`stmt_monai.training.engines.MeanTeacherTrainer`).
    """
    from ignite.engine import Events

    def start_from_student(_engine) -> None:
        ema.ema_model.load_state_dict(ema.model.state_dict())

    trainer.add_event_handler(Events.STARTED, start_from_student)
    ema.attach(trainer)


def inference_network(student: torch.nn.Module, teacher: torch.nn.Module, which: str = "teacher") -> torch.nn.Module:
    """The network a tumor bundle serves and saves as ``models/model.pt``: the EMA ``teacher``
    (the paper's) or the ``student`` (FST, ``lambda = 0``).

    Raises:
        ValueError: ``which`` is neither.
    """
    if which not in ("student", "teacher"):
        raise ValueError(f"inference_network must be 'student' or 'teacher', got {which!r}")
    return teacher if which == "teacher" else student
