"""The ``ExportCatalogue`` port on the engine's database: whom the engine scored, and which studies it matched."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from integration.adapters.db.models import Assessment, Study
from integration.domain.types import DomainError, Outcome

T = TypeVar("T")


class SqlExportCatalogue:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def _read(self, query: Callable[[Session], T]) -> T:
        try:
            with self.sessions() as s:
                return query(s)
        except SQLAlchemyError as err:  # the driver's class only: its message can carry the URL or parameters
            raise DomainError(Outcome.INTERNAL_ERROR, f"cannot read the engine's database ({type(err).__name__}): "
                              "check STROKEWATCH_DATABASE_URL and run `strokewatch db upgrade`") from None

    def assessed_patients(self) -> list[str]:
        q = select(Assessment.patient_fhir_id).distinct().order_by(Assessment.patient_fhir_id)
        return self._read(lambda s: list(s.scalars(q)))

    def patient_studies(self, fhir_id: str) -> list[str]:
        q = (select(Study.study_uid)
             .where(Study.patient_fhir_id == fhir_id, Study.status == "ready")
             .order_by(Study.study_datetime.asc().nulls_last(), Study.id.asc()))
        return self._read(lambda s: list(s.scalars(q)))
