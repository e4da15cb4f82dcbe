"""The fusion network: shapes, gating by presence, the single-modality variants, save/load, training loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import contract as C
from modelling.calibrate import expected_calibration_error, fit_temperature, fit_temperature_and_bias, sigmoid
from modelling.config import FusionConfig
from modelling.model import PRESENCE_PATTERNS, CalibratedModel, FusionModel, calibrated_logit, load, save
from modelling.train.calibration import calibrate
from modelling.train.data import cohort_inputs, withhold
from modelling.train.features import predict_logits
from modelling.train.pipeline import run as train_run
from modelling.train.settings import TrainSettings


@dataclass
class ToyCohort:
    """Contract-shaped random patients whose outcome depends on a planted bright blob and on SBP lability."""

    image: np.ndarray
    image_present: np.ndarray
    vitals: np.ndarray
    vitals_mask: np.ndarray
    vitals_delta: np.ndarray
    demographics: np.ndarray
    outcome: np.ndarray
    true_probability: np.ndarray
    finding_mask: np.ndarray
    finding_label: np.ndarray  # the blob labelled as an infarct (kind 2 -> label 3)
    image_factors: np.ndarray  # (lacunes, WMD grade, territorial, hyperdense vessel): the blob as "territorial"
    vital_factors: np.ndarray  # (sbp_z, lability_z, rising trend, AF, glucose_z): lability as +-1


def toy_cohort(n: int, seed: int) -> ToyCohort:
    rng = np.random.default_rng(seed)
    D, H, W = C.VOLUME_SHAPE
    T, Fn = C.N_STEPS, C.N_FEATURES
    image = (0.1 * rng.standard_normal((n, 1, D, H, W))).astype(np.float32)
    finding = np.zeros((n, D, H, W), dtype=bool)
    has_finding = rng.random(n) < 0.4
    for i in np.flatnonzero(has_finding):
        z, y, x = rng.integers(4, D - 8), rng.integers(8, H - 12), rng.integers(8, W - 12)
        finding[i, z : z + 4, y : y + 6, x : x + 6] = True
    image[:, 0][finding] = 1.0
    mask = (rng.random((n, T, Fn)) < 0.3).astype(np.float32)
    labile = rng.random(n) < 0.4
    vitals = (rng.standard_normal((n, T, Fn)) * np.where(labile, 1.5, 0.3)[:, None, None]).astype(np.float32) * mask
    delta = np.where(mask > 0, 0.0, 0.5).astype(np.float32)
    demographics = rng.standard_normal((n, 2)).astype(np.float32)
    logit = -2.5 + 3.5 * has_finding + 3.0 * labile
    prob = 1.0 / (1.0 + np.exp(-logit))
    image_factors = np.zeros((n, 4), np.float32)
    image_factors[:, 2] = has_finding
    vital_factors = np.zeros((n, 5), np.float32)
    vital_factors[:, 1] = np.where(labile, 1.0, -1.0)
    return ToyCohort(
        image,
        np.ones((n, 1), np.float32),
        vitals,
        mask,
        delta,
        demographics,
        (rng.random(n) < prob).astype(np.float64),
        prob,
        finding,
        finding.astype(np.uint8) * 3,
        image_factors,
        vital_factors,
    )


def random_batch(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {spec.name: torch.randn(batch, *spec.dims, generator=gen) for spec in C.INPUTS}
    out["image_present"] = torch.ones(batch, 1)
    out["vitals_mask"] = (out["vitals_mask"] > 0).float()
    return out


@pytest.mark.parametrize("variant", ["fusion", "image", "vitals"])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_returns_one_logit_per_patient(variant: str, batch: int) -> None:
    model = FusionModel(FusionConfig(variant=variant)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        logit = model.forward_dict(random_batch(batch))
    assert logit.shape == (batch, 1)
    assert torch.isfinite(logit).all()


def test_wrong_input_shape_is_rejected_with_the_tensor_name() -> None:
    model = FusionModel(FusionConfig()).eval()
    inputs = random_batch(2)
    inputs["vitals"] = inputs["vitals"][:, :10]
    with pytest.raises(AssertionError, match="vitals"):
        model.forward_dict(inputs)


def test_absent_image_content_is_ignored() -> None:
    """With image_present = 0 the volume's voxels cannot change the score (the engine may send garbage)."""
    torch.manual_seed(0)
    model = FusionModel(FusionConfig()).eval()
    a = random_batch(2, seed=1)
    a["image_present"] = torch.zeros(2, 1)
    b = dict(a, image=torch.randn_like(a["image"]) * 5)
    with torch.no_grad():
        assert torch.allclose(model.forward_dict(a), model.forward_dict(b))
        present = dict(b, image_present=torch.ones(2, 1))
        assert not torch.allclose(model.forward_dict(a), model.forward_dict(present))


