"""One typed settings object, validated at start-up (pydantic-settings, env prefix STROKEWATCH_).

Nested groups use ``__``: ``STROKEWATCH_EHR__BASE_URL``, ``STROKEWATCH_PACS__AUTH__MODE=basic``.
A TOML file named by ``STROKEWATCH_CONFIG`` supplies defaults that the environment overrides.
Obtain it through ``get_settings()``; nothing is built at import time.
"""

from __future__ import annotations

import os
from datetime import datetime, tzinfo
from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from integration.localzone import machine_zone, machine_zone_name

_PLACEHOLDERS = {"changeme", "change-me", "secret", "password", "placeholder", "xxx", "todo", "sandbox"}


class AuthSettings(BaseModel):
    """How to authenticate to a peer. ``mode`` picks which of the other fields must be set."""

    model_config = ConfigDict(extra="forbid")  # a typo in a setting is an error, not a silent default

    mode: Literal["none", "basic", "bearer", "oauth2"] = "none"
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    token_url: str | None = None  # OAuth2 client-credentials token endpoint
    client_id: str | None = None
    client_secret: SecretStr | None = None
    scope: str | None = None
    #: How the OAuth2 client authenticates at the token endpoint.
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        need = {
            "basic": ("username", "password"),
            "bearer": ("token",),
            "oauth2": ("token_url", "client_id", "client_secret"),
        }.get(self.mode, ())
        missing = [f for f in need if getattr(self, f) in (None, "")]
        if missing:
            raise ValueError(f"auth mode {self.mode!r} needs {', '.join(missing)}")
        return self

    def secrets(self) -> list[str]:
        return [s.get_secret_value() for s in (self.password, self.token, self.client_secret) if s is not None]


class PacsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a setting is an error, not a silent default

    dicomweb_url: str | None = None  # e.g. http://pacs:8042/dicom-web
    kind: Literal["auto", "orthanc", "generic"] = "auto"  # orthanc: also use its /changes feed
    orthanc_url: str | None = None  # Orthanc REST root, when different from dicomweb_url minus /dicom-web
    auth: AuthSettings = AuthSettings()
    timeout_s: float = 60.0
    poll_seconds: float = 30.0
    #: QIDO window for generic polling (and the first start of the Orthanc feed).
    lookback_hours: float = Field(default=24.0, gt=0.0)
    #: Orthanc feed on first start: False = studies of the lookback window, then follow the feed from its end;
    #: True = replay Orthanc's whole change log (every study it ever stored).
    changes_from_beginning: bool = False
    #: The PACS's IANA time zone (e.g. "Europe/Berlin"), for StudyDate/StudyTime without
    #: TimezoneOffsetFromUTC (most PACS). None: this machine's local zone (`strokewatch doctor` says which).
    timezone: str | None = None
    #: Modality clocks run fast: a study dated up to this far in the future is found on the next poll.
    clock_skew_s: float = Field(default=900.0, ge=0.0, le=86400.0)
    min_slices: int = 16
    #: Regex over BodyPartExamined / study / series descriptions that marks a head study (None: built-in).
    head_pattern: str | None = None
    verify_tls: bool = True

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        try:
            ZoneInfo(v.strip())
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"pacs.timezone {v!r} is not an IANA time zone name (e.g. Europe/Berlin)") from err
        return v.strip()

    def study_zone(self) -> tzinfo:
        """The zone naive study dates are read in: ``timezone``, else this machine's local zone."""
        return ZoneInfo(self.timezone) if self.timezone else machine_zone()

    def study_zone_name(self) -> str:
        """For humans (doctor): the zone in use and where it comes from."""
        if self.timezone:
            return f"{self.timezone} (pacs.timezone)"
        name = machine_zone_name()
        if name:
            return f"{name} (this machine's zone; set pacs.timezone if the PACS is elsewhere)"
        offset = f"{datetime.now().astimezone():%z}"
        return f"UTC{offset} fixed offset (this machine's zone has no IANA name; set pacs.timezone)"


class EhrSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a setting is an error, not a silent default

    base_url: str | None = None  # e.g. http://ehr:8080/fhir
    auth: AuthSettings = AuthSettings()
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    page_size: int = 200
    poll_seconds: float = 60.0
    #: FHIR Patient.identifier.system holding the DICOM PatientID (the MRN system).
    patient_identifier_system: str | None = "urn:oid:1.2.36.146.595.217.0.1"
    #: IssuerOfPatientID -> identifier system, for PACS that serve several assigning authorities.
    issuer_systems: dict[str, str] = Field(default_factory=dict)
    verify_tls: bool = True
    #: "search-first" for servers that ignore If-None-Exist (searches the identifier before creating).
    create_mode: Literal["if-none-exist", "search-first"] = "if-none-exist"
    #: False for servers that do not support _lastUpdated on Observation (full re-read each sync).
    incremental: bool = True
    #: A Retry-After longer than this is not waited for in-process; the task is re-scheduled instead.
    max_retry_after_s: float = 30.0


class PolicySettings(BaseModel):
    """Risk bands (terminology.hl7.org risk-probability codes) and what happens without vitals."""

    model_config = ConfigDict(extra="forbid")  # a typo in a setting is an error, not a silent default

    low_below: float = 0.10
    high_at_or_above: float = 0.30
    alert_at_or_above: float = 0.30
    #: Without any vitals in the window: score the image alone (the model was trained with
    #: modality dropout) or record "insufficient_data".
    image_only_when_no_vitals: bool = True
    min_vital_samples: int = 1

    @model_validator(mode="after")
    def _ordered(self) -> PolicySettings:
        if not 0.0 < self.low_below <= self.high_at_or_above < 1.0:
            raise ValueError("policy needs 0 < low_below <= high_at_or_above < 1")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STROKEWATCH_", env_nested_delimiter="__", extra="forbid")

    sandbox: bool = False  # set by `strokewatch sandbox`/`demo`: placeholder secrets allowed
    data_dir: Path = Path("var")
    database_url: str | None = None  # default: sqlite under data_dir
    broker_url: str | None = None  # default: kombu SQLAlchemy transport on SQLite under data_dir
    api_host: str = "127.0.0.1"
    api_port: int = 8400
    public_base_url: str | None = None  # how the API is reached by users (links in summaries)

    pacs: PacsSettings = PacsSettings()
    ehr: EhrSettings = EhrSettings()
    policy: PolicySettings = PolicySettings()

    model_path: Path | None = None  # default: triton_models/stroke_fusion/1/model.onnx
    triton_url: str | None = None  # unset: the embedded ONNX Runtime
    triton_protocol: Literal["http", "grpc"] = "http"
    triton_model_name: str = "stroke_fusion"
    triton_model_version: str = ""  # "" = latest ready
    triton_timeout_s: float = 10.0
    triton_fallback_to_embedded: bool = False

    #: Name the inputs that drove each score in the RiskAssessment note (one extra batched model call).
    explain_drivers: bool = True
    #: System of RiskAssessment.identifier (the deterministic assessment identity).
    assessment_identifier_system: str = "urn:strokewatch:risk-assessment"
    #: Task time limit and retry policy for transient failures.
    task_time_limit_s: int = 300
    max_task_retries: int = 8
    retry_backoff_s: float = 5.0
    #: Studies whose patient is not (yet) in the EHR are retried this often (doubling, capped at 1 h).
    held_retry_s: float = 60.0
    #: Reaper: claims older than this are considered dead and released.
    stale_claim_s: int = 600
    worker_concurrency: int = 2
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("STROKEWATCH_CONFIG")
        if path:
            if not Path(path).is_file():
                raise ValueError(f"STROKEWATCH_CONFIG={path} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("database_url", "broker_url")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        if self.sandbox:
            return self
        for name, auth in (("pacs", self.pacs.auth), ("ehr", self.ehr.auth)):
            for secret in auth.secrets():
                if secret.strip().lower() in _PLACEHOLDERS or len(secret) < 4:
                    raise ValueError(f"{name}.auth has a placeholder secret; set a real one (outside the sandbox)")
        return self

    # -- derived values ------------------------------------------------------------
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'strokewatch.db').resolve()}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return self.celery_broker_url.startswith("sqla+")

    @property
    def api_base_url(self) -> str:
        return self.public_base_url or f"http://{self.api_host}:{self.api_port}"

    def identifier_system_for(self, issuer: str | None) -> str | None:
        """The FHIR identifier system that holds a DICOM PatientID from this issuer."""
        if issuer and issuer in self.ehr.issuer_systems:
            return self.ehr.issuer_systems[issuer]
        return self.ehr.patient_identifier_system


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
