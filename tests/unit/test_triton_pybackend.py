"""The CPU test model (python backend) declares exactly what the production onnxruntime_onnx config does."""

from __future__ import annotations

import re

from inference import contract as C
from inference import triton_config
from sandbox.triton_pybackend import render_config


def _section(text: str, kind: str) -> str:
    match = re.search(rf"^{kind} \[\n(.*?)\n\]$", text, flags=re.S | re.M)
    assert match, f"no {kind} section"
    return re.sub(r"\s+", " ", match.group(1))


def _parameters(text: str) -> dict[str, str]:
    return dict(re.findall(r'key: "(\w+)"\s*value: \{ string_value: "([^"]*)" \}', text))


def test_same_tensors_batch_and_parameters_as_production() -> None:
    production = triton_config.render(trained=False)
    test_model = render_config(model_version=C.MODEL_VERSION, trained=False)
    for kind in ("input", "output"):
        assert _section(test_model, kind) == _section(production, kind)
    assert f"max_batch_size: {C.MAX_BATCH}" in production and f"max_batch_size: {C.MAX_BATCH}" in test_model
    assert f'name: "{C.MODEL_NAME}"' in test_model
    for key in ("model_version", "trained"):  # what TritonModel reports (model_version, trained)
        assert _parameters(test_model)[key] == _parameters(production)[key]


def test_variants_for_fault_tests() -> None:
    slow = render_config(delay_s=2.5)
    assert _parameters(slow)["delay_s"] == "2.5"
    assert "delay_s" not in _parameters(render_config())
