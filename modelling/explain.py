"""Per-patient explanations of a fusion score with captum's Integrated Gradients.

For one patient, attributions are computed on the torch model's calibrated logit for the image (through
the model's lesion maps, see ``lesion_map_attribution``), the vitals values (feature x time step) and the
demographics. The image is attributed from an empty lesion map (no finding anywhere; see
``lesion_map_attribution``). Vitals and demographics are attributed in one IG pass over the whole model
from the "nothing remarkable" patient: the same image blurred (Gaussian, ~3 voxels in-plane), which erases
focal findings but keeps the head's shape and contrast, vitals at the population mean (0 after z-scoring)
with the same observation pattern, mean age and the same sex. A black (all-zero) image would be a poor
baseline there: the CNN's first layer is followed by GroupNorm, which is blind to the image's scale, so the
whole path from black to the patient would collapse into a jump near black that IG's Riemann sum misses.
By IG's completeness property the attributions add up to about logit(patient) - logit(baseline).

The attributions are rendered as short text for the RiskAssessment note (``top_drivers``) and as a
heat-map overlay PNG of the image (``render_overlay``).

    python -m modelling.explain --seed 1001 --index 3 --out reports/explain-1001-3
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients
from scipy.ndimage import binary_dilation, binary_erosion, binary_fill_holes, gaussian_filter, uniform_filter

from inference import contract as C
from modelling.calibrate import sigmoid
from modelling.model import FusionModel, load
from modelling.train.data import cohort_inputs, make_cohort
from modelling.train.settings import DEFAULT_OUT

log = logging.getLogger(__name__)

STEPS_PER_DAY = 24 // C.STEP_HOURS
#: Image baseline blur, voxels along (z, y, x): about 10 mm in every direction on the contract grid.
BLUR_SIGMA_VOXELS = (2.0, 3.0, 3.0)
#: The "no finding" lesion map the image attribution starts from (``lesion_map_attribution``): logit -4, a
#: probability of 1.8 % per voxel, where the lesion-map heads start training (how it was chosen: MODEL_CARD.md,
#: "Explanations").
EMPTY_MAP_LOGIT = -4.0
_FEATURE_DISPLAY = {f.key: f.display[0].lower() + f.display[1:] for f in C.VITAL_FEATURES}


@dataclass(frozen=True)
class Explanation:
    probability: float
    logit: float
    baseline_logit: float
    image_attribution: np.ndarray | None  # (D, H, W); None when no image was supplied
    vitals_attribution: np.ndarray | None  # (T, F); None when no vitals were observed
    demographics_attribution: np.ndarray  # (2,)
    drivers: list[str]


def _batched(inputs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for spec in C.INPUTS:
        arr = np.asarray(inputs[spec.name], dtype=np.float32)
        arr = arr[None] if arr.shape == spec.dims else arr
        assert arr.shape == (1, *spec.dims), f"{spec.name}: explain one patient at a time, got {arr.shape}"
        out[spec.name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def explain_patient(
    model: FusionModel, inputs: Mapping[str, np.ndarray], *, n_steps: int = 24, top_k: int = 3
) -> Explanation:
    """Integrated-Gradients attributions for one patient (arrays with or without the batch axis of 1)."""
    model = model.eval()
    x = _batched(inputs)
    temperature, bias = model.cfg.temperature, model.cfg.calibration_bias

    def calibrated_logit(
        image: torch.Tensor,
        vitals: torch.Tensor,
        demographics: torch.Tensor,
        image_present: torch.Tensor,
        vitals_mask: torch.Tensor,
        vitals_delta: torch.Tensor,
    ) -> torch.Tensor:
        n = image.shape[0]  # captum expands the fixed inputs to the interpolation batch
        return (
            model(
                image,
                image_present.expand(n, -1),
                vitals,
                vitals_mask.expand(n, -1, -1),
                vitals_delta.expand(n, -1, -1),
                demographics,
            ).squeeze(1)
            / temperature
            + bias
        )  # (n,)

    attributed = (x["image"], x["vitals"], x["demographics"])
    blurred = gaussian_filter(x["image"][0, 0].numpy(), sigma=BLUR_SIGMA_VOXELS)  # (D, H, W)
    baselines = (
        torch.from_numpy(blurred[None, None].astype(np.float32)),
        torch.zeros_like(x["vitals"]),
        torch.stack([torch.zeros(1), x["demographics"][:, 1]], dim=1),
    )
    fixed = (x["image_present"], x["vitals_mask"], x["vitals_delta"])
    ig = IntegratedGradients(calibrated_logit)
    attr_image, attr_vitals, attr_demo = ig.attribute(
        attributed, baselines=baselines, additional_forward_args=fixed, n_steps=n_steps, internal_batch_size=n_steps
    )
    with torch.no_grad():
        logit = float(calibrated_logit(*attributed, *fixed))
        base_logit = float(calibrated_logit(*baselines, *fixed))
    has_image = bool(x["image_present"].item() > 0)
    if has_image and model.image_branch is not None:
        attr_image = lesion_map_attribution(model, calibrated_logit, attributed, fixed, n_steps)
    has_vitals = bool(x["vitals_mask"].sum() > 0)
    explanation = Explanation(
        probability=float(sigmoid(np.float64(logit))),
        logit=logit,
        baseline_logit=base_logit,
        image_attribution=attr_image[0, 0].detach().numpy() if has_image and model.cfg.uses_image else None,
        vitals_attribution=attr_vitals[0].detach().numpy() if has_vitals and model.cfg.uses_vitals else None,
        demographics_attribution=attr_demo[0].detach().numpy(),
        drivers=[],
    )
    drivers = top_drivers(explanation, {k: v[0].numpy() for k, v in x.items()}, k=top_k)
    return Explanation(**{**explanation.__dict__, "drivers": drivers})


def lesion_map_attribution(
    model: FusionModel,
    forward: Callable[..., torch.Tensor],
    attributed: tuple[torch.Tensor, ...],
    fixed: tuple[torch.Tensor, ...],
    n_steps: int,
) -> torch.Tensor:
    """Image attribution through the model's own lesion maps: (1, 1, D, H, W).

    Integrated Gradients over the lesion maps themselves: the patient's volume, vitals and demographics
    stay as they are while the half-resolution lesion map and the full-resolution spot map (lacunes, vessel
    sign; where the model has one) run from **empty** (every voxel at logit ``EMPTY_MAP_LOGIT``: no finding
    anywhere) to the patient's, substituted by forward hooks; each map voxel gets its share of the score
    change, summed over kinds: the lesion map spread back onto the contract grid, the spot map added inside
    the spot region it covers. Every image-derived input of the head is read off these maps (or pooled
    context features beside them, which stay fixed), so this names the voxels whose lesion evidence moved
    the score. (The spot count is a step function of the map: IG credits the summed and maximal spot
    probability the head reads beside it, not the count.)

    Why empty maps and not the maps of a blurred volume: blurring keeps much of a periventricular rim of
    white-matter disease (the ventricles and the rim blur into one dark blob), so the hot-spot misses it. Why
    not voxel-level IG through the whole CNN: it is dominated by the per-volume contrast normalisation, which
    couples every voxel to every other. (Pointing-game figures for each: MODEL_CARD.md, "Explanations".)
    """
    branch = model.image_branch
    assert branch is not None
    layers: list[torch.nn.Module] = [branch.seg_head] + ([branch.spots.out] if branch.spots is not None else [])
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out.detach()))
        for k, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            forward(*attributed, *fixed)
    finally:
        for hook in hooks:
            hook.remove()
    maps = tuple(seen[k] for k in range(len(layers)))  # (1, K, d, h, w) lesion map, (1, K_spot, d', h', w') spots

    def from_maps(*substitutes: torch.Tensor) -> torch.Tensor:
        n = substitutes[0].shape[0]  # the interpolation batch
        replace = [
            layer.register_forward_hook(lambda _m, _i, _out, k=k: substitutes[k]) for k, layer in enumerate(layers)
        ]
        try:
            return forward(*(t.expand(n, *t.shape[1:]) for t in attributed), *fixed)  # (n,)
        finally:
            for hook in replace:
                hook.remove()

    attrs = IntegratedGradients(from_maps).attribute(
        maps,
        baselines=tuple(torch.full_like(m, EMPTY_MAP_LOGIT) for m in maps),
        n_steps=n_steps,
        internal_batch_size=n_steps,
    )
    size = attributed[0].shape[2:]
    total = torch.nn.functional.interpolate(attrs[0].sum(dim=1, keepdim=True), size=size, mode="nearest")
    if len(attrs) > 1:  # the spot map covers the spot region only: add it there
        spot = attrs[1].sum(dim=1, keepdim=True)  # (1, 1, d', h', w')
        region = branch.spot_region or tuple((0, n) for n in size)
        total[(slice(None), slice(None), *(slice(a, b) for a, b in region))] += spot
    return total  # (1, 1, D, H, W)


# ----------------------------------------------------------------------------------------------
# Text: the top drivers, for the RiskAssessment note.
# ----------------------------------------------------------------------------------------------


def brain_region(image: np.ndarray) -> np.ndarray:
    """Voxels inside the head that are neither air nor bone, away from the skull (bool, (D, H, W)).

    The hot-spot is searched here: the blurred baseline differs most from the patient at the skull's
    high-contrast edges, which say nothing about the brain.
    """
    volume = np.asarray(image).reshape(C.VOLUME_SHAPE)
    soft_tissue = (volume > -0.95) & (volume < 0.95)  # contract CT window: air and bone saturate at -1/+1
    head = binary_fill_holes(volume > -0.95)
    inner = binary_erosion(head, structure=np.ones((1, 5, 5), bool), iterations=2)  # ~7 mm inside the skull
    return soft_tissue & inner


def image_hotspot(
    attribution: np.ndarray, image: np.ndarray | None = None, smooth_voxels: int = 3
) -> tuple[int, int, int]:
    """(k, i, j) of the strongest positive attribution after a small box smoothing (one voxel is noise),
    inside the brain when the image is given."""
    smoothed = uniform_filter(np.maximum(attribution, 0.0), size=smooth_voxels)
    if image is not None:
        region = brain_region(image)
        if region.any():
            smoothed = np.where(region, smoothed, -np.inf)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(smoothed)), smoothed.shape))  # type: ignore[return-value]


#: Where the grid centre sits in MNI space (mm): preprocessing centres the grid on the acquired volume,
#: which for a head CT/MR is about the centre of the brain.
GRID_CENTRE_MNI = np.array([0.0, -18.0, 5.0])


def describe_region(voxel: tuple[int, int, int]) -> str:
    """An approximate anatomical name for a contract-grid voxel.

    Contract axes are (z, y, x) in LPS. The voxel's offset from the grid centre is mapped to approximate MNI
    millimetres (``GRID_CENTRE_MNI``) and compared with coarse vascular-territory boundaries (anterior,
    middle, posterior cerebral artery, posterior fossa). Approximate by design: no registration is done, so
    the note says where to look, not a diagnosis.
    """
    centre = (np.asarray(C.VOLUME_SHAPE) - 1) / 2.0
    z_lps, y_lps, x_lps = (np.asarray(voxel) - centre) * np.asarray(C.VOLUME_SPACING_MM)
    x, y, z = np.array([-x_lps, -y_lps, z_lps]) + GRID_CENTRE_MNI  # RAS / MNI mm
    side = "left" if x < 0 else "right"
    lateral = abs(x)
    if z < -20 and y < -35:
        return "posterior fossa (vertebrobasilar territory)"
    if lateral < 16 and y > -55 and z > 0:
        return f"{side} ACA territory"
    if y < -68 or (-68 <= y < -25 and -30 < z < -5 and lateral > 12):
        return f"{side} PCA territory"
    if lateral < 12:
        return f"{side} deep grey / periventricular region"
    return f"{side} MCA territory"


def _vitals_pattern(key: str, values: np.ndarray, mask: np.ndarray, attribution: np.ndarray) -> str:
    """What about this feature's history pushed the score up: level, variability or trend."""
    seen = mask > 0
    obs = values[seen]
    display = _FEATURE_DISPLAY[key]
    if obs.size >= 3:
        diffs = np.diff(obs)
        variability = float(np.sqrt(np.mean(diffs**2)))
        slope = float(np.polyfit(np.flatnonzero(seen), obs, 1)[0]) * C.N_STEPS
    else:
        variability, slope = 0.0, 0.0
    level = float(obs.mean()) if obs.size else 0.0
    if key == "hr" and variability > 0.8:
        return "irregular heart rate (possible atrial fibrillation)"
    if key == "glucose" and level > 0.8:
        return "hyperglycaemia"
    candidates = {"labile": variability / 0.5, "rising": slope / 1.0, "high": level / 1.0, "low": -level / 1.0}
    word = max(candidates, key=lambda w: candidates[w])
    if candidates[word] < 0.5:
        word = "pattern of"
    return f"{word} {display}"


