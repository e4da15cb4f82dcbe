"""Prometheus metrics read from the database at scrape time, so every process (and host) reports the same: gauges
of the counts, and the stage-duration histogram that every worker adds to (``domain.stages``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from integration.domain import stages

router = APIRouter(tags=["metrics"])

_FAMILIES = {
    "studies": ("strokewatch_studies", "Studies by status", "status"),
    "patients": ("strokewatch_patients", "Patients by status", "status"),
    "assessments": ("strokewatch_assessments", "Assessments by status", "status"),
    "open_failures": ("strokewatch_open_failures", "Unresolved failures by outcome", "outcome"),
    "open_failure_occurrences": (
        "strokewatch_open_failure_occurrences",
        "How often the unresolved failures were seen, by outcome",
        "outcome",
    ),
}


class StoreCollector(Collector):
    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        for key, (name, doc, label) in _FAMILIES.items():
            family = GaugeMetricFamily(name, doc, labels=[label])
            for value, n in sorted(counts.get(key, {}).items()):
                family.add_metric([value], n)
            yield family
        stage_seconds = HistogramMetricFamily(
            "strokewatch_stage_seconds",
            "Seconds per stage of the pipeline, all workers together (README: Metrics)",
            labels=["stage"],
        )
        for h in self.store.stage_histograms():
            buckets = [(stages.label(bound), float(n)) for bound, n in h.buckets]
            stage_seconds.add_metric([h.stage], buckets, sum_value=h.sum)
        yield stage_seconds


def registry_for(store: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry


@router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
