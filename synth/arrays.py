"""The cohort as training arrays, built with the engine's own preprocessing functions.

Images: the patient's head is rendered on a coarse grid over the same field of view as its DICOM series
(``patient.ARRAY_SIZE`` pixels of ``ARRAY_PIXEL_MM``) and turned into the contract tensor by
``inference.preprocess.volume_tensor``. Vitals: the raw EHR record is reduced to canonical samples
(``vitals.canonical_samples``: valid status, value present, UCUM conversion, plausibility, de-duplication)
and gridded by ``inference.preprocess.vitals_tensors``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from inference import contract as C
from inference import preprocess
from synth import patient as P
from synth.outcome import IMAGE_FACTORS, VITAL_FACTORS, image_factors, vital_factors
from synth.sites import get_site
from synth.vitals import canonical_samples

T_ = TypeVar("T_")


@dataclass
class CohortArrays:
    """Arrays keyed by the contract's input names, plus ground truth. N patients along axis 0."""

    image: np.ndarray  # (N, 1, D, H, W) float32
    image_present: np.ndarray  # (N, 1) float32
    vitals: np.ndarray  # (N, T, F) float32
    vitals_mask: np.ndarray  # (N, T, F) float32
    vitals_delta: np.ndarray  # (N, T, F) float32
    demographics: np.ndarray  # (N, 2) float32
    outcome: np.ndarray  # (N,) int64
    true_probability: np.ndarray  # (N,) float64, the generating model's probability
    image_only_probability: np.ndarray  # (N,) oracle given findings + age/sex (Monte Carlo over vitals)
    vitals_only_probability: np.ndarray  # (N,) oracle given vital traits + age/sex (Monte Carlo over findings)
    finding_label: np.ndarray  # (N, D, H, W) uint8, 0 none, else 1 + index in findings.FINDING_KINDS
    image_factors: (
        np.ndarray
    )  # (N, len(outcome.IMAGE_FACTORS)) float32, the image risk factors as the outcome uses them
    vital_factors: np.ndarray  # (N, len(outcome.VITAL_FACTORS)) float32, likewise the vital traits
    vitals_signal_mask: np.ndarray  # (N, T, F) bool, features/steps carrying planted vitals risk
    modality: np.ndarray  # (N,) str "CT" | "MR"
    patient_ids: np.ndarray  # (N,) str (the MRN)
    # Added after cohorts were first cached: a cache without them gets them from the fields above.
    age_years: np.ndarray | None = None  # (N,) float64, age at the window end (for subgroups)
    site: np.ndarray | None = None  # (N,) str, the synthetic centre ("" for the default cohort)

    def __post_init__(self) -> None:
        if self.age_years is None:
            self.age_years = self.demographics[:, 0].astype(np.float64) * C.AGE_STD + C.AGE_MEAN
        if self.site is None:
            self.site = np.full(len(self), "", dtype="<U16")

    def __len__(self) -> int:
        return int(self.outcome.shape[0])

    @property
    def male(self) -> np.ndarray:
        """(N,) bool, the patient is male (the demographics tensor's sex column)."""
        return np.asarray(self.demographics[:, 1] > 0.5)

    @property
    def finding_mask(self) -> np.ndarray:
        """(N, D, H, W) bool: voxels holding a planted finding of any kind."""
        return self.finding_label > 0

    def inputs(self) -> dict[str, np.ndarray]:
        """The model inputs only, keyed exactly as ``contract.INPUT_NAMES``."""
        return {name: getattr(self, name) for name in C.INPUT_NAMES}

    def subset(self, index: np.ndarray | slice) -> CohortArrays:
        return CohortArrays(**{k: v[index] for k, v in self.__dict__.items()})


@dataclass
class _One:
    image: np.ndarray
    vitals: tuple[np.ndarray, np.ndarray, np.ndarray]
    demographics: np.ndarray
    finding: np.ndarray  # (D, H, W) uint8 label map
    patient: P.SynthPatient


def patient_image_tensor(patient: P.SynthPatient) -> tuple[np.ndarray, np.ndarray]:
    """(image tensor (1, D, H, W) via preprocess.volume_tensor, finding label map (D, H, W) uint8)."""
    image_vol = patient.render_image(patient.acquisition(for_arrays=True))
    return preprocess.volume_tensor(image_vol, patient.modality), patient.finding_label()


def patient_vitals_tensors(patient: P.SynthPatient) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return preprocess.vitals_tensors(canonical_samples(patient.vitals))


def _build_one(args: tuple[int, int, str | None]) -> _One:
    seed, index, site = args
    p = P.generate_patient(seed, index, site)
    image, finding = patient_image_tensor(p)
    return _One(image, patient_vitals_tensors(p), preprocess.demographics_tensor(p.age_years, p.sex), finding, p)


