"""What the sites learn: the fusion model less its image branch, trained on precomputed image concepts.

``fresh_model`` starts every run (central, federated, site alone, DP) from the same seeded initialisation of the
vitals branch and the fusion head; ``weights``/``set_weights`` are what travels between server and clients (the
trainable tensors only, in a fixed order); ``train_local`` is one site's training (FedProx's proximal term when
given the global weights); ``train_dp`` the same with DP-SGD (Opacus: per-example clipping, Gaussian noise, RDP
accountant); ``to_fusion_model`` puts the result back into the shipped model, which exports as before.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from modelling.branches import VitalsBranch
from modelling.model import FusionModel, LogisticHead, load
from modelling.train.settings import DEFAULT_OUT

log = logging.getLogger(__name__)

#: The model inputs a site's training reads, in ``FusionModel.fuse``'s order after the image concepts.
FUSE_INPUTS: tuple[str, ...] = ("image_present", "vitals", "vitals_mask", "vitals_delta", "demographics")


@dataclass(frozen=True)
class Recipe:
    """How every model of a comparison is trained (the same for central, federated and site-alone)."""

    rounds: int = 20  # federated rounds; central and site-alone training run rounds x local_epochs epochs
    local_epochs: int = 1
    lr: float = 1e-3  # 3e-3 overfits the 1,800 pooled patients within 20 epochs (validation AUROC falls)
    dp_lr: float = 3e-3  # DP-SGD: clipped, noisy gradients; a larger step does better there
    batch_size: int = 64
    weight_decay: float = 1e-4
    mu: float = 0.01  # FedProx proximal weight
    personal_epochs: int = 2  # a site's fine-tuning of the federated model (personalisation)
    personal_lr: float = 1e-3
    max_grad_norm: float = 1.0  # DP-SGD per-example clipping bound
    delta: float = 1e-5

    @property
    def epochs(self) -> int:
        return self.rounds * self.local_epochs


def shipped_model(weights_dir: Path = DEFAULT_OUT) -> FusionModel:
    """The shipped fusion model (its frozen image branch computes the image concepts)."""
    return load(weights_dir / "fusion")


def fresh_model(base: FusionModel, seed: int) -> FusionModel:
    """``base`` without its image branch, the vitals branch (LSTM, projection, concept head) and the fusion head's
    weights re-initialised from ``seed``; the vitals statistics' normalisation (``stats_norm``) and the head's
    standardisation (``mean``/``scale``) stay the shipped model's and frozen. Trainable: what ``weights`` lists."""
    model = copy.deepcopy(base)
    model.image_branch = None  # the concepts are computed once per patient by the shipped branch
    assert model.vitals_branch is not None and model.logistic is not None
    torch.manual_seed(seed)
    fresh_vitals = VitalsBranch(model.cfg)
    fresh_head = LogisticHead(model.cfg)
    for name in ("lstm", "proj", "concept_head"):
        getattr(model.vitals_branch, name).load_state_dict(getattr(fresh_vitals, name).state_dict())
    model.logistic.linear.load_state_dict(fresh_head.linear.state_dict())
    for param in model.parameters():
        param.requires_grad_(False)
    for name in trainable_names(model):
        model.get_parameter(name).requires_grad_(True)
    return model


def trainable_names(model: FusionModel) -> list[str]:
    """The parameters the sites learn and exchange, in a fixed order (the vitals branch less its normalisation,
    then the fusion head's weights)."""
    return [
        n
        for n, _ in model.named_parameters()
        if n.startswith(("vitals_branch.lstm.", "vitals_branch.proj.", "vitals_branch.concept_head.", "logistic."))
    ]


def weights(model: FusionModel) -> list[np.ndarray]:
    """The exchanged tensors as numpy arrays (copies), in ``trainable_names`` order."""
    return [model.get_parameter(n).detach().cpu().numpy().copy() for n in trainable_names(model)]


def set_weights(model: FusionModel, values: list[np.ndarray]) -> None:
    names = trainable_names(model)
    if len(values) != len(names):
        raise ValueError(f"expected {len(names)} weight tensors, got {len(values)}")
    with torch.no_grad():
        for name, value in zip(names, values, strict=True):
            param = model.get_parameter(name)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def to_fusion_model(trained: FusionModel, base: FusionModel) -> FusionModel:
    """The shipped model with ``trained``'s vitals branch and fusion head: what ``modelling.export`` exports.

    Its calibration is the identity (temperature 1, bias 0): the head was trained on the outcome, and the shipped
    model's calibration was fitted to the shipped head's logits; a site recalibrates it on its own patients."""
    out = copy.deepcopy(base)
    out.cfg.temperature, out.cfg.calibration_bias = 1.0, 0.0
    assert out.vitals_branch is not None and out.logistic is not None
    assert trained.vitals_branch is not None and trained.logistic is not None
    out.vitals_branch.load_state_dict(trained.vitals_branch.state_dict())
    out.logistic.load_state_dict(trained.logistic.state_dict())
    return out.eval()


