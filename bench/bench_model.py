"""Benchmark: batch-1 latency of the shipped model in ONNX Runtime (CPU) and in torch eager, same run.

    .venv/bin/python bench/bench_model.py [--runs 5 --iters 30 --threads 2]

Prints, per engine, the median over ``--runs`` rounds of the per-round median latency, the ratio
torch / ONNX Runtime, batch-8 throughput, and the model file size. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import contract as C  # noqa: E402
from inference.runtime import DEFAULT_MODEL_PATH  # noqa: E402


def feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {s.name: rng.standard_normal((batch, *s.dims)).astype(np.float32) for s in C.INPUTS}
    out["image_present"][:] = 1.0
    out["vitals_mask"] = (out["vitals_mask"] > 0).astype(np.float32)
    return out


def median_ms(fn: Callable[[], object], runs: int, iters: int) -> tuple[float, list[float]]:
    for _ in range(5):  # warm-up: allocator, thread pool, first-call graph work
        fn()
    rounds = []
    for _ in range(runs):
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        rounds.append(statistics.median(times))
    return statistics.median(rounds), rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from modelling.export import DEFAULT_WEIGHTS_DIR, untrained_model
    from modelling.model import CalibratedModel, load

    torch.set_num_threads(args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model), sess_options=opts, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    trained = meta.get("strokewatch.trained") == "true"
    torch_model = CalibratedModel(load(DEFAULT_WEIGHTS_DIR) if trained else untrained_model()).eval()

    one, eight = feeds(1), feeds(8)
    names = list(C.OUTPUT_NAMES)
    ort_ms, ort_rounds = median_ms(lambda: session.run(names, one), args.runs, args.iters)
    t_one = [torch.from_numpy(one[n]) for n in C.INPUT_NAMES]
    t_eight = [torch.from_numpy(eight[n]) for n in C.INPUT_NAMES]
    with torch.no_grad():
        torch_ms, torch_rounds = median_ms(lambda: torch_model(*t_one), args.runs, args.iters)
        torch8_ms, _ = median_ms(lambda: torch_model(*t_eight), max(1, args.runs // 2), max(5, args.iters // 3))
    ort8_ms, _ = median_ms(lambda: session.run(names, eight), max(1, args.runs // 2), max(5, args.iters // 3))

    size_mb = args.model.stat().st_size / 1e6
    print(f"model: {args.model} ({size_mb:.2f} MB, trained={trained}, version {meta.get('strokewatch.model_version')})")
    print(f"threads: {args.threads}; {args.runs} rounds x {args.iters} calls; median of per-round medians")
    print(f"onnxruntime CPU batch 1: {ort_ms:7.2f} ms   rounds {[round(r, 2) for r in ort_rounds]}")
    print(f"torch eager CPU batch 1: {torch_ms:7.2f} ms   rounds {[round(r, 2) for r in torch_rounds]}")
    print(f"ratio torch / onnxruntime (batch 1): {torch_ms / ort_ms:.2f}x")
    print(
        f"batch 8: onnxruntime {ort8_ms:.2f} ms ({8000 / ort8_ms:.0f} patients/s), "
        f"torch {torch8_ms:.2f} ms ({8000 / torch8_ms:.0f} patients/s)"
    )
    print(
        f"target: onnxruntime batch-1 median <= 30 ms: {'met' if ort_ms <= 30 else 'NOT met'}; "
        f"file <= 20 MB: {'met' if size_mb <= 20 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
