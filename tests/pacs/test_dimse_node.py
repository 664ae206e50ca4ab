"""The DICOM node in its own process (``app.pacs.dimse_node``): dcmtk's storescu and echoscu against it, real
child processes; its C-STOREs reach this process's intake."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from app.pacs.dimse import MAX_PDU_BYTES, VERIFICATION, parse_allowed
from app.pacs.dimse_node import DimseProcess, answer
from app.pacs.intake import OUT_OF_RESOURCES, AcceptResult, Intake, ModelChoice, SpooledInstance
from app.pacs.routing import Router
from app.pacs.spool import Spool
from app.pacs.store import JobStore
from tests.deploy.helpers import free_port
from tests.pacs.sources import ct_path, dx_dataset, part10
from tests.pacs.test_dimse import AE, RecordingIntake, echo, run, store

ROOT = Path(__file__).resolve().parents[2]


def node(intake: RecordingIntake | None, allowed: str = "MODALITY@127.0.0.1") -> DimseProcess:
    return DimseProcess(
        lambda: intake,
        ae_title=AE,
        port=free_port(),
        host="127.0.0.1",
        allowed=parse_allowed(allowed),
        timeout_s=10.0,
        log_format="text",
    )


@pytest.fixture
def started() -> Iterator[tuple[DimseProcess, RecordingIntake]]:
    intake = RecordingIntake()
    server = node(intake)
    server.start()
    try:
        yield server, intake
    finally:
        server.stop()


def child_pid(server: DimseProcess) -> int:
    process = server._process
    assert process is not None
    return process.pid


def gone(pid: int, within_s: float = 30.0) -> bool:
    """Whether process ``pid`` exits (or is a zombie) within ``within_s``."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_stores_reach_this_process_intake_from_the_child(
    dcmtk: dict[str, str], started: tuple[DimseProcess, RecordingIntake]
) -> None:
    server, intake = started
    assert server.running and child_pid(server) != os.getpid()
    done = store(dcmtk, server, [ct_path(), ct_path()])  # type: ignore[arg-type]
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("Received Store Response (Success)") == 2
    assert [source for _, source in intake.received] == ["dimse", "dimse"]
    assert intake.received[0][0][128:132] == b"DICM"  # the Part 10 bytes, as sent
    assert (server.stored, server.refused) == (2, 0)


def test_a_refusal_and_an_unready_intake_keep_their_statuses(
    dcmtk: dict[str, str], started: tuple[DimseProcess, RecordingIntake]
) -> None:
    server, intake = started
    intake.refuse = OUT_OF_RESOURCES
    refused = store(dcmtk, server, [ct_path()])  # type: ignore[arg-type]
    assert "Refused: OutOfResources" in refused.stdout + refused.stderr
    intake.refuse, intake.unavailable = None, True
    waiting = store(dcmtk, server, [ct_path()])  # type: ignore[arg-type]
    assert "Refused: OutOfResources" in waiting.stdout + waiting.stderr
    assert intake.received == [] and server.refused == 2


def test_answer_reports_each_outcome() -> None:
    assert answer(None, b"") == {"unavailable": "MedServe is not ready to accept instances"}

    class Broken:
        def accept_bytes(
            self, data: bytes, source: str, *, study_instance_uid: str | None = None
        ) -> AcceptResult:
            raise ValueError("no")

    assert answer(Broken(), b"") == {"error": "the intake failed"}
    reply = answer(RecordingIntake(refuse=OUT_OF_RESOURCES), ct_path().read_bytes())
    assert reply["result"]["failure_reason"] == OUT_OF_RESOURCES and not reply["result"]["accepted"]


def test_a_child_that_dies_is_started_again(
    dcmtk: dict[str, str], started: tuple[DimseProcess, RecordingIntake]
) -> None:
    server, _ = started
    first = child_pid(server)
    os.kill(first, signal.SIGKILL)
    end = time.monotonic() + 60
    while (server._process is None or child_pid(server) == first) and time.monotonic() < end:
        time.sleep(0.1)
    assert child_pid(server) != first
    ok = echo(dcmtk, server, "MODALITY")  # type: ignore[arg-type]
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_stop_ends_the_child_and_frees_the_port(dcmtk: dict[str, str]) -> None:
    server = node(RecordingIntake())
    server.start()
    pid = child_pid(server)
    server.stop()
    assert not server.running and gone(pid)
    after = run([dcmtk["echoscu"], "-to", "5", "-aet", "MODALITY", "-aec", AE, "127.0.0.1", str(server.port)])
    assert after.returncode != 0
    again = DimseProcess(lambda: None, ae_title=AE, port=server.port, host="127.0.0.1", allowed=[])
    again.start()  # the port is free again
    again.stop()


