"""Why a score is what it is, in words: the inputs that raised the risk most, and the one that lowered it most.

Each input group (the image, or one vital sign's whole history) is scored against the patient's own score: the
probability without it, and the note names the groups whose absence would change the score most. Two ways to
know that probability, both from the served model itself (ONNX Runtime or Triton), so the explanation needs no
second model and matches what was served:

- exactly, from the scoring pass, when the model's logit is a sum of per-input terms (the logistic fusion head:
  ``inference.contract.LOGIT_TERMS``): the probability with the input at the reference patient's value, i.e. its
  term taken out of the logit (``withheld_exactly``);
- by occlusion otherwise: one more batched call with each group withheld in the contract's own "missing" encoding
  (masks), the one the model saw in training with modality dropout.

Both feed ``top_drivers``, so the note reads the same whichever was used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from inference import contract as C

IMAGE = "image"
#: Ignore changes smaller than this (probability points): noise, not a driver.
MIN_DELTA = 0.01


def group_label(group: str) -> str:
    if group == IMAGE:
        return "brain imaging findings"
    return f"{C.VITAL_FEATURES[C.FEATURE_INDEX[group]].display.lower()} history"


def top_drivers(probability: float, withheld: dict[str, float], k: int = 3) -> list[str]:
    """``withheld`` maps an input group to the probability without it; returns up to k short phrases."""
    deltas = sorted(((probability - p, g) for g, p in withheld.items()), reverse=True)
    out = [f"{group_label(g)} (+{d * 100:.0f} points)" for d, g in deltas[:k] if d >= MIN_DELTA]
    lowering = [(d, g) for d, g in deltas if d <= -MIN_DELTA]
    if lowering and len(out) < k:
        d, g = lowering[-1]
        out.append(f"{group_label(g)} lowered it ({d * 100:.0f} points)")
    return out


def withheld_exactly(logit: float, contributions: Mapping[str, float]) -> dict[str, float]:
    """``contributions``: each input group's exact term of ``logit`` (calibrated logit scale). Returns, per group,
    the probability with that input at the reference patient's value: sigmoid(logit - term). For ``top_drivers``:
    a larger term is a larger drop, so the order is the terms' order, and the points are probability points."""
    return {group: _sigmoid(logit - term) for group, term in contributions.items()}


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


#: How ``domain.assessment.note_text`` introduces the drivers in the RiskAssessment note.
NOTE_DRIVERS_PREFIX = "Main drivers: "


def drivers_in_note(note: str) -> list[str]:
    """The driver phrases a RiskAssessment note names (the inverse of how ``note_text`` writes them)."""
    start = note.find(NOTE_DRIVERS_PREFIX)
    if start < 0:
        return []
    rest = note[start + len(NOTE_DRIVERS_PREFIX):]
    end = rest.find(". ")
    listed = rest[:end] if end >= 0 else rest.rstrip(".")
    return [phrase.strip() for phrase in listed.split(";") if phrase.strip()]
