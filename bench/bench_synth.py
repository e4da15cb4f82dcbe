"""Print how fast the synthetic cohort is generated: patients/second for make_arrays, seconds per DICOM study.

python bench/bench_synth.py [--n 100] [--workers 1] [--dicom 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from synth import generate_patient, make_arrays, write_dicom
from synth.anatomy import load_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dicom", type=int, default=2, help="DICOM studies to write")
    args = parser.parse_args()

    t0 = time.perf_counter()
    load_template()
    print(f"template load: {time.perf_counter() - t0:.2f} s")
    make_arrays(1, args.seed)  # warm-up (imports, torch init)

    wall, cpu = time.perf_counter(), time.process_time()
    arrays = make_arrays(args.n, args.seed, workers=args.workers)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"make_arrays: {args.n} patients in {wall:.1f} s wall ({args.n / wall:.1f} patients/s, "
        f"{args.workers} worker(s); parent CPU {cpu:.1f} s)"
    )
    print(f"  projected 2000 patients: {2000 * wall / args.n / 60:.1f} min")
    y, p = arrays.outcome, arrays.true_probability
    print(f"  prevalence {y.mean():.3f}, mean true probability {p.mean():.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        times, sizes = [], []
        for i in range(args.dicom):
            patient = generate_patient(args.seed, i)
            t = time.perf_counter()
            paths = write_dicom(patient, Path(tmp) / str(i))
            times.append(time.perf_counter() - t)
            sizes.append(sum(p.stat().st_size for p in paths) / 2**20)
        if times:
            print(f"write_dicom: median {np.median(times):.2f} s/study, {np.mean(sizes):.1f} MiB/study")


if __name__ == "__main__":
    main()
