"""Pytest plugin: real sandbox peers, started once per test session (register via `pytest_plugins`).

Fixtures:
- `orthanc_peer`, `fhir_peer`: session-wide Orthanc (StableAge 1 s) and FHIR sandbox (test controls on).
- `fresh_orthanc_peer`, `fresh_fhir_peer`: the same peers, emptied (and faults cleared) before the test.

A peer that cannot start (Orthanc not installed, `npm ci --prefix deploy/fhir-sandbox` not run) is an
error, not a skip: CI must install them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import FhirPeer, OrthancPeer


@pytest.fixture(scope="session")
def peers_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="session")
def orthanc_peer(peers_workdir: Path) -> Iterator[OrthancPeer]:
    with OrthancPeer(peers_workdir / "orthanc", stable_age=1) as peer:
        yield peer


@pytest.fixture(scope="session")
def fhir_peer(peers_workdir: Path) -> Iterator[FhirPeer]:
    with FhirPeer(peers_workdir / "fhir", test_controls=True) as peer:
        yield peer


@pytest.fixture
def fresh_orthanc_peer(orthanc_peer: OrthancPeer) -> OrthancPeer:
    orthanc_peer.reset()
    return orthanc_peer


@pytest.fixture
def fresh_fhir_peer(fhir_peer: FhirPeer) -> Iterator[FhirPeer]:
    fhir_peer.reset()
    yield fhir_peer
    fhir_peer.clear_faults()  # a test that left a fault pending must not break the next one
