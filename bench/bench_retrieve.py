"""Retrieve + decode + preprocess a 160x512x512 CT from a real Orthanc: DicomWebPacs vs dicomweb-client.

    .venv/bin/python bench/bench_retrieve.py [--slices 160] [--size 512] [--repeats 5] [--syntax explicit|rle|j2k]

Starts its own Orthanc (sandbox.OrthancPeer) in a temporary directory, stores one synthetic
CT series, then times (median of --repeats, same process, alternating) the whole path to the model's
image tensor:

* engine:   DicomWebPacs.retrieve_series (httpx, own multipart split, in-place pixels) + volume_tensor
* baseline: dicomweb-client retrieve_series + pydicom pixel_array + rescale + volume_tensor

Prints figures and the ratio; asserts nothing about time (figures vary with the machine).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.preprocess import Slice, series_tensor, stack_slices, volume_tensor  # noqa: E402
from integration.adapters.dicomweb import DicomWebPacs  # noqa: E402
from sandbox import OrthancPeer  # noqa: E402

LABELS = {
    "engine_retrieve": "engine   DicomWebPacs.retrieve_series (HU slices)",
    "baseline_retrieve": "baseline dicomweb-client + pixel_array (HU slices)",
    "engine_full": "engine   ... + series_tensor (reduced per slice)",
    "baseline_full": "baseline ... + stack_slices + volume_tensor",
}
SYNTAXES = {"explicit": None, "rle": RLELossless, "j2k": JPEG2000Lossless}


def make_series(n: int, size: int, syntax: str) -> tuple[str, str, list[bytes]]:
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    blobs: list[bytes] = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.StudyDate, ds.Modality, ds.BodyPartExamined = "BENCH", "20240101", "CT", "HEAD"
        ds.InstanceNumber = n - k
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-size * 0.25, -size * 0.25, -80.0 + k * 1.0]
        ds.PixelSpacing = [0.5, 0.5]
        noise = rng.normal(0, 5, (size, size))
        pixels = np.where(head, 1024 + 35 + noise, 24 + noise).clip(0, 4095).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        if SYNTAXES[syntax] is not None:
            ds.compress(SYNTAXES[syntax])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    return study, series, blobs


def engine_path(pacs: DicomWebPacs, study: str, series: str) -> np.ndarray:
    modality, slices = pacs.retrieve_series(study, series)
    return series_tensor(slices, modality)  # what the engine's ingest runs


def baseline_slices(url: str, study: str, series: str) -> tuple[str, list[Slice]]:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url)
    datasets = client.retrieve_series(study, series)
    slices = [
        Slice(
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
            tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
            tuple(float(v) for v in ds.ImageOrientationPatient),  # type: ignore[arg-type]
            tuple(float(v) for v in ds.PixelSpacing),  # type: ignore[arg-type]
        )
        for ds in datasets
    ]
    return str(datasets[0].Modality), slices


def baseline_path(url: str, study: str, series: str) -> np.ndarray:
    modality, slices = baseline_slices(url, study, series)
    return volume_tensor(stack_slices(slices), modality)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=160)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--syntax", choices=sorted(SYNTAXES), default="explicit")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp, OrthancPeer(Path(tmp)) as peer:
        study, series, blobs = make_series(args.slices, args.size, args.syntax)
        with httpx.Client(timeout=60) as http:
            for blob in blobs:
                http.post(f"{peer.url}/instances", content=blob).raise_for_status()
        mib = sum(len(b) for b in blobs) / 2**20
        print(f"series: {args.slices} x {args.size}x{args.size} CT, {args.syntax}, {mib:.1f} MiB stored in Orthanc")

        from integration.bootstrap import quiet_dicom_validation

        quiet_dicom_validation()  # as every engine process reads DICOM (bootstrap); the baseline reads the same way
        with DicomWebPacs(peer.dicomweb_url) as pacs:
            pacs.reduce_planes = True  # as the engine runs it (bootstrap)
            ours = engine_path(pacs, study, series)  # warm-up, and the two paths must agree
            theirs = baseline_path(peer.dicomweb_url, study, series)
            np.testing.assert_allclose(ours, theirs, atol=1e-5)
            times: dict[str, list[float]] = {name: [] for name in LABELS}
            for _ in range(args.repeats):
                times["engine_retrieve"].append(timed(lambda: pacs.retrieve_series(study, series)))
                times["baseline_retrieve"].append(timed(lambda: baseline_slices(peer.dicomweb_url, study, series)))
                times["engine_full"].append(timed(lambda: engine_path(pacs, study, series)))
                times["baseline_full"].append(timed(lambda: baseline_path(peer.dicomweb_url, study, series)))

    median = {name: statistics.median(values) for name, values in times.items()}
    for name, label in LABELS.items():
        print(f"{label:58s} median {median[name] * 1e3:7.1f} ms  (min {min(times[name]) * 1e3:7.1f})")
    print(f"ratio baseline/engine: retrieve+decode {median['baseline_retrieve'] / median['engine_retrieve']:.2f}x, "
          f"with volume_tensor {median['baseline_full'] / median['engine_full']:.2f}x "
          f"({args.repeats} runs each, same process, interleaved)")


if __name__ == "__main__":
    main()
