"""The Flower server and client: FedProx over gRPC, TLS when given certificates, every update HMAC-signed.

Flower's gRPC transport (``flwr.server.start_server`` / ``start_client``, grpc-bidi: one long-lived stream per
client) carries the weights. Who may take part: whoever holds the federation's shared key. The server signs the
global weights it sends (with the round), each client verifies them before training and signs its update (with
the round and its site name); the server drops an update whose signature does not verify, and the round goes on
without it. Flower's own node authentication and secure aggregation (SecAgg+) run only in its SuperLink /
SuperNode deployment, not on this transport (README, "Learning across sites").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelling.federated import net
from modelling.federated.sites import SiteArrays, digest

log = logging.getLogger(__name__)

KEY_ENV = "STROKEWATCH_FEDERATED_KEY"


def sign(key: bytes, arrays: list[np.ndarray], *context: object) -> str:
    """HMAC-SHA256 over the context (round, site) and every array's dtype, shape and bytes, in order."""
    mac = hmac.new(key, json.dumps([str(c) for c in context]).encode(), hashlib.sha256)
    for a in arrays:
        a = np.ascontiguousarray(a)
        mac.update(f"{a.dtype.str}{a.shape}".encode())
        mac.update(a.tobytes())
    return mac.hexdigest()


def verify(key: bytes, signature: object, arrays: list[np.ndarray], *context: object) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(key, arrays, *context))


@dataclass
class RoundLog:
    """What the server learnt of each round: per client its site, examples, loss, epsilon and data digest."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def make_strategy(
    key: bytes, initial: list[np.ndarray], n_clients: int, rounds: int, recipe: net.Recipe, dp_epsilon: float | None
) -> Any:
    """FedProx (Flower's: FedAvg's weighted mean of the updates, mu sent to the clients), signing and verifying."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedProx

    class SignedFedProx(FedProx):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(
                fraction_fit=1.0,
                fraction_evaluate=0.0,
                min_fit_clients=n_clients,
                min_evaluate_clients=0,
                min_available_clients=n_clients,
                initial_parameters=ndarrays_to_parameters(initial),
                proximal_mu=recipe.mu,
                accept_failures=True,
            )
            self.log = RoundLog()
            self.latest: list[np.ndarray] = initial

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            pairs = super().configure_fit(server_round, parameters, client_manager)
            arrays = parameters_to_ndarrays(parameters)
            config = {
                "server_round": server_round,
                "rounds": rounds,
                "local_epochs": recipe.local_epochs,
                "signature": sign(key, arrays, server_round),
                **({"dp_epsilon": float(dp_epsilon)} if dp_epsilon is not None else {}),
            }
            return [(client, FitIns(ins.parameters, {**ins.config, **config})) for client, ins in pairs]

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
            accepted, entries = [], []
            for proxy, res in results:
                arrays = parameters_to_ndarrays(res.parameters)
                site = str(res.metrics.get("site", "?"))
                entry = {k: v for k, v in res.metrics.items() if k != "signature"} | {"n": res.num_examples}
                if verify(key, res.metrics.get("signature"), arrays, server_round, site):
                    accepted.append((proxy, res))
                    entries.append(entry)
                else:
                    log.warning("round %d: update from site %r has no valid signature: dropped", server_round, site)
                    self.log.rejected.append({"round": server_round, **entry})
            for failure in failures:
                log.warning("round %d: a client failed: %s", server_round, failure)
            self.log.rounds.append({"round": server_round, "clients": entries})
            if len(accepted) < n_clients:
                log.warning("round %d: %d of %d updates accepted", server_round, len(accepted), n_clients)
            params, metrics = super().aggregate_fit(server_round, accepted, [])
            if params is not None:
                self.latest = parameters_to_ndarrays(params)
            return params, metrics

    return SignedFedProx()


