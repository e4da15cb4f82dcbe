"""Use case: keep the patient's EHR alert (a FHIR ``Flag``, ``domain.alerts``) in step with the latest score.

Called by the publish stage once the RiskAssessment is in the EHR. Only the patient's latest assessment moves the
Flag (a late retry of an older one changes nothing); every write is idempotent, so the publish can be retried as a
whole: the Flag is created with a conditional create on an identifier made from the assessment that crossed the
threshold, and closing or extending a Flag re-reads it first.
"""

from __future__ import annotations

import logging
from typing import Any

from integration.domain import alerts
from integration.domain.identity import pseudonym
from integration.domain.records import AssessmentRecord
from integration.services.context import Services

log = logging.getLogger(__name__)


def active_flags(svc: Services, patient_fhir_id: str) -> list[dict[str, Any]]:
    """The patient's active StrokeWatch Flags (R4 has no Flag ``status`` search parameter: filtered here)."""
    found = svc.ehr.search(
        "Flag", {"patient": f"Patient/{patient_fhir_id}", "identifier": f"{alerts.FLAG_IDENTIFIER_SYSTEM}|"}
    )
    return [f for f in found if f.get("status") == "active" and alerts.is_ours(f)]


def update_alert(svc: Services, row: AssessmentRecord, risk_assessment_id: str) -> str:
    """Open, keep, or close the patient's Flag for this (just published) assessment. Returns what was done:
    ``opened``, ``kept``, ``closed``, ``none`` (below and no Flag), ``stale`` (a later assessment decides) or
    ``off``. Raises DomainError from the EHR (the caller records and retries)."""
    if not svc.alert_flags:
        return "off"
    latest = svc.store.latest_assessment(row.patient_fhir_id)
    if latest is not None and latest.identifier != row.identifier:
        return "stale"
    active = active_flags(svc, row.patient_fhir_id)
    action = alerts.decide(svc.policy.alert(row.probability), active)
    now = svc.clock.now()
    if action == "open":
        flag = alerts.build_flag(
            patient_fhir_id=row.patient_fhir_id,
            opening_assessment=row.identifier,
            risk_assessment_id=risk_assessment_id,
            probability=row.probability,
            band=row.band,
            start=now,
            device_id=svc.device_ids.get(row.model_version),
        )
        flag_id, created = svc.ehr.conditional_create(
            flag, alerts.FLAG_IDENTIFIER_SYSTEM, alerts.flag_identifier(row.identifier)
        )
        log.info("alert Flag/%s for %s (%s)", flag_id, pseudonym(row.patient_fhir_id),
                 "opened" if created else "already open")
        return "opened"
    if action == "keep":
        for flag in active:
            extended = alerts.with_detail(flag, risk_assessment_id)
            if extended is not None:
                svc.ehr.update(extended)
        return "kept"
    if action == "close":
        for flag in active:
            svc.ehr.update(alerts.closed(flag, now, risk_assessment_id))
            log.info("alert Flag/%s for %s closed", flag.get("id"), pseudonym(row.patient_fhir_id))
        return "closed"
    return "none"
