"""What a trained model computes, batched over a cohort: logits, probabilities, and each branch's concepts.

The staged stages read a frozen branch's outputs once (``image_embeddings``, ``spot_readouts``,
``vital_values``) and train or fit what sits on top of them; evaluation scores several models from one
CNN pass (``fused_logits``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from inference import contract as C
from modelling.calibrate import sigmoid
from modelling.config import VITAL_CONCEPTS
from modelling.model import FusionModel, calibrated_logit, concept_values


def to_device(batch: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def predict_logits(model: FusionModel, inputs: Mapping[str, np.ndarray], batch_size: int = 128) -> np.ndarray:
    """Uncalibrated logits (N,) of ``model`` in eval mode, batched."""
    device = next(model.parameters()).device
    model.eval()
    n = len(inputs["image"])
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in inputs.items()}
            out.append(model.forward_dict(to_device(chunk, device)).squeeze(1).float().cpu().numpy())
    return np.concatenate(out)


def predict_proba(model: FusionModel, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Calibrated probabilities (N,) using the model's stored calibration (temperature, bias)."""
    return sigmoid(calibrated_logit(model.cfg, predict_logits(model, inputs)))


def fused_logits(
    model: FusionModel, inputs: Mapping[str, np.ndarray], image_concepts: np.ndarray | None, batch_size: int = 256
) -> np.ndarray:
    """Uncalibrated logits (N,) from the image branch's concepts computed beforehand (``image_embeddings``):
    the numbers ``predict_logits`` gives, without running the CNN again (one CNN pass serves several scorers)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs["image_present"]), batch_size):
            rows = slice(start, start + batch_size)
            b = {k: torch.from_numpy(np.ascontiguousarray(inputs[k][rows])) for k in C.INPUT_NAMES[1:]}
            concepts = None if image_concepts is None else torch.from_numpy(image_concepts[rows])
            logit, _ = model.fuse(concepts, *(b[k] for k in C.INPUT_NAMES[1:]))  # (B, 1)
            out.append(logit.squeeze(1).numpy())
    return np.concatenate(out)


def same_image_branch(a: FusionModel, b: FusionModel) -> bool:
    """Whether two models carry identical image branches (the staged fusion model and its image baseline)."""
    if a.image_branch is None or b.image_branch is None:
        return False
    sa, sb = a.image_branch.state_dict(), b.image_branch.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def image_batches(
    model: FusionModel, inputs: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, gated image (B, 1, D, H, W)) batches on the model's device, absent images zeroed as in forward."""
    device = next(model.parameters()).device
    for start in range(0, len(inputs["image"]), batch_size):
        image = torch.from_numpy(inputs["image"][start : start + batch_size]).to(device)  # (B, 1, D, H, W)
        present = torch.from_numpy(inputs["image_present"][start : start + batch_size]).to(device)  # (B, 1)
        yield start, image * present.view(-1, 1, 1, 1, 1)


def image_pooled(
    model: FusionModel, inputs: Mapping[str, np.ndarray], spot_features: np.ndarray | None = None, batch_size: int = 32
) -> np.ndarray:
    """What the frozen image branch's concept head reads (N, n_pooled), for every patient, computed once."""
    assert model.image_branch is not None
    model.eval()
    out = []
    with torch.no_grad():
        for start, image in image_batches(model, inputs, batch_size):
            spots = None
            if spot_features is not None:
                spots = torch.from_numpy(spot_features[start : start + batch_size]).to(image.device)
            out.append(model.image_branch.pooled_with_seg(image, spots)[0].cpu().numpy())  # (B, n_pooled)
    return np.concatenate(out)


def image_embeddings(
    model: FusionModel,
    inputs: Mapping[str, np.ndarray],
    batch_size: int = 32,
    spot_features: np.ndarray | None = None,
) -> np.ndarray:
    """The image branch's raw concepts (N, K) of every patient, computed once (the branch is frozen)."""
    return concepts_of_pooled(model, image_pooled(model, inputs, spot_features, batch_size))


def concepts_of_pooled(model: FusionModel, pooled: np.ndarray) -> np.ndarray:
    """The image concept head over pooled features (``image_pooled``, (N, n_pooled)) -> raw concepts (N, K)."""
    assert model.image_branch is not None
    model.image_branch.concept_head.eval()
    with torch.no_grad():
        x = torch.from_numpy(pooled).to(next(model.parameters()).device)
        return model.image_branch.concept_head(x).cpu().numpy()  # (N, K)


def spot_readouts(model: FusionModel, inputs: Mapping[str, np.ndarray], batch_size: int = 16) -> np.ndarray:
    """The frozen spot detector's readout (N, F) of every patient (``ImageBranch.spot_readout``)."""
    assert model.image_branch is not None
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [
                model.image_branch.spot_readout(image).cpu().numpy()
                for _, image in image_batches(model, inputs, batch_size)
            ]
        )


def vital_values(model: FusionModel, inputs: Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The vitals branch's concepts as the head reads them (``concept_values``), (N, K_vit)."""
    assert model.vitals_branch is not None
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs["vitals"]), batch_size):
            rows = slice(start, start + batch_size)
            raw = model.vitals_branch(
                *(torch.from_numpy(inputs[k][rows]) for k in ("vitals", "vitals_mask", "vitals_delta"))
            )
            out.append(concept_values(raw, VITAL_CONCEPTS).numpy())
    return np.concatenate(out)
