"""Use cases: score patients (batched through the RiskModel port) and publish RiskAssessments to the EHR."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np

from inference import contract as C
from inference.preprocess import VitalSample, demographics_tensor, empty_image, vitals_tensors
from inference.runtime.base import ModelContractError, ModelInputs, ModelUnavailableError, Prediction
from inference.runtime.site import calibration_of
from integration.domain import stages
from integration.domain.assessment import (
    DEVICE_IDENTIFIER_SYSTEM,
    AssessmentFacts,
    build_device,
    build_risk_assessment,
    device_identifier,
)
from integration.domain.identity import assessment_identifier, pseudonym
from integration.domain.records import AssessmentRecord, AssessmentStatus, NewAssessment, StudyRecord
from integration.domain.redact import describe_exception, redact_text
from integration.domain.retry import backoff_at
from integration.domain.types import DomainError, Outcome, VitalValue
from integration.domain.window import study_anchor, window_end, window_start
from integration.ports import RiskModel
from integration.services import explain
from integration.services.alerts import update_alert
from integration.services.context import Services
from integration.services.results import write_results
from integration.services.timing import StageTimes, end_to_end, record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    patient_fhir_id: str
    identifier: str
    inputs: ModelInputs
    study_uid: str | None
    modality: str | None
    window_end: datetime
    vitals: list[VitalValue]
    image_used: bool
    fingerprint: str


@dataclass(frozen=True)
class AssessResult:
    patient_fhir_id: str
    status: str  # scored | unchanged | insufficient_data | retry | failed | skipped
    identifier: str | None = None
    probability: float | None = None
    reason: str | None = None


def age_at(birth_date: str | None, when: datetime) -> float | None:
    if not birth_date:
        return None
    parts = [int(p) for p in birth_date.split("-")]
    born = date(parts[0], parts[1] if len(parts) > 1 else 7, parts[2] if len(parts) > 2 else 1)
    return (when.date() - born).days / 365.25


def prepare(svc: Services, patient_fhir_id: str, model_version: str) -> Prepared:
    """Gather the latest eligible study + the vitals window and build the contract tensors."""
    patient = svc.store.get_patient(patient_fhir_id)
    if patient is None:
        raise DomainError(Outcome.INTERNAL_ERROR, "patient not in the database")
    now = svc.clock.now()
    study = svc.store.latest_ready_study(patient_fhir_id)
    image, image_used = empty_image(), False
    volume = _volume(svc, study) if study is not None else None
    if volume is not None:
        image, image_used = volume, True
    # The window ends at the latest input, whatever the clock says: the identity below must not change with it.
    anchor = study_anchor(study.study_datetime, study.detected_at) if study is not None else None
    end = window_end(anchor, svc.store.latest_vital_time(patient_fhir_id, now))
    if end is None:
        raise DomainError(Outcome.INSUFFICIENT_DATA, "no study and no vital signs for this patient")
    vitals = svc.store.vitals_between(patient_fhir_id, window_start(end), end)
    if len(vitals) < svc.policy.min_vital_samples and not (image_used and svc.policy.image_only_when_no_vitals):
        raise DomainError(
            Outcome.INSUFFICIENT_DATA,
            f"{len(vitals)} vital-sign values in the {C.WINDOW_HOURS // 24}-day window and "
            + ("no usable image" if not image_used else "the policy does not score on the image alone"),
        )
    if not image_used and not vitals:
        raise DomainError(Outcome.INSUFFICIENT_DATA, "no usable image and no vital signs in the window")
    samples = [VitalSample(C.FEATURE_INDEX[v.feature], (end - v.effective).total_seconds() / 3600.0, v.value)
               for v in vitals]
    values, mask, delta = vitals_tensors(samples)
    inputs = ModelInputs(
        image=image.astype(np.float32),
        image_present=np.asarray([1.0 if image_used else 0.0], dtype=np.float32),
        vitals=values,
        vitals_mask=mask,
        vitals_delta=delta,
        demographics=demographics_tensor(age_at(patient.birth_date, end), patient.gender),
    )
    study_uid = study.study_uid if study is not None else None
    digest = hashlib.sha256()
    for name in C.INPUT_NAMES:
        digest.update(np.ascontiguousarray(getattr(inputs, name)).tobytes())
    return Prepared(
        patient_fhir_id=patient_fhir_id,
        identifier=assessment_identifier(patient_fhir_id, study_uid, end, model_version),
        inputs=inputs,
        study_uid=study_uid,
        modality=study.modality if study is not None else None,
        window_end=end,
        vitals=vitals,
        image_used=image_used,
        fingerprint=digest.hexdigest(),
    )


def _volume(svc: Services, study: StudyRecord) -> np.ndarray | None:
    """The study's volume tensor; None when the study never had one. A volume that is gone (retention removed
    it, a disk was lost or replaced) is rebuilt rather than silently left out of the score: the study goes back
    to the ingest queue (retrieved again from the PACS), and the patient is scored again once it is ready."""
    if study.volume_path is None and study.volume_sha256 is None:
        return None
    if study.volume_path is not None:
        try:
            loaded: np.ndarray = np.load(study.volume_path, allow_pickle=False)
            return loaded
        except (OSError, ValueError):  # missing, unreadable or truncated: rebuilt below
            svc.store.clear_study_volume(study.study_uid, study.volume_path)
    if svc.store.requeue_study(study.study_uid):
        svc.enqueue("ingest", [study.study_uid])
    raise DomainError(
        Outcome.VOLUME_MISSING,
        f"the volume of study {study.study_uid} is no longer on disk; the study is re-ingested from the PACS and "
        "the patient scored again once it is ready",
    )


def assess_patients(svc: Services, patient_ids: list[str]) -> list[AssessResult]:
    """Score every claimable patient in ``patient_ids`` in one model call; enqueue publishing."""
    times = StageTimes(svc.timer)
    try:
        return _assess(svc, patient_ids, times)
    finally:
        times.flush(svc.store)


def _assess(svc: Services, patient_ids: list[str], times: StageTimes) -> list[AssessResult]:
    now = svc.clock.now()
    claimed = [pid for pid in dict.fromkeys(patient_ids) if svc.store.claim_patient(pid, now)]
    results: list[AssessResult] = []
    if not claimed:
        return [AssessResult(pid, "skipped", reason="not due or already being assessed") for pid in patient_ids]
    try:
        model = svc.model()
        version = model.model_version
    except (ModelUnavailableError, ModelContractError) as err:
        return [_deferred(svc, pid, err) for pid in claimed]
    # A site recalibration scores differently from the same model: it is part of the assessment's identity.
    calibration = calibration_of(model)
    scoring = version if calibration is None else f"{version}+{calibration.tag}"

    ready: list[Prepared] = []
    for pid in claimed:
        try:
            prep = prepare(svc, pid, scoring)
        except DomainError as err:
            svc.store.record_failure("assess", pid, err.outcome, err.message, err.retryable)
            svc.store.release_patient(pid, outcome=err.outcome.value, reason=err.message)
            results.append(AssessResult(pid, err.outcome.value, reason=err.message))
            continue
        existing = svc.store.get_assessment(prep.identifier)
        if existing is not None:  # same inputs, same model: already scored (replay, re-sent study)
            svc.store.release_patient(pid)
            if existing.status is not AssessmentStatus.PUBLISHED:
                svc.enqueue("publish", [existing.identifier])
            results.append(AssessResult(pid, "unchanged", existing.identifier, existing.probability))
            continue
        ready.append(prep)
    if not ready:
        return results

    try:
        predictions = times.timed(stages.MODEL, model.predict, [p.inputs for p in ready])
    except (ModelUnavailableError, ModelContractError) as err:
        return results + [_deferred(svc, p.patient_fhir_id, err) for p in ready]

    try:
        device_id = _device_id(svc, version, model.trained)
    except DomainError as err:  # the EHR is down: nothing is lost, the patients are scored again later
        return results + [_deferred(svc, p.patient_fhir_id, err) for p in ready]
    drivers = _drivers(svc, model, ready, predictions, times)
    to_publish: list[str] = []
    for prep, pred, why in zip(ready, predictions, drivers, strict=True):
        previous = svc.store.latest_assessment(prep.patient_fhir_id)
        supersedes = previous if previous is not None and previous.identifier != prep.identifier else None
        facts = AssessmentFacts(
            identifier_system=svc.assessment_identifier_system,
            identifier=prep.identifier,
            patient_fhir_id=prep.patient_fhir_id,
            window_end=prep.window_end,
            probability=pred.probability,
            model_version=pred.model_version,
            trained=model.trained,
            runtime=pred.runtime,
            study_uid=prep.study_uid,
            modality=prep.modality,
            observation_ids=sorted({v.observation_id for v in prep.vitals}),
            device_id=device_id,
            drivers=why,
            image_used=prep.image_used,
            supersedes_identifier=supersedes.identifier if supersedes else None,
            supersedes_fhir_id=supersedes.fhir_id if supersedes else None,
            calibration=pred.calibration,
        )
        band = svc.policy.band(pred.probability)
        svc.store.add_assessment(
            NewAssessment(
                identifier=prep.identifier,
                patient_fhir_id=prep.patient_fhir_id,
                study_uid=prep.study_uid,
                window_end=prep.window_end,
                model_version=pred.model_version,
                runtime=pred.runtime,
                trained=model.trained,
                probability=pred.probability,
                band=band,
                input_fingerprint=prep.fingerprint,
                n_vitals=len(prep.vitals),
                resource=build_risk_assessment(facts, svc.policy),  # the one place it is built
                supersedes_identifier=facts.supersedes_identifier,
            )
        )
        svc.store.release_patient(prep.patient_fhir_id)
        svc.store.resolve_failures("assess", prep.patient_fhir_id, svc.clock.now())
        to_publish.append(prep.identifier)
        log.info("assessed %s: p=%.3f (%s)", pseudonym(prep.patient_fhir_id), pred.probability, band)
        results.append(AssessResult(prep.patient_fhir_id, "scored", prep.identifier, pred.probability))
    svc.enqueue("publish", to_publish)
    return results


def assess_batch(svc: Services, patient_ids: list[str]) -> list[AssessResult]:
    """Score these patients together with other due ones, up to the model's batch size (one model call);
    the patients beyond it go back to the queue."""
    batch = list(dict.fromkeys(patient_ids))
    if len(batch) < C.MAX_BATCH:
        batch += [p for p in svc.store.patients_due(svc.clock.now(), C.MAX_BATCH) if p not in batch]
    svc.enqueue("assess", batch[C.MAX_BATCH :])
    return assess_patients(svc, batch[: C.MAX_BATCH])


def _drivers(
    svc: Services, model: RiskModel, ready: list[Prepared], predictions: list[Prediction], times: StageTimes
) -> list[list[str]]:
    """The drivers of each score (``services.explain``): from the scoring pass where the model serves its logit
    terms, else by occlusion through the served model (one batched call); empty on any failure."""
    if not svc.explain:
        return [[] for _ in ready]
    return times.timed(stages.EXPLAIN, explain.drivers, model, [(p.inputs, p.image_used) for p in ready], predictions)


def _deferred(svc: Services, pid: str, err: Exception) -> AssessResult:
    """The model or the EHR (for the Device) is unavailable: record it; the patient stays due, tried later."""
    if isinstance(err, DomainError):
        outcome, reason = err.outcome, err.message
    else:
        outcome = Outcome.MODEL_MISMATCH if isinstance(err, ModelContractError) else Outcome.MODEL_UNAVAILABLE
        reason = redact_text(str(err))  # credentials in a Triton URL never reach the failures table
    patient = svc.store.get_patient(pid)
    attempts = patient.attempts if patient else 1
    # Nothing is lost: the patient stays due and is tried again (a mismatch needs an operator; slow retries).
    base = svc.retry_backoff_s * (12 if outcome is Outcome.MODEL_MISMATCH else 1)
    retry_after = err.retry_after if isinstance(err, DomainError) else None  # the EHR's, for the Device
    retry_at = backoff_at(svc.clock.now(), attempts, base, retry_after, cap_s=900)
    svc.store.record_failure("assess", pid, outcome, reason, True)
    svc.store.release_patient(pid, retry_at=retry_at, outcome=outcome.value, reason=reason)
    log.warning("assessment of %s deferred: %s: %s", pseudonym(pid), outcome.value, reason)
    return AssessResult(pid, "retry", reason=f"{outcome.value}: {reason}")


def _device_id(svc: Services, model_version: str, trained: bool) -> str:
    """The EHR's Device for this model version (conditional create once per process, then cached)."""
    if model_version not in svc.device_ids:
        device_id, _ = svc.ehr.conditional_create(
            build_device(model_version, trained), DEVICE_IDENTIFIER_SYSTEM, device_identifier(model_version)
        )
        svc.device_ids[model_version] = device_id
    return svc.device_ids[model_version]


