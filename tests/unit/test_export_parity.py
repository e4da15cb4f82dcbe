"""torch and ONNX Runtime give the same numbers, at several batch sizes and with missing modalities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from inference import contract as C
from inference.runtime import DEFAULT_MODEL_PATH, ModelInputs, OnnxRuntimeModel
from modelling.export import DEFAULT_WEIGHTS_DIR, export_model, untrained_model
from modelling.model import CalibratedModel, FusionModel, load

TOLERANCE = 1e-4


def patients(batch: int, seed: int) -> dict[str, np.ndarray]:
    """Contract-shaped inputs; patient 0 has no image, patient 1 no vitals (when the batch has them)."""
    rng = np.random.default_rng(seed)
    feeds = {spec.name: rng.standard_normal((batch, *spec.dims)).astype(np.float32) for spec in C.INPUTS}
    feeds["image_present"] = np.ones((batch, 1), np.float32)
    feeds["vitals_mask"] = (rng.random((batch, C.N_STEPS, C.N_FEATURES)) < 0.3).astype(np.float32)
    feeds["vitals_delta"] = rng.random((batch, C.N_STEPS, C.N_FEATURES)).astype(np.float32)
    if batch >= 2:
        feeds["image"][0] = 0.0
        feeds["image_present"][0] = 0.0
        feeds["vitals"][1] = 0.0
        feeds["vitals_mask"][1] = 0.0
        feeds["vitals_delta"][1] = 1.0
    return feeds


def torch_outputs(model: FusionModel, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        prob, logit = CalibratedModel(model.eval())(*(torch.from_numpy(feeds[n]) for n in C.INPUT_NAMES))
    return prob.numpy(), logit.numpy()


def assert_parity(model: FusionModel, onnx_path: Path) -> None:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch, seed in ((1, 0), (5, 1), (2, 2)):
        feeds = patients(batch, seed)
        prob, logit = session.run(list(C.OUTPUT_NAMES), feeds)
        t_prob, t_logit = torch_outputs(model, feeds)
        assert prob.shape == (batch, 1) and logit.shape == (batch, 1)
        np.testing.assert_allclose(prob, t_prob, atol=TOLERANCE, err_msg=f"probability, batch {batch}")
        np.testing.assert_allclose(logit, t_logit, atol=TOLERANCE, err_msg=f"logit, batch {batch}")


@pytest.fixture(scope="module")
def fresh_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[FusionModel, Path]:
    model = untrained_model(seed=3)
    model.cfg.temperature = 1.7  # a non-trivial calibration must be baked into both outputs
    model.cfg.calibration_bias = 0.3
    path = export_model(model, tmp_path_factory.mktemp("onnx") / "model.onnx", trained=False)
    return model, path


def test_exporter_output_matches_torch_at_batch_1_and_5(fresh_export: tuple[FusionModel, Path]) -> None:
    model, path = fresh_export
    assert_parity(model, path)


def test_exported_metadata_is_read_by_the_runtime(fresh_export: tuple[FusionModel, Path]) -> None:
    _, path = fresh_export
    runtime = OnnxRuntimeModel(path)
    assert runtime.model_version == C.MODEL_VERSION
    assert runtime.trained is False
    assert runtime.info["temperature"] == pytest.approx(1.7)
    assert runtime.info["calibration_bias"] == pytest.approx(0.3)
    feeds = patients(3, seed=4)
    batch = [ModelInputs(**{name: feeds[name][i] for name in C.INPUT_NAMES}) for i in range(3)]
    preds = runtime.predict(batch)
    assert [p.probability for p in preds] == pytest.approx(list(feeds_probability(path, feeds)), abs=1e-6)


def feeds_probability(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probability"], feeds)[0].ravel()


def test_committed_onnx_matches_the_shipped_weights() -> None:
    """The model.onnx in triton_models/ is the export of modelling/weights/fusion, not a stale file."""
    runtime = OnnxRuntimeModel(DEFAULT_MODEL_PATH)
    assert runtime.trained, "the committed model.onnx is an untrained placeholder"
    model = load(DEFAULT_WEIGHTS_DIR)
    assert runtime.info["temperature"] == pytest.approx(model.cfg.temperature)
    assert runtime.info["calibration_bias"] == pytest.approx(model.cfg.calibration_bias)
    assert runtime.info["seed"] == model.cfg.info["seed"]
    assert_parity(model, DEFAULT_MODEL_PATH)
