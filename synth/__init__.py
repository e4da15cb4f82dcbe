"""Synthetic cohort with known ground truth: head CT/MR, four weeks of vitals, and an outcome.

The generating process (anatomy, tissue values, findings, vitals processes, the outcome model and its
coefficients) is documented in ``synth/SYNTH.md``. The same patients come out three ways:
``make_arrays`` (training tensors via ``inference.preprocess``), ``write_dicom`` (real DICOM series) and
``fhir_resources`` / ``transaction_bundle`` (FHIR R4 Patient + vital-sign Observations).
"""

from synth.arrays import CohortArrays, make_arrays
from synth.dicom import write_dicom
from synth.fhir import fhir_resources, transaction_bundle
from synth.patient import SynthPatient, generate_patient, iter_cohort
from synth.sites import SITE_NAMES, SITES, Site, get_site

#: Bumped whenever the generating process changes what a (seed, index) patient looks like; caches of
#: generated cohorts should include it in their key.
SYNTH_VERSION = "3"  # 3: arrays carry per-kind finding labels and the risk factors (patients as in 2)

__all__ = [
    "SITES",
    "SITE_NAMES",
    "SYNTH_VERSION",
    "CohortArrays",
    "Site",
    "SynthPatient",
    "fhir_resources",
    "generate_patient",
    "get_site",
    "iter_cohort",
    "make_arrays",
    "transaction_bundle",
    "write_dicom",
]
