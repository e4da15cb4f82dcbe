"""``python -m synth --n 8 --seed 7 [--site NAME] --out DIR``: DICOM series, one FHIR bundle and the truth table.

Writes DIR/dicom/<MRN>/<SOPInstanceUID>.dcm, DIR/fhir/bundle.json (one transaction with every patient)
and DIR/truth.csv (patient, modality, probabilities, outcome, findings).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from synth.dicom import study_uid, write_dicom
from synth.fhir import fhir_resources, transaction_bundle
from synth.patient import DEFAULT_WINDOW_END, iter_cohort
from synth.sites import SITE_NAMES

log = logging.getLogger("synth")


def _window_end(text: str | None) -> datetime:
    if not text:
        return DEFAULT_WINDOW_END
    if text == "now":
        return datetime.now(UTC).replace(microsecond=0)
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synth", description=__doc__)
    parser.add_argument("--n", type=int, default=8, help="number of patients")
    parser.add_argument("--seed", type=int, default=7, help="cohort seed")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--identifier-system", default="urn:strokewatch:synth:mrn", help="Patient.identifier.system")
    parser.add_argument("--window-end", default=None, help="ISO datetime or 'now' (default: a fixed date)")
    parser.add_argument("--no-dicom", action="store_true", help="skip the DICOM series")
    parser.add_argument("--site", choices=SITE_NAMES, default=None, help="a named synthetic centre (synth/SYNTH.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    window_end = _window_end(args.window_end)
    resources = []
    rows = []
    for i, patient in enumerate(iter_cohort(args.n, args.seed, args.site)):
        resources += fhir_resources(patient, identifier_system=args.identifier_system, window_end=window_end)
        n_files = 0
        if not args.no_dicom:
            n_files = len(write_dicom(patient, args.out / "dicom" / patient.mrn, window_end=window_end))
        rows.append(
            {
                "patient": patient.mrn,
                "modality": patient.modality,
                "study_uid": study_uid(patient),
                "true_probability": f"{patient.true_probability:.6f}",
                "image_only_probability": f"{patient.image_only_probability:.6f}",
                "vitals_only_probability": f"{patient.vitals_only_probability:.6f}",
                "outcome": patient.outcome,
                "findings": patient.findings_summary(),
            }
        )
        if args.site:  # the default cohort's table keeps its columns
            rows[-1] |= {"site": patient.site, "follow_up_days": f"{patient.follow_up_days:g}"}
        log.info("patient %d/%d: %d slices", i + 1, args.n, n_files)  # no PHI in logs
    (args.out / "fhir").mkdir(parents=True, exist_ok=True)
    (args.out / "fhir" / "bundle.json").write_text(json.dumps(transaction_bundle(resources), indent=1))
    with (args.out / "truth.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["patient"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
