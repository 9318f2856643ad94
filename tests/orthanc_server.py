"""A real Orthanc with its DICOMweb plugin, for tests and benchmarks (Debian's orthanc + orthanc-dicomweb).

``OrthancServer(folder).start()`` writes a config (storage and index in ``folder``, HTTP and DICOM
ports free on the loopback, authentication on with one user), starts ``Orthanc CONFIG.json`` in a
session of its own and waits until its REST API answers. ``stop()`` ends it (SIGTERM, then SIGKILL);
``start()`` again brings it back on the same ports over the same storage. ``upload(path)`` stores a
file through ``POST /instances``. scripts/bootstrap installs the packages.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mammoflag.label_studio_server import free_port
from mammoflag.processes import stop_process_groups

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).is_file() and Path(DICOMWEB_PLUGIN).is_file()


@dataclass
class OrthancServer:
    folder: Path
    user: str = "mammoflag"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12), repr=False)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    extra_dicomweb: dict = field(default_factory=dict)  # more "DicomWeb" settings
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The mammoflag source URL of this server's DICOMweb root."""
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    def config(self) -> dict:
        storage = self.folder / "storage"
        return {
            "Name": "mammoflag-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {self.user: self.password},
            "Plugins": [DICOMWEB_PLUGIN], "HttpThreadsCount": 8, "StorageCompression": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags",
                         "SeriesMetadata": "MainDicomTags", **self.extra_dicomweb},
        }

    def start(self, timeout_s: float = 30.0) -> "OrthancServer":
        if shutil.which(ORTHANC_BINARY) is None or not Path(DICOMWEB_PLUGIN).is_file():
            raise RuntimeError("Orthanc and its DICOMweb plugin are not installed: run scripts/bootstrap --browser")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=1))
        config.chmod(0o600)
        log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC_BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.folder)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                if httpx.get(f"{self.url}/system", auth=(self.user, self.password), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_groups([self.proc])
            self.proc = None

    def upload(self, path: Path) -> dict:
        r = httpx.post(f"{self.url}/instances", content=Path(path).read_bytes(), auth=(self.user, self.password),
                       timeout=60)
        r.raise_for_status()
        return r.json()

    def upload_folder(self, folder: Path) -> int:
        """Every DICOM file below ``folder`` (others are left out); returns how many were stored."""
        n = 0
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix != ".csv"):
            self.upload(path)
            n += 1
        return n

    def delete_all(self) -> None:
        auth = (self.user, self.password)
        for study in httpx.get(f"{self.url}/studies", auth=auth, timeout=30).json():
            httpx.delete(f"{self.url}/studies/{study}", auth=auth, timeout=30).raise_for_status()
