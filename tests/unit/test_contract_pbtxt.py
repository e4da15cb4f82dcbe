"""config.pbtxt and the exported ONNX agree with inference/contract.py."""

from __future__ import annotations

import re

import onnx

from inference import contract as C
from inference.triton_config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_ONNX_PATH,
    onnx_optional_outputs,
    onnx_trained_flag,
    render,
)
from modelling.export import check_graph_signature


def test_committed_config_pbtxt_is_regenerated_unchanged() -> None:
    expected = render(
        trained=onnx_trained_flag(DEFAULT_ONNX_PATH), kind="gpu", optional=onnx_optional_outputs(DEFAULT_ONNX_PATH)
    )
    assert DEFAULT_CONFIG_PATH.read_text() == expected, "run `python -m inference.triton_config` and commit"


def _blocks(text: str, section: str) -> list[tuple[str, str, tuple[int, ...]]]:
    body = re.search(rf"^{section} \[\n(.*?)^\]", text, re.S | re.M)
    assert body, f"no {section} section"
    found = re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[ ([\d, ]+) \]', body.group(1))
    return [(name, dtype, tuple(int(d) for d in dims.split(","))) for name, dtype, dims in found]


def test_config_pbtxt_tensors_are_the_contracts() -> None:
    text = DEFAULT_CONFIG_PATH.read_text()
    assert f'name: "{C.MODEL_NAME}"' in text
    assert 'platform: "onnxruntime_onnx"' in text
    assert f"max_batch_size: {C.MAX_BATCH}" in text
    assert _blocks(text, "input") == [(s.name, C.triton_dtype(s), s.dims) for s in C.INPUTS]
    # the shipped model's head is logistic: it serves the optional logit_terms too, so the engine explains its
    # scores from the same forward pass
    served = (*C.OUTPUTS, *C.OPTIONAL_OUTPUTS)
    assert _blocks(text, "output") == [(s.name, C.triton_dtype(s), s.dims) for s in served]
    assert "kind: KIND_GPU" in text and "dynamic_batching" in text
    assert f'string_value: "{C.MODEL_VERSION}"' in text


def test_cpu_variant_differs_only_in_instance_group() -> None:
    comments = re.compile(r"^#.*\n", re.M)
    gpu, cpu = (comments.sub("", render(trained=True, kind=k)) for k in ("gpu", "cpu"))  # type: ignore[arg-type]
    assert "kind: KIND_CPU" in cpu and "KIND_GPU" not in cpu
    groups = re.compile(r"^instance_group \[.*?^\]\n", re.S | re.M)
    assert groups.sub("", gpu) == groups.sub("", cpu)


def test_trained_flag_in_config_follows_the_model() -> None:
    assert 'key: "trained"\n  value: { string_value: "true" }' in render(trained=True)
    assert 'key: "trained"\n  value: { string_value: "false" }' in render(trained=False)


def test_committed_onnx_signature_is_the_contracts() -> None:
    proto = onnx.load(str(DEFAULT_ONNX_PATH))
    check_graph_signature(proto)  # raises naming the tensor that differs
    assert DEFAULT_ONNX_PATH.stat().st_size <= 20 * 1024 * 1024


def test_optional_outputs_are_declared_only_when_the_model_has_them() -> None:
    assert "logit_terms" not in render(trained=True)
    assert 'name: "logit_terms"' in render(trained=True, optional=C.OPTIONAL_OUTPUT_NAMES)
    assert onnx_optional_outputs(DEFAULT_ONNX_PATH) == C.OPTIONAL_OUTPUT_NAMES
