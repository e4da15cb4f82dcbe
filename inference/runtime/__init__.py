"""RiskModel implementations behind one interface: in-process ONNX Runtime (embedded default) and Triton.

Both take a batch of ``ModelInputs`` (one per patient, arrays shaped as ``inference.contract`` says,
without the batch axis) and return one ``Prediction`` per patient, in order.

- ``base``: what every runtime shares (inputs, predictions, batching, ``ModelUnavailableError``,
  ``ModelContractError``);
- ``embedded``: ``OnnxRuntimeModel``, the exported model.onnx in-process (``DEFAULT_MODEL_PATH``);
- ``triton``: ``TritonModel`` with its ``CircuitBreaker``, and ``FallbackModel``;
- ``site``: ``SiteCalibratedModel``, a per-site temperature and intercept from the package's
  ``site_calibration.json`` applied to any runtime's predictions (the site setting);
- ``transport``: the tritonclient HTTP/gRPC calls ``TritonModel`` makes (tritonclient is imported on first use,
  so importing this package costs the embedded runtime nothing).
"""

from inference.runtime.base import (
    ModelContractError,
    ModelInputs,
    ModelUnavailableError,
    Prediction,
    stack_inputs,
)
from inference.runtime.embedded import (
    DEFAULT_MODEL_PATH,
    META_INFO,
    META_TRAINED,
    META_VERSION,
    OnnxRuntimeModel,
    check_onnx_signature,
)
from inference.runtime.site import (
    SITE_CALIBRATION_FILE,
    SiteCalibratedModel,
    SiteCalibration,
    SiteCalibrationError,
    calibration_of,
    load_site_calibration,
    site_calibration_path,
)
from inference.runtime.triton import CircuitBreaker, FallbackModel, TritonModel, check_served_metadata

__all__ = [
    "DEFAULT_MODEL_PATH",
    "META_INFO",
    "META_TRAINED",
    "META_VERSION",
    "SITE_CALIBRATION_FILE",
    "CircuitBreaker",
    "FallbackModel",
    "ModelContractError",
    "ModelInputs",
    "ModelUnavailableError",
    "OnnxRuntimeModel",
    "Prediction",
    "SiteCalibratedModel",
    "SiteCalibration",
    "SiteCalibrationError",
    "TritonModel",
    "calibration_of",
    "check_onnx_signature",
    "check_served_metadata",
    "load_site_calibration",
    "site_calibration_path",
    "stack_inputs",
]
