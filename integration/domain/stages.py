"""The stages whose durations the engine measures, as one Prometheus histogram (``strokewatch_stage_seconds``).

Pure: names, bucket bounds, folding observations into per-bucket increments, and reading cumulative histograms
back. The services time the stages (``services.timing``); the store keeps one cumulative counter row per stage and
bucket, shared by every process and host; the API exposes them at scrape time.

Adapters that time a part of a port call themselves (the decoding inside ``Pacs.retrieve_series``) ``report`` it:
the service timing the call records that part under its own stage and takes it out of the call's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

#: From the study's completion (Orthanc's StableStudy event; the C-STORE association's release) to its registration.
DETECT = "detect"
#: ``Pacs.retrieve_series``, less the decoding the adapter reports inside it.
RETRIEVE = "retrieve"
#: Instances decoded into slices, as the PACS adapter reports it (the spool's reader).
DECODE = "decode"
#: Slices to the model's volume tensor, written to the volumes folder.
PREPROCESS = "preprocess"
#: One patient's vitals sync: EHR search, normalisation, stored.
VITALS = "vitals"
#: One forward pass of the model over a batch of patients.
MODEL = "model"
#: Naming each score's drivers: exact from the scoring pass's logit terms, or one batched occlusion call.
EXPLAIN = "explain"
#: One RiskAssessment written to the EHR (conditional create) and recorded.
PUBLISH = "publish"
#: From the study's completion to the first RiskAssessment based on it written to the EHR.
END_TO_END = "end_to_end"

STAGES: tuple[str, ...] = (DETECT, RETRIEVE, DECODE, PREPROCESS, VITALS, MODEL, EXPLAIN, PUBLISH, END_TO_END)

#: Upper bounds (seconds) of the finite buckets: fine below the sub-second targets, up to a minute.
BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
)
INF = "+Inf"

#: One observation: (stage, seconds).
Observation = tuple[str, float]


def label(bound: float) -> str:
    """A bucket's ``le`` label as Prometheus writes it: ``0.005``, ``1.0``, ``+Inf``."""
    return INF if math.isinf(bound) else repr(float(bound))


_LABELS = tuple(label(b) for b in BUCKETS) + (INF,)


def bucket_label(seconds: float) -> str:
    """The ``le`` label of the one bucket an observation falls in (the smallest bound at or above it)."""
    for bound, name in zip(BUCKETS, _LABELS, strict=False):
        if seconds <= bound:
            return name
    return INF


@dataclass(frozen=True)
class BucketIncrement:
    """What one batch of observations adds to one stored row: the observations that fell in the bucket ``le``
    (non-cumulative) and the sum of their seconds."""

    stage: str
    le: str
    count: int
    seconds: float


def fold(observations: Iterable[Observation]) -> list[BucketIncrement]:
    """Observations folded into one increment per (stage, bucket), in a fixed order (stage, then bound): written as
    one statement, and concurrent writers lock rows in the same order. Unknown stages raise ValueError (the table
    stays bounded by stages x buckets); NaN is dropped and a negative duration (clock skew) counts as 0."""
    acc: dict[tuple[str, str], tuple[int, float]] = {}
    for stage, seconds in observations:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
        if math.isnan(seconds):
            continue
        seconds = max(0.0, float(seconds))
        key = (stage, bucket_label(seconds))
        n, total = acc.get(key, (0, 0.0))
        acc[key] = (n + 1, total + seconds)
    order = {name: k for k, name in enumerate(_LABELS)}
    keys = sorted(acc, key=lambda k: (STAGES.index(k[0]), order[k[1]]))
    return [BucketIncrement(stage, le, *acc[(stage, le)]) for stage, le in keys]


@dataclass(frozen=True)
class StageHistogram:
    """One stage's cumulative histogram: ``buckets`` as (upper bound, observations at or below it), the last one
    ``inf`` (= ``count``), and the sum of all observed seconds."""

    stage: str
    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


def histograms(rows: Iterable[BucketIncrement]) -> list[StageHistogram]:
    """The stored rows (per-bucket counts, as ``fold`` writes them) as cumulative histograms, one per stage in
    ``STAGES`` order, zeros for a stage never observed. A row whose bound is not among ``BUCKETS`` any more (the
    bounds changed) counts in the next bound above it, so no observation is lost and counts stay monotonic."""
    bounds = (*BUCKETS, math.inf)
    per: dict[str, list[int]] = {stage: [0] * len(bounds) for stage in STAGES}
    sums: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    for row in rows:
        if row.stage not in per:
            continue  # a stage this version no longer measures
        le = math.inf if row.le == INF else float(row.le)
        k = next(i for i, bound in enumerate(bounds) if le <= bound)
        per[row.stage][k] += row.count
        sums[row.stage] += row.seconds
    out = []
    for stage in STAGES:
        running, cumulative = 0, []
        for bound, n in zip(bounds, per[stage], strict=True):
            running += n
            cumulative.append((bound, running))
        out.append(StageHistogram(stage, tuple(cumulative), running, sums[stage]))
    return out


def quantile(q: float, buckets: Sequence[tuple[float, int]]) -> float:
    """The q-quantile (0..1) of a cumulative histogram, interpolated linearly within its bucket as Prometheus's
    ``histogram_quantile`` does: exact only to the bucket's width. NaN when empty; in the ``+Inf`` bucket, the
    largest finite bound."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0
    for bound, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def minus(after: StageHistogram, before: StageHistogram | None) -> StageHistogram:
    """What was observed between two readings of the same stage (``before`` None: since the start)."""
    if before is None:
        return after
    counts = {bound: n for bound, n in before.buckets}
    buckets = tuple((bound, n - counts.get(bound, 0)) for bound, n in after.buckets)
    return StageHistogram(after.stage, buckets, after.count - before.count, after.sum - before.sum)


# -- parts of a port call that an adapter times itself ----------------------------------------------------------

_sink: ContextVar[Callable[[str, float], None] | None] = ContextVar("strokewatch_stage_sink", default=None)


def report(stage: str, seconds: float) -> None:
    """An adapter timed a part of the call it is serving (``DECODE`` inside ``retrieve_series``). A no-op unless a
    service is timing that call (``reporting``)."""
    sink = _sink.get()
    if sink is not None:
        sink(stage, seconds)


@contextmanager
def reporting(sink: Callable[[str, float], None]) -> Iterator[None]:
    """Within the block, ``report`` calls (in this thread or task) go to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
