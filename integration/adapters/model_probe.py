"""The model's preflight probe, through the very RiskModel object the engine scores with.

``model`` is the factory the engine holds (``bootstrap.LazyModel``): calling it loads the embedded ONNX
model, or returns the Triton client, whose ``describe()`` checks the server, the served version and its
metadata against the tensor contract.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference import contract as C
from inference.runtime import (
    FallbackModel,
    ModelContractError,
    ModelUnavailableError,
    SiteCalibratedModel,
    SiteCalibration,
    SiteCalibrationError,
    TritonModel,
)
from integration.domain.checks import CheckResult, chain_text, env_name, tls_problem
from integration.domain.redact import redact_text, redact_url
from integration.ports import RiskModel

_TRITON_CONTRACT_HINT = (
    "serve a model exported for this contract, or fix STROKEWATCH_TRITON_MODEL_NAME / _MODEL_VERSION"
)
_TRITON_HINT = "check STROKEWATCH_TRITON_URL / STROKEWATCH_TRITON_PROTOCOL and that the server loaded the model"


class ModelProbe:
    """``model`` (loadable or served, and matching the contract) and, for doctor, ``model trained``.

    ``model_path`` is the embedded model's file, named in messages.
    """

    name = "model"

    def __init__(self, model: Callable[[], RiskModel], *, model_path: Path) -> None:
        self._model = model
        self.model_path = model_path

    def probe(self, *, quick: bool) -> list[CheckResult]:
        try:
            loaded = self._model()
        except ModelContractError as err:
            hint = f"re-export the model for contract {C.MODEL_VERSION} (`strokewatch model export`)"
            return [CheckResult(self.name, False, f"{self.model_path}: {err}", hint)]
        except SiteCalibrationError as err:  # STROKEWATCH_SITE names no calibration in the package
            return [CheckResult(self.name, False, str(err), f"fix {env_name('site')} or fit the site's calibration")]
        except ValueError as err:  # Triton settings that contradict each other (URL scheme, protocol, TLS files)
            return [CheckResult(self.name, False, f"cannot build the Triton client: {err}", "fix the setting named")]
        except (ModelUnavailableError, OSError, RuntimeError) as err:
            if not self.model_path.is_file():
                hint = f"run `strokewatch model export` or set {env_name('model_path')}"
                return [CheckResult(self.name, False, f"model file not found: {self.model_path}", hint)]
            hint = "set STROKEWATCH_MODEL_PATH to a model.onnx"
            return [CheckResult(self.name, False, f"{self.model_path}: cannot load: {err}", hint)]
        calibration = loaded.calibration if isinstance(loaded, SiteCalibratedModel) else None
        if isinstance(loaded, SiteCalibratedModel):
            loaded = loaded.inner
        triton = loaded.primary if isinstance(loaded, FallbackModel) else loaded
        if isinstance(triton, TritonModel):
            results = _served(triton)
        else:
            version = str(loaded.model_version)
            detail = f"{loaded.runtime_name}: model {version} loaded, matches contract {C.MODEL_VERSION}"
            results = [CheckResult(self.name, True, detail), _trained(version, bool(loaded.trained))]
        if calibration is not None and results[0].ok:
            results.append(_site(calibration, str(loaded.model_version)))
        return results[:1] if quick else results


def _served(triton: TritonModel) -> list[CheckResult]:
    url = redact_url(triton.url)  # user:password in a Triton URL behind a proxy is never shown
    try:
        info: dict[str, Any] = triton.describe()
    except ModelContractError as err:
        return [CheckResult("model", False, f"Triton {url}: {redact_text(str(err))}", _TRITON_CONTRACT_HINT)]
    except Exception as err:  # unavailable, or any transport error the client raises
        problem = tls_problem(chain_text(err), env_name("triton_tls"), env_name("triton_url"),
                              client_cert=triton.tls is not None and triton.tls.client_cert is not None)
        if problem is not None:
            detail = f"Triton {url}: TLS failed: {problem.explanation}"
            return [CheckResult("model", False, detail, problem.hint)]
        return [CheckResult("model", False, f"Triton {url}: {redact_text(str(err))}", _TRITON_HINT)]
    server = info.get("server") or {}
    detail = (
        f"Triton {server.get('version') or ''} at {redact_url(str(info.get('url')))} ({info.get('protocol')}): model "
        f"{info.get('model_name')} ready (versions {', '.join(info.get('ready_versions') or []) or '?'}), "
        f"model {info.get('model_version')}, matches the contract"
    )
    return [CheckResult("model", True, detail), _trained(str(info.get("model_version")), bool(info.get("trained")))]


def _site(calibration: SiteCalibration, version: str) -> CheckResult:
    """Doctor: which site recalibration the scores use, and whether it was fitted on the model that scores."""
    if calibration.model_version != version:
        return CheckResult(
            "model site calibration",
            False,
            f"{calibration.describe()} was fitted on model {calibration.model_version}, the model is {version}",
            f"refit it: strokewatch model recalibrate --site {calibration.site}",
        )
    return CheckResult("model site calibration", True, f"scores recalibrated for {calibration.describe()}")


def _trained(version: str, trained: bool) -> CheckResult:
    if trained:
        return CheckResult("model trained", True, f"model {version} carries trained weights")
    return CheckResult(
        "model trained",
        True,
        f"warning: model {version} is an untrained placeholder; every RiskAssessment says so in method and note",
        "train and export the model (see the README's model section)",
        warning=True,
    )
