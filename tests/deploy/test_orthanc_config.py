"""deploy/orthanc/ with a real Orthanc: what it stores is forwarded to MedServe by STOW-RS, MedServe's results not.

Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) runs the shipped ``orthanc.json`` with only the machine's
parts rewritten: free loopback ports, a temporary storage folder, the plugin and Lua script paths, and the
``medserve`` DICOMweb server's URL pointed at a real ``http.server`` in this test that records each STOW-RS
request and answers as a STOW-RS server does (``ReferencedSOPSequence``, one item per instance received).
"""

from __future__ import annotations

import copy
import email.parser
import email.policy
import http.server
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from models.dicom_seg import build_dicom_seg
from models.dicom_sr import build_dicom_sr
from tests.components import missing, require_program
from tests.deploy.helpers import ROOT, free_port
from tests.models.dicom_sources import part10, source_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom")

ORTHANC_DIR = ROOT / "deploy" / "orthanc"
CONFIG = ORTHANC_DIR / "orthanc.json"
LUA = ORTHANC_DIR / "forward-to-medserve.lua"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
API_KEY = "orthanc-forwarding-key"
FINAL = ("Success", "Failure")  # Orthanc job states after which nothing more is sent


# ---- the shipped files -------------------------------------------------------------------------------------------


def test_the_configuration_names_medserve_and_the_lua_script() -> None:
    config = json.loads(CONFIG.read_text())
    server = config["DicomWeb"]["Servers"]["medserve"]
    assert config["DicomWeb"]["Enable"] is True and config["DicomWeb"]["Root"] == "/dicom-web/"
    assert server["Url"] == "http://medserve:8000/dicomweb/"  # MedServe's STOW-RS root in compose
    assert server["HttpHeaders"] == {"X-API-Key": "${MEDSERVE_API_KEY}"}  # Orthanc fills it from its env
    assert config["LuaScripts"] == ["/etc/orthanc/forward-to-medserve.lua"]  # deploy/orthanc/ at /etc/orthanc
    assert (ORTHANC_DIR / Path(config["LuaScripts"][0]).name).is_file()
    assert (config["HttpPort"], config["DicomPort"]) == (8042, 4242)
    lua = LUA.read_text()
    assert "function OnStoredInstance(" in lua and "/dicom-web/servers/' .. MEDSERVE_SERVER .. '/stow" in lua
    assert "MEDSERVE_SERVER = 'medserve'" in lua


# ---- a STOW-RS receiver standing in for MedServe -------------------------------------------------------------------


@dataclass
class StowRequest:
    path: str
    headers: dict[str, str]
    instances: Sequence[pydicom.Dataset]


@dataclass
class Receiver:
    """A real HTTP server that takes STOW-RS requests, records them and answers that it stored every part."""

    port: int = field(default_factory=free_port)
    requests: list[StowRequest] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self._body()
                content_type = self.headers.get("Content-Type", "")
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
                )
                parts = [part.get_payload(decode=True) for part in message.iter_parts()]
                instances = [pydicom.dcmread(io.BytesIO(part)) for part in parts if isinstance(part, bytes)]
                receiver.requests.append(
                    StowRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, instances)
                )
                answer = {
                    "00081199": {
                        "vr": "SQ",
                        "Value": [
                            {
                                "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                                "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                            }
                            for ds in instances
                        ],
                    }
                }
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def received_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for request in self.requests for ds in request.instances]


# ---- Orthanc on the shipped configuration ------------------------------------------------------------------------


def local_configuration(workdir: Path, medserve_url: str) -> dict[str, Any]:
    """The shipped configuration with only this machine's parts rewritten."""
    config: dict[str, Any] = copy.deepcopy(json.loads(CONFIG.read_text()))
    config.update(
        HttpPort=free_port(),
        DicomPort=free_port(),
        StorageDirectory=str(workdir / "storage"),
        IndexDirectory=str(workdir / "storage"),
        RemoteAccessAllowed=False,  # loopback only
        Plugins=[str(DICOMWEB_PLUGIN)],
        LuaScripts=[str(LUA)],
        SaveJobs=False,
    )
    config["DicomWeb"]["Servers"]["medserve"]["Url"] = f"{medserve_url}/dicomweb/"
    return config


