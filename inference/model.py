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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference import contract as C

Variant = Literal["fusion", "image", "vitals"]
VARIANTS: tuple[Variant, ...] = ("fusion", "image", "vitals")
CONFIG_FILE = "config.json"
#: What the image branch learns to recognise (the order of its concept outputs): lacune count (capped at 4),
#: white-matter disease grade (0-3), old territorial infarct, hyperdense vessel sign.
IMAGE_CONCEPTS: tuple[str, ...] = ("lacunes", "wmd_grade", "territorial", "hyperdense_vessel")
#: What the vitals branch learns to recognise: SBP level, SBP lability, rising SBP, atrial fibrillation,
#: glycaemia (each as a z-score or rate; see inference/SYNTH.md).
VITAL_CONCEPTS: tuple[str, ...] = ("sbp_z", "lability_z", "rising_trend", "af", "glucose_z")
#: Concepts that are yes/no: their heads give logits, passed on as probabilities; the rest are regressions.
BINARY_CONCEPTS = frozenset({"territorial", "hyperdense_vessel", "af"})
#: Kinds of lesion the lesion map separates (its channels), as labelled in the training data.
LESION_KINDS: tuple[str, ...] = ("lacune", "wmd", "infarct", "hyperdense_vessel")
#: Small, countable findings that the full-resolution spot detector maps (its channels); a subset of LESION_KINDS.
SPOT_KINDS: tuple[str, ...] = ("lacune", "hyperdense_vessel")
#: Where the spot detector looks: (z, y, x) voxel ranges [start, stop) of the contract grid, a box around the
#: deep grey nuclei, internal capsules, corona radiata and the M1 segments of both middle cerebral arteries
#: (about the grid centre: 61 mm right to 65 mm left, 68 mm anterior to 40 mm posterior, 47 mm below to 58 mm
#: above). Every lacune and vessel sign of the 2,000-patient training cohort lies at least two slices and three
#: voxels inside it; of 600 patients of another seed the nearest comes within one slice of its top
#: (``tests/unit/test_model.py`` checks those). A finding outside it (a brainstem or cerebellar lacune, which
#: the generator does not plant) would be seen by the lesion map only.
#: Running the detector on this box, not the whole volume, keeps the full-resolution path inside the latency
#: budget: it holds a fifth of the voxels.
SPOT_REGION: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ((6, 28), (12, 44), (14, 50))
#: What the concept head reads from each spot map: log(1 + peaks above 0.5), log(1 + summed peak probability), max.
SPOT_READOUTS = 3
WEIGHTS_FILE = "weights.pt"


@dataclass
class FusionConfig:
    variant: Variant = "fusion"
    volume_shape: tuple[int, int, int] = C.VOLUME_SHAPE
    n_steps: int = C.N_STEPS
    n_features: int = C.N_FEATURES
    n_demographics: int = C.N_DEMOGRAPHICS
    cnn_channels: tuple[int, int] = (16, 32)  # channels at half and at quarter resolution
    spot_channels: int = 12  # full-resolution spot detector (lacunes, vessel sign); 0: none (models before 0.3.0)
    #: the box the spot detector runs on (``SPOT_REGION``); None: the whole volume (model 0.3.0)
    spot_region: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = SPOT_REGION
    lstm_hidden: int = 32
    demo_embed: int = 8
    head_hidden: int = 32
    dropout: float = 0.1
    #: The fusion model's head: "logistic" (``LogisticHead``, since 0.6.0: one logistic model per presence
    #: pattern over the concepts and their image x vital products) or "mlp" (the MLP, as the baselines have it).
    head_kind: Literal["logistic", "mlp"] = "logistic"
    #: Train the lesion-map head against lesion masks and the concept heads against the known risk factors
    #: (when the data has them): dense signals where outcomes alone give one bit per patient.
    aux_seg: bool = True
    #: Calibration: probability = sigmoid(logit / temperature + calibration_bias); fitted on held-out patients.
    temperature: float = 1.0
    calibration_bias: float = 0.0
    #: Provenance written by train.py (seed, n, metrics); carried into the ONNX metadata.
    info: dict[str, object] = field(default_factory=dict)

    @property
    def image_concepts(self) -> int:
        return len(IMAGE_CONCEPTS)

    @property
    def vital_concepts(self) -> int:
        return len(VITAL_CONCEPTS)

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
        raw.pop("image_embed", None)  # configs before 0.2.0
        raw.setdefault("spot_channels", 0)  # configs before 0.3.0 had no spot detector
        raw.setdefault("head_kind", "mlp")  # configs before 0.6.0: the MLP head
        region = raw.get("spot_region")  # absent before 0.4.0: the whole volume
        raw["spot_region"] = None if region is None else tuple((int(a), int(b)) for a, b in region)
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