class FuseForward(nn.Module):
    """(image concepts, *FUSE_INPUTS) -> logit (B, 1): ``FusionModel.fuse`` as one module for a DataLoader's
    batches (and for Opacus, which wraps a module)."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_concepts: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.fuse(image_concepts, *inputs)[0]  # (B, 1)


def train_mode(model: FusionModel) -> None:
    """Training mode for what learns; the frozen normalisation keeps its shipped statistics."""
    model.train()
    assert model.vitals_branch is not None
    model.vitals_branch.stats_norm.eval()


def tensors(data: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """A site's arrays as the tensors ``FuseForward`` reads: image concepts, then ``FUSE_INPUTS``."""
    return [torch.from_numpy(np.ascontiguousarray(data[k], dtype=np.float32)) for k in ("image_concepts", *FUSE_INPUTS)]


def predict_logits(model: FusionModel, data: dict[str, np.ndarray], batch_size: int = 512) -> np.ndarray:
    """Logits (N,) of the site model on precomputed image concepts (no calibration: the model learns its own)."""
    model.eval()
    xs = tensors(data)
    out = []
    with torch.no_grad():
        for start in range(0, len(xs[0]), batch_size):
            out.append(FuseForward(model)(*(x[start : start + batch_size] for x in xs)).squeeze(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _optimizer(model: FusionModel, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def train_local(
    model: FusionModel,
    data: dict[str, np.ndarray],
    epochs: int,
    recipe: Recipe,
    seed: int,
    *,
    global_weights: list[np.ndarray] | None = None,
    lr: float | None = None,
) -> float:
    """Train ``model`` in place on one site's (or the pooled) data for ``epochs``; returns the last epoch's mean loss.

    With ``global_weights`` (a federated round) the loss gains FedProx's proximal term mu/2 ||w - w_global||^2,
    which keeps a site's update near the global model when the sites' data differ (non-IID)."""
    xs = tensors(data)
    y = torch.from_numpy(np.asarray(data["outcome"], dtype=np.float32)).unsqueeze(1)  # (N, 1)
    names = trainable_names(model)
    anchor = None
    if global_weights is not None and recipe.mu > 0:
        anchor = [torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in global_weights]
    opt = _optimizer(model, recipe.lr if lr is None else lr, recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    forward = FuseForward(model)
    mean_loss = float("nan")
    for _ in range(epochs):
        train_mode(model)
        order = torch.randperm(len(y), generator=gen)
        losses = []
        for start in range(0, len(order), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            logit = forward(*(x[rows] for x in xs))  # (B, 1)
            loss = F.binary_cross_entropy_with_logits(logit, y[rows])
            if anchor is not None:
                prox = sum(((model.get_parameter(n) - a) ** 2).sum() for n, a in zip(names, anchor, strict=True))
                loss = loss + 0.5 * recipe.mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
        mean_loss = float(np.mean(losses))
    model.eval()
    return mean_loss


# ------------------------------------------------------------------------------------------------------------
# DP-SGD (Opacus)
# ------------------------------------------------------------------------------------------------------------
def _dp_lstm(model: FusionModel) -> nn.Module:
    """Swap the vitals branch's ``nn.LSTM`` for Opacus's ``DPLSTM`` (same state-dict keys, same numbers; its
    per-example gradients are computable); returns the original to swap back."""
    from opacus.layers import DPLSTM

    branch = model.vitals_branch
    assert branch is not None
    lstm = branch.lstm
    dp = DPLSTM(lstm.input_size, lstm.hidden_size, batch_first=True)
    dp.load_state_dict(lstm.state_dict())
    branch.lstm = dp  # type: ignore[assignment,unused-ignore]
    return lstm


def trainable_names_of(original_lstm: nn.Module, model: FusionModel) -> list[str]:
    """``trainable_names`` while the LSTM is swapped for DPLSTM: the names the exchanged weights carry."""
    branch = model.vitals_branch
    assert branch is not None
    swapped, branch.lstm = branch.lstm, original_lstm  # type: ignore[assignment,unused-ignore]
    try:
        return trainable_names(model)
    finally:
        branch.lstm = swapped  # type: ignore[assignment,unused-ignore]


def _restore_lstm(model: FusionModel, original: nn.Module) -> None:
    branch = model.vitals_branch
    assert branch is not None
    original.load_state_dict(branch.lstm.state_dict())
    branch.lstm = original  # type: ignore[assignment,unused-ignore]
    for param in original.parameters():
        param.requires_grad_(True)


#: The RDP orders the epsilon is minimised over: Opacus's defaults and higher ones, which small sites (a large sampling
#: rate) need for a tight bound; more orders only ever lower the reported epsilon.
RDP_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 257)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def noise_for(target_epsilon: float, recipe: Recipe, n: int, steps: int) -> float:
    """The noise multiplier for which ``steps`` DP-SGD steps at sampling rate batch/n spend ``target_epsilon``
    (RDP accountant, ``recipe.delta``)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=recipe.delta,
            sample_rate=min(1.0, recipe.batch_size / n),
            steps=steps,
            accountant="rdp",
            alphas=RDP_ORDERS,
        )
    )


@dataclass
class DPState:
    """One party's privacy ledger: its noise multiplier and every (noise, sample rate, steps) it has spent, composed
    by the RDP accountant (across all rounds of a federated run)."""

    noise_multiplier: float
    history: list[tuple[float, float, int]]

    def epsilon(self, delta: float) -> float:
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return float(accountant.get_epsilon(delta, alphas=RDP_ORDERS)) if self.history else 0.0


def train_dp(
    model: FusionModel,
    data: dict[str, np.ndarray],
    epochs: int,
    recipe: Recipe,
    seed: int,
    state: DPState,
    *,
    global_weights: list[np.ndarray] | None = None,
) -> float:
    """DP-SGD on one party's data, in place: Poisson-sampled batches, each example's gradient clipped to
    ``recipe.max_grad_norm``, Gaussian noise of ``state.noise_multiplier`` x that bound; the steps are added to
    ``state.history``. Returns the epsilon spent so far (``recipe.delta``).

    With ``global_weights`` (a federated round) FedProx's proximal pull is applied after each noisy step, as a
    data-independent step (w -= lr mu (w - w_global)), which costs no privacy."""
    from opacus import PrivacyEngine

    xs = tensors(data)
    y = torch.from_numpy(np.asarray(data["outcome"], dtype=np.float32)).unsqueeze(1)
    n = len(y)
    original = _dp_lstm(model)
    try:
        train_mode(model)
        forward = FuseForward(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.dp_lr, weight_decay=0.0)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*xs, y),
            batch_size=min(recipe.batch_size, n),
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        # secure_mode off: the noise comes from torch's seeded generator, so a run is reproducible; Opacus's secure
        # mode (a cryptographically secure generator, torchcsprng) is for a production release (MODEL_CARD.md)
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        # the first layer's inputs need no gradient; Opacus's hooks fire all the same (and say so)
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        dp_forward, dp_opt, dp_loader = engine.make_private(
            module=forward,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=state.noise_multiplier,
            max_grad_norm=recipe.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed + 7919),
        )
        anchor = None
        if global_weights is not None and recipe.mu > 0:
            # by state-dict name: DPLSTM answers to nn.LSTM's names there (its own parameters are named otherwise)
            current = model.state_dict(keep_vars=True)
            pairs = [
                (current[n], torch.from_numpy(np.asarray(w, dtype=np.float32)))
                for n, w in zip(trainable_names_of(original, model), global_weights, strict=True)
            ]
            anchor = pairs
        for _ in range(epochs):
            train_mode(model)
            for *batch, target in dp_loader:
                if len(target) == 0:
                    continue  # Poisson sampling can draw an empty batch; Opacus counts it all the same
                loss = F.binary_cross_entropy_with_logits(dp_forward(*batch), target)
                dp_opt.zero_grad(set_to_none=True)
                loss.backward()
                dp_opt.step()
                if anchor is not None:
                    with torch.no_grad():
                        for p, a in anchor:
                            p.sub_(recipe.dp_lr * recipe.mu * (p - a))
        state.history.extend(engine.accountant.history)
        dp_forward.remove_hooks()
    finally:
        _restore_lstm(model, original)
        model.eval()
    return state.epsilon(recipe.delta)