def test_all_masked_vitals_score_like_no_vitals() -> None:
    """No observed vitals: values behind an all-zero mask must not move the score."""
    torch.manual_seed(0)
    model = FusionModel(FusionConfig()).eval()
    a = random_batch(2, seed=2)
    a["vitals_mask"] = torch.zeros_like(a["vitals_mask"])
    a["vitals_delta"] = torch.ones_like(a["vitals_delta"])
    b = dict(a, vitals=torch.randn_like(a["vitals"]))
    with torch.no_grad():
        assert torch.allclose(model.forward_dict(a), model.forward_dict(b))


def test_fusion_head_is_logistic_per_presence_pattern_and_baselines_keep_the_mlp() -> None:
    from modelling.config import IMAGE_CONCEPTS, VITAL_CONCEPTS
    from modelling.model import concept_values

    assert FusionModel(FusionConfig(variant="image")).logistic is None
    assert FusionModel(FusionConfig(variant="vitals")).logistic is None
    assert FusionModel(FusionConfig(head_kind="mlp")).logistic is None
    torch.manual_seed(0)
    model = FusionModel(FusionConfig()).eval()
    head = model.logistic
    assert head is not None and model.head is None
    inputs = random_batch(3, seed=4)
    i, j = IMAGE_CONCEPTS.index("territorial"), VITAL_CONCEPTS.index("lability_z")
    # the "both" block: demographics, image concepts, vital concepts, their positive parts, then the products
    n_before = 4 + C.N_DEMOGRAPHICS + len(IMAGE_CONCEPTS) + 2 * len(VITAL_CONCEPTS)
    column = n_before + i * len(VITAL_CONCEPTS) + j
    with torch.no_grad():
        before = model.forward_dict(inputs)
        head.linear.weight[0, column] += 1.5
        head.scale[column - 4] = 2.0
        after = model.forward_dict(inputs)
        _, aux = model.forward_with_aux(*(inputs[k] for k in C.INPUT_NAMES))
    image = concept_values(aux["image_concepts"], IMAGE_CONCEPTS)[:, i]
    vital = concept_values(aux["vital_concepts"], VITAL_CONCEPTS)[:, j]
    product = image * vital.clamp(min=0)  # an old infarct on labile blood pressure
    old_weight = head.linear.weight[0, column] - 1.5
    want = 1.5 * product / 2.0 + old_weight * (product / 2.0 - product)  # the new weight, the new scale
    assert torch.allclose(after - before, want.unsqueeze(1), atol=1e-5)
    # without the image the "both" block is not read at all
    no_image = dict(inputs, image_present=torch.zeros(3, 1))
    with torch.no_grad():
        head.linear.weight[0, column] += 100.0
        moved = model.forward_dict(no_image)
        head.linear.weight[0, column] -= 100.0
        assert torch.allclose(moved, model.forward_dict(no_image))


