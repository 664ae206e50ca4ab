"""deploy/nginx/medserve.conf: valid for nginx itself, with passive health checks and retries."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.helpers import NGINX_CONF, install_nginx, nginx_main_conf, render_nginx_conf

TEXT = NGINX_CONF.read_text()


def test_failed_requests_are_retried_on_another_replica() -> None:
    retry = re.search(r"^\s*proxy_next_upstream\s+([^;]+);", TEXT, flags=re.M)
    assert retry
    conditions = retry[1].split()
    # error/timeout: a dead or hung replica; non_idempotent: POST inference requests are safe to re-send.
    assert {"error", "timeout", "non_idempotent"} <= set(conditions)
    tries = re.search(r"^\s*proxy_next_upstream_tries\s+(\d+);", TEXT, flags=re.M)
    assert tries and int(tries[1]) >= 2
    assert re.search(r"^\s*proxy_request_buffering\s+on;", TEXT, flags=re.M)


def test_replicas_have_passive_health_checks() -> None:
    server = re.search(r"^\s*server\s+\S+:\d+\s+([^;]*);", TEXT, flags=re.M)
    assert server
    assert re.search(r"max_fails=\d+", server[1]) and re.search(r"fail_timeout=\d+s", server[1])


def test_render_keeps_parameters_and_moves_to_loopback() -> None:
    rendered = render_nginx_conf(TEXT, 18080, [18001, 18002])
    servers = re.findall(r"^\s*server\s+(\S+:\d+)\s+([^;]*);", rendered, flags=re.M)
    assert [s[0] for s in servers] == ["127.0.0.1:18001", "127.0.0.1:18002"]
    assert servers[0][1] == servers[1][1] != ""
    assert "listen 127.0.0.1:18080;" in rendered
    assert "medserve-replica" not in rendered


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx, reason = install_nginx()
    if nginx is None:
        pytest.skip(f"cannot check the config with nginx: {reason}")
    (tmp_path / "medserve.conf").write_text(render_nginx_conf(TEXT, 18080, [18001, 18002]))
    (tmp_path / "nginx.conf").write_text(nginx_main_conf(tmp_path, tmp_path / "medserve.conf"))
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
