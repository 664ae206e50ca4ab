"""The result writer processes (``app.pacs.writers``): the object they write is the one the service's threads
write, a writer that dies is replaced, and jobs come out the same with or without them."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.pacs.writers import ResultWriters, WriterUnavailable
from models.dicom_results import ResultRequest, build_result
from models.dicom_seg import DicomSegError
from tests.app.helpers import serve, settings
from tests.app.pacs.helpers import instance, pacs_settings, stow, wait_for_jobs
from tests.models.test_dicom import to_bytes
from tests.pacs.test_dimse_node import ROOT, gone

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom"),
]


def ct_file() -> str:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    return path


def seg_request(sop_uid: str = "2.25.1") -> ResultRequest:
    mask = np.zeros((128, 128), np.uint8)
    mask[30:70, 40:90] = 1
    return ResultRequest(
        "seg",
        (mask, ["background", "lesion"]),
        {
            "algorithm_name": "m",
            "algorithm_version": "v1",
            "series_instance_uid": "2.25.2",
            "sop_instance_uid": sop_uid,
        },
    )


def sr_request() -> ResultRequest:
    return ResultRequest(
        "sr",
        ({"benign": 0.25, "malignant": 0.75}, "malignant"),
        {
            "classes": ["benign", "malignant"],
            "model_name": "m",
            "model_version": "v1",
            "series_instance_uid": "2.25.4",
            "sop_instance_uid": "2.25.3",
        },
    )


def flat(ds: pydicom.Dataset, prefix: str = "") -> dict[str, Any]:
    """Every element by its path (``Sequence[i].Keyword``)."""
    out: dict[str, Any] = {}
    for element in ds:
        if element.VR == "SQ":
            for i, item in enumerate(element.value):
                out.update(flat(item, f"{prefix}{element.keyword}[{i}]."))
        else:
            out[prefix + element.keyword] = element.value
    return out


def same_object(a: bytes, b: bytes) -> None:
    """Equal but for the times of writing and the UIDs highdicom makes up (dimension organisation, tracking)."""
    first, second = (flat(pydicom.dcmread(pydicom.filebase.DicomBytesIO(x))) for x in (a, b))
    assert first.keys() == second.keys()
    differ = {key for key in first if first[key] != second[key]}
    assert all(key.endswith(("Time", "Date", "DimensionOrganizationUID", ".UID")) for key in differ), differ
    assert first["PixelData" if "PixelData" in first else "SOPInstanceUID"] is not None


@pytest.fixture
def writers() -> Any:
    pool = ResultWriters(1)
    pool.start()
    yield pool
    pool.close()


@pytest.mark.parametrize("make", [seg_request, sr_request])
async def test_a_writer_process_writes_the_object_the_service_writes(
    writers: ResultWriters, make: Any
) -> None:
    request = make()
    written = await writers.write(request, ct_file())
    assert [p for p in multiprocessing.active_children() if p.pid != os.getpid()]  # in a process of its own
    same_object(written, build_result(request, pydicom.dcmread(ct_file())))


async def test_a_writers_refusal_reaches_the_caller(writers: ResultWriters, tmp_path: Path) -> None:
    odd = pydicom.dcmread(ct_file())
    odd.SOPClassUID = "1.2.3.4"  # a SOP class a SEG cannot reference
    path = tmp_path / "odd.dcm"
    odd.save_as(path)
    with pytest.raises(DicomSegError):
        await writers.write(seg_request(), str(path))


async def test_a_writer_that_dies_is_replaced(writers: ResultWriters) -> None:
    await writers.write(seg_request(), ct_file())
    before = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(WriterUnavailable):
        for _ in range(50):  # the pool sees its process gone at the latest at the next submission
            await writers.write(seg_request(), ct_file())
            await asyncio.sleep(0.1)
    again = await writers.write(seg_request(), ct_file())
    assert again[128:132] == b"DICM"


async def test_a_closed_pool_writes_nothing_and_zero_processes_is_refused() -> None:
    pool = ResultWriters(1)
    pool.close()
    with pytest.raises(WriterUnavailable):
        await pool.write(seg_request(), ct_file())
    with pytest.raises(ValueError, match="processes"):
        ResultWriters(0)


@pytest.mark.parametrize("processes", [0, 1])
async def test_jobs_results_are_the_same_with_and_without_writers(
    pixel_dir: Path, tmp_path: Path, processes: int
) -> None:
    config = settings(pixel_dir, **pacs_settings(tmp_path, jobs_writers=processes))
    source = to_bytes(instance(3))
    async with serve(config) as (app, client):
        writers = app.state.pacs.worker.writers
        assert (writers is None) == (processes == 0)
        assert writers is None or not writers.started  # no process before the first job
        assert (await stow(client, [source])).status_code == 200
        (job,) = await wait_for_jobs(client, {"done", "failed"}, 1)
        assert job["state"] == "done", job
        assert writers is None or writers.started
        segment = await client.post(
            "/segment?format=dicom-seg", content=source, headers={"content-type": "application/dicom"}
        )
    (result,) = sorted((tmp_path / "results").glob("*.dcm"))
    written = pydicom.dcmread(result)
    answered = pydicom.dcmread(pydicom.filebase.DicomBytesIO(segment.content))
    assert written.PixelData == answered.PixelData
    assert [s.SegmentLabel for s in written.SegmentSequence] == [
        s.SegmentLabel for s in answered.SegmentSequence
    ]


def test_writers_die_with_a_killed_service(tmp_path: Path) -> None:
    """A service killed with SIGKILL (no clean-up runs) takes its writer processes with it."""
    script = tmp_path / "service.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, os, signal, sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from app.pacs.writers import ResultWriters

            if __name__ == "__main__":
                writers = ResultWriters(1)
                writers.start()
                while not multiprocessing.active_children():
                    time.sleep(0.05)
                print(*[p.pid for p in multiprocessing.active_children()], flush=True)
                time.sleep(1.0)  # the writer's initializer has run
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    service = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert service.returncode == -signal.SIGKILL, service.stderr
    pids = [int(pid) for pid in service.stdout.split()]
    assert pids and all(gone(pid) for pid in pids)
