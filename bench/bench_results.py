"""What the results written back to the PACS cost, per step, on one synthetic head study (no peers: in-process).

    .venv/bin/python bench/bench_results.py [--runs 5] [--seed 7] [--patient 0] [--threads 1]

Steps, each the median of --runs: decoding and ordering the source series (``source_series``), building the model's
volume from it, the heat-map from the served lesion maps (one ONNX Runtime call) and by occlusion (what a model
without lesion maps gets: batched calls), rendering and building the heat-map's Secondary Capture images (all
slices), and building the SR. Storing (STOW-RS) is left out: it is the PACS's speed. It prints figures; it asserts
nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom


def median_s(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--patient", type=int, default=0, help="which patient of the synthetic cohort")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    import synth
    from inference.runtime import OnnxRuntimeModel
    from integration.domain.results import Driver, ReportFacts, heatmap_uids, report_uids
    from integration.services.heatmap import lesion_heatmap, occlusion_heatmap
    from integration.services.results import image_only_inputs
    from integration.services.results_dicom import heatmap_images, measurement_report, source_series

    patient = list(synth.iter_cohort(args.patient + 1, args.seed))[args.patient]
    model = OnnxRuntimeModel(intra_op_threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files = synth.write_dicom(patient, Path(tmp))
        datasets = [pydicom.dcmread(f) for f in files]
    axial = Counter(ds.SeriesInstanceUID for ds in datasets).most_common(1)[0][0]
    series = [ds for ds in datasets if ds.SeriesInstanceUID == axial]

    def decode() -> Any:
        return source_series([copy.deepcopy(ds) for ds in series])  # a fresh copy: decoding drops PixelData

    rows: list[tuple[str, float]] = []
    t, source = median_s(decode, args.runs)
    rows.append((f"decode + order {len(series)} slices of {series[0].Rows}x{series[0].Columns}", t))
    t, image = median_s(source.image_tensor, args.runs)
    rows.append(("model volume from the slices", t))
    inputs = image_only_inputs(image)

    def from_lesion_maps() -> Any:
        maps = model.lesion_maps([inputs])
        assert maps is not None, "the model serves no lesion_map"
        return lesion_heatmap(maps[0])

    t, heat = median_s(from_lesion_maps, args.runs)
    rows.append(("heat-map from the served lesion maps", t))
    t, _ = median_s(lambda: occlusion_heatmap(model, inputs), max(1, args.runs // 2))
    rows.append(("heat-map by occlusion (a model without lesion maps)", t))
    t, images = median_s(lambda: list(heatmap_images(source, heat, heatmap_uids("1.2", "1.2.3", "bench"),
                                                      description="bench", note="bench",
                                                      manufacturer="bench")), args.runs)
    rows.append((f"render + build {len(images)} Secondary Capture images", t))
    facts = ReportFacts("bench", 0.42, "high", "stroke_fusion", model.model_version, True,
                        [Driver("image", "brain imaging findings (+12 points)")])
    t, _ = median_s(lambda: measurement_report(facts, source, report_uids("bench"), description="bench",
                                               manufacturer="bench"),
                    args.runs)
    rows.append(("build the SR (TID 1500)", t))

    print(f"bench_results: synthetic patient {args.patient} (seed {args.seed}), {source.modality}, "
          f"median of {args.runs} runs, ONNX Runtime {args.threads} thread(s)")
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