def test_logistic_head_fit_finds_a_planted_cross_modal_interaction() -> None:
    """``fit_logistic_head`` on concepts whose outcome hangs on one image concept times one vital excess: that
    product gets the largest of the 20 product weights, and the head ranks patients as the truth does."""
    from sklearn.metrics import roc_auc_score

    from modelling.config import IMAGE_CONCEPTS, VITAL_CONCEPTS
    from modelling.train.features import vital_values
    from modelling.train.heads import fit_logistic_head

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 3000
    model = FusionModel(FusionConfig()).eval()
    inputs = {k: v.numpy() for k, v in random_batch(n, seed=5).items()}
    image_concepts = rng.normal(1.0, 1.0, size=(n, len(IMAGE_CONCEPTS))).astype(np.float32)  # raw
    excess = np.maximum(vital_values(model, inputs), 0)  # (n, K_vit), what the head multiplies by
    j = int(np.argmax(excess.std(axis=0)))
    truth = -1.5 + 1.2 * image_concepts[:, 0] * excess[:, j] / excess[:, j].std()  # lacunes x one vital excess
    y = (rng.random(n) < sigmoid(truth)).astype(np.float64)
    chosen = fit_logistic_head(model, image_concepts, inputs, y, np.arange(n), seed=0)
    assert chosen["both"]["n"] == n  # type: ignore[index]
    head = model.logistic
    assert head is not None
    ki, kv = len(IMAGE_CONCEPTS), len(VITAL_CONCEPTS)
    first = len(PRESENCE_PATTERNS) + C.N_DEMOGRAPHICS + ki + 2 * kv  # the products of the "both" block
    products = head.linear.weight[0, first : first + ki * kv].abs()
    assert int(products.argmax()) == 0 * kv + j, "the planted product is the strongest"
    with torch.no_grad():
        batch = {k: torch.from_numpy(v) for k, v in inputs.items()}
        logit, _ = model.fuse(torch.from_numpy(image_concepts), *(batch[k] for k in C.INPUT_NAMES[1:]))
    assert roc_auc_score(y, logit[:, 0].numpy()) > roc_auc_score(y, truth) - 0.01
    # the same concepts and seed give the same head, bit for bit
    first_fit = head.linear.weight.detach().clone()
    fit_logistic_head(model, image_concepts, inputs, y, np.arange(n), seed=0)
    assert torch.equal(head.linear.weight.detach(), first_fit)


def test_logistic_head_fit_without_a_pattern_in_the_data_falls_back_to_the_event_rate() -> None:
    """No training patient has an image: the "both" and "image" models cannot be fitted; they get no feature
    weight and the event rate as intercept (recorded), and the vitals-only model is fitted as usual."""
    from modelling.train.heads import fit_logistic_head

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    n = 400
    model = FusionModel(FusionConfig()).eval()
    inputs = {k: v.numpy() for k, v in random_batch(n, seed=6).items()}
    inputs["image_present"] = np.zeros((n, 1), np.float32)
    y = (rng.random(n) < 0.3).astype(np.float64)
    chosen = fit_logistic_head(model, np.zeros((n, 4), np.float32), inputs, y, np.arange(n), seed=0)
    assert chosen["both"]["n"] == 0 and chosen["both"]["C"] is None  # type: ignore[index]
    assert chosen["image"]["n"] == 0 and chosen["vitals"]["n"] == n  # type: ignore[index]
    assert chosen["vitals"]["C"] is not None  # type: ignore[index]
    head = model.logistic
    assert head is not None
    both = head.linear.weight[0, PRESENCE_PATTERNS.index("both")]
    assert abs(float(both.detach()) - np.log(0.5 / 0.5)) < 1e-6  # no patients, no events: even odds
    assert torch.isfinite(head.linear.weight).all()


def test_configs_before_the_logistic_head_load_with_the_mlp_head() -> None:
    raw = json.loads(FusionConfig().to_json())
    del raw["head_kind"]
    cfg = FusionConfig.from_json(json.dumps(raw))
    assert cfg.head_kind == "mlp"
    assert FusionModel(cfg).logistic is None and FusionModel(cfg).head is not None


