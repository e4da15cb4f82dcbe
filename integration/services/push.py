"""Use cases of the C-STORE SCP: receive one instance, note an association's end, complete studies.

An instance is checked (UIDs, sizes, free disk) and written to the spool durably before its C-STORE response is
sent, so an acknowledged instance is never lost. A complete study (``domain.push``: association released, or the
quiet period after an abort) is registered with source "scp" and queued for ingest, which reads the spool.
Refusals are answered with a DIMSE failure status naming the reason, recorded as failures (stage ``receive``) and
logged without PHI (UIDs and AE titles only).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from integration.domain import stages
from integration.domain.ids import is_dicom_uid, opaque_name, shown
from integration.domain.limits import ImageLimits
from integration.domain.push import (
    SCP_SOURCE,
    InstanceHeader,
    ReceivedInstance,
    StoreResult,
    StoreStatus,
    StudyArrivals,
)
from integration.domain.records import StudyStatus
from integration.domain.redact import describe_exception
from integration.domain.series import IMAGE_SOP_CLASSES
from integration.domain.types import DomainError, Outcome
from integration.ports import Clock, Spool, Store
from integration.services.timing import record

log = logging.getLogger(__name__)

#: Completion that failed (database down, the study being ingested) is tried again this much later.
COMPLETION_RETRY = timedelta(seconds=2)
_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO


@dataclass
class PushServices:
    """What the SCP's use cases need, built by ``integration.bootstrap.bootstrap_push``."""

    store: Store
    spool: Spool
    arrivals: StudyArrivals
    clock: Clock
    limits: ImageLimits = field(default_factory=ImageLimits)
    #: One instance as received (also enforced on the wire by the SCP, before it is buffered).
    max_instance_bytes: int = 512 << 20
    #: Instances are refused while the spool's file system has less free space.
    min_free_bytes: int = 1 << 30
    #: Instances of other storage SOP classes are acknowledged and not kept (True), or refused (False).
    accept_other_sop_classes: bool = True
    #: The one way follow-up work reaches the next stage (``ingest``); the SCP wires Celery here.
    enqueue: Callable[[str, list[str]], None] = lambda stage, ids: None
    #: A study's first instance queues the vitals sync of its patient (``prefetch``), ahead of its completion.
    prefetch_vitals: bool = True
    #: Serialises ``arrivals`` and the completion marks between the SCP's association threads and its ticker.
    lock: threading.Lock = field(default_factory=threading.Lock)


def receive_instance(push: PushServices, received: ReceivedInstance) -> StoreResult:
    """One C-STORE request: checked, then kept in the spool (durably) or refused. Never raises for the sender's
    input; an unexpected error is an out-of-resources refusal (the sender may try again), never an acknowledgement."""
    try:
        return _receive(push, received)
    except Exception as exc:  # a bug or an I/O problem: refuse this one instance, keep serving
        # The type only (and an OS error's reason): a library's message may quote the data set's values (PHI).
        message = type(exc).__name__ + (f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else "")
        log.error("C-STORE from %s of instance %s failed: %s", received.calling_aet,
                  shown(received.sop_instance_uid), message)
        return _refused(push, received, None, StoreStatus.OUT_OF_RESOURCES, Outcome.INTERNAL_ERROR,
                        f"the instance could not be kept ({message})", "instance could not be stored")


