"""The Kubernetes layout run here as processes: the commands and settings of the rendered manifests
(deploy/k8s/overlays/cpu), with loopback in place of the cluster's names, against PostgreSQL, Redis, the sandbox
PACS and EHR. The migration Job runs first; then the API, beat and the two worker groups, each on its own queues,
sharing one data directory as the pods share their ReadWriteMany volume. The demo cohort is scored once each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from integration.entrypoints.api.security.keys import new_key, settings_line
from integration.entrypoints.api.security.policy import Role
from sandbox.cohort import load_cohort
from sandbox.demo import DEMO_PATIENTS, DEMO_SEED
from tests.e2e.conftest import MRN_SYSTEM, Worker, risk_assessments, wait_for
from tests.integration.test_store_postgres import pg_url  # noqa: F401  (the throw-away PostgreSQL database)
from tests.unit.test_k8s_manifests import argv, config_data, container, engine_workloads, rendered

BROKER = "redis://127.0.0.1:6379/10"
#: The cluster's names, as the manifests use them, and what stands in for them here.
PROCESSES = ("api", "beat", "worker-ingest", "worker-assess")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_argv(manifest_argv: list[str], data_dir_in_pod: str, data_dir: Path, api_port: int) -> list[str]:
    """A container's command as a process here: the same program and arguments, this interpreter's copy of it,
    loopback and a free port for the API, the shared data directory where the pod mounts its volume."""
    programs = {"celery": ["-m", "celery"], "uvicorn": ["-m", "uvicorn"],
                "strokewatch": ["-m", "integration.entrypoints.cli"]}
    program, *args = manifest_argv
    local = [sys.executable, *programs[program]]
    for i, arg in enumerate(args):
        if args[i - 1:i] == ["--host"]:
            arg = "127.0.0.1"  # the pod listens on its own address; here only loopback
        elif args[i - 1:i] == ["--port"]:
            arg = str(api_port)
        elif arg.startswith(data_dir_in_pod):
            arg = str(data_dir) + arg.removeprefix(data_dir_in_pod)
        local.append(arg)
    return local


@pytest.mark.peers
@pytest.mark.slow
def test_the_manifests_layout_scores_the_demo_cohort_once_each(
    engine_env: dict[str, str], pg_url: str, fresh_orthanc_peer: Any, fresh_fhir_peer: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    docs = rendered("overlays/cpu")
    config = config_data(docs)
    engine = engine_workloads(docs)
    try:
        redis.Redis.from_url(BROKER).flushdb()
    except redis.ConnectionError as err:  # .ci/run starts Redis: this is a real failure
        pytest.fail(f"Redis at {BROKER} is not reachable: {err}")

    # The Secret, as the pods mount it: the database's URL is a file of the secrets directory.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "database_url").write_text(pg_url)
    key = new_key()
    name, _, value = settings_line("layout", Role.OPERATE, key).partition("=")
    data_dir = Path(engine_env["STROKEWATCH_DATA_DIR"])
    env = {
        **config,  # the ConfigMap, envFrom
        # the cluster's names -> loopback; the rest of the ConfigMap (inline stages, ready_public, ...) as it is
        "STROKEWATCH_BROKER_URL": BROKER,
        "STROKEWATCH_SECRETS_DIR": str(secrets_dir),
        **{k: v for k, v in engine_env.items() if k != "STROKEWATCH_DATA_DIR"},  # the sandbox peers
        "STROKEWATCH_DATA_DIR": str(data_dir),
        name: value,
    }
    api_port = _free_port()
    env["STROKEWATCH_API_HOST"] = "127.0.0.1"
    env["STROKEWATCH_API_PORT"] = str(api_port)

    def local(workload: str) -> list[str]:
        return _local_argv(argv(engine[workload]), config["STROKEWATCH_DATA_DIR"], data_dir, api_port)

    def process_env(workload: str) -> dict[str, str]:
        own = {e["name"]: e["value"] for e in container(engine[workload]).get("env", [])}
        return {**env, **own}

    # The migration Job, to completion, before anything else.
    migrate = Worker(process_env("strokewatch-migrate"), tmp_path / "migrate.log", local("strokewatch-migrate"))
    migrate.start()
    assert migrate.proc is not None and migrate.proc.wait(120) == 0, migrate.log()

    procs = {w: Worker(process_env(w), tmp_path / f"{w}.log", local(w)) for w in PROCESSES}
    try:
        for proc in procs.values():
            proc.start()
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: _status(f"{api}/health/live") == 200, 60, "the API live", procs["api"])

        loaded = load_cohort(DEMO_PATIENTS, DEMO_SEED, dicomweb_url=fresh_orthanc_peer.dicomweb_url,
                             fhir_base_url=fresh_fhir_peer.base_url, identifier_system=MRN_SYSTEM)
        studies = {p.study_uid for p in loaded}
        assert len(studies) == DEMO_PATIENTS
        wait_for(lambda: len(risk_assessments(fresh_fhir_peer.base_url)) >= len(studies), 300,
                 "one RiskAssessment per study of the demo cohort", procs["worker-assess"])
        time.sleep(12)  # more sweeps and detect polls: nothing is scored twice
        ras = risk_assessments(fresh_fhir_peer.base_url)
        scored = [ra["basis"][0]["identifier"]["value"].removeprefix("urn:oid:") for ra in ras]
        assert sorted(scored) == sorted(studies), "each study of the cohort scored exactly once"
        assert len({ra["subject"]["reference"] for ra in ras}) == len(studies)

        # Each group ran its own queues' tasks and none of the other's.
        logs = {w: procs[w].log_path.read_text(errors="replace") for w in PROCESSES}
        assert "Task strokewatch.ingest[" in logs["worker-ingest"]
        assert "Task strokewatch.assess[" in logs["worker-assess"]
        assert "Task strokewatch.assess[" not in logs["worker-ingest"]
        assert "Task strokewatch.ingest[" not in logs["worker-assess"]
        assert "beat lock acquired" in logs["beat"]

        # The liveness probes of beat and of both worker groups, run as the kubelet runs them (in the pod: its
        # hostname, its data volume), pass against the live processes.
        for workload in ("beat", "worker-ingest", "worker-assess"):
            probe = container(engine[workload])["livenessProbe"]["exec"]["command"]
            probe = [a.replace(config["STROKEWATCH_DATA_DIR"], str(data_dir)) for a in probe]
            ran = subprocess.run(probe, env={**os.environ, **env, "HOSTNAME": socket.gethostname(),
                                             "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                                 capture_output=True, text=True, timeout=90)
            assert ran.returncode == 0, (workload, ran.stdout[-2000:], ran.stderr[-2000:])

        # The API the Service fronts: ready (every peer answers) without a key, as the kubelet asks; the status
        # with one.
        assert _status(f"{api}/health/ready") == 200, httpx.get(f"{api}/health/ready", timeout=10).text
        status = httpx.get(f"{api}/status", headers={"X-API-Key": key}, timeout=10).raise_for_status().json()
        assert status["counts"]["assessments"] == {"published": len(studies)}
    finally:
        for proc in procs.values():
            proc.stop()
        redis.Redis.from_url(BROKER).flushdb()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return 0
