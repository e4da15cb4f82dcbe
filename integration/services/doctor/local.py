"""Local checks: settings, database (and migrations), broker, model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from integration.config import Settings
from integration.services.doctor.result import CheckResult, env_name


# -- settings -----------------------------------------------------------------------------
def check_settings(settings: Settings) -> CheckResult:
    missing = [
        env_name(*path)
        for path, value in (
            (("pacs", "dicomweb_url"), settings.pacs.dicomweb_url),
            (("ehr", "base_url"), settings.ehr.base_url),
        )
        if not value
    ]
    if missing:
        return CheckResult(
            "settings",
            False,
            f"not set: {', '.join(missing)}",
            f"set {' and '.join(missing)} (or run `strokewatch sandbox up`)",
        )
    mode = "sandbox" if settings.sandbox else "production"
    return CheckResult("settings", True, f"valid ({mode}; data in {settings.data_dir.resolve()})")


# -- database -----------------------------------------------------------------------------
def _redact(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def check_database(url: str, *, timeout_s: float, engine: Engine | None = None, migrations: bool = True) -> CheckResult:
    """SELECT 1, then (doctor) the Alembic revision against the head of the migration scripts."""
    own = engine is None
    if engine is None:
        connect_args: dict[str, Any] = {}
        if url.startswith("postgresql"):
            connect_args["connect_timeout"] = max(1, int(timeout_s))
        elif url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:" and not Path(path).exists():
                hint = "run `strokewatch db upgrade` (or `strokewatch run`, which migrates first)"
                return CheckResult("database", False, f"no database yet at {path}", hint)
            connect_args["timeout"] = timeout_s
        engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            current = _current_revision(conn) if migrations else None
        if not migrations:
            return CheckResult("database", True, f"{engine.dialect.name}: SELECT 1 answered")
        head = _head_revision()
        if current != head:
            return CheckResult(
                "database",
                False,
                f"{_redact(url)}: schema at revision {current or '(none)'}, migrations head is {head}",
                "run `strokewatch db upgrade` (or `strokewatch run`, which migrates first)",
            )
        return CheckResult("database", True, f"{_redact(url)}: reachable, schema at head ({head})")
    except Exception as exc:
        return CheckResult(
            "database",
            False,
            f"{_redact(url)}: cannot connect: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            "check STROKEWATCH_DATABASE_URL (unset: SQLite under STROKEWATCH_DATA_DIR) and that the server is up",
        )
    finally:
        if own:
            engine.dispose()


def _current_revision(conn: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    rev = MigrationContext.configure(conn).get_current_revision()
    return str(rev) if rev is not None else None


def _head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    from integration.adapters.db.session import alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    return str(head) if head is not None else None


# -- broker -------------------------------------------------------------------------------
def check_broker(settings: Settings, *, timeout_s: float) -> CheckResult:
    url = settings.celery_broker_url
    shown = _redact(url.removeprefix("sqla+")) if settings.embedded_broker else _redact(url)
    hint = "check STROKEWATCH_BROKER_URL (unset: the embedded SQLite broker under STROKEWATCH_DATA_DIR)"
    if settings.embedded_broker:
        # kombu's SQLAlchemy transport connects lazily: probe the database it will use instead.
        return _check_embedded_broker(url.removeprefix("sqla+"), shown, timeout_s, hint)
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=timeout_s) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
        return CheckResult("broker", True, f"{shown}: connected")
    except Exception as exc:
        return CheckResult("broker", False, f"{shown}: cannot connect: {str(exc).splitlines()[0][:200]}", hint)


def _check_embedded_broker(url: str, shown: str, timeout_s: float, hint: str) -> CheckResult:
    path = url.split("///", 1)[-1]
    if url.startswith("sqlite") and path and not Path(path).exists():
        parent = next((p for p in Path(path).parents if p.exists()), None)
        if parent is not None and _writable(parent):
            return CheckResult("broker", True, f"embedded broker: will be created at {path} on first start")
        return CheckResult("broker", False, f"embedded broker: cannot create {path}", hint)
    engine = create_engine(url, connect_args={"timeout": timeout_s} if url.startswith("sqlite") else {})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return CheckResult("broker", True, f"embedded broker ({shown}): reachable")
    except Exception as exc:
        return CheckResult("broker", False, f"embedded broker ({shown}): {str(exc).splitlines()[0][:200]}", hint)
    finally:
        engine.dispose()


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


# -- model --------------------------------------------------------------------------------
def check_model(settings: Settings, model: Callable[[], Any] | None = None) -> list[CheckResult]:
    """[model loadable/served and matching the contract, trained or not]."""
    from inference import contract as C
    from inference.runtime import DEFAULT_MODEL_PATH, ModelContractError, ModelUnavailableError

    if settings.triton_url:
        return _check_triton(settings)
    path = settings.model_path or DEFAULT_MODEL_PATH
    if model is None and not Path(path).is_file():
        return [
            CheckResult(
                "model",
                False,
                f"model file not found: {path}",
                f"run `strokewatch model export` or set {env_name('model_path')}",
            )
        ]
    try:
        if model is not None:
            loaded = model()
        else:
            from inference.runtime import OnnxRuntimeModel

            loaded = OnnxRuntimeModel(path)
    except ModelContractError as err:
        hint = f"re-export the model for contract {C.MODEL_VERSION} (`strokewatch model export`)"
        return [CheckResult("model", False, f"{path}: {err}", hint)]
    except (ModelUnavailableError, OSError, RuntimeError) as err:
        return [
            CheckResult("model", False, f"{path}: cannot load: {err}", "set STROKEWATCH_MODEL_PATH to a model.onnx")
        ]
    version, trained = str(loaded.model_version), bool(loaded.trained)
    return [
        CheckResult(
            "model", True, f"{loaded.runtime_name}: model {version} loaded, matches contract {C.MODEL_VERSION}"
        ),
        _trained_result(version, trained),
    ]


def _trained_result(version: str, trained: bool) -> CheckResult:
    if trained:
        return CheckResult("model trained", True, f"model {version} carries trained weights")
    return CheckResult(
        "model trained",
        True,
        f"warning: model {version} is an untrained placeholder; every RiskAssessment says so in method and note",
        "train and export the model (see the README's model section)",
        warning=True,
    )


def _check_triton(settings: Settings) -> list[CheckResult]:
    from inference.runtime import ModelContractError
    from inference.triton_runtime import TritonModel

    assert settings.triton_url
    triton = TritonModel(
        settings.triton_url,
        protocol=settings.triton_protocol,
        model_name=settings.triton_model_name,
        model_version=settings.triton_model_version,
        timeout_s=settings.triton_timeout_s,
        retries=0,
    )
    try:
        info = triton.describe()
    except ModelContractError as err:
        hint = "serve a model exported for this contract, or fix STROKEWATCH_TRITON_MODEL_NAME / _MODEL_VERSION"
        return [CheckResult("model", False, f"Triton {settings.triton_url}: {err}", hint)]
    except Exception as err:
        hint = "check STROKEWATCH_TRITON_URL / STROKEWATCH_TRITON_PROTOCOL and that the server loaded the model"
        return [CheckResult("model", False, f"Triton {settings.triton_url}: {err}", hint)]
    finally:
        triton.close()
    server = info.get("server") or {}
    detail = (
        f"Triton {server.get('version') or ''} at {info.get('url')} ({info.get('protocol')}): model "
        f"{info.get('model_name')} ready (versions {', '.join(info.get('ready_versions') or []) or '?'}), "
        f"model {info.get('model_version')}, matches the contract"
    )
    return [
        CheckResult("model", True, detail),
        _trained_result(str(info.get("model_version")), bool(info.get("trained"))),
    ]
