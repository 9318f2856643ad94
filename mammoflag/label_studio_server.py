"""Start and stop a real Label Studio server, as one starts PostgreSQL.

Label Studio lives in its own virtual environment (``.venv-label-studio``); this module
only runs its ``label-studio`` executable with the environment mammoflag needs:
an admin with a known API token, local-file serving below the data root, SQLite or
PostgreSQL, and SSRF protection narrowed to allow loopback only (so a backend and
webhooks on the same host work, while private networks stay banned).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mammoflag.processes import stop_process_groups

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LS_BIN = REPO_ROOT / ".venv-label-studio" / "bin" / "label-studio"

# Everything SSRF protection bans by default except loopback: the backend and the webhook
# receiver share a host with Label Studio in the embedded set-up. See README "Security".
# Label Studio 1.23's prediction import, without this flag, recounts annotations and predictions of
# *every* task of the project on each request (O(project) per 500 predictions); with it, only the
# tasks the request names (read in data_import/api.py: ImportPredictionsAPI._create_memory_efficient).
# The flagged path skips the per-prediction LabelInterface check (our results come from the spec the
# backend checked against the label config) and rejects a whole request naming a task that is not
# in the project (we send at most 500, one internal batch, so nothing of such a request is stored).
FAST_PREDICTION_IMPORT_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"

BANNED_SUBNETS_EXCEPT_LOOPBACK = ",".join([
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "fc00::/7", "fe80::/10",
])


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def connect_host(bind_host: str) -> str:
    """The address a client on this machine uses for a server bound to ``bind_host``."""
    return "127.0.0.1" if bind_host in WILDCARD_HOSTS else bind_host


def lan_address() -> str:
    """This machine's address on its default route (no packet is sent); loopback when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresConfig:
    name: str
    user: str = "postgres"
    password: str = ""
    host: str = "127.0.0.1"
    port: int = 5432


@dataclass
class LabelStudioServer:
    data_dir: Path  # Label Studio's own state (SQLite db, media)
    files_root: Path  # LOCAL_FILES_DOCUMENT_ROOT: the only tree task URLs can read
    username: str
    password: str = field(repr=False)
    token: str = field(repr=False)
    port: int = 0
    host: str = "127.0.0.1"
    postgres: PostgresConfig | None = None
    allow_loopback_targets: bool = True
    ls_bin: Path = DEFAULT_LS_BIN
    log_path: Path | None = None
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """Where this machine reaches it: loopback when it listens on every interface."""
        return f"http://{connect_host(self.host)}:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAMMOFLAG_", "DJANGO_", "POSTGRE_"))}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
            LOCAL_FILES_SERVING_ENABLED="true",
            LOCAL_FILES_DOCUMENT_ROOT=str(self.files_root),
            SSRF_PROTECTION_ENABLED="true",
            LATEST_VERSION_CHECK="false",
            COLLECT_ANALYTICS="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            PYTHONUNBUFFERED="1",
        )
        env[FAST_PREDICTION_IMPORT_FLAG] = "true"
        if self.allow_loopback_targets:
            env.update(USE_DEFAULT_BANNED_SUBNETS="false", USER_ADDITIONAL_BANNED_SUBNETS=BANNED_SUBNETS_EXCEPT_LOOPBACK)
        if self.postgres:
            pg = self.postgres
            env.update(DJANGO_DB="default", POSTGRE_NAME=pg.name, POSTGRE_USER=pg.user,
                       POSTGRE_PASSWORD=pg.password, POSTGRE_HOST=pg.host, POSTGRE_PORT=str(pg.port))
        return env

    def start(self, timeout_s: float = 180) -> "LabelStudioServer":
        if not self.ls_bin.exists():
            raise FileNotFoundError(f"{self.ls_bin} not found: run scripts/bootstrap to install Label Studio")
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files_root.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path or (self.data_dir / "label-studio.log")
        log = open(log_path, "ab")
        self._proc = subprocess.Popen(
            [str(self.ls_bin), "start", "--no-browser", "--internal-host", self.host, "--port", str(self.port)],
            env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self._proc.returncode}; see {log_path}")
            try:
                r = httpx.get(f"{self.url}/api/current-user/whoami",
                              headers={"Authorization": f"Token {self.token}"}, timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"Label Studio did not answer within {timeout_s}s; see {log_path}")

    @property
    def process(self) -> subprocess.Popen | None:
        """The server's process (its group holds Label Studio's own children), None when stopped."""
        return self._proc

    def stop(self) -> None:
        if self._proc:
            stop_process_groups([self._proc])
        self._proc = None

    def __enter__(self) -> "LabelStudioServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
