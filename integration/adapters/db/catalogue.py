"""The ``ExportCatalogue`` port on the engine's database: whom the engine scored, and which studies it matched."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from integration.adapters.db.models import Assessment, Study


class SqlExportCatalogue:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def assessed_patients(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Assessment.patient_fhir_id).distinct().order_by(Assessment.patient_fhir_id)))

    def patient_studies(self, fhir_id: str) -> list[str]:
        with self.sessions() as s:
            q = (select(Study.study_uid)
                 .where(Study.patient_fhir_id == fhir_id, Study.status == "ready")
                 .order_by(Study.study_datetime.asc().nulls_last(), Study.id.asc()))
            return list(s.scalars(q))
