"""TritonModel against a real tritonserver (fixtures: tests/conftest_triton.py).

Parity with the embedded ONNX Runtime over HTTP and gRPC, and every fault the engine must survive:
server down, stopped mid-run (circuit breaker, half-open recovery), model not loaded, wrong pinned
version, contract mismatch, responses slower than the timeout.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pytest

from inference import contract as C
from inference.runtime import (
    CircuitBreaker,
    FallbackModel,
    ModelContractError,
    ModelInputs,
    ModelUnavailableError,
    OnnxRuntimeModel,
    TritonModel,
)
from sandbox._process import free_port
from sandbox.triton import TritonPeer
from sandbox.triton_pybackend import write_repository

pytestmark = pytest.mark.peers
Proto = Literal["http", "grpc"]
PROTOCOLS: tuple[Proto, ...] = ("http", "grpc")
SLOW_S = 3.0


def make_inputs(n: int, seed: int = 0) -> list[ModelInputs]:
    """Plausible, varied patients; every 3rd has no image, every 4th no vitals at all (all masked)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image = rng.uniform(-1, 1, (1, *C.VOLUME_SHAPE)).astype(np.float32)
        present = np.ones(1, np.float32)
        if i % 3 == 2:
            image, present = np.zeros_like(image), np.zeros(1, np.float32)
        mask = (rng.random((C.N_STEPS, C.N_FEATURES)) < 0.3).astype(np.float32)
        vitals = (rng.standard_normal((C.N_STEPS, C.N_FEATURES)) * mask).astype(np.float32)
        delta = rng.random((C.N_STEPS, C.N_FEATURES)).astype(np.float32)
        if i % 4 == 3:
            mask, vitals, delta = np.zeros_like(mask), np.zeros_like(vitals), np.ones_like(delta)
        demographics = np.array([rng.normal(), float(i % 2)], np.float32)
        items.append(ModelInputs(image, present, vitals, mask, delta, demographics))
    return items


@pytest.fixture(scope="session")
def embedded(triton_onnx_path: Path) -> OnnxRuntimeModel:
    return OnnxRuntimeModel(triton_onnx_path)


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> Proto:
    return cast(Proto, request.param)


@pytest.fixture
def served(
    triton_peer: TritonPeer, protocol: Proto, triton_url_for: Callable[[TritonPeer, str], str]
) -> Iterator[TritonModel]:
    model = TritonModel(triton_url_for(triton_peer, protocol), protocol=protocol)
    yield model
    model.close()


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("n", [1, 5, C.MAX_BATCH, C.MAX_BATCH * 2 + 3])
def test_same_numbers_as_embedded_runtime(served: TritonModel, embedded: OnnxRuntimeModel, n: int) -> None:
    batch = make_inputs(n, seed=n)
    expected = embedded.predict(batch)
    got = served.predict(batch)
    assert len(got) == n
    np.testing.assert_allclose([p.probability for p in got], [p.probability for p in expected], atol=1e-4)
    np.testing.assert_allclose([p.logit for p in got], [p.logit for p in expected], atol=1e-4)
    # the model serves its logit terms (KServe v2 output logit_terms): the drivers need no second request
    np.testing.assert_allclose([p.logit_terms for p in got], [p.logit_terms for p in expected], atol=1e-4)
    assert {p.runtime for p in got} == {served.runtime_name}
    assert {p.model_version for p in got} == {embedded.model_version}
    assert served.trained == embedded.trained


def test_lesion_maps_are_served_on_request_only(served: TritonModel, embedded: OnnxRuntimeModel) -> None:
    batch = make_inputs(C.MAX_BATCH + 2, seed=11)
    served.predict(batch[:1])
    assert "lesion_map" not in served.output_names and served.on_request == ("lesion_map",)  # scoring never asks
    got, expected = served.lesion_maps(batch), embedded.lesion_maps(batch)
    assert got is not None and expected is not None and len(got) == len(batch)
    assert got[0].shape == (len(C.LESION_KINDS), *C.LESION_MAP_SHAPE)
    np.testing.assert_allclose(np.stack(got), np.stack(expected), atol=1e-4)


def test_masked_modalities_change_the_score(served: TritonModel, embedded: OnnxRuntimeModel) -> None:
    # The zero-image / all-masked rows are really sent, not dropped or reordered: they score like the embedded ones.
    full = make_inputs(1, seed=7)[0]
    no_image = dataclasses.replace(full, image=np.zeros_like(full.image), image_present=np.zeros(1, np.float32))
    no_vitals = dataclasses.replace(
        full,
        vitals=np.zeros_like(full.vitals),
        vitals_mask=np.zeros_like(full.vitals_mask),
        vitals_delta=np.ones_like(full.vitals_delta),
    )
    got = served.predict([full, no_image, no_vitals])
    expected = embedded.predict([full, no_image, no_vitals])
    np.testing.assert_allclose([p.logit for p in got], [p.logit for p in expected], atol=1e-4)


