"""Calibration of trained models (temperature and intercept) on held-out patients, and saving it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelling.calibrate import binary_metrics, fit_temperature_and_bias, sigmoid
from modelling.model import FusionModel, calibrated_logit, save
from modelling.train.data import Arrays, cohort_inputs, make_cohort, split_indices
from modelling.train.features import fused_logits, image_embeddings, predict_logits, same_image_branch
from modelling.train.settings import TrainSettings

log = logging.getLogger(__name__)


def calibrate(models: Mapping[str, FusionModel], held_out: list[tuple[Arrays, np.ndarray]], source: str) -> None:
    """Fit each model's calibration (temperature and intercept) on the held-out patients, in place.

    ``held_out``: (inputs, outcomes) sets never used to fit weights (the validation split, a calibration
    cohort). The CNN runs once per set for image branches that are identical (staged fusion)."""
    concepts: list[tuple[FusionModel, list[np.ndarray]]] = []
    for name, model in models.items():
        model.cpu().eval()
        if model.image_branch is not None:
            known = next((c for m, c in concepts if same_image_branch(m, model)), None)
            if known is None:
                known = [image_embeddings(model, inputs) for inputs, _ in held_out]
                concepts.append((model, known))
            z = np.concatenate([fused_logits(model, inputs, c) for (inputs, _), c in zip(held_out, known, strict=True)])
        else:
            z = np.concatenate([predict_logits(model, inputs) for inputs, _ in held_out])
        y = np.concatenate([outcome for _, outcome in held_out])
        model.cfg.temperature, model.cfg.calibration_bias = fit_temperature_and_bias(z, y)
        metrics = binary_metrics(sigmoid(calibrated_logit(model.cfg, z)), y)
        model.cfg.info = {
            **model.cfg.info,
            "calibration": {
                "method": "temperature and intercept, log-loss",
                "patients": source,
                "n": int(len(y)),
                "metrics": {k: round(v, 4) for k, v in metrics.items()},
            },
        }
        log.info(
            "%s: calibrated on %d held-out patients: T %.3f, bias %+.3f, %s",
            name,
            len(y),
            model.cfg.temperature,
            model.cfg.calibration_bias,
            model.cfg.info["calibration"]["metrics"],
        )


def calibrate_saved(
    models: Mapping[str, FusionModel], cohort: Any, seed: int, settings: TrainSettings, out_dir: Path
) -> None:
    """Refit the models' calibration on the validation split plus ``settings.calibration_extra`` patients of
    the same seed rendered after everything training used, and save the configs again."""
    n = len(cohort.outcome)
    _, val_idx = split_indices(n, settings.val_fraction, seed)
    inputs = cohort_inputs(cohort)
    start = n + settings.vitals_extra  # after the training cohort and the vitals-only records
    extra = make_cohort(settings.calibration_extra, seed, start=start)
    held_out = [
        ({k: v[val_idx] for k, v in inputs.items()}, np.asarray(cohort.outcome, dtype=np.float64)[val_idx]),
        (cohort_inputs(extra), np.asarray(extra.outcome, dtype=np.float64)),
    ]
    source = (
        f"validation split ({len(val_idx)}) + make_arrays({settings.calibration_extra}, seed={seed}, start={start})"
    )
    calibrate(models, held_out, source)
    for variant, model in models.items():
        save(model, out_dir / variant)
