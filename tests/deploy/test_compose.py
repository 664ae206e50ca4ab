"""docker-compose.yml (+ the CPU override), checked structurally: no Docker engine is needed."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest

from app.settings import Settings, env_name
from tests.deploy.helpers import (
    COMPOSE,
    COMPOSE_CPU,
    NGINX_CONF,
    ROOT,
    interpolate,
    load_compose,
    merge_compose,
    option_value,
    parse_dockerfile,
)

# Services that run another project's image (no MedServe image, no GPU).
THIRD_PARTY_SERVICES = ("nginx", "orthanc")
ORTHANC_DIR = ROOT / "deploy" / "orthanc"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(load_compose(COMPOSE), env={})


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _has_gpu(service: dict[str, Any]) -> bool:
    return any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in _gpu_devices(service)
    )


def _mount(service: dict[str, Any], target: str) -> dict[str, Any]:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume["target"] == target:
            return volume
        if isinstance(volume, str) and volume.split(":")[1] == target:
            source, _, mode = volume.split(":") + [""] * (3 - len(volume.split(":")))
            return {"source": source, "target": target, "read_only": mode == "ro"}
    raise AssertionError(f"no volume mounted at {target}")


def test_service_reserves_the_gpu_and_mounts_checkpoints_read_only(compose: dict[str, Any]) -> None:
    service = compose["services"]["medserve"]
    assert "profiles" not in service  # `docker compose up` starts it
    assert _has_gpu(service)
    model_dir = parse_dockerfile().env()["MEDSERVE_MODEL_DIR"]
    assert service["environment"]["MEDSERVE_MODEL_DIR"] == model_dir
    mount = _mount(service, model_dir)
    assert mount["read_only"] is True
    assert mount["source"] == "./checkpoints"
    assert service["restart"] in ("unless-stopped", "always", "on-failure")


def test_port_and_healthcheck_match_the_image(compose: dict[str, Any]) -> None:
    df = parse_dockerfile()
    port = option_value(df.command(), "--port")
    service = compose["services"]["medserve"]
    assert [p.split(":")[-1] for p in service["ports"]] == [port]
    assert service["ports"][0].startswith("8000:")
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    # The same check as the image's HEALTHCHECK (one command to keep right, on /health/ready).
    assert test[1:] == df.healthcheck()
    assert "/health/ready" in test[-1]


def test_settings_file_is_optional(compose: dict[str, Any]) -> None:
    env_files = compose["services"]["medserve"]["env_file"]
    assert env_files == [{"path": "./medserve.env", "required": False}]
    example = (ROOT / "deploy" / "medserve.env.example").read_text()
    # Every setting the service reads is listed, so operators find them all in one place.
    missing = [env_name(field) for field in Settings.model_fields if f"{env_name(field)}=" not in example]
    assert missing == []


def test_train_profile_runs_medserve_train_in_the_same_image(compose: dict[str, Any]) -> None:
    train = compose["services"]["train"]
    serve = compose["services"]["medserve"]
    assert train["profiles"] == ["train"]
    assert train["image"] == serve["image"] and train["build"] == serve["build"]
    command = train["entrypoint"] + train["command"]
    assert command[:3] == ["medserve", "train", "segment"]
    assert _mount(train, option_value(command, "--data"))["read_only"] is True
    out_dir = option_value(command, "--out").rsplit("/", 1)[0]
    assert not _mount(train, out_dir).get("read_only", False)
    assert _mount(train, out_dir)["source"] == _mount(serve, "/models")["source"]
    assert _has_gpu(train)
    assert train["healthcheck"] == {"disable": True}


def test_scale_profile_runs_replicas_behind_nginx(compose: dict[str, Any]) -> None:
    replica = compose["services"]["medserve-replica"]
    nginx = compose["services"]["nginx"]
    assert replica["profiles"] == nginx["profiles"] == ["scale"]
    assert int(replica["deploy"]["replicas"]) == 2
    assert (
        int(
            interpolate(load_compose(COMPOSE), {"MEDSERVE_REPLICAS": "4"})["services"]["medserve-replica"][
                "deploy"
            ]["replicas"]
        )
        == 4
    )
    assert _has_gpu(replica)
    assert "ports" not in replica  # reached through nginx only
    assert nginx["depends_on"]["medserve-replica"]["condition"] == "service_healthy"
    image, tag = nginx["image"].split(":")
    assert image == "nginx" and tag != "latest"
    conf = _mount(nginx, "/etc/nginx/conf.d/default.conf")
    assert (ROOT / conf["source"]).resolve() == NGINX_CONF
    text = NGINX_CONF.read_text()
    port = option_value(parse_dockerfile().command(), "--port")
    assert re.search(rf"^\s*server medserve-replica:{port}\b", text, flags=re.M)
    listen = re.search(r"^\s*listen\s+(\d+);", text, flags=re.M)
    assert listen and nginx["ports"][0].split(":")[-1] == listen[1]


def test_cpu_override_drops_every_gpu_reservation() -> None:
    base = load_compose(COMPOSE)
    override = load_compose(COMPOSE_CPU)
    assert set(override["services"]) <= set(base["services"])
    merged = interpolate(merge_compose(base, override), env={})
    for name, service in merged["services"].items():
        if name in THIRD_PARTY_SERVICES:
            continue
        assert not _has_gpu(service), name
        assert service["image"] == "medserve:cpu"
        assert service["build"]["args"]["VARIANT"] == "cpu"
        assert service["build"]["context"] == "."
    assert int(merged["services"]["medserve-replica"]["deploy"]["replicas"]) == 2
    assert _mount(merged["services"]["medserve"], "/models")["read_only"] is True
    assert "cpu" in {s.name.split("-")[-1] for s in parse_dockerfile().stages if s.name}


def test_pacs_profile_runs_orthanc_wired_to_medserve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    orthanc, medserve = services["orthanc"], services["medserve"]
    assert orthanc["profiles"] == ["pacs"] and "profiles" not in medserve  # `--profile pacs up` runs both
    image, tag = orthanc["image"].split(":")
    assert image == "orthancteam/orthanc" and re.fullmatch(r"\d+\.\d+\.\d+", tag)  # pinned
    assert not _has_gpu(orthanc)
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"

    # deploy/orthanc/ is Orthanc's configuration folder; its Lua script is where orthanc.json says
    mount = _mount(orthanc, "/etc/orthanc")
    assert mount["read_only"] is True and (ROOT / mount["source"]).resolve() == ORTHANC_DIR
    config = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    for script in config["LuaScripts"]:
        relative = PurePosixPath(script).relative_to(mount["target"])
        assert (ORTHANC_DIR / relative).is_file(), script
    assert _mount(orthanc, "/var/lib/orthanc/db")["type"] == "volume"
    assert "orthanc-db" in compose["volumes"]
    published = {p.split(":")[-1] for p in orthanc["ports"]}
    assert published == {str(config["HttpPort"]), str(config["DicomPort"])}

    # MedServe stores its results in Orthanc's DICOMweb root, by service name and container port
    pacs = urlsplit(medserve["environment"]["MEDSERVE_PACS_URL"])
    assert (pacs.scheme, pacs.hostname, pacs.port) == ("http", "orthanc", config["HttpPort"])
    assert pacs.path.rstrip("/") == config["DicomWeb"]["Root"].rstrip("/") == "/dicom-web"
    assert medserve["environment"]["MEDSERVE_MODEL_DIR"] == parse_dockerfile().env()["MEDSERVE_MODEL_DIR"]

    # Orthanc forwards to MedServe's STOW-RS root, by service name and the image's port, with the API key
    server = config["DicomWeb"]["Servers"]["medserve"]
    target = urlsplit(server["Url"])
    port = option_value(parse_dockerfile().command(), "--port")
    assert (target.scheme, target.hostname, str(target.port)) == ("http", "medserve", port)
    assert target.path == "/dicomweb/"  # POST /dicomweb/studies: MedServe's STOW-RS
    assert server["HttpHeaders"]["X-API-Key"] == "${MEDSERVE_API_KEY}"
    assert "MEDSERVE_API_KEY" in orthanc["environment"]
    with_key = interpolate(load_compose(COMPOSE), {"MEDSERVE_ORTHANC_API_KEY": "k-1"})["services"]["orthanc"]
    assert with_key["environment"]["MEDSERVE_API_KEY"] == "k-1"
    assert orthanc["depends_on"]["medserve"]["condition"] == "service_healthy"  # no forwards lost at start
