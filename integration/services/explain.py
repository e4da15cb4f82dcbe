"""The drivers of each score for the RiskAssessment note (``domain.drivers``), exact where the model allows.

A model that serves ``logit_terms`` (``Prediction.logit_terms``: its logit as the reference patient's plus each
input's exact contribution, from the pass that scored it) is explained with no further model call. Any other
model, or a prediction whose terms were dropped, is explained by occlusion: all its patients' withheld variants
in one more batched call. Either way only the inputs the patient has are candidates: the image when one was used,
each vital sign with at least one value in the window.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from inference import contract as C
from inference.preprocess import empty_image
from inference.runtime.base import ModelContractError, ModelInputs, ModelUnavailableError, Prediction
from integration.domain.drivers import IMAGE, top_drivers, withheld_exactly
from integration.ports import RiskModel

log = logging.getLogger(__name__)

#: One scored patient: its inputs, and whether an image was among them.
Scored = tuple[ModelInputs, bool]


def drivers(model: RiskModel, batch: Sequence[Scored], predictions: Sequence[Prediction]) -> list[list[str]]:
    """Up to three phrases per patient, in order; empty for a patient whose drivers could not be had."""
    withheld = withheld_probabilities(model, batch, predictions)
    return [[] if w is None else top_drivers(p.probability, w) for p, w in zip(predictions, withheld, strict=True)]


def withheld_probabilities(
    model: RiskModel, batch: Sequence[Scored], predictions: Sequence[Prediction], *, exact: bool = True
) -> list[dict[str, float] | None]:
    """Per patient, each input group it has -> the probability without it: exactly from the logit terms where the
    prediction has them (and ``exact``), else by occlusion. None where occlusion failed (the scores stand)."""
    out: list[dict[str, float] | None] = [None] * len(batch)
    occlude: list[int] = []
    for i, ((inputs, image_used), prediction) in enumerate(zip(batch, predictions, strict=True)):
        contributions = prediction.contributions() if exact else None
        if contributions is None:
            occlude.append(i)
            continue
        out[i] = withheld_exactly(prediction.logit, {g: contributions[g] for g in input_groups(inputs, image_used)})
    if occlude:
        for i, withheld in zip(occlude, _occlusion(model, [batch[i] for i in occlude]), strict=True):
            out[i] = withheld
    return out


def input_groups(inputs: ModelInputs, image_used: bool) -> list[str]:
    """The input groups this patient has: the image if one was used, then each vital sign observed in the window."""
    observed = [f.key for i, f in enumerate(C.VITAL_FEATURES) if inputs.vitals_mask[:, i].any()]
    return ([IMAGE] if image_used else []) + observed


def withheld_variants(inputs: ModelInputs, image_used: bool) -> list[tuple[str, ModelInputs]]:
    """The patient's inputs with one group missing (the contract's own encoding of 'not available')."""
    out: list[tuple[str, ModelInputs]] = []
    for group in input_groups(inputs, image_used):
        if group == IMAGE:
            out.append((IMAGE, replace(inputs, image=empty_image(), image_present=np.zeros(1, dtype=np.float32))))
            continue
        f = C.FEATURE_INDEX[group]
        values, mask, delta = inputs.vitals.copy(), inputs.vitals_mask.copy(), inputs.vitals_delta.copy()
        values[:, f], mask[:, f], delta[:, f] = 0.0, 0.0, 1.0
        out.append((group, replace(inputs, vitals=values, vitals_mask=mask, vitals_delta=delta)))
    return out


def _occlusion(model: RiskModel, batch: Sequence[Scored]) -> list[dict[str, float] | None]:
    """Every patient's withheld variants through the served model in one batched call."""
    variants = [withheld_variants(inputs, image_used) for inputs, image_used in batch]
    flat = [inputs for per_patient in variants for _, inputs in per_patient]
    if not flat:
        return [{} for _ in batch]
    try:
        scores = iter(model.predict(flat))
    except (ModelUnavailableError, ModelContractError) as err:
        log.warning("no drivers this time (%s); the scores stand", err)
        return [None for _ in batch]
    return [{group: next(scores).probability for group, _ in per_patient} for per_patient in variants]
