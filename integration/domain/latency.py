"""Stage latency percentiles over time, from copies of the cumulative stage histogram (``domain.stages``).

The histogram only ever grows, so what happened between two copies is their difference (``stages.minus``), and
its percentiles are those of the work done in that interval. The sweep keeps a bounded ring of copies; the
dashboard plots one point per interval and stage. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from integration.domain import stages

#: The percentiles the dashboard plots.
QUANTILES: tuple[float, ...] = (0.5, 0.95)


@dataclass(frozen=True)
class StageSnapshot:
    """The cumulative stage histograms as they were at ``taken_at``."""

    taken_at: datetime
    histograms: tuple[stages.StageHistogram, ...]


@dataclass(frozen=True)
class LatencySeries:
    """One stage over time: per interval its end (unix seconds), how many passes ended in it, and each
    percentile in seconds (None for an interval without any pass: a gap in the plot, not a zero)."""

    stage: str
    times: list[float]
    counts: list[int]
    percentiles: dict[float, list[float | None]]


def to_json(h: stages.StageHistogram) -> dict[str, object]:
    """A histogram as the snapshot table stores it: cumulative counts in ``BUCKETS`` order (+Inf last), the sum."""
    return {"counts": [n for _, n in h.buckets], "sum": h.sum}


def from_json(stage: str, value: object) -> stages.StageHistogram | None:
    """The inverse of ``to_json``; None for a row written with other bucket bounds (the bounds changed)."""
    if not isinstance(value, dict):
        return None
    counts, total = value.get("counts"), value.get("sum", 0.0)
    bounds = (*stages.BUCKETS, math.inf)
    if not isinstance(counts, list) or len(counts) != len(bounds) or not isinstance(total, int | float):
        return None
    buckets = tuple((b, int(n)) for b, n in zip(bounds, counts, strict=True))
    return stages.StageHistogram(stage, buckets, buckets[-1][1], float(total))


def series(snapshots: Sequence[StageSnapshot], quantiles: Sequence[float] = QUANTILES) -> list[LatencySeries]:
    """Per stage (``stages.STAGES`` order), the percentiles of each interval between consecutive snapshots
    (oldest first). A counter that went down (the table was reset) starts afresh from that snapshot."""
    ordered = sorted(snapshots, key=lambda s: s.taken_at)
    out: list[LatencySeries] = []
    for stage in stages.STAGES:
        times: list[float] = []
        counts: list[int] = []
        values: dict[float, list[float | None]] = {q: [] for q in quantiles}
        before: stages.StageHistogram | None = None
        for snap in ordered:
            after = next((h for h in snap.histograms if h.stage == stage), None)
            if after is None:
                continue
            if before is not None:
                delta = stages.minus(after, before) if after.count >= before.count else after
                times.append(snap.taken_at.timestamp())
                counts.append(delta.count)
                for q in quantiles:
                    v = stages.quantile(q, delta.buckets) if delta.count > 0 else math.nan
                    values[q].append(None if math.isnan(v) else round(v, 6))
            before = after
        out.append(LatencySeries(stage, times, counts, values))
    return out
