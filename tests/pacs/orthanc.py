"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests, on free loopback ports.

``Orthanc`` writes a temporary JSON configuration (HTTP and DICOM ports, storage folder, DICOMweb under
``/dicom-web/``, remote access off, optional user), starts ``/usr/sbin/Orthanc`` on it, and stops it by its own
pid. ``stop()`` and ``start()`` again keep the ports and the storage folder, so that a test can take the archive
away for a while and bring it back with what it held. ``orthanc_server`` is the context manager the fixtures use;
an absent Orthanc or plugin goes through ``tests.components.missing`` (a skip locally, a failure under CI).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.components import find_program, missing
from tests.deploy.helpers import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AE = "ORTHANC"


def find_orthanc() -> str:
    """The Orthanc program and its DICOMweb plugin, or skip/fail through ``tests.components.missing``."""
    program = find_program("Orthanc")
    if program is None:
        missing("Orthanc", "not installed (Debian package 'orthanc')")
    if not DICOMWEB_PLUGIN.is_file():
        missing("Orthanc DICOMweb plugin", f"{DICOMWEB_PLUGIN} is absent (Debian package 'orthanc-dicomweb')")
    return program


@dataclass
class Orthanc:
    """One Orthanc server; ``start()`` / ``stop()`` may be called again and again (same ports, same storage)."""

    program: str
    workdir: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    aet: str = ORTHANC_AE
    user: tuple[str, str] | None = None  # (name, password): HTTP basic authentication enabled
    # name -> [AE title, host, port]: DICOM peers Orthanc may send to (C-STORE SCU) and accept from
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    # name -> {"Url": ..., "Username": ..., "Password": ...}: DICOMweb servers Orthanc may STOW to
    dicomweb_servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    lua_scripts: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # any other configuration option
    # a shipped configuration (deploy/orthanc/orthanc.json) to start from: only this machine's parts are rewritten
    base: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)  # environment of the process (Orthanc expands ${VAR})
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The REST root, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (what ``MEDSERVE_PACS_URL`` names)."""
        return f"{self.url}/dicom-web"

    @property
    def dimse_destination(self) -> str:
        """``AE@host:port`` (what ``MEDSERVE_DIMSE_DESTINATION`` names)."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def log(self) -> Path:
        return self.workdir / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        """The configuration file's content: ``base`` (if any) with the machine's parts set here."""
        base = copy.deepcopy(self.base) if self.base else {}
        dicomweb = {**base.get("DicomWeb", {}), "Enable": True, "Root": "/dicom-web/"}
        dicomweb["Servers"] = {**dicomweb.get("Servers", {}), **self.dicomweb_servers}
        config: dict[str, Any] = base
        config.update(
            {
                "Name": base.get("Name", "medserve-test"),
                "StorageDirectory": str(self.workdir / "storage"),
                "IndexDirectory": str(self.workdir / "storage"),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "DicomAet": self.aet,
                "DicomCheckCalledAet": base.get("DicomCheckCalledAet", False),
                "DicomAlwaysAllowStore": base.get("DicomAlwaysAllowStore", True),
                "DicomAlwaysAllowEcho": base.get("DicomAlwaysAllowEcho", True),
                "DicomModalities": {**base.get("DicomModalities", {}), **self.modalities},
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": self.user is not None,
                "RegisteredUsers": {self.user[0]: self.user[1]} if self.user else {},
                "HttpsVerifyPeers": False,
                "StableAge": 1,
                "Plugins": [str(DICOMWEB_PLUGIN)],
                "LuaScripts": [str(path) for path in self.lua_scripts],
                "DicomWeb": dicomweb,
                "ConcurrentJobs": 2,
                "SaveJobs": False,
            }
        )
        config.update(self.extra)
        return config

    def write_configuration(self) -> Path:
        path = self.workdir / "orthanc.json"
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.configuration(), indent=2))
        return path

    def start(self, deadline_s: float = 60.0) -> None:
        """Starts Orthanc and waits until its REST API answers; fails with its log if it does not come up."""
        if self.process is not None and self.process.poll() is None:
            return
        config = self.write_configuration()
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                [self.program, "--logdir=" + str(self.workdir), str(config)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **self.env},
            )
        end = time.monotonic() + deadline_s
        last = "no answer"
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.process.returncode}:\n{self.output()}")
            try:
                response = self.client().get("/system", timeout=2.0)
                if response.status_code == 200 and self._dicomweb_ready():
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"Orthanc not up after {deadline_s:.0f} s ({last}):\n{self.output()}")

    def _dicomweb_ready(self) -> bool:
        response = self.client().get("/dicom-web/studies", timeout=2.0)
        return response.status_code in (200, 204)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops this Orthanc (SIGTERM to its own pid, SIGKILL if it lingers); its storage stays."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        texts = [path.read_text(errors="replace") for path in sorted(self.workdir.glob("*.log*"))]
        return "\n".join(texts)[-6000:]

    def client(self) -> httpx.Client:
        auth = httpx.BasicAuth(*self.user) if self.user else None
        return httpx.Client(base_url=self.url, auth=auth, timeout=30.0)

    # ---- what the archive holds (REST API) ----------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        with self.client() as client:
            response = client.get(path)
            response.raise_for_status()
            return response.json()

    def instances(self) -> list[str]:
        """Orthanc's ids of every stored instance."""
        return list(self.get_json("/instances"))

    def studies(self) -> list[str]:
        return list(self.get_json("/studies"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``{keyword: value}`` of one stored instance (Orthanc's simplified tags)."""
        return dict(self.get_json(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        with self.client() as client:
            response = client.get(f"/instances/{orthanc_id}/file")
            response.raise_for_status()
            return response.content

    def sop_instance_uids(self, sop_class_uid: str | None = None) -> list[str]:
        """The SOP Instance UIDs stored (of one SOP class when given), one entry per stored instance."""
        uids = []
        for orthanc_id in self.instances():
            tags = self.instance_tags(orthanc_id)
            if sop_class_uid is None or tags.get("SOPClassUID") == sop_class_uid:
                uids.append(str(tags.get("SOPInstanceUID")))
        return uids

    def upload(self, data: bytes) -> dict[str, Any]:
        """Stores Part 10 bytes through the REST API (``POST /instances``), as a modality or a viewer would."""
        with self.client() as client:
            response = client.post("/instances", content=data, headers={"content-type": "application/dicom"})
            response.raise_for_status()
            return dict(response.json())


@contextlib.contextmanager
def orthanc_server(workdir: Path, **options: Any) -> Iterator[Orthanc]:
    """A started Orthanc in ``workdir`` (see ``Orthanc`` for the options), stopped on exit."""
    server = Orthanc(find_orthanc(), workdir, **options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