def test_calibrated_model_divides_logit_by_temperature_and_adds_the_bias() -> None:
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(temperature=2.0, calibration_bias=0.25)).eval()
    inputs = random_batch(3)
    with torch.no_grad():
        raw = model.forward_dict(inputs)
        prob, logit = CalibratedModel(model)(*(inputs[n] for n in C.INPUT_NAMES))
    assert torch.allclose(logit, raw / 2.0 + 0.25)
    assert torch.allclose(prob, torch.sigmoid(raw / 2.0 + 0.25))
    assert np.allclose(calibrated_logit(model.cfg, raw.numpy()), logit.numpy(), atol=1e-6)


def test_temperature_and_bias_recover_a_shifted_overconfident_model() -> None:
    """A model three times too confident and 0.4 logits too low: temperature alone leaves the base rate
    off, temperature and intercept together recover both."""
    rng = np.random.default_rng(1)
    true_logit = rng.normal(-1.2, 1.2, 40000)
    y = (rng.random(40000) < sigmoid(true_logit)).astype(float)
    model_logit = (true_logit - 0.4) * 3.0
    t, b = fit_temperature_and_bias(model_logit, y)
    assert 2.8 < t < 3.2 and 0.3 < b < 0.5
    assert expected_calibration_error(sigmoid(model_logit / t + b), y) < 0.01
    t_only = fit_temperature(model_logit, y)
    assert expected_calibration_error(sigmoid(model_logit / t_only), y) > 0.02


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(variant="vitals", temperature=1.3, info={"seed": 7})).eval()
    loaded = load(save(model, tmp_path / "vitals"))
    assert loaded.cfg == model.cfg
    inputs = random_batch(2)
    with torch.no_grad():
        assert torch.equal(model.forward_dict(inputs), loaded.forward_dict(inputs))


def test_withhold_matches_what_preprocessing_sends_for_missing_data() -> None:
    from inference.preprocess import empty_image, vitals_tensors

    cohort = toy_cohort(3, seed=0)
    inputs = cohort_inputs(cohort)
    no_image = withhold(inputs, "image")
    assert np.array_equal(no_image["image"][0], empty_image()) and no_image["image_present"].sum() == 0
    no_vitals = withhold(inputs, "vitals", np.array([1]))
    values, mask, delta = vitals_tensors([])
    assert np.array_equal(no_vitals["vitals"][1], values) and np.array_equal(no_vitals["vitals_mask"][1], mask)
    assert np.array_equal(no_vitals["vitals_delta"][1], delta)
    assert np.array_equal(no_vitals["vitals"][0], inputs["vitals"][0]), "only the selected rows change"


def test_temperature_recovers_an_overconfident_scale() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 20000)
    y = (rng.random(20000) < sigmoid(true_logit)).astype(float)
    t = fit_temperature(true_logit * 3.0, y)
    assert 2.7 < t < 3.3
    assert expected_calibration_error(sigmoid(true_logit * 3.0 / t), y) < 0.02


