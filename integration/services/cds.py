"""Use case: the CDS Hooks patient-view answer for one patient."""

from __future__ import annotations

from typing import Any

from integration.domain.cds import CardFacts, risk_card
from integration.services.context import Services


def patient_view_cards(
    svc: Services,
    patient_fhir_id: str,
    ehr_base_url: str | None,
    *,
    dashboard_url: str | None = None,
    smart_launch_url: str | None = None,
) -> list[dict[str, Any]]:
    """One card with the latest (not superseded) assessment, linking to it in the EHR and to the patient's
    dashboard page (and, from an EHR that can launch it, the dashboard as a SMART app); no card without one."""
    row = svc.store.latest_assessment(patient_fhir_id)
    if row is None:
        return []
    notes = row.resource.get("note") or [{}]
    url = f"{ehr_base_url.rstrip('/')}/RiskAssessment/{row.fhir_id}" if ehr_base_url and row.fhir_id else None
    facts = CardFacts(
        probability=float(row.probability),
        band=str(row.band),
        model_version=str(row.model_version),
        trained=bool(row.trained),
        note=str(notes[0].get("text", "")),
        assessed_at=row.window_end.isoformat(timespec="minutes"),
        risk_assessment_url=url,
        dashboard_url=dashboard_url,
        smart_launch_url=smart_launch_url,
        patient_fhir_id=patient_fhir_id,
    )
    return [risk_card(facts)]
