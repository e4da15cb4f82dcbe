"""What every runtime shares: one patient's inputs, one prediction, batching, and the two errors.

Arrays are shaped as ``inference.contract`` says (per patient, without the batch axis); tensor names,
shapes and dtypes come from the contract, never from literals here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference import contract as C

log = logging.getLogger(__name__)


class ModelUnavailableError(RuntimeError):
    """The model cannot be reached or loaded right now; retry later."""


class ModelContractError(RuntimeError):
    """The served model does not match inference.contract (names the tensor); retrying will not help."""


@dataclass(frozen=True)
class ModelInputs:
    """One patient's inputs, each array shaped as the contract's TensorSpec.dims (no batch axis)."""

    image: np.ndarray
    image_present: np.ndarray
    vitals: np.ndarray
    vitals_mask: np.ndarray
    vitals_delta: np.ndarray
    demographics: np.ndarray

    def validate(self) -> None:
        for spec in C.INPUTS:
            arr = getattr(self, spec.name)
            if tuple(arr.shape) != spec.dims:
                raise ValueError(f"input {spec.name!r} has shape {tuple(arr.shape)}, contract says {spec.dims}")


#: How far the served terms may sum from the served logit (float32 rounding is ~1e-6): beyond it they are dropped.
TERMS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Prediction:
    probability: float
    logit: float
    model_version: str
    runtime: str  # "onnxruntime" | "triton-http" | "triton-grpc" | "onnxruntime (fallback)"
    #: The logit as exact terms (``C.LOGIT_TERMS``: the reference patient's logit, then each input's contribution),
    #: from the same forward pass; None when the model serves none (its head is not additive) or they did not add up.
    logit_terms: tuple[float, ...] | None = None
    #: None: the model's own (global) calibration; else the site recalibration applied (``runtime.site``), described.
    calibration: str | None = None

    def contributions(self) -> dict[str, float] | None:
        """Each input's exact contribution to the logit (``C.LOGIT_TERMS`` less the reference), if served."""
        if self.logit_terms is None:
            return None
        return dict(zip(C.LOGIT_TERMS[1:], self.logit_terms[1:], strict=True))


def stack_inputs(batch: Sequence[ModelInputs]) -> dict[str, np.ndarray]:
    """Per-patient inputs -> batched arrays keyed by contract input name."""
    if not batch:
        raise ValueError("empty batch")
    out: dict[str, np.ndarray] = {}
    for spec in C.INPUTS:
        arrays = []
        for item in batch:
            arr = np.asarray(getattr(item, spec.name), dtype=spec.dtype)
            if tuple(arr.shape) != spec.dims:
                raise ValueError(f"input {spec.name!r} has shape {tuple(arr.shape)}, contract says {spec.dims}")
            arrays.append(arr)
        out[spec.name] = np.stack(arrays)  # (B, *dims)
    return out


def predictions(
    prob: np.ndarray, logit: np.ndarray, version: str, runtime: str, terms: np.ndarray | None = None
) -> list[Prediction]:
    """One Prediction per row; ``terms`` (B, len(C.LOGIT_TERMS)) when the model served ``logit_terms``."""
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    logit = np.asarray(logit, dtype=np.float64).reshape(-1)
    rows: list[tuple[float, ...] | None] = [None] * len(logit)
    if terms is not None:
        rows = [checked_terms(lg, row) for lg, row in zip(logit, np.asarray(terms, dtype=np.float64), strict=True)]
        if any(row is None for row in rows):
            log.warning("%s: logit_terms that do not add up to the logit were dropped", runtime)
    return [
        Prediction(float(p), float(lg), version, runtime, row) for p, lg, row in zip(prob, logit, rows, strict=True)
    ]


def checked_terms(logit: float, row: np.ndarray) -> tuple[float, ...] | None:
    """The row as a tuple if it is what the contract says (``C.LOGIT_TERMS``, finite, summing to ``logit``), else
    None: a model whose terms do not add up gets its drivers by occlusion rather than from wrong numbers."""
    row = np.asarray(row, dtype=np.float64).reshape(-1)
    if row.shape != (len(C.LOGIT_TERMS),) or not np.isfinite(row).all():
        return None
    if abs(float(row.sum()) - float(logit)) > TERMS_TOLERANCE:
        return None
    return tuple(float(v) for v in row)
