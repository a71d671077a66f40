"""The training objectives of StMt: Dice + cross-entropy per stream of training data, weighted.

Paper section 2.2 (Fig. 2a, 2b):

- organs, eq. (1): every batch holds fully labelled, corrected-pseudo-labelled (CPL) and
  pseudo-labelled (PL) cases in equal proportions; the loss is computed separately on each
  kind and summed with weights, ``L_o = L_ol + lambda1 * L_cpl + lambda2 * L_pl``;
- tumor, eq. (2): every case is tumor annotated and has two targets, its annotation and the
  EMA teacher's prediction corrected with that annotation, ``L_t = L_tl + lambda * L_cpl``;
- every term is Dice + cross-entropy (:func:`dice_ce_loss`); beyond the paper, the mean teacher's
  term can instead be the original mean teacher's consistency, the squared difference between
  the student's and the teacher's probabilities (:class:`SoftTargetMSELoss`, :func:`consistency_losses`).

:class:`WeightedStreamsLoss` covers both: per-item stream names (eq. 1) or one target per
stream for the whole batch (eq. 2). It keeps the unweighted terms of its last call in
``last_terms`` so a handler can log ``L_ol``, ``L_cpl``, ``L_pl`` separately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from monai.losses import DiceCELoss

#: names of the streams of training data (paper Fig. 2): annotated cases, cases whose pseudo
#: label was corrected with their partial annotation, cases with a plain pseudo label
LABELLED, CPL, PL = "labelled", "cpl", "pl"


STREAMS = (LABELLED, CPL, PL)


#: paper eq. (1), section 3.2: L_o = L_ol + lambda1 * L_cpl + lambda2 * L_pl, lambda1 = 1, lambda2 = 0.5
ORGAN_STREAM_WEIGHTS: MappingProxyType = MappingProxyType({LABELLED: 1.0, CPL: 1.0, PL: 0.5})


#: paper eq. (2), section 3.2: L_t = L_tl + lambda * L_cpl, lambda = 1 (no unlabelled data for tumors)
TUMOR_STREAM_WEIGHTS: MappingProxyType = MappingProxyType({LABELLED: 1.0, CPL: 1.0})


def dice_ce_loss(**kwargs) -> DiceCELoss:
    """Dice + cross-entropy on logits and a label map, every loss term of the paper.

    MONAI's :class:`~monai.losses.DiceCELoss` with ``to_onehot_y=True, softmax=True`` and its
    other defaults (per-case Dice, ``batch=False``; background included; smoothing 1e-5; Dice
    and CE weighted 1:1), as nnU-Net's Dice + CE.

    Args:
        kwargs: overrides of any :class:`~monai.losses.DiceCELoss` argument, e.g.
            ``include_background=False`` or ``batch=True``.

    Returns:
        The loss: ``loss(logits (B, C, *spatial), label (B, 1, *spatial)) -> scalar``.
    """
    options = {"to_onehot_y": True, "softmax": True}
    options.update(kwargs)
    return DiceCELoss(**options)


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum(weights[name] * terms[name])`` over the terms present.

    Args:
        terms: unweighted loss terms by stream name; a stream left out contributes 0.
        weights: weight of every stream name that may appear in ``terms``.

    Returns:
        The weighted sum, a scalar tensor.

    Raises:
        ValueError: ``terms`` is empty.
        KeyError: a term has no weight.
    """
    if not terms:
        raise ValueError("no loss terms to sum")
    unknown = [name for name in terms if name not in weights]
    if unknown:
        raise KeyError(f"loss terms {unknown} have no weight; weights are given for {list(weights)}")
    return sum(float(weights[name]) * term for name, term in terms.items())  # type: ignore[return-value]


