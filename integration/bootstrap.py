"""The composition root: the one place that turns Settings into concrete adapters and wires the services."""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from integration.config import AuthSettings, Settings, TlsSettings, get_settings, read_secret_file
from integration.domain.checks import CheckResult, env_name
from integration.domain.identity import use_pseudonym_key
from integration.domain.limits import ImageLimits
from integration.domain.policy import RiskPolicy
from integration.domain.redact import redact_text
from integration.domain.results import ResultsPolicy
from integration.domain.retention import RetentionPolicy
from integration.domain.series import SeriesRules
from integration.ports import Probe, ResultsArchive, RiskModel
from integration.services.context import Services, SystemClock

if TYPE_CHECKING:
    from inference.runtime.site import SiteCalibration
    from inference.runtime.transport import TritonTls
    from integration.adapters.db.lock import FileLock, PostgresLock
    from integration.adapters.db.store import SqlStore
    from integration.adapters.deid_export import ExportDirectory
    from integration.adapters.dicomweb import DicomWebPacs
    from integration.adapters.dimse import DimsePacs
    from integration.adapters.fhir import FhirEhr
    from integration.adapters.orthanc import OrthancChangeFeed
    from integration.adapters.smart_launch import SmartLauncher
    from integration.adapters.spool import FileSpool
    from integration.domain.deid import DeidKey
    from integration.services.deid import ExportSources
    from integration.services.push import PushServices
    from integration.services.retention import Housekeeping

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_tls(tls: TlsSettings, *setting: str) -> ssl.SSLContext:
    """The SSL context of one peer's clients (``setting``: where ``tls`` lives, e.g. "pacs", "tls")."""
    from integration.adapters.tls import ssl_context

    return ssl_context(tls, setting)


def build_smart_launch(settings: Settings) -> SmartLauncher | None:
    """The dashboard's SMART App Launch client, talking to the EHR with the EHR's TLS settings and timeout."""
    from integration.adapters.smart_launch import SmartLauncher

    client_id = settings.dashboard.smart_client_id
    if client_id is None or not settings.ehr.base_url:
        return None
    return SmartLauncher(settings.ehr.base_url, client_id, settings.dashboard.smart_scope,
                         timeout_s=settings.ehr.timeout_s, verify=build_tls(settings.ehr.tls, "ehr", "tls"))


def build_auth(
    auth: AuthSettings,
    tls: ssl.SSLContext | None = None,
    peer: str = "ehr",
    base_url: str | None = None,
    *,
    timeout_s: float = 30.0,
    retry_after_cap_s: float = 900.0,
) -> httpx.Auth | None:
    """``peer``'s credentials; an OAuth2 token endpoint is reached with ``tls``, the peer's SSL context, within
    ``auth.timeout_s`` (unset: ``timeout_s``, the peer's). ``base_url``: the FHIR base whose SMART configuration names
    the token endpoint (smart-backend). The endpoint's Retry-After is clamped to ``retry_after_cap_s``."""
    from integration.adapters.fhir_auth import BasicAuth, BearerAuth, ClientCredentialsAuth

    if auth.mode == "basic":
        assert auth.username and auth.password
        return BasicAuth(auth.username, auth.password.get_secret_value())
    if auth.mode == "bearer":
        assert auth.token
        return BearerAuth(auth.token.get_secret_value())
    if auth.mode == "oauth2":
        assert auth.token_url and auth.client_id and auth.client_secret
        return ClientCredentialsAuth(
            token_url=auth.token_url,
            client_id=auth.client_id,
            client_secret=auth.client_secret.get_secret_value(),
            scope=auth.scope,
            client_auth=auth.client_auth,
            tls=tls,
            tls_setting=env_name(peer, "tls"),
            timeout=auth.timeout_s or timeout_s,
            retry_after_cap_s=retry_after_cap_s,
        )
    if auth.mode == "smart-backend":
        return build_smart_auth(auth, tls, peer, base_url, timeout_s=auth.timeout_s or timeout_s,
                                retry_after_cap_s=retry_after_cap_s)
    return None


def build_smart_auth(auth: AuthSettings, tls: ssl.SSLContext | None, peer: str, base_url: str | None, *,
                     timeout_s: float = 30.0, retry_after_cap_s: float = 900.0) -> httpx.Auth:
    """SMART Backend Services: the private key is read now, so a wrong file or passphrase stops start-up with the
    setting to fix; the token URL (unless configured) is discovered from ``base_url`` on first use."""
    from integration.adapters.smart import SmartBackendAuth, key_alg, load_private_key, public_jwk

    assert auth.client_id and auth.private_key_file
    passphrase = auth.private_key_passphrase.get_secret_value() if auth.private_key_passphrase else None
    key = load_private_key(auth.private_key_file, passphrase, setting=env_name(peer, "auth", "private_key_file"))
    alg = key_alg(key, auth.alg, setting=env_name(peer, "auth", "alg"))
    return SmartBackendAuth(
        base_url,
        auth.client_id,
        key,
        alg=alg,
        kid=auth.kid or public_jwk(key, alg)["kid"],
        token_url=auth.token_url,
        scope=auth.scope,
        peer=peer,
        tls=tls,
        tls_setting=env_name(peer, "tls"),
        timeout=timeout_s,
        retry_after_cap_s=retry_after_cap_s,
    )


