"""deploy/k8s/ and deploy/compose.yaml, validated offline: Kubernetes objects against the API schemas
(kubernetes-validate, strict: unknown fields fail), then the references between the files (labels,
ports, names, metric names, serve flags, grace periods) that no schema sees. No cluster and no Docker
engine run here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from streamgen.cli import build_parser
from streamgen.server.metrics import Metrics
from tests.test_dockerfiles import _exec_form, _final_stage

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.37.0"  # the newest schema set kubernetes-validate ships


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects() -> dict[str, dict[str, Any]]:
    """Every object under deploy/k8s by kind (one of each)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def _serve_args(extra: list[str]) -> Any:
    """The image's ENTRYPOINT plus ``extra`` (a container's args), parsed by streamgen's own CLI."""
    entrypoint = next(_exec_form(a) for op, a in _final_stage("Dockerfile") if op == "ENTRYPOINT")
    assert entrypoint[:2] == ["streamgen", "serve"]
    return build_parser().parse_args(entrypoint[1:] + extra)


def test_kubernetes_objects_validate_against_the_api_schemas() -> None:
    objects = _objects()
    assert set(objects) == {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "ConfigMap"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError with the path
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


def test_the_validator_catches_a_broken_manifest() -> None:
    """The check above can fail: a misspelt field and a wrong type are both errors."""
    deployment = _objects()["Deployment"]
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_probes_grace_period_gpu_and_flags() -> None:
    objects = _objects()
    spec = objects["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    args = _serve_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": args.port}  # grpc.health.v1, service ""
    # Drain (running streams may go on for --drain-timeout-s) ends before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout_s + 5
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's streamgen user
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)


def test_service_ingress_and_hpa_point_at_the_deployment() -> None:
    objects = _objects()
    deployment, service = objects["Deployment"], objects["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"  # headless: clients and the ingress see every pod
    assert service["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    ingress = objects["Ingress"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert int(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]


def test_hpa_metric_is_a_streamgen_metric_renamed_by_the_adapter() -> None:
    objects = _objects()
    served = {m.name for m in Metrics().registry.collect()} | {
        m.name + "_total" for m in Metrics().registry.collect()}  # counters are exposed with _total
    rules = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])["rules"]
    exposed = {}
    for rule in rules:
        series = re.match(r"^([a-z_:]+)\{", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
        assert series in served, series
        exposed[re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)] = series
    hpa_metric = objects["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert exposed[hpa_metric] == "streamgen:num_sessions_running"


def test_compose_services_files_ports_and_grace_period() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"streamgen", "balancer", "prometheus"}
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert (DEPLOY / source).is_file(), f"{name} mounts missing {source}"
    replica = services["streamgen"]
    assert (DEPLOY / replica["build"]["context"] / replica["build"]["dockerfile"]).is_file()
    args = _serve_args(replica["command"])
    assert set(replica["expose"]) == {str(args.port), str(args.metrics_port)}
    assert int(replica["stop_grace_period"].rstrip("s")) > args.drain_timeout_s + 5
    assert replica["deploy"]["replicas"] >= 2
    assert replica["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # The balancer balances to that service's gRPC port, Prometheus scrapes its metrics port.
    nginx_conf = (DEPLOY / "compose" / "nginx.conf").read_text()
    assert re.search(rf"server streamgen:{args.port}\b", nginx_conf)
    for directive in ("least_conn;", "grpc_pass grpc://streamgen;", "grpc_read_timeout 1h;", "keepalive 32;"):
        assert directive in nginx_conf
    listen = re.search(r"listen (\d+) http2;", nginx_conf).group(1)  # type: ignore[union-attr]
    assert services["balancer"]["ports"] == [f"{listen}:{listen}"]
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0] == {"names": ["streamgen"], "type": "A", "port": args.metrics_port}


def test_compose_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    """The real nginx parses the compose balancer's config (Docker's service name swapped for 127.0.0.1)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).is_file():
        pytest.skip("nginx not installed: run 'make nginx-deps' (apt-get install nginx)")
    text = (DEPLOY / "compose" / "nginx.conf").read_text().replace("server streamgen:", "server 127.0.0.1:")
    text = text.replace("/dev/stdout", str(tmp_path / "access.log")).replace("/dev/stderr", str(tmp_path / "e.log"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    res = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log"),
                          "-g", f"pid {tmp_path / 'nginx.pid'};"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
