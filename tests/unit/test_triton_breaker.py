"""CircuitBreaker state machine (pure; a fake clock) and the served-metadata contract check."""

from __future__ import annotations

import pytest

from inference import contract as C
from inference.runtime import CircuitBreaker, ModelContractError, ModelUnavailableError, check_served_metadata


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=30, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now = 10
    with pytest.raises(ModelUnavailableError, match="next probe in 20s"):
        breaker.before_call()


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_half_open_lets_one_probe_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5, clock=clock)
    breaker.record_failure()
    clock.now = 5
    assert breaker.state == "half-open"
    breaker.before_call()  # the probe
    with pytest.raises(ModelUnavailableError):
        breaker.before_call()  # others wait for the probe's verdict
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_call()


def test_failed_probe_reopens_for_a_full_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5, clock=clock)
    breaker.record_failure()
    clock.now = 6
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now = 10
    assert breaker.state == "open"
    clock.now = 11
    assert breaker.state == "half-open"


def _metadata() -> dict[str, object]:
    def tensors(specs: tuple[C.TensorSpec, ...]) -> list[dict[str, object]]:
        return [{"name": s.name, "datatype": C.kserve_dtype(s), "shape": [-1, *s.dims]} for s in specs]

    return {"inputs": tensors(C.INPUTS), "outputs": tensors(C.OUTPUTS)}


def test_contract_metadata_accepted() -> None:
    check_served_metadata(_metadata(), C.MODEL_NAME)


def test_wrong_datatype_names_the_tensor() -> None:
    meta = _metadata()
    meta["inputs"][1]["datatype"] = "FP16"  # type: ignore[index]
    with pytest.raises(ModelContractError, match="tensor 'image_present': served datatype FP16, contract FP32"):
        check_served_metadata(meta, C.MODEL_NAME)


def test_fixed_batch_is_a_mismatch() -> None:
    meta = _metadata()
    meta["outputs"][0]["shape"] = [1, 1]  # type: ignore[index]
    with pytest.raises(ModelContractError, match="tensor 'probability'"):
        check_served_metadata(meta, C.MODEL_NAME)


def test_extra_required_input_is_a_mismatch() -> None:
    meta = _metadata()
    meta["inputs"].append({"name": "labs", "datatype": "FP32", "shape": [-1, 4]})  # type: ignore[attr-defined]
    with pytest.raises(ModelContractError, match="labs"):
        check_served_metadata(meta, C.MODEL_NAME)
