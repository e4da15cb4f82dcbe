"""One typed settings object, validated at start-up (pydantic-settings, env prefix STROKEWATCH_).

Nested groups use ``__``: ``STROKEWATCH_EHR__BASE_URL``, ``STROKEWATCH_PACS__AUTH__MODE=basic``.
A TOML file named by ``STROKEWATCH_CONFIG`` supplies defaults that the environment overrides. Secret settings may
also come from files (``STROKEWATCH_<NAME>_FILE``, ``STROKEWATCH_SECRETS_DIR``: see ``SecretFilesSource``).
Obtain it through ``get_settings()``; nothing is built at import time.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from datetime import datetime, tzinfo
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from integration.domain.results import DEFAULT_DISCLAIMER
from integration.localzone import machine_zone, machine_zone_name

_PLACEHOLDERS = {"changeme", "change-me", "secret", "password", "placeholder", "xxx", "todo", "sandbox"}
#: The system scopes a smart-backend client asks for unless ``auth.scope`` says otherwise (SMART v2 syntax): what the
#: engine reads (patients, vital signs) and writes (its RiskAssessments, the model's Device, the alert Flags it opens,
#: finds again and closes).
SMART_DEFAULT_SCOPE = (
    "system/Patient.rs system/Observation.rs system/RiskAssessment.c system/Device.cu system/Flag.crus"
)


#: Every settings group: a typo in a setting is an error, not a silent default; and an error never echoes the value
#: given (it may be a secret: an API key list of the wrong type, a password in the wrong field).
STRICT = ConfigDict(extra="forbid", hide_input_in_errors=True)


class AuthSettings(BaseModel):
    """How to authenticate to a peer. ``mode`` picks which of the other fields must be set."""

    model_config = STRICT

    mode: Literal["none", "basic", "bearer", "oauth2", "smart-backend"] = "none"
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    token_url: str | None = None  # OAuth2 token endpoint (smart-backend: unset = from .well-known/smart-configuration)
    client_id: str | None = None
    client_secret: SecretStr | None = None
    scope: str | None = None  # smart-backend: unset = SMART_DEFAULT_SCOPE
    #: How the OAuth2 client authenticates at the token endpoint.
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    #: SMART Backend Services (mode "smart-backend"): the PEM private key that signs the client assertions
    #: (RSA >= 2048 bits for RS384, P-384 for ES384; `strokewatch keys generate` makes one).
    private_key_file: Path | None = None
    private_key_passphrase: SecretStr | None = None  # for an encrypted private_key_file
    #: The key id registered at the EHR; unset: the key's RFC 7638 thumbprint, as `strokewatch keys jwks` prints it.
    kid: str | None = None
    #: The assertions' algorithm; unset: RS384 for an RSA key, ES384 for a P-384 key.
    alg: Literal["RS384", "ES384"] | None = None
    #: Each request to the token endpoint (and SMART discovery), in seconds; unset: the peer's ``timeout_s``.
    timeout_s: float | None = Field(default=None, gt=0.0, le=300.0)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """A variable set to "" is unset (``${X:-}`` in compose files): never an empty password that passes."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if not (isinstance(value, str) and not value.strip())}
        return data

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        need = {
            "basic": ("username", "password"),
            "bearer": ("token",),
            "oauth2": ("token_url", "client_id", "client_secret"),
            "smart-backend": ("client_id", "private_key_file"),
        }.get(self.mode, ())
        missing = [f for f in need if getattr(self, f) in (None, "")]
        if missing:
            raise ValueError(f"auth mode {self.mode!r} needs {', '.join(missing)}")
        if self.mode == "smart-backend":
            if self.client_secret is not None:
                raise ValueError("auth mode 'smart-backend' signs with private_key_file; unset client_secret")
            if not (self.scope or "").strip():
                self.scope = SMART_DEFAULT_SCOPE
        return self

    def secrets(self) -> list[str]:
        values = (self.password, self.token, self.client_secret, self.private_key_passphrase)
        return [s.get_secret_value() for s in values if s is not None]


class TlsSettings(BaseModel):
    """TLS to one peer (``STROKEWATCH_PACS__TLS__CA_BUNDLE``, ...), built into its SSL context by ``adapters/tls.py``:
    TLS 1.2 or newer always; the server verified against ``ca_bundle`` (default: this machine's trust store);
    ``client_cert`` (+ ``client_key`` when the key is in another file) presented for mutual TLS. PEM files."""

    model_config = STRICT

    verify: bool = True  # False turns certificate verification off: for a test bench only, never a hospital
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None  # unencrypted PEM; None: the key is in client_cert's file

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsSettings:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("tls.client_key is set without tls.client_cert (the certificate it belongs to)")
        return self


def _verify_tls_alias(data: Any) -> Any:
    """``verify_tls`` (deprecated) still sets ``tls.verify``."""
    if not isinstance(data, dict) or "verify_tls" not in data:
        return data
    data = dict(data)
    verify = data.pop("verify_tls")
    tls = data.get("tls")
    if isinstance(tls, TlsSettings):
        tls = tls.model_dump()
    tls = dict(tls or {})
    tls.setdefault("verify", verify)
    data["tls"] = tls
    return data


