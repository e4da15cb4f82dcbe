"""The synthetic cohort: reproducible, contract-shaped, and the same patient through arrays, DICOM and FHIR."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from inference import contract as C
from inference import preprocess
from synth import (
    fhir_resources,
    generate_patient,
    iter_cohort,
    make_arrays,
    transaction_bundle,
    write_dicom,
)
from synth import outcome as O
from synth.__main__ import main as cli_main
from synth.vitals import canonical_samples

WINDOW_END = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def small() -> object:
    return make_arrays(6, seed=11)


def test_arrays_match_the_contract(small) -> None:
    for spec in C.INPUTS:
        arr = small.inputs()[spec.name]
        assert arr.shape == (6, *spec.dims), spec.name
        assert arr.dtype == np.dtype(spec.dtype), spec.name
    assert small.outcome.shape == (6,) and small.outcome.dtype.kind == "i"
    assert set(np.unique(small.outcome)) <= {0, 1}
    for name in ("true_probability", "image_only_probability", "vitals_only_probability"):
        p = getattr(small, name)
        assert p.shape == (6,) and np.all((p > 0) & (p < 1)), name
    assert small.finding_mask.shape == (6, *C.VOLUME_SHAPE) and small.finding_mask.dtype == bool
    assert small.vitals_signal_mask.shape == (6, C.N_STEPS, C.N_FEATURES)
    assert np.all(np.isfinite(small.image)) and small.image.min() >= -1 and small.image.max() <= 1
    assert small.image_present.min() == 1.0
    assert small.vitals_mask.sum() > 0
    assert len(set(small.patient_ids)) == 6


def test_training_targets_describe_the_planted_findings_and_traits(small) -> None:
    from synth import generate_patient
    from synth.findings import FINDING_KINDS
    from synth.outcome import COEF, IMAGE_FACTORS, INTERCEPT, VITAL_FACTORS, risk_logit

    assert small.finding_label.shape == (6, *C.VOLUME_SHAPE) and small.finding_label.dtype == np.uint8
    assert small.finding_label.max() <= len(FINDING_KINDS)
    np.testing.assert_array_equal(small.finding_mask, small.finding_label > 0)
    assert small.image_factors.shape == (6, len(IMAGE_FACTORS))
    assert small.vital_factors.shape == (6, len(VITAL_FACTORS))
    for i in range(6):
        p = generate_patient(11, i)
        # the factors are what the outcome model reads: its logit rebuilt from them, age and sex alone
        img, vit = (
            dict(zip(IMAGE_FACTORS, small.image_factors[i], strict=True)),
            dict(zip(VITAL_FACTORS, small.vital_factors[i], strict=True)),
        )
        rebuilt = (
            INTERCEPT
            + COEF["age_z"] * (p.age_years - 65.0) / 15.0
            + COEF["male"] * float(p.sex == "male")
            + sum(COEF[name] * value for name, value in img.items())
            + sum(COEF["trend" if name == "rising_trend" else name] * value for name, value in vit.items())
            + COEF["territorial_x_lability"] * img["territorial"] * max(vit["lability_z"], 0.0)
        )
        logit = float(risk_logit(np.asarray(p.age_years), np.asarray(float(p.sex == "male")), p.findings, p.traits))
        assert rebuilt == pytest.approx(logit, abs=1e-4), i
        labels = set(np.unique(small.finding_label[i])) - {0}
        kinds = {FINDING_KINDS[k - 1] for k in labels}
        if p.geometry.infarct is not None:
            assert "infarct" in kinds, i
        if p.findings.wmd_grade == 0:
            assert "wmd" not in kinds, i
        if p.geometry.hyperdense_side is None:
            assert "hyperdense_vessel" not in kinds, i


def test_training_targets_line_up_with_what_the_model_learns(small) -> None:
    """The model's concept outputs are trained column by column against the synth's factors and lesion kinds."""
    from modelling.config import BINARY_CONCEPTS, IMAGE_CONCEPTS, LESION_KINDS, VITAL_CONCEPTS
    from synth.findings import FINDING_KINDS
    from synth.outcome import IMAGE_FACTORS, VITAL_FACTORS

    assert IMAGE_CONCEPTS == IMAGE_FACTORS
    assert VITAL_CONCEPTS == VITAL_FACTORS
    assert LESION_KINDS == FINDING_KINDS
    # yes/no concepts are trained with BCE: their targets must be 0/1
    columns = {
        **dict(zip(IMAGE_FACTORS, small.image_factors.T, strict=True)),
        **dict(zip(VITAL_FACTORS, small.vital_factors.T, strict=True)),
    }
    assert columns.keys() >= BINARY_CONCEPTS
    for name in BINARY_CONCEPTS:
        assert set(np.unique(columns[name])) <= {0.0, 1.0}, name


def test_vitals_only_records_are_the_same_patients_without_a_volume(small) -> None:
    from synth.arrays import make_vitals_arrays

    records = make_vitals_arrays(3, seed=11, start=2)
    for name in ("vitals", "vitals_mask", "vitals_delta", "demographics", "outcome", "vital_factors"):
        np.testing.assert_array_equal(getattr(records, name), getattr(small, name)[2:5], err_msg=name)
    assert not hasattr(records, "image")


def test_same_seed_same_cohort_other_seed_other_cohort(small) -> None:
    again = make_arrays(6, seed=11)
    for name in (*C.INPUT_NAMES, "outcome", "true_probability", "finding_mask", "patient_ids"):
        np.testing.assert_array_equal(getattr(small, name), getattr(again, name), err_msg=name)
    other = make_arrays(3, seed=12)
    assert not np.allclose(other.image, small.image[:3])
    assert not np.allclose(other.true_probability, small.true_probability[:3])
    # A patient does not depend on the cohort size it was generated in.
    np.testing.assert_array_equal(make_arrays(2, seed=11).image, small.image[:2])


def test_dropout_withholds_a_modality_but_not_the_truth() -> None:
    full = make_arrays(4, seed=3)
    dropped = make_arrays(4, seed=3, image_dropout=1.0, vitals_dropout=1.0)
    assert np.all(dropped.image == 0) and np.all(dropped.image_present == 0)
    assert np.all(dropped.vitals_mask == 0) and np.all(dropped.vitals_delta == 1.0)
    np.testing.assert_array_equal(dropped.true_probability, full.true_probability)
    np.testing.assert_array_equal(dropped.demographics, full.demographics)


def _read_series(paths: list[Path]) -> tuple[list[preprocess.Slice], list[pydicom.Dataset]]:
    """The axial series' slices (scouts are skipped, as the engine's series selection does)."""
    slices, headers = [], []
    for path in paths:
        ds = pydicom.dcmread(path)
        if "LOCALIZER" in ds.ImageType:
            continue
        pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0)
        )
        slices.append(
            preprocess.Slice(
                pixels,
                tuple(float(v) for v in ds.ImagePositionPatient),
                tuple(float(v) for v in ds.ImageOrientationPatient),
                tuple(float(v) for v in ds.PixelSpacing),
            )
        )
        headers.append(ds)
    return slices, headers


def _first(modality: str, order: str | None = None) -> object:
    for p in iter_cohort(60, 5):
        if p.modality == modality and (order is None or p.instance_order == order):
            return p
    raise AssertionError(f"no {modality} patient in the first 60")


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dicom_reads_back_and_matches_the_array_path(tmp_path: Path, modality: str) -> None:
    patient = _first(modality, "shuffled" if modality == "CT" else None)
    paths = write_dicom(patient, tmp_path, window_end=WINDOW_END)
    slices, headers = _read_series(paths)
    assert len(slices) == patient.n_slices
    assert len(paths) == patient.n_slices + (modality == "CT" and patient.has_scout)
    ds = headers[0]
    assert ds.PatientID == patient.mrn and ds.Modality == modality
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4")
    assert ds.IssuerOfPatientID and ds.PatientBirthDate == patient.birth_date(WINDOW_END).strftime("%Y%m%d")
    assert ds.BodyPartExamined in ("HEAD", "BRAIN") and ds.Rows == 256
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.SOPInstanceUID for h in headers}) == len(slices)
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    numbers = [int(h.InstanceNumber) for h in headers]
    if patient.instance_order == "shuffled":
        assert np.any(np.diff(np.asarray(numbers)[np.argsort(z)]) < 0)  # the engine must sort by geometry
    if modality == "CT":
        hu = np.stack([s.pixels for s in slices])
        assert hu.min() <= -990 and hu.max() >= 700  # air and bone in real Hounsfield units

    from_dicom = preprocess.volume_tensor(preprocess.stack_slices(slices), modality)
    from_arrays = preprocess.volume_tensor(patient.render_image(patient.acquisition(for_arrays=True)), modality)
    assert from_dicom.shape == (1, *C.VOLUME_SHAPE)
    assert np.corrcoef(from_dicom.ravel(), from_arrays.ravel())[0, 1] > 0.9
    # Inside the skull too (not just air vs bone): soft tissue in both, away from bone partial volume.
    soft = (from_arrays > -0.8) & (from_arrays < 0.4) & (from_dicom > -0.8) & (from_dicom < 0.4)
    brain = ndimage.binary_erosion(soft[0], iterations=2)
    assert brain.sum() > 5000
    assert np.corrcoef(from_dicom[0][brain], from_arrays[0][brain])[0, 1] > 0.8
    # Re-generation gives the same UIDs and pixels.
    again = write_dicom(patient, tmp_path / "again", window_end=WINDOW_END)
    assert sorted(p.name for p in again) == sorted(p.name for p in paths)


def test_fhir_resources_validate_and_form_one_transaction() -> None:
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.patient import Patient

    patient = generate_patient(5, 3)
    resources = fhir_resources(patient, identifier_system="urn:oid:1.2.3.4", window_end=WINDOW_END)
    Patient.model_validate(resources[0])
    assert resources[0]["identifier"][0] == {**resources[0]["identifier"][0], "value": patient.mrn}
    for r in resources[1:]:
        Observation.model_validate(r)
    bundle = transaction_bundle(resources)
    Bundle.model_validate(bundle)
    patient_url = bundle["entry"][0]["fullUrl"]
    assert patient_url.startswith("urn:uuid:")
    assert all(e["resource"]["subject"]["reference"] == patient_url for e in bundle["entry"][1:])
    obs = resources[1:]
    codes = {r["code"]["coding"][0]["code"] for r in obs}
    assert {"8867-4", "8310-5"} <= codes
    assert all(r["category"][0]["coding"][0]["code"] == "vital-signs" for r in obs)
    quantities = [r["valueQuantity"] for r in obs if "valueQuantity" in r]
    assert all(q["system"] == "http://unitsofmeasure.org" for q in quantities)
    assert any("dataAbsentReason" in r for r in obs)
    assert any("effectivePeriod" in r for r in obs)
    assert {r["status"] for r in obs} >= {"final", "entered-in-error"}


def test_cohort_covers_the_unit_variants_of_real_ehrs() -> None:
    units, codes = set(), set()
    for p in iter_cohort(12, 2):
        for o in p.vitals.observations:
            codes.add(o.loinc)
            units.update(c.unit for c in o.values)
    assert {"[degF]", "mmol/L", "Cel", "mg/dL"} <= units
    assert {"85354-9", "2708-6", "15074-8", "8480-6"} <= codes


def test_canonical_samples_drop_retracted_absent_implausible_and_duplicate_values() -> None:
    for p in iter_cohort(5, 4):
        samples = canonical_samples(p.vitals)
        keys = [(s.feature, s.hours_before_end, s.value) for s in samples]
        assert len(keys) == len(set(keys))
        for s in samples:
            lo, hi = C.VITAL_FEATURES[s.feature].plausible
            assert lo <= s.value <= hi
        temps = [s.value for s in samples if s.feature == C.FEATURE_INDEX["temp"]]
        assert temps and 34 < np.median(temps) < 39  # [degF] converted to Cel
        glucose = [s.value for s in samples if s.feature == C.FEATURE_INDEX["glucose"]]
        assert glucose and np.median(glucose) > 50  # mmol/L converted to mg/dL


def test_planted_findings_appear_in_the_mask_and_the_image() -> None:
    hits = 0
    for p in iter_cohort(40, 9):
        g = p.geometry
        if g.infarct is None:
            continue
        mask = p.finding_mask()
        assert mask.sum() >= 8  # a territorial infarct covers many contract voxels
        from synth.arrays import patient_image_tensor

        image, _ = patient_image_tensor(p)
        if p.modality == "CT":
            inside = image[0][mask & (image[0] > -0.9) & (image[0] < 0.5)]
            # old infarcts are hypodense: darker than the rest of the brain parenchyma
            brain = image[0][(~mask) & (image[0] > -0.6) & (image[0] < 0.2)]
            assert inside.mean() < brain.mean()
        hits += 1
        if hits >= 2:
            break
    assert hits >= 1


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_outcome_model_rewards_fusion_and_has_a_sensible_prevalence() -> None:
    """On 1000 patients (risk factors only: the outcome model does not depend on rendering)."""
    rng = np.random.default_rng(2024)
    age, male = O.draw_demographics(rng, 1000)
    img = O.draw_image_findings(rng, age)
    vit = O.draw_vital_traits(rng, age, male)
    p = 1 / (1 + np.exp(-O.risk_logit(age, male, img, vit)))
    y = (rng.random(1000) < p).astype(int)
    p_img, p_vit = O.single_modality_oracles(age, male, img, vit, rng)
    full, image_only, vitals_only = _auroc(y, p), _auroc(y, p_img), _auroc(y, p_vit)
    assert 0.15 <= y.mean() <= 0.30
    assert 0.83 <= full <= 0.92
    assert full - image_only >= 0.03 and full - vitals_only >= 0.03


def test_generated_patients_follow_the_outcome_model() -> None:
    patients = list(iter_cohort(30, 8))
    for p in patients:
        assert p.true_probability == pytest.approx(
            O.true_probability(p.age_years, p.sex == "male", p.findings, p.traits)
        )
    assert 0 < np.mean([p.outcome for p in patients]) < 0.6


def test_cli_writes_dicom_fhir_and_truth(tmp_path: Path) -> None:
    assert cli_main(["--n", "1", "--seed", "7", "--out", str(tmp_path)]) == 0
    truth = (tmp_path / "truth.csv").read_text().splitlines()
    assert truth[0].startswith("patient,") and len(truth) == 2
    assert (tmp_path / "fhir" / "bundle.json").stat().st_size > 1000
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) >= 32


def test_planted_vitals_signal_survives_into_the_tensors() -> None:
    from synth.arrays import patient_vitals_tensors

    hr, sbp, glu = C.FEATURE_INDEX["hr"], C.FEATURE_INDEX["sbp"], C.FEATURE_INDEX["glucose"]
    spread: dict[str, list[float]] = {"af": [], "sinus": [], "labile": [], "steady": []}
    glucose: dict[bool, list[float]] = {True: [], False: []}
    for p in iter_cohort(150, 6):
        values, mask, _ = patient_vitals_tensors(p)
        seen = mask > 0
        if seen[:, hr].sum() >= 10:
            spread["af" if p.traits.af == 2 else "sinus"].append(float(np.std(values[seen[:, hr], hr])))
        if seen[:, sbp].sum() >= 10 and p.traits.trend < 1.0:
            z = O.lability_z(np.asarray(p.traits.lability))
            if z > 1 or z < -0.5:
                spread["labile" if z > 1 else "steady"].append(float(np.std(values[seen[:, sbp], sbp])))
        if seen[:, glu].any():
            glucose[bool(p.vitals.signal_mask[:, glu].any())].append(float(values[seen[:, glu], glu].mean()))
        if p.traits.af == 2:
            assert p.vitals.signal_mask[:, hr].all()
    assert all(len(v) >= 3 for v in spread.values()), {k: len(v) for k, v in spread.items()}
    assert np.median(spread["af"]) > 1.5 * np.median(spread["sinus"])  # irregular heart rate
    assert np.median(spread["labile"]) > 1.3 * np.median(spread["steady"])  # labile blood pressure
    assert np.mean(glucose[True]) > np.mean(glucose[False]) + 1.0  # hyperglycaemia, in contract z units


def test_fhir_path_through_the_engine_parser_gives_the_training_tensors() -> None:
    """Training/serving parity: FHIR JSON -> the engine's domain parser -> vitals_tensors == the array path."""
    from datetime import timedelta

    from integration.domain.vitals import parse_observations, to_samples
    from synth.arrays import patient_vitals_tensors

    for patient in iter_cohort(4, 13):
        observations = fhir_resources(patient, identifier_system="urn:oid:1.2.3.4", window_end=WINDOW_END)[1:]
        for obs in observations:
            obs["id"] = obs["identifier"][0]["value"]  # as a server would assign
        parsed = parse_observations(
            observations, window_start=WINDOW_END - timedelta(hours=C.WINDOW_HOURS), window_end=WINDOW_END
        )
        engine = preprocess.vitals_tensors(to_samples(parsed.accepted, WINDOW_END))
        training = patient_vitals_tensors(patient)
        for got, want in zip(engine, training, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4)
