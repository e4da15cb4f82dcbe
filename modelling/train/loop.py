"""One variant's training: the model built (or staged from the baselines), its epochs, early stopping, temperature."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference import contract as C
from modelling.calibrate import binary_metrics, fit_temperature, log_loss, sigmoid
from modelling.config import IMAGE_CONCEPTS, VITAL_CONCEPTS, FusionConfig, Variant
from modelling.model import FusionModel, count_parameters
from modelling.train.data import AUX_KEYS, Arrays, split_indices, withhold
from modelling.train.features import image_embeddings, predict_logits, spot_readouts, to_device
from modelling.train.heads import fit_logistic_head
from modelling.train.losses import concept_loss, seg_loss
from modelling.train.settings import TrainSettings
from modelling.train.spots import fit_spot_detector

log = logging.getLogger(__name__)


def _dropout_batch(batch: Arrays, settings: TrainSettings, rng: np.random.Generator) -> Arrays:
    u = rng.random(len(batch["image_present"]))
    drop_image = np.flatnonzero(u < settings.image_dropout)
    drop_vitals = np.flatnonzero((u >= settings.image_dropout) & (u < settings.image_dropout + settings.vitals_dropout))
    if drop_image.size:
        batch = withhold(batch, "image", drop_image)
    if drop_vitals.size:
        batch = withhold(batch, "vitals", drop_vitals)
    return batch


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
        tensors = to_device(batch, device)
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
                loss = loss + settings.aux_seg_weight * seg_loss(
                    out["seg"], aux["finding_label"][rows], batch["image_present"], settings
                )
            for key, factors, names in concept_targets:
                # taught only where the modality was seen: a withheld image has no findings to name
                seen = (
                    batch["image_present"][:, 0] > 0
                    if key == "image_concepts"
                    else batch["vitals_mask"].sum(axis=(1, 2)) > 0
                )
                loss = loss + settings.aux_concept_weight * concept_loss(
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
