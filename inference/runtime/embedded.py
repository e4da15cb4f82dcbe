"""The embedded default runtime: the exported model.onnx run in-process by ONNX Runtime."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference import contract as C
from inference.runtime.base import (
    ModelContractError,
    ModelInputs,
    ModelUnavailableError,
    Prediction,
    predictions,
    stack_inputs,
)

DEFAULT_MODEL_PATH = (
    Path(__file__).resolve().parents[2] / "triton_models" / C.MODEL_NAME / str(C.TRITON_MODEL_VERSION) / "model.onnx"
)

#: ONNX metadata_props keys written by modelling.export and read here.
META_VERSION = "strokewatch.model_version"
META_TRAINED = "strokewatch.trained"
META_INFO = "strokewatch.info"  # JSON: calibration, training seed, metrics summary


class OnnxRuntimeModel:
    """The embedded default: the exported model.onnx run in-process on the CPU (or CUDA when available)."""

    runtime_name = "onnxruntime"

    def __init__(self, model_path: Path | str = DEFAULT_MODEL_PATH, *, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise ModelUnavailableError(f"model file not found: {path} (run `strokewatch model export`)")
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        meta = self._session.get_modelmeta().custom_metadata_map
        self._version: str = str(meta.get(META_VERSION, "unknown"))
        self._trained: bool = str(meta.get(META_TRAINED, "false")).lower() == "true"
        self.info: dict[str, object] = json.loads(meta.get(META_INFO, "{}"))
        self.path = path
        optional = check_onnx_signature(self._session)
        #: what each scoring asks for: the contract's outputs and the optional ones this model has, less those asked
        #: for only on request (``C.ON_REQUEST_OUTPUTS``: ``lesion_maps``)
        self.output_names = (*C.OUTPUT_NAMES, *(n for n in optional if n not in C.ON_REQUEST_OUTPUTS))
        self.on_request = tuple(n for n in optional if n in C.ON_REQUEST_OUTPUTS)

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def trained(self) -> bool:
        return self._trained

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        feeds = stack_inputs(batch)
        results: list[list[np.ndarray]] = []
        for start in range(0, len(batch), C.MAX_BATCH):
            chunk = {k: v[start : start + C.MAX_BATCH] for k, v in feeds.items()}
            results.append(self._session.run(list(self.output_names), chunk))
        out = {name: np.concatenate([r[i] for r in results]) for i, name in enumerate(self.output_names)}
        return predictions(out["probability"], out["logit"], self._version, self.runtime_name, out.get("logit_terms"))


    def lesion_maps(self, batch: Sequence[ModelInputs]) -> list[np.ndarray] | None:
        """Per patient the lesion maps (``C.LESION_KINDS``, *``C.LESION_MAP_SHAPE``); None when the model has none."""
        if "lesion_map" not in self.on_request:
            return None
        feeds = stack_inputs(batch)
        maps = [
            self._session.run(["lesion_map"], {k: v[start : start + C.MAX_BATCH] for k, v in feeds.items()})[0]
            for start in range(0, len(batch), C.MAX_BATCH)
        ]
        return list(np.concatenate(maps))


def check_onnx_signature(session: object) -> tuple[str, ...]:
    """Raise ModelContractError naming the first tensor whose name/shape/dtype differ from the contract; return
    the optional outputs (``C.OPTIONAL_OUTPUTS``) the model has, each checked like the others."""
    type_names = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
    served = {i.name: i for i in session.get_inputs()}  # type: ignore[attr-defined]
    served.update({o.name: o for o in session.get_outputs()})  # type: ignore[attr-defined]
    optional = tuple(spec for spec in C.OPTIONAL_OUTPUTS if spec.name in served)
    for spec in (*C.INPUTS, *C.OUTPUTS, *optional):
        got = served.get(spec.name)
        if got is None:
            raise ModelContractError(f"model has no tensor named {spec.name!r} (contract {C.MODEL_VERSION})")
        dims = tuple(got.shape[1:])
        if tuple(int(d) if isinstance(d, int) else -1 for d in dims) != spec.dims:
            raise ModelContractError(f"tensor {spec.name!r}: model dims {dims}, contract {spec.dims}")
        if type_names.get(got.type) != spec.dtype:
            raise ModelContractError(f"tensor {spec.name!r}: model dtype {got.type}, contract {spec.dtype}")
    return tuple(spec.name for spec in optional)
