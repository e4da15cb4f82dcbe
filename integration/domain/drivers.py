"""Why a score is what it is, in words: occlusion deltas -> the few inputs that raised the risk most.

The engine asks the served model itself (ONNX Runtime or Triton) how the probability changes when one input
group is withheld (the image, or one vital sign's whole history), so the explanation needs no second model
and matches what was served. Withholding uses the contract's own "missing" encoding (masks), the same one
the model saw in training with modality dropout.
"""

from __future__ import annotations

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
