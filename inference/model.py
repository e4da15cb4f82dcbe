"""The StrokeWatch CNN-LSTM fusion network.

Three small branches, each producing an embedding, fused at mid level:

* ``ImageBranch``: a 3D CNN over the brain volume (B, 1, D, H, W), gated by ``image_present``;
* ``VitalsBranch``: an LSTM over the vitals grid, reading values, observation mask and time-since-last
  together (B, T, 3F), gated by "any vital observed";
* ``DemographicsBranch``: a tiny MLP over [age z-score, sex].

The head concatenates the (gated) embeddings plus the two presence flags and returns one logit.
Gating by presence, and modality dropout in training, make a missing image or an empty vitals
window a *known* state the head has learned to score, not an out-of-distribution input.

The same module also builds the single-modality baselines (``variant="image"`` / ``"vitals"``):
the same branch + demographics + head, with the other branch absent. Tensor sizes come from
``inference.contract``; nothing here hard-codes a shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from inference import contract as C

Variant = Literal["fusion", "image", "vitals"]
VARIANTS: tuple[Variant, ...] = ("fusion", "image", "vitals")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


@dataclass
class FusionConfig:
    variant: Variant = "fusion"
    volume_shape: tuple[int, int, int] = C.VOLUME_SHAPE
    n_steps: int = C.N_STEPS
    n_features: int = C.N_FEATURES
    n_demographics: int = C.N_DEMOGRAPHICS
    cnn_channels: tuple[int, ...] = (8, 16, 32)  # one strided conv block per entry
    image_embed: int = 32
    lstm_hidden: int = 32
    demo_embed: int = 8
    head_hidden: int = 32
    dropout: float = 0.1
    #: Train the lesion-map head against lesion masks (when the data has them). Masks give the CNN a
    #: dense signal where outcomes alone give one bit per patient.
    aux_seg: bool = True
    #: Calibration: probability = sigmoid(logit / temperature); fitted on the validation split.
    temperature: float = 1.0
    #: Provenance written by train.py (seed, n, metrics); carried into the ONNX metadata.
    info: dict[str, object] = field(default_factory=dict)

    @property
    def uses_image(self) -> bool:
        return self.variant in ("fusion", "image")

    @property
    def uses_vitals(self) -> bool:
        return self.variant in ("fusion", "vitals")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FusionConfig:
        raw = json.loads(text)
        for key in ("volume_shape", "cnn_channels"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


class ConvBlock(nn.Module):
    """conv3x3x3 with stride 2, GroupNorm, ReLU: halves each spatial axis.

    Strided convolutions rather than conv + pooling keep the branch cheap enough to train on two
    CPU cores. GroupNorm rather than BatchNorm: statistics per patient, so batches that mix real and
    dropped-out (all-zero) volumes in training do not skew what the network sees at inference.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.GroupNorm(min(4, c_out), c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))  # (B, c_out, d/stride, h/stride, w/stride)