def test_training_learns_a_planted_signal_and_saves_all_variants(tmp_path: Path) -> None:
    cohort = toy_cohort(192, seed=0)
    settings = TrainSettings(
        epochs=5, cnn_epochs=5, batch_size=32, patience=5, lr=3e-3, vitals_extra=0, spot_steps=30, calibration_extra=0
    )
    head = toy_cohort(64, seed=2)  # patients the CNN never sees; the staged heads learn from them too
    out = train_run(
        seed=0,
        n=192,
        out_dir=tmp_path,
        variants=("fusion", "vitals", "image"),
        settings=settings,
        cohort=cohort,
        head=head,
    )
    fusion, image, vitals = load(out / "fusion"), load(out / "image"), load(out / "vitals")
    assert (out / "vitals" / "weights.pt").is_file()
    n_train = 192 - round(192 * settings.val_fraction)
    for model in (fusion, image):
        assert model.cfg.info["head_records_added"] == 64
        assert model.cfg.info["n_train"] == n_train + 64, "the head cohort joins the training split"
        assert model.cfg.info["n_val"] == 192 - n_train, "the validation split is the cohort's alone"
    assert "head_records_added" not in vitals.cfg.info and vitals.cfg.info["n_train"] == n_train
    assert image.cfg.info["concept_head_refit"]["epochs"] > 0
    assert fusion.cfg.info["seed"] == 0 and fusion.cfg.temperature > 0
    assert fusion.cfg.info["staged_from_baselines"] is True
    # the fusion head: one logistic model per presence pattern, its penalty chosen by cross-validation
    from modelling.train.heads import LOGISTIC_HEAD_CS

    chosen = fusion.cfg.info["logistic_head"]
    assert set(chosen) == set(PRESENCE_PATTERNS)  # type: ignore[call-overload]
    assert all(c["C"] in LOGISTIC_HEAD_CS and c["n"] == n_train + 64 for c in chosen.values())  # type: ignore[attr-defined]
    assert image.cfg.info["staged_from_baselines"] is True, "the image baseline's head is refitted on its frozen CNN"
    # staged: the fusion model's image branch is the image baseline's, unchanged
    for name, tensor in fusion.image_branch.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(tensor, image.image_branch.state_dict()[name]), name  # type: ignore[union-attr]
    test = toy_cohort(200, seed=1)
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(test.outcome, predict_logits(fusion, cohort_inputs(test)))
    assert auroc > 0.65, f"fusion did not learn the planted signal (AUROC {auroc:.3f})"

    # calibration on held-out patients: the staged fusion model and its image baseline share one CNN pass,
    # and what is fitted is what predict_proba applies
    models = {"fusion": fusion, "image": image, "vitals": load(out / "vitals")}
    held_out = cohort_inputs(test), np.asarray(test.outcome, dtype=np.float64)
    calibrate(models, [held_out], "toy held-out set")
    for model in models.values():
        assert model.cfg.info["calibration"]["n"] == 200
        logits = calibrated_logit(model.cfg, predict_logits(model, held_out[0]))
        assert abs(sigmoid(logits).mean() - held_out[1].mean()) < 0.02, "intercept fitted: mean prediction = event rate"


def test_spot_readout_counts_distinct_peaks_not_voxels() -> None:
    from modelling.branches import SpotDetector
    from modelling.config import SPOT_KINDS

    logits = torch.full((1, len(SPOT_KINDS), 8, 16, 16), -8.0)
    logits[0, 0, 2:4, 3:6, 3:6] = 3.0  # one spot of 18 voxels...
    logits[0, 0, 2, 4, 4] = 4.0  # ...with one summit
    logits[0, 0, 6, 12, 12] = 2.0  # a second, single-voxel spot
    logits[0, 0, 6, 2, 12] = -1.0  # a peak below 0.5: not counted
    out = SpotDetector.readout(logits)  # (1, 3K): counts, masses, maxima
    k = len(SPOT_KINDS)
    assert out.shape == (1, 3 * k)
    assert torch.isclose(out[0, 0], torch.log1p(torch.tensor(2.0))), "two spots above 0.5, however many voxels"
    assert torch.isclose(out[0, 1], torch.tensor(0.0)), "an empty map counts nothing"
    assert torch.isclose(out[0, 2 * k], torch.sigmoid(torch.tensor(4.0)))


