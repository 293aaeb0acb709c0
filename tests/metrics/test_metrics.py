"""Metrics against brute-force definitions computed here without scikit-learn."""

import numpy as np
import pytest

from medflowad.metrics import aupr, auroc, detection_metrics, fpr_at_tpr, stratified_auroc


def brute_auroc(neg, pos):
    """P(score_pos > score_neg) + 0.5 P(tie), over all pairs."""
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def brute_fpr_at_tpr(neg, pos, tpr):
    """Scan every threshold from high to low; first one catching >= tpr of positives."""
    for t in np.sort(np.unique(np.concatenate([neg, pos])))[::-1]:
        if (pos >= t).mean() >= tpr:
            return (neg >= t).mean()
    return 1.0


def brute_average_precision(neg, pos):
    """Mean of precision at the rank of each positive (ties broken pessimistically)."""
    scores = np.concatenate([neg, pos])
    is_pos = np.concatenate([np.zeros(len(neg)), np.ones(len(pos))])
    total = 0.0
    for s in pos:
        flagged = scores >= s
        total += is_pos[flagged].sum() / flagged.sum()
    return total / len(pos)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    neg = np.round(rng.normal(0, 1, 200), 1)  # rounding creates ties
    pos = np.round(rng.normal(1, 1, 150), 1)
    assert auroc(neg, pos) == pytest.approx(brute_auroc(neg, pos))
    assert fpr_at_tpr(neg, pos, 0.95) == pytest.approx(brute_fpr_at_tpr(neg, pos, 0.95))
    no_ties_neg, no_ties_pos = rng.normal(0, 1, 100), rng.normal(1, 1, 80)
    assert aupr(no_ties_neg, no_ties_pos) == pytest.approx(brute_average_precision(no_ties_neg, no_ties_pos))


def test_perfect_and_inverted_separation():
    neg, pos = np.array([0.0, 1.0, 2.0]), np.array([5.0, 6.0])
    m = detection_metrics(neg, pos)
    assert m == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    assert auroc(pos, neg) == 0.0
    assert fpr_at_tpr(pos, neg) == 1.0


def test_non_finite_scores_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        auroc(np.array([0.0, np.nan]), np.array([1.0]))


def test_stratified_auroc_counts_only_pairs_within_a_stratum():
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.4
    strata = rng.integers(0, 4, 300)
    scores = np.round(rng.normal(0, 1, 300) + labels + 0.5 * strata, 1)  # ties, and a stratum effect
    wins = pairs = 0.0
    for i in np.nonzero(labels)[0]:
        for j in np.nonzero(~labels)[0]:
            if strata[i] == strata[j]:
                pairs += 1
                wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    assert stratified_auroc(labels, scores, strata) == pytest.approx(wins / pairs)


def test_stratified_auroc_of_the_stratifying_variable_is_chance():
    strata = np.repeat(np.arange(4), 50)
    labels = np.arange(200) % 50 < 10 * (strata + 1)  # positives concentrate in high strata
    assert auroc(strata[~labels], strata[labels]) > 0.7
    assert stratified_auroc(labels, strata.astype(float), strata) == 0.5
    assert np.isnan(stratified_auroc(np.zeros(50, bool), strata[:50], strata[:50]))  # no positives
