"""Tests of stmt_monai.training.losses: the weighted per-stream objective of the paper's eq. (1) and (2)."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from stmt_monai.training.losses import (
    CPL,
    LABELLED,
    ORGAN_STREAM_WEIGHTS,
    PL,
    TUMOR_STREAM_WEIGHTS,
    SoftTargetMSELoss,
    WeightedStreamsLoss,
    consistency_losses,
    dice_ce_loss,
    weighted_sum,
)

NUM_CLASSES = 4


@pytest.fixture
def batch():
    """Logits and label maps of 3 items, (3, 4, 6, 6, 6) and (3, 1, 6, 6, 6)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, NUM_CLASSES, 6, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, NUM_CLASSES, (3, 1, 6, 6, 6), generator=g).double()
    return logits, target


def test_weights_are_the_papers():
    assert dict(ORGAN_STREAM_WEIGHTS) == {"labelled": 1.0, "cpl": 1.0, "pl": 0.5}
    assert dict(TUMOR_STREAM_WEIGHTS) == {"labelled": 1.0, "cpl": 1.0}
    assert (LABELLED, CPL, PL) == ("labelled", "cpl", "pl")


def test_dice_ce_defaults_and_overrides():
    loss = dice_ce_loss()
    assert isinstance(loss, DiceCELoss)
    assert loss.dice.to_onehot_y and loss.dice.softmax and not loss.dice.batch
    assert loss.dice.include_background
    assert not dice_ce_loss(include_background=False).dice.include_background
    # a perfect, confident prediction has a loss near 0
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2] = 1
    logits = torch.cat([(1 - target) * 50, target * 50], dim=1)
    assert float(loss(logits, target)) < 1e-4


def test_three_streams_equal_manual_sum(batch):
    logits, target = batch
    base = dice_ce_loss()
    loss = WeightedStreamsLoss(ORGAN_STREAM_WEIGHTS)
    expected = (
        base(logits[0:1], target[0:1]) + 1.0 * base(logits[1:2], target[1:2]) + 0.5 * base(logits[2:3], target[2:3])
    )
    total, terms = loss(logits, target, [LABELLED, CPL, PL], return_terms=True)
    assert float(total) == pytest.approx(float(expected), abs=1e-6)
    assert float(total) == pytest.approx(6.0912, abs=1e-3)  # the number itself, so the base loss cannot drift
    for i, name in enumerate((LABELLED, CPL, PL)):
        manual = float(base(logits[i : i + 1], target[i : i + 1]))
        assert float(terms[name]) == pytest.approx(manual, abs=1e-6)
        assert loss.last_terms[name] == pytest.approx(manual, abs=1e-6)
    # the same batch labelled by stream indices (into loss.streams) gives the same loss
    by_index = loss(logits, target, torch.tensor([0, 1, 2]))
    assert float(by_index) == pytest.approx(float(expected), abs=1e-12)


def test_items_of_one_stream_are_pooled(batch):
    logits, target = batch
    base = dice_ce_loss()
    loss = WeightedStreamsLoss(ORGAN_STREAM_WEIGHTS)
    total = loss(logits, target, [PL, LABELLED, PL])
    expected = base(logits[1:2], target[1:2]) + 0.5 * base(logits[[0, 2]], target[[0, 2]])
    assert float(total) == pytest.approx(float(expected), abs=1e-6)
    assert set(loss.last_terms) == {LABELLED, PL}  # CPL absent: no term, contributes 0


def test_missing_stream_contributes_zero(batch):
    logits, target = batch
    base = dice_ce_loss()
    loss = WeightedStreamsLoss(ORGAN_STREAM_WEIGHTS)
    total = loss(logits[:2], target[:2], [CPL, CPL])
    assert float(total) == pytest.approx(float(base(logits[:2], target[:2])), abs=1e-6)
    assert loss.last_terms == {CPL: pytest.approx(float(total), abs=1e-9)}
    only_pl = loss(logits[2:], target[2:], PL)  # one name for the whole batch
    assert float(only_pl) == pytest.approx(0.5 * float(base(logits[2:], target[2:])), abs=1e-6)