def publish(svc: Services, identifier: str) -> str:
    """Write one scored assessment to the EHR with a conditional create. Returns the row's new status."""
    now = svc.clock.now()
    if not svc.store.claim_assessment(identifier, now):
        row = svc.store.get_assessment(identifier)
        return "unknown" if row is None else row.status.value
    started = svc.timer()
    row = svc.store.get_assessment(identifier)
    if row is None:
        return "unknown"
    try:
        fhir_id, created = svc.ehr.conditional_create(row.resource, svc.assessment_identifier_system, identifier)
        delivered = _deliver(svc, row, fhir_id)
    except DomainError as err:
        # A retryable answer (EHR down, 408/429/5xx, timeout) is retried until the EHR takes it, at a backoff
        # capped at an hour, by the sweep: a long EHR outage must not turn scored assessments into lost ones.
        # Anything else (a 4xx) fails; an operator replays it with ``republish`` once the cause is fixed.
        retry = err.retryable
        svc.store.record_failure("publish", identifier, err.outcome, err.message, err.retryable)
        svc.store.set_assessment_outcome(
            identifier,
            AssessmentStatus.RETRY if retry else AssessmentStatus.FAILED,
            err.outcome,
            err.message,
            backoff_at(now, min(row.attempts, 32), svc.retry_backoff_s, err.retry_after) if retry else None,
        )
        log.warning("publish %s: %s", identifier, err.outcome.value)
        return "retry" if retry else "failed"
    written = svc.clock.now()
    svc.store.set_assessment_published(identifier, fhir_id, written)
    svc.store.resolve_failures("publish", identifier, written)
    elapsed = svc.timer() - started
    e2e = end_to_end(svc.store, row.study_uid, written) if row.study_uid else []
    record(svc.store, [(stages.PUBLISH, elapsed), *e2e])
    log.info("published RiskAssessment/%s (%s); %s", fhir_id, "created" if created else "already there", delivered)
    return "published"