class PacsDimseSettings(BaseModel):
    """A PACS reached by DIMSE instead of DICOMweb (``pacs.kind = "dimse"``; ``STROKEWATCH_PACS__DIMSE__*``): Study Root
    C-FIND to find studies and series, C-GET (default) or C-MOVE to our C-STORE SCP to retrieve a series. The PACS
    must know ``calling_aet`` as a DICOM node (allowed to query and retrieve)."""

    model_config = STRICT

    host: str | None = None  # the PACS's DICOM address
    port: int = Field(default=104, ge=1, le=65535)  # its DICOM port (104; often 11112, 4242 for Orthanc, 2762 TLS)
    called_aet: str | None = None  # the PACS's AE title
    calling_aet: str = "STROKEWATCH"  # ours, as registered in the PACS
    #: c-get: instances come back on the query association (no inbound port, nothing on disk); c-move: the PACS sends
    #: them to our C-STORE SCP (``move_destination``, default ``scp.ae_title``), which must run (scp.enabled).
    retrieve: Literal["c-get", "c-move"] = "c-get"
    move_destination: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0.0, le=300.0)  # TCP connect (and the TLS handshake)
    acse_timeout_s: float = Field(default=30.0, gt=0.0, le=600.0)  # association request and release answered
    dimse_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)  # each DIMSE message (a C-FIND match, a C-STORE)
    network_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)  # an association silent this long is aborted
    #: The largest PDU we announce (received PDUs beyond it close the connection).
    max_pdu_bytes: int = Field(default=1 << 20, ge=16 * 1024, le=16 << 20)
    #: Matches one C-FIND may return (a detection window's studies, a study's series); beyond, the search stops.
    max_find_results: int = Field(default=10_000, ge=100, le=1_000_000)
    use_tls: bool = False  # DICOM TLS (PS3.15 B.1), configured by ``tls``
    tls: TlsSettings = TlsSettings()

    @field_validator("calling_aet")
    @classmethod
    def _calling(cls, v: str) -> str:
        return _ae_title(v, "STROKEWATCH_PACS__DIMSE__CALLING_AET")

    @field_validator("called_aet", "move_destination")
    @classmethod
    def _titles(cls, v: str | None, info: Any) -> str | None:
        if v is None or not v.strip():
            return None
        return _ae_title(v, f"STROKEWATCH_PACS__DIMSE__{str(info.field_name).upper()}")

    @model_validator(mode="after")
    def _tls_needs_use_tls(self) -> PacsDimseSettings:
        if not self.use_tls and self.tls != TlsSettings():
            raise ValueError("STROKEWATCH_PACS__DIMSE__TLS__* is set but STROKEWATCH_PACS__DIMSE__USE_TLS is not true: "
                             "turn DICOM TLS on, or remove them")
        return self


class PacsSettings(BaseModel):
    model_config = STRICT

    dicomweb_url: str | None = None  # e.g. http://pacs:8042/dicom-web
    #: orthanc: also use its /changes feed; generic: QIDO-RS polling; dimse: C-FIND polling and C-GET/C-MOVE (``dimse``)
    kind: Literal["auto", "orthanc", "generic", "dimse"] = "auto"
    orthanc_url: str | None = None  # Orthanc REST root, when different from dicomweb_url minus /dicom-web
    auth: AuthSettings = AuthSettings()
    timeout_s: float = 60.0
    #: One WADO-RS series retrieval, first byte to last: a PACS trickling bytes is cut off after this long
    #: (pacs_unavailable, retried later). ``timeout_s`` bounds each connect and read within it.
    retrieve_deadline_s: float = Field(default=600.0, gt=0.0, le=86400.0)
    poll_seconds: float = 30.0
    #: QIDO window for generic polling (and the first start of the Orthanc feed).
    lookback_hours: float = Field(default=24.0, gt=0.0)
    #: Orthanc feed on first start: False = studies of the lookback window, then follow the feed from its end;
    #: True = replay Orthanc's whole change log (every study it ever stored).
    changes_from_beginning: bool = False
    #: Orthanc feed: every this many seconds the lookback window is also read by QIDO-RS, and a stable study the
    #: feed never announced (Orthanc restarted before its StableStudy event) is registered. 0: off.
    reconcile_s: float = Field(default=300.0, ge=0.0, le=86400.0)
    #: The PACS's IANA time zone (e.g. "Europe/Berlin"), for StudyDate/StudyTime without
    #: TimezoneOffsetFromUTC (most PACS). None: this machine's local zone (`strokewatch doctor` says which).
    timezone: str | None = None
    #: Modality clocks run fast: a study dated up to this far in the future is found on the next poll.
    clock_skew_s: float = Field(default=900.0, ge=0.0, le=86400.0)
    min_slices: int = 16
    #: Regex over BodyPartExamined / study / series descriptions that marks a head study (None: built-in).
    head_pattern: str | None = None
    tls: TlsSettings = TlsSettings()  # DICOMweb and Orthanc's REST API (and an OAuth2 token endpoint of pacs.auth)
    dimse: PacsDimseSettings = PacsDimseSettings()  # kind=dimse: the PACS's DICOM node (retrieve_deadline_s applies)

    @model_validator(mode="before")
    @classmethod
    def _deprecated_verify_tls(cls, data: Any) -> Any:  # verify_tls: deprecated, use tls.verify
        return _verify_tls_alias(data)

    @model_validator(mode="after")
    def _dimse_node(self) -> PacsSettings:
        if self.kind == "dimse":
            missing = [f"STROKEWATCH_PACS__DIMSE__{n.upper()}" for n in ("host", "called_aet")
                       if not getattr(self.dimse, n)]
            if missing:
                raise ValueError(f"pacs.kind=dimse needs {' and '.join(missing)} (the PACS's DICOM node)")
        return self

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
    model_config = STRICT

    base_url: str | None = None  # e.g. http://ehr:8080/fhir
    auth: AuthSettings = AuthSettings()
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    #: ``_count`` of searches: a patient's month of vitals is a few hundred Observations, one page at 1000 (each page
    #: is a round trip, and many servers evaluate the whole search again per page). Servers answer fewer where
    #: their own maximum is lower; every ``next`` link is followed.
    page_size: int = Field(default=1000, ge=10, le=5000)
    poll_seconds: float = 60.0
    #: FHIR Patient.identifier.system holding the DICOM PatientID (the MRN system).
    patient_identifier_system: str | None = "urn:oid:1.2.36.146.595.217.0.1"
    #: IssuerOfPatientID -> identifier system, for PACS that serve several assigning authorities.
    issuer_systems: dict[str, str] = Field(default_factory=dict)
    tls: TlsSettings = TlsSettings()  # the FHIR server and the OAuth2 token endpoint of ehr.auth
    #: "search-first" for servers that ignore If-None-Exist (searches the identifier before creating).
    create_mode: Literal["if-none-exist", "search-first"] = "if-none-exist"
    #: False for servers that do not support _lastUpdated on Observation (full re-read each sync).
    incremental: bool = True
    #: The most one request waits in-process, its retries together; beyond, the task is re-scheduled instead.
    max_retry_after_s: float = 30.0

    @model_validator(mode="before")
    @classmethod
    def _deprecated_verify_tls(cls, data: Any) -> Any:  # verify_tls: deprecated, use tls.verify
        return _verify_tls_alias(data)


