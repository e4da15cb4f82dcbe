"""modelling.validation: known answers for AUROC, the bootstrap CI, calibration slope/intercept and subgroups."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from modelling.calibrate import expected_calibration_error
from modelling.validation import (
    auroc,
    bootstrap_ci,
    calibration_slope_intercept,
    group_report,
    metrics,
    render_table,
    subgroups,
)


def _calibrated(n: int, seed: int, *, slope: float = 1.0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from sigmoid(shift + slope * z) while the model predicts sigmoid(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(shift + slope * z)))).astype(int)
    return y, 1 / (1 + np.exp(-z))


def test_auroc_known_answers() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count one half
    assert auroc([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]) == 0.75
    y, p = _calibrated(500, 1)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    with pytest.raises(ValueError, match="both outcomes"):
        auroc([1, 1, 1], [0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0, 2], [0.2, 0.3])


def test_bootstrap_ci_covers_the_estimate_narrows_with_n_and_is_reproducible() -> None:
    y, p = _calibrated(2000, 2)
    lo, hi = bootstrap_ci(y, p, n_boot=300, seed=5)
    assert lo < auroc(y, p) < hi and 0.01 < hi - lo < 0.08
    assert (lo, hi) == bootstrap_ci(y, p, n_boot=300, seed=5)
    small_lo, small_hi = bootstrap_ci(y[:200], p[:200], n_boot=300, seed=5)
    assert small_hi - small_lo > 1.8 * (hi - lo)  # ~ sqrt(10) wider
    assert bootstrap_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_boot=50) == (1.0, 1.0)
    # any metric; stratified: every replicate keeps the event count
    events = bootstrap_ci(y, p, lambda yy, pp: float(yy.sum()), n_boot=50)
    assert events == (float(y.sum()), float(y.sum()))


def test_calibration_of_calibrated_data_is_slope_one_intercept_zero() -> None:
    y, p = _calibrated(20000, 3)
    slope, intercept = calibration_slope_intercept(y, p)
    assert slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.0, abs=0.05)


def test_miscalibration_is_detected() -> None:
    y, p = _calibrated(20000, 4, slope=0.5)  # predictions twice as extreme as the truth (overfitted model)
    slope, _ = calibration_slope_intercept(y, p)
    assert slope == pytest.approx(0.5, abs=0.05)
    y, p = _calibrated(20000, 5, shift=0.8)  # the model under-predicts: true logit is 0.8 higher
    slope, intercept = calibration_slope_intercept(y, p)
    assert slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.8, abs=0.06)


def test_metrics_keys_and_values() -> None:
    y, p = _calibrated(1000, 6)
    m = metrics(y, p, n_boot=200, seed=1)
    assert set(m) == {"n", "events", "auroc", "auroc_ci", "calibration_slope", "calibration_intercept", "ece"}
    assert m["n"] == 1000 and m["events"] == int(y.sum())
    assert m["auroc_ci"][0] < m["auroc"] < m["auroc_ci"][1]
    assert m["ece"] == expected_calibration_error(p, y)


def test_subgroups_bands_sex_and_site() -> None:
    age = np.array([40.0, 54.99, 55.0, 69.9, 70.0, 90.0])
    male = np.array([1, 0, 1, 0, 1, 0])
    site = np.array(["coastal", "coastal", "highland", "", "highland", "coastal"])
    g = subgroups(age, male, site)
    assert list(g) == ["age <55", "age 55-69", "age >=70", "female", "male", "site coastal", "site highland"]
    assert g["age <55"].tolist() == [True, True, False, False, False, False]
    assert g["age 55-69"].tolist() == [False, False, True, True, False, False]
    assert g["age >=70"].tolist() == [False, False, False, False, True, True]
    assert (g["male"] == male.astype(bool)).all() and (g["female"] == ~male.astype(bool)).all()
    assert g["site highland"].tolist() == [False, False, True, False, True, False]
    assert set(subgroups(age, male)) == {"age <55", "age 55-69", "age >=70", "female", "male"}


def test_group_report_handles_small_and_one_class_groups() -> None:
    y, p = _calibrated(400, 7)
    groups = {
        "first half": np.arange(400) < 200,
        "tiny": np.arange(400) < 10,
        "no events": y == 0,
    }
    report = group_report(y, p, groups, n_boot=100)
    assert list(report) == ["all", "first half", "tiny", "no events"]
    assert report["all"]["n"] == 400 and "auroc" in report["all"] and "auroc" in report["first half"]
    assert report["tiny"] == {"n": 10, "events": int(y[:10].sum()), "too_few": True, "reason": "n=10 < 30"}
    assert report["no events"]["too_few"] and report["no events"]["reason"] == "only one outcome present"
    table = render_table(report)
    assert table.count("\n") == 2 + 4
    assert "| tiny | 10 |" in table and "too few (n=10 < 30)" in table
    assert f"{report['all']['auroc']:.3f} (" in table
    with pytest.raises(ValueError, match="entries for 400 patients"):
        group_report(y, p, {"bad": np.ones(3, bool)})
