"""What doctor says from the settings alone: are the peers configured, and how study times and patients are read."""

from __future__ import annotations

from integration.config import Settings
from integration.domain.checks import CheckResult, env_name


def check_settings(settings: Settings) -> CheckResult:
    """``settings``: valid (pydantic checked that), and the PACS and EHR URLs the engine cannot start without."""
    missing = [
        env_name(*path)
        for path, value in (
            (("pacs", "dicomweb_url"), settings.pacs.dicomweb_url or settings.pacs.kind == "dimse"),
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


def pacs_time_zone(settings: Settings) -> CheckResult:
    """``pacs time zone``: the zone naive DICOM dates are read in, and how far ahead detection looks."""
    pacs = settings.pacs
    return CheckResult(
        "pacs time zone",
        True,
        f"study dates without TimezoneOffsetFromUTC are read in {pacs.study_zone_name()}; "
        f"studies up to {pacs.clock_skew_s:g} s in the future are found (clock skew)",
    )


def patient_identifier_system(settings: Settings) -> CheckResult:
    """``patient identifier system``: which Patient.identifier system a DICOM PatientID is matched in."""
    ehr, var = settings.ehr, env_name("ehr", "patient_identifier_system")
    issuers = f"; {len(ehr.issuer_systems)} issuer-specific system(s)" if ehr.issuer_systems else ""
    if ehr.patient_identifier_system:
        return CheckResult(
            "patient identifier system",
            True,
            f"DICOM PatientID matched to Patient.identifier system {ehr.patient_identifier_system}{issuers}",
        )
    return CheckResult(
        "patient identifier system",
        True,
        f"warning: no identifier system: PatientID is matched against identifiers of any system{issuers}",
        f"set {var} to the MRN system (e.g. urn:oid:...)",
        warning=True,
    )
