"""Series selection: which series of a study is the brain CT/MR volume to score, and why every other is not.

Every series gets a decision with a human-readable reason (recorded in the database, shown in the API).
A series is rejected by the FIRST rule it fails, in this order:

1. not an image (``Outcome.NOT_IMAGE``): a non-image SOP class (SR, PR, KO, encapsulated PDF, RT, SEG,
   secondary capture ...) or a modality other than those configured (CT, MR);
2. not a diagnostic volume (``Outcome.NOT_IMAGE``): the series description matches the exclusion pattern
   (scout, localizer, topogram, dose report, screen save, MIP, volume rendering ...) or ImageType
   says DERIVED / SECONDARY / LOCALIZER;
3. not the head (``Outcome.NOT_BRAIN``): neither BodyPartExamined, the series description nor the study
   description matches the head/brain pattern (unless ``require_head_label`` is off);
4. too short (``Outcome.TOO_FEW_SLICES``): fewer image planes than ``min_slices`` (frames of multi-frame
   Enhanced CT/MR count as planes).

Consistent geometry (spacing, orientation) can only be checked on the pixels' headers; that happens
after retrieval (``inference.preprocess.stack_slices``).

Among eligible series ``choose`` takes the highest score, which prefers (see ``score_series``):
a slice count in ``preferred_slices`` (thin enough for the model's 5 mm grid, not so many that
retrieval is wasted on 0.6 mm reconstructions), a slice thickness in ``preferred_thickness_mm``,
a soft-tissue CT kernel over a bone/sharp one, axial over sagittal/coronal/oblique planes, and
ORIGINAL images. Ties go to the series with more slices, then to the smaller UID (deterministic).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from integration.domain.types import Outcome, SeriesDecision, SeriesRef

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"

#: Grayscale cross-sectional image storage classes the engine can build a volume from.
IMAGE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        CT_IMAGE_STORAGE,
        ENHANCED_CT_IMAGE_STORAGE,
        LEGACY_ENHANCED_CT_IMAGE_STORAGE,
        MR_IMAGE_STORAGE,
        ENHANCED_MR_IMAGE_STORAGE,
        LEGACY_ENHANCED_MR_IMAGE_STORAGE,
    }
)

# Prefixes of well-known SOP classes that are not CT/MR image volumes, only to word the reason well.
_SOP_CLASS_KINDS: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", "a structured report"),
    ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state"),
    ("1.2.840.10008.5.1.4.1.1.104.", "an encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.7", "a secondary capture"),
    ("1.2.840.10008.5.1.4.1.1.66", "a segmentation/registration object"),
    ("1.2.840.10008.5.1.4.1.1.481.", "an RT object"),
    ("1.2.840.10008.5.1.4.1.1.4.2", "MR spectroscopy"),
    ("1.2.840.10008.5.1.4.1.1.4.3", "a colour MR image"),
    ("1.2.840.10008.5.1.4.1.1.9.", "a waveform"),
)

#: Modalities that never carry pixel volumes (so the reason can say "not an image modality").
NON_IMAGE_MODALITIES: frozenset[str] = frozenset(
    {"SR", "PR", "KO", "DOC", "SEG", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PLAN", "FID", "ECG"}
)

DEFAULT_HEAD_PATTERN = (
    r"HEAD|BRAIN|SKULL|CRAN|CEREBR|NEURO|STROKE|ENCEPH|SCHAEDEL|SCHÄDEL|KOPF|CERVEAU|T[EÊ]TE|CABEZA|CEREBRO"
)
# "low dose" protocols are diagnostic, so only dose *reports* are excluded.
# "3D" alone is not excluded: for MR it names a primary acquisition (3D T1, 3D FLAIR); 3D renderings are
# caught by the words below and by ImageType DERIVED/SECONDARY.
DEFAULT_EXCLUDE_PATTERN = (
    r"SCOUT|LOCALI[SZ]ER|TOPOGRAM|SURVIEW|SCANOGRAM|PILOT|DOSE ?(?:REPORT|INFO|SUMMARY|SHEET)|^\s*DOSE\s*$"
    r"|SCREEN ?SAVE|\bMIP\b|MINIP|\bVRT?\b"
    r"|VOLUME ?RENDER|3D ?(?:RECON|RENDER|VR|MIP)|\bREPORT\b|PATIENT ?PROTOCOL|\bKEY ?IMAGES?\b"
)
DEFAULT_SOFT_KERNEL_PATTERN = r"SOFT|STANDARD|\bSTND\b|BRAIN|HEAD|\b[HJQ][RV]?[1-4]\d|\bFC[0-2]\d|\bU[AB]\b"
DEFAULT_SHARP_KERNEL_PATTERN = r"BONE|SHARP|LUNG|DETAIL|EDGE|\b[HJQ][RV]?[6-9]\d|\bFC[3-9]\d|\bYC\b|\bYD\b"


@dataclass(frozen=True)
class SeriesRules:
    """Configurable selection rules. Patterns are case-insensitive regular expressions (``re.search``)."""

    modalities: tuple[str, ...] = ("CT", "MR")
    head_pattern: str = DEFAULT_HEAD_PATTERN
    exclude_pattern: str = DEFAULT_EXCLUDE_PATTERN
    exclude_image_types: tuple[str, ...] = ("DERIVED", "SECONDARY", "LOCALIZER")
    require_head_label: bool = True
    min_slices: int = 16
    image_sop_classes: frozenset[str] = field(default=IMAGE_SOP_CLASSES)
    preferred_slices: tuple[int, int] = (24, 320)
    preferred_thickness_mm: tuple[float, float] = (0.5, 5.0)
    soft_kernel_pattern: str = DEFAULT_SOFT_KERNEL_PATTERN
    sharp_kernel_pattern: str = DEFAULT_SHARP_KERNEL_PATTERN

    def __post_init__(self) -> None:
        for name in ("head_pattern", "exclude_pattern", "soft_kernel_pattern", "sharp_kernel_pattern"):
            try:
                re.compile(getattr(self, name))
            except re.error as err:
                raise ValueError(f"series rule {name} is not a valid regular expression: {err}") from err
        if self.min_slices < 2:
            raise ValueError("series rule min_slices must be at least 2 (a volume needs two slices)")


def _search(pattern: str, text: str) -> str | None:
    if not text:
        return None
    match = re.search(pattern, text, re.IGNORECASE)
    return match.group(0).upper() if match else None


def _sop_class_kind(uid: str) -> str:
    for prefix, kind in _SOP_CLASS_KINDS:
        if uid.startswith(prefix):
            return kind
    return "not a CT/MR image storage class"


def _not_image_reason(series: SeriesRef, rules: SeriesRules) -> str | None:
    modality = series.modality.upper()
    if series.sop_class_uid and series.sop_class_uid not in rules.image_sop_classes:
        kind = _sop_class_kind(series.sop_class_uid)
        return f"rejected: SOP class {series.sop_class_uid} ({kind}) is not a CT/MR image"
    if modality in NON_IMAGE_MODALITIES:
        return f"rejected: modality {modality} is not an image modality"
    if modality not in {m.upper() for m in rules.modalities}:
        return f"rejected: modality {modality or '(none)'} is not one of {', '.join(rules.modalities)}"
    return None


def _excluded_reason(series: SeriesRef, rules: SeriesRules) -> str | None:
    hit = _search(rules.exclude_pattern, series.series_description)
    if hit:
        return f"rejected: series description {series.series_description!r} marks a non-diagnostic series ({hit})"
    kinds = {value.upper() for value in series.image_type}
    excluded = [kind for kind in rules.exclude_image_types if kind.upper() in kinds]
    if excluded:
        shown = "\\".join(series.image_type)
        return f"rejected: ImageType {shown} is {excluded[0]}, not an original acquisition"
    return None


def _head_label(series: SeriesRef, rules: SeriesRules) -> str | None:
    """Which field says this is the head, e.g. 'HEAD' or 'BRAIN (series description)'; None if none does."""
    for text, where in (
        (series.body_part, ""),
        (series.series_description, " (series description)"),
        (series.study_description, " (study description)"),
    ):
        hit = _search(rules.head_pattern, text)
        if hit:
            return hit + where
    return None


def _normal_z(orientation: tuple[float, ...] | None) -> float | None:
    """|z component| of the slice normal (1 = axial), from ImageOrientationPatient."""
    if orientation is None or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    return abs(n[2]) / norm if norm > 1e-6 else None


def score_series(series: SeriesRef, rules: SeriesRules) -> tuple[float, list[str]]:
    """Preference among eligible series (higher wins) and the facts that made it, for the reason."""
    notes: list[str] = []
    n = series.n_slices
    lo, hi = rules.preferred_slices
    if lo <= n <= hi:
        score = 2.0
    elif n > hi:  # many thin slices: more to move and decode, nothing gained on a 5 mm grid
        score = 2.0 - min(1.5, (n - hi) / hi)
    else:
        score = 2.0 * n / lo

    if series.slice_thickness is not None:
        tmin, tmax = rules.preferred_thickness_mm
        notes.append(f"{series.slice_thickness:g} mm")
        if tmin <= series.slice_thickness <= tmax:
            score += 1.0
        elif series.slice_thickness > tmax:
            score -= 0.5

    if series.modality.upper() == "CT" and series.convolution_kernel:
        if _search(rules.sharp_kernel_pattern, series.convolution_kernel):
            score -= 1.0
            notes.append(f"kernel {series.convolution_kernel} (sharp)")
        elif _search(rules.soft_kernel_pattern, series.convolution_kernel):
            score += 1.0
            notes.append(f"kernel {series.convolution_kernel} (soft tissue)")

    nz = _normal_z(series.orientation)
    if nz is not None:
        axial = nz > 0.8
        score += 1.0 if axial else -1.0
        notes.append("axial" if axial else "not axial")
    else:
        plane = _search(r"\bAX|\bTRA|\bSAG|\bCOR", series.series_description)
        if plane in ("AX", "TRA"):
            score += 0.5
            notes.append("axial (description)")
        elif plane in ("SAG", "COR"):
            score -= 0.5
            notes.append("not axial (description)")

    if series.image_type and series.image_type[0].upper() == "ORIGINAL":
        score += 0.5
    return round(score, 3), notes


def decide(series: SeriesRef, rules: SeriesRules) -> SeriesDecision:
    """Eligible or not, with the reason; scored when eligible."""
    reason = _not_image_reason(series, rules)
    if reason:
        return SeriesDecision(series, False, reason, outcome=Outcome.NOT_IMAGE)
    reason = _excluded_reason(series, rules)
    if reason:
        return SeriesDecision(series, False, reason, outcome=Outcome.NOT_IMAGE)
    label = _head_label(series, rules)
    if label is None and rules.require_head_label:
        return SeriesDecision(
            series,
            False,
            "rejected: no head/brain label in body part, series or study description",
            outcome=Outcome.NOT_BRAIN,
        )
    if series.n_slices < rules.min_slices:
        unit = "instances" if series.frames_per_instance <= 1 else "frames"
        return SeriesDecision(
            series,
            False,
            f"rejected: {series.n_slices} {unit} < minimum {rules.min_slices}",
            outcome=Outcome.TOO_FEW_SLICES,
        )
    score, notes = score_series(series, rules)
    facts = [series.modality.upper(), label or "unlabelled", f"{series.n_slices} slices", *notes]
    return SeriesDecision(series, True, f"eligible: {', '.join(facts)}; score {score:g}", score=score)


def choose(
    series_list: Sequence[SeriesRef], rules: SeriesRules
) -> tuple[SeriesDecision | None, list[SeriesDecision]]:
    """Decide every series (in the given order) and pick the best eligible one, or None."""
    decisions = [decide(s, rules) for s in series_list]
    eligible = [d for d in decisions if d.eligible]
    if not eligible:
        return None, decisions
    # max score, then more slices; among equals the smallest UID, so the choice never depends on list order
    best = min(eligible, key=lambda d: (-d.score, -d.series.n_slices, d.series.series_uid))
    return best, decisions