def test_concurrent_requests_are_batched_and_correct(
    triton_peer: TritonPeer,
    protocol: Proto,
    triton_url_for: Callable[[TritonPeer, str], str],
    embedded: OnnxRuntimeModel,
) -> None:
    batches = [make_inputs(3, seed=100 + i) for i in range(6)]
    model = TritonModel(triton_url_for(triton_peer, protocol), protocol=protocol)
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:  # one client per thread inside TritonModel
            results = list(pool.map(model.predict, batches))
    finally:
        model.close()
    for batch, got in zip(batches, results, strict=True):
        expected = embedded.predict(batch)
        np.testing.assert_allclose([p.logit for p in got], [p.logit for p in expected], atol=1e-4)


def test_describe_reports_server_and_model(served: TritonModel, embedded: OnnxRuntimeModel) -> None:
    info = served.describe()
    assert info["server"]["name"] == "triton" and info["server"]["version"]
    assert info["ready_versions"] == [str(C.TRITON_MODEL_VERSION)]
    assert info["model_version"] == embedded.model_version
    assert info["breaker"] == "closed"


def test_pinned_version_that_is_served(triton_peer: TritonPeer, embedded: OnnxRuntimeModel) -> None:
    model = TritonModel(triton_peer.http_url, model_version=str(C.TRITON_MODEL_VERSION))
    batch = make_inputs(2)
    np.testing.assert_allclose(
        [p.logit for p in model.predict(batch)], [p.logit for p in embedded.predict(batch)], atol=1e-4
    )


# ------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_server_not_started_is_unavailable_then_circuit_opens(proto: Proto) -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=60)
    model = TritonModel(f"127.0.0.1:{free_port()}", protocol=proto, retries=1, backoff_s=0.01, breaker=breaker)
    for _ in range(2):
        with pytest.raises(ModelUnavailableError, match="unavailable"):
            model.predict(make_inputs(1))
    assert breaker.state == "open"
    with pytest.raises(ModelUnavailableError, match="circuit open"):
        model.predict(make_inputs(1))


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_stopped_mid_run_then_back_after_restart(
    triton_peer_factory: Callable[..., TritonPeer],
    triton_url_for: Callable[[TritonPeer, str], str],
    embedded: OnnxRuntimeModel,
    proto: Proto,
) -> None:
    peer = triton_peer_factory()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.5)
    model = TritonModel(triton_url_for(peer, proto), protocol=proto, retries=1, backoff_s=0.05, breaker=breaker)
    batch = make_inputs(4)
    model.predict(batch)

    peer.stop()
    with pytest.raises(ModelUnavailableError):
        model.predict(batch)
    with pytest.raises(ModelUnavailableError, match="circuit open"):  # fails fast, no request sent
        model.predict(batch)

    peer.start()  # same ports
    time.sleep(breaker.reset_timeout_s + 0.1)
    assert breaker.state == "half-open"
    got = model.predict(batch)  # the probe succeeds and closes the circuit
    assert str(breaker.state) == "closed"
    np.testing.assert_allclose([p.logit for p in got], [p.logit for p in embedded.predict(batch)], atol=1e-4)
    model.close()


def test_model_not_loaded_is_unavailable_until_loaded(triton_peer_factory: Callable[..., TritonPeer]) -> None:
    peer = triton_peer_factory(load_models=())  # explicit model control, nothing loaded
    model = TritonModel(peer.http_url, retries=0)
    with pytest.raises(ModelUnavailableError, match=r"model 'stroke_fusion' is not ready .*ready versions: none"):
        model.check()
    with pytest.raises(ModelUnavailableError, match="not ready"):
        model.predict(make_inputs(1))
    peer.load_model(C.MODEL_NAME)
    assert len(model.predict(make_inputs(2))) == 2


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_wrong_pinned_version_is_a_clear_error(
    triton_peer: TritonPeer, triton_url_for: Callable[[TritonPeer, str], str], proto: Proto
) -> None:
    model = TritonModel(triton_url_for(triton_peer, proto), protocol=proto, model_version="7")
    with pytest.raises(
        ModelUnavailableError, match=r"version 7 of model 'stroke_fusion' is not ready.*ready versions: 1"
    ):
        model.predict(make_inputs(1))


# A second server with deliberately broken variants of the model, shared by the tests below.
def _renamed(specs: tuple[C.TensorSpec, ...], old: str, new: str) -> tuple[C.TensorSpec, ...]:
    return tuple(dataclasses.replace(s, name=new) if s.name == old else s for s in specs)


