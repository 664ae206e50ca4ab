"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the pull tests: a temporary configuration and
storage, loopback ports, HTTP basic authentication; stopped by its own pid.

Absent: ``tests.components.missing`` (fails under CI=true).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.components import find_program, missing
from tests.deploy.helpers import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medserve", "orthanc-test-secret"


@dataclass(frozen=True)
class Orthanc:
    url: str  # the REST root
    auth: tuple[str, str]

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, data: bytes) -> None:
        response = httpx.post(f"{self.url}/instances", content=data, auth=self.auth, timeout=30)
        response.raise_for_status()


@contextlib.contextmanager
def orthanc_server() -> Iterator[Orthanc]:
    binary = find_program("Orthanc")
    if binary is None:
        missing("Orthanc", "not installed (Debian package 'orthanc')")
    if not DICOMWEB_PLUGIN.is_file():
        missing(
            "Orthanc", f"its DICOMweb plugin {DICOMWEB_PLUGIN} is not installed (Debian 'orthanc-dicomweb')"
        )
    root = Path(tempfile.mkdtemp(prefix="medserve-orthanc-"))
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "MEDSERVE-TEST",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANCTEST",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpThreadsCount": 4,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(f"http://127.0.0.1:{http_port}", (USER, PASSWORD))
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited: {(root / 'orthanc.log').read_text(errors='replace')[-2000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/system", auth=server.auth, timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("Orthanc never answered")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
