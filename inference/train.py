"""Train the fusion model and its single-modality baselines on the synthetic cohort.

One command reproduces the shipped weights (the cohort, the split, the initialisation, the
batch order and the modality dropout all follow from ``--seed``):

    python -m inference.train --seed 0 --n 2000 --variant all --threads 1 --out inference/weights

Per variant, ``<out>/<variant>/`` receives ``weights.pt`` and ``config.json`` (the FusionConfig,
including the calibration temperature and a training summary). A GPU is used when present.

Order: the image-only and vitals-only baselines first, then the fusion model in stages: its image and
vitals branches are the baselines', frozen (so each volume is encoded once, not once per epoch: what keeps
training inside the two-core CPU budget), and the demographics branch and the fusion head are trained on
the fusion objective. ``--end-to-end`` trains the fusion model from scratch instead (several times slower
on a CPU). The vitals baseline also learns from ``--vitals-extra`` vitals-only records (the same cohort's
next patients, no volume rendered: cheap), which the image branch cannot use.

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
from inference.calibrate import binary_metrics, fit_temperature, log_loss, sigmoid
from inference.model import (
    BINARY_CONCEPTS,
    IMAGE_CONCEPTS,
    VARIANTS,
    VITAL_CONCEPTS,
    FusionConfig,
    FusionModel,
    Variant,
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


def make_cohort(n: int, seed: int, *, workers: int = 2, cache: bool = True) -> Any:
    """``inference.synth.make_arrays(n, seed)``, kept on disk so training and evaluation do not redo it.

    Generation is deterministic in (n, seed), so a cached copy is the same cohort; rendering the volumes
    makes regenerating it the slowest step of a training run.
    """
    from inference.synth import SYNTH_VERSION, CohortArrays, make_arrays

    # The generator's version is part of the key: a cohort cached by an older generator is another cohort.
    log.info("synthetic cohort n=%d seed=%d", n, seed)
    return _cached(
        f"cohort-v{SYNTH_VERSION}-n{n}-seed{seed}.npz",
        lambda: make_arrays(n, seed, workers=workers),
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
    """Calibrated probabilities (N,) using the model's stored temperature."""
    return sigmoid(predict_logits(model, inputs) / model.cfg.temperature)


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


def image_embeddings(model: FusionModel, inputs: Mapping[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """The image branch's raw concepts (N, K) of every patient, computed once (the branch is frozen)."""
    assert model.image_branch is not None
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs["image"]), batch_size):
            image = torch.from_numpy(inputs["image"][start : start + batch_size]).to(device)  # (B, 1, D, H, W)
            present = torch.from_numpy(inputs["image_present"][start : start + batch_size]).to(device)  # (B, 1)
            out.append(model.image_branch(image * present.view(-1, 1, 1, 1, 1)).cpu().numpy())  # (B, E)
    return np.concatenate(out)


