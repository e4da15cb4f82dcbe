"""The Celery app is configured lazily from the settings, once, in any process that sends a task (API, SCP, CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SEND = """
import logging
logging.basicConfig(level=logging.WARNING)
from integration.entrypoints.worker import app, enqueue
enqueue("ingest", ["1.2.826.0.1.3680043.8.498.1"])
conf = app.conf
queue = conf.task_routes["strokewatch.ingest"]["queue"]
print("broker", conf.broker_url, "acks_late", conf.task_acks_late, "queue", queue)
"""


def test_a_process_that_only_sends_configures_the_app_without_errors(tmp_path: Path) -> None:
    env = {**os.environ, "STROKEWATCH_SANDBOX": "true", "STROKEWATCH_DATA_DIR": str(tmp_path)}
    env.pop("STROKEWATCH_BROKER_URL", None)
    done = subprocess.run([sys.executable, "-c", SEND], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert "RecursionError" not in done.stderr and "Signal handler" not in done.stderr, done.stderr[-2000:]
    assert f"broker sqla+sqlite:///{tmp_path}/broker.db acks_late True queue ingest" in done.stdout
    assert (tmp_path / "broker.db").exists()  # the message is in the embedded broker


DOWN = """
import logging
logging.basicConfig(level=logging.WARNING)
from integration.entrypoints.worker import enqueue
enqueue("vitals", ["pat-1", "pat-2"])
print("returned")
"""


def test_a_broker_that_is_down_does_not_fail_the_work_that_queues(tmp_path: Path) -> None:
    """The broker restarts while an ingest finishes: queueing its vitals sync must not raise into the service (which
    would record the finished ingest as failed); the sweep sends the leased sync again."""
    from sandbox import free_port

    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    env = {**os.environ, "STROKEWATCH_SANDBOX": "true", "STROKEWATCH_DATA_DIR": str(tmp_path),
           "STROKEWATCH_BROKER_URL": url}
    done = subprocess.run([sys.executable, "-c", DOWN], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "returned" in done.stdout
    assert "could not queue 2 vitals task(s)" in done.stderr and "the sweep sends them again" in done.stderr
    assert "s3cret" not in done.stderr
