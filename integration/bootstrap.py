"""The composition root: the one place that turns Settings into concrete adapters and wires the services."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from integration.config import AuthSettings, Settings, get_settings
from integration.domain.checks import CheckResult, env_name
from integration.domain.policy import RiskPolicy
from integration.domain.series import SeriesRules
from integration.ports import Probe, RiskModel
from integration.services.context import Services

if TYPE_CHECKING:
    from integration.adapters.db.store import SqlStore
    from integration.adapters.dicomweb import DicomWebPacs
    from integration.adapters.fhir import FhirEhr
    from integration.adapters.orthanc import OrthancChangeFeed

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_auth(auth: AuthSettings, verify: bool = True) -> httpx.Auth | None:
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
            verify=verify,
        )
    return None


def build_model(settings: Settings) -> RiskModel:
    """Triton when STROKEWATCH_TRITON_URL is set, else ONNX Runtime in-process."""
    from inference.runtime import DEFAULT_MODEL_PATH, OnnxRuntimeModel

    model_path = settings.model_path or DEFAULT_MODEL_PATH
    if not settings.triton_url:
        return OnnxRuntimeModel(model_path)
    from inference.runtime import FallbackModel, TritonModel

    triton = TritonModel(
        settings.triton_url,
        protocol=settings.triton_protocol,
        model_name=settings.triton_model_name,
        model_version=settings.triton_model_version,
        timeout_s=settings.triton_timeout_s,
    )
    if settings.triton_fallback_to_embedded:
        return FallbackModel(triton, OnnxRuntimeModel(model_path))
    return triton


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


@dataclass
class Engine:
    """Everything an entrypoint needs. Build with ``bootstrap()``; close with ``close()``."""

    settings: Settings
    store: SqlStore
    services: Services
    pacs: DicomWebPacs
    ehr: FhirEhr
    feed: OrthancChangeFeed | None
    model: LazyModel
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for closer in self._closers:
            try:
                closer()
            except Exception:  # closing best-effort
                log.debug("close failed", exc_info=True)


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

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        upgrade(settings.db_url)
    return SqlStore(make_engine(settings.db_url))


def bootstrap(
    settings: Settings | None = None, *, migrate: bool = True, enqueue: Callable[[str, list[str]], None] | None = None
) -> Engine:
    from integration.adapters.orthanc import is_orthanc

    settings = settings or get_settings()
    store = build_store(settings, migrate=migrate)
    db_engine = store.engine

    if not settings.pacs.dicomweb_url:
        raise ValueError("STROKEWATCH_PACS__DICOMWEB_URL is not set (the PACS's DICOMweb base URL)")
    if not settings.ehr.base_url:
        raise ValueError("STROKEWATCH_EHR__BASE_URL is not set (the FHIR R4 base URL)")
    pacs_auth = build_auth(settings.pacs.auth, settings.pacs.verify_tls)
    pacs = build_pacs(settings, pacs_auth)
    feed = None
    root = _orthanc_root(settings)
    if settings.pacs.kind == "orthanc" or (
        settings.pacs.kind == "auto"
        and root
        and is_orthanc(root, auth=pacs_auth, timeout=min(5.0, settings.pacs.timeout_s), verify=settings.pacs.verify_tls)
    ):
        if root is None:
            raise ValueError("pacs.kind=orthanc needs STROKEWATCH_PACS__ORTHANC_URL")
        feed = build_feed(settings, root, pacs_auth)
    ehr = build_ehr(settings)
    model = LazyModel(lambda: build_model(settings))
    policy = RiskPolicy(**settings.policy.model_dump())
    rules = SeriesRules(min_slices=settings.pacs.min_slices)
    if settings.pacs.head_pattern:
        rules = SeriesRules(min_slices=settings.pacs.min_slices, head_pattern=settings.pacs.head_pattern)
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
        explain=settings.explain_drivers,
        retry_backoff_s=settings.retry_backoff_s,
        held_retry_s=settings.held_retry_s,
        max_retries=settings.max_task_retries,
        stale_claim_s=settings.stale_claim_s,
    )
    if enqueue is not None:
        services.enqueue = enqueue
    engine = Engine(settings, store, services, pacs, ehr, feed, model)
    engine._closers.append(db_engine.dispose)
    for adapter in (pacs, ehr, feed):
        close = getattr(adapter, "close", None)
        if callable(close):
            engine._closers.append(close)
    return engine


# -- preflight: the probes `strokewatch doctor` and /health/ready run ---------------------------------------


@dataclass(frozen=True)
class BoundProbe:
    """A ``Probe`` from a callable taking ``quick``: an adapter's probe with what it reports bound in."""

    name: str
    check: Callable[..., list[CheckResult]]

    def probe(self, *, quick: bool) -> list[CheckResult]:
        return self.check(quick=quick)