def build_model(settings: Settings) -> RiskModel:
    """Triton when STROKEWATCH_TRITON_URL is set, else ONNX Runtime in-process; recalibrated for STROKEWATCH_SITE
    when it is set (either runtime, the fallback included)."""
    calibration = site_calibration(settings)
    model = _build_runtime(settings)
    if calibration is None:
        return model
    from inference.runtime import SiteCalibratedModel

    return SiteCalibratedModel(model, calibration)


def site_calibration(settings: Settings) -> SiteCalibration | None:
    """STROKEWATCH_SITE's entry in the package's site_calibration.json (beside the model file); None when unset.
    Raises ValueError naming the known sites for an unknown one (start-up stops there)."""
    if not settings.site:
        return None
    from inference.runtime import DEFAULT_MODEL_PATH, load_site_calibration, site_calibration_path

    path = site_calibration_path(settings.model_path or DEFAULT_MODEL_PATH)
    return load_site_calibration(path, settings.site)


def model_threads(settings: Settings, cpus: int | None = None) -> int:
    """The embedded runtime's threads in one process: ``model_threads``, else the CPUs shared among the worker's
    processes (a process running the model alone still gets its share, not every CPU: the others may score too)."""
    if settings.model_threads:
        return settings.model_threads
    if cpus is None:  # the CPUs this process may run on (a container's cpuset), not the host's
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, settings.worker_concurrency))


def _build_runtime(settings: Settings) -> RiskModel:
    from inference.runtime import DEFAULT_MODEL_PATH, OnnxRuntimeModel

    model_path = settings.model_path or DEFAULT_MODEL_PATH
    threads = model_threads(settings)
    if not settings.triton_url:
        return OnnxRuntimeModel(model_path, intra_op_threads=threads)
    from inference.runtime import FallbackModel, TritonModel

    triton = TritonModel(
        settings.triton_url,
        protocol=settings.triton_protocol,
        model_name=settings.triton_model_name,
        model_version=settings.triton_model_version,
        timeout_s=settings.triton_timeout_s,
        tls=build_triton_tls(settings),
    )
    if settings.triton_fallback_to_embedded:
        return FallbackModel(triton, OnnxRuntimeModel(model_path, intra_op_threads=threads))
    return triton


def build_triton_tls(settings: Settings) -> TritonTls | None:
    """Triton's TLS from ``triton_tls`` for an https:// or grpcs:// STROKEWATCH_TRITON_URL (None for plaintext). The
    files are checked now, so a wrong path stops start-up; TLS settings with a plaintext URL are refused."""
    from inference.runtime.transport import TritonTls
    from integration.adapters.tls import ssl_context

    tls = settings.triton_tls
    url = (settings.triton_url or "").strip().lower()
    if not url.startswith(("https://", "grpcs://")):
        if tls != TlsSettings():
            raise ValueError(
                "STROKEWATCH_TRITON_TLS__* is set but STROKEWATCH_TRITON_URL is not https:// or grpcs://: "
                "use a TLS URL for the settings to apply, or remove them"
            )
        return None
    ssl_context(tls, ("triton_tls",))  # fail fast on a missing or unreadable file, naming the setting
    return TritonTls(
        http_context=partial(ssl_context, tls, ("triton_tls",)),
        verify=tls.verify,
        ca_bundle=str(tls.ca_bundle) if tls.ca_bundle else None,
        client_cert=str(tls.client_cert) if tls.client_cert else None,
        client_key=str(tls.client_key) if tls.client_key else None,
    )


class LazyModel:
    """Build the model on first use and keep it (one per process); a failed build is retried next time."""

    def __init__(self, factory: Callable[[], RiskModel]) -> None:
        self._factory = factory
        self._model: RiskModel | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> RiskModel | None:
        """The model if it has been built (closing must not build one)."""
        return self._model

    def __call__(self) -> RiskModel:
        with self._lock:
            if self._model is None:
                self._model = self._factory()
            return self._model


def close_all(closers: list[Callable[[], None]]) -> None:
    """Close what an engine opened, each best-effort (one failing does not keep the others open)."""
    for closer in closers:
        try:
            closer()
        except Exception:  # closing best-effort
            log.debug("close failed", exc_info=True)


