"""Every site on one machine: central, federated, site-alone and DP models compared on the same unseen patients.

The federated model is trained by real processes: one Flower server and one client per site
(``python -m modelling.federated server|client``) over gRPC on 127.0.0.1, each client reading only its own site's
cached arrays. The other models are trained in this process with the same recipe (``net.Recipe``) from the same
seeded initialisation: central (pooled training patients), each site alone, DP-SGD on the pooled patients at
several epsilons, and leave-one-site-out (central training on the other sites). A DP federated run (sample-level
DP at each client, composed over all rounds) goes through Flower too. Everything is scored on each site's test
patients (``sites.TEST_START`` on), per site and pooled.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelling.calibrate import sigmoid
from modelling.config import BINARY_CONCEPTS, IMAGE_CONCEPTS
from modelling.federated import net
from modelling.federated.flower import KEY_ENV
from modelling.federated.sites import TEST_START, SiteArrays, load_site, pool, site_names
from modelling.model import FusionModel
from synth.sites import get_site

log = logging.getLogger(__name__)


def free_port(low: int, high: int) -> int:
    """The first port in [low, high) free on 127.0.0.1."""
    for port in range(low, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {low}..{high - 1}")


def scores(model: FusionModel, data: SiteArrays) -> np.ndarray:
    return sigmoid(net.predict_logits(model, data))


def evaluate(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """AUROC with its bootstrap CI, calibration and ECE (``modelling.validation.metrics``)."""
    from modelling.validation import metrics

    out: dict[str, Any] = _rounded(metrics(y, p, n_boot=n_boot, seed=seed))
    return out


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    if isinstance(value, float | np.floating):
        return round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


class Comparison:
    """Scores of every model on every site's test patients, and the figures drawn from them."""

    def __init__(self, tests: dict[str, SiteArrays], n_boot: int, seed: int) -> None:
        self.tests, self.n_boot, self.seed = tests, n_boot, seed
        self.probs: dict[str, dict[str, np.ndarray]] = {}

    def add(self, name: str, per_site: dict[str, np.ndarray]) -> dict[str, Any]:
        self.probs[name] = per_site
        sites = {s: evaluate(self.tests[s]["outcome"], p, self.n_boot, self.seed) for s, p in per_site.items()}
        y = np.concatenate([self.tests[s]["outcome"] for s in per_site])
        overall = evaluate(y, np.concatenate(list(per_site.values())), self.n_boot, self.seed)
        return {"overall": overall, "sites": sites}

    def add_model(self, name: str, model: FusionModel) -> dict[str, Any]:
        return self.add(name, {s: scores(model, t) for s, t in self.tests.items()})

    def difference(self, a: str, b: str, sites: list[str] | None = None) -> dict[str, Any]:
        """AUROC(a) - AUROC(b) on the test patients of ``sites`` (all, pooled, by default), with a paired bootstrap
        CI (both models scored on the same resamples: ``validation.bootstrap_ci`` over patient indices)."""
        from modelling.validation import auroc, bootstrap_ci

        sites = list(self.tests) if sites is None else sites
        y = np.concatenate([self.tests[s]["outcome"] for s in sites])
        pa = np.concatenate([self.probs[a][s] for s in sites])
        pb = np.concatenate([self.probs[b][s] for s in sites])

        def paired(y_: np.ndarray, rows: np.ndarray) -> float:
            i = rows.astype(np.int64)
            return auroc(y_, pa[i]) - auroc(y_, pb[i])

        ci = bootstrap_ci(y, np.arange(len(y)), paired, n_boot=self.n_boot, seed=self.seed)
        out: dict[str, Any] = _rounded({"auroc": auroc(y, pa) - auroc(y, pb), "ci": list(ci)})
        return out


