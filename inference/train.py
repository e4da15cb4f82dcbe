"""Train the fusion model and its single-modality baselines on the synthetic cohort.

One command reproduces the shipped weights (the cohort, the split, the initialisation, the
batch order and the modality dropout all follow from ``--seed``):

    python -m inference.train --seed 0 --n 2000 --variant all --threads 2 --out inference/weights

Per variant, ``<out>/<variant>/`` receives ``weights.pt`` and ``config.json`` (the FusionConfig,
including the calibration and a training summary). A GPU is used when present.

Order: the image branch's spot detector (lacunes, vessel sign) on full-resolution patches, frozen; the
image-only and vitals-only baselines; then the fusion model in stages: its image and
vitals branches are the baselines', frozen (so each volume is encoded once, not once per epoch: what keeps
training inside the two-core CPU budget), and the demographics branch and the fusion head are trained on
the fusion objective. ``--end-to-end`` trains the fusion model from scratch instead (several times slower
on a CPU). The vitals baseline also learns from ``--vitals-extra`` vitals-only records (the same cohort's
next patients, no volume rendered: cheap), which the image branch cannot use. The heads trained on the
frozen CNN (the image concept head, the image baseline's risk head, the fusion head) also learn from
``--head-extra`` patients rendered after the calibration cohort, which the CNN never sees: on its own
training patients the CNN's features are cleaner than on anyone else, and 1,600 patients are too few for
the heads. Last, every model's calibration (temperature and intercept) is fitted on the validation split
plus ``--calibration-extra`` patients rendered after the vitals-only records (``calibrate_saved``).

Each branch ends in named concepts, the risk factors it can see (``inference.model.IMAGE_CONCEPTS``,
``VITAL_CONCEPTS``), and is taught them directly where the cohort knows them: the image branch learns a
lesion map per kind of finding from ``finding_label`` (as lesion-annotated datasets provide) and the
finding counts and grades from ``image_factors`` (as radiology reads provide); the vitals branch learns the
vital traits from ``vital_factors``. One outcome bit per patient is a weak teacher for a 3D CNN on a
few thousand patients; these targets are what make it learn the findings and not age.

Modality dropout: in each fusion batch a random share of patients have their image withheld
(zeros, ``image_present`` = 0) or their vitals withheld (values 0, mask 0, delta 1: what
``inference.preprocess.vitals_tensors`` returns for no samples). The head therefore learns to
score a patient honestly from whatever modality is there.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from inference import contract as C
from inference.calibrate import binary_metrics, fit_temperature, fit_temperature_and_bias, log_loss, sigmoid
from inference.model import (
    BINARY_CONCEPTS,
    IMAGE_CONCEPTS,
    LESION_KINDS,
    PRESENCE_PATTERNS,
    SPOT_KINDS,
    VARIANTS,
    VITAL_CONCEPTS,
    FusionConfig,
    FusionModel,
    Variant,
    calibrated_logit,
    concept_values,
    count_parameters,
    load,
    save,
)
from inference.preprocess import empty_image

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"
Modality = Literal["image", "vitals"]
Arrays = dict[str, np.ndarray]
#: The fusion model is trained last, from the two baselines (see ``fit``).
VARIANTS_BASELINES_FIRST: tuple[Variant, ...] = ("image", "vitals", "fusion")


@dataclass
class TrainSettings:
    epochs: int = 30
    cnn_epochs: int = 16  # variants that train the 3D CNN (image; fusion end to end): the CPU budget
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 5  # epochs without validation improvement before stopping
    val_fraction: float = 0.2
    image_dropout: float = 0.15  # fusion only: share of patients per batch with the image withheld
    vitals_dropout: float = 0.15  # fusion only: share with the vitals withheld (never both)
    threads: int = 2
    staged: bool = True  # fusion from the trained baselines (both branches frozen); False: end to end
    vitals_extra: int = 10000  # vitals-only records (no volume rendered) added to the vitals baseline's training
    aux_seg_weight: float = 2.0  # weight of the lesion-map loss (image variants, when lesion labels exist)
    #: per lesion kind (lacune, WMD, infarct, vessel sign): the rarer and smaller the kind, the heavier its voxels
    aux_seg_pos_weight: tuple[float, ...] = (10.0, 3.0, 3.0, 20.0)
    #: weight of the positives of yes/no concepts (5.0 with seg weights (100, 3, 10, 300) sharpened the
    #: lacune and vessel maps but not the concepts read from them, and lost 0.004 validation AUROC: not shipped)
    aux_concept_pos_weight: float = 1.0
    aux_concept_weight: float = 1.0  # weight of the concept losses (when the risk factors are known)
    #: spot detector (lacunes, vessel sign), trained first on full-resolution patches; 0 steps: not trained
    spot_steps: int = 1350
    spot_batch: int = 16
    spot_patch: tuple[int, int, int] = (16, 32, 32)  # (D, H, W) voxels: 80 x 112 x 112 mm
    spot_lr: float = 3e-3
    #: share of patches centred near a lacune / a vessel sign (the rest anywhere): both are rare per voxel
    spot_focus: tuple[float, float] = (0.25, 0.3)
    #: share of patches centred where some patient has a lacune / a vessel sign, cut from a patient without one:
    #: the same anatomy (deep nuclei, a normal middle cerebral artery) shown as background (hard negatives).
    #: (0.1, 0.15) sharpened the concepts (seed 1001: vessel-sign AUROC 0.988 -> 0.997, lacune count r 0.734 ->
    #: 0.756) but not the fusion model (AUROC 0.8549 -> 0.8523, ECE 0.018 -> 0.022; MODEL_CARD.md): off
    #: in the shipped model
    spot_negatives: tuple[float, float] = (0.0, 0.0)
    spot_pos_weight: tuple[float, float] = (3.0, 10.0)  # per spot kind, BCE weight of positive voxels
    #: the image concept head refitted alone on the trained CNN (``refit_concept_head``): most epochs, patience
    concept_refit_epochs: int = 400
    concept_refit_patience: int = 30
    concept_refit_lr: float = 1e-3
    #: patients rendered after the training cohort and the vitals-only records, never trained on, that join
    #: the validation split for calibration (0: calibrate on the validation split alone)
    calibration_extra: int = 2000
    #: patients rendered after the calibration cohort, never seen by the CNN, from which the heads on its frozen
    #: features also learn (staged training only): the image concept head (``refit_concept_head``), the image
    #: baseline's risk head and the fusion head. Trained on the 1,600 training patients alone, the concept head
    #: improves on no epoch (seed 1001: lacune count r 0.734); with 2,000 more, r 0.779 and the fusion AUROC
    #: +0.0025 on four unseen cohorts; 4,000 added nothing more to the fusion AUROC (MODEL_CARD.md). 0: the
    #: training split alone.
    head_extra: int = 2000


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next allocation (glibc only; elsewhere a no-op returning False).

    A training step allocates activations of tens of MB (a batch of 64 volumes at 16 channels: 67 MB). glibc
    serves every allocation over 32 MB with a fresh ``mmap`` and hands it back with ``munmap`` when freed, so
    every step faults its activations in page by page again: on the two-core machine half the CPU time of
    training went to the kernel (``strace -c``: munmap ~6 ms a call). ``M_MMAP_MAX`` 0 serves them from the
    heap instead and a high ``M_TRIM_THRESHOLD`` keeps the heap; a CNN step of the image branch (batch 64, two
    threads) went from 2.73 s to 1.74 s, system CPU from 1.87 s to 0.02 s (``python bench/bench_train_step.py
    --runs 3 --steps 3``). Process-wide, so only the command-line entry points of training and evaluation call it.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def cohort_inputs(cohort: Any) -> Arrays:
    """The contract inputs of a cohort object (``inference.synth.CohortArrays`` or anything alike)."""
    return {spec.name: np.asarray(getattr(cohort, spec.name), dtype=np.float32) for spec in C.INPUTS}


def cohort_cache_dir() -> Path:
    """Where generated cohorts are kept (``$STROKEWATCH_CACHE/cohorts``, else ``~/.cache/strokewatch/cohorts``)."""
    root = os.environ.get("STROKEWATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "strokewatch"
    )
    return Path(root) / "cohorts"


def _cached(name: str, build: Any, cls: Any, cache: bool) -> Any:
    path = cohort_cache_dir() / name
    if cache and path.is_file():
        log.info("loading cached cohort %s", path)
        with np.load(path, allow_pickle=False) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
    started = time.monotonic()
    arrays = build()
    log.info("generated in %.0fs", time.monotonic() - started)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays.__dict__)
        tmp.replace(path)
    return arrays


def make_cohort(n: int, seed: int, *, start: int = 0, workers: int = 2, cache: bool = True) -> Any:
    """``inference.synth.make_arrays(n, seed, start=start)``, kept on disk so training and evaluation do not redo it.

    Generation is deterministic in (n, seed), so a cached copy is the same cohort; rendering the volumes
    makes regenerating it the slowest step of a training run.
    """
    from inference.synth import SYNTH_VERSION, CohortArrays, make_arrays

    # The generator's version is part of the key: a cohort cached by an older generator is another cohort.
    log.info("synthetic cohort n=%d seed=%d%s", n, seed, f" from patient {start}" if start else "")
    return _cached(
        f"cohort-v{SYNTH_VERSION}-n{n}-seed{seed}" + (f"-start{start}" if start else "") + ".npz",
        lambda: make_arrays(n, seed, start=start, workers=workers),
        CohortArrays,
        cache,
    )


def make_vitals_cohort(n: int, seed: int, start: int, *, workers: int = 2, cache: bool = True) -> Any:
    """``inference.synth.arrays.make_vitals_arrays``: patients ``start..start+n-1`` of cohort ``seed``, vitals only."""
    from inference.synth import SYNTH_VERSION
    from inference.synth.arrays import VitalsArrays, make_vitals_arrays

    log.info("vitals-only records n=%d seed=%d from patient %d", n, seed, start)
    return _cached(
        f"vitals-v{SYNTH_VERSION}-n{n}-seed{seed}-start{start}.npz",
        lambda: make_vitals_arrays(n, seed, start=start, workers=workers),
        VitalsArrays,
        cache,
    )


def with_vitals_records(
    inputs: Arrays, outcome: np.ndarray, aux: Mapping[str, np.ndarray], extra: Any
) -> tuple[Arrays, np.ndarray, dict[str, np.ndarray]]:
    """The cohort followed by vitals-only records, for a model without an image branch.

    Such a model never reads the volume, so ``image`` is one read-only empty volume broadcast over all rows
    (ten thousand real copies would be gigabytes); rows are copied only when a batch is taken.
    """
    n_all = len(outcome) + len(extra)
    out: Arrays = {}
    for name in C.INPUT_NAMES:
        if name == "image":  # a read-only zero view: rows are copied only when a batch is taken
            out[name] = np.broadcast_to(empty_image()[None], (n_all, *inputs[name].shape[1:]))
        elif name == "image_present":
            out[name] = np.concatenate([inputs[name], np.zeros((len(extra), 1), np.float32)])
        else:
            out[name] = np.concatenate([inputs[name], np.asarray(getattr(extra, name), np.float32)])
    y = np.concatenate([outcome, np.asarray(extra.outcome, dtype=outcome.dtype)])
    new_aux = (
        {"vital_factors": np.concatenate([aux["vital_factors"], extra.vital_factors])} if "vital_factors" in aux else {}
    )
    return out, y, new_aux


def with_head_records(
    inputs: Arrays, outcome: np.ndarray, aux: Mapping[str, np.ndarray], head: Any
) -> tuple[Arrays, np.ndarray, dict[str, np.ndarray]]:
    """The cohort followed by the head cohort (``TrainSettings.head_extra``): inputs, outcomes and the auxiliary
    targets both have (the head cohort's lesion maps are not needed: the CNN never trains on it)."""
    head_inputs = cohort_inputs(head)
    out = {name: np.concatenate([inputs[name], head_inputs[name]]) for name in C.INPUT_NAMES}
    y = np.concatenate([outcome, np.asarray(head.outcome, dtype=outcome.dtype)])
    new_aux = {
        k: np.concatenate([aux[k], np.asarray(getattr(head, k))])
        for k in ("image_factors", "vital_factors")
        if k in aux and getattr(head, k, None) is not None
    }
    return out, y, new_aux


def withhold(inputs: Mapping[str, np.ndarray], modality: Modality, rows: np.ndarray | None = None) -> Arrays:
    """A copy of ``inputs`` with one modality removed for ``rows`` (all rows when None), as the engine sends it."""
    out = {k: v.copy() for k, v in inputs.items()}
    sel = slice(None) if rows is None else rows
    if modality == "image":
        if "image" in out:  # staged training batches carry no volumes
            out["image"][sel] = 0.0
        out["image_present"][sel] = 0.0
    else:
        out["vitals"][sel] = 0.0
        out["vitals_mask"][sel] = 0.0
        out["vitals_delta"][sel] = 1.0
    return out


def _to_device(batch: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
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
            out.append(model.forward_dict(_to_device(chunk, device)).squeeze(1).float().cpu().numpy())
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


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _dropout_batch(batch: Arrays, settings: TrainSettings, rng: np.random.Generator) -> Arrays:
    u = rng.random(len(batch["image_present"]))
    drop_image = np.flatnonzero(u < settings.image_dropout)
    drop_vitals = np.flatnonzero((u >= settings.image_dropout) & (u < settings.image_dropout + settings.vitals_dropout))
    if drop_image.size:
        batch = withhold(batch, "image", drop_image)
    if drop_vitals.size:
        batch = withhold(batch, "vitals", drop_vitals)
    return batch


#: Training targets beside the outcome, as ``inference.synth.CohortArrays`` names them (any may be absent).
AUX_KEYS = ("finding_label", "image_factors", "vital_factors")


def _seg_loss(
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


def _concept_loss(
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


def _image_batches(model: FusionModel, inputs: Mapping[str, np.ndarray], batch_size: int) -> Any:
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
        for start, image in _image_batches(model, inputs, batch_size):
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
    with the concept losses until the validation split's stops improving (an epoch costs milliseconds). On
    the evaluation cohort this took model 0.3.0's branch from WMD grade r 0.84 to 0.91, old-infarct AUROC 0.961
    to 0.981 and lacune count r 0.62 to 0.69. Returns the validation concept loss before and after.
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
            return float(_concept_loss(head(x[val_idx]), factors[val_idx], IMAGE_CONCEPTS, seen).item())

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
            loss = _concept_loss(head(x[rows]), factors[rows], IMAGE_CONCEPTS, np.ones(len(rows), bool))
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


def spot_readouts(model: FusionModel, inputs: Mapping[str, np.ndarray], batch_size: int = 16) -> np.ndarray:
    """The frozen spot detector's readout (N, F) of every patient (``ImageBranch.spot_readout``)."""
    assert model.image_branch is not None
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [
                model.image_branch.spot_readout(image).cpu().numpy()
                for _, image in _image_batches(model, inputs, batch_size)
            ]
        )


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
                for _, image in _image_batches(
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


#: L1 penalties (inverse strength, standardised features) ``fit_logistic_head`` chooses from by 5-fold log-loss
LOGISTIC_HEAD_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)


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


def _staged(variant: Variant, baselines: Mapping[str, FusionModel], device: torch.device) -> FusionModel:
    """A ``variant`` model whose branches are the baselines' (image, vitals), frozen: only the head learns."""
    image = baselines.get("image")
    spots: dict[str, Any] = {"spot_channels": 0}  # the image branch's spot detector, as the baseline has it
    if image is not None:
        spots = {"spot_channels": image.cfg.spot_channels, "spot_region": image.cfg.spot_region}
    model = FusionModel(FusionConfig(variant=variant, aux_seg=False, **spots)).to(device)
    frozen: list[torch.nn.Module] = []
    if model.image_branch is not None:
        model.image_branch.load_state_dict(baselines["image"].image_branch.state_dict())  # type: ignore[union-attr]
        frozen.append(model.image_branch)
    if model.vitals_branch is not None:
        model.vitals_branch.load_state_dict(baselines["vitals"].vitals_branch.state_dict())  # type: ignore[union-attr]
        frozen.append(model.vitals_branch)
    for branch in frozen:
        for param in branch.parameters():
            param.requires_grad_(False)
    return model


def fit(
    inputs: Arrays,
    outcome: np.ndarray,
    variant: Variant,
    seed: int,
    settings: TrainSettings,
    info: dict[str, object],
    aux: Mapping[str, np.ndarray] | None = None,
    baselines: Mapping[str, FusionModel] | None = None,
    extra_train: int = 0,
    shared: dict[str, np.ndarray] | None = None,
) -> FusionModel:
    """Train one variant with early stopping, then fit its temperature on the validation split.

    With ``baselines`` (trained "image" and "vitals" models) the model is trained in stages: its image and
    vitals branches are the baselines', frozen, so each patient's image concepts are computed once and an
    epoch costs only the LSTM's forward pass and the head. The fusion model is trained so, and the image
    baseline's head is refitted so on its own trained branch.

    ``aux`` (any of ``AUX_KEYS``, N rows each) adds the auxiliary losses: the lesion map against
    ``finding_label``, the image concepts against ``image_factors``, the vital concepts against
    ``vital_factors``.

    ``extra_train``: the last rows are training-only records (vitals without a rendered volume, say); the
    validation split is drawn from the others, so it is the same patients whatever is added.

    ``shared``: a dict the variants of one run pass along (the image baseline leaves its spot readouts there
    for the staged fusion model, whose image branch is the same frozen one).
    """
    aux = {k: v for k, v in (aux or {}).items() if k in AUX_KEYS and v is not None}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    staged = baselines is not None
    trains_cnn = not staged and variant in ("fusion", "image")
    use_seg = trains_cnn and "finding_label" in aux and settings.aux_seg_weight > 0
    use_image_concepts = trains_cnn and "image_factors" in aux and settings.aux_concept_weight > 0
    use_vital_concepts = (
        not staged and variant in ("fusion", "vitals") and "vital_factors" in aux and settings.aux_concept_weight > 0
    )
    n_split = len(outcome) - extra_train
    train_idx, val_idx = split_indices(n_split, settings.val_fraction, seed)
    train_idx = np.concatenate([train_idx, np.arange(n_split, len(outcome))])
    spots = None  # (N, F) spot readouts of the frozen detector, when the image branch has one
    if staged:
        model = _staged(variant, baselines, device)  # type: ignore[arg-type]
        cached = None
        if model.image_branch is not None:
            cached = (shared or {}).get("image_concepts")  # the same frozen branch, earlier in this run
            if cached is None or len(cached) != len(outcome):
                if model.image_branch.spots is not None:
                    spots = (shared or {}).get("spot_readouts")
                    if spots is None or len(spots) != len(outcome):
                        spots = spot_readouts(model, inputs)
                cached = image_embeddings(model, inputs, spot_features=spots)  # (N, E)
                if shared is not None:
                    shared["image_concepts"] = cached
    else:
        train_spots = trains_cnn and "finding_label" in aux and settings.spot_steps > 0
        cfg = FusionConfig(
            variant=variant, aux_seg=use_seg, spot_channels=FusionConfig.spot_channels if train_spots else 0
        )
        model = FusionModel(cfg).to(device)
        if train_spots:
            fit_spot_detector(model, inputs, aux["finding_label"], train_idx, settings)
            if variant == "image":  # no modality dropout: every patient's volume is the one seen in training
                spots = spot_readouts(model, inputs)
                if shared is not None:
                    shared["spot_readouts"] = spots
    log.info("%s: %d parameters on %s%s", variant, count_parameters(model), device, " (staged)" if staged else "")
    val_inputs = {k: v[val_idx] for k, v in inputs.items()}
    y_val = outcome[val_idx]
    epochs = settings.cnn_epochs if model.image_branch is not None and not staged else settings.epochs
    logistic_fit: dict[str, object] = {}
    started = time.monotonic()
    if staged and model.logistic is not None:  # fitted in closed form on the frozen concepts: no epochs
        logistic_fit = fit_logistic_head(model, cached, inputs, outcome, train_idx, seed)
        epochs = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    best_loss, best_state, best_epoch, stale = np.inf, copy.deepcopy(model.state_dict()), 0, 0
    # modality dropout: for a fusion model trained by epochs (the logistic head learns each pattern separately)
    use_dropout = variant == "fusion" and epochs > 0
    # staged training never reads the volumes again: leave them out of the per-batch copies
    batch_keys = [k for k in C.INPUT_NAMES if not (staged and k == "image")]

    def logits_of(batch: Mapping[str, np.ndarray], rows: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tensors = _to_device(batch, device)
        if staged:
            concepts = torch.from_numpy(cached[rows]).to(device)  # (B, K_img)
            logit, vital_concepts = model.fuse(concepts, *(tensors[k] for k in C.INPUT_NAMES[1:]))  # (B, 1)
            return logit, {} if vital_concepts is None else {"vital_concepts": vital_concepts}
        spot_features = None if spots is None else torch.from_numpy(spots[rows]).to(device)  # (B, F)
        return model.forward_with_aux(*(tensors[k] for k in C.INPUT_NAMES), spot_features)  # (B, 1), aux outputs

    def validation_logits() -> np.ndarray:
        if not staged and spots is None:
            return predict_logits(model, val_inputs)
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(val_idx), 128):
                rows = val_idx[start : start + 128]
                out.append(logits_of({k: inputs[k][rows] for k in batch_keys}, rows)[0].squeeze(1).cpu().numpy())
        return np.concatenate(out)

    def validation_loss() -> float:
        return log_loss(validation_logits(), y_val)

    concept_targets = [
        (key, factors, names)
        for key, factors, names, on in (
            ("image_concepts", "image_factors", IMAGE_CONCEPTS, use_image_concepts),
            ("vital_concepts", "vital_factors", VITAL_CONCEPTS, use_vital_concepts),
        )
        if on
    ]
    for epoch in range(1, epochs + 1):
        model.train()
        if staged:  # frozen branches stay in inference mode (BatchNorm statistics included)
            for branch in (model.image_branch, model.vitals_branch):
                if branch is not None:
                    branch.eval()
        order = rng.permutation(train_idx)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            rows = np.sort(order[start : start + settings.batch_size])
            batch = {k: inputs[k][rows] for k in batch_keys}
            if use_dropout:
                batch = _dropout_batch(batch, settings, rng)
            target = torch.from_numpy(outcome[rows].astype(np.float32)).to(device).unsqueeze(1)  # (B, 1)
            logit, out = logits_of(batch, rows)
            loss = F.binary_cross_entropy_with_logits(logit, target)
            if use_seg:
                loss = loss + settings.aux_seg_weight * _seg_loss(
                    out["seg"], aux["finding_label"][rows], batch["image_present"], settings
                )
            for key, factors, names in concept_targets:
                # taught only where the modality was seen: a withheld image has no findings to name
                seen = (
                    batch["image_present"][:, 0] > 0
                    if key == "image_concepts"
                    else batch["vitals_mask"].sum(axis=(1, 2)) > 0
                )
                loss = loss + settings.aux_concept_weight * _concept_loss(
                    out[key], aux[factors][rows], names, seen, settings.aux_concept_pos_weight
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        val_loss = validation_loss()
        log.info(
            "%s epoch %d: train loss %.4f, val loss %.4f (%.0fs)",
            variant,
            epoch,
            np.mean(losses),
            val_loss,
            time.monotonic() - started,
        )
        if val_loss < best_loss - 1e-4:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= settings.patience:
                log.info("%s: early stop after epoch %d (best %d)", variant, epoch, best_epoch)
                break
    model.load_state_dict(best_state)
    val_logits = validation_logits()
    model.cfg.temperature = fit_temperature(val_logits, y_val)
    val_metrics = binary_metrics(sigmoid(val_logits / model.cfg.temperature), y_val)
    model.cfg.info = {
        **info,
        "best_epoch": best_epoch,
        "train_seconds": round(time.monotonic() - started, 1),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "val_metrics": {k: round(v, 4) for k, v in val_metrics.items()},
        "modality_dropout": [settings.image_dropout, settings.vitals_dropout] if use_dropout else [0.0, 0.0],
        "aux_seg_weight": settings.aux_seg_weight if use_seg else 0.0,
        "aux_concept_weight": settings.aux_concept_weight if (use_image_concepts or use_vital_concepts) else 0.0,
        "staged_from_baselines": staged,
        "spot_steps": settings.spot_steps if model.image_branch is not None and model.image_branch.spots else 0,
        **({"logistic_head": logistic_fit} if logistic_fit else {}),
    }
    log.info("%s: temperature %.3f, validation %s", variant, model.cfg.temperature, model.cfg.info["val_metrics"])
    return model.cpu().eval()


def run(
    seed: int = 0,
    n: int = 2000,
    out_dir: Path = DEFAULT_OUT,
    variants: tuple[Variant, ...] = VARIANTS,
    settings: TrainSettings | None = None,
    cohort: Any = None,
    head: Any = None,
) -> Path:
    """Train ``variants`` on one cohort (generated from ``seed`` unless given) into ``out_dir/<variant>/``.

    ``head``: the head cohort (``TrainSettings.head_extra`` patients of ``seed`` after the calibration cohort
    unless given); staged heads learn from it too, the CNN never sees it."""
    settings = settings or TrainSettings()
    torch.set_num_threads(settings.threads)
    cohort = cohort if cohort is not None else make_cohort(n, seed)
    inputs = cohort_inputs(cohort)
    outcome = np.asarray(cohort.outcome, dtype=np.float64)
    heads_learn_more = settings.staged and any(v in ("image", "fusion") for v in variants)
    if head is None and heads_learn_more and settings.head_extra > 0:
        # after the training cohort, the vitals-only records and the calibration cohort: never used elsewhere
        start = len(outcome) + settings.vitals_extra + settings.calibration_extra
        head = make_cohort(settings.head_extra, seed, start=start)
    n_head = len(head.outcome) if head is not None and heads_learn_more else 0
    from inference.synth import SYNTH_VERSION

    info = {
        "model_version": C.MODEL_VERSION,
        "synth_version": SYNTH_VERSION,
        "seed": seed,
        "n": int(len(outcome)),
        "cohort": f"inference.synth.make_arrays(n={len(outcome)}, seed={seed})",
        "prevalence": round(float(outcome.mean()), 4),
    }
    trained: dict[str, FusionModel] = {}
    shared: dict[str, np.ndarray] = {}
    aux = {k: getattr(cohort, k) for k in AUX_KEYS if getattr(cohort, k, None) is not None}
    # the staged heads' patients: the cohort, followed by the head cohort when there is one
    h_inputs, h_outcome, h_aux = with_head_records(inputs, outcome, aux, head) if n_head else (inputs, outcome, aux)
    h_info = {**info, "head_records_added": n_head} if n_head else info
    for variant in sorted(variants, key=VARIANTS_BASELINES_FIRST.index):
        baselines = None
        if variant == "fusion" and settings.staged:
            baselines = {v: trained[v] if v in trained else load(out_dir / v) for v in ("image", "vitals")}
        if variant == "vitals" and settings.vitals_extra > 0 and "vital_factors" in aux:
            # patients after the cohort's own, from the same seed: never in its validation split
            extra = make_vitals_cohort(settings.vitals_extra, seed, start=len(outcome))
            v_inputs, v_outcome, v_aux = with_vitals_records(inputs, outcome, aux, extra)
            v_info = {**info, "vitals_records_added": len(extra)}
            model = fit(v_inputs, v_outcome, variant, seed, settings, v_info, v_aux, extra_train=len(extra))
        elif variant == "fusion":  # staged, the head learns from the head cohort as well (n_head is 0 otherwise)
            model = fit(h_inputs, h_outcome, variant, seed, settings, h_info, h_aux, baselines, n_head, shared)
        else:
            model = fit(inputs, outcome, variant, seed, settings, info, aux, baselines, shared=shared)
            if variant == "image" and settings.staged:
                # the heads trained beside the CNN read maps and concepts that kept moving, on patients the CNN
                # had learnt: refit both, in turn, on the frozen branch (the concept head on its pooled features,
                # then the risk head), on the training split and the head cohort, which the CNN never saw
                refit_info: dict[str, object] = {}
                if "image_factors" in h_aux:
                    pooled = image_pooled(model, inputs, shared.get("spot_readouts"))  # (N, n_pooled)
                    if n_head:
                        head_rows = {k: v[len(outcome) :] for k, v in h_inputs.items()}  # views, no copy
                        pooled = np.concatenate([pooled, image_pooled(model, head_rows)])
                    train_idx, val_idx = split_indices(len(outcome), settings.val_fraction, seed)
                    split = (np.concatenate([train_idx, len(outcome) + np.arange(n_head)]), val_idx)
                    refit_info["concept_head_refit"] = refit_concept_head(
                        model, pooled, h_aux["image_factors"], h_inputs["image_present"], split, settings
                    )
                    shared["image_concepts"] = concepts_of_pooled(model, pooled)  # (N + n_head, K_img)
                info_refit = {**h_info, **refit_info}
                model = fit(
                    h_inputs, h_outcome, variant, seed, settings, info_refit, h_aux, {"image": model}, n_head, shared
                )
        save(model, out_dir / variant)
        trained[variant] = model
        log.info("saved %s", out_dir / variant)
    if settings.calibration_extra > 0:
        calibrate_saved(trained, cohort, seed, settings, out_dir)
    return out_dir


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=2000, help="cohort size (train + validation)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs, help="vitals and staged fusion")
    parser.add_argument("--cnn-epochs", type=int, default=TrainSettings.cnn_epochs, help="variants training the CNN")
    parser.add_argument("--patience", type=int, default=TrainSettings.patience)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--threads", type=int, default=TrainSettings.threads)
    parser.add_argument("--end-to-end", action="store_true", help="train the fusion model from scratch, not staged")
    parser.add_argument(
        "--vitals-extra", type=int, default=TrainSettings.vitals_extra, help="vitals-only records for the vitals branch"
    )
    parser.add_argument(
        "--spot-steps", type=int, default=TrainSettings.spot_steps, help="patch batches for the spot detector"
    )
    parser.add_argument(
        "--spot-negatives",
        type=float,
        nargs=2,
        default=TrainSettings.spot_negatives,
        metavar=("LACUNE", "VESSEL"),
        help="shares of hard-negative patches for the spot detector (off in the shipped model)",
    )
    parser.add_argument(
        "--calibration-extra",
        type=int,
        default=TrainSettings.calibration_extra,
        help="held-out patients added to the validation split for calibration",
    )
    parser.add_argument(
        "--head-extra",
        type=int,
        default=TrainSettings.head_extra,
        help="patients the CNN never sees from which the staged heads also learn (0: the training split only)",
    )
    parser.add_argument(
        "--calibrate-only", action="store_true", help="refit the calibration of the models already in --out"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not reuse_freed_memory():
        log.info("not glibc: large tensors are mapped and unmapped per step (slower training)")
    settings = TrainSettings(
        epochs=args.epochs,
        cnn_epochs=args.cnn_epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        staged=not args.end_to_end,
        vitals_extra=args.vitals_extra,
        spot_steps=args.spot_steps,
        spot_negatives=(args.spot_negatives[0], args.spot_negatives[1]),
        calibration_extra=args.calibration_extra,
        head_extra=args.head_extra,
    )
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    if args.calibrate_only:
        torch.set_num_threads(settings.threads)
        models = {v: load(args.out / v) for v in variants}
        calibrate_saved(models, make_cohort(args.n, args.seed), args.seed, settings, args.out)
        return
    run(args.seed, args.n, args.out, variants, settings)


if __name__ == "__main__":
    main()
