"""The StrokeWatch CNN-LSTM fusion network: ``FusionModel``, its heads, and saving/loading it.

Mid-level fusion through named concepts. Each branch (``modelling.branches``) ends in the risk factors it
can see, gated by presence: the image branch's ``IMAGE_CONCEPTS`` from a 3D CNN over the brain volume
(B, 1, D, H, W), the vitals branch's ``VITAL_CONCEPTS`` from an LSTM over the vitals grid (B, T, F). The
fusion model's head (``LogisticHead``) keeps one logistic model per presence pattern over those concepts,
their image x vital products and the demographics, so a missing image or an empty vitals window is a
*known* state it has learnt to score, not an out-of-distribution input.

The same module also builds the single-modality baselines (``variant="image"`` / ``"vitals"``): the same
branch + a demographics embedding + a small MLP head, with the other branch absent. The configuration and
the concept vocabulary are in ``modelling.config``; tensor sizes come from ``inference.contract``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference import contract as C
from modelling.branches import DemographicsBranch, ImageBranch, VitalsBranch
from modelling.config import BINARY_CONCEPTS, CONCEPT_INPUTS, IMAGE_CONCEPTS, VITAL_CONCEPTS, FusionConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


def concept_values(raw: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Concept head outputs (B, K) -> what the fusion head reads: probabilities for yes/no concepts."""
    binary = torch.tensor([n in BINARY_CONCEPTS for n in names], device=raw.device)  # (K,)
    return torch.where(binary, torch.sigmoid(raw), raw)  # (B, K)


#: The presence patterns ``LogisticHead`` keeps one logistic model for, in the order of its indicator inputs.
PRESENCE_PATTERNS: tuple[str, ...] = ("both", "image", "vitals", "none")


