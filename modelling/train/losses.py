"""The auxiliary losses that teach the branches the risk factors: lesion maps and named concepts."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from modelling.config import BINARY_CONCEPTS
from modelling.train.settings import TrainSettings


def seg_loss(
    seg_logits: torch.Tensor, label: np.ndarray, present: np.ndarray, settings: TrainSettings
) -> torch.Tensor:
    """Per-kind lesion-map loss at the map's (half) resolution, over patients whose image was seen.

    ``label`` (B, D, H, W) codes kind k as k + 1 (0: no lesion); a half-resolution voxel is positive for a
    kind when any of its full-resolution voxels is. Weighted BCE plus a soft Dice per kind over the batch:
    a hyperdense vessel is a few voxels in one patient in twenty, which voxel-averaged BCE all but ignores.
    """
    rows = torch.from_numpy(present[:, 0] > 0).to(seg_logits.device)  # (B,)
    if not bool(rows.any()):
        return seg_logits.sum() * 0.0
    kinds = seg_logits.shape[1]
    lab = torch.from_numpy(label.astype(np.int64)).to(seg_logits.device)  # (B, D, H, W)
    onehot = torch.stack([(lab == k + 1) for k in range(kinds)], dim=1).float()  # (B, K, D, H, W)
    target = F.adaptive_max_pool3d(onehot, seg_logits.shape[2:])  # (B, K, d, h, w)
    pos_weight = torch.tensor(settings.aux_seg_pos_weight, device=seg_logits.device).view(kinds, 1, 1, 1)
    logits, target = seg_logits[rows], target[rows]  # (b, K, d, h, w)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    prob = torch.sigmoid(logits)
    overlap = (prob * target).sum(dim=(0, 2, 3, 4))  # (K,)
    dice = (2.0 * overlap + 1.0) / (prob.sum(dim=(0, 2, 3, 4)) + target.sum(dim=(0, 2, 3, 4)) + 1.0)  # (K,)
    return bce + (1.0 - dice).mean()


def concept_loss(
    raw: torch.Tensor, target: np.ndarray, names: tuple[str, ...], rows: np.ndarray, pos_weight: float = 1.0
) -> torch.Tensor:
    """Mean over concepts of BCE (yes/no concepts, positives weighted) or squared error (graded ones), over
    ``rows`` (bool (B,))."""
    if not rows.any():
        return raw.sum() * 0.0
    keep = torch.from_numpy(rows).to(raw.device)  # (B,)
    out, tgt = raw[keep], torch.from_numpy(target.astype(np.float32)).to(raw.device)[keep]  # (b, K)
    weight = torch.tensor(pos_weight, device=raw.device)
    losses = [
        F.binary_cross_entropy_with_logits(out[:, k], tgt[:, k], pos_weight=weight)
        if name in BINARY_CONCEPTS
        else F.mse_loss(out[:, k], tgt[:, k])
        for k, name in enumerate(names)
    ]
    return torch.stack(losses).mean()
