"""Celery app, tasks and beat schedule. Tasks take ids, are idempotent, acknowledge late, and delegate.

Run: ``celery -A integration.entrypoints.worker:app worker -B`` (``strokewatch run`` does it for you).
Queues per stage: detect, ingest, vitals, assess, publish. Retries of transient failures are not kept in
the broker: the service records ``retry`` + ``next_attempt_at`` in the database and the ``sweep`` task
re-enqueues due work, so a lost message, a restarted broker or a killed worker loses nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any, TypeVar

from celery import Celery
from celery.signals import worker_init, worker_process_init
from kombu import transport as kombu_transport
from kombu.transport import sqlalchemy as kombu_sqla

from inference import contract as C
from integration.config import Settings, get_settings

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, and a FHIR Patient search carries the MRN in its query string.
for _noisy in ("httpx", "httpcore"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

QUEUES = ("detect", "ingest", "vitals", "assess", "publish")
F = TypeVar("F", bound=Callable[..., Any])


class FastSqlaTransport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport polls its table once a second; every task hop would cost up to 1 s."""

    polling_interval = 0.05


# The embedded broker URL stays the documented ``sqla+sqlite:///...``; only the poll interval changes.
kombu_transport.TRANSPORT_ALIASES["sqla"] = f"{__name__}:FastSqlaTransport"


def celery_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(10, settings.task_time_limit_s - 30),
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": "ingest",
        "task_routes": {**{f"strokewatch.{q}": {"queue": q} for q in QUEUES},
                        "strokewatch.prefetch": {"queue": "vitals"}},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "detect": {"task": "strokewatch.detect", "schedule": timedelta(seconds=settings.pacs.poll_seconds)},
            "poll-ehr": {"task": "strokewatch.poll_ehr", "schedule": timedelta(seconds=settings.ehr.poll_seconds)},
            "sweep": {"task": "strokewatch.sweep", "schedule": timedelta(seconds=5)},
            "prune": {"task": "strokewatch.prune", "schedule": timedelta(hours=settings.retention.interval_hours)},
            "rotate-logs": {
                "task": "strokewatch.rotate_logs",
                "schedule": timedelta(seconds=settings.retention.log_check_s),
            },
        },
        "beat_schedule_filename": str((settings.data_dir / "celerybeat-schedule").resolve()),
        "timezone": "UTC",
    }
    if settings.embedded_broker:
        conf["broker_transport_options"] = {"connect_args": {"timeout": 30}}
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # SQLite cannot create the broker file's folder
    return conf


app = Celery("strokewatch")


def _configuration() -> dict[str, Any]:
    """The app's configuration, read from the settings when Celery first needs it (in a worker, beat, or any
    process that sends a task). ``add_defaults`` with a callable is Celery's lazy hook; an ``on_configure`` handler
    that updates ``sender.conf`` re-enters the loading of that very configuration (RecursionError, logged by
    every API or SCP process at its first enqueue)."""
    # Any Celery process of the engine (worker, beat, started by `strokewatch run` or directly as in compose)
    # creates its files private: beat's schedule, logs, volumes hold or point at PHI.
    os.umask(0o077)
    return celery_config(get_settings())


app.add_defaults(_configuration)


_engine: Any = None


def engine() -> Any:
    """The per-process Engine (adapters, store, services), built on first use after fork."""
    global _engine
    if _engine is None:
        from celery.exceptions import SoftTimeLimitExceeded

        from integration.bootstrap import bootstrap
        from integration.services.handoff import Handoff

        pipeline = get_settings().pipeline
        _engine = bootstrap(migrate=False, enqueue=Handoff(enqueue, frozenset(pipeline.inline),
                                                           pipeline.max_inline_runs))
        _engine.services.interruptions = (SoftTimeLimitExceeded,)
    return _engine


def runs_on(fn: F) -> F:
    """A stage task whose hand-offs to the stages in ``pipeline.inline`` run in it, after its own work."""

    @wraps(fn)
    def run(*args: Any) -> Any:
        services = engine().services
        with services.enqueue.task(services):  # the engine's enqueue is its Handoff
            return fn(*args)

    return run  # type: ignore[return-value]


#: What every pool process imports for its first tasks (``engine()``'s bootstrap, the stages, their adapters and
#: libraries): imported once in the worker's main process before the pool forks, so the processes share it instead
#: of each spending a second of CPU on the same imports (seen as 6 % of a backlog's worker samples).
PRELOAD = (
    "integration.bootstrap",
    "integration.services.studies",
    "integration.services.vitals",
    "integration.services.assess",
    "integration.services.handoff",
    "integration.services.sweep",
    "integration.adapters.dicomweb",
    "integration.adapters.dimse",
    "integration.adapters.fhir",
    "integration.adapters.spool",
    "integration.adapters.dicom_results",
    "integration.adapters.db.store",
    "onnxruntime",
)