def _receive(push: PushServices, received: ReceivedInstance) -> StoreResult:
    size = memoryview(received.dataset).nbytes
    if size > push.max_instance_bytes:
        return _refused(push, received, None, StoreStatus.OUT_OF_RESOURCES, Outcome.TOO_LARGE,
                        f"an instance of {size} bytes; the limit is {push.max_instance_bytes} "
                        "(STROKEWATCH_SCP__MAX_INSTANCE_BYTES)", "instance too large")
    for what, uid in (("SOP Class UID", received.sop_class_uid), ("SOP Instance UID", received.sop_instance_uid)):
        if not is_dicom_uid(uid):
            return _refused(push, received, None, StoreStatus.CANNOT_UNDERSTAND, Outcome.INVALID_UID,
                            f"the request's Affected {what} {shown(uid)} is not a DICOM UID (PS3.5 9.1)",
                            f"invalid {what}")
    if received.sop_class_uid not in IMAGE_SOP_CLASSES:
        if push.accept_other_sop_classes:
            log.debug("C-STORE from %s: SOP class %s acknowledged, not kept", received.calling_aet,
                      received.sop_class_uid)
            return StoreResult(StoreStatus.SUCCESS)
        return _refused(push, received, None, StoreStatus.DATASET_MISMATCH, Outcome.NOT_IMAGE,
                        f"SOP class {received.sop_class_uid} is not a CT/MR image", "not a CT/MR image")
    try:
        header = push.spool.parse(received)
    except DomainError as err:
        return _refused(push, received, None, StoreStatus.CANNOT_UNDERSTAND, err.outcome, err.message,
                        "unreadable data set")
    problem = _header_problem(received, header)
    if problem is not None:
        status, what = problem
        return _refused(push, received, header, status, Outcome.INVALID_UID, what, what)
    if push.spool.contains(header):
        log.debug("C-STORE from %s: instance %s of study %s is a duplicate", received.calling_aet,
                  header.sop_instance_uid, header.study_uid)
        return StoreResult(StoreStatus.SUCCESS)
    refusal = _over_limits(push, header, size)
    if refusal is not None:
        return _refused(push, received, header, StoreStatus.OUT_OF_RESOURCES, *refusal)

    with push.lock:  # the study is pending before its first new byte is written: a completion then waits for it
        first = push.arrivals.arriving(header.study_uid, received.association, received.calling_aet,
                                       push.clock.now())
        push.spool.reopen(header.study_uid)
    try:
        stored = push.spool.put(header, received)
    except OSError as err:
        return _refused(push, received, header, StoreStatus.OUT_OF_RESOURCES, Outcome.INTERNAL_ERROR,
                        f"the spool cannot be written ({err.strerror}); check the disk of STROKEWATCH_DATA_DIR",
                        "spool cannot be written")
    if first and stored and push.prefetch_vitals:
        # Its patient's vitals are read while the rest of the study is on the wire (``prefetch_vitals``).
        push.enqueue("prefetch", [header.study_uid])
    return StoreResult(StoreStatus.SUCCESS, stored=stored)


def _header_problem(received: ReceivedInstance, header: InstanceHeader) -> tuple[StoreStatus, str] | None:
    for what, uid in (("StudyInstanceUID", header.study_uid), ("SeriesInstanceUID", header.series_uid),
                      ("SOPInstanceUID", header.sop_instance_uid)):
        if not is_dicom_uid(uid):
            return StoreStatus.CANNOT_UNDERSTAND, f"{what} {shown(uid)} is not a DICOM UID"
    if header.sop_instance_uid != received.sop_instance_uid:
        return StoreStatus.DATASET_MISMATCH, "SOPInstanceUID differs from the request's"
    if header.sop_class_uid != received.sop_class_uid:
        return StoreStatus.DATASET_MISMATCH, "SOPClassUID differs from the request's"
    return None


def _over_limits(push: PushServices, header: InstanceHeader, size: int) -> tuple[Outcome, str, str] | None:
    """(outcome, message, comment) when keeping the instance would exceed a limit or fill the disk."""
    limits = push.limits
    if header.rows is not None and header.columns is not None:
        try:
            limits.check_image(header.rows, header.columns, header.frames, f"instance {header.sop_instance_uid}")
        except DomainError as err:
            return err.outcome, err.message, "image too large"
    planes, held = push.spool.usage(header.study_uid, header.series_uid)
    if planes + header.frames > limits.max_slices_per_series:
        return (Outcome.TOO_LARGE, f"series {header.series_uid} would hold more than {limits.max_slices_per_series} "
                "images (STROKEWATCH_LIMITS__MAX_SLICES_PER_SERIES)", "series has too many images")
    if held + size > limits.max_series_bytes:
        return (Outcome.TOO_LARGE, f"series {header.series_uid} would hold more than {limits.max_series_bytes} "
                "bytes (STROKEWATCH_LIMITS__MAX_SERIES_BYTES)", "series too large")
    free = push.spool.free_bytes()
    if free - size < push.min_free_bytes:
        return (Outcome.INTERNAL_ERROR, f"{free} bytes free on the spool's disk, below "
                f"{push.min_free_bytes} (STROKEWATCH_SCP__MIN_FREE_DISK_BYTES)", "disk full")
    return None