class PolicySettings(BaseModel):
    """Risk bands (terminology.hl7.org risk-probability codes) and what happens without vitals."""

    model_config = STRICT

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


Band = Literal["low", "moderate", "high"]


class PacsResultsSettings(BaseModel):
    """Results written back to the source PACS (``STROKEWATCH_PACS_RESULTS__*``): a DICOM SR (TID 1500) and a
    heat-map series of Secondary Capture images, in the assessed study, for the bands listed."""

    model_config = STRICT

    #: Off until the site turns it on: a new node writing series into the hospital's archive is the PACS team's
    #: decision (destination, AE title, what radiologists will see), and it costs the workers about a second per
    #: moderate/high study (README "Results in the PACS and alerts in the EHR").
    enabled: bool = False
    bands: list[Band] = Field(default_factory=lambda: list[Band](["moderate", "high"]))
    heatmap: bool = True  # False: the SR alone
    sr_series_description: str = Field(default="StrokeWatch stroke risk (SR)", min_length=1, max_length=64)
    heatmap_series_description: str = Field(default="StrokeWatch stroke risk heat-map", min_length=1, max_length=64)
    #: The statement the SR carries (MODEL_CARD.md: not for clinical use without local validation).
    disclaimer: str = Field(default=DEFAULT_DISCLAIMER, min_length=1, max_length=1024)


class AlertSettings(BaseModel):
    """The EHR alert (``STROKEWATCH_ALERTS__*``): a FHIR Flag on the patient while the latest score is at or above
    ``policy.alert_at_or_above``."""

    model_config = STRICT

    flag: bool = True


class PrivacySettings(BaseModel):
    """Keeping PHI in: the key of the pseudonyms that stand in for patient identifiers in logs and messages."""

    model_config = STRICT

    #: HMAC-SHA256 key for pseudonyms (at least 16 characters; a secret: may come from a file). Unset: a random
    #: key created on first start in data_dir/pseudonym.key (0600) and reused, so pseudonyms stay stable.
    pseudonym_key: SecretStr | None = None
    #: HMAC-SHA256 site key of the de-identified research export (`strokewatch deid export`): pseudonyms, UIDs and
    #: date shifts derive from it (at least 32 characters, random; a secret: may come from a file, e.g.
    #: ``privacy__deid_key`` in STROKEWATCH_SECRETS_DIR). Never generated: the export refuses to run without it.
    #: Checked when the export starts (``bootstrap.deid_key``), so that no error message can quote it.
    deid_key: SecretStr | None = None

    @field_validator("pseudonym_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().encode()) < 16:
            raise ValueError("privacy.pseudonym_key needs at least 16 characters (STROKEWATCH_PRIVACY__PSEUDONYM_KEY)")
        return v


class LimitsSettings(BaseModel):
    """Caps on what the PACS and the EHR may send, checked before anything is allocated (``STROKEWATCH_LIMITS__*``).
    Beyond one, the object gets the outcome ``too_large`` (not retried; replay it after raising the limit)."""

    model_config = STRICT

    max_rows: int = Field(default=4096, ge=64, le=65535)  # pixels per column of one image
    max_columns: int = Field(default=4096, ge=64, le=65535)
    #: Frames of one multi-frame (Enhanced CT/MR) instance.
    max_frames_per_instance: int = Field(default=2000, ge=1, le=100_000)
    #: Image planes of one series (instances; a multi-frame instance counts its frames): thin-slice CT needs ~600.
    max_slices_per_series: int = Field(default=2000, ge=16, le=100_000)
    #: Bytes of one series as received and as decoded float32 slices (an ingest peaks at about twice this).
    max_series_bytes: int = Field(default=1 << 30, ge=1 << 20, le=1 << 36)
    #: The header block of one multipart part, one part (one instance), and the parts of one WADO-RS answer.
    multipart_max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1 << 20)
    multipart_max_part_bytes: int = Field(default=512 << 20, ge=1 << 20, le=1 << 36)
    multipart_max_parts: int = Field(default=2000, ge=16, le=100_000)
    #: FHIR resources one vitals sync may read (all pages together); more is refused, not truncated.
    max_fhir_resources_per_sync: int = Field(default=50_000, ge=100, le=10_000_000)

    @model_validator(mode="after")
    def _consistent(self) -> LimitsSettings:
        if self.multipart_max_part_bytes > self.max_series_bytes:
            raise ValueError("limits.multipart_max_part_bytes is larger than limits.max_series_bytes (one part is "
                             "at most a whole series)")
        if self.multipart_max_parts < self.max_slices_per_series:
            raise ValueError("limits.multipart_max_parts is below limits.max_slices_per_series: a series within the "
                             "slice limit would be refused; raise both together")
        return self


class ApiTlsSettings(BaseModel):
    """HTTPS on the API itself (uvicorn), optionally mutual TLS: ``STROKEWATCH_API_TLS__CERT``, ``__KEY``,
    ``__CLIENT_CA``, ``__REQUIRE_CLIENT_CERT``. PEM files; unset ``cert``: plain HTTP (keep it on loopback)."""

    model_config = STRICT

    cert: Path | None = None  # the certificate chain the API presents
    key: Path | None = None  # its unencrypted private key; None: the key is in cert's file
    client_ca: Path | None = None  # CA bundle that client certificates are verified against
    require_client_cert: bool = False  # True: no TLS connection without a client certificate from client_ca

    @model_validator(mode="after")
    def _complete(self) -> ApiTlsSettings:
        if self.cert is None and (self.key or self.client_ca or self.require_client_cert):
            raise ValueError("api_tls needs cert (STROKEWATCH_API_TLS__CERT) for key, client_ca or require_client_cert")
        if self.require_client_cert and self.client_ca is None:
            raise ValueError("api_tls.require_client_cert needs client_ca (STROKEWATCH_API_TLS__CLIENT_CA)")
        return self


