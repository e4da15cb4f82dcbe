"""How large an image object may be, checked from what its headers declare before anything is allocated.

A PACS is trusted to send studies, not to be careful: a compressed frame that declares 65535 x 65535 pixels, a
header with a million tiny frames, a series of a hundred thousand instances or a multipart answer whose parts
never end would each take the worker's memory before a decoder could notice. Every such number is compared with
these limits first (from ``STROKEWATCH_LIMITS__*``); beyond one, the object gets ``Outcome.TOO_LARGE``, which is
not retried (the same object will be as large next time) and can be replayed once the limit is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

from integration.domain.types import DomainError, Outcome, SeriesRef

#: Decoded slices are float32 (``inference.preprocess.Slice``): what a pixel costs once decoded.
DECODED_BYTES_PER_PIXEL = 4
_SETTING = "STROKEWATCH_LIMITS__"


@dataclass(frozen=True)
class ImageLimits:
    """The caps on one series and on each of its instances (defaults: what a thin-slice brain CT needs, twice)."""

    max_rows: int = 4096
    max_columns: int = 4096
    #: Frames of one (Enhanced, multi-frame) instance.
    max_frames_per_instance: int = 2000
    #: Image planes of one series: instances, each multi-frame instance counting its frames.
    max_slices_per_series: int = 2000
    #: Bytes of one series, both as received (the WADO-RS answer) and as decoded float32 slices.
    max_series_bytes: int = 1 << 30
    #: One multipart part's header block, one part, and the parts of one answer.
    multipart_max_header_bytes: int = 16 * 1024
    multipart_max_part_bytes: int = 512 << 20
    multipart_max_parts: int = 2000

    def check_image(self, rows: int, columns: int, frames: int, where: str) -> int:
        """Refuse an instance whose header declares more than the limits allow; returns its decoded bytes."""
        if rows > self.max_rows or columns > self.max_columns:
            raise too_large(
                f"{where} declares {rows} x {columns} pixels",
                f"{self.max_rows} x {self.max_columns}",
                "MAX_ROWS / MAX_COLUMNS",
            )
        if frames > self.max_frames_per_instance:
            raise too_large(
                f"{where} declares {frames} frames", str(self.max_frames_per_instance), "MAX_FRAMES_PER_INSTANCE"
            )
        decoded = rows * columns * frames * DECODED_BYTES_PER_PIXEL
        if decoded > self.max_series_bytes:
            raise too_large(f"{where} would decode to {decoded} bytes", str(self.max_series_bytes), "MAX_SERIES_BYTES")
        return decoded

    def check_series(self, series: SeriesRef) -> None:
        """Before a series is retrieved: the instance and frame counts the PACS declared (QIDO-RS)."""
        if series.n_slices > self.max_slices_per_series:
            raise too_large(
                f"series {series.series_uid} holds {series.n_instances} instance(s) of "
                f"{max(1, series.frames_per_instance)} frame(s)",
                str(self.max_slices_per_series),
                "MAX_SLICES_PER_SERIES",
            )
        if series.rows and series.columns:
            declared = series.n_slices * series.rows * series.columns * DECODED_BYTES_PER_PIXEL
            if declared > self.max_series_bytes:
                raise too_large(
                    f"series {series.series_uid} would decode to {declared} bytes",
                    str(self.max_series_bytes),
                    "MAX_SERIES_BYTES",
                )


def too_large(what: str, limit: str, setting: str) -> DomainError:
    """``Outcome.TOO_LARGE`` naming what was refused, the limit and the setting that raises it."""
    return DomainError(Outcome.TOO_LARGE, f"{what}; the limit is {limit} ({_SETTING}{setting})")
