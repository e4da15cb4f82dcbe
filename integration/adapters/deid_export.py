"""The ``ExportTarget`` port on a directory: a de-identified export written aside, then renamed into place.

Layout under the output directory::

    manifest.json                                   what is inside, the profile and options, every file's SHA-256
    dicom/<patient pseudonym>/<study UID>/<series UID>/<SOP instance UID>.dcm
    fhir/Patient.ndjson, fhir/Observation.ndjson, fhir/RiskAssessment.ndjson

Everything is written into ``.<name>.partial-<random>`` beside the output (0700) and renamed to the output in one
step after the manifest, so a reader never sees half an export: the output exists only complete. An export that
fails is removed. An existing output is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from pydicom import Dataset

from integration.adapters.dicom_deid import deidentify, encode
from integration.domain.deid import DeidKey, PatientContext


class ExportDirectoryError(ValueError):
    """The output directory cannot be used (it exists, or its parent cannot be written)."""


class ExportDirectory:
    def __init__(self, out: Path, key: DeidKey) -> None:
        self.out = Path(out)
        if self.out.exists():
            raise ExportDirectoryError(f"{self.out} exists already; an export never overwrites: choose a new --out")
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.work = parent / f".{self.out.name}.partial-{secrets.token_hex(4)}"
            self.work.mkdir(mode=0o700)
        except OSError as err:
            raise ExportDirectoryError(f"cannot write beside {self.out}: {err.strerror}") from None
        self.key = key
        self.files: dict[str, str] = {}
        self._done = False

    def _write(self, relative: str, data: bytes, *, append: bool = False) -> None:
        path = self.work / relative
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "ab" if append else "wb") as handle:
            handle.write(data)

    def add_instance(self, dataset: Dataset, patient: PatientContext) -> tuple[str, str, str]:
        ds = deidentify(dataset, patient, self.key)
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        self._write(f"dicom/{patient.pseudonym}/{uids[0]}/{uids[1]}/{uids[2]}.dcm", encode(ds))
        return uids

    def add_resource(self, resource: dict[str, Any]) -> None:
        line = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
        self._write(f"fhir/{resource['resourceType']}.ndjson", line.encode(), append=True)

    def commit(self, manifest: dict[str, Any]) -> str:
        files = {}
        for path in sorted(p for p in self.work.rglob("*") if p.is_file()):
            files[path.relative_to(self.work).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest = {**manifest, "files": files, "complete": True}
        self._write("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        for path in self.work.rglob("*"):  # flushed before the rename makes the export visible
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if self.out.exists():
            raise ExportDirectoryError(f"{self.out} appeared while exporting; the export is left in {self.work}")
        os.rename(self.work, self.out)
        self._done = True
        return str(self.out)

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.work, ignore_errors=True)