class ImageBranch(nn.Module):
    """3D CNN -> global max + mean pooling, plus a lesion map's burden -> embedding.

    Max pooling keeps a few-voxel finding visible after pooling; mean pooling carries diffuse
    change (white-matter disease, atrophy). A 3x3x3 head on the first block predicts a lesion map
    (trained against lesion masks when they exist); its mean and max probability enter the embedding
    as "how much lesion" and "how sure of any lesion", the quantities the risk depends on.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        chans = (1, *cfg.cnn_channels)
        blocks = [ConvBlock(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)]
        blocks.append(ConvBlock(chans[-1], chans[-1], stride=1))  # context at the coarsest grid
        self.blocks = nn.Sequential(*blocks)
        self.seg_head = nn.Conv3d(chans[1], 1, 3, padding=1)
        self.proj = nn.Linear(2 * chans[-1] + 2, cfg.image_embed)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_with_seg(image)[0]

    def forward_with_seg(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.blocks[0](image)  # (B, C1, D/2, H/2, W/2)
        x = self.blocks[1:](first)  # (B, C, D/8, H/8, W/8) with three strided blocks
        seg = self.seg_head(first)  # (B, 1, D/2, H/2, W/2) lesion logits
        lesion = torch.sigmoid(seg)  # (B, 1, D/2, H/2, W/2)
        burden = torch.cat([lesion.mean(dim=(2, 3, 4)), lesion.amax(dim=(2, 3, 4))], dim=1)  # (B, 2)
        pooled = torch.cat([x.amax(dim=(2, 3, 4)), x.mean(dim=(2, 3, 4)), burden], dim=1)  # (B, 2C + 2)
        return F.relu(self.proj(pooled)), seg.squeeze(1)  # (B, image_embed), (B, D/2, H/2, W/2)


class VitalsBranch(nn.Module):
    """LSTM over [values, mask, delta] per time step, plus masked summary statistics per feature.

    The LSTM reads the temporal pattern; the statistics (mean, SD, trend, successive-difference
    variability, share of steps observed) are computed over observed steps only and hand the head the
    quantities clinicians read from a chart (labile or rising BP, an irregular heart rate) without
    the LSTM having to rediscover them from a few thousand patients.
    """

    N_STATS = 5

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3 * cfg.n_features, cfg.lstm_hidden, batch_first=True)
        # the statistics live on very different scales (an SD of 0.1 next to a coverage of 0.9): standardise them
        self.stats_norm = nn.BatchNorm1d(self.N_STATS * cfg.n_features)
        self.proj = nn.Linear(2 * cfg.lstm_hidden + self.N_STATS * cfg.n_features, cfg.lstm_hidden)

    @staticmethod
    def masked_stats(vitals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per feature over observed steps: mean, SD, slope per window, RMS successive difference, coverage."""
        steps = vitals.shape[1]
        t = torch.linspace(0.0, 1.0, steps, dtype=vitals.dtype, device=vitals.device).view(1, -1, 1)  # (1, T, 1)
        count = mask.sum(dim=1)  # (B, F)
        denom = count.clamp(min=1.0)  # (B, F)
        mean = (vitals * mask).sum(dim=1) / denom  # (B, F)
        centred = (vitals - mean.unsqueeze(1)) * mask  # (B, T, F)
        sd = torch.sqrt((centred * centred).sum(dim=1) / denom + 1e-6)  # (B, F)
        t_mean = (t * mask).sum(dim=1) / denom  # (B, F)
        t_centred = (t - t_mean.unsqueeze(1)) * mask  # (B, T, F)
        slope = (t_centred * centred).sum(dim=1) / ((t_centred * t_centred).sum(dim=1) + 1e-3)  # (B, F)
        # values are carried forward, so at an observed step the step-to-step change is the change since
        # the previous observation; the first step has no predecessor.
        diff = (vitals[:, 1:] - vitals[:, :-1]) * mask[:, 1:]  # (B, T-1, F)
        rmssd = torch.sqrt((diff * diff).sum(dim=1) / mask[:, 1:].sum(dim=1).clamp(min=1.0) + 1e-6)  # (B, F)
        coverage = count / steps  # (B, F)
        return torch.cat([mean, sd, slope, rmssd, coverage], dim=1)  # (B, 5F)

    def forward(self, vitals: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        x = torch.cat([vitals, mask, delta], dim=2)  # (B, T, 3F)
        out, (h_n, _) = self.lstm(x)  # out (B, T, H); h_n (1, B, H)
        stats = self.stats_norm(self.masked_stats(vitals, mask))  # (B, 5F)
        summary = torch.cat([h_n[-1], out.mean(dim=1), stats], dim=1)  # (B, 2H + 5F)
        return F.relu(self.proj(summary))  # (B, H)


class DemographicsBranch(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_demographics, cfg.demo_embed)

    def forward(self, demographics: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(demographics))  # (B, demo_embed)


class FusionModel(nn.Module):
    """forward(inputs) -> uncalibrated logit (B, 1). Calibration is applied by ``calibrated``/export."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_branch = ImageBranch(cfg) if cfg.uses_image else None
        self.vitals_branch = VitalsBranch(cfg) if cfg.uses_vitals else None
        self.demo_branch = DemographicsBranch(cfg)
        width = cfg.demo_embed
        width += (cfg.image_embed + 1) if cfg.uses_image else 0  # + image_present flag
        width += (cfg.lstm_hidden + 1) if cfg.uses_vitals else 0  # + vitals_present flag
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logit (B, 1), lesion-map logits (B, D/2, H/2, W/2), or None for a model without an image branch)."""
        for name, t in zip(
            C.INPUT_NAMES, (image, image_present, vitals, vitals_mask, vitals_delta, demographics), strict=True
        ):
            self._check(name, t)
        seg = None
        image_embedding = None
        if self.image_branch is not None:
            volume = image * image_present.view(-1, 1, 1, 1, 1)  # (B, 1, D, H, W): an absent image is all zeros
            image_embedding, seg = self.image_branch.forward_with_seg(volume)  # (B, E_img)
        logit = self.fuse(image_embedding, image_present, vitals, vitals_mask, vitals_delta, demographics)  # (B, 1)
        return logit, seg

    def fuse(
        self,
        image_embedding: torch.Tensor | None,
        image_present: torch.Tensor,
        vitals: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
        demographics: torch.Tensor,
    ) -> torch.Tensor:
        """Head over the gated embeddings; takes the image embedding ready-made (staged training caches it)."""
        parts = [self.demo_branch(demographics)]  # (B, demo_embed)
        if self.image_branch is not None:
            assert image_embedding is not None
            parts += [image_embedding * image_present, image_present]  # (B, E_img), (B, 1)
        if self.vitals_branch is not None:
            observed = (vitals_mask.sum(dim=(1, 2)) > 0).to(vitals.dtype).unsqueeze(1)  # (B, 1)
            parts += [self.vitals_branch(vitals, vitals_mask, vitals_delta) * observed, observed]  # (B, H), (B, 1)
        return self.head(torch.cat(parts, dim=1))  # (B, 1)

    def forward_dict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(*(inputs[name] for name in C.INPUT_NAMES))


class CalibratedModel(nn.Module):
    """What is exported: (probability, logit), both with the calibration temperature applied."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(model.cfg.temperature)))

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
        logit = raw / self.temperature  # (B, 1)
        return torch.sigmoid(logit), logit  # (B, 1), (B, 1)


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
