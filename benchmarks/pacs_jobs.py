"""The job system's speed beside the HTTP path, in one run, in process (the app driven through ASGI).

For a tiny U-Net (channels 4, 8; 64x64 tiles) and 16-bit 320x320 DICOM instances (200 KiB each):

* ``/segment`` throughput: N DICOM requests, 8 at a time, no jobs running;
* STOW-RS acceptance: N instances in requests of 50 (10 MiB each); the service's time per request, per 10 MB;
* job throughput: from the first job's creation to the last one's delivery (into a results folder), jobs/s,
  and the latency from acceptance to the result stored (median, 95th percentile).

    python benchmarks/pacs_jobs.py            # N = 100; writes benchmarks/results/pacs_jobs.json
    python benchmarks/pacs_jobs.py --n 200
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint  # noqa: E402
from models.preprocessing import Preprocessing  # noqa: E402
from models.unet import UNet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZE = 320
PER_REQUEST = 50


def tiny_unet(folder: Path) -> None:
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": [4, 8]}
    torch.manual_seed(0)
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(64, 64)),
    )
    save_checkpoint(folder / "tiny.pt", UNet(**args).eval(), meta)


def instance(seed: int, study: str) -> bytes:
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, size=(SIZE, SIZE)).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def stow_body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = [
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    ]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _seconds(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


async def run(n: int, work: Path) -> dict[str, Any]:
    models = work / "models"
    models.mkdir()
    tiny_unet(models)
    settings = Settings(
        model_dir=models,
        jobs_db=f"sqlite:///{work / 'jobs.sqlite'}",
        spool_dir=work / "spool",
        results_dir=work / "results",
        batch_autotune=False,
    )
    study = generate_uid()
    instances = [instance(i, study) for i in range(n)]
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.registry.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            limit = asyncio.Semaphore(8)

            async def segment(data: bytes) -> None:
                async with limit:
                    response = await client.post(
                        "/segment", content=data, headers={"content-type": "application/dicom"}
                    )
                    response.raise_for_status()

            await segment(instances[0])  # warm
            started = time.perf_counter()
            await asyncio.gather(*(segment(data) for data in instances))
            http_seconds = time.perf_counter() - started

            stow_seconds, stow_bytes = [], []
            for start in range(0, n, PER_REQUEST):
                body, content_type = stow_body(instances[start : start + PER_REQUEST])
                began = time.perf_counter()
                response = await client.post(
                    "/dicomweb/studies", content=body, headers={"content-type": content_type}
                )
                stow_seconds.append(time.perf_counter() - began)
                stow_bytes.append(len(body))
                assert response.status_code == 200, response.text
            while True:
                jobs = (await client.get("/jobs", params={"limit": 1000})).json()["jobs"]
                if len(jobs) == n and all(job["state"] == "done" for job in jobs):
                    break
                await asyncio.sleep(0.1)
    created = [_seconds(job["created_at"]) for job in jobs]
    finished = [_seconds(job["finished_at"]) for job in jobs]
    job_seconds = max(finished) - min(created)
    latencies = sorted(f - c for c, f in zip(created, finished, strict=True))
    per_10mb = [s / (b / 10e6) for s, b in zip(stow_seconds, stow_bytes, strict=True)]
    return {
        "instances": n,
        "instance_bytes": len(instances[0]),
        "http_segment_per_s": n / http_seconds,
        "stow_requests": len(stow_seconds),
        "stow_request_seconds": stow_seconds,
        "stow_seconds_per_10mb": statistics.median(per_10mb),
        "stow_instances_per_s": sum(min(PER_REQUEST, n - i) for i in range(0, n, PER_REQUEST))
        / sum(stow_seconds),
        "jobs_per_s": n / job_seconds,
        "jobs_vs_http": (n / job_seconds) / (n / http_seconds),
        "latency_to_stored_median_s": statistics.median(latencies),
        "latency_to_stored_p95_s": latencies[int(0.95 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "pacs_jobs.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medserve-pacs-bench-") as work:
        summary = asyncio.run(run(args.n, Path(work)))
    record = {
        "benchmark": "pacs_jobs",
        "command": " ".join(["python", "benchmarks/pacs_jobs.py", *sys.argv[1:]]),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "note": "in process (ASGI), SQLite store, folder sink; the job worker runs while STOW-RS accepts",
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    rows = [
        ("/segment throughput", f"{summary['http_segment_per_s']:.1f} images/s"),
        ("jobs throughput", f"{summary['jobs_per_s']:.1f} jobs/s ({summary['jobs_vs_http']:.2f}x /segment)"),
        (
            "STOW-RS accept",
            f"{summary['stow_seconds_per_10mb']:.2f} s per 10 MB, {summary['stow_instances_per_s']:.0f} inst/s",
        ),
        (
            "acceptance -> stored",
            f"median {summary['latency_to_stored_median_s']:.2f} s, p95 {summary['latency_to_stored_p95_s']:.2f} s",
        ),
    ]
    for name, value in rows:
        print(f"{name:<22} {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
