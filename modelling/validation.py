"""Multi-centre validation: discrimination with bootstrap CIs, calibration slope and intercept, ECE, subgroups.

Used per site, per subgroup (age band, sex, site) and for leave-one-site-out results::

    groups = subgroups(cohort.age_years, cohort.male, cohort.site)
    report = group_report(y, p, groups)
    print(render_table(report))

The shipped model on each synthetic site's unseen patients, per site and subgroup (the MODEL_CARD table)::

    python -m modelling.validation --sites nordhaven,coastal,highland --n 600 --seed 2 --start 1000 [--json]

Definitions (stated once here, repeated where they are computed):

* AUROC: the Mann-Whitney statistic (ties count one half), equal to ``sklearn.metrics.roc_auc_score``.
* Bootstrap CI: **stratified percentile bootstrap** - each replicate resamples the events and the non-events
  separately with replacement, keeping their counts, so every replicate has both classes (AUROC is always
  defined) and the CI reflects the sample's own prevalence; the CI is the (alpha/2, 1 - alpha/2) percentiles.
* Calibration slope: b in the logistic recalibration model ``logit P(y=1) = a + b * logit(p)``.
* Calibration intercept: **calibration-in-the-large**, a in ``logit P(y=1) = a + 1 * logit(p)`` (slope fixed
  at 1, i.e. logit(p) as an offset), so 0 means the mean prediction matches the event rate; > 0: the model
  under-predicts. Slope < 1: predictions too extreme (overfitting); > 1: too timid.
* ECE: ``modelling.calibrate.expected_calibration_error`` (10 equal-width bins).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import rankdata

from modelling.calibrate import expected_calibration_error

Metric = Callable[[np.ndarray, np.ndarray], float]

#: Age bands (years) of the subgroup table: [lo, hi).
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("age <55", 0.0, 55.0),
    ("age 55-69", 55.0, 70.0),
    ("age >=70", 70.0, float("inf")),
)
_P_EPS = 1e-12  # probabilities are clipped to [eps, 1 - eps] before the logit


def _arrays(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y_a = np.asarray(y, dtype=np.float64).ravel()
    p_a = np.asarray(p, dtype=np.float64).ravel()
    if y_a.shape != p_a.shape:
        raise ValueError(f"y and p differ in length ({y_a.size} vs {p_a.size})")
    if not np.isin(y_a, (0.0, 1.0)).all():
        raise ValueError("y must hold 0/1 outcomes")
    return y_a, p_a


def _both_classes(y: np.ndarray, what: str) -> None:
    if y.size == 0 or y.min() == y.max():
        raise ValueError(f"{what} needs both outcomes present (n={y.size}, events={int(y.sum())})")


def auroc(y: Any, p: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n1 n0), ties count one half); needs both outcomes."""
    y_a, p_a = _arrays(y, p)
    _both_classes(y_a, "AUROC")
    ranks = rankdata(p_a)  # average ranks: ties count one half
    n1 = float(y_a.sum())
    n0 = float(y_a.size - n1)
    return float((ranks[y_a == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_ci(
    y: Any, p: Any, metric: Metric = auroc, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """(lo, hi): the stratified percentile bootstrap CI of ``metric(y, p)`` at level 1 - ``alpha``.

    Stratified: each replicate draws the events and the non-events separately with replacement (their counts
    fixed), so every replicate has both outcomes. Percentile: the alpha/2 and 1 - alpha/2 quantiles of the
    ``n_boot`` replicate values. Deterministic for a given ``seed``.
    """
    y_a, p_a = _arrays(y, p)
    _both_classes(y_a, "a bootstrap CI")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError("n_boot must be >= 1 and alpha in (0, 1)")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y_a == 1), np.flatnonzero(y_a == 0)
    values = np.empty(n_boot)
    for k in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        values[k] = metric(y_a[idx], p_a[idx])
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _P_EPS, 1 - _P_EPS)
    return np.asarray(np.log(q) - np.log1p(-q))


def _newton_logistic(x: np.ndarray, y: np.ndarray, offset: np.ndarray, iters: int = 100) -> np.ndarray:
    """Maximum-likelihood coefficients of ``logit P(y=1) = x @ w + offset`` by Newton-Raphson (IRLS).

    A tiny ridge (1e-9) keeps the Hessian invertible; on separable data the coefficients grow until the
    iteration limit, which is the honest answer (the slope is unbounded)."""
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        eta = x @ w + offset
        mu = expit(eta)
        grad = x.T @ (y - mu)
        hess = (x * (mu * (1 - mu))[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def calibration_slope_intercept(y: Any, p: Any) -> tuple[float, float]:
    """(slope, intercept) by logistic recalibration on logit(p) (p clipped to [1e-12, 1 - 1e-12]).

    slope: b of ``logit P(y=1) = a + b * logit(p)`` (1 is ideal). intercept: calibration-in-the-large, a of
    ``logit P(y=1) = a + logit(p)`` with the slope fixed at 1 (0 is ideal; > 0 the model under-predicts).
    """
    y_a, p_a = _arrays(y, p)
    _both_classes(y_a, "calibration slope and intercept")
    lp = _logit(p_a)
    ones = np.ones((y_a.size, 1))
    slope = float(_newton_logistic(np.column_stack([ones, lp]), y_a, np.zeros_like(lp))[1])
    intercept = float(_newton_logistic(ones, y_a, lp)[0])
    return slope, intercept


def metrics(y: Any, p: Any, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """n, events, auroc, auroc_ci [lo, hi] (stratified percentile bootstrap, 95 %), calibration_slope,
    calibration_intercept (calibration-in-the-large), ece (10 equal-width bins)."""
    y_a, p_a = _arrays(y, p)
    _both_classes(y_a, "metrics")
    slope, intercept = calibration_slope_intercept(y_a, p_a)
    lo, hi = bootstrap_ci(y_a, p_a, auroc, n_boot=n_boot, seed=seed)
    return {
        "n": int(y_a.size),
        "events": int(y_a.sum()),
        "auroc": auroc(y_a, p_a),
        "auroc_ci": [lo, hi],
        "calibration_slope": slope,
        "calibration_intercept": intercept,
        "ece": expected_calibration_error(p_a, y_a),
    }


def subgroups(age_years: Any, male: Any, site: Any = None) -> dict[str, np.ndarray]:
    """Boolean masks by age band (``AGE_BANDS``: <55, 55-69, >=70 years), sex ("female", "male") and, with
    ``site``, one "site NAME" per distinct non-empty site name (sorted)."""
    age = np.asarray(age_years, dtype=np.float64).ravel()
    is_male = np.asarray(male).ravel().astype(bool)
    if is_male.shape != age.shape:
        raise ValueError(f"age_years and male differ in length ({age.size} vs {is_male.size})")
    groups = {name: (age >= lo) & (age < hi) for name, lo, hi in AGE_BANDS}
    groups["female"] = ~is_male
    groups["male"] = is_male.copy()
    if site is not None:
        sites = np.asarray(site).ravel().astype(str)
        if sites.shape != age.shape:
            raise ValueError(f"site and age_years differ in length ({sites.size} vs {age.size})")
        for name in sorted({s for s in sites if s}):
            groups[f"site {name}"] = sites == name
    return groups


def group_report(
    y: Any,
    p: Any,
    groups: Mapping[str, np.ndarray],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_n: int = 30,
) -> dict[str, dict[str, Any]]:
    """``metrics`` for "all" and for each group (a boolean mask over the patients).

    A group with fewer than ``min_n`` patients or without both outcomes gets ``{"n", "events", "too_few":
    True, "reason"}`` instead of metrics (never an exception), and so does "all" in that case."""
    y_a, p_a = _arrays(y, p)
    out: dict[str, dict[str, Any]] = {}
    for name, mask in {"all": np.ones(y_a.size, dtype=bool), **groups}.items():
        m = np.asarray(mask, dtype=bool).ravel()
        if m.shape != y_a.shape:
            raise ValueError(f"group {name!r} has {m.size} entries for {y_a.size} patients")
        yg, pg = y_a[m], p_a[m]
        n, events = int(yg.size), int(yg.sum())
        if n < min_n or events == 0 or events == n:
            reason = f"n={n} < {min_n}" if n < min_n else "only one outcome present"
            out[name] = {"n": n, "events": events, "too_few": True, "reason": reason}
            continue
        out[name] = metrics(yg, pg, n_boot=n_boot, seed=seed)
    return out


def render_table(report: Mapping[str, Mapping[str, Any]]) -> str:
    """The report as a markdown table: group, n, events, AUROC (95 % CI), calibration slope/intercept, ECE."""
    lines = [
        "| group | n | events | AUROC (95% CI) | cal. slope | cal. intercept | ECE |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, r in report.items():
        if r.get("too_few"):
            lines.append(f"| {name} | {r['n']} | {r['events']} | too few ({r['reason']}) | - | - | - |")
            continue
        lo, hi = r["auroc_ci"]
        lines.append(
            f"| {name} | {r['n']} | {r['events']} | {r['auroc']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{r['calibration_slope']:.2f} | {r['calibration_intercept']:+.2f} | {r['ece']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The shipped model (ONNX Runtime, as the engine scores) on each site's patients: the table with the model's
    own calibration and with each site's recalibration from the package (where the package has one)."""
    import argparse
    import json

    from inference.runtime import (
        DEFAULT_MODEL_PATH,
        OnnxRuntimeModel,
        SiteCalibrationError,
        load_site_calibration,
        site_calibration_path,
    )
    from modelling.calibrate import sigmoid
    from modelling.recalibrate import shipped_logits
    from modelling.train.data import make_cohort

    parser = argparse.ArgumentParser(prog="python -m modelling.validation", description=main.__doc__)
    parser.add_argument("--sites", default="nordhaven,coastal,highland", help="comma-separated synthetic sites")
    parser.add_argument("--n", type=int, default=600, help="patients per site")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--start", type=int, default=1000, help="first patient (recalibrate fits on 0..999)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model = OnnxRuntimeModel(args.model, intra_op_threads=1)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("y", "z", "z_site", "age", "male", "site")}
    for name in [s for s in args.sites.split(",") if s]:
        cohort = make_cohort(args.n, args.seed, start=args.start, site=name)
        z = shipped_logits(model, cohort)
        try:
            z_site = load_site_calibration(site_calibration_path(args.model), name).logit(z)
        except SiteCalibrationError:
            z_site = z  # no entry for this site: its patients keep the model's own calibration
        for key, value in zip(
            parts, (cohort.outcome, z, z_site, cohort.age_years, cohort.male, cohort.site), strict=True
        ):
            parts[key].append(np.asarray(value))
    y, z, z_site, age, male, site = (np.concatenate(parts[k]) for k in parts)
    groups = subgroups(age, male, site)
    reports = {
        "global": group_report(y, sigmoid(z), groups, n_boot=args.n_boot, seed=args.seed),
        "site": group_report(y, sigmoid(z_site), groups, n_boot=args.n_boot, seed=args.seed),
    }
    if args.json:
        print(json.dumps({"model_version": model.model_version, **vars(args), **reports}, indent=1))
    else:
        print(f"model {model.model_version}; sites {args.sites}; {args.n} patients each from patient {args.start} "
              f"of seed {args.seed}\n")
        print("The model's own calibration:\n\n" + render_table(reports["global"]))
        print("With each site's recalibration (STROKEWATCH_SITE):\n\n" + render_table(reports["site"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