def _concepts_from_factors(factors: np.ndarray) -> np.ndarray:
    """The synthetic truth of the image findings as the image branch's raw concepts (yes/no ones as logits)."""
    out = factors.astype(np.float32).copy()
    for k, name in enumerate(IMAGE_CONCEPTS):
        if name in BINARY_CONCEPTS:
            out[:, k] = np.where(factors[:, k] > 0.5, 6.0, -6.0)
    return out


def _training_size(site: str, n: int, relative: bool) -> int:
    centre = get_site(site)
    assert centre is not None
    return max(20, round(n * centre.relative_size)) if relative else n


def train_central(base: FusionModel, data: SiteArrays, recipe: net.Recipe, seed: int) -> FusionModel:
    model = net.fresh_model(base, seed)
    net.train_local(model, data, recipe.epochs, recipe, seed)
    return model


def run_federation(
    sites: dict[str, int],
    seed: int,
    recipe: net.Recipe,
    out_dir: Path,
    port_range: tuple[int, int],
    threads: int,
    dp_epsilon: float | None = None,
    timeout: float = 1800.0,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """One Flower server and a client per site (``sites``: name -> training patients) as separate processes on
    127.0.0.1; returns the final global weights and the server's round log."""
    import json

    port = free_port(*port_range)
    env = {**os.environ, KEY_ENV: secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "modelling.federated"]
    common = ["--seed", str(seed), "--threads", str(threads), "--rounds", str(recipe.rounds)]
    dp = ["--dp-epsilon", str(dp_epsilon)] if dp_epsilon is not None else []
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = []
    procs = []
    try:
        server_log = open(out_dir / "server.log", "w")  # noqa: SIM115 (closed below)
        logs.append(server_log)
        procs.append(
            subprocess.Popen(
                [
                    *cmd,
                    "server",
                    "--address",
                    f"127.0.0.1:{port}",
                    "--clients",
                    str(len(sites)),
                    "--insecure",
                    "--out",
                    str(out_dir),
                    *common,
                    *dp,
                ],
                env=env,
                stdout=server_log,
                stderr=subprocess.STDOUT,
            )
        )
        for site, n in sites.items():
            client_log = open(out_dir / f"client-{site}.log", "w")  # noqa: SIM115
            logs.append(client_log)
            procs.append(
                subprocess.Popen(
                    [
                        *cmd,
                        "client",
                        "--site",
                        site,
                        "--server",
                        f"127.0.0.1:{port}",
                        "--insecure",
                        "--n",
                        str(n),
                        *common,
                    ],
                    env=env,
                    stdout=client_log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout
        for role, proc in zip(["server", *sites], procs, strict=True):
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                tail = (out_dir / "server.log").read_text()[-2000:]
                raise RuntimeError(f"federated process ({role}) exited {rc}; server log:\n{tail}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs:
            f.close()
    with np.load(out_dir / "global.npz") as data:
        final = [data[f"w{i}"] for i in range(len(data.files))]
    return final, json.loads((out_dir / "rounds.json").read_text())


def simulate(
    n_sites: int = 3,
    n: int = 600,
    n_test: int = 400,
    relative_sizes: bool = False,
    rounds: int = 20,
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0),
    seed: int = 20,
    threads: int = 1,
    n_boot: int = 1000,
    port_range: tuple[int, int] = (18650, 18700),
    workers: int = 1,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    names = list(site_names())
    if not 2 <= n_sites <= len(names):
        raise ValueError(f"--sites must be 2..{len(names)} (the synthetic centres: {', '.join(names)})")
    sites = names[:n_sites]
    recipe = net.Recipe(rounds=rounds)
    base = net.shipped_model()
    t = time.monotonic()
    # quantity skew: each site's training patients in proportion to its size (``synth.sites.Site.relative_size``)
    sizes = {s: _training_size(s, n, relative_sizes) for s in sites}
    trains = {s: load_site(s, sizes[s], seed, base, workers=workers) for s in sites}
    tests = {s: load_site(s, n_test, seed, base, start=TEST_START, workers=workers) for s in sites}
    t = lap("data", t)
    pooled = pool(list(trains.values()))
    cmp = Comparison(tests, n_boot, seed)
    models: dict[str, Any] = {}

    central = train_central(base, pooled, recipe, seed)
    models["central"] = cmp.add_model("central", central)
    t = lap("central", t)

    alone = {s: train_central(base, trains[s], recipe, seed) for s in sites}
    models["site_alone"] = cmp.add("site_alone", {s: scores(alone[s], tests[s]) for s in sites})
    t = lap("site_alone", t)

    with tempfile.TemporaryDirectory(prefix="strokewatch-federated-") as tmp:
        final, round_log = run_federation(sizes, seed, recipe, Path(tmp) / "fedprox", port_range, threads)
        federated = net.fresh_model(base, seed)
        net.set_weights(federated, final)
        models["federated"] = cmp.add_model("federated", federated)
        t = lap("federated", t)

        personal = {}
        for s in sites:
            model = net.fresh_model(base, seed)
            net.set_weights(model, final)
            net.train_local(
                model, trains[s], recipe.personal_epochs, recipe, seed + 1, global_weights=final, lr=recipe.personal_lr
            )
            personal[s] = scores(model, tests[s])
        models["federated_personalised"] = cmp.add("federated_personalised", personal)
        t = lap("personalised", t)

        dp_central = []
        n_pooled = len(pooled["outcome"])
        steps = recipe.epochs * net.steps_per_epoch(n_pooled, recipe.batch_size)
        for eps in sorted(epsilons):
            model = net.fresh_model(base, seed)
            state = net.DPState(net.noise_for(eps, recipe, n_pooled, steps), [])
            spent = net.train_dp(model, pooled, recipe.epochs, recipe, seed, state)
            entry = cmp.add_model(f"dp_central_eps{eps:g}", model)
            dp_central.append(
                {
                    "target_epsilon": eps,
                    "epsilon": round(spent, 3),
                    "noise_multiplier": round(state.noise_multiplier, 4),
                    **entry,
                }
            )
        models["dp_central"] = dp_central
        t = lap("dp_central", t)

        dp_fed_eps = max([e for e in epsilons if e <= 8.0] or [8.0])
        dp_final, dp_log = run_federation(
            sizes, seed, recipe, Path(tmp) / "dp", port_range, threads, dp_epsilon=dp_fed_eps
        )
        dp_fed = net.fresh_model(base, seed)
        net.set_weights(dp_fed, dp_final)
        spent_by_site = {c["site"]: c.get("epsilon") for c in dp_log["rounds"][-1]["clients"]}
        models["dp_federated"] = {
            "target_epsilon": dp_fed_eps,
            "epsilon_by_site": _rounded(spent_by_site),
            **cmp.add_model("dp_federated", dp_fed),
        }
        t = lap("dp_federated", t)

    loso = {}
    for held in sites:
        others = [s for s in sites if s != held]
        model = train_central(base, pool([trains[s] for s in others]), recipe, seed)
        loso[held] = {
            "trained_on": others,
            "training": "central (pooled) on the other sites",
            **evaluate(tests[held]["outcome"], scores(model, tests[held]), n_boot, seed),
        }
    t = lap("leave_one_site_out", t)

    # what the frozen CNN costs: the same central training with the image concepts replaced by the synthetic truth
    # of the findings (what a perfect image branch would read: a ceiling), and with no image at all
    def variant(data: SiteArrays, how: str) -> SiteArrays:
        out = dict(data)
        if how == "truth":
            out["image_concepts"] = _concepts_from_factors(data["image_factors"])
        else:
            out["image_present"] = np.zeros_like(data["image_present"])
        return out

    frozen = {"cnn_concepts_auroc": models["central"]["overall"]["auroc"]}
    for how, key in (("truth", "true_findings_auroc"), ("none", "no_image_auroc")):
        model = train_central(base, variant(pooled, how), recipe, seed)
        y = np.concatenate([tests[s]["outcome"] for s in sites])
        p = np.concatenate([scores(model, variant(tests[s], how)) for s in sites])
        frozen[key] = evaluate(y, p, n_boot, seed)["auroc"]
    t = lap("frozen_cnn", t)

    from modelling.validation import group_report, subgroups

    test_pool = pool([tests[s] for s in sites])
    site_of = np.concatenate([np.full(len(tests[s]["outcome"]), s) for s in sites])
    groups = subgroups(test_pool["age_years"], test_pool["male"], site_of)
    fed_p = np.concatenate([cmp.probs["federated"][s] for s in sites])
    subgroup_table = _rounded(group_report(test_pool["outcome"], fed_p, groups, n_boot=n_boot, seed=seed, min_n=30))
    lap("subgroups", t)

    fed_vs_alone = {
        s: {
            "site_alone": models["site_alone"]["sites"][s]["auroc"],
            "federated": models["federated"]["sites"][s]["auroc"],
            "federated_personalised": models["federated_personalised"]["sites"][s]["auroc"],
        }
        for s in sites
    }
    for s, row in fed_vs_alone.items():
        row["federated_minus_alone"] = round(row["federated"] - row["site_alone"], 4)
        row["personalised_minus_alone"] = round(row["federated_personalised"] - row["site_alone"], 4)
        row["federated_minus_alone_ci"] = cmp.difference("federated", "site_alone", [s])["ci"]
    fed_vs_alone["overall"] = cmp.difference("federated", "site_alone")
    nonprivate = models["central"]["overall"]["auroc"]
    curve = [
        {
            "epsilon": d["epsilon"],
            "auroc": d["overall"]["auroc"],
            "ece": d["overall"]["ece"],
            "auroc_minus_nonprivate": round(d["overall"]["auroc"] - nonprivate, 4),
        }
        for d in dp_central
    ]
    fed_minus_central = cmp.difference("federated", "central")
    timings["total"] = round(time.monotonic() - started, 1)
    return {
        "settings": {
            "sites": sites,
            "n_train_per_site": sizes,
            "n_test_per_site": n_test,
            "rounds": rounds,
            "local_epochs": recipe.local_epochs,
            "central_and_site_alone_epochs": recipe.epochs,
            "strategy": f"FedProx (mu {recipe.mu}), Flower {_flwr_version()}, gRPC on 127.0.0.1, HMAC-signed updates",
            "trained": "vitals branch (LSTM, projection, concept head), fusion head; image branch: shipped CNN, frozen",
            "dp": f"DP-SGD (Opacus, RDP accountant), delta {recipe.delta}, clip {recipe.max_grad_norm}; federated: "
            "sample-level DP at each client, composed over all rounds",
            "seed": seed,
            "threads": threads,
            "n_boot": n_boot,
        },
        "models": models,
        "federated_minus_central": fed_minus_central,
        "federated_vs_site_alone": fed_vs_alone,
        "dp_curve": curve,
        "leave_one_site_out": loso,
        "frozen_cnn": frozen,
        "subgroups_federated": subgroup_table,
        "federated_rounds": round_log["rounds"][-1],
        "targets": {
            "federated_within_0.01_of_central": abs(fed_minus_central["auroc"]) <= 0.01,
            "federated_beats_site_alone_everywhere": all(fed_vs_alone[s]["federated_minus_alone"] > 0 for s in sites),
            "personalised_beats_site_alone_everywhere": all(
                fed_vs_alone[s]["personalised_minus_alone"] > 0 for s in sites
            ),
            "dp_eps_le_8_within_0.03": any(c["epsilon"] <= 8.0 and c["auroc_minus_nonprivate"] >= -0.03 for c in curve),
        },
        "seconds": timings,
    }


def _flwr_version() -> str:
    import flwr

    return str(flwr.__version__)