@dataclass
class Engine:
    """Everything an entrypoint needs. Build with ``bootstrap()``; close with ``close()``."""

    settings: Settings
    store: SqlStore
    services: Services
    pacs: DicomWebPacs | DimsePacs
    ehr: FhirEhr
    feed: OrthancChangeFeed | None
    model: LazyModel
    #: The dashboard's SMART App Launch client (``dashboard.smart_client_id``); None when not configured.
    smart_launch: SmartLauncher | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        close_all(self._closers)


def _orthanc_root(settings: Settings) -> str | None:
    pacs = settings.pacs
    if pacs.orthanc_url:
        return pacs.orthanc_url.rstrip("/")
    if pacs.dicomweb_url and pacs.dicomweb_url.rstrip("/").endswith("/dicom-web"):
        return pacs.dicomweb_url.rstrip("/")[: -len("/dicom-web")]
    return None


def build_store(settings: Settings, *, migrate: bool = False) -> SqlStore:
    """The database as the Store port (the schema brought to head first when ``migrate``)."""
    from integration.adapters.db.session import make_engine, upgrade
    from integration.adapters.db.store import SqlStore

    private_data_dir(settings.data_dir)
    if migrate:
        upgrade(settings.db_url)
    db = settings.db
    engine = make_engine(settings.db_url, connect_timeout_s=db.connect_timeout_s,
                         statement_timeout_s=db.statement_timeout_s, sqlite_busy_timeout_s=db.sqlite_busy_timeout_s)
    return SqlStore(engine)


def build_beat_lock(settings: Settings) -> PostgresLock | FileLock:
    """The lock that keeps one Celery beat across hosts: a PostgreSQL advisory lock on the engine's database (a file
    lock in data_dir for SQLite, which is one host's anyway). ``try_acquire()``, ``held()``, ``release()``."""
    from integration.adapters.db.lock import singleton_lock

    return singleton_lock(settings.db_url, "beat", settings.data_dir, connect_timeout_s=settings.db.connect_timeout_s)


def quiet_dicom_validation() -> None:
    """pydicom's warnings about a malformed value quote the value (a PatientID read from a pushed file is an MRN):
    values are read without validation, so no such warning reaches a log. Also a few percent of each decode."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def bootstrap(
    settings: Settings | None = None, *, migrate: bool = True, enqueue: Callable[[str, list[str]], None] | None = None
) -> Engine:
    from integration.adapters.orthanc import is_orthanc

    settings = settings or get_settings()
    store = build_store(settings, migrate=migrate)
    db_engine = store.engine
    use_pseudonym_key(pseudonym_key(settings))
    redact_log_records()
    quiet_dicom_validation()

    if not settings.pacs.dicomweb_url and settings.pacs.kind != "dimse":
        raise ValueError("STROKEWATCH_PACS__DICOMWEB_URL is not set (the PACS's DICOMweb base URL)")
    if not settings.ehr.base_url:
        raise ValueError("STROKEWATCH_EHR__BASE_URL is not set (the FHIR R4 base URL)")
    pacs: DicomWebPacs | DimsePacs
    feed = None
    if settings.pacs.kind == "dimse":
        pacs = build_dimse_pacs(settings)
    else:
        pacs_tls = build_tls(settings.pacs.tls, "pacs", "tls")
        pacs_auth = build_pacs_auth(settings, pacs_tls)
        pacs = build_pacs(settings, pacs_auth, pacs_tls)
        root = _orthanc_root(settings)
        if settings.pacs.kind == "orthanc" or (
            settings.pacs.kind == "auto"
            and root
            and is_orthanc(root, auth=pacs_auth, timeout=min(5.0, settings.pacs.timeout_s), tls=pacs_tls)
        ):
            if root is None:
                raise ValueError("pacs.kind=orthanc needs STROKEWATCH_PACS__ORTHANC_URL")
            feed = build_feed(settings, root, pacs_auth, pacs_tls)
    ehr = build_ehr(settings)
    site_calibration(settings)  # an unknown STROKEWATCH_SITE stops start-up here, not at the first score
    model = LazyModel(lambda: build_model(settings))
    policy = RiskPolicy(**settings.policy.model_dump())
    rules = SeriesRules(min_slices=settings.pacs.min_slices)
    if settings.pacs.head_pattern:
        rules = SeriesRules(min_slices=settings.pacs.min_slices, head_pattern=settings.pacs.head_pattern)
    spool = build_spool(settings)
    services = Services(
        store=store,
        pacs=pacs,
        ehr=ehr,
        model=model,
        volumes_dir=settings.data_dir / "volumes",
        policy=policy,
        rules=rules,
        feed=feed,
        identifier_system_for=settings.identifier_system_for,
        assessment_identifier_system=settings.assessment_identifier_system,
        lookback_hours=settings.pacs.lookback_hours,
        clock_skew_s=settings.pacs.clock_skew_s,
        changes_from_beginning=settings.pacs.changes_from_beginning,
        feed_reconcile_s=settings.pacs.reconcile_s,
        explain=settings.explain_drivers,
        retry_backoff_s=settings.retry_backoff_s,
        held_retry_s=settings.held_retry_s,
        max_retries=settings.max_task_retries,
        stale_claim_s=settings.stale_claim_s,
        max_lost_claims=settings.max_lost_claims,
        redeliver_after_s=settings.redeliver_after_s,
        limits=image_limits(settings),
        spool=spool,
        spooled_sources=spool,
        latency_snapshot_s=settings.dashboard.latency_snapshot_s,
        latency_snapshots_kept=settings.dashboard.latency_snapshots_kept,
        archive=build_results_archive(pacs),
        results=results_policy(settings),
        alert_flags=settings.alerts.flag,
    )
    # The ingest builds the model's volume: planes are decoded as block means (a 512^2 plane never in float32).
    for reader in (pacs, services.spool, getattr(pacs, "spool", None)):
        if reader is not None:
            reader.reduce_planes = True  # type: ignore[union-attr]
    if enqueue is not None:
        services.enqueue = enqueue
    engine = Engine(settings, store, services, pacs, ehr, feed, model, smart_launch=build_smart_launch(settings))
    engine._closers.append(db_engine.dispose)
    if engine.smart_launch is not None:
        engine._closers.append(engine.smart_launch.close)
    for adapter in (pacs, ehr, feed):
        close = getattr(adapter, "close", None)
        if callable(close):
            engine._closers.append(close)
    return engine


# -- retention: what `strokewatch db prune` and the scheduled prune delete ----------------------------------


def retention_policy(settings: Settings) -> RetentionPolicy:
    """The ``retention`` settings as the domain's policy."""
    r = settings.retention
    return RetentionPolicy(
        vitals=timedelta(days=r.vitals_days),
        resolved_failures=timedelta(days=r.resolved_failures_days),
        superseded_assessments=timedelta(days=r.superseded_assessments_days),
        volumes=timedelta(days=r.volumes_days),
        broker_messages=timedelta(hours=r.broker_messages_hours),
        spool=timedelta(days=r.spool_days),
        batch_size=r.batch_size,
    )


