"""Pytest plugin: a real Triton Inference Server on 127.0.0.1 (register via `pytest_plugins`).

The server is the nvidia-pytriton wheel's tritonserver in its own venv (created on first use by
deploy/triton/setup_venv.sh); it serves the production model.onnx through a python-backend model
generated from the same contract (sandbox/triton_pybackend.py), so Triton and the embedded runtime
must give the same numbers.

Fixtures:
- `triton_onnx_path` (session): the model.onnx both runtimes load (triton_models/stroke_fusion/1/model.onnx).
- `triton_model_repo` (session): the generated python-backend repository for it.
- `triton_peer` (session): one server for the whole session, model loaded. Do not stop it in a test.
- `triton_peer_factory`: `start(repo=None, load_models=(MODEL_NAME,)) -> TritonPeer` for tests that stop,
  restart or reconfigure a server (fault tests, the engine's e2e "Triton comes back" test); every peer it
  started is closed after the test.
- `triton_repo_factory`: `make(name, **write_repository_kwargs) -> Path`, a fresh repo dir per call
  (e.g. `delay_s=3` for a slow model, `inputs=...` for a contract mismatch).
- `triton_url_for`: `(peer, protocol) -> url` for TritonModel.

A server that cannot start is an error, not a skip: CI must create the venv (.ci/run does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from inference import contract as C
from inference.runtime import DEFAULT_MODEL_PATH
from sandbox.triton import TritonPeer, ensure_venv
from sandbox.triton_pybackend import write_repository

PeerFactory = Callable[..., TritonPeer]


@pytest.fixture(scope="session")
def triton_venv() -> Path:
    return ensure_venv(create=True)


@pytest.fixture(scope="session")
def triton_onnx_path() -> Path:
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.fail(f"{DEFAULT_MODEL_PATH} is missing: run `strokewatch model export` (modelling.export)")
    return DEFAULT_MODEL_PATH


@pytest.fixture(scope="session")
def triton_model_repo(tmp_path_factory: pytest.TempPathFactory, triton_onnx_path: Path) -> Path:
    repo = tmp_path_factory.mktemp("triton-repo")
    write_repository(repo, triton_onnx_path)
    return repo


@pytest.fixture(scope="session")
def triton_peer(triton_venv: Path, triton_model_repo: Path) -> Iterator[TritonPeer]:
    with TritonPeer(triton_model_repo, venv=triton_venv) as peer:
        yield peer


@pytest.fixture
def triton_peer_factory(triton_venv: Path, triton_model_repo: Path) -> Iterator[PeerFactory]:
    started: list[TritonPeer] = []

    def start(repo: Path | None = None, load_models: Sequence[str] = (C.MODEL_NAME,), **kwargs: Any) -> TritonPeer:
        peer = TritonPeer(repo or triton_model_repo, load_models=load_models, venv=triton_venv, **kwargs)
        started.append(peer)
        return peer.start()

    yield start
    for peer in started:
        peer.close()


@pytest.fixture
def triton_repo_factory(tmp_path: Path, triton_onnx_path: Path) -> Callable[..., Path]:
    counter = iter(range(1_000_000))

    def make(model_name: str = C.MODEL_NAME, *, repo: Path | None = None, **kwargs: Any) -> Path:
        repo = repo or tmp_path / f"triton-repo-{next(counter)}"
        write_repository(repo, triton_onnx_path, model_name=model_name, **kwargs)
        return repo

    return make


@pytest.fixture
def triton_url_for() -> Callable[[TritonPeer, str], str]:
    def url_for(peer: TritonPeer, protocol: str) -> str:
        return peer.http_url if protocol == "http" else peer.grpc_url

    return url_for
