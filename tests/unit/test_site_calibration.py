"""Site recalibration: the fit recovers a known temperature and intercept, the package file, both runtimes, the
start-up refusal of an unknown site, doctor, and the engine's RiskAssessment scored through it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.runtime import (
    DEFAULT_MODEL_PATH,
    ModelContractError,
    OnnxRuntimeModel,
    Prediction,
    SiteCalibratedModel,
    SiteCalibration,
    SiteCalibrationError,
    TritonModel,
    load_site_calibration,
    site_calibration_path,
)
from inference.runtime.base import ModelInputs
from inference.runtime.site import read_site_calibrations, write_site_calibration
from integration.config import Settings
from integration.services.assess import assess_patients, publish
from integration.services.context import Services
from integration.services.studies import ingest_study, register_study
from integration.services.vitals import sync_vitals
from modelling.calibrate import fit_site_calibration
from tests.unit.fakes import STUDY, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- the fit -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "intercept"), [(1.6, -0.4), (0.7, 0.5), (1.0, 0.0)])
def test_fit_recovers_a_known_temperature_and_intercept(temperature: float, intercept: float) -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(-1.0, 2.0, 40000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(z / temperature + intercept)))).astype(int)
    t_hat, b_hat = fit_site_calibration(z, y)
    assert t_hat == pytest.approx(temperature, rel=0.06) and b_hat == pytest.approx(intercept, abs=0.06)
    with pytest.raises(ValueError, match="both outcomes"):
        fit_site_calibration(z[:10], np.zeros(10))


# -- the package file ------------------------------------------------------------------------------------------------


def _package(tmp_path: Path, **sites: tuple[float, float]) -> Path:
    """A model package in tmp_path: the shipped model.onnx and a site_calibration.json with ``sites``."""
    model = tmp_path / "model.onnx"
    shutil.copy(DEFAULT_MODEL_PATH, model)
    version = OnnxRuntimeModel(model).model_version
    for name, (t, b) in sites.items():
        write_site_calibration(site_calibration_path(model), SiteCalibration(name, t, b, version, n=500, events=90))
    return model


def test_the_file_round_trips_and_unknown_sites_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "site_calibration.json"
    write_site_calibration(path, SiteCalibration("coastal", 1.25, -0.5, "0.6.0", n=900, events=150), fit={"seed": 2})
    write_site_calibration(path, SiteCalibration("highland", 0.8, 0.3, "0.6.0"))
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["form"] == "logit_site = logit / T + b"
    assert list(data["sites"]) == ["coastal", "highland"] and data["sites"]["coastal"]["fit"] == {"seed": 2}
    got = load_site_calibration(path, "coastal")
    assert (got.temperature, got.intercept, got.model_version, got.n) == (1.25, -0.5, "0.6.0", 900)
    with pytest.raises(SiteCalibrationError, match=r"'atlantis'.*known sites: coastal, highland"):
        load_site_calibration(path, "atlantis")
    with pytest.raises(SiteCalibrationError, match="known sites: none"):
        load_site_calibration(tmp_path / "missing.json", "coastal")
    assert read_site_calibrations(tmp_path / "missing.json")["sites"] == {}
    (tmp_path / "bad.json").write_text('{"format": 1, "sites": {"x": {"temperature": -1, "intercept": 0, '
                                       '"model_version": "1"}}}')
    with pytest.raises(SiteCalibrationError, match="temperature must be finite and > 0"):
        load_site_calibration(tmp_path / "bad.json", "x")


def test_apply_maps_probability_logit_and_terms() -> None:
    cal = SiteCalibration("coastal", 1.5, -0.3, "1.0.0", n=800)
    pred = Prediction(_sigmoid(0.9), 0.9, "1.0.0", "onnxruntime", (-1.2, 1.5, 0.6))
    out = cal.apply(pred)
    assert out.logit == pytest.approx(0.9 / 1.5 - 0.3)
    assert out.probability == pytest.approx(_sigmoid(0.9 / 1.5 - 0.3))
    assert out.logit_terms is not None and sum(out.logit_terms) == pytest.approx(out.logit)
    assert out.logit_terms[0] == pytest.approx(-1.2 / 1.5 - 0.3) and out.logit_terms[1] == pytest.approx(1.0)
    assert out.calibration == "site coastal (logit / 1.5 -0.3, fitted on 800 patients)"
    assert pred.calibration is None and out.runtime == "onnxruntime"


# -- both runtimes ---------------------------------------------------------------------------------------------------


def _inputs(n: int) -> list[ModelInputs]:
    from inference import contract as C
    from inference.preprocess import VitalSample, demographics_tensor, empty_image, vitals_tensors

    out = []
    for i in range(n):
        samples = [VitalSample(C.FEATURE_INDEX["sbp"], float(h), 120.0 + 10 * i + h % 7) for h in range(0, 600, 6)]
        values, mask, delta = vitals_tensors(samples)
        out.append(ModelInputs(empty_image(), np.zeros(1, np.float32), values, mask, delta,
                               demographics_tensor(50.0 + 10 * i, "male" if i % 2 else "female")))
    return out


def test_onnx_runtime_predictions_are_recalibrated_exactly(tmp_path: Path) -> None:
    from integration.bootstrap import build_model

    model_path = _package(tmp_path, nordhaven=(1.3, -0.25))
    settings = Settings(model_path=model_path, site="nordhaven")
    model = build_model(settings)
    assert isinstance(model, SiteCalibratedModel) and isinstance(model.inner, OnnxRuntimeModel)
    batch = _inputs(3)
    plain = OnnxRuntimeModel(model_path).predict(batch)
    site = model.predict(batch)
    for a, b in zip(plain, site, strict=True):
        assert b.logit == pytest.approx(a.logit / 1.3 - 0.25, abs=1e-9)
        assert b.probability == pytest.approx(_sigmoid(a.logit / 1.3 - 0.25), abs=1e-9)
        assert b.probability != pytest.approx(a.probability, abs=1e-3)
        assert b.calibration and b.calibration.startswith("site nordhaven (logit / 1.3 -0.25")
        if a.logit_terms is not None:
            assert b.logit_terms is not None and sum(b.logit_terms) == pytest.approx(b.logit, abs=1e-5)
    assert model.model_version == plain[0].model_version and model.runtime_name == "onnxruntime"
    assert model.lesion_maps == model.inner.lesion_maps  # the rest is the inner model's
    assert isinstance(build_model(Settings(model_path=model_path)), OnnxRuntimeModel)  # unset: the global one


def test_a_calibration_fitted_on_another_model_version_is_refused(tmp_path: Path) -> None:
    model_path = _package(tmp_path)
    write_site_calibration(site_calibration_path(model_path), SiteCalibration("coastal", 1.1, 0.1, "0.0.1"))
    model = SiteCalibratedModel(OnnxRuntimeModel(model_path), load_site_calibration(
        site_calibration_path(model_path), "coastal"))
    with pytest.raises(ModelContractError, match="fitted on model 0.0.1.*recalibrate --site coastal"):
        model.predict(_inputs(1))


def test_the_triton_path_is_recalibrated_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from integration.bootstrap import build_model

    model_path = _package(tmp_path, highland=(0.8, 0.4))
    version = OnnxRuntimeModel(model_path).model_version
    settings = Settings(model_path=model_path, site="highland", triton_url="http://127.0.0.1:9")
    model = build_model(settings)
    assert isinstance(model, SiteCalibratedModel) and isinstance(model.inner, TritonModel)

    def served(batch: list[ModelInputs]) -> list[Prediction]:  # what the server answers (no server here)
        return [Prediction(_sigmoid(-0.5 + i), -0.5 + i, version, "triton-http") for i in range(len(batch))]

    monkeypatch.setattr(model.inner, "predict", served)
    out = model.predict(_inputs(2))
    assert [p.probability for p in out] == pytest.approx([_sigmoid(-0.5 / 0.8 + 0.4), _sigmoid(0.5 / 0.8 + 0.4)])
    assert {p.runtime for p in out} == {"triton-http"} and model.runtime_name == "triton-http"
    fallback = build_model(settings.model_copy(update={"triton_fallback_to_embedded": True}))
    assert isinstance(fallback, SiteCalibratedModel) and fallback.primary is fallback.inner.primary


# -- start-up and doctor ---------------------------------------------------------------------------------------------


def test_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_SITE", "coastal")
    assert Settings().site == "coastal"
    monkeypatch.delenv("STROKEWATCH_SITE")
    assert Settings().site is None


def test_an_unknown_site_stops_start_up_listing_the_known_ones(tmp_path: Path) -> None:
    from integration.bootstrap import bootstrap

    model_path = _package(tmp_path, coastal=(1.2, -0.1), nordhaven=(0.9, 0.2))
    settings = Settings(sandbox=True, data_dir=tmp_path / "data", model_path=model_path, site="atlantis",
                        pacs={"dicomweb_url": "http://127.0.0.1:9/dicom-web", "kind": "generic"},
                        ehr={"base_url": "http://127.0.0.1:9/fhir"})
    with pytest.raises(ValueError, match=r"no site calibration for site 'atlantis'.*known sites: coastal, nordhaven"):
        bootstrap(settings)


def test_doctor_names_the_site_calibration(tmp_path: Path) -> None:
    from integration.adapters.model_probe import ModelProbe
    from integration.bootstrap import build_model

    model_path = _package(tmp_path, coastal=(1.2, -0.1))
    good = Settings(model_path=model_path, site="coastal")
    checks = ModelProbe(lambda: build_model(good), model_path=model_path).probe(quick=False)
    site = [c for c in checks if c.name == "model site calibration"]
    assert site and site[0].ok and "site coastal (logit / 1.2 -0.1" in site[0].detail
    bad = Settings(model_path=model_path, site="highland")
    [check] = ModelProbe(lambda: build_model(bad), model_path=model_path).probe(quick=True)
    assert not check.ok and "known sites: coastal" in check.detail and "STROKEWATCH_SITE" in (check.hint or "")


# -- the engine ------------------------------------------------------------------------------------------------------


class _LogitModel(FakeModel):
    """FakeModel whose probability is sigmoid(logit), as a real runtime's is."""

    def predict(self, batch):  # type: ignore[no-untyped-def]
        return [Prediction(_sigmoid(p.logit), p.logit, p.model_version, p.runtime)
                for p in (Prediction(0.0, -2.0 + 0.02 * float(b.vitals_mask.sum()) + float(b.image_present[0]),
                                     self.model_version, "fake") for b in batch)]