@contextmanager
def open_housekeeping(settings: Settings, *, store: SqlStore | None = None) -> Iterator[Housekeeping]:
    """What a prune needs: the store (``store``, or one opened here and closed on exit), the volumes folder, the
    policy and, with the embedded broker, its message table (closed on exit)."""
    from integration.adapters.broker import EmbeddedBrokerMessages
    from integration.services.retention import Housekeeping

    with ExitStack() as opened:
        if store is None:
            store = build_store(settings)
            opened.callback(store.engine.dispose)
        broker = None
        if settings.embedded_broker:
            broker = EmbeddedBrokerMessages(settings.celery_broker_url)
            opened.callback(broker.close)
        yield Housekeeping(store, settings.data_dir / "volumes", retention_policy(settings), SystemClock(), broker,
                           build_spool(settings))


# -- the C-STORE SCP: its spool, its use cases, its TLS ------------------------------------------------------


def build_spool(settings: Settings) -> FileSpool:
    """The C-STORE spool (``data_dir/spool``): written by the SCP, read as a PACS by the ingest of pushed studies.
    Building it touches no disk; the SCP and the workers must share ``data_dir``."""
    from integration.adapters.spool import FileSpool

    return FileSpool(settings.data_dir / "spool", limits=image_limits(settings),
                     study_timezone=settings.pacs.study_zone(), max_instance_bytes=settings.scp.max_instance_bytes)


@dataclass
class PushEngine:
    """What the SCP process needs: its use cases (store, spool, completion) and what to close. No PACS, no EHR."""

    settings: Settings
    store: SqlStore
    push: PushServices
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        close_all(self._closers)


def bootstrap_push(settings: Settings | None = None, *, enqueue: Callable[[str, list[str]], None] | None = None,
                   migrate: bool = True) -> PushEngine:
    """The SCP's composition: the database, the spool and the completion rule from ``scp`` settings."""
    from integration.domain.push import StudyArrivals
    from integration.services.push import PushServices

    settings = settings or get_settings()
    store = build_store(settings, migrate=migrate)
    use_pseudonym_key(pseudonym_key(settings))
    redact_log_records()
    quiet_dicom_validation()  # the SCP parses the header of every data set it receives
    scp = settings.scp
    push = PushServices(
        store=store,
        spool=build_spool(settings),
        arrivals=StudyArrivals(timedelta(seconds=scp.quiet_period_s), frozenset(scp.per_series_senders)),
        clock=SystemClock(),
        limits=image_limits(settings),
        max_instance_bytes=scp.max_instance_bytes,
        min_free_bytes=scp.min_free_disk_bytes,
        accept_other_sop_classes=scp.accept_other_sop_classes,
        prefetch_vitals=settings.pipeline.prefetch_vitals,
    )
    if enqueue is not None:
        push.enqueue = enqueue
    engine = PushEngine(settings, store, push)
    engine._closers.append(store.engine.dispose)
    return engine