def build_pacs(settings: Settings, auth: httpx.Auth | None) -> DicomWebPacs:
    """The PACS adapter as ``bootstrap()`` builds it (STROKEWATCH_PACS__DICOMWEB_URL must be set)."""
    from integration.adapters.dicomweb import DicomWebPacs

    assert settings.pacs.dicomweb_url
    return DicomWebPacs(
        settings.pacs.dicomweb_url,
        auth=auth,
        timeout=settings.pacs.timeout_s,
        verify=settings.pacs.verify_tls,
        study_timezone=settings.pacs.study_zone(),
    )


def build_feed(settings: Settings, root: str, auth: httpx.Auth | None) -> OrthancChangeFeed:
    """Orthanc's change feed with the PACS's credentials, timeout and TLS verification."""
    from integration.adapters.orthanc import OrthancChangeFeed

    return OrthancChangeFeed(root, auth=auth, timeout=settings.pacs.timeout_s, verify=settings.pacs.verify_tls)


def build_ehr(settings: Settings) -> FhirEhr:
    """The EHR adapter as ``bootstrap()`` builds it (STROKEWATCH_EHR__BASE_URL must be set)."""
    from integration.adapters.fhir import FhirEhr

    ehr = settings.ehr
    assert ehr.base_url
    return FhirEhr(
        ehr.base_url,
        auth=build_auth(ehr.auth, ehr.verify_tls),
        timeout=ehr.timeout_s,
        max_retries=ehr.max_retries,
        backoff=ehr.backoff_s,
        page_size=ehr.page_size,
        create_mode=ehr.create_mode,
        incremental=ehr.incremental,
        max_retry_after=ehr.max_retry_after_s,
        verify=ehr.verify_tls,
    )


@contextmanager
def open_probes(settings: Settings, *, engine: Engine | None = None, timeout_s: float = 10.0) -> Iterator[list[Probe]]:
    """The probes in report order: database, broker, pacs (with the change feed), ehr, model.

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
        yield [DatabaseProbe(store.engine), broker, _fresh_pacs(settings, opened), _fresh_ehr(settings, opened), model]


def _fresh_pacs(settings: Settings, opened: ExitStack) -> Probe:
    if not settings.pacs.dicomweb_url:
        missing = CheckResult("pacs", False, "no DICOMweb URL configured", f"set {env_name('pacs', 'dicomweb_url')}")
        return _stated(missing)
    auth = build_auth(settings.pacs.auth, settings.pacs.verify_tls)
    opened.callback(_close, auth)
    pacs = build_pacs(settings, auth)
    opened.callback(pacs.close)
    root = _orthanc_root(settings)
    feed = None
    if settings.pacs.kind != "generic" and root is not None:  # kind=auto: the probe finds out, as bootstrap() does
        feed = build_feed(settings, root, auth)
        opened.callback(feed.close)
    return _pacs_probe(settings, pacs, feed)


def _pacs_probe(settings: Settings, pacs: DicomWebPacs, feed: OrthancChangeFeed | None) -> Probe:
    """The PACS probe, followed (doctor) by how new studies are found: Orthanc's /changes or QIDO-RS polling."""
    from integration.adapters.orthanc import orthanc_missing, polling_result

    kind = settings.pacs.kind
    polling = polling_result(settings.pacs.poll_seconds, settings.pacs.lookback_hours)
    if feed is not None:
        feed_probe: Probe = BoundProbe(feed.name, partial(feed.probe, fallback=polling if kind == "auto" else None))
    else:
        feed_probe = _stated(orthanc_missing(None) if kind == "orthanc" else polling)
    return BoundProbe(pacs.name, partial(pacs.probe, feed=feed_probe))


def _fresh_ehr(settings: Settings, opened: ExitStack) -> Probe:
    if not settings.ehr.base_url:
        return _stated(CheckResult("ehr", False, "no FHIR base URL configured", f"set {env_name('ehr', 'base_url')}"))
    ehr = build_ehr(settings)
    opened.callback(ehr.close)  # closes its auth too
    return ehr


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