def _staged_fusion(baselines: Mapping[str, FusionModel], device: torch.device) -> FusionModel:
    """A fusion model whose branches are the baselines' image and vitals branches, frozen: only the head learns."""
    model = FusionModel(FusionConfig(variant="fusion", aux_seg=False)).to(device)
    model.image_branch.load_state_dict(baselines["image"].image_branch.state_dict())  # type: ignore[union-attr]
    model.vitals_branch.load_state_dict(baselines["vitals"].vitals_branch.state_dict())  # type: ignore[union-attr]
    for branch in (model.image_branch, model.vitals_branch):
        for param in branch.parameters():  # type: ignore[union-attr]
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
) -> FusionModel:
    """Train one variant with early stopping, then fit its temperature on the validation split.

    With ``baselines`` (trained "image" and "vitals" models) the fusion model is trained in stages: its
    image and vitals branches are the baselines', frozen, so each patient's image concepts are computed
    once and an epoch costs only the LSTM's forward pass and the head.

    ``aux`` (any of ``AUX_KEYS``, N rows each) adds the auxiliary losses: the lesion map against
    ``finding_label``, the image concepts against ``image_factors``, the vital concepts against
    ``vital_factors``.

    ``extra_train``: the last rows are training-only records (vitals without a rendered volume, say); the
    validation split is drawn from the others, so it is the same patients whatever is added.
    """
    aux = {k: v for k, v in (aux or {}).items() if k in AUX_KEYS and v is not None}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    staged = variant == "fusion" and baselines is not None
    trains_cnn = not staged and variant in ("fusion", "image")
    use_seg = trains_cnn and "finding_label" in aux and settings.aux_seg_weight > 0
    use_image_concepts = trains_cnn and "image_factors" in aux and settings.aux_concept_weight > 0
    use_vital_concepts = (
        not staged and variant in ("fusion", "vitals") and "vital_factors" in aux and settings.aux_concept_weight > 0
    )
    if staged:
        model = _staged_fusion(baselines, device)  # type: ignore[arg-type]
        cached = image_embeddings(model, inputs)  # (N, E)
    else:
        model = FusionModel(FusionConfig(variant=variant, aux_seg=use_seg)).to(device)
    log.info("%s: %d parameters on %s%s", variant, count_parameters(model), device, " (staged)" if staged else "")
    n_split = len(outcome) - extra_train
    train_idx, val_idx = split_indices(n_split, settings.val_fraction, seed)
    train_idx = np.concatenate([train_idx, np.arange(n_split, len(outcome))])
    val_inputs = {k: v[val_idx] for k, v in inputs.items()}
    y_val = outcome[val_idx]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    epochs = settings.cnn_epochs if model.image_branch is not None and not staged else settings.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best_loss, best_state, best_epoch, stale = np.inf, copy.deepcopy(model.state_dict()), 0, 0
    use_dropout = variant == "fusion"
    # staged training never reads the volumes again: leave them out of the per-batch copies
    batch_keys = [k for k in C.INPUT_NAMES if not (staged and k == "image")]

    def logits_of(batch: Mapping[str, np.ndarray], rows: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tensors = _to_device(batch, device)
        if staged:
            concepts = torch.from_numpy(cached[rows]).to(device)  # (B, K_img)
            logit, vital_concepts = model.fuse(concepts, *(tensors[k] for k in C.INPUT_NAMES[1:]))  # (B, 1)
            return logit, {} if vital_concepts is None else {"vital_concepts": vital_concepts}
        return model.forward_with_aux(*(tensors[k] for k in C.INPUT_NAMES))  # (B, 1), aux outputs

    def validation_loss() -> float:
        if not staged:
            return log_loss(predict_logits(model, val_inputs), y_val)
        model.eval()
        with torch.no_grad():
            logit, _ = logits_of({k: inputs[k][val_idx] for k in batch_keys}, val_idx)
        return log_loss(logit.squeeze(1).cpu().numpy(), y_val)

    concept_targets = [
        (key, factors, names)
        for key, factors, names, on in (
            ("image_concepts", "image_factors", IMAGE_CONCEPTS, use_image_concepts),
            ("vital_concepts", "vital_factors", VITAL_CONCEPTS, use_vital_concepts),
        )
        if on
    ]
    started = time.monotonic()
    for epoch in range(1, epochs + 1):
        model.train()
        if staged:  # frozen branches stay in inference mode (BatchNorm statistics included)
            model.image_branch.eval()  # type: ignore[union-attr]
            model.vitals_branch.eval()  # type: ignore[union-attr]
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
    val_logits = predict_logits(model, val_inputs)
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
) -> Path:
    """Train ``variants`` on one cohort (generated from ``seed`` unless given) into ``out_dir/<variant>/``."""
    settings = settings or TrainSettings()
    torch.set_num_threads(settings.threads)
    cohort = cohort if cohort is not None else make_cohort(n, seed)
    inputs = cohort_inputs(cohort)
    outcome = np.asarray(cohort.outcome, dtype=np.float64)
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
    for variant in sorted(variants, key=VARIANTS_BASELINES_FIRST.index):
        baselines = None
        if variant == "fusion" and settings.staged:
            baselines = {v: trained[v] if v in trained else load(out_dir / v) for v in ("image", "vitals")}
        aux = {k: getattr(cohort, k) for k in AUX_KEYS if getattr(cohort, k, None) is not None}
        if variant == "vitals" and settings.vitals_extra > 0 and "vital_factors" in aux:
            # patients after the cohort's own, from the same seed: never in its validation split
            extra = make_vitals_cohort(settings.vitals_extra, seed, start=len(outcome))
            v_inputs, v_outcome, v_aux = with_vitals_records(inputs, outcome, aux, extra)
            v_info = {**info, "vitals_records_added": len(extra)}
            model = fit(v_inputs, v_outcome, variant, seed, settings, v_info, v_aux, extra_train=len(extra))
        else:
            model = fit(inputs, outcome, variant, seed, settings, info, aux, baselines)
        save(model, out_dir / variant)
        trained[variant] = model
        log.info("saved %s", out_dir / variant)
    return out_dir


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TrainSettings(
        epochs=args.epochs,
        cnn_epochs=args.cnn_epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        staged=not args.end_to_end,
        vitals_extra=args.vitals_extra,
    )
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    run(args.seed, args.n, args.out, variants, settings)


if __name__ == "__main__":
    main()
