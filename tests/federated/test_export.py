"""The federated model is the shipped model with another vitals branch and head: it exports as before, and the
exported ONNX scores what the sites trained (the frozen CNN's concepts fused by the trained branch and head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference import contract as C
from modelling.calibrate import sigmoid
from modelling.export import export_model
from modelling.federated import net
from modelling.federated.sites import _from_cohort
from modelling.model import FusionModel
from synth import make_arrays


def test_federated_model_exports_and_scores_what_was_trained(tmp_path: Path, base: FusionModel) -> None:
    cohort = make_arrays(6, seed=77, site="coastal")
    data = _from_cohort(cohort, base)
    trained = net.fresh_model(base, seed=3)
    net.train_local(trained, data, 2, net.Recipe(batch_size=3), seed=3)
    model = net.to_fusion_model(trained, base)
    assert model.cfg.temperature == 1.0 and model.cfg.calibration_bias == 0.0

    path = export_model(model, tmp_path / "model.onnx", trained=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {name: np.ascontiguousarray(getattr(cohort, name), dtype=np.float32) for name in C.INPUT_NAMES}
    probability = session.run([C.OUTPUT_NAMES[0]], inputs)[0][:, 0]
    expected = sigmoid(net.predict_logits(trained, data))
    assert np.allclose(probability, expected, atol=1e-4), (probability, expected)
    # and training moved it (the check above is not met by any model)
    assert not np.allclose(expected, sigmoid(net.predict_logits(net.fresh_model(base, seed=3), data)), atol=1e-3)