def scp_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's TLS server context (``scp.tls``), or None for plain DIMSE. A missing or wrong file stops start-up
    naming the setting."""
    from integration.adapters.tls import server_context

    tls = settings.scp.tls
    if tls.cert is None:
        return None
    return server_context(tls.cert, tls.key, tls.client_ca, tls.require_client_cert, ("scp", "tls"))


def _scp_probe(settings: Settings) -> Probe:
    """doctor's look at the SCP: a C-ECHO as an allowed sender (over TLS trusting exactly the SCP's certificate), the
    spool's free disk, and what guards the door."""
    from integration.adapters.scp_probe import ScpProbe

    scp = settings.scp
    notes: list[str] = [f"senders allowed: {', '.join(scp.allowed_calling_aets)}" if scp.allowed_calling_aets
                        else "any calling AE title (sandbox, loopback only)"]
    if scp.allowed_hosts:
        notes.append(f"from {', '.join(scp.allowed_hosts)}")
    notes = ["; ".join(notes)]
    client: ssl.SSLContext | None = None
    if scp.tls.cert is not None:
        try:
            scp_tls_context(settings)  # the SCP's own files: a wrong one is what it would refuse to start with
        except ValueError as err:
            return _stated(CheckResult("scp", False, f"TLS: {err}", _FIX_NAMED))
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        client.check_hostname = False  # the pinned certificate is the identity check
        client.load_verify_locations(cafile=str(scp.tls.cert))
        client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    elif scp.host not in ("127.0.0.1", "localhost", "::1"):
        notes.append(f"warning: plain DIMSE on {scp.host}: the calling AE title alone admits a sender; set "
                     f"{env_name('scp', 'tls', 'cert')} (DICOM TLS) and {env_name('scp', 'allowed_hosts')}")
    calling = scp.allowed_calling_aets[0] if scp.allowed_calling_aets else "STROKEWATCH-DR"
    return ScpProbe(scp.host, scp.port, scp.ae_title, calling, spool_dir=settings.data_dir / "spool",
                    min_free_bytes=scp.min_free_disk_bytes, tls=client,
                    client_cert_required=scp.tls.require_client_cert, notes=tuple(notes))


# -- preflight: the probes `strokewatch doctor` and /health/ready run ---------------------------------------


@dataclass(frozen=True)
class BoundProbe:
    """A ``Probe`` from a callable taking ``quick``: an adapter's probe with what it reports bound in."""

    name: str
    check: Callable[..., list[CheckResult]]

    def probe(self, *, quick: bool) -> list[CheckResult]:
        return self.check(quick=quick)


def results_policy(settings: Settings) -> ResultsPolicy:
    cfg = settings.pacs_results
    return ResultsPolicy(
        enabled=cfg.enabled,
        bands=frozenset(cfg.bands),
        heatmap=cfg.heatmap,
        sr_series_description=cfg.sr_series_description,
        heatmap_series_description=cfg.heatmap_series_description,
        disclaimer=cfg.disclaimer,
    )


def build_results_archive(pacs: DicomWebPacs | DimsePacs) -> ResultsArchive:
    """Where the SR and the heat-map series go: the PACS the studies come from, by STOW-RS (C-STORE for a
    DIMSE-only PACS). Built also with ``pacs_results.enabled`` false: the dashboard's heat-map reads the source
    series through it (``ResultsPolicy.enabled`` decides what is written)."""
    from integration.adapters.dicom_results import DicomWebResults, DimseResults
    from integration.adapters.dimse import DimsePacs

    if isinstance(pacs, DimsePacs):
        return DimseResults(pacs)
    return DicomWebResults(pacs)


def build_pacs(settings: Settings, auth: httpx.Auth | None, tls: ssl.SSLContext | None = None) -> DicomWebPacs:
    """The PACS adapter as ``bootstrap()`` builds it (STROKEWATCH_PACS__DICOMWEB_URL must be set); ``tls``: the
    PACS's SSL context when the caller shares one with the feed and the token endpoint, else built from pacs.tls."""
    from integration.adapters.dicomweb import DicomWebPacs

    assert settings.pacs.dicomweb_url
    return DicomWebPacs(
        settings.pacs.dicomweb_url,
        auth=auth,
        timeout=settings.pacs.timeout_s,
        tls=tls or build_tls(settings.pacs.tls, "pacs", "tls"),
        study_timezone=settings.pacs.study_zone(),
        limits=image_limits(settings),
        retrieve_deadline_s=settings.pacs.retrieve_deadline_s,
        retry_after_cap_s=settings.retry_after_cap_s,
    )


