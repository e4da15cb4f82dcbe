"""The C-STORE spool: instances pushed to the SCP kept as DICOM files under ``data_dir/spool`` (the ``Spool`` port), and
read back by the ingest of their study (the ``Pacs`` port), with no PACS round trip.

Layout (every name derived from a UID by SHA-256, never taken from the data set)::

    spool/.lock                         flock: writers share it, a removal takes it alone
    spool/.tmp/<pid>.<random>.part      a write in progress (left behind only by a killed process)
    spool/<sha256(study)>/complete      the study was completed and registered (JSON: its UID and when)
    spool/<sha256(study)>/<sha256(series)>/<sha256(sop instance)>.dcm

A write is durable before ``put`` returns: the temp file is written and fsync'd, renamed into place, and the
series directory fsync'd (a directory made for it is fsync'd into its parent first). The file is DICOM Part 10: a
file meta group (transfer syntax of the association, calling AE title as Source Application Entity Title) and the
data set exactly as received, never decoded and re-encoded. Everything is the engine user's only (0700/0600).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from inference.preprocess import Slice
from integration.adapters.dicom_decode import BufferReader, SeriesSlices, sorted_along_normal
from integration.adapters.dicomweb_parse import dicom_datetime
from integration.domain import stages
from integration.domain.ids import is_dicom_uid, opaque_name, shown
from integration.domain.limits import ImageLimits, too_large
from integration.domain.push import InstanceHeader, ReceivedInstance, SpooledStudy
from integration.domain.studytime import localize
from integration.domain.types import DomainError, Outcome, SeriesRef, StudyRef

log = logging.getLogger(__name__)

COMPLETE = "complete"
_KEY = re.compile(r"[0-9a-f]{64}")
_PREAMBLE = b"\x00" * 128 + b"DICM"
#: How long a removal waits for writers to finish before it leaves the study for the next prune.
_REMOVE_LOCK_WAIT_S = 10.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value: as if absent
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:  # a malformed IS/US value
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except Exception:
        return None


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
        values = tuple(float(v) for v in value) if value is not None else ()
    except Exception:
        return None
    return values if len(values) == n else None


def _strs(ds: Dataset, keyword: str) -> tuple[str, ...]:
    text = _text(ds, keyword)
    return tuple(part.strip() for part in text.split("\\") if part.strip())


def _before_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) >> 16 >= 0x7FE0  # pixel data (and anything after it) is never read for the header


class FileSpool:
    #: As ``DicomWebPacs.reduce_planes``: the engine's ingest reads block means; off, the stored pixels exactly.
    reduce_planes: bool = False
    """The spool under ``root`` (``data_dir/spool``). One instance per process, shared by its threads.

    ``limits`` bound what the ingest reads back (as for a WADO-RS answer); ``study_timezone`` is the zone naive
    study dates are read in (``pacs.timezone``); ``max_instance_bytes`` bounds one spooled file read back."""

    def __init__(self, root: Path, *, limits: ImageLimits | None = None, study_timezone: tzinfo = UTC,
                 max_instance_bytes: int = 512 << 20) -> None:
        self.root = root
        self.limits = limits or ImageLimits()
        self.study_timezone = study_timezone
        self.max_instance_bytes = max_instance_bytes
        self._usage: dict[tuple[str, str], list[int]] = {}
        self._usage_lock = threading.Lock()

    # -- paths ----------------------------------------------------------------------------------------------------

    def _study_dir(self, study_uid: str) -> Path:
        return self.root / opaque_name(study_uid)

    def _series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self._study_dir(study_uid) / opaque_name(series_uid)

    def _instance_path(self, header: InstanceHeader) -> Path:
        return self._series_dir(header.study_uid, header.series_uid) / f"{opaque_name(header.sop_instance_uid)}.dcm"

    def _ensure_dir(self, path: Path) -> None:
        """A directory (0700) whose entry in its parent is durable."""
        if path.is_dir():
            return
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            return
        _fsync_dir(path.parent)

    def _ensure_root(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _fsync_dir(self.root.parent)
        self._ensure_dir(self.root / ".tmp")

    @contextmanager
    def _locked(self, exclusive: bool, wait_s: float | None = None) -> Iterator[bool]:
        """The spool lock: writers hold it shared while they write, a removal exclusively while it takes a study
        out. A fresh descriptor per holder (flock locks belong to the open file, not the thread). Yields False when
        ``wait_s`` passed without the lock."""
        self._ensure_root()
        fd = os.open(self.root / ".lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            if wait_s is None:
                fcntl.flock(fd, mode)
            else:
                deadline = time.monotonic() + wait_s
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            yield False
                            return
                        time.sleep(0.05)
            yield True
        finally:
            os.close(fd)  # releases the lock

    # -- Spool port: the SCP's side ---------------------------------------------------------------------------------

    def parse(self, received: ReceivedInstance) -> InstanceHeader:
        syntax = UID(received.transfer_syntax)
        if not syntax.is_transfer_syntax or syntax.is_deflated:
            raise DomainError(Outcome.UNSUPPORTED_TRANSFER_SYNTAX,
                              f"transfer syntax {shown(received.transfer_syntax)} is not accepted here")
        view = memoryview(received.dataset).cast("B")
        try:
            reader: Any = BufferReader(view)  # file-like enough for pydicom: read, seek, tell
            ds = read_dataset(reader, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_before_pixels)
            header = InstanceHeader(
                study_uid=_text(ds, "StudyInstanceUID"),
                series_uid=_text(ds, "SeriesInstanceUID"),
                sop_instance_uid=_text(ds, "SOPInstanceUID"),
                sop_class_uid=_text(ds, "SOPClassUID"),
                rows=_int(ds, "Rows"),
                columns=_int(ds, "Columns"),
                frames=max(1, _int(ds, "NumberOfFrames") or 1),
            )
        except DomainError:
            raise
        except Exception as err:  # pydicom raises many kinds for a broken data set; none may reach the sender
            raise DomainError(Outcome.CORRUPT_PIXEL_DATA,
                              f"the data set cannot be read ({type(err).__name__})") from None
        return header

    def contains(self, header: InstanceHeader) -> bool:
        return self._instance_path(header).is_file()

    def usage(self, study_uid: str, series_uid: str) -> tuple[int, int]:
        key = (opaque_name(study_uid), opaque_name(series_uid))
        directory = self._series_dir(study_uid, series_uid)
        with self._usage_lock:
            if not directory.is_dir():
                self._usage.pop(key, None)
                return 0, 0
            if key not in self._usage:  # first look in this process: count what is there (planes: one per file)
                files = [e for e in os.scandir(directory) if e.name.endswith(".dcm")]
                self._usage[key] = [len(files), sum(e.stat().st_size for e in files)]
            planes, size = self._usage[key]
            return planes, size

    def free_bytes(self) -> int:
        self._ensure_root()
        info = os.statvfs(self.root)
        return info.f_bavail * info.f_frsize

    def reopen(self, study_uid: str) -> None:
        mark = self._study_dir(study_uid) / COMPLETE
        try:
            mark.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(mark.parent)

    def put(self, header: InstanceHeader, received: ReceivedInstance) -> bool:
        path = self._instance_path(header)
        prefix = self._file_meta(header, received)
        with self._locked(exclusive=False):
            if path.is_file():
                return False
            self._ensure_dir(path.parent.parent)
            self._ensure_dir(path.parent)
            tmp = self.root / ".tmp" / f"{os.getpid()}.{secrets.token_hex(8)}.part"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                _write_all(fd, prefix)
                _write_all(fd, received.dataset)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            os.rename(tmp, path)  # atomic: a reader sees the whole file or none
            _fsync_dir(path.parent)
        size = len(prefix) + memoryview(received.dataset).nbytes
        with self._usage_lock:
            key = (path.parent.parent.name, path.parent.name)
            if key in self._usage:
                self._usage[key][0] += header.frames
                self._usage[key][1] += size
        return True

    @staticmethod
    def _file_meta(header: InstanceHeader, received: ReceivedInstance) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(header.sop_class_uid)
        meta.MediaStorageSOPInstanceUID = UID(header.sop_instance_uid)
        meta.TransferSyntaxUID = UID(received.transfer_syntax)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "STROKEWATCH"
        meta.SourceApplicationEntityTitle = received.calling_aet
        buffer = DicomBytesIO()
        write_file_meta_info(buffer, meta, enforce_standard=True)
        return _PREAMBLE + buffer.getvalue()

    def mark_complete(self, study_uid: str) -> None:
        directory = self._study_dir(study_uid)
        if not directory.is_dir():
            return
        self._ensure_root()
        body = json.dumps({"study_uid": study_uid, "completed_at": datetime.now(UTC).isoformat()}).encode()
        tmp = self.root / ".tmp" / f"{os.getpid()}.{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / COMPLETE)
        _fsync_dir(directory)

    def study_ref(self, study_uid: str) -> StudyRef | None:
        ds = self._first_header(self._study_dir(study_uid), study_uid)
        if ds is None:
            return None
        when = dicom_datetime(_text(ds, "StudyDate"), _text(ds, "StudyTime"), _text(ds, "TimezoneOffsetFromUTC"))
        if when is not None:
            when = localize(when, self.study_timezone)
        modalities = sorted({m for d in self._series_dirs(study_uid) if (m := self._series_modality(d))})
        return StudyRef(
            study_uid=study_uid,
            patient_id=_text(ds, "PatientID"),
            issuer=_text(ds, "IssuerOfPatientID") or None,
            study_datetime=when,
            modalities=tuple(modalities),
            description=_text(ds, "StudyDescription"),
            date_only=when is not None and not _text(ds, "StudyTime"),
        )

    def studies(self, *, pending_only: bool = False) -> list[SpooledStudy]:
        if not self.root.is_dir():
            return []
        found: list[SpooledStudy] = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not _KEY.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            directory = Path(entry.path)
            if pending_only and (directory / COMPLETE).is_file():
                continue
            files = list(self._files(directory))
            stamps = [f.stat().st_mtime for f in files] or [directory.stat().st_mtime]
            found.append(SpooledStudy(
                key=entry.name,
                study_uid=self._study_uid(directory),
                newest=datetime.fromtimestamp(max(stamps), UTC),
                complete=(directory / COMPLETE).is_file(),
                files=len(files),
            ))
        return found

    def remove(self, key: str, not_after: datetime, *, dry_run: bool = False) -> int:
        if not _KEY.fullmatch(key):
            raise ValueError(f"{shown(key)} names no spooled study")
        directory = self.root / key
        if not directory.is_dir():
            return 0
        with self._locked(exclusive=True, wait_s=_REMOVE_LOCK_WAIT_S) as held:
            if not held:
                log.info("spool: study %s... is being written; left for the next prune", key[:12])
                return 0
            files = list(self._files(directory))
            if any(datetime.fromtimestamp(f.stat().st_mtime, UTC) > not_after for f in files):
                return 0  # an instance arrived meanwhile
            if dry_run:
                return len(files)
            trash = self.root / ".tmp" / f"{key}.{secrets.token_hex(4)}.removed"
            os.rename(directory, trash)  # writers wait meanwhile; a later instance makes a fresh directory
        shutil.rmtree(trash, ignore_errors=True)
        with self._usage_lock:
            for cached in [k for k in self._usage if k[0] == key]:
                del self._usage[cached]
        return len(files)

    def remove_partial(self, before: datetime, *, dry_run: bool = False) -> int:
        """Writes of processes killed before the rename (``.tmp/*.part``) and removals interrupted midway."""
        tmp_dir = self.root / ".tmp"
        if not tmp_dir.is_dir():
            return 0
        removed = 0
        for entry in os.scandir(tmp_dir):
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= before.timestamp():
                    continue
                if not dry_run:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    # -- Pacs port: the ingest's side ---------------------------------------------------------------------------

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        return []  # pushed studies are registered when they complete, never searched for

    def get_study(self, study_uid: str) -> StudyRef | None:
        return self.study_ref(study_uid) if is_dicom_uid(study_uid) else None

    def list_series(self, study_uid: str) -> list[SeriesRef]:
        if not is_dicom_uid(study_uid):
            raise DomainError(Outcome.INVALID_UID, f"refused {shown(study_uid)}: not a DICOM UID (PS3.5 9.1)")
        refs: list[SeriesRef] = []
        study_description: str | None = None
        for directory in self._series_dirs(study_uid):
            files = sorted(self._files_of_series(directory))
            ds = self._header(files[0]) if files else None
            if ds is None:
                continue
            series_uid = _text(ds, "SeriesInstanceUID")
            if not is_dicom_uid(series_uid) or opaque_name(series_uid) != directory.name:
                log.warning("spool: study %s: a series folder does not match its instances; skipped", study_uid)
                continue
            if study_description is None:
                study_description = _text(ds, "StudyDescription")
            refs.append(SeriesRef(
                study_uid=study_uid,
                series_uid=series_uid,
                modality=_text(ds, "Modality"),
                n_instances=len(files),
                body_part=_text(ds, "BodyPartExamined"),
                series_description=_text(ds, "SeriesDescription"),
                study_description=_text(ds, "StudyDescription") or study_description,
                sop_class_uid=_text(ds, "SOPClassUID"),
                image_type=_strs(ds, "ImageType"),
                slice_thickness=_float(ds, "SliceThickness"),
                convolution_kernel=_text(ds, "ConvolutionKernel"),
                orientation=_floats(ds, "ImageOrientationPatient", 6),
                frames_per_instance=max(1, _int(ds, "NumberOfFrames") or 1),
                rows=_int(ds, "Rows"),
                columns=_int(ds, "Columns"),
            ))
        return refs

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        """(modality, slices ordered along the slice normal) from the spooled files, each decoded by ``dicom_decode``
        with the same limits as a WADO-RS answer: bytes read and decoded, image planes, one file's size."""
        series = SeriesSlices(series_uid, self.limits, reduce=self.reduce_planes, source="holds")
        for data in self._series_files(study_uid, series_uid):
            series.add(data)
        if not series.slices:
            raise _gone(series_uid)
        started = time.perf_counter()
        ordered = sorted_along_normal(series.slices)
        stages.report(stages.DECODE, series.decoding_s + time.perf_counter() - started)
        return series.modality, ordered

    def source_instances(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """Every spooled instance of the series, pixel data included (``ports.SourceImages``): what the results written
        to the PACS are drawn from for a pushed study. Bounded like ``retrieve_series`` (instances, bytes, one
        file's size); NO_ELIGIBLE_SERIES when the spool holds none of it (removed by retention)."""
        datasets: list[Dataset] = []
        for data in self._series_files(study_uid, series_uid):
            try:
                datasets.append(pydicom.dcmread(DicomBytesIO(data)))
            except Exception as err:  # a file that is not DICOM any more (disk trouble)
                why = f"series {series_uid}: a spooled file cannot be read ({type(err).__name__})"
                raise DomainError(Outcome.CORRUPT_PIXEL_DATA, why) from None
        if not datasets:
            raise _gone(series_uid)
        return datasets

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _series_files(self, study_uid: str, series_uid: str) -> Iterator[bytes]:
        """The bytes of each spooled file of the series, within the series limits: the UIDs checked, the number of
        files before any is read, the bytes read as they add up (TOO_LARGE beyond either); files removed meanwhile
        (retention) are skipped."""
        for uid in (study_uid, series_uid):
            if not is_dicom_uid(uid):
                raise DomainError(Outcome.INVALID_UID, f"refused {shown(uid)}: not a DICOM UID (PS3.5 9.1)")
        limits = self.limits
        files = sorted(self._files_of_series(self._series_dir(study_uid, series_uid)))
        if len(files) > limits.max_slices_per_series:
            raise too_large(f"series {series_uid} holds {len(files)} instances in the spool",
                            str(limits.max_slices_per_series), "MAX_SLICES_PER_SERIES")
        read = 0
        for path in files:
            data = self._read(path, series_uid)
            if data is None:
                continue
            read += len(data)
            if read > limits.max_series_bytes:
                raise too_large(f"series {series_uid}: the spool holds more than {limits.max_series_bytes} bytes",
                                str(limits.max_series_bytes), "MAX_SERIES_BYTES")
            yield data

    def _read(self, path: Path, series_uid: str) -> bytes | None:
        """One spooled file, its size checked before it is read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise DomainError(Outcome.INTERNAL_ERROR, f"series {series_uid}: a spooled file is a link") from None
            raise DomainError(Outcome.INTERNAL_ERROR,
                              f"series {series_uid}: a spooled file cannot be read ({err.strerror})") from None
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > self.max_instance_bytes:
                raise DomainError(Outcome.TOO_LARGE, f"series {series_uid}: a spooled instance has {size} bytes; "
                                  f"the limit is {self.max_instance_bytes} (STROKEWATCH_SCP__MAX_INSTANCE_BYTES)")
            return handle.read(size)

    def _series_dirs(self, study_uid: str) -> list[Path]:
        directory = self._study_dir(study_uid)
        if not directory.is_dir():
            return []
        return sorted(Path(e.path) for e in os.scandir(directory)
                      if _KEY.fullmatch(e.name) and e.is_dir(follow_symlinks=False))

    @staticmethod
    def _files_of_series(directory: Path) -> Iterator[Path]:
        if not directory.is_dir():
            return
        for entry in os.scandir(directory):
            if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False):
                yield Path(entry.path)

    def _files(self, study_dir: Path) -> Iterator[Path]:
        for entry in os.scandir(study_dir):
            if _KEY.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                yield from self._files_of_series(Path(entry.path))

    def _header(self, path: Path) -> Dataset | None:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except FileNotFoundError:
            return None
        except Exception as err:  # a file that is not DICOM any more (disk trouble): said, skipped
            log.warning("spool: %s... cannot be read (%s)", path.name[:12], type(err).__name__)
            return None

    def _first_header(self, study_dir: Path, study_uid: str | None = None) -> Dataset | None:
        if not study_dir.is_dir():
            return None
        for path in sorted(self._files(study_dir)):
            ds = self._header(path)
            if ds is not None and (study_uid is None or _text(ds, "StudyInstanceUID") == study_uid):
                return ds
        return None

    def _series_modality(self, directory: Path) -> str:
        for path in sorted(self._files_of_series(directory)):
            ds = self._header(path)
            if ds is not None:
                return _text(ds, "Modality").upper()
        return ""

    def _study_uid(self, directory: Path) -> str | None:
        """The UID a study folder holds: from its completion mark, else from an instance; checked against the
        folder's name (a file moved in from elsewhere does not name it)."""
        candidates: list[str] = []
        try:
            mark: Any = json.loads((directory / COMPLETE).read_text())
            candidates.append(str(mark.get("study_uid", "")) if isinstance(mark, dict) else "")
        except (OSError, ValueError):
            pass
        if not candidates or not candidates[0]:
            ds = self._first_header(directory)
            candidates = [_text(ds, "StudyInstanceUID")] if ds is not None else []
        for uid in candidates:
            if is_dicom_uid(uid) and opaque_name(uid) == directory.name:
                return uid
        return None


def _gone(series_uid: str) -> DomainError:
    return DomainError(Outcome.NO_ELIGIBLE_SERIES,
                       f"series {series_uid} is not in the spool any more (removed by retention?)")
