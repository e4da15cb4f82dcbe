"""Series selection rules (pure): every series gets a reason; the best eligible one is chosen."""

from __future__ import annotations

import dataclasses

import pytest

from integration.domain.series import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    SeriesRules,
    choose,
    decide,
)
from integration.domain.types import Outcome, SeriesRef

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
RULES = SeriesRules()


def ct(uid: str = "1.2.3.1", **kw: object) -> SeriesRef:
    base: dict[str, object] = dict(
        study_uid="1.2.3",
        series_uid=uid,
        modality="CT",
        n_instances=34,
        body_part="HEAD",
        series_description="Head 5mm",
        study_description="CT HEAD W/O",
        sop_class_uid=CT_IMAGE_STORAGE,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slice_thickness=5.0,
        convolution_kernel="H30s",
        orientation=AXIAL,
    )
    base.update(kw)
    return SeriesRef(**base)  # type: ignore[arg-type]


def test_plain_head_ct_is_eligible_with_facts_in_the_reason() -> None:
    d = decide(ct(), RULES)
    assert d.eligible and d.outcome is None
    assert d.reason.startswith("eligible: CT, HEAD, 34 slices")
    assert "soft tissue" in d.reason and "axial" in d.reason


@pytest.mark.parametrize(
    ("series", "outcome", "words"),
    [
        (ct(modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22", n_instances=1), Outcome.NOT_IMAGE,
         "structured report"),
        (ct(modality="SR", sop_class_uid=""), Outcome.NOT_IMAGE, "modality SR is not an image modality"),
        (ct(modality="PR", sop_class_uid="1.2.840.10008.5.1.4.1.1.11.1"), Outcome.NOT_IMAGE, "presentation state"),
        (ct(modality="OT", sop_class_uid="1.2.840.10008.5.1.4.1.1.104.1"), Outcome.NOT_IMAGE, "encapsulated"),
        (ct(modality="US", sop_class_uid=""), Outcome.NOT_IMAGE, "modality US is not one of CT, MR"),
        (ct(series_description="Topogram 0.6 T20f"), Outcome.NOT_IMAGE, "TOPOGRAM"),
        (ct(series_description="SCOUT"), Outcome.NOT_IMAGE, "SCOUT"),
        (ct(series_description="Dose Report"), Outcome.NOT_IMAGE, "non-diagnostic"),
        (ct(series_description="Screen Save"), Outcome.NOT_IMAGE, "SCREEN SAVE"),
        (ct(series_description="Ax MIP 10mm"), Outcome.NOT_IMAGE, "MIP"),
        (ct(image_type=("DERIVED", "SECONDARY", "MPR")), Outcome.NOT_IMAGE, "DERIVED"),
        (ct(body_part="CHEST", series_description="Thorax 1mm", study_description="CT THORAX"), Outcome.NOT_BRAIN,
         "no head/brain label"),
        (ct(n_instances=3), Outcome.TOO_FEW_SLICES, "3 instances < minimum 16"),
    ],
)
def test_rejections_name_their_outcome_and_reason(series: SeriesRef, outcome: Outcome, words: str) -> None:
    d = decide(series, RULES)
    assert not d.eligible
    assert d.outcome is outcome
    assert d.reason.startswith("rejected: ")
    assert words in d.reason


def test_head_label_may_come_from_descriptions_and_any_language() -> None:
    assert decide(ct(body_part="", series_description="", study_description="MR Brain stroke"), RULES).eligible
    d = decide(ct(body_part="", series_description="Schädel nativ", study_description=""), RULES)
    assert d.eligible and "(series description)" in d.reason
    assert decide(ct(body_part="", series_description="Crane sans injection", study_description=""), RULES).eligible


def test_low_dose_protocol_is_not_a_dose_report() -> None:
    assert decide(ct(series_description="Low dose head 5mm"), RULES).eligible
    assert decide(ct(series_description="DOSE"), RULES).outcome is Outcome.NOT_IMAGE


def test_mr_3d_acquisition_is_not_mistaken_for_a_rendering() -> None:
    mr = ct(modality="MR", sop_class_uid=MR_IMAGE_STORAGE, series_description="3D T1 MPRAGE", n_instances=176,
            convolution_kernel="", body_part="BRAIN")
    assert decide(mr, RULES).eligible
    assert not decide(ct(series_description="3D Recon VR"), RULES).eligible


def test_multiframe_counts_frames_not_instances() -> None:
    enhanced = ct(sop_class_uid=ENHANCED_CT_IMAGE_STORAGE, n_instances=1, frames_per_instance=40)
    d = decide(enhanced, RULES)
    assert d.eligible and "40 slices" in d.reason
    short = decide(dataclasses.replace(enhanced, frames_per_instance=5), RULES)
    assert short.outcome is Outcome.TOO_FEW_SLICES and "5 frames" in short.reason


def test_rules_are_configurable() -> None:
    rules = SeriesRules(modalities=("CT",), min_slices=40, require_head_label=False)
    assert decide(ct(n_instances=34), rules).outcome is Outcome.TOO_FEW_SLICES
    assert decide(ct(modality="MR", sop_class_uid=MR_IMAGE_STORAGE), rules).outcome is Outcome.NOT_IMAGE
    assert decide(ct(body_part="", series_description="", study_description="", n_instances=50), rules).eligible
    with pytest.raises(ValueError, match="head_pattern"):
        SeriesRules(head_pattern="(")


def test_choose_prefers_soft_tissue_axial_over_bone_and_sagittal() -> None:
    bone = ct("1.2.3.2", convolution_kernel="H70h", series_description="Head bone 1mm", n_instances=150)
    sagittal = ct("1.2.3.3", orientation=SAGITTAL, series_description="Sag 3mm", n_instances=60)
    soft = ct("1.2.3.4", n_instances=32)
    scout = ct("1.2.3.5", series_description="Scout", n_instances=2)
    chosen, decisions = choose([bone, sagittal, scout, soft], RULES)
    assert chosen is not None and chosen.series.series_uid == "1.2.3.4"
    assert [d.series.series_uid for d in decisions] == ["1.2.3.2", "1.2.3.3", "1.2.3.5", "1.2.3.4"]
    assert all(d.reason for d in decisions)


def test_choose_prefers_moderate_slice_counts_over_huge_thin_series() -> None:
    thin = ct("1.2.3.6", n_instances=900, slice_thickness=0.6)
    regular = ct("1.2.3.7", n_instances=150, slice_thickness=1.0)
    chosen, _ = choose([thin, regular], RULES)
    assert chosen is not None and chosen.series.series_uid == "1.2.3.7"


def test_choose_is_independent_of_order_on_ties() -> None:
    a, b = ct("1.2.3.8"), ct("1.2.3.9")
    assert choose([a, b], RULES)[0] == choose([b, a], RULES)[0]
    assert choose([b, a], RULES)[0].series.series_uid == "1.2.3.8"  # type: ignore[union-attr]


def test_choose_nothing_eligible() -> None:
    chosen, decisions = choose([ct(n_instances=3), ct("1.2.3.10", modality="SR", sop_class_uid="")], RULES)
    assert chosen is None and len(decisions) == 2 and not any(d.eligible for d in decisions)
    assert choose([], RULES) == (None, [])
