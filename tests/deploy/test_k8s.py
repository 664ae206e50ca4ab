"""deploy/k8s: the Deployment, Service and volume claim, checked structurally and against the Dockerfile."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.helpers import K8S_DIR, option_value, parse_dockerfile


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S_DIR / "medserve.yaml").read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def _container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_deployment_requests_a_gpu_and_runs_the_image_command(objects: dict[str, dict[str, Any]]) -> None:
    deployment = objects["Deployment"]
    assert deployment["apiVersion"] == "apps/v1"
    container = _container(objects)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    command = container["command"] + container["args"]
    assert command == parse_dockerfile().command()
    assert _port_number(container, "http") == int(option_value(command, "--port"))


def test_probes_use_the_health_endpoints(objects: dict[str, dict[str, Any]]) -> None:
    container = _container(objects)
    port = int(option_value(parse_dockerfile().command(), "--port"))
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _port_number(container, container[probe]["httpGet"]["port"]) == port


def test_models_volume_is_read_only_at_the_model_dir(objects: dict[str, dict[str, Any]]) -> None:
    container = _container(objects)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in container["env"]}
    model_dir = env["MEDSERVE_MODEL_DIR"]
    assert model_dir == parse_dockerfile().env()["MEDSERVE_MODEL_DIR"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == model_dir)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert (
        volume["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]
    )


def test_pod_runs_as_the_image_user_without_root(objects: dict[str, dict[str, Any]]) -> None:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    user = parse_dockerfile().final.last("USER")
    assert user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.args.split(":")[0]
    # Read-only root: the image keeps its caches in /tmp, which must be writable.
    container = _container(objects)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert parse_dockerfile().env()["XDG_CACHE_HOME"].startswith("/tmp/")


def test_service_selects_the_pods_and_targets_the_http_port(objects: dict[str, dict[str, Any]]) -> None:
    deployment = objects["Deployment"]
    service = objects["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    container = _container(objects)
    assert _port_number(container, port["targetPort"]) == int(
        option_value(parse_dockerfile().command(), "--port")
    )


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"]
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), resource
