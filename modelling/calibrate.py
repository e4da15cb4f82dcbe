"""Calibration: temperature scaling (with an intercept), fitted on held-out patients, and the metrics that judge it.

Temperature scaling divides the logit by one scalar T > 0 chosen to minimise held-out log-loss; the
shipped models also fit an intercept b (``sigmoid(logit / T + b)``, i.e. Platt scaling on the logit). Neither
changes the ranking (AUROC is untouched), only how confident the probabilities are and where their
base rate sits, which is what a clinician reads in the RiskAssessment.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.metrics import average_precision_score, roc_auc_score

ECE_BINS = 10  # equal-width bins on [0, 1], the usual definition (Guo et al. 2017)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy computed from logits (stable for large |logit|)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] minimising log-loss of sigmoid(logits / T); searched on log T."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0 or y.min() == y.max():
        raise ValueError("temperature needs a validation split with both outcomes present")
    result = minimize_scalar(
        lambda log_t: log_loss(z / np.exp(log_t), y),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def fit_temperature_and_bias(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(T, b) minimising log-loss of sigmoid(logits / T + b): temperature scaling plus an intercept.

    Temperature alone rescales confidence around logit 0; it cannot move the predicted base rate, and a
    model whose early stopping or modality dropout left its mean prediction a few points off the event
    rate stays that far off after it (MODEL_CARD.md, "Calibration"). The intercept fixes that; ranking
    (AUROC) is still untouched as long as T > 0."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0 or y.min() == y.max():
        raise ValueError("calibration needs a split with both outcomes present")
    result = minimize(
        lambda w: log_loss(z * np.exp(-w[0]) + w[1], y),
        x0=np.zeros(2),
        method="L-BFGS-B",
        bounds=[(np.log(0.05), np.log(20.0)), (-5.0, 5.0)],
    )
    return float(np.exp(result.x[0])), float(result.x[1])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Weighted mean |observed rate - mean predicted| over equal-width probability bins."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(ece)


def reliability_curve(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: (mean predicted, observed rate, count), for the reliability diagram."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    keep = [b for b in range(n_bins) if (bins == b).any()]
    mean_p = np.array([p[bins == b].mean() for b in keep])
    rate = np.array([y[bins == b].mean() for b in keep])
    count = np.array([(bins == b).sum() for b in keep])
    return mean_p, rate, count


def binary_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC, Brier score and ECE of probabilities against 0/1 outcomes."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    return {
        "auroc": float(roc_auc_score(y, p)),
        "auprc": float(average_precision_score(y, p)),
        "brier": float(np.mean((p - y) ** 2)),
        "ece": expected_calibration_error(p, y),
    }


def fit_site_calibration(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(T, b) for one site: ``fit_temperature_and_bias`` on the shipped model's calibrated logits of that site's
    patients, so that ``sigmoid(logit / T + b)`` is calibrated there (the form ``inference.runtime.site`` applies).

    T > 0 keeps the ranking (AUROC) as it was; b moves the predicted base rate to the site's event rate, T
    undoes over- or under-confidence there. Both outcomes must be present."""
    return fit_temperature_and_bias(logits, labels)
