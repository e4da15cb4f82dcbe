"""Drivers from the logit terms of the scoring pass (no second forward pass), and occlusion where there are none.

Over fakes of the RiskModel port: ``AdditiveModel`` scores a logit that is a sum of one term per input, each zero
when its input is withheld, so occlusion and the exact terms must name the same drivers with the same points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference import contract as C
from inference.preprocess import VitalSample, demographics_tensor, empty_image, vitals_tensors
from inference.runtime.base import ModelInputs, ModelUnavailableError, Prediction, predictions
from integration.domain.drivers import top_drivers, withheld_exactly
from integration.services import explain
from integration.services.assess import assess_patients, publish
from integration.services.context import Services
from integration.services.studies import ingest_study, register_study
from integration.services.vitals import sync_vitals
from tests.unit.fakes import STUDY, FakeClock, FakeEhr, FakePacs, FakeStore

#: the AdditiveModel's weight per vital feature (on the mean of its observed normalised values)
WEIGHTS = dict(zip((f.key for f in C.VITAL_FEATURES), (0.9, 0.1, -0.6, 0.05, 0.3, 0.4, 0.7, 0.2), strict=True))
REFERENCE, IMAGE_WEIGHT, AGE_WEIGHT = -1.5, 1.1, 0.25


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class AdditiveModel:
    """logit = reference + image term + one term per vital + age term; each input's term is 0 when it is withheld
    (no image, or no value of that vital). Serves the terms unless ``serves_terms`` is False."""

    model_version = "9.9.9"
    trained = True
    runtime_name = "fake"

    def __init__(self, serves_terms: bool = True) -> None:
        self.serves_terms = serves_terms
        self.calls: list[int] = []
        self.down = False

    def terms(self, x: ModelInputs) -> list[float]:
        vitals = []
        for f, feature in enumerate(C.VITAL_FEATURES):
            seen = x.vitals_mask[:, f] > 0
            vitals.append(WEIGHTS[feature.key] * float(x.vitals[seen, f].mean()) if seen.any() else 0.0)
        image = IMAGE_WEIGHT * float(x.image_present[0]) * (1.0 + float(x.image.mean()))
        return [REFERENCE, image, *vitals, AGE_WEIGHT * float(x.demographics[0])]

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        if self.down:
            raise ModelUnavailableError("down")
        self.calls.append(len(batch))
        rows = np.asarray([self.terms(x) for x in batch], dtype=np.float32)  # (B, len(LOGIT_TERMS))
        logit = rows.astype(np.float64).sum(axis=1)
        prob = 1.0 / (1.0 + np.exp(-logit))
        return predictions(prob, logit, self.model_version, self.runtime_name, rows if self.serves_terms else None)


OBSERVED = ("sbp", "hr", "glucose", "temp")


def patient(seed: int, *, image: bool = True, observed: Sequence[str] = OBSERVED) -> ModelInputs:
    rng = np.random.default_rng(seed)
    samples = []
    for key in observed:
        f = C.FEATURE_INDEX[key]
        spec = C.VITAL_FEATURES[f]
        for hours in rng.uniform(1, C.WINDOW_HOURS - 1, 5):
            samples.append(VitalSample(f, float(hours), spec.mean + spec.std * float(rng.normal(0.5, 1.0))))
    values, mask, delta = vitals_tensors(samples)
    volume = rng.normal(0.0, 0.3, (1, *C.VOLUME_SHAPE)).astype(np.float32) if image else empty_image()
    return ModelInputs(
        image=volume,
        image_present=np.asarray([1.0 if image else 0.0], dtype=np.float32),
        vitals=values,
        vitals_mask=mask,
        vitals_delta=delta,
        demographics=demographics_tensor(float(rng.uniform(40, 90)), "female"),
    )


def batch_of(n: int) -> list[explain.Scored]:
    out: list[explain.Scored] = []
    for i in range(n):
        x = patient(i, image=i % 3 != 2)
        out.append((x, bool(x.image_present[0] > 0)))
    return out


def test_a_term_becomes_the_probability_without_it() -> None:
    withheld = withheld_exactly(0.4, {"image": 1.2, "sbp": -0.3, "hr": 0.0})
    assert withheld == pytest.approx({"image": sigmoid(-0.8), "sbp": sigmoid(0.7), "hr": sigmoid(0.4)})
    # a larger term is a larger drop: the note orders the inputs as their terms
    assert top_drivers(sigmoid(0.4), withheld) == [
        "brain imaging findings (+29 points)",
        "systolic blood pressure history lowered it (-7 points)",
    ]


def test_drivers_come_from_the_scoring_pass_with_no_second_call() -> None:
    model, batch = AdditiveModel(), batch_of(5)
    scored = model.predict([x for x, _ in batch])
    assert all(p.logit_terms is not None for p in scored)
    drivers = explain.drivers(model, batch, scored)
    assert model.calls == [5]  # the scoring call only
    assert all(drivers) and drivers[0][0].startswith("brain imaging findings (+")


def test_exact_and_occlusion_agree_for_an_additive_model() -> None:
    """Withholding an input takes exactly its term out: both ways give the same probabilities, so the same note."""
    model, batch = AdditiveModel(), batch_of(6)
    scored = model.predict([x for x, _ in batch])
    exact = explain.withheld_probabilities(model, batch, scored)
    occluded = explain.withheld_probabilities(model, batch, scored, exact=False)
    assert model.calls == [6, sum(len(explain.withheld_variants(*b)) for b in batch)]
    for ex, oc, pred in zip(exact, occluded, scored, strict=True):
        assert ex is not None and oc is not None and ex.keys() == oc.keys()
        assert ex == pytest.approx(oc, abs=1e-6)
        assert top_drivers(pred.probability, ex) == top_drivers(pred.probability, oc)


def test_only_inputs_the_patient_has_are_candidates() -> None:
    x = patient(1, image=False, observed=("sbp", "glucose"))
    (pred,) = AdditiveModel().predict([x])
    assert pred.logit_terms is not None
    pred = replace(pred, logit_terms=(*pred.logit_terms[:4], 2.0, *pred.logit_terms[5:]))  # a term for unseen rr
    pred = replace(pred, logit=pred.logit + 2.0)
    (withheld,) = explain.withheld_probabilities(AdditiveModel(), [(x, False)], [pred])
    assert withheld is not None and set(withheld) == {"sbp", "glucose"}


def test_a_model_without_terms_is_explained_by_occlusion() -> None:
    model, batch = AdditiveModel(serves_terms=False), batch_of(4)
    scored = model.predict([x for x, _ in batch])
    assert all(p.logit_terms is None for p in scored)
    drivers = explain.drivers(model, batch, scored)
    assert model.calls == [4, sum(len(explain.withheld_variants(*b)) for b in batch)]  # one batched occlusion call
    assert drivers == explain.drivers(AdditiveModel(), batch, AdditiveModel().predict([x for x, _ in batch]))


def test_only_the_patients_without_terms_are_occluded() -> None:
    model, batch = AdditiveModel(), batch_of(3)
    scored = model.predict([x for x, _ in batch])
    scored[1] = replace(scored[1], logit_terms=None)
    explain.drivers(model, batch, scored)
    assert model.calls == [3, len(explain.withheld_variants(*batch[1]))]


def test_occlusion_failing_leaves_no_drivers_and_the_scores_stand() -> None:
    model, batch = AdditiveModel(serves_terms=False), batch_of(2)
    scored = model.predict([x for x, _ in batch])
    model.down = True
    assert explain.drivers(model, batch, scored) == [[], []]


@pytest.mark.parametrize(
    "row",
    [
        [0.1] * len(C.LOGIT_TERMS),  # sums to 1.1, not to the logit
        [float("nan")] + [0.0] * (len(C.LOGIT_TERMS) - 1),
    ],
)
def test_terms_that_are_not_the_logit_are_dropped(row: list[float]) -> None:
    (pred,) = predictions(np.asarray([0.5]), np.asarray([0.0]), "v", "r", np.asarray([row]))
    assert pred.logit_terms is None and pred.contributions() is None


def test_terms_are_read_by_name() -> None:
    row = np.arange(len(C.LOGIT_TERMS), dtype=np.float64)
    (pred,) = predictions(np.asarray([0.9]), np.asarray([row.sum()]), "v", "r", row[None])
    assert pred.contributions() == {name: float(i) for i, name in enumerate(C.LOGIT_TERMS) if i}


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    model = AdditiveModel()
    clock = FakeClock()
    s = Services(store=FakeStore(clock), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model,
                 volumes_dir=tmp_path / "volumes", clock=clock)
    s.enqueue = lambda stage, ids: None  # type: ignore[method-assign]
    return s


def note_of_one_assessment(svc: Services) -> str:
    assert register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"
    sync_vitals(svc, "pat-1")
    (result,) = assess_patients(svc, ["pat-1"])
    assert result.status == "scored" and result.identifier
    assert publish(svc, result.identifier) == "published"
    (ra,) = svc.ehr.assessments()  # type: ignore[attr-defined]
    text: str = ra["note"][0]["text"]
    return text


def test_assessment_note_from_the_terms_reads_as_by_occlusion(svc: Services, tmp_path: Path) -> None:
    note = note_of_one_assessment(svc)
    model = svc.model()
    assert model.calls == [1]  # type: ignore[attr-defined]
    assert "Main drivers: brain imaging findings (+" in note

    occluding = AdditiveModel(serves_terms=False)
    clock = FakeClock()
    other = Services(store=FakeStore(clock), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: occluding,
                     volumes_dir=tmp_path / "other", clock=clock)
    other.enqueue = lambda stage, ids: None  # type: ignore[method-assign]
    assert note_of_one_assessment(other) == note
    assert occluding.calls == [1, 4]  # the image and three vital signs withheld, in one more call