class LogisticHead(nn.Module):
    """The fusion model's head (since 0.6.0): one logistic model per presence pattern, in one linear layer.

    Pattern "both" reads the demographics, the image concepts, the vital concepts, each vital concept's positive
    part (its excess over the population: z-scores above the mean, a rising trend, an AF probability) and every
    image concept times every such excess (cross-modal interactions, an old infarct on labile blood pressure among
    them); "image" the demographics and image concepts; "vitals" the demographics, vital concepts and their
    excesses; "none" the demographics. Each pattern's features are standardised (``mean``, ``scale``: buffers
    fitted with the weights) and zeroed unless the patient has that pattern, and each pattern has its own
    intercept (the weight of its indicator), so a missing modality's values cannot move the score.

    ``modelling.train.heads.fit_logistic_head`` fits it in closed form, L1-penalised, on the frozen branches' concepts
    (its penalty chosen by cross-validated log-loss); it is differentiable, so end-to-end training can learn it too.
    """

    mean: torch.Tensor  # buffers (total,)
    scale: torch.Tensor
    assign: torch.Tensor  # structure, not saved: (total, G), (K_vit, G), (1, G)
    vital_assign: torch.Tensor
    image_assign: torch.Tensor

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        kd, ki, kv = cfg.n_demographics, cfg.image_concepts, cfg.vital_concepts
        self.widths = {"both": kd + ki + 2 * kv + ki * kv, "image": kd + ki, "vitals": kd + 2 * kv, "none": kd}
        total = sum(self.widths.values())
        self.register_buffer("mean", torch.zeros(total))
        self.register_buffer("scale", torch.ones(total))
        self.linear = nn.Linear(len(PRESENCE_PATTERNS) + total, 1, bias=False)
        # which input (``C.LOGIT_TERMS``, less the reference) each feature is read from; structure, not weights
        groups = {name: g for g, name in enumerate(C.LOGIT_TERMS[1:])}
        vital_groups = [groups[CONCEPT_INPUTS[c]] for c in VITAL_CONCEPTS]
        columns = {
            "demographics": [groups["demographics"]] * kd,
            "image": [groups[CONCEPT_INPUTS[c]] for c in IMAGE_CONCEPTS],
            "vitals": vital_groups + vital_groups,  # the concepts, then their excesses
        }
        layout = {
            "both": ["demographics", "image", "vitals"],
            "image": ["demographics", "image"],
            "vitals": ["demographics", "vitals"],
            "none": ["demographics"],
        }
        assign = torch.zeros(total, len(groups))  # (total, G); the products' rows stay zero: ``terms`` splits them
        start = 0
        for pattern in PRESENCE_PATTERNS:
            rows = [g for part in layout[pattern] for g in columns[part]]
            assign[torch.arange(start, start + len(rows)), torch.tensor(rows)] = 1.0
            start += self.widths[pattern]
        vital_assign = torch.zeros(kv, len(groups))  # (K_vit, G)
        vital_assign[torch.arange(kv), torch.tensor(vital_groups)] = 1.0
        image_assign = torch.zeros(1, len(groups))  # (1, G)
        image_assign[0, groups["image"]] = 1.0
        self.register_buffer("assign", assign, persistent=False)
        self.register_buffer("vital_assign", vital_assign, persistent=False)
        self.register_buffer("image_assign", image_assign, persistent=False)

    def features(
        self,
        demographics: torch.Tensor,
        image_values: torch.Tensor,
        image_present: torch.Tensor,
        vital_values: torch.Tensor,
        observed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pattern indicators (B, 4), raw features of every pattern (B, total), which of them apply (B, total))."""
        batch = demographics.shape[0]
        excess = F.relu(vital_values)  # (B, K_vit)
        products = (image_values.unsqueeze(2) * excess.unsqueeze(1)).reshape(batch, -1)  # (B, K_img * K_vit)
        blocks = {
            "both": [demographics, image_values, vital_values, excess, products],
            "image": [demographics, image_values],
            "vitals": [demographics, vital_values, excess],
            "none": [demographics],
        }
        fi, fv = image_present, observed  # (B, 1) each
        patterns = {"both": fi * fv, "image": fi * (1 - fv), "vitals": (1 - fi) * fv, "none": (1 - fi) * (1 - fv)}
        raw = torch.cat([torch.cat(blocks[p], dim=1) for p in PRESENCE_PATTERNS], dim=1)  # (B, total)
        applies = torch.cat([patterns[p].expand(batch, self.widths[p]) for p in PRESENCE_PATTERNS], dim=1)
        return torch.cat([patterns[p] for p in PRESENCE_PATTERNS], dim=1), raw, applies

    def forward(
        self,
        demographics: torch.Tensor,
        image_values: torch.Tensor,
        image_present: torch.Tensor,
        vital_values: torch.Tensor,
        observed: torch.Tensor,
    ) -> torch.Tensor:
        patterns, raw, applies = self.features(demographics, image_values, image_present, vital_values, observed)
        standard = (raw - self.mean) / self.scale * applies  # (B, total): zero outside the patient's pattern
        return self.linear(torch.cat([patterns, standard], dim=1))  # (B, 1)

    def terms(
        self,
        demographics: torch.Tensor,
        image_values: torch.Tensor,
        image_present: torch.Tensor,
        vital_values: torch.Tensor,
        observed: torch.Tensor,
    ) -> torch.Tensor:
        """The logit ``forward`` returns as a sum of terms (B, len(C.LOGIT_TERMS)), exactly: the reference patient's
        logit, then what each input adds to it (the image, each vital sign's history, the demographics).

        The reference patient has the pattern's training means (``mean``) for every feature, and the product of the
        means for a product: its logit is the pattern's intercept plus, for each product, weight x (product of the
        means - mean of the product). A feature read from one input contributes weight x (value - mean) / scale to
        that input (``modelling.config.CONCEPT_INPUTS``), a vital concept's excess to the same input as the concept.
        An image x vital product involves two inputs and is shared between them by its Shapley value: with a, b the
        two values and a0, b0 their means, the image gets (a - a0)(b + b0) / 2 and the vital (b - b0)(a + a0) / 2
        (times weight / scale), which add up to ab - a0 b0. So the terms sum to the logit, with no approximation.
        """
        patterns, raw, applies = self.features(demographics, image_values, image_present, vital_values, observed)
        kd, ki, kv = demographics.shape[1], image_values.shape[1], vital_values.shape[1]
        weight = self.linear.weight[0]  # (4 + total,): the patterns' intercepts, then the features' weights
        intercepts, w = weight[: len(PRESENCE_PATTERNS)], weight[len(PRESENCE_PATTERNS) :]
        standard = (raw - self.mean) / self.scale * applies  # (B, total)
        grouped = (standard * w) @ self.assign  # (B, G): every single-input feature, products left out
        # the "both" block (first): demographics, image values, vital values, excesses, products (image-major)
        a_at, b_at, p_at = kd, kd + ki + kv, kd + ki + 2 * kv
        coef = (w / self.scale)[p_at : p_at + ki * kv].view(ki, kv)  # (K_img, K_vit)
        a0, b0 = self.mean[a_at : a_at + ki], self.mean[b_at : b_at + kv]  # (K_img,), (K_vit,)
        mean_ab = self.mean[p_at : p_at + ki * kv].view(ki, kv)  # (K_img, K_vit)
        both = patterns[:, :1]  # (B, 1)
        a, b = image_values, F.relu(vital_values)  # (B, K_img), (B, K_vit)
        to_image = 0.5 * (((a - a0) @ coef) * (b + b0)).sum(dim=1, keepdim=True) * both  # (B, 1)
        to_vitals = 0.5 * (b - b0) * ((a + a0) @ coef) * both  # (B, K_vit)
        grouped = grouped + to_image @ self.image_assign + to_vitals @ self.vital_assign  # (B, G)
        remainder = (coef * (a0.unsqueeze(1) * b0.unsqueeze(0) - mean_ab)).sum()  # ()
        reference = patterns @ intercepts.unsqueeze(1) + remainder * both  # (B, 1)
        return torch.cat([reference, grouped], dim=1)  # (B, 1 + G)


class FusionModel(nn.Module):
    """forward(inputs) -> uncalibrated logit (B, 1). Calibration is applied by ``calibrated``/export.

    Mid-level fusion through named concepts: each branch ends in the risk factors it can see (the image
    branch ``IMAGE_CONCEPTS``, the vitals branch ``VITAL_CONCEPTS``), gated by presence; the head reads those,
    the presence flags and the demographics: for the fusion model a logistic model per presence pattern with
    every image x vital concept product (``LogisticHead``), for the single-modality baselines (and configs
    before 0.6.0) a small MLP over the concepts, flags and a demographics embedding.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_branch = ImageBranch(cfg) if cfg.uses_image else None
        self.vitals_branch = VitalsBranch(cfg) if cfg.uses_vitals else None
        # the fusion model's head is the logistic one (it reads the demographics as they come); the baselines' an MLP
        self.logistic = LogisticHead(cfg) if cfg.head_kind == "logistic" and cfg.variant == "fusion" else None
        self.demo_branch = self.head = None
        if self.logistic is None:
            self.demo_branch = DemographicsBranch(cfg)
            width = cfg.demo_embed
            width += (cfg.image_concepts + 1) if cfg.uses_image else 0  # + image_present flag
            width += (cfg.vital_concepts + 1) if cfg.uses_vitals else 0  # + vitals_present flag
            self.head = nn.Sequential(
                nn.Linear(width, cfg.head_hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, 1)
            )

    def _check(self, name: str, t: torch.Tensor) -> None:
        dims = C.input_spec(name).dims
        assert t.dim() == len(dims) + 1 and tuple(t.shape[1:]) == dims, (
            f"{name}: got {tuple(t.shape)}, want (B, {dims})"
        )

    def forward(
        self,
        image: torch.Tensor,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
    ) -> torch.Tensor:
        return self.forward_with_aux(image, image_present, vitals, vitals_mask, vitals_delta, demographics)[0]

    def forward_with_aux(
        self,
        image: torch.Tensor,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
        spot_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logit (B, 1), aux) where aux may hold "seg" (B, K, D/2, H/2, W/2) lesion logits and the raw
        concept outputs "image_concepts" (B, len(IMAGE_CONCEPTS)) / "vital_concepts" (B, len(VITAL_CONCEPTS)).
        ``spot_features``: the image branch's spot readout, precomputed (see ``ImageBranch.forward_with_seg``)."""
        for name, t in zip(
            C.INPUT_NAMES, (image, image_present, vitals, vitals_mask, vitals_delta, demographics), strict=True
        ):
            self._check(name, t)
        aux: dict[str, torch.Tensor] = {}
        image_concepts = None
        if self.image_branch is not None:
            volume = image * image_present.view(-1, 1, 1, 1, 1)  # (B, 1, D, H, W): an absent image is all zeros
            image_concepts, aux["seg"] = self.image_branch.forward_with_seg(volume, spot_features)  # (B, K_img)
            aux["image_concepts"] = image_concepts
        logit, vital_concepts = self.fuse(
            image_concepts, image_present, vitals, vitals_mask, vitals_delta, demographics
        )
        if vital_concepts is not None:
            aux["vital_concepts"] = vital_concepts
        return logit, aux

    def fuse(
        self,
        image_concepts: torch.Tensor | None,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head over the gated concepts; takes the image concepts (raw) ready-made (staged training caches them).

        Returns (logit (B, 1), raw vital concepts (B, K_vit) or None for a model without a vitals branch).
        """
        vital_concepts = None
        if self.vitals_branch is not None:
            vital_concepts = self.vitals_branch(vitals, vitals_mask, vitals_delta)  # (B, K_vit)
        if self.logistic is not None:
            assert image_concepts is not None and vital_concepts is not None
            observed = (vitals_mask.sum(dim=(1, 2)) > 0).to(vitals.dtype).unsqueeze(1)  # (B, 1)
            image_values = concept_values(image_concepts, IMAGE_CONCEPTS)  # (B, K_img)
            vital_values = concept_values(vital_concepts, VITAL_CONCEPTS)  # (B, K_vit)
            return self.logistic(demographics, image_values, image_present, vital_values, observed), vital_concepts
        assert self.head is not None and self.demo_branch is not None
        parts = [self.demo_branch(demographics)]  # (B, demo_embed)
        if self.image_branch is not None:
            assert image_concepts is not None
            parts += [concept_values(image_concepts, IMAGE_CONCEPTS) * image_present, image_present]  # (B, K), (B, 1)
        if vital_concepts is not None:
            observed = (vitals_mask.sum(dim=(1, 2)) > 0).to(vitals.dtype).unsqueeze(1)  # (B, 1)
            parts += [concept_values(vital_concepts, VITAL_CONCEPTS) * observed, observed]  # (B, K_vit), (B, 1)
        return self.head(torch.cat(parts, dim=1)), vital_concepts  # (B, 1), (B, K_vit) | None

    def forward_with_terms(
        self,
        image: torch.Tensor,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit (B, 1), the same logit as exact terms (B, len(C.LOGIT_TERMS)): ``LogisticHead.terms``), from one
        pass through the branches. Only a logistic head is a sum of per-input terms; an MLP head has none."""
        logit, terms, _ = self.forward_explained(image, image_present, vitals, vitals_mask, vitals_delta, demographics)
        return logit, terms

    def forward_explained(
        self,
        image: torch.Tensor,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward_with_terms`` and the lesion maps the image concepts were read from, as probabilities
        (B, len(LESION_KINDS), D/2, H/2, W/2), all from one pass."""
        if self.logistic is None:
            raise ValueError("only the logistic head's logit is a sum of per-input terms")
        logit, aux = self.forward_with_aux(image, image_present, vitals, vitals_mask, vitals_delta, demographics)
        observed = (vitals_mask.sum(dim=(1, 2)) > 0).to(vitals.dtype).unsqueeze(1)  # (B, 1)
        image_values = concept_values(aux["image_concepts"], IMAGE_CONCEPTS)  # (B, K_img)
        vital_values = concept_values(aux["vital_concepts"], VITAL_CONCEPTS)  # (B, K_vit)
        terms = self.logistic.terms(demographics, image_values, image_present, vital_values, observed)  # (B, 1 + G)
        return logit, terms, torch.sigmoid(aux["seg"])  # (B, 1), (B, 1 + G), (B, K, D/2, H/2, W/2)

    def forward_dict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(*(inputs[name] for name in C.INPUT_NAMES))


class CalibratedModel(nn.Module):
    """What is exported: (probability, logit), both with the calibration (temperature, bias) applied."""

    temperature: torch.Tensor  # buffers ()
    bias: torch.Tensor

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(model.cfg.temperature)))
        self.register_buffer("bias", torch.tensor(float(model.cfg.calibration_bias)))

    def forward(
        self,
        image: torch.Tensor,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.model(image, image_present, vitals, vitals_mask, vitals_delta, demographics)  # (B, 1)
        logit = raw / self.temperature + self.bias  # (B, 1)
        return torch.sigmoid(logit), logit  # (B, 1), (B, 1)


class ExplainedModel(CalibratedModel):
    """What is exported for a logistic head: (probability, logit, logit_terms, lesion_map), all calibrated; the
    terms (``C.LOGIT_TERMS``) sum to the logit: the reference's carries the calibration bias, every term is divided
    by the temperature. ``lesion_map`` (``C.LESION_KINDS``): the image branch's lesion probabilities."""

    def forward(  # type: ignore[override]
        self,
        image: torch.Tensor,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raw, raw_terms, lesion = self.model.forward_explained(
            image, image_present, vitals, vitals_mask, vitals_delta, demographics
        )  # (B, 1), (B, 1 + G), (B, K, D/2, H/2, W/2)
        logit = raw / self.temperature + self.bias  # (B, 1)
        terms = raw_terms / self.temperature  # (B, 1 + G)
        terms = torch.cat([terms[:, :1] + self.bias, terms[:, 1:]], dim=1)  # (B, 1 + G)
        return torch.sigmoid(logit), logit, terms, lesion  # (B, 1), (B, 1), (B, 1 + G), (B, K, D/2, H/2, W/2)


def calibrated_logit(cfg: FusionConfig, raw: np.ndarray) -> np.ndarray:
    """The calibration ``CalibratedModel`` applies, on raw logits computed elsewhere (numpy)."""
    return np.asarray(raw, dtype=np.float64) / cfg.temperature + cfg.calibration_bias


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(model: FusionModel, out_dir: Path) -> Path:
    """Weights + the config as JSON beside them (the config alone rebuilds the module)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(model.cfg.to_json() + "\n")
    return out_dir


def load(weights_dir: Path) -> FusionModel:
    cfg = FusionConfig.from_json((weights_dir / CONFIG_FILE).read_text())
    model = FusionModel(cfg)
    model.load_state_dict(torch.load(weights_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()
