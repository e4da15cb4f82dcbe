"""What every runtime shares: one patient's inputs, one prediction, batching, and the two errors.

Arrays are shaped as ``inference.contract`` says (per patient, without the batch axis); tensor names,
shapes and dtypes come from the contract, never from literals here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference import contract as C


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


@dataclass(frozen=True)
class Prediction:
    probability: float
    logit: float
    model_version: str
    runtime: str  # "onnxruntime" | "triton-http" | "triton-grpc" | "onnxruntime (fallback)"


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


def predictions(prob: np.ndarray, logit: np.ndarray, version: str, runtime: str) -> list[Prediction]:
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    logit = np.asarray(logit, dtype=np.float64).reshape(-1)
    return [Prediction(float(p), float(lg), version, runtime) for p, lg in zip(prob, logit, strict=True)]