_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _https_or_loopback(url: str, setting: str) -> str:
    """A key or token URL must be https (plain http only to this machine, for tests and the sandbox)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{setting}={url!r} is not an http(s) URL")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise ValueError(f"{setting}={url!r} must use https (plain http only on 127.0.0.1/localhost)")
    return url


class ApiJwtSettings(BaseModel):
    """OAuth2 bearer JWTs from the hospital's identity provider (``STROKEWATCH_API__JWT__ISSUER``, ``__AUDIENCE``,
    ``__JWKS_URL``): RS256/ES256 only, keys from the JWKS (cached ``jwks_ttl_s``, refetched on an unknown ``kid``).
    Roles come from ``roles_claim``: ``scope`` (space-separated) or a claim holding a list (``roles``,
    ``realm_access.roles``)."""

    model_config = STRICT

    issuer: str | None = None
    audience: str | None = None
    jwks_url: str | None = None
    roles_claim: str = "scope"
    read_role: str = "strokewatch.read"  # status, patients, studies, failures, metrics
    operate_role: str = "strokewatch.operate"  # retry and anything that changes state; implies read
    leeway_s: float = Field(default=30.0, ge=0.0, le=300.0)  # clock difference allowed on exp/nbf/iat
    jwks_ttl_s: float = Field(default=300.0, gt=0.0)
    timeout_s: float = Field(default=5.0, gt=0.0, le=60.0)  # each JWKS fetch

    @model_validator(mode="after")
    def _complete(self) -> ApiJwtSettings:
        given = {name: getattr(self, name) for name in ("issuer", "audience", "jwks_url")}
        missing = [f"STROKEWATCH_API__JWT__{name.upper()}" for name, value in given.items() if not value]
        if len(missing) not in (0, 3):
            raise ValueError(f"api.jwt is incomplete: set {', '.join(missing)} too (or none of the three)")
        if self.jwks_url:
            _https_or_loopback(self.jwks_url, "STROKEWATCH_API__JWT__JWKS_URL")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.jwks_url)


class ApiSettings(BaseModel):
    """Who may use the engine's HTTP API (``STROKEWATCH_API__*``). Outside the sandbox the API needs ``keys`` or
    ``jwt``. API keys are stored only as hashes: ``STROKEWATCH_API__KEYS__<NAME>=<read|operate>:<sha256 hex>``,
    as ``strokewatch keys api-key NAME --role ROLE`` prints it; clients send the key in ``X-API-Key``."""

    model_config = STRICT

    keys: dict[str, str] = Field(default_factory=dict)
    jwt: ApiJwtSettings = ApiJwtSettings()
    docs: bool | None = None  # /docs and /openapi.json; None: on in the sandbox only
    ready_public: bool = False  # /health/ready without credentials (e.g. for a load balancer's probe)
    metrics_public: bool = False  # /metrics without credentials (e.g. for a Prometheus without a key)
    #: Host header values accepted besides loopback, api_host and public_base_url's host ("*.x" wildcards allowed).
    allowed_hosts: list[str] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)  # empty: no CORS headers at all
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    #: Also send each audit record to the EHR as a FHIR AuditEvent (failures are logged, not fatal).
    audit_fhir: bool = False

    @field_validator("keys")
    @classmethod
    def _hashed_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for name, value in keys.items():
            role, _, digest = value.partition(":")
            if role not in ("read", "operate") or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    f"STROKEWATCH_API__KEYS__{name.upper()} must be '<read|operate>:<sha256 hex of the key>' "
                    "(`strokewatch keys api-key NAME --role ROLE` prints the line); never the key itself"
                )
        return keys


class DashboardSettings(BaseModel):
    """The clinicians' and operators' web pages at ``/dashboard`` (``STROKEWATCH_DASHBOARD__*``): who may open them
    without signing in, how long a sign-in lasts, and the bounded history of stage latencies they plot."""

    model_config = STRICT

    #: In the sandbox, on a loopback API, the pages open without signing in (as operator). Elsewhere: never.
    open_in_sandbox: bool = True
    #: A sign-in (an API key or IdP token exchanged for a session cookie) lasts this long.
    session_hours: float = Field(default=8.0, gt=0.0, le=24.0)
    #: The sweep keeps a copy of the stage histogram this often, ...
    latency_snapshot_s: int = Field(default=60, ge=5, le=3600)
    #: ... and at most this many copies (the oldest go first): 1440 at 60 s is a day of percentiles.
    latency_snapshots_kept: int = Field(default=1440, ge=2, le=20_000)
    #: Assessments (risk over time) and vital values one patient page shows at most.
    max_assessments: int = Field(default=200, ge=1, le=5000)
    max_vitals: int = Field(default=5000, ge=10, le=100_000)
    #: SMART App Launch from the EHR (``/dashboard/launch``): the client id the EHR registered for the dashboard
    #: (a public client: PKCE, no secret). Unset: CDS Hooks cards offer no SMART link and launches are refused.
    smart_client_id: str | None = None
    smart_scope: str = "launch openid fhirUser patient/Patient.read"


class CdsIssuerSettings(BaseModel):
    """One EHR trusted to call the CDS Hooks service: its JWT ``iss`` and the JWKS its keys are published at."""

    model_config = STRICT

    iss: str
    jwks_url: str
    #: Other JWKS URLs this issuer may name in a token's ``jku`` header (a ``jku`` not listed is refused).
    jku: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _urls(self) -> CdsIssuerSettings:
        for url in (self.jwks_url, *self.jku):
            _https_or_loopback(url, "STROKEWATCH_CDS_HOOKS__ISSUERS")
        return self


class CdsHooksSettings(BaseModel):
    """CDS Hooks 2.0 "Trusting CDS Clients": ``STROKEWATCH_CDS_HOOKS__ISSUERS='[{"iss": "...", "jwks_url":
    "..."}]'``. A hook call needs a JWT from a listed issuer whose ``aud`` is this service's URL
    (``public_url`` + ``/cds-services/<id>``); discovery stays open."""

    model_config = STRICT

    issuers: list[CdsIssuerSettings] = Field(default_factory=list)
    public_url: str | None = None  # the service root as the EHR calls it; unset: public_base_url or the API's URL
    leeway_s: float = Field(default=30.0, ge=0.0, le=300.0)
    max_token_lifetime_s: float = Field(default=300.0, gt=0.0, le=3600.0)  # the spec asks for at most 5 minutes
    replay_cache_size: int = Field(default=10_000, ge=100, le=1_000_000)
    jwks_ttl_s: float = Field(default=300.0, gt=0.0)
    timeout_s: float = Field(default=5.0, gt=0.0, le=60.0)


class WebhookSourceSettings(BaseModel):
    """How one webhook source proves itself: an HMAC-SHA256 ``secret`` (preferred) or a static bearer ``token``."""

    model_config = STRICT

    secret: SecretStr | None = None
    token: SecretStr | None = None

    @field_validator("secret", "token")
    @classmethod
    def _strong(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and (len(v.get_secret_value()) < 16 or v.get_secret_value().lower() in _PLACEHOLDERS):
            raise ValueError("a webhook secret or token needs at least 16 random characters")
        return v


class WebhookSettings(BaseModel):
    """``STROKEWATCH_WEBHOOKS__ORTHANC__SECRET``, ``STROKEWATCH_WEBHOOKS__FHIR__TOKEN``, ...: signed with
    ``X-StrokeWatch-Timestamp`` (unix seconds) and ``X-StrokeWatch-Signature: sha256=<hex HMAC of
    timestamp + "." + body>``, accepted within ``replay_window_s`` and once; or ``Authorization: Bearer <token>``."""

    model_config = STRICT

    orthanc: WebhookSourceSettings = WebhookSourceSettings()
    fhir: WebhookSourceSettings = WebhookSourceSettings()
    replay_window_s: float = Field(default=300.0, ge=10.0, le=3600.0)
    replay_cache_size: int = Field(default=10_000, ge=100, le=1_000_000)


def _ae_title(value: str, setting: str) -> str:
    """An AE title as PS3.5 defines the AE value representation: 1-16 characters of printable ASCII without a
    backslash, leading and trailing spaces not significant."""
    title = value.strip()
    if not 0 < len(title) <= 16 or any(not 32 <= ord(c) < 127 or c == "\\" for c in title):
        raise ValueError(f"{setting}: {value!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return title


class ScpTlsSettings(BaseModel):
    """DICOM TLS on the C-STORE SCP (PS3.15 B.1, "Basic TLS Secure Transport Connection Profile"):
    ``STROKEWATCH_SCP__TLS__CERT`` (+ ``__KEY``), ``__CLIENT_CA``, ``__REQUIRE_CLIENT_CERT``. PEM files; unset
    ``cert``: plain DIMSE (the calling AE title allow-list is then the only check; keep it on a trusted network)."""

    model_config = STRICT

    cert: Path | None = None  # the certificate chain the SCP presents
    key: Path | None = None  # its unencrypted private key; None: the key is in cert's file
    client_ca: Path | None = None  # CA bundle that senders' certificates are verified against
    require_client_cert: bool = False  # True: no association without a sender certificate issued by client_ca

    @model_validator(mode="after")
    def _complete(self) -> ScpTlsSettings:
        if self.cert is None and (self.key or self.client_ca or self.require_client_cert):
            raise ValueError("scp.tls needs cert (STROKEWATCH_SCP__TLS__CERT) for key, client_ca or "
                             "require_client_cert")
        if self.require_client_cert and self.client_ca is None:
            raise ValueError("scp.tls.require_client_cert needs client_ca (STROKEWATCH_SCP__TLS__CLIENT_CA)")
        return self


class ScpSettings(BaseModel):
    """The DICOM C-STORE SCP that PACS and modalities push studies to (``STROKEWATCH_SCP__*``; ``strokewatch run``
    starts it when ``enabled``, ``strokewatch scp`` runs it alone). Outside the sandbox it needs
    ``allowed_calling_aets``: an AE title not listed is refused at association time."""

    model_config = STRICT

    enabled: bool = False
    ae_title: str = "STROKEWATCH"  # the called AE title senders must use (associations to another are refused)
    host: str = "127.0.0.1"  # the address listened on; 0.0.0.0 for every interface
    port: int = Field(default=11112, ge=1, le=65535)
    #: Calling AE titles allowed to associate (C-ECHO and C-STORE). Empty: none outside the sandbox (the SCP does
    #: not start); in the sandbox, any sender on loopback.
    allowed_calling_aets: list[str] = Field(default_factory=list)
    #: Addresses or networks (``10.1.2.0/24``) senders may connect from; empty: any. Checked before the association.
    allowed_hosts: list[str] = Field(default_factory=list)
    #: Calling AE titles that send a study over one association per series: their studies complete
    #: ``quiet_period_s`` after the last instance instead of at the association's release.
    per_series_senders: list[str] = Field(default_factory=list)
    #: A study whose association ended without a release (abort, dropped connection, SCP restart), or came from a
    #: ``per_series_senders`` AE, is complete once no instance of it arrived for this long; 0: at once.
    quiet_period_s: float = Field(default=10.0, ge=0.0, le=3600.0)
    #: An association silent this long is aborted (pynetdicom's network timeout); also ACSE/DIMSE message timeouts.
    idle_timeout_s: float = Field(default=60.0, ge=5.0, le=3600.0)
    max_associations: int = Field(default=10, ge=1, le=200)
    #: One instance as received (the association is aborted beyond it, before more is buffered); <= max_series_bytes.
    max_instance_bytes: int = Field(default=512 << 20, ge=1 << 20, le=1 << 36)
    #: Instances are refused (status A700, out of resources) while data_dir's file system has less free space.
    min_free_disk_bytes: int = Field(default=1 << 30, ge=0, le=1 << 50)
    #: Instances of other storage SOP classes in a pushed study (SR, dose screens, presentation states): accepted
    #: and not kept (True), or their presentation contexts refused (False; some senders then fail the whole study).
    accept_other_sop_classes: bool = True
    tls: ScpTlsSettings = ScpTlsSettings()

    @field_validator("ae_title")
    @classmethod
    def _own_title(cls, v: str) -> str:
        return _ae_title(v, "STROKEWATCH_SCP__AE_TITLE")

    @field_validator("allowed_calling_aets", "per_series_senders")
    @classmethod
    def _titles(cls, v: list[str], info: Any) -> list[str]:
        return [_ae_title(t, f"STROKEWATCH_SCP__{str(info.field_name).upper()}") for t in v]

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"STROKEWATCH_SCP__ALLOWED_HOSTS: {entry!r} is not an IP address or network "
                                 "(e.g. 10.1.2.3 or 10.1.2.0/24)") from None
        return [entry.strip() for entry in v]


InlineStage = Literal["vitals", "assess", "publish"]


class PipelineSettings(BaseModel):
    """How work moves between stages in a worker (``STROKEWATCH_PIPELINE__INLINE``, ...). A stage named in ``inline``
    runs on in the task that handed it off (ingest -> vitals -> assess -> publish in one task: no broker hop, the
    lowest latency); the others go through their queue (``vitals``, ``assess``, ``publish``), for deployments that
    run each stage on its own worker group. The API, the SCP and the sweep always queue."""

    model_config = STRICT

    inline: list[InlineStage] = Field(default_factory=lambda: list(get_args(InlineStage)))
    #: Stage runs one task may go on to (a batch fanning out to many publishes); the rest is queued.
    max_inline_runs: int = Field(default=64, ge=1, le=10_000)
    #: The first instance of a study pushed to the SCP queues its patient's vitals sync (queue ``vitals``), so the
    #: vitals are read while the rest of the study is still arriving, not after it completed.
    prefetch_vitals: bool = True


class RetentionSettings(BaseModel):
    """What the engine deletes once nothing needs it (``strokewatch db prune``, and a scheduled job every
    ``interval_hours``): ``STROKEWATCH_RETENTION__VITALS_DAYS``, ... Deletes run ``batch_size`` rows per transaction."""

    model_config = STRICT

    interval_hours: float = Field(default=24.0, ge=0.1, le=24.0 * 31)  # how often the scheduled prune runs
    #: Vital signs taken longer ago than this, outside every patient's current window.
    vitals_days: float = Field(default=400.0, ge=30.0)
    #: Failures resolved (by a later success) longer ago than this; open failures are never deleted.
    resolved_failures_days: float = Field(default=90.0, ge=1.0)
    #: Assessments superseded by a newer one, scored longer ago than this (the current one is kept).
    superseded_assessments_days: float = Field(default=365.0, ge=1.0)
    #: Study volumes (data_dir/volumes/*.npy) seen longer ago than this that no scoring will read again.
    volumes_days: float = Field(default=7.0, ge=1.0)
    #: Instances pushed by C-STORE (data_dir/spool/): a study's are removed once it was scored (or failed, or a newer
    #: study of the patient replaced it) and it was received longer ago than this.
    spool_days: float = Field(default=7.0, ge=1.0)
    #: Messages the embedded broker delivered longer ago than this (its table keeps every one).
    broker_messages_hours: float = Field(default=1.0, ge=0.5)
    batch_size: int = Field(default=1000, ge=10, le=100_000)
    #: The engine's log files (data_dir/logs/*.log): rotated beyond this size, keeping ``log_backups`` old ones.
    log_max_bytes: int = Field(default=50 << 20, ge=1 << 20, le=1 << 40)
    log_backups: int = Field(default=5, ge=0, le=100)
    #: How often the log files' sizes are checked (a scheduled job; also at every start).
    log_check_s: float = Field(default=60.0, ge=5.0, le=86400.0)


class DbSettings(BaseModel):
    """Timeouts of the database connections (``STROKEWATCH_DB__CONNECT_TIMEOUT_S``, ...). PostgreSQL gets
    ``connect_timeout`` and a server-side ``statement_timeout``; SQLite waits ``sqlite_busy_timeout_s`` for a lock."""

    model_config = STRICT

    #: Connecting to PostgreSQL (libpq counts whole seconds; at least 2 are used).
    connect_timeout_s: float = Field(default=10.0, gt=0.0, le=300.0)
    #: Any one SQL statement on PostgreSQL; 0 turns it off (schema migrations always run without it).
    statement_timeout_s: float = Field(default=60.0, ge=0.0, le=86400.0)
    #: How long a SQLite connection waits for another process's write lock before "database is locked".
    sqlite_busy_timeout_s: float = Field(default=30.0, gt=0.0, le=600.0)


class Settings(BaseSettings):
    # env_ignore_empty: a variable set to "" is unset (`${X:-}` in compose files pass every variable through)
    model_config = SettingsConfigDict(env_prefix="STROKEWATCH_", env_nested_delimiter="__", extra="forbid",
                                      env_ignore_empty=True,
                                      # an error never echoes what was given: it may be a secret (an API key
                                      # list of the wrong type, a password in the wrong field)
                                      hide_input_in_errors=True)

    sandbox: bool = False  # set by `strokewatch sandbox`/`demo`: placeholder secrets allowed
    data_dir: Path = Path("var")
    database_url: SecretStr | None = None  # a secret (it may carry a password); default: sqlite under data_dir
    broker_url: SecretStr | None = None  # a secret too; default: kombu SQLAlchemy transport on SQLite under data_dir
    api_host: str = "127.0.0.1"
    api_port: int = 8400
    public_base_url: str | None = None  # how the API is reached by users (links in summaries)

    pacs: PacsSettings = PacsSettings()
    ehr: EhrSettings = EhrSettings()
    policy: PolicySettings = PolicySettings()
    pacs_results: PacsResultsSettings = PacsResultsSettings()  # the SR + heat-map series written to the PACS
    alerts: AlertSettings = AlertSettings()  # the FHIR Flag while the risk is at or above the alert threshold
    privacy: PrivacySettings = PrivacySettings()
    limits: LimitsSettings = LimitsSettings()  # sizes of images, series, multipart answers and FHIR searches
    db: DbSettings = DbSettings()  # connect, statement and SQLite lock timeouts

    model_path: Path | None = None  # default: triton_models/stroke_fusion/1/model.onnx
    #: CPU threads of one process's embedded ONNX Runtime. Unset: the machine's CPUs shared among the worker's
    #: processes (``cpu_count // worker_concurrency``, at least 1): each process's own pool of a thread per CPU
    #: would have the worker's processes run twice as many busy threads as there are CPUs.
    model_threads: int | None = Field(default=None, ge=1, le=256)
    #: This centre's recalibration (a temperature and intercept in the package's site_calibration.json beside
    #: model.onnx, written by `strokewatch model recalibrate --site NAME`); unset: the model's own calibration.
    #: An unknown name stops start-up with the known ones listed.
    site: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    triton_url: str | None = None  # unset: the embedded ONNX Runtime
    triton_protocol: Literal["http", "grpc"] = "http"
    triton_model_name: str = "stroke_fusion"
    triton_model_version: str = ""  # "" = latest ready
    triton_timeout_s: float = 10.0
    triton_fallback_to_embedded: bool = False
    triton_tls: TlsSettings = TlsSettings()  # used with an https:// or grpcs:// STROKEWATCH_TRITON_URL
    api_tls: ApiTlsSettings = ApiTlsSettings()
    api: ApiSettings = ApiSettings()  # who may call the API (keys, IdP JWTs), docs, hosts, CORS, body limit, audit
    dashboard: DashboardSettings = DashboardSettings()  # /dashboard: sandbox access, sign-in, latency history
    cds_hooks: CdsHooksSettings = CdsHooksSettings()  # the EHRs trusted to call the CDS Hooks service
    webhooks: WebhookSettings = WebhookSettings()  # secrets of the Orthanc and FHIR Subscription webhooks
    retention: RetentionSettings = RetentionSettings()  # what is deleted when (db prune, scheduled), log rotation
    scp: ScpSettings = ScpSettings()  # the DICOM C-STORE SCP studies are pushed to (off by default)
    pipeline: PipelineSettings = PipelineSettings()  # which stages run on in the task before them (no queue hop)

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
    #: A peer's Retry-After (PACS, EHR, token endpoint) is honoured up to this many seconds; longer, infinite or
    #: far-future values are clamped to it, and garbage (``-1``, ``nan``, ``soon``) is no hint at all.
    retry_after_cap_s: float = Field(default=900.0, ge=1.0, le=86400.0)
    #: Reaper: claims older than this are considered dead and released. Keep it above task_time_limit_s: a claim
    #: reaped while its task still runs is counted as lost.
    stale_claim_s: int = 600
    #: After this many claims lost to a dying worker (killed, out of memory, hard time limit) a study, a patient's
    #: assessment or a publish is failed as ``worker_lost`` instead of retried; an operator replays it.
    max_lost_claims: int = Field(default=3, ge=1, le=100)
    #: Work the sweep (every 5 s) or the EHR poll has queued is not queued again for this long: one message per
    #: piece of work however long the backlog; a lost message is re-sent after it. Longer than a message waits.
    redeliver_after_s: float = Field(default=120.0, ge=15.0, le=3600.0)
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
        # Secret settings may also come from files (STROKEWATCH_*_FILE, STROKEWATCH_SECRETS_DIR): below the
        # environment, above the TOML file.
        files = SecretFilesSource(settings_cls)
        sources: list[PydanticBaseSettingsSource] = [init_settings, files.without_file_variables(env_settings), files]
        path = os.environ.get("STROKEWATCH_CONFIG")
        if path:
            if not Path(path).is_file():
                raise ValueError(f"STROKEWATCH_CONFIG={path} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("database_url", "broker_url")
    @classmethod
    def _not_blank(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value().strip() else None

    @model_validator(mode="after")
    def _scp_within_limits(self) -> Settings:
        if self.scp.max_instance_bytes > self.limits.max_series_bytes:
            raise ValueError("scp.max_instance_bytes is larger than limits.max_series_bytes (one instance is at most "
                             "a whole series); lower STROKEWATCH_SCP__MAX_INSTANCE_BYTES or raise both together")
        return self

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
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'strokewatch.db').resolve()}"

    @property
    def celery_broker_url(self) -> str:
        if self.broker_url is not None:
            return self.broker_url.get_secret_value()
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return self.celery_broker_url.startswith("sqla+")

    @property
    def api_docs_enabled(self) -> bool:
        """/docs and /openapi.json: as api.docs says; unset, on in the sandbox only."""
        return self.api.docs if self.api.docs is not None else self.sandbox

    @property
    def api_base_url(self) -> str:
        scheme = "https" if self.api_tls.cert is not None else "http"
        return self.public_base_url or f"{scheme}://{self.api_host}:{self.api_port}"

    def identifier_system_for(self, issuer: str | None) -> str | None:
        """The FHIR identifier system that holds a DICOM PatientID from this issuer."""
        if issuer and issuer in self.ehr.issuer_systems:
            return self.ehr.issuer_systems[issuer]
        return self.ehr.patient_identifier_system


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# ---------------------------------------------------------------------------------------------------------------
# Secret settings from files (Docker and Kubernetes secrets)
# ---------------------------------------------------------------------------------------------------------------

#: A secret file larger than this is refused before it is read whole: a PEM key chain fits, a wrong path does not.
SECRET_FILE_MAX_BYTES = 64 * 1024
#: A directory of secret files named after the settings (``database_url``, ``ehr__auth__client_secret``).
SECRETS_DIR_ENV = "STROKEWATCH_SECRETS_DIR"
_ENV_PREFIX = "STROKEWATCH_"


def secret_setting_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every secret setting of ``model`` (typed ``SecretStr``/``SecretBytes``, in nested groups too) as its
    path of field names, e.g. ``("ehr", "auth", "client_secret")``. New secret fields are found by their type."""
    paths: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        kinds = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
        if any(kind in (SecretStr, SecretBytes) for kind in kinds):
            paths.append((*prefix, name))
            continue
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                paths += secret_setting_paths(kind, (*prefix, name))
    return paths


