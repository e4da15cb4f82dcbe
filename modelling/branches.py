"""The fusion network's branches: each reads one modality and ends in the concepts it can see.

* ``ImageBranch``: a 3D encoder-decoder over the brain volume (B, 1, D, H, W) -> a lesion map per kind of
  finding, plus the full-resolution ``SpotDetector`` -> the image concepts;
* ``VitalsBranch``: an LSTM over the vitals grid (values, observation mask and time-since-last together,
  (B, T, 3F)) plus masked summary statistics -> the vital concepts;
* ``DemographicsBranch``: a tiny MLP over [age z-score, sex] (the baselines' head reads it).

``modelling.model.FusionModel`` gates and fuses them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modelling.config import IMAGE_CONCEPTS, LESION_KINDS, SPOT_KINDS, SPOT_READOUTS, VITAL_CONCEPTS, FusionConfig


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
    (``modelling.train.spots.fit_spot_detector``), then frozen; ``readout`` turns its maps into per-patient
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