def _init_worker() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _map_patients(
    build: Callable[[tuple[int, int, str | None]], T_],
    seed: int,
    indices: range,
    workers: int | None,
    site: str | None = None,
) -> list[T_]:
    """``build((seed, i, site))`` for every index, in order; in ``workers`` processes when that pays."""
    tasks = [(seed, i, site) for i in indices]
    workers = max(1, int(workers or 1))
    if workers > 1 and len(tasks) >= 2 * workers:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            return pool.map(build, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
    return [build(t) for t in tasks]


def make_arrays(
    n: int,
    seed: int,
    *,
    start: int = 0,
    image_dropout: float = 0.0,
    vitals_dropout: float = 0.0,
    workers: int | None = None,
    site: str | None = None,
) -> CohortArrays:
    """Patients ``start..start+n-1`` of cohort ``seed`` as arrays; from 0, the same patients as
    ``iter_cohort(n, seed)``.

    ``image_dropout``/``vitals_dropout``: probability that a patient's image (zeros, image_present 0) or
    whole vitals record (no samples) is withheld, drawn per patient from its own stream, so a patient is
    dropped consistently for a given rate. Ground truth is unaffected. ``workers``: processes (default 1;
    the work is CPU-bound numpy, so more than the free cores only slows everyone). ``site``: a synthetic
    centre's name (``synth.sites``), None for the default cohort.
    """
    st = get_site(site)
    ones = _map_patients(_build_one, seed, range(start, start + n), workers, None if st is None else st.name)

    T, F = C.N_STEPS, C.N_FEATURES
    image = np.zeros((n, 1, *C.VOLUME_SHAPE), dtype=np.float32)
    present = np.ones((n, 1), dtype=np.float32)
    vit = np.zeros((3, n, T, F), dtype=np.float32)
    empty_vitals = preprocess.vitals_tensors([])
    for i, one in enumerate(ones):
        drop = P.stream_rng(seed, start + i, P.STREAM_DROPOUT, st).random(2)
        if drop[0] < image_dropout:
            image[i] = preprocess.empty_image()
            present[i] = 0.0
        else:
            image[i] = one.image
        for k in range(3):
            vit[k, i] = empty_vitals[k] if drop[1] < vitals_dropout else one.vitals[k]
    pts = [o.patient for o in ones]
    labels = np.stack([o.finding for o in ones]) if ones else np.zeros((0, *C.VOLUME_SHAPE), np.uint8)
    return CohortArrays(
        image=image,
        image_present=present,
        vitals=vit[0],
        vitals_mask=vit[1],
        vitals_delta=vit[2],
        demographics=np.stack([o.demographics for o in ones]) if ones else np.zeros((0, 2), np.float32),
        outcome=np.asarray([p.outcome for p in pts], dtype=np.int64),
        true_probability=np.asarray([p.true_probability for p in pts], dtype=np.float64),
        image_only_probability=np.asarray([p.image_only_probability for p in pts], dtype=np.float64),
        vitals_only_probability=np.asarray([p.vitals_only_probability for p in pts], dtype=np.float64),
        finding_label=labels,
        image_factors=np.asarray([image_factors(p.findings) for p in pts], np.float32).reshape(n, len(IMAGE_FACTORS)),
        vital_factors=np.asarray([vital_factors(p.traits) for p in pts], np.float32).reshape(n, len(VITAL_FACTORS)),
        vitals_signal_mask=np.stack([p.vitals.signal_mask for p in pts]) if ones else np.zeros((0, T, F), bool),
        modality=np.asarray([p.modality for p in pts]),
        patient_ids=np.asarray([p.mrn for p in pts]),
        age_years=np.asarray([p.age_years for p in pts], dtype=np.float64),
        site=np.asarray([p.site or "" for p in pts], dtype="<U16"),
    )


@dataclass
class VitalsArrays:
    """The vital-sign side of patients ``start..start+n-1`` of a cohort (no images rendered): cheap, so the
    vitals branch can be taught on many more records than there are rendered volumes."""

    vitals: np.ndarray  # (N, T, F) float32
    vitals_mask: np.ndarray  # (N, T, F) float32
    vitals_delta: np.ndarray  # (N, T, F) float32
    demographics: np.ndarray  # (N, 2) float32
    outcome: np.ndarray  # (N,) int64
    vital_factors: np.ndarray  # (N, len(outcome.VITAL_FACTORS)) float32
    vitals_only_probability: np.ndarray  # (N,) float64

    def __len__(self) -> int:
        return int(self.outcome.shape[0])


def _build_vitals(
    args: tuple[int, int, str | None],
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, P.SynthPatient]:
    seed, index, site = args
    p = P.generate_patient(seed, index, site)
    return patient_vitals_tensors(p), preprocess.demographics_tensor(p.age_years, p.sex), p


def make_vitals_arrays(
    n: int, seed: int, *, start: int = 0, workers: int | None = None, site: str | None = None
) -> VitalsArrays:
    """Patients ``start..start+n-1`` of cohort ``seed`` (at ``site``): vitals tensors, demographics, outcome, traits.

    The same patients (same records, same outcomes) as ``make_arrays`` would give at those indices.
    """
    st = get_site(site)
    ones = _map_patients(_build_vitals, seed, range(start, start + n), workers, None if st is None else st.name)
    T, F = C.N_STEPS, C.N_FEATURES
    vit = np.stack([np.stack(o[0]) for o in ones], axis=1) if ones else np.zeros((3, 0, T, F), np.float32)
    pts = [o[2] for o in ones]
    return VitalsArrays(
        vitals=vit[0],
        vitals_mask=vit[1],
        vitals_delta=vit[2],
        demographics=np.stack([o[1] for o in ones]) if ones else np.zeros((0, 2), np.float32),
        outcome=np.asarray([p.outcome for p in pts], dtype=np.int64),
        vital_factors=np.asarray([vital_factors(p.traits) for p in pts], np.float32).reshape(n, len(VITAL_FACTORS)),
        vitals_only_probability=np.asarray([p.vitals_only_probability for p in pts], dtype=np.float64),
    )
