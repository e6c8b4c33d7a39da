"""The deployment files of deploy/ (Docker, docker-compose, Prometheus, Grafana, Helm), checked without Docker or
a cluster.

Always: every metric the Grafana dashboard, the HPA and the prometheus-adapter rule name is one the server
exports (from pagellm/metrics.py's registry, rendered as /metrics renders it), with the labels the queries
group by; the compose stack's files, mounts and scrape target fit together. With the `deploy` extra installed
(`pip install -e '.[deploy]'`): hadolint on the Dockerfiles, the compose files against the compose
specification, and the Helm chart rendered by Helm's own engine (helm-python-sdk), linted, and each manifest
validated against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pagellm.json"
CHART = DEPLOY / "helm" / "pagellm"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the chart is meant for (autoscaling/v2, sizeLimit)
METRIC = re.compile(r"pagellm:[A-Za-z0-9_:]+")
# Labels Prometheus adds to every scraped series, and histogram buckets' own.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint", "le"}


def exported_series() -> dict[str, set[str]]:
    """Every series name the server's /metrics exports -> its label names: each metric of pagellm/metrics.py
    touched once (labelled ones show only once used), rendered and parsed as Prometheus reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    from pagellm.engine.core_messages import CoreStats
    from pagellm.metrics import Metrics

    m = Metrics("model")
    m.add_keys({"key-0": ("requests_per_minute",)})
    m.record_routed(0)
    m.record_key_request("key-0")
    m.record_key_rate_limited("key-0", "requests_per_minute")
    m.record_key_generation_tokens("key-0", 1)
    m.record_core_stats(CoreStats(num_running=1, num_waiting=1, prefix_cache_queries=2, prefix_cache_hits=1,
                                  num_preemptions=1, queue_times=[0.1], spec_num_drafts=1, spec_num_draft_tokens=2,
                                  spec_num_accepted_tokens=1, spec_num_accepted_per_pos=[1]))
    m.record_first_token(0.1, 5, key_name="key-0")
    m.record_generation_tokens(3)
    m.record_finished(1.0, 0.1, 3, ["stop"])
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def test_dashboard_queries_use_exported_metrics():
    series = exported_series()
    exprs = dashboard_queries()
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        names = METRIC.findall(expr)
        assert names, f"a dashboard query names no pagellm metric: {expr}"
        unknown = [n for n in names if n not in series]
        assert not unknown, f"{unknown} not exported by the server (query: {expr})"
        labels = set().union(*(series[n] for n in names)) | TARGET_LABELS
        grouped = {g.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for g in group.split(",")}
        matched = set(re.findall(r"([a-z_]+)=~?\"", expr))
        assert grouped | matched <= labels, f"{(grouped | matched) - labels} are no labels of {names}"
        used.update(names)
    # Every family the server exports has a panel (a new metric should get one).
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in series}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families - shown <= {"pagellm:spec_decode_num_accepted_tokens_per_pos", "pagellm:kv_cache_num_blocks",
                                "pagellm:api_key_prompt_tokens", "pagellm:api_key_generation_tokens"}, \
        families - shown


def test_autoscaling_metric_is_exported():
    """The HPA's custom metric is pagellm:num_requests_waiting as prometheus-adapter's rule renames it."""
    series = exported_series()
    adapter = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())
    rule = adapter["rules"]["custom"][0]
    source = METRIC.findall(rule["seriesQuery"])
    assert source == ["pagellm:num_requests_waiting"] and source[0] in series
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), source[0])
    hpa = (CHART / "templates" / "hpa.yaml").read_text()
    assert f"name: {renamed}" in hpa and renamed == "pagellm_num_requests_waiting"


def test_compose_stack_fits_together():
    compose_dir = DEPLOY / "compose"
    compose = yaml.safe_load((compose_dir / "docker-compose.yml").read_text())
    services = compose["services"]
    build = services["pagellm"]["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).resolve().is_file()
    gpu = yaml.safe_load((compose_dir / "docker-compose.gpu.yml").read_text())["services"]["pagellm"]["build"]
    assert (compose_dir / gpu["context"] / gpu["dockerfile"]).resolve().is_file()
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (compose_dir / source).resolve().exists(), volume
                mounts[target] = (compose_dir / source).resolve()
    prometheus = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["pagellm:8000"] and "8000:8000" in services["pagellm"]["ports"]
    provisioning = mounts["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "pagellm.yml").read_text())["providers"][0]
    assert (mounts[provider["options"]["path"]] / "pagellm.json").samefile(DASHBOARD)
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[deploy]')")
    return path


def test_dockerfiles_pass_hadolint():
    hadolint = _tool("hadolint")
    files = sorted(str(p) for p in (DEPLOY / "docker").glob("Dockerfile.*"))
    assert len(files) == 2
    done = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_files_follow_the_compose_spec():
    pytest.importorskip("check_jsonschema", reason="pip install -e '.[deploy]'")
    files = [str(DEPLOY / "compose" / f) for f in ("docker-compose.yml", "docker-compose.gpu.yml")]
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


ALL_ON = {"model": "/models/llama", "servedModelName": "llama", "extraArgs": ["--dtype", "bfloat16"],
          "apiKey": {"existingSecret": "pagellm-key"}, "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
          "autoscaling": {"enabled": True}, "podAnnotations": {"a": "b"}, "nodeSelector": {"gpu": "h200"},
          "extraEnv": [{"name": "X", "value": "1"}]}


CPU = {"gpus": 0, "image": {"tag": "cpu"}, "modelCache": {"enabled": False}, "tolerations": []}


@pytest.mark.parametrize("values", [{}, ALL_ON, CPU],
                         ids=["defaults", "all-on", "cpu-no-cache"])
def test_helm_chart_renders_valid_manifests(values):
    helm = pytest.importorskip("helm_python", reason="pip install -e '.[deploy]'")
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[deploy]'")
    lint = helm.lint(str(CHART), values, strict=True)
    assert not lint["errors"] and all(m["severity"] <= 1 for m in lint["messages"]), lint
    rendered = helm.Chart.load(str(CHART)).render(values, name="demo", namespace="llm", is_install=True)
    docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    kinds = {d["kind"]: d for d in docs}
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below against the Service it selects
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    on = values is ALL_ON
    assert ("ServiceMonitor" in kinds) == on and ("HorizontalPodAutoscaler" in kinds) == on
    assert ("replicas" in deployment["spec"]) != on  # the HPA owns the replicas
    assert ("PersistentVolumeClaim" in kinds) == values.get("modelCache", {}).get("enabled", True)
    if on:
        assert container["args"] == ["/models/llama", "--served-model-name", "llama", "--dtype", "bfloat16"]
        monitor = kinds["ServiceMonitor"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics" and monitor["metadata"]["labels"]["release"]
        hpa = kinds["HorizontalPodAutoscaler"]
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    else:
        assert "args" not in container or not container["args"]  # the embedded model
    if values is CPU:
        assert "limits" not in container["resources"] and "tolerations" not in pod["spec"]
        assert {"name": "model-cache", "emptyDir": {}} in pod["spec"]["volumes"]
    else:
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
