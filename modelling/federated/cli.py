"""``python -m modelling.federated`` (``strokewatch federated``): server | client | simulate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

USAGE = """Learning across sites: Flower federated training (FedProx) and DP-SGD (Opacus).

A real federation: one server, one client per site, a shared key (>= 32 bytes) in a file or $STROKEWATCH_FEDERATED_KEY,
TLS certificates by path (or --insecure, for a loopback test only):

    strokewatch federated server --address 0.0.0.0:18650 --clients 3 --rounds 20 --key-file fed.key \\
        --tls-ca ca.pem --tls-cert server.pem --tls-key server.key --out fed-model/
    strokewatch federated client --site nordhaven --server fed.example.org:18650 --key-file fed.key --tls-ca ca.pem

Everything on one machine, the comparison as JSON (central, federated, site-alone, DP, leave-one-site-out):

    strokewatch federated simulate --sites 3 --json

Runs in .venv-federated (deploy/local/setup.sh --federated): .venv-federated/bin/strokewatch federated ...
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=20, help="initialisation, batch order, the sites' cohorts")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--dp-epsilon", type=float, default=None, help="DP-SGD at each client, this epsilon over the run")


def _key(args: argparse.Namespace) -> bytes:
    from modelling.federated.flower import read_key

    try:
        return read_key(args.key_file)
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")


def _tls_files(args: argparse.Namespace, names: tuple[str, ...]) -> list[bytes] | None:
    given = [getattr(args, n) for n in names]
    if all(g is None for g in given):
        if not args.insecure:
            flags = " ".join("--" + n.replace("_", "-") for n in names)
            sys.exit(f"error: give {flags} (TLS), or --insecure for plaintext gRPC (a loopback test only)")
        return None
    if any(g is None for g in given):
        sys.exit("error: TLS needs all of " + ", ".join("--" + n.replace("_", "-") for n in names))
    return [Path(g).read_bytes() for g in given]


def server(args: argparse.Namespace) -> None:
    import numpy as np

    from modelling.federated import net
    from modelling.federated.flower import run_server

    key = _key(args)
    certs = _tls_files(args, ("tls_ca", "tls_cert", "tls_key"))
    recipe = net.Recipe(rounds=args.rounds)
    base = net.shipped_model()
    initial = net.weights(net.fresh_model(base, args.seed))
    final, log = run_server(
        args.address,
        key,
        args.clients,
        args.rounds,
        recipe,
        initial,
        certificates=None if certs is None else (certs[0], certs[1], certs[2]),
        dp_epsilon=args.dp_epsilon,
    )
    if len(log.rounds) < args.rounds or any(not r["clients"] for r in log.rounds):
        sys.exit(f"error: the federation did not complete its {args.rounds} rounds ({len(log.rounds)} ran)")
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "global.npz", **{f"w{i}": w for i, w in enumerate(final)})  # type: ignore[arg-type]
    (args.out / "rounds.json").write_text(json.dumps({"rounds": log.rounds, "rejected": log.rejected}, indent=1))
    trained = net.fresh_model(base, args.seed)
    net.set_weights(trained, final)
    from modelling.model import save

    model = net.to_fusion_model(trained, base)
    model.cfg.info = {
        **model.cfg.info,
        "federated": {
            "rounds": args.rounds,
            "clients": args.clients,
            "sites": [c["site"] for c in log.rounds[-1]["clients"]],
            "dp_epsilon": args.dp_epsilon,
        },
    }
    save(model, args.out / "fusion")
    logging.getLogger(__name__).info("global model saved to %s (export: strokewatch model export)", args.out / "fusion")


def client(args: argparse.Namespace) -> None:
    from modelling.federated import net
    from modelling.federated.flower import SiteClient, run_client
    from modelling.federated.sites import load_export, load_site

    key = _key(args)
    certs = _tls_files(args, ("tls_ca",))
    base = net.shipped_model()
    # the site's own patients from its engine (`strokewatch training-set export`), else the synthetic centre
    train = load_export(args.data, base) if args.data is not None else load_site(args.site, args.n, args.seed, base)
    participant = SiteClient(args.site, train, base, key, net.Recipe(rounds=args.rounds), args.seed)
    run_client(args.server, participant, root_certificates=None if certs is None else certs[0])


def simulate(args: argparse.Namespace) -> None:
    from modelling.federated.simulate import simulate as run

    result = run(
        n_sites=args.sites,
        n=args.n,
        n_test=args.n_test,
        relative_sizes=args.relative_sizes,
        rounds=args.rounds,
        epsilons=tuple(args.epsilons),
        seed=args.seed,
        threads=args.threads,
        n_boot=args.n_boot,
        port_range=(args.port, args.port + 50),
        workers=args.workers,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        m = result["models"]
        print(
            f"central AUROC {m['central']['overall']['auroc']}, federated {m['federated']['overall']['auroc']} "
            f"(difference {result['federated_minus_central']}), targets {result['targets']}, "
            f"{result['seconds']['total']} s; --json for everything"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="strokewatch federated", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("server", help="serve FedProx rounds to the sites' clients")
    p.add_argument("--address", default="0.0.0.0:18650", help="HOST:PORT to listen on")
    p.add_argument("--clients", type=int, required=True, help="sites taking part in every round")
    p.add_argument("--out", type=Path, required=True, help="where the global model goes (<out>/fusion, global.npz)")
    p.add_argument(
        "--key-file", type=Path, default=None, help="the federation's shared key (else $STROKEWATCH_FEDERATED_KEY)"
    )
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM)")
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="server private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (loopback tests only)")
    _common(p)
    p.set_defaults(run=server)

    p = sub.add_parser("client", help="take part for one site")
    p.add_argument("--site", required=True,
                   help="this site's name (signed into its updates); without --data, a synthetic centre of synth.sites")
    p.add_argument("--data", type=Path, default=None,
                   help="train on this site's own patients: the file `strokewatch training-set export` wrote from "
                        "the engine's store (else the synthetic centre --site)")
    p.add_argument("--server", required=True, help="the server's HOST:PORT")
    p.add_argument("--n", type=int, default=600, help="the site's training patients")
    p.add_argument(
        "--key-file", type=Path, default=None, help="the federation's shared key (else $STROKEWATCH_FEDERATED_KEY)"
    )
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) the server's certificate is checked against")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (loopback tests only)")
    _common(p)
    p.set_defaults(run=client)

    p = sub.add_parser("simulate", help="all sites on one machine: central vs federated vs site-alone vs DP")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--n", type=int, default=600, help="training patients per site")
    p.add_argument("--n-test", type=int, default=400, help="unseen test patients per site")
    p.add_argument(
        "--relative-sizes",
        action="store_true",
        help="each site's training patients: --n x its relative size (synth.sites: 1.0, 0.6, 0.35); default all --n",
    )
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="DP-SGD targets (delta 1e-5)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--port", type=int, default=18650, help="first port tried for the Flower server (50 tried)")
    p.add_argument("--workers", type=int, default=1, help="processes generating a cohort the first time")
    p.add_argument("--json", action="store_true", help="print the whole comparison as one JSON document")
    _common(p)
    p.set_defaults(run=simulate)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "json", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import torch

    torch.set_num_threads(args.threads)
    args.run(args)