def _redimmed(specs: tuple[C.TensorSpec, ...], name: str, dims: tuple[int, ...]) -> tuple[C.TensorSpec, ...]:
    return tuple(dataclasses.replace(s, dims=dims) if s.name == name else s for s in specs)


VARIANTS: dict[str, dict[str, Any]] = {
    "sf_wrong_name": {"inputs": _renamed(C.INPUTS, "demographics", "demographic")},
    "sf_wrong_dims": {"inputs": _redimmed(C.INPUTS, "vitals", (C.N_STEPS, C.N_FEATURES + 1))},
    "sf_wrong_output": {"outputs": _redimmed(C.OUTPUTS, "logit", (2,))},
    "sf_slow": {"delay_s": SLOW_S},
    "sf_no_terms": {"outputs": C.OUTPUTS},  # a repository from before logit_terms: the optional output not declared
}


@pytest.fixture(scope="module")
def variants_peer(
    tmp_path_factory: pytest.TempPathFactory, triton_venv: Path, triton_onnx_path: Path
) -> Iterator[TritonPeer]:
    repo = tmp_path_factory.mktemp("triton-variants")
    for name, kwargs in VARIANTS.items():
        write_repository(repo, triton_onnx_path, model_name=name, **kwargs)
    with TritonPeer(repo, load_models=tuple(VARIANTS), venv=triton_venv) as peer:
        yield peer


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("sf_wrong_name", r"no input tensor 'demographics' \(it has: .*demographic"),
        ("sf_wrong_dims", r"tensor 'vitals': served shape \[-1, 84, 9\], contract \[-1, 84, 8\]"),
        ("sf_wrong_output", r"tensor 'logit': served shape"),
    ],
)
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_contract_mismatch_names_the_tensor(
    variants_peer: TritonPeer,
    triton_url_for: Callable[[TritonPeer, str], str],
    variant: str,
    message: str,
    proto: Proto,
) -> None:
    model = TritonModel(triton_url_for(variants_peer, proto), protocol=proto, model_name=variant)
    with pytest.raises(ModelContractError, match=message):
        model.predict(make_inputs(1))
    assert model.breaker.state == "closed"  # a mismatch is not an outage


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_slow_response_past_the_timeout_is_unavailable(
    variants_peer: TritonPeer, triton_url_for: Callable[[TritonPeer, str], str], proto: Proto
) -> None:
    model = TritonModel(
        triton_url_for(variants_peer, proto),
        protocol=proto,
        model_name="sf_slow",
        timeout_s=1.0,
        retries=0,
    )
    model.check()  # metadata answers at once: only inference is slow
    with pytest.raises(ModelUnavailableError, match=r"(?i)timed out|deadline"):
        model.predict(make_inputs(1))
    time.sleep(SLOW_S)  # let the server finish the abandoned request before the next test


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_a_model_that_declares_no_logit_terms_is_still_served(
    variants_peer: TritonPeer,
    triton_url_for: Callable[[TritonPeer, str], str],
    embedded: OnnxRuntimeModel,
    proto: Proto,
) -> None:
    model = TritonModel(triton_url_for(variants_peer, proto), protocol=proto, model_name="sf_no_terms")
    batch = make_inputs(3)
    got = model.predict(batch)
    assert model.output_names == C.OUTPUT_NAMES and all(p.logit_terms is None for p in got)  # drivers: occlusion
    np.testing.assert_allclose([p.logit for p in got], [p.logit for p in embedded.predict(batch)], atol=1e-4)
    assert model.lesion_maps(batch) is None  # no lesion maps either: the heat-map is made by occlusion


# ------------------------------------------------------------------------------------- fallback
def test_fallback_scores_embedded_and_says_so(embedded: OnnxRuntimeModel) -> None:
    primary = TritonModel(f"127.0.0.1:{free_port()}", retries=0)
    model = FallbackModel(primary, embedded)
    batch = make_inputs(3)
    got = model.predict(batch)
    assert {p.runtime for p in got} == {"onnxruntime (fallback: triton unavailable)"}
    assert all(p.logit_terms is not None for p in got)  # the fallback's terms are kept for the drivers
    maps = model.lesion_maps(batch)  # and the heat-map's lesion maps come from the fallback too
    assert maps is not None and len(maps) == 3
    np.testing.assert_allclose([p.logit for p in got], [p.logit for p in embedded.predict(batch)], atol=1e-6)


def test_fallback_does_not_hide_a_contract_mismatch(variants_peer: TritonPeer, embedded: OnnxRuntimeModel) -> None:
    model = FallbackModel(TritonModel(variants_peer.http_url, model_name="sf_wrong_dims"), embedded)
    with pytest.raises(ModelContractError, match="vitals"):
        model.predict(make_inputs(1))
