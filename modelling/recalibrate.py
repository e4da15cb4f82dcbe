"""Fit one site's recalibration and write it into the model package: ``strokewatch model recalibrate``.

    strokewatch model recalibrate --site nordhaven --n 1000 [--seed 2] [--check-n 600] [--model PATH] [--json]

Generates ``--n`` synthetic patients of that site (``synth.sites``; cached like every training cohort), scores them
with the shipped model (``model.onnx`` through ONNX Runtime, as the engine does), fits a temperature and an
intercept on its calibrated logits (``modelling.calibrate.fit_site_calibration``) and writes them as the site's
entry in ``site_calibration.json`` beside the model (``inference.runtime.site``), with the fit's figures: ECE,
calibration slope and intercept before and after, on ``--check-n`` further patients of the same site that the fit
never saw. The engine applies the entry with ``STROKEWATCH_SITE=NAME``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from inference.runtime import DEFAULT_MODEL_PATH, OnnxRuntimeModel, SiteCalibration, site_calibration_path
from inference.runtime.base import ModelInputs
from modelling.calibrate import fit_site_calibration, sigmoid
from modelling.train.data import cohort_inputs, make_cohort
from modelling.validation import metrics

log = logging.getLogger(__name__)


def shipped_logits(model: OnnxRuntimeModel, cohort: Any) -> np.ndarray:
    """The model's calibrated logits for every patient of ``cohort``, through the engine's runtime."""
    inputs = cohort_inputs(cohort)
    batch = [ModelInputs(**{k: v[i] for k, v in inputs.items()}) for i in range(len(cohort))]
    return np.asarray([p.logit for p in model.predict(batch)], dtype=np.float64)


def _summary(y: np.ndarray, p: np.ndarray, seed: int) -> dict[str, Any]:
    m = metrics(y, p, n_boot=200, seed=seed)
    keys = ("n", "events", "auroc", "calibration_slope", "calibration_intercept", "ece")
    return {k: round(m[k], 4) if isinstance(m[k], float) else m[k] for k in keys} | {
        "mean_probability": round(float(np.mean(p)), 4)
    }


def recalibrate(
    site: str, n: int, seed: int, check_n: int, model_path: Path, *, workers: int = 2, write: bool = True
) -> dict[str, Any]:
    model = OnnxRuntimeModel(model_path, intra_op_threads=1)
    fit_cohort = make_cohort(n, seed, site=site, workers=workers)
    logits = shipped_logits(model, fit_cohort)
    y = np.asarray(fit_cohort.outcome)
    temperature, intercept = fit_site_calibration(logits, y)
    calibration = SiteCalibration(
        site, temperature, intercept, model.model_version, n=int(y.size), events=int(y.sum())
    )
    result: dict[str, Any] = {
        "site": site,
        "model_version": model.model_version,
        "temperature": round(temperature, 6),
        "intercept": round(intercept, 6),
        "fit": {"seed": seed, "n": int(y.size), "events": int(y.sum())},
    }
    if check_n > 0:
        check = make_cohort(check_n, seed, start=n, site=site, workers=workers)  # the same site, unseen patients
        z, yc = shipped_logits(model, check), np.asarray(check.outcome)
        result["check"] = {
            "seed": seed,
            "start": n,
            "global": _summary(yc, sigmoid(z), seed),
            "site": _summary(yc, calibration.probability(z), seed),
        }
    if write:
        from inference.runtime.site import write_site_calibration

        path = site_calibration_path(model_path)
        write_site_calibration(path, calibration, fit=result["fit"], check=result.get("check"))
        result["written"] = str(path)
    return result


def main(argv: list[str] | None = None) -> int:
    from synth.sites import SITE_NAMES

    parser = argparse.ArgumentParser(prog="strokewatch model recalibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", required=True, choices=SITE_NAMES, help="the synthetic site (synth/SYNTH.md)")
    parser.add_argument("--n", type=int, default=1000, help="patients the fit uses (default 1000)")
    parser.add_argument("--seed", type=int, default=2, help="cohort seed of the site's patients (default 2)")
    parser.add_argument("--check-n", type=int, default=600, help="further patients for the before/after figures")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="model.onnx of the package")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the cohort")
    parser.add_argument("--dry-run", action="store_true", help="fit and print, do not write the package file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.n < 50:
        parser.error("--n must be at least 50")
    result = recalibrate(args.site, args.n, args.seed, args.check_n, args.model, workers=args.workers,
                         write=not args.dry_run)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"site {result['site']}: T={result['temperature']:.4f} b={result['intercept']:+.4f} "
              f"(model {result['model_version']}, {result['fit']['n']} patients, {result['fit']['events']} events)")
        if "check" in result:
            for name in ("global", "site"):
                c = result["check"][name]
                print(f"  {name:6s} on {c['n']} unseen: AUROC {c['auroc']:.3f}  ECE {c['ece']:.3f}  "
                      f"slope {c['calibration_slope']:.2f}  intercept {c['calibration_intercept']:+.2f}  "
                      f"mean p {c['mean_probability']:.3f}")
        if "written" in result:
            print(f"  written to {result['written']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