def build_dimse_pacs(settings: Settings) -> DimsePacs:
    """The PACS over DIMSE (``pacs.kind=dimse``, ``pacs.dimse``): C-FIND, then C-GET on the same association or
    C-MOVE to our C-STORE SCP (``scp.ae_title`` unless ``move_destination``), whose spool it then reads."""
    from integration.adapters.dimse import DimsePacs

    dimse = settings.pacs.dimse
    assert dimse.host and dimse.called_aet
    notes: list[CheckResult] = []
    if dimse.retrieve == "c-move" and not settings.scp.enabled:
        notes.append(CheckResult(
            "pacs retrieval", True, f"warning: C-MOVE needs this engine's C-STORE SCP running: set "
            f"{env_name('scp', 'enabled')}=true (or run `strokewatch scp` beside the workers, sharing data_dir)",
            f"or {env_name('pacs', 'dimse', 'retrieve')}=c-get", warning=True))
    return DimsePacs(
        dimse.host, dimse.port, dimse.called_aet, dimse.calling_aet,
        retrieve=dimse.retrieve,
        move_destination=dimse.move_destination or settings.scp.ae_title,
        spool=build_spool(settings) if dimse.retrieve == "c-move" else None,
        tls=build_tls(dimse.tls, "pacs", "dimse", "tls") if dimse.use_tls else None,
        connect_timeout_s=dimse.connect_timeout_s,
        acse_timeout_s=dimse.acse_timeout_s,
        dimse_timeout_s=dimse.dimse_timeout_s,
        network_timeout_s=dimse.network_timeout_s,
        retrieve_deadline_s=settings.pacs.retrieve_deadline_s,
        max_pdu_bytes=dimse.max_pdu_bytes,
        max_find_results=dimse.max_find_results,
        study_timezone=settings.pacs.study_zone(),
        limits=image_limits(settings),
        notes=tuple(notes),
    )


def build_pacs_auth(settings: Settings, tls: ssl.SSLContext | None) -> httpx.Auth | None:
    """The PACS's credentials; its token endpoint (if any) with the PACS's TLS and timeouts."""
    return build_auth(settings.pacs.auth, tls, "pacs", timeout_s=settings.pacs.timeout_s,
                      retry_after_cap_s=settings.retry_after_cap_s)


def image_limits(settings: Settings) -> ImageLimits:
    """The caps on images, series and multipart answers (``limits``; the FHIR one goes to the EHR client)."""
    return ImageLimits(**settings.limits.model_dump(exclude={"max_fhir_resources_per_sync"}))


def build_feed(
    settings: Settings, root: str, auth: httpx.Auth | None, tls: ssl.SSLContext | None = None
) -> OrthancChangeFeed:
    """Orthanc's change feed with the PACS's credentials, timeout and TLS (pacs.tls: CA, client certificate)."""
    from integration.adapters.orthanc import OrthancChangeFeed

    return OrthancChangeFeed(
        root, auth=auth, timeout=settings.pacs.timeout_s, tls=tls or build_tls(settings.pacs.tls, "pacs", "tls")
    )


def build_ehr(settings: Settings) -> FhirEhr:
    """The EHR adapter as ``bootstrap()`` builds it (STROKEWATCH_EHR__BASE_URL must be set)."""
    from integration.adapters.fhir import FhirEhr

    ehr = settings.ehr
    assert ehr.base_url
    tls = build_tls(ehr.tls, "ehr", "tls")  # the FHIR server and its OAuth2 token endpoint
    return FhirEhr(
        ehr.base_url,
        auth=build_auth(ehr.auth, tls, "ehr", base_url=ehr.base_url, timeout_s=ehr.timeout_s,
                        retry_after_cap_s=settings.retry_after_cap_s),
        timeout=ehr.timeout_s,
        max_retries=ehr.max_retries,
        backoff=ehr.backoff_s,
        page_size=ehr.page_size,
        create_mode=ehr.create_mode,
        incremental=ehr.incremental,
        max_retry_after=ehr.max_retry_after_s,
        retry_after_cap_s=settings.retry_after_cap_s,
        tls=tls,
        max_resources=settings.limits.max_fhir_resources_per_sync,
    )


@contextmanager
def open_probes(settings: Settings, *, engine: Engine | None = None, timeout_s: float = 10.0) -> Iterator[list[Probe]]:
    """The probes in report order: database, broker, pacs (with the change feed), scp (doctor, when enabled), ehr,
    model.

    With ``engine`` (readiness), they check that running engine's own store, adapters and model. Without,
    the adapters are built from ``settings`` as ``bootstrap()`` builds them (same auth, timeouts, TLS
    verification) and closed on exit; a PACS or EHR without a URL is a failed check naming the setting.
    ``timeout_s`` bounds the broker connection, which the engine does not hold.
    """
    from inference.runtime import DEFAULT_MODEL_PATH
    from integration.adapters.broker import BrokerProbe
    from integration.adapters.db.session import DatabaseProbe
    from integration.adapters.model_probe import ModelProbe

    broker = BrokerProbe(settings.celery_broker_url, timeout_s=timeout_s)
    model_path = Path(settings.model_path or DEFAULT_MODEL_PATH)
    if engine is not None:
        pacs = _pacs_probe(settings, engine.pacs, engine.feed)
        model = ModelProbe(engine.model, model_path=model_path)
        yield [DatabaseProbe(engine.store.engine), broker, pacs, engine.ehr, model]
        return
    with ExitStack() as opened:
        store = build_store(settings)
        opened.callback(store.engine.dispose)
        lazy = LazyModel(lambda: build_model(settings))
        opened.callback(_close_model, lazy)
        model = ModelProbe(lazy, model_path=model_path)
        probes: list[Probe] = [DatabaseProbe(store.engine), broker, _fresh_pacs(settings, opened),
                               _fresh_ehr(settings, opened), model]
        if settings.scp.enabled:
            probes.insert(3, _scp_probe(settings))
        yield probes


