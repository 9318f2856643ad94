"""docker-compose.yml's ML-backend health check, run as Docker would run it, against a real backend process.

No Docker engine here: the compose file is parsed, and its health-check command runs with the service's
environment (the stack's secrets) against ``mammoflag serve-backend`` on a free port.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from mlb_helpers import backend_environment

REPO = Path(__file__).resolve().parents[2]


def health_command() -> list[str]:
    service = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["ml-backend"]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and "9090" in service["command"]
    return test[1:]


def run_check(command: list[str], port: int, env: dict[str, str]) -> int:
    argv = [sys.executable if a == "python" else a.replace("127.0.0.1:9090", f"127.0.0.1:{port}") for a in command]
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def test_compose_health_check_passes_with_the_stack_secrets_and_fails_without(tmp_path, backend_factory):
    env = backend_environment(tmp_path / "home", tmp_path / "data", f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    backend = backend_factory(env)
    port = int(backend.url.rsplit(":", 1)[1])
    command = health_command()
    assert run_check(command, port, {**env, "PATH": "/usr/bin:/bin"}) == 0
    wrong = {**env, "MAMMOFLAG_BACKEND_PASSWORD": "not-the-password", "PATH": "/usr/bin:/bin"}
    assert run_check(command, port, wrong) != 0  # the check really authenticates: a wrong secret fails it
