"""Site-specific recalibration: a per-site temperature and intercept in the model package, chosen by the site setting.

The package's ``site_calibration.json`` (beside ``model.onnx``, written by ``strokewatch model recalibrate``) holds,
per site, a temperature ``T > 0`` and an intercept ``b`` fitted on that site's patients. With the site setting
(``STROKEWATCH_SITE``) the engine scores through ``SiteCalibratedModel``, which maps every prediction's
calibrated logit as

    logit_site = logit / T + b,   probability = sigmoid(logit_site)

whatever runtime served it (ONNX Runtime, Triton, the fallback). The logit terms are mapped alike (every term / T,
plus b on the reference term), so they still add up to the logit and the drivers stay exact. A positive ``T``
never changes the ranking of patients: recalibration moves the base rate and the confidence, not the AUROC.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.runtime.base import ModelContractError, ModelInputs, Prediction

SITE_CALIBRATION_FILE = "site_calibration.json"
FORMAT = 1
FORM = "logit_site = logit / T + b"


class SiteCalibrationError(ValueError):
    """The site setting names no usable calibration (no file, an unknown site, a malformed entry)."""


@dataclass(frozen=True)
class SiteCalibration:
    site: str
    temperature: float  # T > 0
    intercept: float  # b
    model_version: str  # the model version it was fitted on
    n: int | None = None  # patients it was fitted on
    events: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0 and math.isfinite(self.intercept)):
            raise SiteCalibrationError(
                f"site {self.site!r}: temperature must be finite and > 0 and the intercept finite "
                f"(got T={self.temperature}, b={self.intercept})"
            )

    def logit(self, logit: float | np.ndarray) -> Any:
        return np.asarray(logit, dtype=np.float64) / self.temperature + self.intercept

    def probability(self, logit: float | np.ndarray) -> Any:
        return 1.0 / (1.0 + np.exp(-self.logit(logit)))

    def describe(self) -> str:
        fitted = f", fitted on {self.n} patients" if self.n else ""
        return f"site {self.site} (logit / {self.temperature:.4g} {self.intercept:+.4g}{fitted})"

    @property
    def tag(self) -> str:
        """Identifies this calibration in assessment identities: a refit is a new scoring model."""
        return f"site-{self.site}-T{self.temperature:.6g}-b{self.intercept:.6g}"

    def apply(self, prediction: Prediction) -> Prediction:
        logit = float(self.logit(prediction.logit))
        terms = prediction.logit_terms
        if terms is not None:  # reference / T + b, each contribution / T: they still add up to the logit
            terms = (terms[0] / self.temperature + self.intercept, *(t / self.temperature for t in terms[1:]))
        return replace(
            prediction,
            probability=float(1.0 / (1.0 + math.exp(-logit))),
            logit=logit,
            logit_terms=terms,
            calibration=self.describe(),
        )


def site_calibration_path(model_path: Path | str) -> Path:
    """The package's site calibration file: ``site_calibration.json`` beside ``model.onnx``."""
    return Path(model_path).parent / SITE_CALIBRATION_FILE


def read_site_calibrations(path: Path | str) -> dict[str, Any]:
    """The file as a dict (``{"format", "form", "model_version", "sites": {name: entry}}``); empty when missing."""
    p = Path(path)
    if not p.is_file():
        return {"format": FORMAT, "form": FORM, "sites": {}}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise SiteCalibrationError(f"{p}: cannot read the site calibration file: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("sites"), dict):
        raise SiteCalibrationError(f"{p}: not a site calibration file of format {FORMAT}")
    return data


def load_site_calibration(path: Path | str, site: str) -> SiteCalibration:
    """The calibration of ``site`` from the package file; an unknown site raises, listing the known ones."""
    data = read_site_calibrations(path)
    sites: Mapping[str, Any] = data["sites"]
    if site not in sites:
        known = ", ".join(sorted(sites)) or "none"
        raise SiteCalibrationError(
            f"no site calibration for site {site!r} in {path} (known sites: {known}); fit one with "
            f"`strokewatch model recalibrate --site {site}` or unset STROKEWATCH_SITE"
        )
    entry = sites[site]
    try:
        return SiteCalibration(
            site=site,
            temperature=float(entry["temperature"]),
            intercept=float(entry["intercept"]),
            model_version=str(entry["model_version"]),
            n=int(entry["n"]) if entry.get("n") is not None else None,
            events=int(entry["events"]) if entry.get("events") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, SiteCalibrationError):
            raise
        raise SiteCalibrationError(f"{path}: the entry of site {site!r} is malformed: {err!r}") from err


def write_site_calibration(path: Path | str, calibration: SiteCalibration, **details: Any) -> None:
    """Add or replace ``calibration``'s entry in the package file (atomically), with ``details`` (JSON) beside it."""
    p = Path(path)
    data = read_site_calibrations(p)
    data["format"], data["form"] = FORMAT, FORM
    data["sites"][calibration.site] = {
        "temperature": calibration.temperature,
        "intercept": calibration.intercept,
        "model_version": calibration.model_version,
        "n": calibration.n,
        "events": calibration.events,
        **details,
    }
    data["sites"] = dict(sorted(data["sites"].items()))
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".site_calibration.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, p)


class SiteCalibratedModel:
    """A RiskModel (any runtime) whose predictions are recalibrated for one site; everything else is the inner
    model's (``inner``). A prediction from another model version than the calibration was fitted on is refused
    (``ModelContractError``): its temperature and intercept belong to another model."""

    def __init__(self, inner: Any, calibration: SiteCalibration) -> None:
        self.inner = inner
        self.calibration = calibration

    @property
    def model_version(self) -> str:
        return str(self.inner.model_version)

    @property
    def trained(self) -> bool:
        return bool(self.inner.trained)

    @property
    def runtime_name(self) -> str:
        return str(self.inner.runtime_name)

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        out = []
        for prediction in self.inner.predict(batch):
            if prediction.model_version != self.calibration.model_version:
                raise ModelContractError(
                    f"the calibration of site {self.calibration.site!r} was fitted on model "
                    f"{self.calibration.model_version}, the model scoring is {prediction.model_version}: refit it "
                    f"(`strokewatch model recalibrate --site {self.calibration.site}`)"
                )
            out.append(self.calibration.apply(prediction))
        return out

    def __getattr__(self, name: str) -> Any:  # lesion_maps, primary/fallback, describe, info, close ...
        if name in ("inner", "calibration"):  # not set yet (a copy being built): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)


def calibration_of(model: object) -> SiteCalibration | None:
    """The site calibration a model scores with, None for the model's own (global) calibration."""
    return model.calibration if isinstance(model, SiteCalibratedModel) else None
