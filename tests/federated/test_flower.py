"""A real Flower server and two site clients as processes over gRPC on 127.0.0.1, two rounds, tiny sites."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelling.federated import net
from modelling.federated.flower import KEY_ENV, SiteClient, sign, verify
from modelling.federated.simulate import free_port
from modelling.federated.sites import digest, load_site
from modelling.model import FusionModel, load
from tests.federated.conftest import N_TRAIN, SEED

ROOT = Path(__file__).resolve().parents[2]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "modelling.federated", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _finish(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Each process's exit code (4 minutes at most each); any still running after that is killed."""
    try:
        return [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _own_site(site: str, cache: Path, base: FusionModel) -> dict[str, np.ndarray]:
    """The site's training arrays as its client reads them, from its own cache directory."""
    os.environ["STROKEWATCH_CACHE"] = str(cache)
    try:
        return load_site(site, N_TRAIN, SEED, base)
    finally:
        del os.environ["STROKEWATCH_CACHE"]


def test_two_sites_two_rounds_over_grpc(tmp_path: Path, base: FusionModel, site_caches: dict[str, Path]) -> None:
    sites = list(site_caches)
    before = {s: sorted(p.name for p in site_caches[s].rglob("*.npz")) for s in sites}
    port = free_port(18650, 18700)
    env = {**os.environ, KEY_ENV: secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
    common = ["--seed", str(SEED), "--rounds", "2", "--threads", "1", "--insecure"]
    out = tmp_path / "server-out"
    procs = [
        _start(
            ["server", "--address", f"127.0.0.1:{port}", "--clients", "2", "--out", str(out), *common],
            env,
            tmp_path / "server.log",
        )
    ]
    for site in sites:  # each client sees only its own site's cache directory
        procs.append(
            _start(
                ["client", "--site", site, "--server", f"127.0.0.1:{port}", "--n", str(N_TRAIN), *common],
                {**env, "STROKEWATCH_CACHE": str(site_caches[site])},
                tmp_path / f"client-{site}.log",
            )
        )
    codes = _finish(procs)
    logs = {f.name: f.read_text()[-1500:] for f in tmp_path.glob("*.log")}
    assert codes == [0, 0, 0], logs

    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [1, 2] and rounds["rejected"] == []
    for r in rounds["rounds"]:
        # each update came from one site, trained on exactly that site's arrays
        by_site = {c["site"]: c for c in r["clients"]}
        assert set(by_site) == set(sites)
        for site in sites:
            own = _own_site(site, site_caches[site], base)
            assert by_site[site]["data_digest"] == digest(own)
            assert by_site[site]["n"] == N_TRAIN
    # no client built or read another site's cohort: its cache holds what it held before
    assert {s: sorted(p.name for p in site_caches[s].rglob("*.npz")) for s in sites} == before

    with np.load(out / "global.npz") as data:
        final = [data[f"w{i}"] for i in range(len(data.files))]
    initial = net.weights(net.fresh_model(base, SEED))
    assert len(final) == len(initial)
    assert all(f.shape == i.shape for f, i in zip(final, initial, strict=True))
    assert max(float(np.abs(f - i).max()) for f, i in zip(final, initial, strict=True)) > 1e-4
    # the global model is the shipped one with the federated vitals branch and head: it loads (and exports) alike
    model = load(out / "fusion")
    federated = model.cfg.info["federated"]
    assert isinstance(federated, dict) and sorted(federated["sites"]) == sorted(sites)
    assert model.image_branch is not None
    trained = net.fresh_model(base, SEED)
    net.set_weights(trained, final)
    assert base.image_branch is not None
    shipped_cnn = base.image_branch.state_dict()
    assert all(np.array_equal(v.numpy(), shipped_cnn[k].numpy()) for k, v in model.image_branch.state_dict().items())
    got, want = model.state_dict(), trained.state_dict()
    for name in net.trainable_names(trained):
        assert np.allclose(got[name].numpy(), want[name].numpy()), name


def test_tls_federation_and_refused_configurations(
    tmp_path: Path, base: FusionModel, site_caches: dict[str, Path]
) -> None:
    """Server certificate and key by path, the client checks the server's against the CA; without TLS flags or
    --insecure neither side starts, nor with a key under 32 bytes."""
    from tests.integration.test_tls import make_pki

    pki = make_pki(tmp_path / "pki")
    site, other = list(site_caches)
    port = free_port(18650, 18700)
    key = secrets.token_hex(32)
    env = {**os.environ, KEY_ENV: key, "PYTHONUNBUFFERED": "1"}
    common = ["--seed", str(SEED), "--rounds", "1", "--threads", "1"]
    out = tmp_path / "server-out"
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    server = _start(
        ["server", "--address", f"127.0.0.1:{port}", "--clients", "1", "--out", str(out), *tls, *common],
        env,
        tmp_path / "server.log",
    )
    client = ["client", "--server", f"127.0.0.1:{port}", "--n", str(N_TRAIN), "--tls-ca", str(pki.ca), *common]
    good = _start([*client, "--site", site], {**env, "STROKEWATCH_CACHE": str(site_caches[site])}, tmp_path / "a.log")
    procs = [server, good]
    codes = _finish(procs)
    logs = {f.name: f.read_text()[-1500:] for f in tmp_path.glob("*.log")}
    assert codes == [0, 0], logs
    rounds = json.loads((out / "rounds.json").read_text())
    assert [c["site"] for c in rounds["rounds"][0]["clients"]] == [site]

    # without TLS flags (and without --insecure) neither side starts
    done = subprocess.run(
        [sys.executable, "-m", "modelling.federated", "client", "--site", other, "--server", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "--insecure" in done.stderr
    short = subprocess.run(
        [sys.executable, "-m", "modelling.federated", "server", "--clients", "1", "--out", str(out), "--insecure"],
        cwd=ROOT, env={**env, KEY_ENV: "short"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert short.returncode != 0 and "at least 32 bytes" in short.stderr


def test_updates_are_signed_both_ways(base: FusionModel, site_caches: dict[str, Path]) -> None:
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    weights = net.weights(net.fresh_model(base, SEED))
    assert verify(key, sign(key, weights, 1, "a"), weights, 1, "a")
    assert not verify(other, sign(key, weights, 1, "a"), weights, 1, "a")
    assert not verify(key, sign(key, weights, 1, "a"), weights, 2, "a")  # a replayed round
    assert not verify(key, sign(key, weights, 1, "a"), weights, 1, "b")  # another site's name
    tampered = [w.copy() for w in weights]
    tampered[0].flat[0] += 1e-3
    assert not verify(key, sign(key, weights, 1, "a"), tampered, 1, "a")

    site = next(iter(site_caches))
    train = _own_site(site, site_caches[site], base)
    client = SiteClient(site, train, base, key, net.Recipe(rounds=1), SEED)
    config = {"server_round": 1, "rounds": 1, "local_epochs": 1, "proximal_mu": 0.01}
    with pytest.raises(PermissionError):  # global weights not signed with the federation key
        client.fit(weights, {**config, "signature": sign(other, weights, 1)})
    out, n, metrics = client.fit(weights, {**config, "signature": sign(key, weights, 1)})
    assert n == N_TRAIN and metrics["site"] == site
    assert verify(key, metrics["signature"], out, 1, site)


def test_a_client_trains_on_its_engines_training_set(tmp_path: Path, base: FusionModel,
                                                     site_caches: dict[str, Path]) -> None:
    """`client --data FILE`: the site's own patients as `strokewatch training-set export` writes them (the contract's
    input tensors, outcome, age, sex; no identifier) instead of a synthetic centre; the round uses exactly them."""
    from inference import contract as C
    from modelling.federated.sites import load_export
    from modelling.train.data import cohort_inputs, make_cohort

    site, other = list(site_caches)
    cohort = make_cohort(N_TRAIN, SEED, site=site, cache=False, workers=1)
    inputs = cohort_inputs(cohort)
    exported = tmp_path / "training-set.npz"
    np.savez(exported, **{name: inputs[name] for name in C.INPUT_NAMES},
             outcome=np.asarray(cohort.outcome, np.float32), age_years=np.asarray(cohort.age_years, np.float32),
             male=np.asarray(cohort.male, bool))
    arrays = load_export(exported, base)
    synthetic = _own_site(site, site_caches[site], base)
    for key in ("image_concepts", *net.FUSE_INPUTS, "outcome"):  # the same patients read either way
        np.testing.assert_allclose(arrays[key], synthetic[key], rtol=1e-5, atol=1e-6, err_msg=key)

    port = free_port(18650, 18700)
    env = {**os.environ, KEY_ENV: secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
    common = ["--seed", str(SEED), "--rounds", "1", "--threads", "1", "--insecure"]
    out = tmp_path / "server-out"
    procs = [
        _start(["server", "--address", f"127.0.0.1:{port}", "--clients", "2", "--out", str(out), *common], env,
               tmp_path / "server.log"),
        _start(["client", "--site", "here", "--data", str(exported), "--server", f"127.0.0.1:{port}", *common],
               {**env, "STROKEWATCH_CACHE": str(tmp_path / "no-cache")}, tmp_path / "client-here.log"),
        _start(["client", "--site", other, "--server", f"127.0.0.1:{port}", "--n", str(N_TRAIN), *common],
               {**env, "STROKEWATCH_CACHE": str(site_caches[other])}, tmp_path / "client-other.log"),
    ]
    codes = _finish(procs)
    assert codes == [0, 0, 0], {f.name: f.read_text()[-1500:] for f in tmp_path.glob("*.log")}
    (only,) = json.loads((out / "rounds.json").read_text())["rounds"]
    here = next(c for c in only["clients"] if c["site"] == "here")
    assert here["n"] == N_TRAIN and here["data_digest"] == digest(arrays)
    assert not (tmp_path / "no-cache").exists() or not any((tmp_path / "no-cache").rglob("*.npz"))

    bad = tmp_path / "bad.npz"
    np.savez(bad, **{name: inputs[name][:, :1] for name in C.INPUT_NAMES}, outcome=np.zeros(N_TRAIN, np.float32),
             age_years=np.zeros(N_TRAIN, np.float32), male=np.zeros(N_TRAIN, bool))
    with pytest.raises(ValueError, match="the contract's is"):
        load_export(bad, base)
