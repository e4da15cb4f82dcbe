"""Explanations: attributions land on planted findings (pointing game), and render as text and a PNG.

Uses the shipped weights (modelling/weights/fusion) and a synthetic cohort from a seed not used in
training, so it checks the model that is actually served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from inference import contract as C
from modelling.explain import brain_region, describe_region, explain_patient, pointing_hit, render_overlay
from modelling.export import DEFAULT_WEIGHTS_DIR
from modelling.model import load
from modelling.train.data import cohort_inputs

EXPLAIN_SEED = 4242  # not a training or evaluation seed
N_PATIENTS = 48
N_POINTING = 12


@pytest.fixture(scope="module")
def cohort() -> object:
    from synth import make_arrays

    return make_arrays(N_PATIENTS, EXPLAIN_SEED)


@pytest.fixture(scope="module")
def fusion() -> torch.nn.Module:
    torch.set_num_threads(2)
    return load(DEFAULT_WEIGHTS_DIR)


def _patient(cohort: object, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in cohort_inputs(cohort).items()}


@pytest.fixture(scope="module")
def pointing_game(cohort: object, fusion: object) -> tuple[float, float]:
    """(hit rate, chance rate) of the attribution hot-spot on the planted findings, over the patients with
    the largest findings (those whose score the image raised most)."""
    masks = np.asarray(cohort.finding_mask)  # type: ignore[attr-defined]
    present = np.asarray(cohort.image_present)[:, 0] > 0  # type: ignore[attr-defined]
    candidates = [i for i in np.argsort(-masks.reshape(len(masks), -1).sum(1)) if present[i] and masks[i].any()]
    chosen = candidates[:N_POINTING]
    assert len(chosen) >= 8, "the cohort should hold enough patients with planted findings"
    hits, chance = [], []
    for i in chosen:
        explanation = explain_patient(fusion, _patient(cohort, i), n_steps=16)  # type: ignore[arg-type]
        assert explanation.image_attribution is not None
        image = np.asarray(cohort.image)[i]  # type: ignore[attr-defined]
        hits.append(pointing_hit(explanation.image_attribution, masks[i], image))
        # chance: a hot-spot dropped uniformly in the searched brain region hits the (dilated) finding this often
        chance.append(binary_dilation(masks[i], iterations=1)[brain_region(image)].mean())
    return float(np.mean(hits)), float(np.mean(chance))


def test_attribution_points_at_planted_findings_far_more_than_chance(pointing_game: tuple[float, float]) -> None:
    hit_rate, chance_rate = pointing_game
    assert hit_rate >= 5 * chance_rate, f"pointing game {hit_rate:.2f} (chance {chance_rate:.3f})"


def test_pointing_game_reaches_the_target_hit_rate(pointing_game: tuple[float, float]) -> None:
    hit_rate, chance_rate = pointing_game
    assert hit_rate >= 0.7, f"pointing game {hit_rate:.2f} (chance {chance_rate:.3f})"


def test_top_drivers_are_short_text_for_a_high_risk_patient(cohort: object, fusion: object) -> None:
    risk = np.asarray(cohort.true_probability)  # type: ignore[attr-defined]
    i = int(np.argmax(risk))
    explanation = explain_patient(fusion, _patient(cohort, i), n_steps=16)  # type: ignore[arg-type]
    assert 1 <= len(explanation.drivers) <= 3
    assert all(isinstance(d, str) and 3 < len(d) < 80 for d in explanation.drivers)
    assert explanation.probability > float(np.median(risk))


def test_without_image_no_image_driver_is_named(cohort: object, fusion: object) -> None:
    patient = _patient(cohort, 0)
    patient["image"] = np.zeros_like(patient["image"])
    patient["image_present"] = np.zeros_like(patient["image_present"])
    explanation = explain_patient(fusion, patient, n_steps=8)  # type: ignore[arg-type]
    assert explanation.image_attribution is None
    assert not any(d.startswith("image region") for d in explanation.drivers)


def test_overlay_png_is_written(tmp_path: Path, cohort: object, fusion: object) -> None:
    patient = _patient(cohort, 1)
    patient["image_present"] = np.ones_like(patient["image_present"])
    explanation = explain_patient(fusion, patient, n_steps=8)  # type: ignore[arg-type]
    assert explanation.image_attribution is not None
    path = render_overlay(patient["image"], explanation.image_attribution, tmp_path / "overlay.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("offset_mm", "expected"),
    [
        ((0.0, 0.0, 45.0), "left MCA territory"),  # (z, y, x) LPS: +x is the patient's left
        ((0.0, 0.0, -45.0), "right MCA territory"),
        ((25.0, -50.0, 5.0), "left ACA territory"),  # superior, anterior, near the midline
        ((10.0, 65.0, -10.0), "right PCA territory"),  # posterior
    ],
)
def test_regions_are_named_in_patient_orientation(offset_mm: tuple[float, float, float], expected: str) -> None:
    centre = (np.asarray(C.VOLUME_SHAPE) - 1) / 2.0
    voxel = np.round(centre + np.asarray(offset_mm) / np.asarray(C.VOLUME_SPACING_MM)).astype(int)
    assert describe_region(tuple(int(v) for v in voxel)) == expected  # type: ignore[arg-type]