def test_spot_detector_learns_to_count_small_planted_spots() -> None:
    """Dark 2x2x2 spots (labelled as lacunes) among bright noise and a larger dark distractor slab: after
    patch training the peak count tracks the true number of spots per volume."""
    from modelling.config import SPOT_REGION
    from modelling.model import FusionModel as Model
    from modelling.train.features import spot_readouts
    from modelling.train.spots import fit_spot_detector

    rng = np.random.default_rng(3)
    n = 48
    D, H, W = C.VOLUME_SHAPE
    image = (0.3 + 0.05 * rng.standard_normal((n, 1, D, H, W))).astype(np.float32)
    (z0, z1), (y0, y1), (x0, x1) = SPOT_REGION
    image[:, :, z0 + 4 : z0 + 8, y0 + 1 : y0 + 10, x0 + 1 : x0 + 16] = -0.4  # an unlabelled dark structure
    label = np.zeros((n, D, H, W), np.uint8)
    counts = rng.integers(0, 4, n)
    for i in range(n):
        for _ in range(counts[i]):
            z, y, x = rng.integers(z0 + 1, z1 - 3), rng.integers(y0 + 12, y1 - 3), rng.integers(x0 + 18, x1 - 3)
            image[i, 0, z : z + 2, y : y + 2, x : x + 2] = -0.4
            label[i, z : z + 2, y : y + 2, x : x + 2] = 1
    torch.manual_seed(0)
    model = Model(FusionConfig(variant="image"))
    settings = TrainSettings(spot_steps=400, spot_batch=8, spot_patch=(8, 16, 16), spot_focus=(0.5, 0.0))
    inputs = {"image": image, "image_present": np.ones((n, 1), np.float32)}
    fit_spot_detector(model, inputs, label, np.arange(n), settings)
    assert not any(p.requires_grad for p in model.image_branch.spots.parameters()), "frozen after training"
    found = np.expm1(spot_readouts(model, inputs)[:, 0]).round()
    from scipy import ndimage

    truth = np.array([ndimage.label(label[i] == 1)[1] for i in range(n)])
    assert np.mean(found == truth) > 0.7, f"counts {found.tolist()} vs {truth.tolist()}"
    # the detector reads only its region: a spot planted outside it is not counted
    outside = image.copy()
    outside[:, 0, 1:3, 2:4, 2:4] = -0.4
    assert z0 >= 3 and y0 >= 4 and x0 >= 4, "the region leaves room for a spot outside it"
    moved = np.expm1(spot_readouts(model, {**inputs, "image": outside})[:, 0]).round()
    np.testing.assert_array_equal(moved, found)


