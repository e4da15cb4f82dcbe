"""The composition root: the one place that turns Settings into concrete adapters and wires the services."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from integration.config import AuthSettings, Settings, get_settings
from integration.domain.policy import RiskPolicy
from integration.domain.series import SeriesRules
from integration.ports import RiskModel
from integration.services.context import Services

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
    from inference.triton_runtime import FallbackModel, TritonModel

    triton = TritonModel(
        settings.triton_url,
        protocol=settings.triton_protocol,
        model_name=settings.triton_model_name,
        model_version=settings.triton_model_version,
        timeout_s=settings.triton_timeout_s,
    )
    if settings.triton_fallback_to_embedded:
        return FallbackModel(triton, OnnxRuntimeModel(model_path))  # type: ignore[return-value]
    return triton  # type: ignore[return-value]


class LazyModel:
    """Build the model on first use and keep it (one per process); a failed build is retried next time."""

    def __init__(self, factory: Callable[[], RiskModel]) -> None:
        self._factory = factory
        self._model: RiskModel | None = None
        self._lock = threading.Lock()

    def __call__(self) -> RiskModel:
        with self._lock:
            if self._model is None:
                self._model = self._factory()
            return self._model


@dataclass
class Engine:
    """Everything an entrypoint needs. Build with ``bootstrap()``; close with ``close()``."""

    settings: Settings
    store: Any
    services: Services
    pacs: Any
    ehr: Any
    feed: Any
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


def bootstrap(
    settings: Settings | None = None, *, migrate: bool = True, enqueue: Callable[[str, list[str]], None] | None = None
) -> Engine:
    from integration.adapters.db.session import make_engine, upgrade
    from integration.adapters.db.store import SqlStore
    from integration.adapters.dicomweb import DicomWebPacs
    from integration.adapters.fhir import FhirEhr
    from integration.adapters.orthanc import OrthancChangeFeed, is_orthanc

    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        upgrade(settings.db_url)
    db_engine = make_engine(settings.db_url)
    store = SqlStore(db_engine)

    if not settings.pacs.dicomweb_url:
        raise ValueError("STROKEWATCH_PACS__DICOMWEB_URL is not set (the PACS's DICOMweb base URL)")
    if not settings.ehr.base_url:
        raise ValueError("STROKEWATCH_EHR__BASE_URL is not set (the FHIR R4 base URL)")
    pacs_auth = build_auth(settings.pacs.auth, settings.pacs.verify_tls)
    pacs = DicomWebPacs(
        settings.pacs.dicomweb_url,
        auth=pacs_auth,
        timeout=settings.pacs.timeout_s,
        verify=settings.pacs.verify_tls,
        study_timezone=settings.pacs.study_zone(),
    )
    feed = None
    root = _orthanc_root(settings)
    if settings.pacs.kind == "orthanc" or (settings.pacs.kind == "auto" and root and is_orthanc(root, auth=pacs_auth)):
        if root is None:
            raise ValueError("pacs.kind=orthanc needs STROKEWATCH_PACS__ORTHANC_URL")
        feed = OrthancChangeFeed(root, auth=pacs_auth)
    ehr = FhirEhr(
        settings.ehr.base_url,
        auth=build_auth(settings.ehr.auth, settings.ehr.verify_tls),
        timeout=settings.ehr.timeout_s,
        max_retries=settings.ehr.max_retries,
        backoff=settings.ehr.backoff_s,
        page_size=settings.ehr.page_size,
        create_mode=settings.ehr.create_mode,
        incremental=settings.ehr.incremental,
        max_retry_after=settings.ehr.max_retry_after_s,
        verify=settings.ehr.verify_tls,
    )
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
