"""The fusion network's configuration and vocabulary: what each branch learns to name, and where it looks.

``FusionConfig`` is saved as JSON beside the weights (``modelling.model.save``); it alone rebuilds the
network. Tensor sizes default to ``inference.contract``'s; nothing here hard-codes a shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from inference import contract as C

Variant = Literal["fusion", "image", "vitals"]
VARIANTS: tuple[Variant, ...] = ("fusion", "image", "vitals")
#: What the image branch learns to recognise (the order of its concept outputs): lacune count (capped at 4),
#: white-matter disease grade (0-3), old territorial infarct, hyperdense vessel sign.
IMAGE_CONCEPTS: tuple[str, ...] = ("lacunes", "wmd_grade", "territorial", "hyperdense_vessel")
#: What the vitals branch learns to recognise: SBP level, SBP lability, rising SBP, atrial fibrillation,
#: glycaemia (each as a z-score or rate; see synth/SYNTH.md).
VITAL_CONCEPTS: tuple[str, ...] = ("sbp_z", "lability_z", "rising_trend", "af", "glucose_z")
#: Concepts that are yes/no: their heads give logits, passed on as probabilities; the rest are regressions.
BINARY_CONCEPTS = frozenset({"territorial", "hyperdense_vessel", "af"})
#: The input each concept is read from, as the engine names it (``inference.contract.LOGIT_TERMS``): the image
#: concepts from the image; the SBP concepts (level, lability, trend) from the systolic pressure history, AF from the
#: heart rate's (an irregular rate), glycaemia from the glucose history. The logistic head's ``logit_terms`` credit
#: each concept's contribution to this input (``LogisticHead.terms``).
CONCEPT_INPUTS: dict[str, str] = {
    **dict.fromkeys(IMAGE_CONCEPTS, "image"),
    "sbp_z": "sbp",
    "lability_z": "sbp",
    "rising_trend": "sbp",
    "af": "hr",
    "glucose_z": "glucose",
}
#: Kinds of lesion the lesion map separates (its channels), as labelled in the training data; the contract's, since
#: the exported model serves the map (``C.LESION_KINDS``, optional output ``lesion_map``).
LESION_KINDS: tuple[str, ...] = C.LESION_KINDS
#: Small, countable findings that the full-resolution spot detector maps (its channels); a subset of LESION_KINDS.
SPOT_KINDS: tuple[str, ...] = ("lacune", "hyperdense_vessel")
#: Where the spot detector looks: (z, y, x) voxel ranges [start, stop) of the contract grid, a box around the
#: deep grey nuclei, internal capsules, corona radiata and the M1 segments of both middle cerebral arteries
#: (about the grid centre: 61 mm right to 65 mm left, 68 mm anterior to 40 mm posterior, 47 mm below to 58 mm
#: above). Every lacune and vessel sign of the 2,000-patient training cohort lies at least two slices and three
#: voxels inside it; of 600 patients of another seed the nearest comes within one slice of its top
#: (``tests/unit/test_model.py`` checks those). A finding outside it (a brainstem or cerebellar lacune, which
#: the generator does not plant) would be seen by the lesion map only.
#: Running the detector on this box, not the whole volume, keeps the full-resolution path inside the latency
#: budget: it holds a fifth of the voxels.
SPOT_REGION: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ((6, 28), (12, 44), (14, 50))
#: What the concept head reads from each spot map: log(1 + peaks above 0.5), log(1 + summed peak probability), max.
SPOT_READOUTS = 3


@dataclass
class FusionConfig:
    variant: Variant = "fusion"
    volume_shape: tuple[int, int, int] = C.VOLUME_SHAPE
    n_steps: int = C.N_STEPS
    n_features: int = C.N_FEATURES
    n_demographics: int = C.N_DEMOGRAPHICS
    cnn_channels: tuple[int, int] = (16, 32)  # channels at half and at quarter resolution
    spot_channels: int = 12  # full-resolution spot detector (lacunes, vessel sign); 0: none (models before 0.3.0)
    #: the box the spot detector runs on (``SPOT_REGION``); None: the whole volume (model 0.3.0)
    spot_region: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = SPOT_REGION
    lstm_hidden: int = 32
    demo_embed: int = 8
    head_hidden: int = 32
    dropout: float = 0.1
    #: The fusion model's head: "logistic" (``LogisticHead``, since 0.6.0: one logistic model per presence
    #: pattern over the concepts and their image x vital products) or "mlp" (the MLP, as the baselines have it).
    head_kind: Literal["logistic", "mlp"] = "logistic"
    #: Train the lesion-map head against lesion masks and the concept heads against the known risk factors
    #: (when the data has them): dense signals where outcomes alone give one bit per patient.
    aux_seg: bool = True
    #: Calibration: probability = sigmoid(logit / temperature + calibration_bias); fitted on held-out patients.
    temperature: float = 1.0
    calibration_bias: float = 0.0
    #: Provenance written by training (``modelling.train``) (seed, n, metrics); carried into the ONNX metadata.
    info: dict[str, object] = field(default_factory=dict)

    @property
    def image_concepts(self) -> int:
        return len(IMAGE_CONCEPTS)

    @property
    def vital_concepts(self) -> int:
        return len(VITAL_CONCEPTS)

    @property
    def uses_image(self) -> bool:
        return self.variant in ("fusion", "image")

    @property
    def uses_vitals(self) -> bool:
        return self.variant in ("fusion", "vitals")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FusionConfig:
        raw = json.loads(text)
        for key in ("volume_shape", "cnn_channels"):
            raw[key] = tuple(raw[key])
        raw.pop("image_embed", None)  # configs before 0.2.0
        raw.setdefault("spot_channels", 0)  # configs before 0.3.0 had no spot detector
        raw.setdefault("head_kind", "mlp")  # configs before 0.6.0: the MLP head
        region = raw.get("spot_region")  # absent before 0.4.0: the whole volume
        raw["spot_region"] = None if region is None else tuple((int(a), int(b)) for a, b in region)
        return cls(**raw)
