"""`make start`'s command, end to end: `mammoflag up --demo` on embedded defaults, then Ctrl+C."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mammoflag.label_studio_server import free_port, lan_address
from mammoflag.platform import DEMO_PROJECT
from mammoflag.settings import SECRETS_FILE, read_secrets_file

pytestmark = [pytest.mark.label_studio, pytest.mark.services]
REPO = Path(__file__).resolve().parents[2]


def _port_open(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_up_demo_starts_everything_and_stops_on_ctrl_c(tmp_path):
    home = tmp_path / "home"
    ls_port, backend_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMOFLAG_")}
    env["MAMMOFLAG_HOME"] = str(home)
    out = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mammoflag.cli", "up", "--demo", "--demo-studies", "3", "--host", "0.0.0.0",
         "--port", str(ls_port), "--backend-port", str(backend_port)],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "mammoflag is up" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "platform did not come up in 10 minutes"
            time.sleep(2)

        secrets = read_secrets_file(home / SECRETS_FILE)
        token = secrets["MAMMOFLAG_LABEL_STUDIO_TOKEN"]
        log = (tmp_path / "up.log").read_text()
        assert token not in log  # printed: where the secrets are, not them
        # --host 0.0.0.0: the URL printed for annotators is this machine's LAN address, and it answers there
        [annotators] = [line.split()[1] for line in log.splitlines() if line.strip().startswith("Annotators")]
        assert annotators == f"http://{lan_address()}:{ls_port}"
        assert httpx.get(f"{annotators}/health", timeout=5).status_code == 200
        ls = httpx.Client(base_url=f"http://127.0.0.1:{ls_port}", headers={"Authorization": f"Token {token}"})
        projects = ls.get("/api/projects/", params={"title": DEMO_PROJECT}).json()["results"]
        assert [p["title"] for p in projects] == [DEMO_PROJECT]
        project = projects[0]
        with open(home / "data" / "demo" / "manifest.csv") as f:
            n_images = sum(1 for _ in csv.DictReader(f))
        assert n_images >= 3 and project["task_number"] == n_images
        backends = ls.get("/api/ml/", params={"project": project["id"]}).json()
        assert [b["url"] for b in backends] == [f"http://127.0.0.1:{backend_port}"]
        assert project["sampling"] == "Uncertainty sampling"
        # the backend is up and closed to callers without its password
        assert httpx.post(f"http://127.0.0.1:{backend_port}/predict", json={"tasks": []}).status_code == 401
        # a task's image is served by Label Studio from the data root
        task = ls.get("/api/tasks/", params={"project": project["id"]}).json()["tasks"][0]
        image = ls.get(task["data"]["image"])
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"

        proc.send_signal(signal.SIGINT)  # Ctrl+C
        assert proc.wait(60) == 0
        time.sleep(1)
        assert not _port_open(ls_port) and not _port_open(backend_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # children run in their own sessions: make sure none outlives the test
        subprocess.run(["pkill", "-f", "--", f"--port {ls_port}"], check=False)
        subprocess.run(["pkill", "-f", "--", f"--port {backend_port}"], check=False)