def test_gradient_flows_to_every_stream(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    WeightedStreamsLoss(ORGAN_STREAM_WEIGHTS)(logits, target, [LABELLED, CPL, PL]).backward()
    assert all(logits.grad[i].abs().sum() > 0 for i in range(3))


def test_mean_teacher_targets_dict(batch):
    """Eq. (2): the annotation and the corrected teacher prediction, both for the whole batch."""
    logits, target = batch
    teacher_target = torch.roll(target, shifts=1, dims=-1)
    base = dice_ce_loss()
    loss = WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS)
    total, terms = loss(logits, {LABELLED: target, CPL: teacher_target}, return_terms=True)
    expected = base(logits, target) + 1.0 * base(logits, teacher_target)
    assert float(total) == pytest.approx(float(expected), abs=1e-6)
    assert float(terms[CPL]) == pytest.approx(float(base(logits, teacher_target)), abs=1e-6)
    assert set(loss.last_terms) == {LABELLED, CPL}
    # the same through weighted_sum
    assert float(weighted_sum(terms, TUMOR_STREAM_WEIGHTS)) == pytest.approx(float(expected), abs=1e-12)


def test_weighted_sum():
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(4.0)}
    assert float(weighted_sum(terms, {"a": 1.0, "b": 0.5, "c": 3.0})) == pytest.approx(4.0)
    with pytest.raises(KeyError):
        weighted_sum(terms, {"a": 1.0})
    with pytest.raises(ValueError):
        weighted_sum({}, {"a": 1.0})


def test_bad_stream_labels(batch):
    logits, target = batch
    loss = WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS)
    with pytest.raises(ValueError, match="unknown streams"):
        loss(logits, target, [LABELLED, CPL, PL])  # no PL weight in the tumor objective
    with pytest.raises(ValueError, match="stream labels for a batch of 3"):
        loss(logits, target, [LABELLED, CPL])
    with pytest.raises(ValueError, match="out of range"):
        loss(logits, target, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="needs the stream"):
        loss(logits, target)
    with pytest.raises(ValueError, match="not both"):
        loss(logits, {LABELLED: target}, [LABELLED] * 3)
    with pytest.raises(ValueError, match="unknown streams"):
        loss(logits, {PL: target})
    with pytest.raises(ValueError):
        WeightedStreamsLoss({})


def test_soft_target_mse_is_the_squared_difference_of_probabilities():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 4, 4, 4, generator=g, requires_grad=True)
    p = torch.rand(2, 1, 4, 4, 4, generator=g)  # the teacher's tumor probability
    probs = torch.softmax(logits, dim=1)
    expected = ((probs[:, :1] - (1 - p)) ** 2 + (probs[:, 1:] - p) ** 2).sum() / probs.numel()
    loss = SoftTargetMSELoss()(logits, p)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # a full (B, C) probability target gives the same; the student's own probabilities give 0
    assert float(SoftTargetMSELoss()(logits, torch.cat([1 - p, p], dim=1))) == pytest.approx(float(expected), rel=1e-6)
    assert float(SoftTargetMSELoss()(logits, probs[:, 1:].detach())) == pytest.approx(0.0, abs=1e-12)
    loss.backward()  # the gradient moves the student's tumor probability toward the target's
    assert bool(((logits.grad[:, 1:] > 0) == (probs[:, 1:] > p)).all())
    with pytest.raises(ValueError, match="target of shape"):
        SoftTargetMSELoss()(torch.randn(1, 3, 4, 4, 4), torch.rand(1, 1, 4, 4, 4))


def test_stream_losses_replace_the_base_loss_of_their_stream_only():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 6, 6, 6, generator=g)
    label = (torch.rand(2, 1, 6, 6, 6, generator=g) > 0.8).float()
    p = torch.rand(2, 1, 6, 6, 6, generator=g)
    loss = WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS, stream_losses=consistency_losses("soft"))
    assert isinstance(loss.loss_of(CPL), SoftTargetMSELoss) and loss.loss_of(LABELLED) is loss.base_loss
    total, terms = loss(logits, {LABELLED: label, CPL: p}, return_terms=True)
    assert float(terms[LABELLED]) == pytest.approx(float(dice_ce_loss()(logits, label)), rel=1e-6)
    assert float(terms[CPL]) == pytest.approx(float(SoftTargetMSELoss()(logits, p)), rel=1e-6)
    assert float(total) == pytest.approx(float(terms[LABELLED] + terms[CPL]), rel=1e-6)
    # the paper's target: no stream loss of its own, Dice + CE everywhere
    assert consistency_losses("hard") == {} and consistency_losses() == {}
    hard = WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS, stream_losses=consistency_losses("hard"))
    assert hard.loss_of(CPL) is hard.base_loss and isinstance(hard.base_loss, DiceCELoss)
    with pytest.raises(ValueError, match="teacher_target"):
        consistency_losses("mse")
    with pytest.raises(ValueError, match="unknown streams"):
        WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS, stream_losses={PL: SoftTargetMSELoss()})