class SpotDetector(nn.Module):
    """Full-resolution 3D CNN for small, countable findings (``SPOT_KINDS``): (B, 2, D, H, W) -> (B, K, D, H, W).

    A lacune is a 5-14 mm fluid ball, a hyperdense vessel a 4 mm-wide bright tube: one to a dozen voxels
    on the contract grid, which a strided encoder blurs into its neighbours. This path never downsamples:
    two plain 3x3x3 convolutions, then two residual ones dilated in-plane (and through-plane) to widen the
    context to ~50 mm, enough to tell a lacune from a sulcus or the ventricles and a thrombus from the
    skull base. Trained on its own, on patches sampled around labelled findings and at random
    (``inference.train.fit_spot_detector``), then frozen; ``readout`` turns its maps into per-patient
    quantities: how many distinct peaks (a count of lacunes), how much, how sure.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        ch = channels
        self.conv1 = nn.Conv3d(2, ch, 3, padding=1)
        self.conv2 = nn.Conv3d(ch, ch, 3, padding=1)
        self.wide1 = nn.Conv3d(ch, ch, 3, padding=(1, 2, 2), dilation=(1, 2, 2))
        self.wide2 = nn.Conv3d(ch, ch, 3, padding=(2, 4, 4), dilation=(2, 4, 4))
        self.norms = nn.ModuleList([nn.GroupNorm(2, ch) for _ in range(4)])
        self.out = nn.Conv3d(ch, len(SPOT_KINDS), 1)
        nn.init.constant_(self.out.bias, -4.0)  # spots fill well under 1 % of voxels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norms[0](self.conv1(x)))  # (B, ch, D, H, W)
        h = F.relu(self.norms[1](self.conv2(h)))
        h = h + F.relu(self.norms[2](self.wide1(h)))
        h = h + F.relu(self.norms[3](self.wide2(h)))
        return self.out(h)  # (B, K, D, H, W) logits

    #: Peaks below this probability are background and left out of the summed probability.
    PEAK_FLOOR = 0.1

    @staticmethod
    def readout(logits: torch.Tensor) -> torch.Tensor:
        """Spot logits (B, K, D, H, W) -> (B, K * SPOT_READOUTS): per kind, log(1 + peaks with p > 0.5),
        log(1 + summed probability of peaks with p > ``PEAK_FLOOR``), max probability.

        A peak is a voxel whose logit is the maximum of its 3x3x3 neighbourhood, so a lacune spread over a
        dozen voxels counts once. Logits, not probabilities: a confident spot saturates the sigmoid to
        exactly 1.0 over several voxels, which would all tie as peaks; and flat background (air, an absent
        image) ties everywhere, which the floor leaves out."""
        p = torch.sigmoid(logits)  # (B, K, D, H, W)
        peak = (logits >= F.max_pool3d(logits, 3, stride=1, padding=1)).to(p.dtype)  # (B, K, D, H, W)
        count = torch.log1p((peak * (p > 0.5).to(p.dtype)).sum(dim=(2, 3, 4)))  # (B, K)
        mass = torch.log1p((peak * p * (p > SpotDetector.PEAK_FLOOR).to(p.dtype)).sum(dim=(2, 3, 4)))  # (B, K)
        return torch.cat([count, mass, p.amax(dim=(2, 3, 4))], dim=1)  # (B, 3K)


def concept_values(raw: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Concept head outputs (B, K) -> what the fusion head reads: probabilities for yes/no concepts."""
    binary = torch.tensor([n in BINARY_CONCEPTS for n in names], device=raw.device)  # (K,)
    return torch.where(binary, torch.sigmoid(raw), raw)  # (B, K)