def _refused(push: PushServices, received: ReceivedInstance, header: InstanceHeader | None, status: StoreStatus,
             outcome: Outcome, message: str, comment: str) -> StoreResult:
    """A refusal: logged and recorded (one open failure per study and outcome, or per sender when the study is not
    known), answered with ``status`` and a short Error Comment."""
    study = header.study_uid if header is not None and is_dicom_uid(header.study_uid) else None
    subject = study or f"aet:{opaque_name(received.calling_aet)[:16]}"
    text = f"C-STORE from {received.calling_aet!r} refused ({status.name}): {message}"
    log.warning("%s", text)
    try:
        push.store.record_failure("receive", subject, outcome, text, False,
                                  {"calling_aet": received.calling_aet, "status": f"{int(status):04X}"})
    except Exception as exc:  # the database is down: the refusal itself still stands
        log.warning("recording the refusal failed: %s", describe_exception(exc, []))
    return StoreResult(status, comment[:_COMMENT_MAX])


def association_closed(push: PushServices, association: int, *, released: bool) -> list[str]:
    """An association ended (released or not); returns the studies it brought that no association holds open.
    Complete ones are registered by the next ``complete_due``."""
    with push.lock:
        return push.arrivals.association_closed(association, released=released, now=push.clock.now())


def recover(push: PushServices) -> list[str]:
    """At start-up: studies in the spool not completed before the SCP stopped (killed mid-association, or before
    their quiet period ended) are pending again; the quiet period after their newest instance completes them."""
    found: list[str] = []
    for study in push.spool.studies(pending_only=True):
        if study.complete or study.study_uid is None or study.files == 0:
            continue
        with push.lock:
            push.arrivals.recovered(study.study_uid, study.newest)
        found.append(study.study_uid)
    if found:
        log.info("spool: %d stud%s received before the last stop to complete", len(found),
                 "y" if len(found) == 1 else "ies")
    return found


def complete_due(push: PushServices) -> list[str]:
    """Register and queue every study that is complete now; returns those registered (or queued again)."""
    with push.lock:
        due = push.arrivals.take_due(push.clock.now())  # taken: the ticker and an association's end never both
    return [uid for uid in due if complete_study(push, uid)]


def complete_study(push: PushServices, study_uid: str) -> bool:
    """Register a complete study (source "scp") and queue its ingest; one already registered from the spool is
    ingested again (instances arrived after it was completed). False when it must be tried again later."""
    with push.lock:
        generation = push.arrivals.generation(study_uid)
        completed_at = push.arrivals.completed_since(study_uid)
    try:
        queued = _register(push, study_uid, completed_at)
    except Exception as exc:  # the database or the broker is down: the instances are safe; try again shortly
        log.warning("study %s: completion failed (%s); trying again", study_uid, describe_exception(exc, []))
        queued = None
    if queued is None:
        with push.lock:
            push.arrivals.postpone(study_uid, push.clock.now() + COMPLETION_RETRY)
        return False
    with push.lock:
        if push.arrivals.completed(study_uid, generation):
            push.spool.mark_complete(study_uid)
        else:  # an instance arrived meanwhile: the study completes again (and is ingested again) later
            log.info("study %s: more instances arrived while it was completed", study_uid)
    return queued


def _register(push: PushServices, study_uid: str, completed_at: datetime | None = None) -> bool | None:
    """True: queued for ingest; False: nothing to queue; None: try again later. ``completed_at``: when the study
    became complete (the stage ``detect`` runs from then to its registration)."""
    ref = push.spool.study_ref(study_uid)
    if ref is None:
        log.warning("study %s: no readable instance in the spool; nothing to register", study_uid)
        return False
    now = push.clock.now()
    completed_at = min(completed_at, now) if completed_at is not None else None
    if push.store.add_study(ref, SCP_SOURCE, now, completed_at):
        push.store.resolve_failures("receive", study_uid, now)
        log.info("study %s received by C-STORE is complete; queued for ingest", study_uid)
        push.enqueue("ingest", [study_uid])
        if completed_at is not None:
            record(push.store, [(stages.DETECT, (now - completed_at).total_seconds())])
        return True
    row = push.store.get_study(study_uid)
    if row is None:
        return None
    if row.source != SCP_SOURCE:
        log.info("study %s was pushed, and is already known from %s: it is ingested from there", study_uid,
                 row.source)
        return False
    if row.status is StudyStatus.PROCESSING:
        return None  # being ingested: queued again once that attempt ends
    if row.volume_path is not None and not push.store.clear_study_volume(study_uid, row.volume_path):
        return None
    if not push.store.requeue_study(study_uid):
        return None
    log.info("study %s received more instances after it was completed; queued for ingest again", study_uid)
    push.enqueue("ingest", [study_uid])
    return True