def test_a_port_in_use_is_an_os_error_with_its_errno(started: tuple[DimseProcess, RecordingIntake]) -> None:
    server, _ = started

    def bridges() -> int:
        return sum(t.name == "medserve-dimse-bridge" and t.is_alive() for t in threading.enumerate())

    before = bridges()
    other = DimseProcess(lambda: None, ae_title=AE, port=server.port, host="127.0.0.1", allowed=[])
    with pytest.raises(OSError) as raised:
        other.start()
    assert raised.value.errno == 98  # EADDRINUSE
    assert not other.running
    end = time.monotonic() + 30
    while bridges() > before and time.monotonic() < end:
        time.sleep(0.05)
    assert bridges() == before  # the failed start's bridge thread ended (not left blocked in accept())


def test_the_child_dies_with_a_killed_service(tmp_path: Path) -> None:
    """A parent that is SIGKILLed (no clean-up runs) takes its DICOM node process with it."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys
            sys.path.insert(0, {str(ROOT)!r})
            from app.pacs.dimse_node import DimseProcess
            server = DimseProcess(lambda: None, ae_title="MEDSERVE", port={free_port()}, host="127.0.0.1",
                                  allowed=[])
            server.start()
            print(server._process.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    parent = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    assert gone(int(parent.stdout.split()[0]))


class CountingIntake(Intake):
    """The service's intake, counting which way each C-STORE came in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.by_bytes = 0
        self.spooled = 0

    def accept_bytes(
        self, data: bytes, source: str, *, study_instance_uid: str | None = None
    ) -> AcceptResult:
        self.by_bytes += 1
        return super().accept_bytes(data, source, study_instance_uid=study_instance_uid)

    def accept_spooled(self, instance: SpooledInstance, source: str) -> AcceptResult:
        self.spooled += 1
        return super().accept_spooled(instance, source)


def test_with_the_service_intake_the_child_checks_and_spools_each_instance(
    dcmtk: dict[str, str], tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    jobs = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    observed: list[str] = []

    class Catalog:
        def loaded(self) -> bool:
            return True

        def choices(self) -> list[ModelChoice]:
            return [ModelChoice("lungs", "v1", "segmentation", ready=True, has_result=True)]

    intake = CountingIntake(
        jobs, spool, Router(), Catalog(), on_accept=lambda _, outcome: observed.append(outcome)
    )
    server = node(intake)  # type: ignore[arg-type]
    server.start()
    try:
        source = tmp_path / "dx.dcm"
        dataset = dx_dataset(64)
        source.write_bytes(part10(dataset))
        done = store(dcmtk, server, [source, source])  # type: ignore[arg-type]
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.stop()
        jobs.close()
    assert (intake.spooled, intake.by_bytes) == (2, 0)  # the child spooled; only the small message crossed
    assert observed == ["accepted", "duplicate"] and (server.stored, server.refused) == (2, 0)
    spooled = spool.instance_path(str(dataset.SOPInstanceUID))
    assert pydicom.dcmread(spooled).SOPInstanceUID == dataset.SOPInstanceUID
    assert spool.used_bytes == spooled.stat().st_size
    assert sorted(p.name for p in spool.instances.iterdir()) == [spooled.name]  # no temporary file left


def test_the_node_takes_large_pdus(started: tuple[DimseProcess, RecordingIntake]) -> None:
    """The node announces ``MAX_PDU_BYTES`` as its maximum receive length (not pynetdicom's 16 kB)."""
    from pynetdicom import AE as Client

    server, _ = started
    client = Client(ae_title="MODALITY")
    client.add_requested_context(VERIFICATION)
    association = client.associate("127.0.0.1", server.port, ae_title=AE)
    try:
        assert association.is_established
        assert association.acceptor.maximum_length == MAX_PDU_BYTES
    finally:
        association.release()
