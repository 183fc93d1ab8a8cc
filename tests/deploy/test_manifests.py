"""Static checks of the deployment assets: they parse, and they agree with each other.

No Docker engine or cluster exists in CI, so these tests read the files: every YAML parses, the
compose stack has its services and mounts files that exist, every dashboard panel has a query,
the k8s objects reference each other by the right names, and the generated PrometheusRule is
current.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .promql import ROOT, all_exprs, metric_names_in_expr

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "rules" / "streamer.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamer.json"
GENERATOR = ROOT / "scripts" / "gen_prometheusrule.py"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


class Reset:
    """Compose's `!reset` merge tag: in an override file, deletes the inherited value."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus the two merge tags of Compose files (`!reset`, `!override`)."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node))
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node))
    return Reset(loader.construct_scalar(node))  # type: ignore[arg-type]


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)


def load_all(path: Path) -> list[Any]:
    loader = ComposeLoader if path.parent == COMPOSE else yaml.SafeLoader
    return list(yaml.load_all(path.read_text(encoding="utf-8"), Loader=loader))


def load(path: Path) -> Any:
    (doc,) = load_all(path)
    return doc


# ---- every YAML -------------------------------------------------------------------------------


def test_yaml_files_found() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {
        "compose/docker-compose.yml", "prometheus/prometheus.yml", "k8s/kustomization.yaml"
    } <= names


@pytest.mark.parametrize(
    "path", YAML_FILES, ids=[p.relative_to(DEPLOY).as_posix() for p in YAML_FILES]
)
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) and d for d in docs), f"{path} has an empty document"


def test_compose_tags_only_in_compose_overrides() -> None:
    """Plain YAML readers (kubectl, promtool, Grafana) reject `!reset`: only Compose files."""
    for path in YAML_FILES:
        if path.parent != COMPOSE:
            with path.open(encoding="utf-8") as fh:
                list(yaml.safe_load_all(fh))


# ---- compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE / "docker-compose.yml")


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {
        "kafka", "topics", "simulator", "trainer-init", "streamer", "trainer", "prometheus",
        "grafana",
    }
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["topics"]["image"] == services["kafka"]["image"]
    assert "registry" in compose["volumes"]


def test_compose_kafka_is_single_node_kraft(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "kafka-topics.sh" in " ".join(kafka["healthcheck"]["test"])


def test_compose_topics_created(compose: dict[str, Any]) -> None:
    script = " ".join(compose["services"]["topics"]["command"])
    for topic, partitions in [("events", 8), ("predictions", 8), ("events.dlq", 1)]:
        assert re.search(rf"create {re.escape(topic)} {partitions}\b", script), topic


def test_compose_dependencies_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):  # short form: just names, condition service_started
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if dep in {"topics", "trainer-init"}:
                assert spec["condition"] == "service_completed_successfully"
            if dep == "kafka":
                assert spec["condition"] == "service_healthy"


def test_compose_app_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    streamer = services["streamer"]
    assert streamer["build"]["context"] == "../.."
    assert (COMPOSE / streamer["build"]["context"] / streamer["build"]["dockerfile"]).is_file()
    assert streamer["environment"]["STREAMER_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert streamer["environment"]["STREAMER_MODEL"] == "/registry"
    assert "9108:9108" in streamer["ports"]
    devices = streamer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]

    assert services["simulator"]["build"]["args"]["VARIANT"] == "cpu"
    assert services["simulator"]["command"] == [
        "simulate", "--kind", "tick", "--rate", "2000", "--bootstrap-servers", "kafka:9092",
    ]
    assert services["trainer-init"]["entrypoint"] == ["trainer"]
    assert services["trainer-init"]["command"] == [
        "init", "--kind", "tick", "--registry", "/registry",
    ]
    trainer = services["trainer"]
    assert trainer["entrypoint"] == ["trainer"]
    assert trainer["command"] == [
        "schedule", "--every", "6h", "--registry", "/registry", "--bootstrap-servers",
        "kafka:9092",
    ]
    assert "9109:9109" in trainer["ports"]
    for name in ("trainer-init", "trainer", "streamer"):
        assert any(v.startswith("registry:/registry") for v in services[name]["volumes"]), name


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    mounts = [
        v.split(":")[0]
        for s in compose["services"].values()
        for v in s.get("volumes", [])
        if v.startswith(".")
    ]
    assert len(mounts) >= 5
    for source in mounts:
        assert (COMPOSE / source).exists(), source


def test_compose_cpu_override_drops_gpu(compose: dict[str, Any]) -> None:
    override = load(COMPOSE / "docker-compose.cpu.yml")["services"]["streamer"]
    assert isinstance(override["deploy"]["resources"]["reservations"]["devices"], Reset)
    assert override["build"]["args"]["VARIANT"] == "cpu"


# ---- Prometheus config ------------------------------------------------------------------------


def test_prometheus_scrapes_streamer_and_trainer() -> None:
    config = load(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert {"streamer:9108", "trainer:9109"} <= targets
    assert config["rule_files"] == ["rules/*.yml"]


# ---- Grafana ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_dashboard_panels_have_queries(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "prometheus"
        assert panel["datasource"]["uid"] == "prometheus"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_dashboard_covers_the_metrics(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = set().union(*(metric_names_in_expr(e) for e in exprs))
    assert names >= {
        "streamer_events_in_total", "streamer_predictions_out_total",
        "streamer_end_to_end_latency_seconds", "streamer_processing_latency_seconds",
        "streamer_model_step_seconds", "streamer_consumer_lag_messages", "streamer_keys_resident",
        "streamer_dead_letter_total", "streamer_model_info", "streamer_model_swaps_total",
        "streamer_model_swap_seconds", "trainer_runs_total",
        "trainer_last_success_timestamp_seconds", "trainer_validation_mae",
    }
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile},")
            and "streamer_end_to_end_latency_seconds_bucket" in e
            for e in exprs
        ), quantile