def _recent_days(attribution_over_time: np.ndarray) -> int:
    """The shortest look-back (7, 14 or 28 days) holding most of a feature's positive attribution."""
    positive = np.maximum(attribution_over_time, 0.0)
    total = positive.sum()
    for days in (7, 14):
        if total > 0 and positive[-days * STEPS_PER_DAY :].sum() >= 0.6 * total:
            return days
    return C.WINDOW_HOURS // 24


def top_drivers(explanation: Explanation, inputs: Mapping[str, np.ndarray], k: int = 3) -> list[str]:
    """Up to ``k`` short phrases naming what raised this patient's score most, strongest first.

    ``inputs`` are the patient's unbatched arrays. Candidates: the image hot-spot region, each vitals
    feature (attribution summed over time), and age. Only positive contributions are named.
    """
    candidates: list[tuple[float, str]] = []
    if explanation.image_attribution is not None:
        attr = explanation.image_attribution
        hotspot = image_hotspot(attr, np.asarray(inputs["image"]))
        candidates.append((float(np.maximum(attr, 0).sum()), f"image region: {describe_region(hotspot)}"))
    if explanation.vitals_attribution is not None:
        vit = np.asarray(inputs["vitals"])
        mask = np.asarray(inputs["vitals_mask"])
        for f, feature in enumerate(C.VITAL_FEATURES):
            score = float(explanation.vitals_attribution[:, f].sum())
            if mask[:, f].sum() == 0:
                continue
            days = _recent_days(explanation.vitals_attribution[:, f])
            text = f"{_vitals_pattern(feature.key, vit[:, f], mask[:, f], explanation.vitals_attribution[:, f])}"
            candidates.append((score, f"{text} over the last {days} days"))
    age_score = float(explanation.demographics_attribution[0])
    candidates.append((age_score, "older age" if float(np.asarray(inputs["demographics"])[0]) > 0 else "age"))
    ranked = sorted((c for c in candidates if c[0] > 0), key=lambda c: -c[0])
    return [text for _, text in ranked[:k]]