def setting_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every setting of ``model`` that one variable sets, as its path of field names (nested groups are walked;
    lists, dicts and lists of groups are one JSON value): ``("ehr", "auth", "mode")`` is
    ``STROKEWATCH_EHR__AUTH__MODE``. The deployment files and their tests derive the settings from this."""
    paths: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        kinds = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
        groups = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        paths += setting_paths(groups[0], (*prefix, name)) if groups else [(*prefix, name)]
    return paths


def env_variable(path: tuple[str, ...]) -> str:
    """The environment variable of a setting path: ``("ehr", "base_url")`` -> ``STROKEWATCH_EHR__BASE_URL``."""
    return _ENV_PREFIX + "__".join(path).upper()


def read_secret_file(path: Path, what: str) -> str:
    """The text of a secret file, trailing newline stripped. ``what`` names the variable in every error;
    the contents never appear in one."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except OSError as err:
        raise ValueError(f"{what}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what}: not a regular file")
    if info.st_size > SECRET_FILE_MAX_BYTES:
        raise ValueError(f"{what}: larger than {SECRET_FILE_MAX_BYTES} bytes; is it the right file?")
    try:
        with path.open("rb") as handle:
            data = handle.read(SECRET_FILE_MAX_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{what}: cannot be read ({err.strerror}); the engine's user needs read access") from None
    if len(data) > SECRET_FILE_MAX_BYTES:
        raise ValueError(f"{what}: larger than {SECRET_FILE_MAX_BYTES} bytes; is it the right file?")
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not UTF-8 text") from None
    if not text:
        raise ValueError(f"{what}: the file is empty")
    return text


class SecretFilesSource(PydanticBaseSettingsSource):
    """Secret settings read from files, the Docker/Kubernetes convention:

    - ``STROKEWATCH_<SETTING>_FILE=/run/secrets/x`` for every secret setting (``STROKEWATCH_DATABASE_URL_FILE``,
      ``STROKEWATCH_EHR__AUTH__CLIENT_SECRET_FILE``, ``STROKEWATCH_PRIVACY__PSEUDONYM_KEY_FILE``);
    - ``STROKEWATCH_SECRETS_DIR=/run/secrets``: each file there named after a secret setting, lower case, groups
      joined by ``__`` (``database_url``, ``ehr__auth__client_secret``), like pydantic-settings' ``secrets_dir``
      but for nested settings. Hidden entries (Kubernetes' ``..data``) are skipped; any other name is an error.

    A ``_FILE`` variable wins over the directory; a setting given both as a variable and as its ``_FILE`` is an
    error. Every problem (missing, unreadable, empty, oversized file) stops start-up naming the variable.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None = None) -> None:
        super().__init__(settings_cls)
        self.environ = os.environ if environ is None else environ
        self.paths = {"__".join(path): path for path in secret_setting_paths(settings_cls)}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the files for every secret setting at once

    def __call__(self) -> dict[str, Any]:
        env = {key.upper(): value for key, value in self.environ.items()}
        values: dict[str, Any] = {}
        directory = env.get(SECRETS_DIR_ENV)
        if directory:
            for path, text in self._directory(Path(directory)):
                _put(values, path, text)
        for name, path in self.paths.items():
            variable = f"{_ENV_PREFIX}{name.upper()}"
            file_variable = f"{variable}_FILE"
            if file_variable not in env:
                continue
            if variable in env:
                raise ValueError(f"both {variable} and {file_variable} are set; set only one of them")
            if not env[file_variable]:
                raise ValueError(f"{file_variable} is empty; name the file that holds the secret, or unset it")
            _put(values, path, read_secret_file(Path(env[file_variable]), f"{file_variable}={env[file_variable]}"))
        return values

    def _directory(self, directory: Path) -> Iterator[tuple[tuple[str, ...], str]]:
        where = f"{SECRETS_DIR_ENV}={directory}"
        if not directory.is_dir():
            raise ValueError(f"{where}: not a directory")
        try:
            entries = sorted(directory.iterdir())
        except OSError as err:
            raise ValueError(f"{where}: cannot be listed ({err.strerror})") from None
        for entry in entries:
            if entry.name.startswith(".") or entry.is_dir():
                continue
            key = entry.name.lower().removeprefix(_ENV_PREFIX.lower())
            if key not in self.paths:
                known = ", ".join(sorted(self.paths))
                raise ValueError(f"{where}: the file {entry.name!r} names no secret setting (known: {known})")
            yield self.paths[key], read_secret_file(entry, f"{where}: {entry.name}")

    def without_file_variables(self, env_settings: PydanticBaseSettingsSource) -> PydanticBaseSettingsSource:
        """``env_settings`` minus the ``*_FILE`` variables read here (the environment source would take
        ``STROKEWATCH_EHR__AUTH__CLIENT_SECRET_FILE`` for an unknown setting ``client_secret_file``)."""
        return _WithoutFileVariables(self.settings_cls, env_settings, list(self.paths.values()))


class _WithoutFileVariables(PydanticBaseSettingsSource):
    def __init__(
        self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource, paths: list[tuple[str, ...]]
    ) -> None:
        super().__init__(settings_cls)
        self.inner = inner
        self.paths = paths

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = self.inner()
        for path in self.paths:
            group: Any = values
            for name in path[:-1]:
                group = group.get(name) if isinstance(group, dict) else None
            if isinstance(group, dict):
                group.pop(f"{path[-1]}_file", None)
        return values


def _put(values: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    for name in path[:-1]:
        values = values.setdefault(name, {})
    values[path[-1]] = value
