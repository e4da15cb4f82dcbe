"""The tensor contract of the StrokeWatch fusion model.

This module is the ONLY place that defines what goes into and comes out of the model:
tensor names, shapes, dtypes, the vitals feature order (LOINC), the time grid, the volume
grid, normalisation constants, the prediction horizon and the model version.
Preprocessing, training, ONNX export, ``triton_models/stroke_fusion/config.pbtxt`` and
both runtimes (ONNX Runtime in-process, Triton) read it; a test fails if they disagree.

Everything here is plain data (no numpy/torch import) so any layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "stroke_fusion"
#: Semantic version of the trained network + its preprocessing. Bump on any change here.
MODEL_VERSION = "0.6.0"
#: Version directory in the Triton model repository (``triton_models/stroke_fusion/<n>/``).
TRITON_MODEL_VERSION = 1
MAX_BATCH = 32

#: What the model predicts: SNOMED CT 230690007 |Cerebrovascular accident| within the horizon.
OUTCOME_SYSTEM = "http://snomed.info/sct"
OUTCOME_CODE = "230690007"
OUTCOME_DISPLAY = "Cerebrovascular accident"
HORIZON_DAYS = 90

# --------------------------------------------------------------------------------------
# Image branch: one brain volume resampled onto a fixed physical grid, centred on the
# centre of the acquired volume, axes ordered (z, y, x) in the patient (LPS) frame.
# --------------------------------------------------------------------------------------
VOLUME_SHAPE: tuple[int, int, int] = (32, 64, 64)  # (D, H, W) voxels
VOLUME_SPACING_MM: tuple[float, float, float] = (5.0, 3.5, 3.5)  # (z, y, x): 160 x 224 x 224 mm

#: CT: Hounsfield units clipped to a brain window, then scaled to roughly [-1, 1].
CT_WINDOW_HU: tuple[float, float] = (-40.0, 120.0)  # (low, high) -> (-1, 1); bone saturates
#: MR: robust z-score inside the head (values at the 1st..99th percentile), then clipped.
MR_CLIP_Z = 5.0
#: Value outside the acquired field of view after normalisation (air / no data).
VOLUME_PAD_VALUE = -1.0

# --------------------------------------------------------------------------------------
# Vitals branch: a regular time grid ending at the assessment time ("window end").
# --------------------------------------------------------------------------------------
WINDOW_HOURS = 28 * 24  # four weeks of history
STEP_HOURS = 8
N_STEPS = WINDOW_HOURS // STEP_HOURS  # 84


@dataclass(frozen=True)
class VitalFeature:
    """One vitals channel: which LOINC codes feed it, its canonical UCUM unit, how it is scaled."""

    key: str
    loinc: tuple[str, ...]  # first code is the canonical one
    unit: str  # canonical UCUM unit after normalisation
    mean: float  # normalisation: (value - mean) / std
    std: float
    plausible: tuple[float, float]  # values outside are rejected as implausible (canonical unit)
    display: str


VITAL_FEATURES: tuple[VitalFeature, ...] = (
    VitalFeature("sbp", ("8480-6",), "mm[Hg]", 132.0, 22.0, (50.0, 300.0), "Systolic blood pressure"),
    VitalFeature("dbp", ("8462-4",), "mm[Hg]", 82.0, 12.0, (20.0, 200.0), "Diastolic blood pressure"),
    VitalFeature("hr", ("8867-4",), "/min", 76.0, 13.0, (20.0, 250.0), "Heart rate"),
    VitalFeature("rr", ("9279-1",), "/min", 16.0, 3.5, (4.0, 70.0), "Respiratory rate"),
    VitalFeature("spo2", ("59408-5", "2708-6"), "%", 96.5, 2.0, (50.0, 100.0), "Oxygen saturation"),
    VitalFeature("temp", ("8310-5",), "Cel", 36.8, 0.45, (30.0, 43.0), "Body temperature"),
    VitalFeature("glucose", ("2339-0", "15074-8"), "mg/dL", 105.0, 30.0, (20.0, 1000.0), "Glucose"),
    VitalFeature("bmi", ("39156-5",), "kg/m2", 27.0, 5.0, (10.0, 80.0), "Body mass index"),
)
N_FEATURES = len(VITAL_FEATURES)
FEATURE_INDEX: dict[str, int] = {f.key: i for i, f in enumerate(VITAL_FEATURES)}
#: BP panels whose components carry systolic/diastolic (8480-6 / 8462-4).
BP_PANEL_LOINC: tuple[str, ...] = ("85354-9", "55284-4")

# --------------------------------------------------------------------------------------
# Static inputs: age and sex.
# --------------------------------------------------------------------------------------
AGE_MEAN = 65.0
AGE_STD = 15.0
#: demographics = [(age - AGE_MEAN) / AGE_STD, sex]; sex 1 male, 0 female, 0.5 unknown/other.
N_DEMOGRAPHICS = 2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch axis
    dtype: str  # numpy dtype name; Triton/ONNX types are derived from it
    doc: str


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("image", (1, *VOLUME_SHAPE), "float32", "normalised volume; zeros when absent"),
    TensorSpec("image_present", (1,), "float32", "1 if an image was supplied, else 0"),
    TensorSpec("vitals", (N_STEPS, N_FEATURES), "float32", "normalised, forward-filled values"),
    TensorSpec("vitals_mask", (N_STEPS, N_FEATURES), "float32", "1 where a value was observed in the step"),
    TensorSpec("vitals_delta", (N_STEPS, N_FEATURES), "float32", "time since last observation / window"),
    TensorSpec("demographics", (N_DEMOGRAPHICS,), "float32", "[(age-mean)/std, sex]"),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("probability", (1,), "float32", "calibrated probability of the outcome within the horizon"),
    TensorSpec("logit", (1,), "float32", "calibrated logit (temperature and bias applied)"),
)
INPUT_NAMES: tuple[str, ...] = tuple(t.name for t in INPUTS)
OUTPUT_NAMES: tuple[str, ...] = tuple(t.name for t in OUTPUTS)

#: What ``logit_terms`` holds, in order: the calibrated logit of the reference patient (the average patient of
#: this patient's presence pattern), then the exact contribution of each input group: the image, each vital sign's
#: history (``VITAL_FEATURES`` keys), the demographics. They sum to ``logit``.
LOGIT_TERMS: tuple[str, ...] = ("reference", "image", *(f.key for f in VITAL_FEATURES), "demographics")
#: Outputs a model serves when it can, beside ``OUTPUTS``; the runtimes request them only from a model that
#: declares them, so a model without them is still served. ``logit_terms``: models whose head is additive in its
#: input groups (the logistic fusion head since 0.6.0); the engine names the drivers of a score from them without
#: another forward pass, and by occlusion (one more batched call) for a model that does not serve them.
#: ``lesion_map``: the image branch's lesion-probability maps, from which its image concepts are read; the engine
#: draws the heat-map of the results in the PACS from them (by occlusion for a model that does not serve them).
#: The kinds of finding the image branch maps (channels of ``lesion_map``), as ``modelling.config.LESION_KINDS``.
LESION_KINDS: tuple[str, ...] = ("lacune", "wmd", "infarct", "hyperdense_vessel")
#: The lesion maps' grid: half the volume grid, each cell covering 2 x 2 x 2 contract voxels.
LESION_MAP_SHAPE: tuple[int, int, int] = (VOLUME_SHAPE[0] // 2, VOLUME_SHAPE[1] // 2, VOLUME_SHAPE[2] // 2)
OPTIONAL_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("logit_terms", (len(LOGIT_TERMS),), "float32", "the logit as reference + each input's contribution"),
    TensorSpec("lesion_map", (len(LESION_KINDS), *LESION_MAP_SHAPE), "float32",
               "per kind of finding, the probability of it at each half-resolution voxel (what the image path reads)"),
)
OPTIONAL_OUTPUT_NAMES: tuple[str, ...] = tuple(t.name for t in OPTIONAL_OUTPUTS)
#: Optional outputs a runtime asks for only when a caller wants them (``lesion_maps``), never while scoring: the
#: lesion maps are 64k floats per patient, needed only for the heat-map of the results written to the PACS.
ON_REQUEST_OUTPUTS: tuple[str, ...] = ("lesion_map",)

_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
_KSERVE_DTYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64"}


def triton_dtype(spec: TensorSpec) -> str:
    """The config.pbtxt data_type for a tensor (e.g. ``TYPE_FP32``)."""
    return _TRITON_DTYPES[spec.dtype]


def kserve_dtype(spec: TensorSpec) -> str:
    """The KServe v2 / tritonclient datatype string for a tensor (e.g. ``FP32``)."""
    return _KSERVE_DTYPES[spec.dtype]


def input_spec(name: str) -> TensorSpec:
    for spec in INPUTS:
        if spec.name == name:
            return spec
    raise KeyError(name)


def output_spec(name: str) -> TensorSpec:
    for spec in (*OUTPUTS, *OPTIONAL_OUTPUTS):
        if spec.name == name:
            return spec
    raise KeyError(name)
