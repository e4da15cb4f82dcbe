"""Tiny sites for the federated tests: a few dozen patients each, built once per session (each in its own cache
directory, as each site's client would hold it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelling.federated import net
from modelling.federated.sites import TEST_START, load_site, site_names
from modelling.model import FusionModel

SEED = 5
N_TRAIN = 24
N_TEST = 24


@pytest.fixture(scope="session")
def base() -> FusionModel:
    torch.set_num_threads(1)
    return net.shipped_model()


@pytest.fixture(scope="session")
def site_caches(tmp_path_factory: pytest.TempPathFactory, base: FusionModel) -> dict[str, Path]:
    """Two sites, each with its training and test arrays in a cache directory of its own."""
    mp = pytest.MonkeyPatch()
    caches = {}
    try:
        for site in site_names()[:2]:
            cache = tmp_path_factory.mktemp(f"cache-{site}")
            mp.setenv("STROKEWATCH_CACHE", str(cache))
            load_site(site, N_TRAIN, SEED, base)
            load_site(site, N_TEST, SEED, base, start=TEST_START)
            caches[site] = cache
    finally:
        mp.undo()
    return caches