class SoftTargetMSELoss(torch.nn.Module):
    """Squared difference between the student's softmax and a probability target, averaged over
    classes and voxels: the consistency term of the original mean teacher (Tarvainen and Valpola
    2017; in 3D segmentation, Yu et al. 2019).

    Args:
        logits: ``(B, C, *spatial)`` network output.
        target: ``(B, C, *spatial)`` class probabilities, or ``(B, 1, *spatial)`` the foreground
            probability of a two-class output (background is ``1 - p``).

    Returns:
        ``mean((softmax(logits) - target)^2)``, a scalar.
    """

    #: the target is a probability map, not a label map (:class:`stmt_monai.training.engines.MeanTeacherTrainer`
    #: hands it the teacher's probabilities only when its ``cpl`` loss says so)
    soft_target = True

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        target = target.float()
        if target.shape[1] == 1 and probs.shape[1] == 2:
            target = torch.cat([1.0 - target, target], dim=1)
        if target.shape != probs.shape:
            raise ValueError(f"target of shape {tuple(target.shape)} for logits of shape {tuple(logits.shape)}")
        return torch.nn.functional.mse_loss(probs, target)


#: what the mean teacher's extra target is (``teacher_target`` of the tumor bundle):
#: ``"hard"`` the teacher's thresholded tumor, corrected, under Dice + CE (paper eq. (2));
#: ``"soft"`` the teacher's tumor probability, corrected, under :class:`SoftTargetMSELoss`
TEACHER_TARGETS = ("hard", "soft")


def check_teacher_target(teacher_target: str) -> str:
    """``teacher_target`` itself if it is one of :data:`TEACHER_TARGETS`.

    Raises:
        ValueError: it is not.
    """
    if teacher_target not in TEACHER_TARGETS:
        raise ValueError(f"teacher_target must be one of {TEACHER_TARGETS}, got {teacher_target!r}")
    return teacher_target


def consistency_losses(teacher_target: str = "hard") -> dict[str, torch.nn.Module]:
    """The per-stream losses of :class:`WeightedStreamsLoss` for the tumor bundle's ``teacher_target``.

    Args:
        teacher_target: ``"hard"`` (the paper): ``{}``, every term Dice + CE; ``"soft"``: the
            ``cpl`` term is :class:`SoftTargetMSELoss` on the teacher's probabilities.

    Raises:
        ValueError: not one of :data:`TEACHER_TARGETS`.
    """
    return {CPL: SoftTargetMSELoss()} if check_teacher_target(teacher_target) == "soft" else {}


