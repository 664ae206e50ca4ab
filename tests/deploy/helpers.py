"""Reading the deployment files the way Docker, Compose and nginx do, and running service processes for tests.

Nothing here needs a Docker engine: the Dockerfile is parsed for its final stage's command, environment and
health check, so that tests can run that exact command line outside a container.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
NGINX_CONF = ROOT / "deploy" / "nginx" / "medserve.conf"
K8S_DIR = ROOT / "deploy" / "k8s"


# ---- Dockerfile -------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # the rest of the logical line, continuations joined
    flags: dict[str, str] = field(default_factory=dict)  # --from=..., --chown=...

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None (shell form)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*", "", text)
            if not text.startswith("CMD"):
                return None
            text = text[3:].strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    base: str  # image or stage name as written (may contain ${ARG})
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in the Dockerfile")

    def resolve(self, text: str, extra: dict[str, str] | None = None) -> str:
        """Expands ${ARG} / $ARG with the global ARG defaults (and ``extra``)."""
        values = {**self.global_args, **(extra or {})}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def command(self) -> list[str]:
        """The container's command line: ENTRYPOINT + CMD of the final stage (both exec form)."""
        entry = self.final.last("ENTRYPOINT")
        cmd = self.final.last("CMD")
        parts: list[str] = []
        for inst in (entry, cmd):
            if inst is None:
                continue
            form = inst.exec_form()
            if form is None:
                raise ValueError(f"{inst.keyword} is not in exec form: {inst.args}")
            parts += form
        return parts

    def env(self) -> dict[str, str]:
        """ENV of the final stage, in order, with ``$VAR`` references left as written."""
        env: dict[str, str] = {}
        for inst in self.final.all("ENV"):
            for token in shlex.split(inst.args):
                key, _, value = token.partition("=")
                env[key] = value
        return env

    def healthcheck(self) -> list[str]:
        inst = self.final.last("HEALTHCHECK")
        form = inst.exec_form() if inst else None
        if form is None:
            raise ValueError("the final stage has no exec-form HEALTHCHECK CMD")
        return form


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: dict[str, str] = {}
        while rest.startswith("--") and keyword in ("COPY", "ADD", "RUN", "FROM"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        elif keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            global_args[key] = value.strip('"')
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, rest, flags))
    return Dockerfile(global_args, stages)


