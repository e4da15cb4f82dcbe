"""A site's training set for learning across sites: the model inputs the engine holds for its patients, with the
outcomes the site's registry supplies, as one file a federated client reads (``strokewatch training-set export``).

Each patient's inputs are built by ``assess.prepare``, the code that builds them for scoring: the latest ready
study's volume tensor from the engine's store, the vital signs of the window from its database, age and sex from
the Patient. The outcome (1: a cerebrovascular accident within the contract's horizon after the inputs end, 0: none)
is not something the engine knows; the site supplies it, one line a patient:
``<patient>,<outcome>`` where ``<patient>`` is ``Patient/<FHIR id>``, ``system|value`` (an identifier such as an
MRN) or a bare identifier value, as the de-identified export's selection file.

What the file holds: the contract's input tensors (``inference.contract.INPUT_NAMES``), ``outcome``, ``age_years``
and ``male``, one row a patient, in no particular order and with no identifier, date or UID: it never leaves the
site (what leaves is the client's weight updates). Patients the engine cannot build inputs for (not synced, no
study and no vitals) are skipped and counted with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference import contract as C
from integration.domain.types import DomainError, Outcome
from integration.services.assess import age_at, prepare
from integration.services.context import Services
from integration.services.deid import Selector, parse_selection, patient_of

log = logging.getLogger(__name__)

#: The arrays of a training-set file, beside the contract's inputs.
LABEL_KEYS = ("outcome", "age_years", "male")


@dataclass(frozen=True)
class Labelled:
    selector: Selector
    outcome: int


@dataclass
class TrainingSetReport:
    patients: int = 0
    events: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)


def parse_outcomes(lines: Iterable[str]) -> list[Labelled]:
    """``<patient>,<outcome>`` lines (blank lines and ``#`` comments skipped) -> selectors with their outcome.
    ValueError naming the line for anything else (a missing comma, an outcome other than 0 or 1, a patient twice)."""
    rows: list[Labelled] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        patient, sep, outcome = text.rpartition(",")
        if not sep or not patient.strip():
            raise ValueError(f"line {number}: expected <patient>,<outcome>")
        if outcome.strip() not in ("0", "1"):
            raise ValueError(f"line {number}: the outcome must be 0 or 1")
        if patient.strip() in seen:
            raise ValueError(f"line {number}: this patient is on an earlier line too")
        seen.add(patient.strip())
        (selector,) = parse_selection([patient])
        rows.append(Labelled(Selector(number, selector.fhir_id, selector.system, selector.value), int(outcome)))
    if not rows:
        raise ValueError("no patient in the outcomes file")
    return rows


def training_set(svc: Services, rows: Sequence[Labelled]) -> tuple[dict[str, np.ndarray], TrainingSetReport]:
    """The arrays of the training-set file for these patients, and what was kept and skipped (reasons without
    identifiers: the line of the outcomes file)."""
    report = TrainingSetReport()
    columns: dict[str, list[Any]] = {name: [] for name in (*C.INPUT_NAMES, *LABEL_KEYS)}
    for row in rows:
        fhir_id = patient_of(svc.ehr, row.selector)
        if fhir_id is None:
            report.skipped.append({"line": str(row.selector.line), "reason": "no Patient with that identifier"})
            continue
        patient = svc.store.get_patient(fhir_id)
        if patient is None:
            report.skipped.append({"line": str(row.selector.line),
                                   "reason": "not in the engine's database (its vital signs were never synced)"})
            continue
        try:
            prepared = prepare(svc, fhir_id, "training-set")
        except DomainError as err:
            report.skipped.append({"line": str(row.selector.line), "reason": f"{err.outcome.value}: {err.message}"})
            continue
        inputs = prepared.inputs
        for name in C.INPUT_NAMES:
            columns[name].append(getattr(inputs, name))
        age = age_at(patient.birth_date, prepared.window_end)  # as the demographics tensor was built
        columns["outcome"].append(float(row.outcome))
        columns["age_years"].append(float("nan") if age is None else age)
        columns["male"].append((patient.gender or "").lower() == "male")
        report.patients += 1
        report.events += row.outcome
    if report.patients == 0:
        raise DomainError(Outcome.INSUFFICIENT_DATA, "none of the patients has model inputs in the engine "
                                                     f"({len(report.skipped)} skipped)")
    arrays = {name: np.stack(values).astype(np.float32) for name, values in columns.items() if name != "male"}
    arrays["male"] = np.asarray(columns["male"], dtype=bool)
    log.info("training set: %d patients (%d events), %d skipped", report.patients, report.events,
             len(report.skipped))
    return arrays, report