# ----------------------------------------------------------------------------------------------
# Pictures and checks
# ----------------------------------------------------------------------------------------------


def pointing_hit(
    attribution: np.ndarray, finding_mask: np.ndarray, image: np.ndarray | None = None, tolerance_voxels: int = 1
) -> bool:
    """Pointing game: does the attribution hot-spot fall on the finding (dilated by a small tolerance)?"""
    target = binary_dilation(finding_mask, iterations=tolerance_voxels) if tolerance_voxels else finding_mask
    return bool(target[image_hotspot(attribution, image)])


def render_overlay(image: np.ndarray, attribution: np.ndarray, out_path: Path, title: str = "") -> Path:
    """PNG: the three axial slices around the attribution hot-spot, grey image with a heat overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume = np.asarray(image).reshape(C.VOLUME_SHAPE)
    heat = np.maximum(attribution, 0.0)
    k0 = image_hotspot(attribution, volume)[0]
    slices = [k for k in (k0 - 1, k0, k0 + 1) if 0 <= k < volume.shape[0]]
    vmax = float(heat.max()) or 1.0
    fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.4))
    for ax, k in zip(np.atleast_1d(axes), slices, strict=True):
        ax.imshow(volume[k], cmap="gray", vmin=-1, vmax=1)
        ax.imshow(np.ma.masked_less(heat[k], 0.05 * vmax), cmap="hot", alpha=0.6, vmin=0, vmax=vmax)
        ax.set_title(f"slice {k}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1001, help="synthetic cohort seed")
    parser.add_argument("--n", type=int, default=16, help="cohort size to draw the patient from")
    parser.add_argument("--index", type=int, default=0, help="which patient of the cohort")
    parser.add_argument("--weights", type=Path, default=DEFAULT_OUT / "fusion")
    parser.add_argument("--out", type=Path, default=Path("reports/explain"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    inputs = cohort_inputs(make_cohort(args.n, args.seed))
    patient = {k: v[args.index] for k, v in inputs.items()}
    explanation = explain_patient(load(args.weights), patient)
    print(f"probability {explanation.probability:.3f}")
    for text in explanation.drivers:
        print(f"- {text}")
    if explanation.image_attribution is not None:
        path = render_overlay(
            patient["image"],
            explanation.image_attribution,
            args.out / "overlay.png",
            f"p = {explanation.probability:.2f}",
        )
        print(f"overlay: {path}")


if __name__ == "__main__":
    main()
