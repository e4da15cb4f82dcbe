"""The image branch's spot detector (lacunes, hyperdense vessel sign), trained first on full-resolution patches."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from modelling.config import LESION_KINDS, SPOT_KINDS
from modelling.model import FusionModel
from modelling.train.features import image_batches
from modelling.train.settings import TrainSettings

log = logging.getLogger(__name__)


def spot_patch_centre(
    rng: np.random.Generator,
    settings: TrainSettings,
    where: Mapping[int, list[tuple[int, np.ndarray]]],
    without: Mapping[int, np.ndarray],
    present_rows: np.ndarray,
    region: tuple[tuple[int, int], ...],
) -> tuple[int, np.ndarray, str]:
    """Where one of the spot detector's training patches is cut: (patient row, centre voxel (3,), why).

    ``where[code]``: (row, voxels (M, 3)) of each patient with a finding labelled ``code`` (one key per
    ``SPOT_KINDS``, in order); ``without[code]``: rows of patients with an image and none. One uniform draw
    picks, by the shares of ``settings``: a patch near a labelled finding of a kind (``spot_focus``; why: the
    kind), the same place in a patient without one (``spot_negatives``; why: "not <kind>"), else anywhere in
    ``region`` of a patient with an image ("background"). A share whose kind has no example passes to the next.
    Positives and hard negatives are jittered by up to a third of the patch, so a finding is not always central.
    """
    pd, ph, pw = settings.spot_patch
    u = rng.random()
    for examples, share, kind in zip(where.values(), settings.spot_focus, SPOT_KINDS, strict=True):
        if u < share and examples:
            i, voxels = examples[rng.integers(len(examples))]
            jitter = rng.integers(-1, 2, 3) * np.array([pd, ph, pw]) // 3
            return int(i), voxels[rng.integers(len(voxels))] + jitter, kind
        u -= share
    for (code, examples), share, kind in zip(where.items(), settings.spot_negatives, SPOT_KINDS, strict=True):
        if u < share and examples and len(without[code]):
            _, voxels = examples[rng.integers(len(examples))]
            jitter = rng.integers(-1, 2, 3) * np.array([pd, ph, pw]) // 3
            other = int(without[code][rng.integers(len(without[code]))])
            return other, voxels[rng.integers(len(voxels))] + jitter, f"not {kind}"
        u -= share
    lo, hi = np.array([a for a, _ in region]), np.array([b for _, b in region])
    return int(present_rows[rng.integers(len(present_rows))]), rng.integers(lo, hi), "background"


def fit_spot_detector(
    model: FusionModel, inputs: Mapping[str, np.ndarray], label: np.ndarray, rows: np.ndarray, settings: TrainSettings
) -> None:
    """Train ``model.image_branch.spots`` on patches of the volumes ``rows``, then freeze it.

    A lacune or a vessel sign is a few voxels in a volume of 131,072, and one patient in three (lacunes) or
    in seventeen (vessel sign) has any: whole volumes would spend nearly all their gradient on background.
    Patches of ``spot_patch`` voxels are drawn (``spot_patch_centre``) centred near a labelled voxel of each
    kind (``spot_focus``), at such a place in a patient without that kind (``spot_negatives``: hard negatives),
    or anywhere in the region the detector reads (the rest), and the loss is weighted BCE plus a soft Dice per
    kind, as for the lesion map.
    """
    branch = model.image_branch
    assert branch is not None and branch.spots is not None
    device = next(model.parameters()).device
    # patch draws are seeded by the training rows (fixed by the run's seed through the split); an odd key,
    # kept because the shipped spot detector was trained with it and the training command must reproduce it
    rng = np.random.default_rng(int(rows.sum()) % (2**32))
    kinds = [LESION_KINDS.index(k) + 1 for k in SPOT_KINDS]  # label codes
    having = {code: [int(i) for i in rows if (label[i] == code).any()] for code in kinds}  # scanned once
    where = {code: [(i, np.argwhere(label[i] == code)) for i in having[code]] for code in kinds}
    present_rows = rows[inputs["image_present"][rows, 0] > 0]
    without = {code: present_rows[~np.isin(present_rows, having[code])] for code in kinds}
    pd, ph, pw = settings.spot_patch
    d, h, w = label.shape[1:]
    # the detector reads only its region (``FusionConfig.spot_region``): draw the background patches there
    region = branch.spot_region or ((0, d), (0, h), (0, w))
    # the contrast channel is standardised over each whole volume: compute it on the volumes, cut patches after
    slot = {int(i): k for k, i in enumerate(rows)}
    with torch.no_grad():
        volumes = np.concatenate(
            [
                branch.inputs(image).cpu().numpy()
                for _, image in image_batches(
                    model, {k: v[rows] for k, v in inputs.items() if k.startswith("image")}, 64
                )
            ]
        )  # (len(rows), 2, D, H, W)

    def patch(i: int, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z0, y0, x0 = (
            int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, (pd, ph, pw), (d, h, w), strict=True)
        )
        box = (slice(z0, z0 + pd), slice(y0, y0 + ph), slice(x0, x0 + pw))
        return volumes[slot[i]][(slice(None), *box)], label[i][box]

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for _ in range(settings.spot_batch):
            chosen = spot_patch_centre(rng, settings, where, without, present_rows, region)[:2]
            x, lab = patch(*chosen)
            images.append(x)
            labels.append(lab)
        x = torch.from_numpy(np.stack(images)).to(device)  # (B, 2, pd, ph, pw)
        lab = torch.from_numpy(np.stack(labels).astype(np.int64)).to(device)  # (B, pd, ph, pw)
        return x, torch.stack([(lab == code) for code in kinds], dim=1).float()  # (B, K, pd, ph, pw)

    spots = branch.spots
    spots.train()
    opt = torch.optim.AdamW(spots.parameters(), lr=settings.spot_lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.spot_lr, total_steps=settings.spot_steps)
    pos_weight = torch.tensor(settings.spot_pos_weight, device=device).view(-1, 1, 1, 1)
    started, losses = time.monotonic(), []
    for step in range(1, settings.spot_steps + 1):
        x, target = batch()
        logits = spots(x)  # (B, K, pd, ph, pw)
        prob = torch.sigmoid(logits)
        overlap = (prob * target).sum(dim=(0, 2, 3, 4))  # (K,)
        dice = (2.0 * overlap + 1.0) / (prob.sum(dim=(0, 2, 3, 4)) + target.sum(dim=(0, 2, 3, 4)) + 1.0)
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight) + (1.0 - dice).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == settings.spot_steps:
            log.info("spots step %d: loss %.4f (%.0fs)", step, np.mean(losses[-250:]), time.monotonic() - started)
    for param in spots.parameters():
        param.requires_grad_(False)
    spots.eval()