def test_only_contract_metrics_are_queried() -> None:
    """Guards against typos until the live /metrics comparison exists."""
    names = set().union(*(metric_names_in_expr(e) for e in all_exprs()))
    assert names and all(n.startswith(("streamer_", "trainer_")) for n in names), names


def test_grafana_provisioning_matches_dashboard() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load(prov / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load(prov / "dashboards" / "dashboards.yml")["providers"]
    compose = load(COMPOSE / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards/:{provider['options']['path']}/:ro" in mounts


# ---- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Manifests by kind (one object of each kind in this directory)."""
    objects = [load(K8S / name) for name in load(K8S / "kustomization.yaml")["resources"]]
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects)
    return by_kind


def test_kustomization_lists_every_manifest() -> None:
    resources = load(K8S / "kustomization.yaml")["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk
    assert on_disk >= {
        "streamer-deployment.yaml", "service.yaml", "podmonitor.yaml", "configmap.yaml",
        "registry-pvc.yaml", "trainer-cronjob.yaml", "prometheusrule.yaml",
    }


def test_k8s_streamer_deployment(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9108"
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] == 60
    assert spec["securityContext"]["runAsUser"] == 10001
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"][0]["configMapRef"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9108}
    assert container["livenessProbe"]["httpGet"]["port"] in ("metrics", 9108)
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/registry" and mount["readOnly"] is True
    (volume,) = spec["volumes"]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim == k8s["PersistentVolumeClaim"]["metadata"]["name"]
    # The pod labels are what the Service and the PodMonitor select on.
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    assert k8s["Service"]["spec"]["selector"].items() <= labels.items()
    assert k8s["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_monitoring_and_storage(k8s: dict[str, dict[str, Any]]) -> None:
    assert k8s["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    (port,) = k8s["Service"]["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == 9108
    assert k8s["PodMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"
    assert k8s["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert k8s["PrometheusRule"]["apiVersion"] == "monitoring.coreos.com/v1"


def test_k8s_trainer_cronjob(k8s: dict[str, dict[str, Any]]) -> None:
    cron = k8s["CronJob"]["spec"]
    assert cron["schedule"] == "0 */6 * * *"
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["trainer"]
    # One run per slot that pushes its metrics: the pod is gone before any scrape.
    assert container["args"][:5] == ["schedule", "--every", "6h", "--max-runs", "1"]
    assert container["args"][5:7] == ["--registry", "/registry"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TRAINER_PUSHGATEWAY"]["value"].startswith("http://")
    assert "ports" not in container
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == k8s["PersistentVolumeClaim"]["metadata"]["name"]


# ---- generated PrometheusRule -----------------------------------------------------------------


def test_prometheusrule_has_the_same_groups() -> None:
    rule = load(K8S / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load(RULES)["groups"]


def test_prometheusrule_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_prometheusrule_check_notices_a_stale_file(tmp_path: Path) -> None:
    changed = tmp_path / "rules.yml"
    changed.write_text(RULES.read_text(encoding="utf-8").replace("> 0.25", "> 0.3"))
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--rules", str(changed)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "stale" in result.stderr


# ---- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_essentials() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    assert "ARG VARIANT=cuda" in lines
    assert "FROM base-${VARIANT} AS base" in lines
    cuda_base = "FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"
    assert any(line.startswith(cuda_base) for line in lines)
    assert "https://download.pytorch.org/whl/cu124" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert "http://127.0.0.1:9108/healthz" in text
    assert 'ENTRYPOINT ["streamer"]' in lines
    assert 'CMD ["run"]' in lines
    assert "EXPOSE 9108" in lines


def test_dockerfile_installs_dependencies_before_copying_code() -> None:
    lines = (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    assert first("COPY pyproject.toml") < first("RUN python -c \"import tomllib") < first(
        "COPY streamer/"
    ) < first("RUN pip install --no-deps .")


def test_dockerignore_keeps_context_small() -> None:
    entries = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".venv", ".git", "models", "demo-data", ".pytest_cache"} <= entries
    assert not {"streamer", "trainer", "pyproject.toml"} & entries


def test_k8s_timeouts_fit_the_probes_and_grace_period(k8s: dict[str, dict[str, Any]]) -> None:
    """The drain finishes before the kubelet's SIGKILL; liveness never fires during a bounded
    wait; every configured value is a valid setting."""
    from streamer.settings import StreamerSettings

    env = k8s["ConfigMap"]["data"]
    settings = StreamerSettings(**{k.removeprefix("STREAMER_").lower(): v for k, v in env.items()})
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    watcher_join_s, poll_s = 10, 1  # ModelWatcher.stop() joins for 10 s at most
    assert spec["terminationGracePeriodSeconds"] > (
        settings.drain_timeout_s + watcher_join_s + poll_s
    )
    (container,) = spec["containers"]
    heartbeat_timeout_s = 30  # MetricsServer's default
    longest_unbeaten_wait = max(settings.commit_timeout_s, settings.retry_backoff_max_s)
    assert longest_unbeaten_wait < heartbeat_timeout_s
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= heartbeat_timeout_s