class WeightedStreamsLoss(torch.nn.Module):
    """Weighted sum of a base loss computed separately per stream of training data.

    Two ways to call it:

    - **per-item streams** (organs, eq. 1): ``loss(logits, target, stream)``; ``stream`` names
      the stream of each batch item (a list of names as MONAI's collate makes of a string
      field, a single name for the whole batch, or a LongTensor / list of indices into
      :attr:`streams`). The base loss is computed on the items of each stream present and the
      terms are summed with their weights; a stream absent from the batch contributes 0.
    - **one target per stream** (mean teacher, eq. 2): ``loss(logits, {"labelled": y, "cpl":
      y_teacher})``; every target covers the whole batch (the same images), each gives one term.

    Args:
        weights: weight of every stream, e.g. :data:`ORGAN_STREAM_WEIGHTS`; its key order is the
            order of :attr:`streams` (what integer stream indices refer to).
        base_loss: loss of one stream, ``base_loss(logits, target) -> scalar``; default
            :func:`dice_ce_loss`.
        stream_losses: a different loss for some streams (e.g. :func:`consistency_losses`);
            the others use ``base_loss``.

    Attributes:
        streams: the stream names, in the order of ``weights``.
        last_terms: unweighted term of every stream present in the last call, as floats
            (``{"labelled": L_ol, "cpl": L_cpl, "pl": L_pl}``), for logging.
    """

    def __init__(
        self,
        weights: Mapping[str, float] = ORGAN_STREAM_WEIGHTS,
        base_loss: torch.nn.Module | None = None,
        stream_losses: Mapping[str, torch.nn.Module] | None = None,
    ):
        super().__init__()
        if not weights:
            raise ValueError("weights must name at least one stream")
        if any(float(w) < 0 for w in weights.values()):
            raise ValueError(f"stream weights must be >= 0, got {dict(weights)}")
        self.weights: dict[str, float] = {str(name): float(w) for name, w in weights.items()}
        self.streams: tuple[str, ...] = tuple(self.weights)
        self.base_loss = dice_ce_loss() if base_loss is None else base_loss
        unknown = sorted(set(stream_losses or {}) - set(self.streams))
        if unknown:
            raise ValueError(f"losses given for unknown streams {unknown}: the loss has weights for {self.streams}")
        self.stream_losses = torch.nn.ModuleDict(dict(stream_losses or {}))
        self.last_terms: dict[str, float] = {}

    def loss_of(self, stream: str) -> torch.nn.Module:
        """The loss that computes ``stream``'s term: its own from ``stream_losses``, else ``base_loss``."""
        return self.stream_losses[stream] if stream in self.stream_losses else self.base_loss

    def stream_names(self, stream: str | Sequence[str] | Sequence[int] | torch.Tensor, batch_size: int) -> list[str]:
        """The stream name of each of ``batch_size`` items, from any accepted ``stream`` form.

        Raises:
            ValueError: wrong length, or a name / index that is not one of :attr:`streams`.
        """
        if isinstance(stream, str):
            names = [stream] * batch_size
        else:
            if isinstance(stream, torch.Tensor):
                stream = stream.reshape(-1).tolist()
            names = []
            for s in stream:
                if isinstance(s, str):
                    names.append(s)
                elif 0 <= int(s) < len(self.streams):
                    names.append(self.streams[int(s)])
                else:
                    raise ValueError(f"stream index {s} out of range for streams {self.streams}")
        if len(names) != batch_size:
            raise ValueError(f"got {len(names)} stream labels for a batch of {batch_size}")
        unknown = sorted(set(names) - set(self.streams))
        if unknown:
            raise ValueError(f"unknown streams {unknown}: the loss has weights for {self.streams}")
        return names

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor | Mapping[str, torch.Tensor],
        stream: str | Sequence[str] | Sequence[int] | torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of a batch.

        Args:
            logits: network output, ``(B, C, *spatial)``.
            target: label map ``(B, 1, *spatial)`` with ``stream`` given; or a dict stream name
                -> label map ``(B, 1, *spatial)`` of the whole batch, with ``stream`` left out.
            stream: stream of each item (names or indices into :attr:`streams`) or one name for
                the whole batch; only with a single ``target``.
            return_terms: also return the unweighted terms (tensors in the graph).

        Returns:
            The scalar ``sum(weights[s] * loss_of(s)(items of s))``; with ``return_terms``, the
            pair ``(loss, {stream: term})`` over the streams present.
        """
        if isinstance(target, Mapping):
            if stream is not None:
                raise ValueError("give either per-stream targets or per-item stream labels, not both")
            unknown = sorted(set(target) - set(self.streams))
            if unknown:
                raise ValueError(f"unknown streams {unknown}: the loss has weights for {self.streams}")
            terms = {name: self.loss_of(name)(logits, target[name]) for name in self.streams if name in target}
        else:
            if stream is None:
                raise ValueError("a single target needs the stream of each batch item")
            names = self.stream_names(stream, logits.shape[0])
            terms = {}
            for name in self.streams:
                items = [i for i, n in enumerate(names) if n == name]
                if not items:
                    continue  # absent stream: contributes 0
                if len(items) == len(names):
                    terms[name] = self.loss_of(name)(logits, target)
                else:
                    index = torch.as_tensor(items)
                    terms[name] = self.loss_of(name)(
                        logits.index_select(0, index.to(logits.device)), target.index_select(0, index.to(target.device))
                    )
        total = weighted_sum(terms, self.weights)
        self.last_terms = {name: float(term.detach()) for name, term in terms.items()}
        return (total, terms) if return_terms else total