def _fresh_pacs(settings: Settings, opened: ExitStack) -> Probe:
    if settings.pacs.kind == "dimse":
        try:
            return _pacs_probe(settings, build_dimse_pacs(settings), None)
        except ValueError as err:  # a TLS file missing or unreadable: the message names the setting
            return _stated(CheckResult("pacs", False, f"cannot build its client: {err}", _FIX_NAMED))
    if not settings.pacs.dicomweb_url:
        missing = CheckResult("pacs", False, "no DICOMweb URL configured", f"set {env_name('pacs', 'dicomweb_url')}")
        return _stated(missing)
    try:
        tls = build_tls(settings.pacs.tls, "pacs", "tls")
    except ValueError as err:  # a certificate file missing or unreadable: the message names the setting
        return _stated(CheckResult("pacs", False, f"cannot build its client: {err}", _FIX_NAMED))
    auth = build_pacs_auth(settings, tls)
    opened.callback(_close, auth)
    pacs = build_pacs(settings, auth, tls)
    opened.callback(pacs.close)
    root = _orthanc_root(settings)
    feed = None
    if settings.pacs.kind != "generic" and root is not None:  # kind=auto: the probe finds out, as bootstrap() does
        feed = build_feed(settings, root, auth, tls)
        opened.callback(feed.close)
    return _pacs_probe(settings, pacs, feed)


def _pacs_probe(settings: Settings, pacs: DicomWebPacs | DimsePacs, feed: OrthancChangeFeed | None) -> Probe:
    """The PACS probe, followed (doctor) by how new studies are found: Orthanc's /changes, QIDO-RS or C-FIND polling."""
    from integration.adapters import dimse
    from integration.adapters.orthanc import orthanc_missing, polling_result

    kind = settings.pacs.kind
    polls = dimse.polling_result if kind == "dimse" else polling_result
    polling = polls(settings.pacs.poll_seconds, settings.pacs.lookback_hours)
    if feed is not None:
        feed_probe: Probe = BoundProbe(feed.name, partial(feed.probe, fallback=polling if kind == "auto" else None))
    else:
        feed_probe = _stated(orthanc_missing(None) if kind == "orthanc" else polling)
    return BoundProbe(pacs.name, partial(pacs.probe, feed=feed_probe))


def _fresh_ehr(settings: Settings, opened: ExitStack) -> Probe:
    if not settings.ehr.base_url:
        return _stated(CheckResult("ehr", False, "no FHIR base URL configured", f"set {env_name('ehr', 'base_url')}"))
    try:
        ehr = build_ehr(settings)
    except ValueError as err:  # a certificate file missing or unreadable: the message names the setting
        return _stated(CheckResult("ehr", False, f"cannot build its client: {err}", _FIX_NAMED))
    opened.callback(ehr.close)  # closes its auth too
    return ehr


_FIX_NAMED = "fix the file or the setting named"


def _stated(result: CheckResult) -> BoundProbe:
    """A probe whose answer is known without asking a peer (a setting is missing; no feed to check)."""
    return BoundProbe(result.name, lambda *, quick: [result])


def _close(resource: object) -> None:
    close = getattr(resource, "close", None)
    if callable(close):
        close()


def _close_model(lazy: LazyModel) -> None:
    model = lazy.built  # only what the probe built
    for part in (model, getattr(model, "primary", None), getattr(model, "fallback", None)):
        _close(part)


# -- secrets and PHI kept in -------------------------------------------------------------------------------

PSEUDONYM_KEY_FILE = "pseudonym.key"