@worker_init.connect
def _migrate(**_: Any) -> None:
    """Once per worker, before the pool forks: bring the schema to head (a no-op when it already is), and import
    what the pool processes will (``PRELOAD``; nothing is connected or started by it)."""
    import importlib

    from integration.adapters.db.session import upgrade

    upgrade(get_settings().db_url)
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError as err:  # e.g. no onnxruntime where only Triton serves: the process imports what it uses
            log.info("not preloaded: %s (%s)", module, err)


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    global _engine
    _engine = None


def enqueue(stage: str, ids: list[str]) -> None:
    """Hand follow-up work to the queue: one task per id; assess takes batches of the model's max batch.

    Never raises: the database is the queue of record (a detected study, a leased vitals sync, a patient that needs
    assessment, a scored assessment), and the sweep sends again whatever was not done once its lease runs out. A
    broker that is down (restarting) must not turn finished work into a failure of the task that finished it."""
    if not ids:
        return
    if stage == "assess":
        batches: list[Any] = [list(ids[start : start + C.MAX_BATCH]) for start in range(0, len(ids), C.MAX_BATCH)]
    else:
        batches = list(ids)
    for sent, args in enumerate(batches):
        try:
            app.send_task(f"strokewatch.{stage}", args=[args])
        except Exception as err:  # kombu OperationalError, a refused connection, a timeout
            from integration.domain.redact import describe_exception  # URLs with credentials never reach the log

            log.warning("could not queue %d %s task(s) (%s); the sweep sends them again once their lease runs out",
                        len(batches) - sent, stage, describe_exception(err, []))
            return


def stage_task(name: str, **opts: Any) -> Callable[[F], F]:
    """One decorator for every task: name, queue, late ack, time limits, logging, no crash on bad input."""

    def wrap(fn: F) -> F:
        @wraps(fn)
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception:
                # Services record named outcomes themselves; anything reaching here is a bug or a peer
                # failure outside a service. Log and let the sweeper retry: the worker keeps going.
                log.exception("task %s failed", name)
                return None

        return app.task(name=f"strokewatch.{name}", bind=False, acks_late=True, **opts)(run)  # type: ignore[no-any-return]

    return wrap


@stage_task("detect")
def detect() -> int:
    from integration.services.studies import detect_studies

    return len(detect_studies(engine().services))


@stage_task("ingest")
@runs_on
def ingest(study_uid: str) -> str:
    from integration.services.studies import ingest_study

    return ingest_study(engine().services, study_uid).status


@stage_task("vitals")
@runs_on
def vitals(patient_fhir_id: str) -> int:
    from integration.domain.types import DomainError
    from integration.services.vitals import sync_vitals

    try:
        return sync_vitals(engine().services, patient_fhir_id).changed
    except DomainError:
        return 0  # recorded by the service; sweep retries patients whose vitals are not synced yet


@stage_task("prefetch")
def prefetch(study_uid: str) -> int:
    """A pushed study's first instance arrived: its patient's vitals are synced while the rest is on the wire."""
    from integration.services.vitals import prefetch_vitals

    result = prefetch_vitals(engine().services, study_uid)
    return 0 if result is None else result.changed


@stage_task("assess")
@runs_on
def assess(patient_ids: list[str]) -> int:
    from integration.services.assess import assess_batch

    return sum(r.status == "scored" for r in assess_batch(engine().services, patient_ids))


@stage_task("publish")
@runs_on
def publish(identifier: str) -> str:
    from integration.services.assess import publish as publish_service

    return publish_service(engine().services, identifier)


@stage_task("poll_ehr")
def poll_ehr() -> int:
    from integration.services.sweep import poll_ehr as poll

    return poll(engine().services)


@stage_task("sweep")
def sweep() -> dict[str, int]:
    """Release dead claims and re-enqueue everything whose retry time has come."""
    from dataclasses import asdict

    from integration.services.sweep import sweep as sweep_service

    return asdict(sweep_service(engine().services))


@stage_task("prune")
def prune() -> dict[str, int]:
    """Apply the retention settings (what `strokewatch db prune` does), in bounded transactions."""
    from integration.bootstrap import open_housekeeping
    from integration.services.retention import prune as prune_service

    with open_housekeeping(engine().settings, store=engine().store) as housekeeping:
        return prune_service(housekeeping).removed


@stage_task("rotate_logs")
def rotate_logs() -> list[str]:
    """Keep data_dir/logs/*.log (written by `strokewatch run` and `demo`) to retention.log_max_bytes."""
    from integration.entrypoints.logfiles import rotate_logs as rotate

    retention = get_settings().retention
    return rotate(get_settings().data_dir.resolve() / "logs", retention.log_max_bytes, retention.log_backups)


def worker_argv(settings: Settings, *, beat: bool = True, concurrency: int | None = None) -> list[str]:
    """The command line `strokewatch run` uses to start a worker process."""
    argv = [
        "celery",
        "-A",
        f"{__name__}:app",
        "worker",
        "--loglevel",
        settings.log_level,
        "--concurrency",
        str(concurrency or settings.worker_concurrency),
        "-Q",
        ",".join(QUEUES),
        "--hostname",
        f"strokewatch-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv.append("-B")
    return argv