def run_server(
    address: str,
    key: bytes,
    n_clients: int,
    rounds: int,
    recipe: net.Recipe,
    initial: list[np.ndarray],
    *,
    certificates: tuple[bytes, bytes, bytes] | None = None,
    dp_epsilon: float | None = None,
    round_timeout: float | None = 600.0,
) -> tuple[list[np.ndarray], RoundLog]:
    """Serve ``rounds`` FedProx rounds to ``n_clients`` clients; returns the final global weights and the log.
    ``certificates``: (CA certificate, server certificate, server key) PEM bytes: TLS; None: plaintext gRPC."""
    import flwr

    strategy = make_strategy(key, initial, n_clients, rounds, recipe, dp_epsilon)
    flwr.server.start_server(
        server_address=address,
        config=flwr.server.ServerConfig(num_rounds=rounds, round_timeout=round_timeout),
        strategy=strategy,
        certificates=certificates,
    )
    return strategy.latest, strategy.log


class SiteClient:
    """One site's participant: trains the global model on its own arrays, signs what it sends back."""

    def __init__(self, site: str, train: SiteArrays, base: Any, key: bytes, recipe: net.Recipe, seed: int) -> None:
        self.site, self.train, self.key, self.recipe, self.seed = site, train, key, recipe, seed
        self.model = net.fresh_model(base, seed)
        self.digest = digest(train)
        self.dp: net.DPState | None = None

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        server_round = int(config["server_round"])
        if not verify(self.key, config.get("signature"), parameters, server_round):
            raise PermissionError(f"round {server_round}: the global weights are not signed with the federation key")
        net.set_weights(self.model, parameters)
        epochs = int(config.get("local_epochs", self.recipe.local_epochs))
        mu = float(config.get("proximal_mu", self.recipe.mu))
        recipe = net.Recipe(**{**self.recipe.__dict__, "mu": mu})
        seed = self.seed * 1000 + server_round
        started = time.monotonic()
        metrics: dict[str, Any] = {"site": self.site, "data_digest": self.digest}
        if "dp_epsilon" in config:
            n = len(self.train["outcome"])
            if self.dp is None:  # the whole run's budget: every round's steps compose into one epsilon
                steps = int(config["rounds"]) * epochs * net.steps_per_epoch(n, recipe.batch_size)
                self.dp = net.DPState(net.noise_for(float(config["dp_epsilon"]), recipe, n, steps), [])
            metrics["epsilon"] = net.train_dp(
                self.model, self.train, epochs, recipe, seed, self.dp, global_weights=parameters
            )
            metrics["noise_multiplier"] = self.dp.noise_multiplier
        else:
            metrics["loss"] = net.train_local(self.model, self.train, epochs, recipe, seed, global_weights=parameters)
        metrics["seconds"] = round(time.monotonic() - started, 2)
        out = net.weights(self.model)
        metrics["signature"] = sign(self.key, out, server_round, self.site)
        return out, len(self.train["outcome"]), metrics

    def to_flower(self) -> Any:
        import flwr

        outer = self

        class _Client(flwr.client.NumPyClient):  # type: ignore[misc]
            def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
                return net.weights(outer.model)

            def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
                return outer.fit(parameters, config)

        return _Client().to_client()


def run_client(
    address: str,
    client: SiteClient,
    *,
    root_certificates: bytes | None = None,
    connect: Callable[..., Any] | None = None,
) -> None:
    """Connect to the server and take part until it ends the run. ``root_certificates``: the CA's PEM: TLS."""
    from flwr.compat.client.app import start_client

    (connect or start_client)(
        server_address=address,
        client=client.to_flower(),
        root_certificates=root_certificates,
        insecure=root_certificates is None,
        max_retries=30,
        max_wait_time=120.0,
    )


def read_key(path: Path | None) -> bytes:
    """The federation's shared key: the file's contents, else ``$STROKEWATCH_FEDERATED_KEY``; at least 32 bytes."""
    import os

    raw = path.read_bytes().strip() if path is not None else os.environ.get(KEY_ENV, "").encode()
    if len(raw) < 32:
        where = str(path) if path is not None else f"${KEY_ENV}"
        raise ValueError(
            f"the federation key ({where}) must be at least 32 bytes: every site and the server share it "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return raw
