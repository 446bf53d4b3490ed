"""The in-batch sampled softmax with logQ correction, against values worked out by hand,
and the streaming frequency estimator against its recurrence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.loss import StreamingFrequencyEstimator, in_batch_softmax_loss

LOGITS = [[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]]
Q = [0.5, 0.25, 0.125]  # sampling probability of each column's item


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_plain_in_batch_softmax_is_mean_cross_entropy_on_the_diagonal():
    # row b: -log softmax(row b)[b]
    expected = ((lse(1, 0, 2) - 1) + (lse(0.5, 1, 0) - 1) + (lse(0, 0, 3) - 3)) / 3
    loss = in_batch_softmax_loss(torch.tensor(LOGITS), torch.tensor([7, 8, 9]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_logq_correction_subtracts_log_q_of_each_column():
    lq = [math.log(q) for q in Q]
    c = [[LOGITS[r][j] - lq[j] for j in range(3)] for r in range(3)]
    expected = sum(lse(*c[r]) - c[r][r] for r in range(3)) / 3
    # by hand: columns shift by -log q = +0.6931, +1.3863, +2.0794
    rows = [(1.6931, 1.3863, 4.0794), (1.1931, 2.3863, 2.0794), (0.6931, 1.3863, 5.0794)]
    assert expected == pytest.approx(sum(lse(*r) - r[i] for i, r in enumerate(rows)) / 3, abs=1e-3)
    loss = in_batch_softmax_loss(torch.tensor(LOGITS), torch.tensor([7, 8, 9]), torch.log(torch.tensor(Q)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_in_batch_duplicate_of_the_positive_is_not_a_negative():
    # rows 0 and 2 share item 7: row 0 ignores column 2 and row 2 ignores column 0
    expected = ((lse(1, 0) - 1) + (lse(0.5, 1, 0) - 1) + (lse(0, 3) - 3)) / 3
    loss = in_batch_softmax_loss(torch.tensor(LOGITS), torch.tensor([7, 8, 7]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_duplicate_masking_and_logq_together():
    lq = [math.log(q) for q in Q]
    c = [[LOGITS[r][j] - lq[j] for j in range(3)] for r in range(3)]
    expected = ((lse(c[0][0], c[0][1]) - c[0][0]) + (lse(*c[1]) - c[1][1]) + (lse(c[2][1], c[2][2]) - c[2][2])) / 3
    loss = in_batch_softmax_loss(torch.tensor(LOGITS), torch.tensor([7, 8, 7]), torch.log(torch.tensor(Q)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_example_weights_give_a_weighted_mean():
    per_row = [lse(1, 0, 2) - 1, lse(0.5, 1, 0) - 1, lse(0, 0, 3) - 3]
    w = [2.0, 1.0, 0.0]
    expected = (2 * per_row[0] + per_row[1]) / 3
    loss = in_batch_softmax_loss(torch.tensor(LOGITS), torch.tensor([7, 8, 9]), weights=torch.tensor(w))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert sum(w[i] * per_row[i] for i in range(3)) / sum(w) == pytest.approx(expected)


def test_gradient_reaches_only_unmasked_logits():
    logits = torch.tensor(LOGITS, requires_grad=True)
    in_batch_softmax_loss(logits, torch.tensor([7, 8, 7])).backward()
    assert logits.grad[0, 2].item() == 0.0 and logits.grad[2, 0].item() == 0.0
    assert logits.grad[0, 1].item() > 0.0  # a real negative is pushed down


def test_streaming_estimator_follows_the_recurrence():
    est = StreamingFrequencyEstimator(size=1024, alpha=0.5)
    for step in range(1, 13):
        items = [1] + ([2] if step % 4 == 0 else [])
        est.update(np.array(items + [1]), step)  # item 1 twice in a batch counts once
    # item 1 every step: gap 1 from the start; item 2 every 4th step: B = 4, 0.5*4 + 0.5*4, ...
    assert est.probability(np.array([1, 2])).tolist() == [1.0, 0.25]


def test_streaming_estimator_tracks_a_changed_rate():
    est = StreamingFrequencyEstimator(size=64, alpha=0.5)
    est.update(np.array([5]), 2)  # B = 2
    est.update(np.array([5]), 10)  # B = 0.5*2 + 0.5*8 = 5
    assert est.interval[est.bucket(np.array([5]))[0]] == 5.0
    assert est.probability(np.array([5]))[0] == pytest.approx(0.2)
    # an item never seen gets the smallest estimate so far, not infinity
    assert est.probability(np.array([6]))[0] == pytest.approx(0.2)


def test_streaming_estimator_rejects_bad_parameters():
    with pytest.raises(ValueError):
        StreamingFrequencyEstimator(size=0)
    with pytest.raises(ValueError):
        StreamingFrequencyEstimator(alpha=0.0)


def test_extra_sampled_negatives_are_extra_columns_and_a_copy_of_the_positive_is_masked():
    # 2 rows (positives 7, 8) and one extra negative column holding item 7
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    expected = ((lse(1, 0) - 1) + (lse(0.5, 1, 0) - 1)) / 2
    loss = in_batch_softmax_loss(logits, torch.tensor([7, 8, 7]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