def option_value(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


def with_option(command: list[str], option: str, value: str) -> list[str]:
    """``command`` with the value after ``option`` replaced."""
    out = list(command)
    out[out.index(option) + 1] = value
    return out


# ---- .dockerignore -------------------------------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex += pattern[i : end + 1]
            i = end + 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return re.compile(regex + r"\Z")


def dockerignore_excludes(rules_text: str, path: str) -> bool:
    """Whether Docker leaves ``path`` (relative, '/'-separated) out of the build context.

    Rules apply in order and the last match wins; a rule matching a parent folder matches the path too.
    """
    rules = [line.strip() for line in rules_text.splitlines() if line.strip() and not line.startswith("#")]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        regex = _ignore_regex(rule[1:] if negate else rule)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


# ---- Compose ----------------------------------------------------------------------------------------------------


class Reset:
    """Compose's ``!reset`` tag: remove the value inherited from an earlier file."""


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's ``!reset`` and ``!override`` tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True)
    ),
)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass: no code runs
    assert isinstance(data, dict)
    return data


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of a second file for the keys used here: maps merge, scalars and lists replace,
    ``!reset`` removes."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge_compose(merged[key], value)
            else:
                merged[key] = value
        return merged
    return override


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` interpolation, applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m[1], m[3]
            got = env.get(name)
            return got if got else (default or "")

        return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)
    return value


# ---- processes --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A started process and where its output goes."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)


def start(command: list[str], env: dict[str, str], port: int, log: Path, cwd: Path) -> Service:
    handle = log.open("wb")
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return Service(process, port, log)


def wait_for_status(service: Service, path: str, status: int = 200, deadline_s: float = 180.0) -> None:
    """Polls ``path`` until it answers ``status``; fails early with the log if the process exits."""
    end = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < end:
        if service.process.poll() is not None:
            raise AssertionError(f"process exited with {service.process.returncode}:\n{service.output()}")
        try:
            response = httpx.get(service.url + path, timeout=2.0)
            if response.status_code == status:
                return
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise AssertionError(
        f"{service.url}{path} not {status} after {deadline_s:.0f} s ({last}):\n{service.output()}"
    )


@contextmanager
def image_replicas(env: dict[str, str], workdir: Path, count: int = 2) -> Iterator[list[Service]]:
    """``count`` processes of the image's command on free loopback ports, ready; stopped on exit."""
    command = parse_dockerfile().command()
    services: list[Service] = []
    try:
        for i in range(count):
            port = free_port()
            argv = with_option(with_option(command, "--host", "127.0.0.1"), "--port", str(port))
            services.append(start(argv, env, port, workdir / f"replica{i}.log", cwd=workdir))
        for service in services:
            wait_for_status(service, "/health/ready", 200)
        yield services
    finally:
        for service in services:
            service.stop()


def image_command_env(model_dir: Path, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The image's ENV for a process started outside Docker.

    The only differences: the image's virtual environment (/opt/venv/bin on PATH) is this checkout's virtual
    environment, and MEDSERVE_MODEL_DIR points at ``model_dir`` instead of the mount point.
    """
    dockerfile = parse_dockerfile()
    env = dict(os.environ)
    venv_bin = str(Path(shutil.which("medserve") or ROOT / ".venv" / "bin" / "medserve").parent)
    for key, value in dockerfile.env().items():
        if key == "PATH":
            value = value.replace("/opt/venv/bin", venv_bin).replace("$PATH", env.get("PATH", ""))
        env[key] = value
    env["MEDSERVE_MODEL_DIR"] = str(model_dir)
    env.update(extra or {})
    return env


# ---- nginx ------------------------------------------------------------------------------------------------------


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


def install_nginx(timeout_s: float = 600.0) -> tuple[str | None, str]:
    """Finds nginx, installing Debian's package when missing and allowed (root with apt-get).

    Returns:
        (path to nginx or None, the reason it is missing).
    """
    found = find_nginx()
    if found:
        return found, ""
    if os.environ.get("MEDSERVE_NO_INSTALL"):
        return None, "nginx is not installed and MEDSERVE_NO_INSTALL is set"
    if not shutil.which("apt-get"):
        return None, "nginx is not installed and apt-get is not available to install it"
    if os.geteuid() != 0:
        return None, "nginx is not installed and installing it needs root (sudo apt-get install -y nginx)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "install", "-y", "-q", "nginx"]]
    first = subprocess.run(steps[0], env=env, capture_output=True, timeout=timeout_s, check=False)
    if first.returncode != 0:  # the package lists may be missing on a fresh machine
        for cmd in (["apt-get", "update", "-q"], steps[0]):
            result = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout_s, check=False)
            if result.returncode != 0:
                tail = result.stderr.decode(errors="replace")[-500:]
                return None, f"`{' '.join(cmd)}` failed: {tail}"
    found = find_nginx()
    return (found, "") if found else (None, "apt-get install nginx finished but no nginx binary was found")


def render_nginx_conf(text: str, listen_port: int, replica_ports: list[int]) -> str:
    """The project's nginx config for loopback: replicas on ``replica_ports``, listening on ``listen_port``.

    The upstream server lines keep their parameters (max_fails, fail_timeout); nothing else changes.
    """
    server_line = re.search(r"^(\s*)server\s+\S+:\d+(\s[^;]*)?;\s*$", text, flags=re.M)
    if server_line is None:
        raise ValueError("no upstream `server host:port ...;` line in the nginx config")
    indent, params = server_line[1], server_line[2] or ""
    servers = "\n".join(f"{indent}server 127.0.0.1:{port}{params};" for port in replica_ports)
    text = text[: server_line.start()] + servers + text[server_line.end() :]
    text, count = re.subn(r"^(\s*)listen\s+\d+;", rf"\g<1>listen 127.0.0.1:{listen_port};", text, flags=re.M)
    if count != 1:
        raise ValueError(f"expected one `listen PORT;` line in the nginx config, found {count}")
    return text


def nginx_main_conf(workdir: Path, include: Path) -> str:
    """A minimal main config around the project's http-level file, with every path inside ``workdir``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's private temp dirs
    return (
        f"{user}worker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"  access_log {workdir}/access.log;\n"
        f"  client_body_temp_path {workdir}/body;\n  proxy_temp_path {workdir}/proxy;\n"
        f"  fastcgi_temp_path {workdir}/fastcgi;\n  uwsgi_temp_path {workdir}/uwsgi;\n"
        f"  scgi_temp_path {workdir}/scgi;\n"
        f"  include {include};\n"
        "}\n"
    )