@dataclass
class RunningOrthanc:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, path: str, data: bytes) -> dict[str, Any]:
        response = httpx.post(self.url + path, content=data, headers={"content-type": "application/dicom"})
        response.raise_for_status()
        return dict(response.json())

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10.0)
        response.raise_for_status()
        return response.json()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(tmp_path: Path, receiver: Receiver) -> Iterator[RunningOrthanc]:
    program = require_program("Orthanc", "orthanc")
    if not DICOMWEB_PLUGIN.is_file():
        missing("Orthanc DICOMweb plugin", f"{DICOMWEB_PLUGIN} is absent (Debian package 'orthanc-dicomweb')")
    config = local_configuration(tmp_path, receiver.url)
    (tmp_path / "storage").mkdir()
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log = tmp_path / "orthanc.out"
    env = {**os.environ, "MEDSERVE_API_KEY": API_KEY}
    with log.open("wb") as handle:
        process = subprocess.Popen([program, str(path)], stdout=handle, stderr=subprocess.STDOUT, env=env)
    running = RunningOrthanc(f"http://127.0.0.1:{config['HttpPort']}", process, log)
    try:
        wait_for(lambda: _answers(running.url + "/dicom-web/studies"), "Orthanc's DICOMweb API", running)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code in (200, 204)
    except httpx.TransportError:
        return False


def wait_for(condition: Any, what: str, orthanc: RunningOrthanc, deadline_s: float = 60.0) -> None:
    """Polls ``condition`` until true; a generous deadline only so that a broken setup ends with its log."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if orthanc.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with {orthanc.process.returncode}:\n{orthanc.output()}")
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {deadline_s:.0f} s:\n{orthanc.output()}")


def stow_jobs(orthanc: RunningOrthanc) -> list[dict[str, Any]]:
    return [job for job in orthanc.get("/jobs?expand") if job.get("Type") == "DicomWebStowClient"]


# ---- forwarding ----------------------------------------------------------------------------------------------------


def test_a_stored_instance_is_forwarded_to_medserve_by_stow(
    orthanc: RunningOrthanc, receiver: Receiver
) -> None:
    source = source_dataset("DX")
    stored = orthanc.post("/instances", part10(source))
    assert stored["Status"] == "Success"
    wait_for(lambda: len(receiver.requests) == 1, "the STOW-RS request", orthanc)
    (request,) = receiver.requests
    assert request.path == "/dicomweb/studies"
    assert request.headers["content-type"].startswith("multipart/related")
    assert 'type="application/dicom"' in request.headers["content-type"]
    assert request.headers["x-api-key"] == API_KEY  # ${MEDSERVE_API_KEY} from Orthanc's environment
    (instance,) = request.instances
    assert instance.SOPInstanceUID == source.SOPInstanceUID
    assert instance.StudyInstanceUID == source.StudyInstanceUID
    wait_for(
        lambda: [job["State"] for job in stow_jobs(orthanc)] == ["Success"], "the STOW job's success", orthanc
    )


def test_medserve_results_are_not_forwarded(orthanc: RunningOrthanc, receiver: Receiver) -> None:
    source = source_dataset("CR")
    mask = np.zeros((source.Rows, source.Columns), dtype=np.int64)
    mask[4:12, 4:20] = 1
    seg = build_dicom_seg(source, mask, ["background", "lung"], algorithm_name="lungs")
    sr = pydicom.dcmread(io.BytesIO(build_dicom_sr(source, {"normal": 0.25, "pneumonia": 0.75})))
    sr.Manufacturer = "Another Vendor"  # an SR, though not MedServe's: skipped by its modality
    other_result = source_dataset("DX")  # not SEG or SR, but written by MedServe
    other_result.StudyInstanceUID = source.StudyInstanceUID
    other_result.Manufacturer = "MedServe"
    sentinel = source_dataset("DX")
    for data in (seg, part10(sr), part10(other_result)):
        assert orthanc.post("/instances", data)["Status"] == "Success"
    # Lua handles stored instances one after the other, in order: once the instance stored after the results is
    # received, the results have been handled (and were not sent).
    orthanc.post("/instances", part10(sentinel))
    wait_for(lambda: sentinel.SOPInstanceUID in receiver.received_uids(), "the sentinel's request", orthanc)
    wait_for(lambda: all(job["State"] in FINAL for job in stow_jobs(orthanc)), "the STOW jobs' end", orthanc)
    assert receiver.received_uids() == [sentinel.SOPInstanceUID]
    assert [job["State"] for job in stow_jobs(orthanc)] == ["Success"]
    assert len(orthanc.get("/instances")) == 4  # all four are stored in the archive
    modalities = sorted(
        orthanc.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in orthanc.get("/series")
    )
    assert modalities == ["DX", "DX", "SEG", "SR"]
    output = orthanc.output()
    assert output.count("MedServe forwarding: not sent (a result)") == 3
    assert output.count("MedServe forwarding: instance") == 1
    for secret in ("Roe", "MRN-7731"):  # the Lua script prints Orthanc ids only
        assert secret not in output
