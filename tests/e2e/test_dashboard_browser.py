"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) on a real engine: a Celery
worker (+ beat) scoring synthetic patients from the real Orthanc and FHIR sandbox, and the API served by uvicorn as
its own process, both configured only by STROKEWATCH_* variables (the sandbox on loopback: the pages are open).

Each page at 1280x800 and at a phone's 390x844: its plots drawn with data (uPlot's canvases hold coloured pixels;
each plot counts the points it was given), no console error or uncaught exception, no request to anything but the
engine (every request is recorded), no horizontal overflow, and a screenshot written to ``reports/dashboard/``
(``STROKEWATCH_SCREENSHOTS_DIR`` overrides it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.domain import latency
from sandbox import free_port
from sandbox.cohort import load_cohort
from tests.e2e.conftest import MRN_SYSTEM, Worker, risk_assessments, wait_for

CHROMIUM = "/usr/bin/chromium"
N_PATIENTS = 2
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("STROKEWATCH_SCREENSHOTS_DIR", REPO / "reports" / "dashboard"))
VIEWPORTS = ((1280, 800), (390, 844))  # a desktop, a phone

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture()
def fast_snapshots(engine_env: dict[str, str]) -> dict[str, str]:
    """A copy of the stage histogram at most every 5 s (each sweep), so a short run has intervals to plot."""
    engine_env["STROKEWATCH_DASHBOARD__LATENCY_SNAPSHOT_S"] = "5"
    return engine_env


@pytest.fixture()
def api(fast_snapshots: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`uvicorn --factory integration.entrypoints.api.app:create_app` with the engine's environment."""
    port = free_port()
    env = {**os.environ, **fast_snapshots, "STROKEWATCH_API_PORT": str(port)}
    with open(tmp_path / "api.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "integration.entrypoints.api.app:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def worked_interval(store: Any) -> bool:
    """A copy of the stage histogram before and one after the scoring: an interval with model passes."""
    model = next(s for s in latency.series(store.stage_snapshots(1000)) if s.stage == "model")
    return any(model.counts)


class Browser:
    """One chromium page at a viewport, recording every request, console error and uncaught exception."""

    def __init__(self, browser: Any, viewport: tuple[int, int]) -> None:
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self, url: str, plots: int) -> None:
        response = self.page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, url
        self.page.wait_for_selector(f"body[data-plots-ready='{plots}']", timeout=15_000)

    def drawn_points(self, selector: str) -> int:
        return int(self.page.get_attribute(selector, "data-drawn") or 0)

    def coloured_pixels(self, selector: str) -> int:
        """Pixels of the plot's canvas that are neither blank nor grey: the series uPlot drew."""
        return int(self.page.evaluate(
            """(sel) => {
                const c = document.querySelector(sel + ' canvas');
                if (!c) return 0;
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) {
                    const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
                    if (a > 0 && (Math.max(r, g, b) - Math.min(r, g, b)) > 40) n++;
                }
                return n;
            }""", selector))

    def overflow(self) -> int:
        return int(self.page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def test_overview_and_patient_pages_in_a_real_browser(
    fast_snapshots: dict[str, str], store: Any, start_worker: Callable[..., Worker], api: str,
    fresh_fhir_peer: Any, fresh_orthanc_peer: Any,
) -> None:
    from playwright.sync_api import sync_playwright

    worker = start_worker()
    wait_for(lambda: len(store.stage_snapshots(10)) >= 1, 60, "the sweep's first copy of the stage histogram", worker)
    load_cohort(N_PATIENTS, seed=41, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM,
                window_end=datetime.now(UTC).replace(microsecond=0))
    wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= N_PATIENTS, 240,
             "one RiskAssessment per patient", worker)
    wait_for(lambda: worked_interval(store), 60, "a copy of the stage histogram after the scoring", worker)

    shots: list[Path] = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            for viewport in VIEWPORTS:
                b = Browser(chromium, viewport)
                b.open(f"{api}/dashboard", plots=2)
                for plot in ("#plot-p50", "#plot-p95"):
                    assert b.drawn_points(plot) >= 1, plot
                    assert b.coloured_pixels(plot) > 50, f"{plot} has no series drawn"
                rows = b.page.locator("#patients a")
                assert rows.count() == N_PATIENTS
                assert b.overflow() <= 0, f"overview overflows by {b.overflow()} px at {viewport}"
                shots.append(b.screenshot(f"overview-{viewport[0]}x{viewport[1]}"))

                rows.first.click()
                b.page.wait_for_url(f"{api}/dashboard/patients/**")
                b.page.wait_for_selector("body[data-plots-ready]", timeout=15_000)
                assert b.drawn_points("#plot-risk") >= 1
                assert b.coloured_pixels("#plot-risk") > 20, "the risk plot has no point drawn"
                vitals = b.page.locator("#vitals .plot")
                assert vitals.count() >= 3, "a plot per vital sign the model saw"
                first_vital = "#" + str(vitals.first.get_attribute("id"))
                assert b.drawn_points(first_vital) >= 2 and b.coloured_pixels(first_vital) > 50
                b.page.wait_for_function("document.getElementById('key-slice').complete", timeout=30_000)
                assert b.page.evaluate("document.getElementById('key-slice').naturalWidth") == 256
                assert b.page.locator("#drivers li").count() >= 1
                assert b.overflow() <= 0, f"patient page overflows by {b.overflow()} px at {viewport}"
                shots.append(b.screenshot(f"patient-{viewport[0]}x{viewport[1]}"))

                b.open(f"{api}/dashboard/failures", plots=0)
                assert b.overflow() <= 0, f"failures page overflows by {b.overflow()} px at {viewport}"
                shots.append(b.screenshot(f"failures-{viewport[0]}x{viewport[1]}"))

                assert b.errors == [], b.errors
                foreign = [u for u in b.requests if not u.startswith(f"{api}/")]
                assert foreign == [], f"requests beyond the engine: {foreign}"
                assert any(u.endswith("/dashboard/static/uPlot.iife.min.js") for u in b.requests)
                b.context.close()
        finally:
            chromium.close()
    for shot in shots:
        assert shot.stat().st_size > 10_000, shot