class ImageBranch(nn.Module):
    """3D CNN -> a lesion map per kind of finding -> the image concepts (lacunes, WMD grade, infarct, vessel sign).

    A small encoder-decoder: a strided stem whose filters read every voxel (a few-voxel lacune still
    registers), a second strided block and a context block; the context is upsampled, joined with the
    half-resolution features and turned into one lesion-probability map per kind (``LESION_KINDS``).
    What the risk depends on is read off those maps — how much of each kind (log of the summed
    probability, all and confident voxels) and how sure of any (max) — plus globally pooled features,
    by a small concept head. ``forward`` returns the concept logits/values
    (B, len(IMAGE_CONCEPTS)); ``forward_with_seg`` also the lesion-map logits.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        c1, c2 = cfg.cnn_channels
        self.stem = ConvBlock(2, c1)  # strided, but its 3x3x3 filters see every full-resolution voxel
        self.down = ConvBlock(c1, c2)
        self.context = ConvBlock(c2, c2, stride=1)
        self.decode = ConvBlock(c1 + c2, c1, stride=1)
        self.seg_head = nn.Conv3d(c1, len(LESION_KINDS), 1)
        nn.init.constant_(self.seg_head.bias, -4.0)  # lesions fill ~1-2 % of voxels: start at that prior
        self.spots = SpotDetector(cfg.spot_channels) if cfg.spot_channels > 0 else None
        self.spot_region = cfg.spot_region
        n_pooled = 2 * c2 + 3 * len(LESION_KINDS) + (SPOT_READOUTS * len(SPOT_KINDS) if self.spots else 0)
        # the pooled quantities live on different scales (a log-count of 6 beside a max of 0.01): standardise
        self.concept_head = nn.Sequential(
            nn.BatchNorm1d(n_pooled), nn.Linear(n_pooled, 32), nn.GELU(), nn.Linear(32, len(IMAGE_CONCEPTS))
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_with_seg(image)[0]

    @staticmethod
    def tissue_contrast(image: torch.Tensor) -> torch.Tensor:
        """The volume standardised over its soft tissue: (B, 1, D, H, W), 0 outside.

        The contract's intensities span air to bone (CT window -40..120 HU -> -1..1; MR z-scores), so the
        few HU between white matter, white-matter disease and a lacune are a small step on that scale. Over
        the voxels that are neither background (the volume's minimum) nor saturated bone, each volume is
        z-scored, which puts those steps near one unit for CT and MR alike. Masked sums only: exports to ONNX.
        """
        floor = image.amin(dim=(2, 3, 4), keepdim=True)  # (B, 1, 1, 1, 1) background / padding value
        tissue = ((image > floor + 0.05) & (image < 0.95)).to(image.dtype)  # (B, 1, D, H, W)
        count = tissue.sum(dim=(2, 3, 4), keepdim=True).clamp(min=1.0)  # (B, 1, 1, 1, 1)
        mean = (image * tissue).sum(dim=(2, 3, 4), keepdim=True) / count
        var = (((image - mean) * tissue) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count
        return ((image - mean) / torch.sqrt(var + 1e-4)).clamp(-3.0, 3.0) * tissue  # (B, 1, D, H, W)

    def inputs(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([image, self.tissue_contrast(image)], dim=1)  # (B, 2, D, H, W)

    def spot_crop(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> the part the spot detector reads, (B, C, d, h, w) (``FusionConfig.spot_region``)."""
        if self.spot_region is None:
            return x
        (z0, z1), (y0, y1), (x0, x1) = self.spot_region
        return x[:, :, z0:z1, y0:y1, x0:x1]

    def spot_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs(image)`` (B, 2, D, H, W) -> spot logits over the spot region (B, len(SPOT_KINDS), d, h, w)."""
        assert self.spots is not None
        return self.spots(self.spot_crop(inputs))

    def spot_readout(self, image: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """(B, SPOT_READOUTS * len(SPOT_KINDS)) from the spot detector (empty without one); ``inputs``:
        ``self.inputs(image)`` when already computed."""
        if self.spots is None:
            return image.new_zeros((image.shape[0], 0))
        return SpotDetector.readout(self.spot_logits(self.inputs(image) if inputs is None else inputs))

    def forward_with_seg(
        self, image: torch.Tensor, spot_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``spot_features``: ``spot_readout(image)`` computed beforehand (training caches it: the detector is
        frozen by then); computed here when None."""
        pooled, seg = self.pooled_with_seg(image, spot_features)
        return self.concept_head(pooled), seg  # (B, len(IMAGE_CONCEPTS)) raw, (B, K, d, h, w)

    def pooled_with_seg(
        self, image: torch.Tensor, spot_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the concept head reads (B, n_pooled) and the lesion-map logits (B, K, D/2, H/2, W/2)."""
        x = self.inputs(image)  # (B, 2, D, H, W)
        half = self.stem(x)  # (B, c1, D/2, H/2, W/2)
        ctx = self.context(self.down(half))  # (B, c2, D/4, H/4, W/4)
        up = F.interpolate(ctx, size=half.shape[2:], mode="trilinear", align_corners=False)  # (B, c2, D/2, H/2, W/2)
        seg = self.seg_head(self.decode(torch.cat([half, up], dim=1)))  # (B, K, D/2, H/2, W/2) lesion logits
        lesion = torch.sigmoid(seg)  # (B, K, D/2, H/2, W/2)
        amount = torch.log1p(lesion.sum(dim=(2, 3, 4)))  # (B, K): how much of each kind, in half-res voxels
        confident = torch.log1p(F.relu(2.0 * lesion - 1.0).sum(dim=(2, 3, 4)))  # (B, K): as much, counting p > 0.5
        sure = lesion.amax(dim=(2, 3, 4))  # (B, K): how sure of any
        if spot_features is None:
            spot_features = self.spot_readout(image, x)  # (B, 3 * len(SPOT_KINDS))
        pooled = [ctx.amax(dim=(2, 3, 4)), ctx.mean(dim=(2, 3, 4)), amount, confident, sure, spot_features]
        return torch.cat(pooled, dim=1), seg  # (B, n_pooled), (B, K, d, h, w)


class VitalsBranch(nn.Module):
    """LSTM over [values, mask, delta] per time step, plus masked summary statistics per feature -> vital concepts.

    The LSTM reads the temporal pattern; the statistics (mean, SD, trend, successive-difference
    variability, share of steps observed) are computed over observed steps only and hand the concept head
    the quantities clinicians read from a chart (labile or rising BP, an irregular heart rate) without
    the LSTM having to rediscover them from a few thousand patients. ``forward`` returns the concept
    logits/values (B, len(VITAL_CONCEPTS)).
    """

    N_STATS = 5

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3 * cfg.n_features, cfg.lstm_hidden, batch_first=True)
        # the statistics live on very different scales (an SD of 0.1 next to a coverage of 0.9): standardise them
        self.stats_norm = nn.BatchNorm1d(self.N_STATS * cfg.n_features)
        self.proj = nn.Linear(2 * cfg.lstm_hidden + self.N_STATS * cfg.n_features, cfg.lstm_hidden)
        self.concept_head = nn.Linear(cfg.lstm_hidden, len(VITAL_CONCEPTS))

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
        return self.concept_head(F.relu(self.proj(summary)))  # (B, len(VITAL_CONCEPTS)) raw


class DemographicsBranch(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_demographics, cfg.demo_embed)

    def forward(self, demographics: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(demographics))  # (B, demo_embed)


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

    ``inference.train.fit_logistic_head`` fits it in closed form, L1-penalised, on the frozen branches' concepts
    (its penalty chosen by cross-validated log-loss); it is differentiable, so end-to-end training can learn it too.
    """

    mean: torch.Tensor  # buffers (total,)
    scale: torch.Tensor

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        kd, ki, kv = cfg.n_demographics, cfg.image_concepts, cfg.vital_concepts
        self.widths = {"both": kd + ki + 2 * kv + ki * kv, "image": kd + ki, "vitals": kd + 2 * kv, "none": kd}
        total = sum(self.widths.values())
        self.register_buffer("mean", torch.zeros(total))
        self.register_buffer("scale", torch.ones(total))
        self.linear = nn.Linear(len(PRESENCE_PATTERNS) + total, 1, bias=False)

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

    def forward_dict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(*(inputs[name] for name in C.INPUT_NAMES))


class CalibratedModel(nn.Module):
    """What is exported: (probability, logit), both with the calibration (temperature, bias) applied."""

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
