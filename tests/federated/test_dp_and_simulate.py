"""DP-SGD's epsilon (central and composed over federated rounds) and the simulate command's JSON, on tiny sites."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelling.federated import net
from modelling.federated.sites import load_site, pool
from modelling.model import FusionModel
from tests.federated.conftest import N_TRAIN, SEED

ROOT = Path(__file__).resolve().parents[2]


def _train(site_caches: dict[str, Path], base: FusionModel) -> dict[str, np.ndarray]:
    parts = []
    for site, cache in site_caches.items():
        os.environ["STROKEWATCH_CACHE"] = str(cache)
        try:
            parts.append(load_site(site, N_TRAIN, SEED, base))
        finally:
            del os.environ["STROKEWATCH_CACHE"]
    return pool(parts)


def test_dp_sgd_reports_epsilon_within_target_and_keeps_the_lstm(
    base: FusionModel, site_caches: dict[str, Path]
) -> None:
    data = _train(site_caches, base)
    recipe = net.Recipe(rounds=3, batch_size=16)
    n = len(data["outcome"])
    steps = recipe.epochs * net.steps_per_epoch(n, recipe.batch_size)
    model = net.fresh_model(base, SEED)
    before = net.weights(model)
    state = net.DPState(net.noise_for(4.0, recipe, n, steps), [])
    spent = net.train_dp(model, data, recipe.epochs, recipe, SEED, state)
    assert state.noise_multiplier > 0.3
    assert 3.0 < spent <= 4.0 + 1e-6  # the accountant spends (nearly) the whole target, never more
    assert isinstance(model.vitals_branch.lstm, torch.nn.LSTM)  # type: ignore[union-attr]  # DPLSTM swapped back
    after = net.weights(model)
    assert all(a.shape == b.shape for a, b in zip(after, before, strict=True))
    assert max(float(np.abs(a - b).max()) for a, b in zip(after, before, strict=True)) > 1e-4
    # more noise, same steps: less epsilon
    quieter = net.DPState(state.noise_multiplier * 2, list(state.history))
    quieter.history = [(state.noise_multiplier * 2, q, s) for _, q, s in state.history]
    assert quieter.epsilon(recipe.delta) < spent


def test_federated_dp_composes_over_rounds(base: FusionModel, site_caches: dict[str, Path]) -> None:
    """A client's ledger over a federated run: each round's steps add up, ending at (not over) the target."""
    data = _train(site_caches, base)
    recipe = net.Recipe(rounds=3, batch_size=16)
    n = len(data["outcome"])
    steps = recipe.rounds * recipe.local_epochs * net.steps_per_epoch(n, recipe.batch_size)
    state = net.DPState(net.noise_for(8.0, recipe, n, steps), [])
    model = net.fresh_model(base, SEED)
    spent = []
    for r in range(recipe.rounds):
        weights = net.weights(model)
        spent.append(net.train_dp(model, data, 1, recipe, SEED + r, state, global_weights=weights))
    assert spent[0] < spent[1] < spent[2] <= 8.0 + 1e-6
    assert spent[2] > 6.0


@pytest.mark.slow
def test_simulate_prints_one_json_document(tmp_path: Path, site_caches: dict[str, Path]) -> None:
    cache = tmp_path / "cache"
    for site_cache in site_caches.values():  # the simulation reads every site (it scores them all)
        shutil.copytree(site_cache, cache, dirs_exist_ok=True)
    env = {**os.environ, "STROKEWATCH_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "modelling.federated", "simulate", "--sites", "2", "--n", str(N_TRAIN),
           "--n-test", str(N_TRAIN), "--rounds", "2", "--epsilons", "3", "8", "--seed", str(SEED), "--n-boot", "50",
           "--json"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one document, nothing else on stdout
    sites = result["settings"]["sites"]
    assert len(sites) == 2 and set(sites) == set(site_caches)
    models = result["models"]
    for name in ("central", "federated", "federated_personalised", "site_alone", "dp_federated"):
        assert set(models[name]["sites"]) == set(sites)
        overall = models[name]["overall"]
        assert overall["n"] == 2 * N_TRAIN
        assert 0.0 <= overall["auroc"] <= 1.0 and 0.0 <= overall["ece"] <= 1.0
        lo, hi = overall["auroc_ci"]
        assert lo <= overall["auroc"] <= hi
    assert [d["target_epsilon"] for d in models["dp_central"]] == [3.0, 8.0]
    assert all(d["epsilon"] <= d["target_epsilon"] + 1e-6 for d in models["dp_central"])
    assert all(0 < e <= 8.0 + 1e-6 for e in models["dp_federated"]["epsilon_by_site"].values())
    assert len(result["dp_curve"]) == 2
    assert set(result["leave_one_site_out"]) == set(sites)
    for held, row in result["leave_one_site_out"].items():
        assert held not in row["trained_on"]
        assert {"auroc", "auroc_ci", "calibration_slope", "calibration_intercept"} <= set(row)
    assert {"ci", "auroc"} <= set(result["federated_minus_central"])
    assert set(result["federated_vs_site_alone"]) == {*sites, "overall"}
    assert {"all", "female", "male", *(f"site {s}" for s in sites)} <= set(result["subgroups_federated"])
    assert {c["site"] for c in result["federated_rounds"]["clients"]} == set(sites)
    assert set(result["targets"]) >= {"federated_within_0.01_of_central", "dp_eps_le_8_within_0.03"}
    assert result["seconds"]["total"] > 0