def private_data_dir(data_dir: Path) -> None:
    """data_dir holds PHI (database, volumes, logs) and the pseudonym key: created 0700; when it exists, it and
    what lies directly in it (the databases, Celery beat's schedule, logs/, volumes/) lose any group and other
    permission, like a umask of 077 would have given them. What the engine writes later is private from the start."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in (data_dir, *data_dir.iterdir()):
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISLNK(info.st_mode) and mode & 0o077 and info.st_uid == os.getuid():
            try:
                entry.chmod(mode & 0o700)
            except OSError as err:  # e.g. a file system without modes: say so, keep going
                log.warning("cannot make %s private (%s)", entry, err.strerror)


def pseudonym_key(settings: Settings) -> bytes:
    """The key of the pseudonyms in logs and messages: ``privacy.pseudonym_key``, else ``data_dir/pseudonym.key``,
    made on first start (256 random bits, hex, 0600) and reused, so pseudonyms are stable across restarts.
    Processes starting together agree on one key: each writes its own aside and links it into place, and the
    first link wins. The key is never logged."""
    if settings.privacy.pseudonym_key is not None:
        return settings.privacy.pseudonym_key.get_secret_value().encode()
    path = settings.data_dir / PSEUDONYM_KEY_FILE
    fix = f"fix the file's permissions or set {env_name('privacy', 'pseudonym_key')} (or its _FILE variable)"
    if not path.exists():
        aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            with os.fdopen(os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
            try:
                os.link(aside, path)  # atomic, and never replaces a key another process linked first
            except FileExistsError:
                pass
            finally:
                aside.unlink()
        except OSError as err:
            raise ValueError(f"cannot create the pseudonym key {path} ({err.strerror}); {fix}") from None
    try:
        key = read_secret_file(path, f"the pseudonym key {path}")
    except ValueError as err:
        raise ValueError(f"{err}; {fix}") from None
    if len(key) < 32:
        raise ValueError(f"the pseudonym key {path} is shorter than 32 characters; {fix}")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    return key.encode()


class _RedactingRecordFactory:
    """Log records with credentials redacted (``redact_text``: URL passwords, tokens, secret parameters), also
    in third-party libraries' messages and in tracebacks. Installed once per process by ``bootstrap``."""

    def __init__(self, inner: Callable[..., logging.LogRecord]) -> None:
        self.inner = inner

    def __call__(self, *args: object, **kwargs: object) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: the handler reports it as it always would
            return record
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if isinstance(record.exc_info, tuple) and record.exc_info[1] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record


def redact_log_records() -> None:
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(factory))


# -- the de-identified research export (`strokewatch deid export`) -------------------------------------------


def deid_key(settings: Settings) -> DeidKey:
    """The export's site key (``privacy.deid_key``). Missing or a placeholder: a DeidKeyError naming the setting,
    never the value. Unlike the log pseudonym key it is never generated: pseudonyms must stay stable across runs
    and hosts, so the site keeps it (and only it can re-link an export to its patients)."""
    from integration.domain.deid import DeidKey, DeidKeyError

    setting = env_name("privacy", "deid_key")
    if settings.privacy.deid_key is None:
        raise DeidKeyError(f"no de-identification key: set {setting} (or {setting}_FILE, or the file privacy__deid_key "
                           "in STROKEWATCH_SECRETS_DIR) to a random value of at least 32 characters, e.g. "
                           "`openssl rand -hex 32`, and keep it: the same key gives the same pseudonyms")
    try:
        return DeidKey(settings.privacy.deid_key.get_secret_value().encode())
    except DeidKeyError as err:
        raise DeidKeyError(f"{setting}: {err}") from None


@contextmanager
def open_deid_export(settings: Settings, out: Path) -> Iterator[tuple[ExportSources, ExportDirectory]]:
    """What ``services.deid.export`` needs, from the engine's own settings: the PACS (and its archive reader for
    whole instances), the EHR, the database's catalogue, the site key, and the output directory; closed on exit."""
    from integration.adapters.db.catalogue import SqlExportCatalogue
    from integration.adapters.deid_export import ExportDirectory
    from integration.services.deid import ExportSources

    key = deid_key(settings)  # before any peer is asked: a missing key stops the export at once
    redact_log_records()
    quiet_dicom_validation()
    if not settings.ehr.base_url:
        raise ValueError("STROKEWATCH_EHR__BASE_URL is not set (the FHIR R4 base URL)")
    with ExitStack() as opened:
        store = build_store(settings)
        opened.callback(store.engine.dispose)
        pacs: DicomWebPacs | DimsePacs
        if settings.pacs.kind == "dimse":
            pacs = build_dimse_pacs(settings)
        else:
            if not settings.pacs.dicomweb_url:
                raise ValueError("STROKEWATCH_PACS__DICOMWEB_URL is not set (the PACS's DICOMweb base URL)")
            tls = build_tls(settings.pacs.tls, "pacs", "tls")
            auth = build_pacs_auth(settings, tls)
            opened.callback(_close, auth)
            pacs = build_pacs(settings, auth, tls)
        opened.callback(_close, pacs)
        ehr = build_ehr(settings)
        opened.callback(ehr.close)
        sources = ExportSources(ehr=ehr, pacs=pacs, archive=build_results_archive(pacs),
                                catalogue=SqlExportCatalogue(store.sessions), key=key, clock=SystemClock())
        yield sources, ExportDirectory(out, key)
