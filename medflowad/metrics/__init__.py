"""Detection metrics with in-distribution as negatives and anomalies as positives (higher score = anomalous)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _labels_and_scores(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores_in, scores_out = np.asarray(scores_in, float).ravel(), np.asarray(scores_out, float).ravel()
    if len(scores_in) == 0 or len(scores_out) == 0:
        raise ValueError("need at least one in-distribution and one anomalous score")
    scores = np.concatenate([scores_in, scores_out])
    if not np.isfinite(scores).all():
        raise ValueError(f"{(~np.isfinite(scores)).sum()} non-finite scores; cannot compute metrics")
    labels = np.concatenate([np.zeros(len(scores_in)), np.ones(len(scores_out))])
    return labels, scores


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    labels, scores = _labels_and_scores(scores_in, scores_out)
    return float(roc_auc_score(labels, scores))


def aupr(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Average precision with anomalies as the positive class."""
    labels, scores = _labels_and_scores(scores_in, scores_out)
    return float(average_precision_score(labels, scores))


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr: float = 0.95) -> float:
    """Share of in-distribution samples flagged at the lowest threshold that catches ``tpr`` of anomalies."""
    labels, scores = _labels_and_scores(scores_in, scores_out)
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(fprs[np.searchsorted(tprs, tpr, side="left")])


def detection_metrics(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
    return {
        "auroc": auroc(scores_in, scores_out),
        "aupr": aupr(scores_in, scores_out),
        "fpr95": fpr_at_tpr(scores_in, scores_out, 0.95),
    }


def stratified_auroc(labels: np.ndarray, scores: np.ndarray, strata: np.ndarray) -> float:
    """AUROC over the (positive, negative) pairs that share a stratum only.

    P(score_pos > score_neg) + 0.5 P(tie) over those pairs: the AUROC of each stratum weighted by its number of
    pairs. A score that merely tracks the stratifying variable gets about 0.5. NaN when no stratum holds both
    classes.
    """
    labels, scores, strata = np.asarray(labels, bool), np.asarray(scores, float), np.asarray(strata)
    weighted, pairs = 0.0, 0
    for stratum in np.unique(strata):
        member = strata == stratum
        positives, negatives = int(labels[member].sum()), int((~labels[member]).sum())
        if positives and negatives:
            weighted += roc_auc_score(labels[member], scores[member]) * positives * negatives
            pairs += positives * negatives
    return weighted / pairs if pairs else float("nan")


__all__ = ["aupr", "auroc", "detection_metrics", "fpr_at_tpr", "stratified_auroc"]
