"""Latency and throughput of the three ways to run the model, in one run on this machine:
embedded ONNX Runtime vs Triton over HTTP vs Triton over gRPC, at batch 1 and at contract.MAX_BATCH,
plus N concurrent batch-1 clients (where Triton's dynamic batching merges requests).

    .venv/bin/python bench/bench_triton.py [--iters 40] [--threads 2] [--clients 4]

Triton here is the CPU-only server of the nvidia-pytriton wheel, running the same model.onnx with
onnxruntime inside a python-backend model (sandbox/triton_pybackend.py); both runtimes get the same
number of intra-op threads. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference import contract as C  # noqa: E402
from inference.runtime import DEFAULT_MODEL_PATH, ModelInputs, OnnxRuntimeModel, TritonModel  # noqa: E402
from sandbox.triton import TritonPeer, ensure_venv  # noqa: E402
from sandbox.triton_pybackend import write_repository  # noqa: E402


def patients(n: int, seed: int = 0) -> list[ModelInputs]:
    rng = np.random.default_rng(seed)
    return [ModelInputs(**{s.name: rng.standard_normal(s.dims).astype(np.float32) for s in C.INPUTS}) for _ in range(n)]


def measure(predict: Callable[[Sequence[ModelInputs]], object], batch: list[ModelInputs], iters: int) -> list[float]:
    for _ in range(3):  # warm-up: connections, arenas, first-run allocations
        predict(batch)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - start)
    return times


def concurrent(
    predict: Callable[[Sequence[ModelInputs]], object], clients: int, iters: int
) -> tuple[list[float], float]:
    """Each client sends batch-1 requests back to back; returns (latencies, wall time)."""
    single = patients(1, seed=1)
    for _ in range(2):
        predict(single)
    latencies: list[float] = []

    def client(_: int) -> None:
        for _ in range(iters):
            start = time.perf_counter()
            predict(single)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies, time.perf_counter() - start


def row(name: str, batch: int, times: list[float], wall: float | None = None) -> str:
    ms = sorted(t * 1000 for t in times)
    p50 = statistics.median(ms)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    throughput = batch * len(times) / (wall if wall is not None else sum(times))
    return f"| {name:<42} | {batch:>5} | {p50:>8.1f} | {p95:>8.1f} | {throughput:>12.0f} |"


def triton_counts(peer: TritonPeer) -> tuple[int, int]:
    """(patients inferred, model executions) so far: fewer executions than requests = dynamic batching."""
    url = f"{peer.http_url}/v2/models/{C.MODEL_NAME}/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        stats = json.load(response)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def gpu_statement() -> str:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "A CUDA execution provider is available, but Triton here is CPU-only: GPU rows not measured."
    return "No GPU was available on this machine: every figure above is CPU-only; no GPU table was measured."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40, help="timed requests per row (MAX_BATCH rows: a quarter)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads, both runtimes")
    parser.add_argument("--clients", type=int, default=4, help="concurrent batch-1 clients")
    parser.add_argument("--onnx", type=Path, default=DEFAULT_MODEL_PATH)
    args = parser.parse_args()

    embedded = OnnxRuntimeModel(args.onnx, intra_op_threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        write_repository(tmp, args.onnx, intra_op_threads=args.threads)
        started = time.perf_counter()
        with TritonPeer(tmp, venv=ensure_venv()) as peer:
            startup = time.perf_counter() - started
            engines: list[tuple[str, Callable[[Sequence[ModelInputs]], object], Callable[[], object]]] = [
                ("embedded onnxruntime", embedded.predict, lambda: None)
            ]
            for protocol, url in (("http", peer.http_url), ("grpc", peer.grpc_url)):
                model = TritonModel(url, protocol=protocol)  # type: ignore[arg-type]
                engines.append((f"triton {protocol}", model.predict, model.close))
            lines: list[str] = []
            notes: list[str] = []
            for name, predict, _ in engines:
                lines.append(row(name, 1, measure(predict, patients(1), args.iters)))
                big = max(3, args.iters // 4)
                lines.append(row(name, C.MAX_BATCH, measure(predict, patients(C.MAX_BATCH), big)))
                before = triton_counts(peer)
                latencies, wall = concurrent(predict, args.clients, max(3, args.iters // args.clients))
                lines.append(row(f"{name}, {args.clients} clients x batch 1", 1, latencies, wall))
                if name.startswith("triton"):
                    done, executions = (now - then for now, then in zip(triton_counts(peer), before, strict=True))
                    notes.append(
                        f"{name}: {done} concurrent batch-1 requests ran in {executions} executions "
                        f"(dynamic batching, mean batch {done / max(1, executions):.1f})"
                    )
            for _, _, close in engines:
                close()

    print(
        f"\nmodel {embedded.model_version} ({args.onnx.name}), image input {np.prod(C.VOLUME_SHAPE) * 4 / 2**20:.1f} "
        f"MiB/patient, {args.threads} intra-op threads; Triton start-up {startup:.1f} s"
    )
    print(f"| {'runtime':<42} | batch | p50 (ms) | p95 (ms) | patients / s |")
    print(f"|{'-' * 44}|-------|----------|----------|--------------|")
    print("\n".join(lines))
    print("\n".join(notes))
    print(gpu_statement())


if __name__ == "__main__":
    main()
