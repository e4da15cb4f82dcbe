"""Named synthetic sites: they differ as SYNTH.md documents, and the default cohort is what it was before them."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from synth import outcome
from synth.__main__ import main as synth_main
from synth.arrays import make_arrays, make_vitals_arrays
from synth.dicom import _instance_numbers, _uid, study_uid
from synth.fhir import fhir_resources
from synth.patient import generate_patient, iter_cohort
from synth.sites import SITE_NAMES, SITES, get_site

# Taken with the generator as it was before sites existed (commit 71c14b5), by ``_fingerprint`` below. Everything but
# floating-point values is hashed; floats are summed (count, sum, sum of magnitudes, sum of squares, and a sum under
# fixed random weights, which any changed, moved or swapped value shifts) and compared to 1e-5 (relative): numpy's
# vectorised exp/sin/log differ in the last bits between CPUs (AVX-512 or not), so a hash of float bytes held on one
# machine only (it failed on the next session's CPU).
DEFAULT_COHORT_FINGERPRINT = {
    "patients": (
        "17b00b8e2d527c79162c09786f0035eb6bc43f44fd3e38b445add67210efe2b1",
        [425945.0, -82745028.06148073, 183703443.45589265, 164097157490.0598, 55213.74371117185],
    ),
    "arrays": (
        "10fb2f50b8abcedca08d539c774d6d7eb3e17ba4fee7c7b3a762c589466ea4d3",
        [399309.0, -248779.81861907092, 323519.72212568077, 314029.8638609606, 150.60961744350115],
    ),
    "vitals": (
        "197b41ee0217d9bd2967caf3ce29e51087c2fac6d8bdd0371503a95d0526254c",
        [10120.0, 3968.5623288473384, 5132.624358462383, 7641.687241932006, -26.316067173655462],
    ),
}
_NEW_FIELDS = ("site", "follow_up_days", "age_years")  # fields added with sites: not in the old fingerprint


class _Fingerprint:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.floats: list[np.ndarray] = []

    def feed(self, x: object) -> None:
        if isinstance(x, np.ndarray):
            self.hash.update(f"{x.dtype}{x.shape}".encode())
            if x.dtype.kind == "f":
                self.floats.append(np.asarray(x, dtype=np.float64).ravel())
            else:
                self.hash.update(np.ascontiguousarray(x).tobytes())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                if f.name not in _NEW_FIELDS:
                    self.hash.update(f.name.encode())
                    self.feed(getattr(x, f.name))
        elif isinstance(x, dict):
            for key in sorted(x):
                self.hash.update(repr(key).encode())
                self.feed(x[key])
        elif isinstance(x, tuple | list):
            for y in x:
                self.feed(y)
        elif isinstance(x, float | np.floating):
            self.hash.update(b"f")
            self.floats.append(np.array([float(x)]))
        else:
            self.hash.update(repr(x).encode())

    def result(self) -> tuple[str, list[float]]:
        v = np.concatenate(self.floats) if self.floats else np.zeros(0)
        weights = np.random.default_rng(0).uniform(-1.0, 1.0, v.size)
        return self.hash.hexdigest(), [
            float(v.size),
            float(v.sum()),
            float(np.abs(v).sum()),
            float(v @ v),
            float(weights @ v),
        ]


def _fingerprint() -> dict[str, tuple[str, list[float]]]:
    out = {}
    fp = _Fingerprint()
    for i in range(16):
        p = generate_patient(7, i)
        fp.feed(p)
        fp.feed(json.loads(json.dumps(fhir_resources(p, identifier_system="urn:x", window_end=p.window_end))))
        fp.feed(study_uid(p))
        fp.feed(_uid(p, "series", p.modality))
        fp.feed(_instance_numbers(p, 10))
        if i < 2:
            fp.feed(p.render_image(p.acquisition(for_arrays=True)))
    out["patients"] = fp.result()
    fp = _Fingerprint()
    fp.feed(make_arrays(3, 7, start=2, image_dropout=0.3, vitals_dropout=0.3))
    out["arrays"] = fp.result()
    fp = _Fingerprint()
    fp.feed(make_vitals_arrays(5, 7, start=3))
    out["vitals"] = fp.result()
    return out


def test_default_cohort_is_what_it_was_before_sites() -> None:
    got = _fingerprint()
    for part, (digest, stats) in DEFAULT_COHORT_FINGERPRINT.items():
        assert got[part][0] == digest, part
        assert got[part][1] == pytest.approx(stats, rel=1e-5, abs=1e-6), part
    p = generate_patient(7, 3)
    assert p.site is None and p.mrn == "SW7-000003" and p.follow_up_days == 90.0


@pytest.fixture(scope="module")
def cohorts() -> dict[str, list]:
    return {name: list(iter_cohort(600, 21, name)) for name in (None, *SITE_NAMES)}  # type: ignore[misc]


def _frac(patients: list, pred) -> float:  # type: ignore[no-untyped-def]
    return float(np.mean([bool(pred(p)) for p in patients]))


def _has_unit(p, unit: str) -> bool:  # type: ignore[no-untyped-def]
    return any(c.unit == unit for o in p.vitals.observations for c in o.values)


def test_at_least_three_sites_and_unknown_names_are_refused() -> None:
    assert len(SITES) >= 3 and {"nordhaven", "coastal", "highland"} <= set(SITE_NAMES)
    with pytest.raises(ValueError, match="known sites: nordhaven, coastal, highland"):
        generate_patient(1, 0, "atlantis")
    assert get_site(None) is None and get_site("coastal") is SITES["coastal"]
    assert [SITES[n].relative_size for n in ("nordhaven", "coastal", "highland")] == [1.0, 0.6, 0.35]


def test_sites_are_recorded_and_their_patients_are_distinct(cohorts) -> None:  # type: ignore[no-untyped-def]
    mrns: set[str] = set()
    for name, patients in cohorts.items():
        assert all(p.site == name for p in patients)
        ids = {p.mrn for p in patients}
        assert len(ids) == len(patients) and not ids & mrns, name
        mrns |= ids
    nh, co = generate_patient(21, 5, "nordhaven"), generate_patient(21, 5, "coastal")
    assert nh.mrn == "SWNH21-000005" and co.mrn == "SWCO21-000005"
    assert study_uid(nh) != study_uid(co) != study_uid(generate_patient(21, 5))
    assert nh.age_years != co.age_years  # own random streams, not the same patient relabelled
    again = generate_patient(21, 5, "nordhaven")  # deterministic per (seed, index, site)
    assert (again.age_years, again.true_probability, again.vitals.observations) == (
        nh.age_years,
        nh.true_probability,
        nh.vitals.observations,
    )


def test_sites_differ_in_imaging_as_documented(cohorts) -> None:  # type: ignore[no-untyped-def]
    for name in SITE_NAMES:
        site = SITES[name]
        mr = _frac(cohorts[name], lambda p: p.modality == "MR")
        assert abs(mr - site.mr_fraction) < 0.06, (name, mr)
        ct_noise = np.array([p.look.noise for p in cohorts[name] if p.modality == "CT"])
        assert ct_noise.min() >= 4.0 * site.ct_noise_factor - 1e-9 and ct_noise.max() <= 6.0 * site.ct_noise_factor
    assert (
        _frac(cohorts["nordhaven"], lambda p: p.modality == "MR")
        > 0.45
        > 0.1
        > _frac(cohorts["coastal"], lambda p: p.modality == "MR")
    )
    mr_noise = {n: np.mean([p.look.noise for p in cohorts[n] if p.modality == "MR"]) for n in ("nordhaven", "highland")}
    assert mr_noise["highland"] > 1.8 * mr_noise["nordhaven"]


def test_sites_differ_in_population_and_base_rate(cohorts) -> None:  # type: ignore[no-untyped-def]
    age = {n: np.mean([p.age_years for p in ps]) for n, ps in cohorts.items()}
    assert age["coastal"] + 3 < age[None] < age["nordhaven"] - 3  # N(60, 15), N(66, 14), N(72, 12)
    af = {n: _frac(ps, lambda p: p.traits.af > 0) for n, ps in cohorts.items()}
    assert af["nordhaven"] > 1.5 * af[None]
    wmd = {n: np.mean([p.findings.wmd_grade for p in ps]) for n, ps in cohorts.items()}
    assert wmd["highland"] > wmd[None] + 0.2
    sbp_gap = np.mean([p.traits.sbp for p in cohorts["coastal"]]) - np.mean([p.traits.sbp for p in cohorts[None]])
    assert sbp_gap > 0  # +10 mmHg, partly offset by a younger population
    p_true = {n: np.mean([p.true_probability for p in ps]) for n, ps in cohorts.items()}
    assert p_true["coastal"] + 0.08 < p_true["highland"]
    for name, ps in cohorts.items():  # outcomes follow the site's own model (its intercept included)
        y = np.array([p.outcome for p in ps])
        assert abs(y.mean() - p_true[name]) < 0.05, name
    p = cohorts["highland"][0]
    shift = SITES["highland"].logit_shift
    assert shift == pytest.approx(-0.5 + np.log(180 / 90))
    expect = 1 / (
        1
        + np.exp(
            -(outcome.risk_logit(np.asarray(p.age_years), np.asarray(p.sex == "male"), p.findings, p.traits) + shift)
        )
    )
    assert p.true_probability == pytest.approx(float(expect))
    assert {ps[0].follow_up_days for ps in cohorts.values()} == {90.0, 60.0, 180.0}


def test_sites_differ_in_units_and_charting(cohorts) -> None:  # type: ignore[no-untyped-def]
    degf = {n: _frac(ps[:200], lambda p: _has_unit(p, "[degF]")) for n, ps in cohorts.items()}
    mmol = {n: _frac(ps[:200], lambda p: _has_unit(p, "mmol/L")) for n, ps in cohorts.items()}
    assert degf["nordhaven"] == 0.0 and degf["coastal"] > 0.85 and 0.15 < degf[None] < 0.45
    assert mmol["nordhaven"] > 0.85 and mmol["coastal"] < 0.1
    n_obs = {n: np.mean([len(p.vitals.observations) for p in ps[:200]]) for n, ps in cohorts.items()}
    assert n_obs["highland"] < 0.7 * n_obs["nordhaven"]  # sparse charting with more gaps
    assert {p.vitals.utc_offset_minutes for p in cohorts["coastal"][:50]} == {-300}


def test_site_arrays_carry_site_age_and_sex() -> None:
    arr = make_arrays(3, 4, site="highland")
    pts = list(iter_cohort(3, 4, "highland"))
    assert list(arr.site) == ["highland"] * 3
    assert list(arr.patient_ids) == [p.mrn for p in pts]
    np.testing.assert_array_equal(arr.age_years, [p.age_years for p in pts])
    np.testing.assert_array_equal(arr.male, [p.sex == "male" for p in pts])
    assert list(arr.subset(np.array([2])).site) == ["highland"]
    vit = make_vitals_arrays(2, 4, site="coastal")  # the same patients as make_arrays at that site
    np.testing.assert_array_equal(vit.demographics, make_arrays(2, 4, site="coastal").demographics)
    assert not np.array_equal(vit.demographics, make_vitals_arrays(2, 4).demographics)


def test_make_cohort_caches_per_site_and_reads_older_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelling.train.data import cohort_cache_dir, make_cohort

    monkeypatch.setenv("STROKEWATCH_CACHE", str(tmp_path))
    site = make_cohort(2, 9, site="coastal", workers=1)
    plain = make_cohort(2, 9, workers=1)
    names = sorted(p.name for p in cohort_cache_dir().iterdir())
    assert any("site-coastal" in n for n in names) and len(names) == 2
    assert list(site.site) == ["coastal"] * 2 and list(plain.site) == ["", ""]
    again = make_cohort(2, 9, site="coastal", workers=1)  # from the cache
    np.testing.assert_array_equal(again.age_years, site.age_years)
    assert list(again.site) == ["coastal"] * 2
    # a cohort cached before the arrays carried age and site still loads (age from the demographics tensor)
    path = next(p for p in cohort_cache_dir().iterdir() if "site" not in p.name)
    with np.load(path) as data:
        old = {k: data[k] for k in data.files if k not in ("age_years", "site")}
    np.savez(path, **old)
    loaded = make_cohort(2, 9, workers=1)
    np.testing.assert_allclose(loaded.age_years, plain.age_years, atol=1e-3)
    assert list(loaded.site) == ["", ""]
    with pytest.raises(ValueError, match="unknown synthetic site"):
        make_cohort(2, 9, site="nowhere")


def test_cli_writes_a_sites_patients(tmp_path: Path) -> None:
    assert synth_main(["--n", "2", "--seed", "3", "--site", "nordhaven", "--no-dicom", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "truth.csv").open()))
    assert [r["site"] for r in rows] == ["nordhaven"] * 2 and rows[0]["patient"] == "SWNH3-000000"
    bundle = json.loads((tmp_path / "fhir" / "bundle.json").read_text())
    temps = [
        e["resource"]["valueQuantity"]["unit"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "8310-5"
        and "valueQuantity" in e["resource"]
    ]
    assert temps and set(temps) == {"Cel"}