def test_spot_patches_include_hard_negatives_where_others_have_findings() -> None:
    """The spot detector's patch sampler: by the shares of the settings, patches near a labelled finding of the
    patient, at a place where another patient has one but this one has none (hard negatives), or anywhere in the
    region; a share whose kind has no example passes on."""
    from modelling.config import SPOT_REGION
    from modelling.train.spots import spot_patch_centre

    rs = np.random.default_rng(1)
    lacune_at = {i: rs.integers(10, 30, (6, 3)) for i in (0, 3, 5)}
    vessel_at = {2: np.array([[12, 20, 30], [12, 21, 30]])}
    where = {1: list(lacune_at.items()), 4: list(vessel_at.items())}
    without = {1: np.array([1, 2, 4, 6]), 4: np.array([0, 1, 3, 4, 5, 6])}
    present = np.arange(7)
    settings = TrainSettings(spot_focus=(0.2, 0.2), spot_negatives=(0.2, 0.2))
    third = -(-np.array(settings.spot_patch) // 3)  # the jitter, rounded away from zero
    rng = np.random.default_rng(0)
    seen: dict[str, int] = {}
    for _ in range(2000):
        row, centre, why = spot_patch_centre(rng, settings, where, without, present, SPOT_REGION)
        seen[why] = seen.get(why, 0) + 1
        if why in ("lacune", "not lacune", "hyperdense_vessel", "not hyperdense_vessel"):
            at = lacune_at if "lacune" in why else vessel_at
            negative = why.startswith("not ")
            assert (row in without[1 if "lacune" in why else 4]) == negative, (why, row)
            sources = [at[row]] if not negative else list(at.values())
            # within a third of the patch of some labelled voxel (of this patient, or of another for a negative)
            assert any((np.abs(v - centre) <= third).all(axis=1).any() for v in sources), (why, row, centre)
        else:
            assert why == "background" and all(lo <= c < hi for c, (lo, hi) in zip(centre, SPOT_REGION, strict=True))
    assert set(seen) == {"lacune", "not lacune", "hyperdense_vessel", "not hyperdense_vessel", "background"}
    assert all(abs(count / 2000 - 0.2) < 0.04 for count in seen.values()), seen
    # no patient has a vessel sign: its shares pass on (to the next kind, then to background)
    no_vessel = {1: where[1], 4: []}
    whys = [spot_patch_centre(rng, settings, no_vessel, without, present, SPOT_REGION)[2] for _ in range(1000)]
    assert "hyperdense_vessel" not in whys and "not hyperdense_vessel" not in whys
    assert 0.3 < whys.count("background") / 1000 < 0.5


def test_concept_head_refit_recovers_concepts_from_frozen_features() -> None:
    """The image concept head, refitted alone on pooled features that determine the concepts, learns them
    (and leaves the head frozen); a head left as initialised does not know them."""
    from modelling.config import BINARY_CONCEPTS, IMAGE_CONCEPTS
    from modelling.train.heads import refit_concept_head

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    model = FusionModel(FusionConfig(variant="image", spot_channels=4))
    assert model.image_branch is not None
    width = model.image_branch.concept_head[0].num_features
    n = 600
    pooled = rng.standard_normal((n, width)).astype(np.float32)
    factors = np.stack(
        [
            np.clip(np.round(1.5 + pooled[:, 0]), 0, 4),  # lacune count
            np.clip(np.round(1.5 + pooled[:, 1] - pooled[:, 2]), 0, 3),  # WMD grade
            (pooled[:, 3] > 0.8).astype(float),  # territorial
            (pooled[:, 4] > 1.2).astype(float),  # vessel sign
        ],
        axis=1,
    ).astype(np.float32)
    present = np.ones((n, 1), np.float32)
    present[:20] = 0.0  # absent images are left out of the fit
    split = (np.arange(100, n), np.arange(0, 100))
    result = refit_concept_head(model, pooled, factors, present, split, TrainSettings(concept_refit_epochs=150))

    assert result["val_concept_loss_after"] < 0.5 * result["val_concept_loss_before"]
    assert not any(p.requires_grad for p in model.image_branch.concept_head.parameters())
    with torch.no_grad():
        raw = model.image_branch.concept_head(torch.from_numpy(pooled[100:])).numpy()
    for k, name in enumerate(IMAGE_CONCEPTS):
        truth = factors[100:, k]
        if name in BINARY_CONCEPTS:  # logits: ranked right (AUROC)
            pos, neg = raw[truth > 0.5, k], raw[truth < 0.5, k]
            auroc = (pos[:, None] > neg[None, :]).mean()
            assert auroc > 0.95, f"{name}: AUROC {auroc:.3f}"
        else:
            r = np.corrcoef(raw[:, k], truth)[0, 1]
            assert r > 0.8, f"{name}: r {r:.2f}"


def test_spot_region_holds_every_lacune_and_vessel_sign() -> None:
    """The spot detector reads only ``SPOT_REGION``: every lacune and vessel-sign voxel of patients it never
    saw (seed 4242, the first 600, labels only) lies inside it (the nearest comes within one slice of its top)."""
    from modelling.config import LESION_KINDS, SPOT_KINDS, SPOT_REGION
    from synth.patient import generate_patient

    lo = np.array([a for a, _ in SPOT_REGION])
    hi = np.array([b for _, b in SPOT_REGION])
    found = dict.fromkeys(SPOT_KINDS, 0)
    for i in range(600):
        patient = generate_patient(4242, i)
        if not (patient.geometry.lacunes or patient.geometry.hyperdense_side):
            continue
        label = patient.finding_label()
        for kind in SPOT_KINDS:
            voxels = np.argwhere(label == LESION_KINDS.index(kind) + 1)  # (n, 3) z, y, x
            if len(voxels):
                found[kind] += 1
                assert (voxels.min(axis=0) >= lo).all() and (voxels.max(axis=0) < hi).all(), (
                    f"patient {i}: {kind} voxels span {voxels.min(axis=0)}..{voxels.max(axis=0)}, region {SPOT_REGION}"
                )
    assert found["lacune"] > 100 and found["hyperdense_vessel"] > 15, found