def _engine(tmp_path: Path, model: object) -> Services:
    clock = FakeClock()
    svc = Services(store=FakeStore(clock), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model,  # type: ignore[arg-type,return-value]
                   volumes_dir=tmp_path / "volumes", clock=clock)
    assert register_study(svc, STUDY) and ingest_study(svc, STUDY).status == "ready"
    sync_vitals(svc, "pat-1")
    return svc


def test_the_engine_scores_and_says_so_with_the_site_calibration(tmp_path: Path) -> None:
    plain_model = _LogitModel()
    plain = _engine(tmp_path / "a", plain_model)
    [global_result] = assess_patients(plain, ["pat-1"])
    cal = SiteCalibration("coastal", 1.4, -0.6, plain_model.model_version, n=1000)
    site_svc = _engine(tmp_path / "b", SiteCalibratedModel(_LogitModel(), cal))
    [site_result] = assess_patients(site_svc, ["pat-1"])
    assert global_result.status == site_result.status == "scored"
    logit = math.log(global_result.probability / (1 - global_result.probability))  # type: ignore[operator]
    assert site_result.probability == pytest.approx(_sigmoid(logit / 1.4 - 0.6), abs=1e-12)
    assert site_result.identifier != global_result.identifier  # another scoring, another assessment
    publish(site_svc, site_result.identifier)  # type: ignore[arg-type]
    publish(plain, global_result.identifier)  # type: ignore[arg-type]
    [ra] = site_svc.ehr.assessments()  # type: ignore[attr-defined]
    assert ra["prediction"][0]["probabilityDecimal"] == round(site_result.probability, 6)  # type: ignore[arg-type]
    assert "Probability recalibrated for site coastal (logit / 1.4 -0.6, fitted on 1000 patients)." in (
        ra["note"][0]["text"])
    [ra_global] = plain.ehr.assessments()  # type: ignore[attr-defined]
    assert "recalibrated" not in ra_global["note"][0]["text"]


def test_the_engine_waits_when_the_calibration_belongs_to_another_model(tmp_path: Path) -> None:
    stale = SiteCalibration("coastal", 1.4, -0.6, "0.0.1")
    svc = _engine(tmp_path, SiteCalibratedModel(_LogitModel(), stale))
    [result] = assess_patients(svc, ["pat-1"])
    assert result.status == "retry" and result.reason and result.reason.startswith("model_mismatch")
    assert "recalibrate --site coastal" in result.reason
