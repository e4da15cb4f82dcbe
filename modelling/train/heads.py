"""The heads fitted on frozen branches: the image concept head refitted alone, and the fusion model's logistic head.

Both read what a frozen branch computed once (``modelling.train.features``), so fitting them costs seconds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from modelling.calibrate import log_loss
from modelling.config import IMAGE_CONCEPTS
from modelling.model import PRESENCE_PATTERNS, FusionModel, concept_values
from modelling.train.features import vital_values
from modelling.train.losses import concept_loss
from modelling.train.settings import TrainSettings

log = logging.getLogger(__name__)


def refit_concept_head(
    model: FusionModel,
    pooled: np.ndarray,
    factors: np.ndarray,
    present: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    settings: TrainSettings,
) -> dict[str, float]:
    """Retrain the image branch's concept head alone, on its frozen CNN's pooled features, in place.

    Trained beside the CNN for ``cnn_epochs``, the head read lesion maps that kept changing under it and ends
    the run behind them. On the final maps, computed once (``image_pooled``: (N, n_pooled)), it is continued
    with the concept losses until the validation split's stops improving (an epoch costs milliseconds; what it
    gains: MODEL_CARD.md, "Training"). Returns the validation concept loss before and after.
    """
    branch = model.image_branch
    assert branch is not None
    head = branch.concept_head
    device = next(model.parameters()).device
    train_idx, val_idx = (rows[present[rows, 0] > 0] for rows in split)
    x = torch.from_numpy(pooled).to(device)  # (N, n_pooled)
    seen = np.ones(len(val_idx), bool)

    def val_loss() -> float:
        head.eval()
        with torch.no_grad():
            return float(concept_loss(head(x[val_idx]), factors[val_idx], IMAGE_CONCEPTS, seen).item())

    for param in head.parameters():
        param.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.concept_refit_lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(int(train_idx.sum()) % (2**32))
    before = best = val_loss()
    best_state, stale, ran = copy.deepcopy(head.state_dict()), 0, 0
    for epoch in range(1, settings.concept_refit_epochs + 1):
        ran = epoch
        head.train()
        order = rng.permutation(train_idx)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            loss = concept_loss(head(x[rows]), factors[rows], IMAGE_CONCEPTS, np.ones(len(rows), bool))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        current = val_loss()
        if current < best - 1e-5:
            best, best_state, stale = current, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= settings.concept_refit_patience:
                break
    head.load_state_dict(best_state)
    for param in head.parameters():
        param.requires_grad_(False)
    head.eval()
    log.info("image concept head refitted: validation concept loss %.4f -> %.4f (%d epochs)", before, best, ran)
    return {"val_concept_loss_before": round(before, 4), "val_concept_loss_after": round(best, 4), "epochs": ran}


#: L1 penalties (inverse strength, standardised features) ``fit_logistic_head`` chooses from by 5-fold log-loss
LOGISTIC_HEAD_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)


def fit_logistic_head(
    model: FusionModel,
    image_concepts: np.ndarray,
    inputs: Mapping[str, np.ndarray],
    outcome: np.ndarray,
    rows: np.ndarray,
    seed: int,
) -> dict[str, object]:
    """Fit ``model.logistic`` on the frozen branches' concepts of ``rows``: one L1-penalised logistic regression
    per presence pattern, every patient in every pattern its data allow (an imaged patient with vitals also
    teaches "image" with the vitals left out, and so on), the penalty chosen per pattern by 5-fold
    cross-validated log-loss from ``LOGISTIC_HEAD_CS``. Seeded (folds and solver): the same concepts and
    ``seed`` give the same head.

    Returns what was chosen, per pattern (penalty, non-zero weights, patients, events, cross-validated log-loss)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    head = model.logistic
    assert head is not None
    n = len(rows)
    demo = torch.from_numpy(inputs["demographics"][rows])
    image = concept_values(torch.from_numpy(image_concepts[rows]), IMAGE_CONCEPTS)
    vital = torch.from_numpy(
        vital_values(model, {k: inputs[k][rows] for k in ("vitals", "vitals_mask", "vitals_delta")})
    )
    has_image = inputs["image_present"][rows, 0] > 0
    has_vitals = inputs["vitals_mask"][rows].sum(axis=(1, 2)) > 0
    can = {"both": has_image & has_vitals, "image": has_image, "vitals": has_vitals, "none": np.ones(n, bool)}
    one, zero = torch.ones(n, 1), torch.zeros(n, 1)
    shown = {"both": (one, one), "image": (one, zero), "vitals": (zero, one), "none": (zero, zero)}
    y = np.asarray(outcome[rows], dtype=np.float64)
    weight = torch.zeros_like(head.linear.weight[0])  # (4 + total,)
    mean, scale = torch.zeros_like(head.mean), torch.ones_like(head.scale)
    chosen: dict[str, object] = {}
    start = 0  # where the pattern's block starts among the features; its weights follow the 4 indicators
    for k, pattern in enumerate(PRESENCE_PATTERNS):
        block = slice(start, start + head.widths[pattern])
        fi, fv = shown[pattern]
        _, raw, _ = head.features(demo, image, fi, vital, fv)  # (n, total)
        x = raw[:, block].double().numpy()[can[pattern]]
        t = y[can[pattern]]
        start = block.stop
        events = int(t.sum())
        if min(events, len(t) - events) < 5:
            # too few patients of one outcome to fit (or to cross-validate) anything: the pattern's features get no
            # weight and its intercept is the event rate (smoothed); said in the config, not hidden
            weight[k] = float(np.log((events + 0.5) / (len(t) - events + 0.5)))
            chosen[pattern] = {"C": None, "nonzero": 0, "of": head.widths[pattern], "n": int(len(t)), "events": events}
            log.warning(
                "fusion: %d patients (%d events) with pattern %r: its model is the event rate", len(t), events, pattern
            )
            continue
        mu, sd = x.mean(axis=0), x.std(axis=0)
        sd[sd < 1e-6] = 1.0  # a constant feature (a concept nobody in the cohort has) stays at zero weight
        xs = (x - mu) / sd
        folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(xs, t))

        def regression(c: float) -> Any:
            # liblinear's coordinate descent visits the features in a random order, and with correlated features
            # (a concept, its positive part, its products) the L1 optimum is flat: seeded, or two runs differ
            return LogisticRegression(
                C=c, l1_ratio=1.0, solver="liblinear", max_iter=10000, tol=1e-6, random_state=seed
            )

        cv_loss = {
            c: float(
                np.mean([log_loss(regression(c).fit(xs[a], t[a]).decision_function(xs[b]), t[b]) for a, b in folds])
            )
            for c in LOGISTIC_HEAD_CS
        }
        best = min(cv_loss, key=cv_loss.__getitem__)
        fitted = regression(best).fit(xs, t)
        weight[k] = float(fitted.intercept_[0])
        weight[len(PRESENCE_PATTERNS) + block.start : len(PRESENCE_PATTERNS) + block.stop] = torch.from_numpy(
            fitted.coef_[0]
        )
        mean[block], scale[block] = torch.from_numpy(mu), torch.from_numpy(sd)
        chosen[pattern] = {
            "C": best,
            "nonzero": int((fitted.coef_ != 0).sum()),
            "of": head.widths[pattern],
            "n": int(len(t)),
            "events": events,
            "cv_log_loss": round(cv_loss[best], 5),
        }
    with torch.no_grad():
        head.linear.weight.copy_(weight.unsqueeze(0))
        head.mean.copy_(mean)
        head.scale.copy_(scale)
    log.info("fusion: logistic head per presence pattern %s", chosen)
    return chosen