def _deliver(svc: Services, row: AssessmentRecord, fhir_id: str) -> str:
    """What else an assessment in the EHR brings: the patient's alert Flag (``services.alerts``) and the results in
    the PACS (``services.results``). Each is idempotent, so a failure here fails (or retries) the publish as a whole
    and the next attempt writes only what is missing. Raises DomainError naming the part that failed."""
    try:
        alert = update_alert(svc, row, fhir_id)
    except DomainError as err:
        raise DomainError(err.outcome, f"alert Flag: {err.message}", retry_after=err.retry_after) from err
    try:
        results = write_results(svc, row)
    except DomainError as err:
        raise DomainError(err.outcome, f"results in the PACS: {err.message}", retry_after=err.retry_after) from err
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as err:  # a source series highdicom refuses
        raise DomainError(Outcome.INTERNAL_ERROR, f"results in the PACS: {describe_exception(err)}") from err
    return f"alert {alert}, PACS results {results}"


def republish(svc: Services, identifier: str) -> bool:
    """Operator replay of a publish (failed, given up as ``worker_lost``, or to be re-sent): back in the
    publish queue now with fresh counts. Idempotent: the conditional create on the assessment's identifier
    finds a RiskAssessment already written. False if unknown or being published."""
    if not svc.store.requeue_assessment(identifier):
        return False
    svc.enqueue("publish", [identifier])
    log.info("operator republish of %s", identifier)
    return True


def reassess_patient(svc: Services, fhir_id: str) -> bool:
    """Operator replay of a patient's assessment (e.g. given up as ``worker_lost``): flagged for scoring now
    with fresh counts. Same inputs give the same identity, so nothing is duplicated. False if unknown or being
    assessed."""
    if not svc.store.requeue_patient(fhir_id):
        return False
    svc.enqueue("assess", [fhir_id])
    log.info("operator reassessment of %s", pseudonym(fhir_id))
    return True
