"""PACS throughput: instances in by STOW-RS and by storescu, jobs drained into a real Orthanc, beside ``/segment``.

One run starts a real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, loopback ports, a temporary storage
folder) and MedServe as a real process (``python -m training serve``) with one U-Net, delivering its results to
Orthanc by STOW-RS and listening for DICOM on a free port. Then, in this order:

1. ``/segment`` (HTTP path, no jobs in the system): ``--instances`` requests of the same CT instances (DICOM
   bodies), ``--concurrency`` at a time; images/s for the PNG answer and for ``format=dicom-seg`` (the work a
   job does, minus the delivery).
   Every path also reports the CPU milliseconds per instance the service (its child processes included: the
   DICOM node, the result writers) and Orthanc spent (``/proc``).
2. STOW-RS (after one job that pays for lazy set-up, as the first HTTP request does): the same number of new
   instances in requests of ``--per-request``; instances/s accepted (the time
   of the requests alone), jobs/s processed (instances / the time from the first request to the last result
   stored in Orthanc) and the latency of each instance from its acceptance (its STOW-RS answer) to its SEG
   being stored in Orthanc (first seen in Orthanc's ``/changes``, polled every 50 ms).
3. storescu: ``--instances`` more through MedServe's DICOM port (one association); instances/s accepted and
   jobs/s drained the same way.
4. A 50-instance STOW-RS request of about 10 MB (``--big-size`` pixels square, 16-bit), ``--repeats`` times,
   each with new instances, after the jobs before it have drained: the service's seconds per request, and per
   10 MB. The time is measured by the client over loopback: it includes the upload and the answer, so the
   service's own time is at most that.

Goals (issue 18): jobs drain at >= 0.9x the HTTP path's throughput, and accepting 50 instances takes < 1 s
per 10 MB. The machine is whatever runs the script: on a shared CPU the numbers move from run to run; the
ratios, measured in the same run, are what the goals are about.

    python benchmarks/bench_pacs.py                                  # 100 instances of 256 x 256
    python benchmarks/bench_pacs.py --instances 200 --size 512 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmarks/, the script's own folder
from bench_layout import environment  # noqa: E402
from service_process import RESULTS, Service, free_port, percentile  # noqa: E402

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint  # noqa: E402
from models.dicom_uids import result_instance_uid  # noqa: E402
from models.preprocessing import Preprocessing  # noqa: E402
from models.unet import UNet  # noqa: E402
from tests.components import find_program  # noqa: E402
from tests.pacs.orthanc import DICOMWEB_PLUGIN, Orthanc  # noqa: E402
from tests.pacs.sources import ct_dataset, part10  # noqa: E402

MB10 = 10 * 1000 * 1000
DIMSE_CALLER = "BENCH"
GOAL_DRAIN_RATIO = 0.9
GOAL_ACCEPT_S_PER_10MB = 1.0


# ---- inputs -----------------------------------------------------------------------------------------------------


def build_model(folder: Path, channels: list[int], tile: int) -> Path:
    """A random-weight U-Net (``unet.pt``): the speed of a real one of the same size."""
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": channels}
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        folder / "unet.pt",
        UNet(**args).eval(),
        CheckpointMetadata(
            task="segmentation",
            architecture=Architecture(name="unet", args=args),
            classes=["background", "lesion"],
            preprocessing=Preprocessing(in_channels=1, img_size=(tile, tile)),
        ),
    )
    return folder


class Instances:
    """CT instances of ``size`` x ``size`` 16-bit pixels (pydicom's CT with new pixels and UIDs), one study."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.base = ct_dataset()
        self.study = pydicom.uid.generate_uid()
        self.count = 0

    def make(self, n: int) -> list[tuple[str, bytes]]:
        """``n`` new instances: (SOP Instance UID, Part 10 bytes)."""
        out = []
        for _ in range(n):
            ds = copy.deepcopy(self.base)
            self.count += 1
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID = self.study
            ds.InstanceNumber = self.count
            ds.Rows = ds.Columns = self.size
            yy, xx = np.mgrid[: self.size, : self.size]
            cy, cx = self.rng.integers(self.size // 4, 3 * self.size // 4, 2)
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (self.size // 5) ** 2) * 600
            pixels = self.rng.normal(200, 60, (self.size, self.size)) + disc
            ds.PixelData = np.clip(pixels, -1000, 3000).astype(np.int16).tobytes()
            out.append((str(ds.SOPInstanceUID), part10(ds)))
        return out


def stow_body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
    )
    return (
        body + f"--{boundary}--\r\n".encode(),
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counts(base: str) -> tuple[int, int]:
    """(batches, requests) the service's batchers ran so far (``GET /models``)."""
    with httpx.Client(timeout=30.0) as client:
        models = client.get(f"{base}/models").json()["models"]
    stats = [model.get("stats") or {} for model in models]
    return sum(s.get("batches", 0) for s in stats), sum(s.get("requests", 0) for s in stats)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc): the service's DICOM node and result writers."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


class CpuMeter:
    """CPU seconds the service (with its child processes: the DICOM node, the result writers) and Orthanc spend
    between ``start()`` and ``stop()``, per instance, and the mean size of the model batches run meanwhile."""

    def __init__(self, service: Service, orthanc: Orthanc) -> None:
        assert orthanc.process is not None
        self.base = service.base
        self.service_pid = service.pid
        self.orthanc_pid = orthanc.process.pid
        self.before: dict[int, float] = {}
        self.batches_before = (0, 0)

    def _service_pids(self) -> list[int]:
        return [self.service_pid, *descendants(self.service_pid)]

    def start(self) -> CpuMeter:
        self.before = {pid: cpu_seconds(pid) for pid in [*self._service_pids(), self.orthanc_pid]}
        self.batches_before = batch_counts(self.base)
        return self

    def _spent(self, pids: list[int]) -> float:
        # a child started meanwhile counts from 0; one that exited meanwhile is lost (none do in a run)
        return sum(cpu_seconds(pid) - self.before.get(pid, 0.0) for pid in pids)

    def per_instance(self, instances: int) -> dict[str, float]:
        service_pids = self._service_pids()
        figures = {
            "service_cpu_ms_per_instance": 1000.0 * self._spent(service_pids) / instances,
            "service_children_cpu_ms_per_instance": 1000.0 * self._spent(service_pids[1:]) / instances,
            "orthanc_cpu_ms_per_instance": 1000.0 * self._spent([self.orthanc_pid]) / instances,
        }
        batches, requests = batch_counts(self.base)
        batches -= self.batches_before[0]
        requests -= self.batches_before[1]
        figures["mean_batch_size"] = requests / batches if batches else 0.0
        return figures


# ---- watching Orthanc ---------------------------------------------------------------------------------------------


class ArchiveWatch:
    """Polls Orthanc's ``/changes`` in a thread; records when each new instance was first seen."""

    def __init__(self, orthanc: Orthanc, every_s: float = 0.05) -> None:
        self.orthanc = orthanc
        self.every_s = every_s
        self.seen: dict[str, float] = {}  # Orthanc id -> monotonic time first seen
        self.since = self._last()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _last(self) -> int:
        return int(self.orthanc.get_json("/changes?last")["Last"])

    def _run(self) -> None:
        with self.orthanc.client() as client:
            while not self._stop.is_set():
                answer = client.get("/changes", params={"since": self.since, "limit": 1000}).json()
                now = time.monotonic()
                with self._lock:
                    for change in answer["Changes"]:
                        if change["ChangeType"] == "NewInstance":
                            self.seen.setdefault(change["ID"], now)
                self.since = int(answer["Last"])
                if answer.get("Done", True):
                    self._stop.wait(self.every_s)

    def start(self) -> ArchiveWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def wait_for(self, n: int, deadline_s: float, service: Service) -> None:
        end = time.monotonic() + deadline_s
        while self.count() < n:
            if time.monotonic() > end:
                raise RuntimeError(f"only {self.count()} of {n} results in Orthanc after {deadline_s:.0f} s")
            if service.process.poll() is not None:
                raise RuntimeError(f"the service exited; see {service.log_path}")
            time.sleep(0.05)

    def by_sop_uid(self) -> dict[str, float]:
        """SOP Instance UID -> time first seen, for every instance seen (resolved after the timing)."""
        with self.orthanc.client() as client:
            return {
                client.get(f"/instances/{oid}").json()["MainDicomTags"]["SOPInstanceUID"]: t
                for oid, t in self.seen.items()
            }


# ---- the phases -------------------------------------------------------------------------------------------------


def http_throughput(base: str, bodies: list[bytes], concurrency: int, query: str) -> dict[str, Any]:
    """``/segment{query}`` for every body, ``concurrency`` at a time: images/s and latency percentiles."""
    latencies: list[float] = []

    def one(client: httpx.Client, body: bytes) -> None:
        started = time.monotonic()
        response = client.post(
            f"{base}/segment{query}", content=body, headers={"content-type": "application/dicom"}
        )
        response.raise_for_status()
        latencies.append(time.monotonic() - started)

    with httpx.Client(timeout=300.0) as client:
        one(client, bodies[0])  # the first request pays for lazy set-up
        latencies.clear()
        started = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda body: one(client, body), bodies))
        elapsed = time.monotonic() - started
    return {
        "endpoint": f"/segment{query}",
        "images": len(bodies),
        "concurrency": concurrency,
        "seconds": elapsed,
        "images_per_s": len(bodies) / elapsed,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
    }


def model_choices(base: str) -> tuple[Any, Any]:
    """The runtime and the largest batch the service chose for the model at load (``GET /models``): a run's speed
    depends on both."""
    with httpx.Client(timeout=30.0) as client:
        model = client.get(f"{base}/models").json()["models"][0]
    return model.get("runtime"), (model.get("batch_autotune") or {}).get(
        "chosen", model.get("max_batch_size")
    )


def model_version(base: str) -> str:
    with httpx.Client(timeout=30.0) as client:
        jobs = client.get(f"{base}/jobs", params={"limit": 1}).json()["jobs"]
    return str(jobs[0]["model_version"])


def drained(
    label: str,
    sent: list[tuple[str, float]],
    started: float,
    accept_s: float,
    watch: ArchiveWatch,
    version: str,
) -> dict[str, Any]:
    """Acceptance and drain figures of ``sent`` ((SOP Instance UID, time accepted)), timed from ``started``."""
    seen = watch.by_sop_uid()
    latencies = []
    stored_at = []
    for uid, accepted_at in sent:
        t = seen.get(result_instance_uid(uid, version, "seg"))
        if t is None:
            raise RuntimeError(f"{label}: the result of {uid} was not seen in Orthanc")
        latencies.append(t - accepted_at)
        stored_at.append(t)
    drain_s = max(stored_at) - started
    return {
        "path": label,
        "instances": len(sent),
        "accept_seconds": accept_s,
        "accepted_per_s": len(sent) / accept_s,
        "drain_seconds": drain_s,
        "jobs_per_s": len(sent) / drain_s,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies),
    }


def stow_phase(
    base: str, instances: list[tuple[str, bytes]], per_request: int, watch: ArchiveWatch, service: Service
) -> tuple[list[tuple[str, float]], float, float]:
    """Sends ``instances`` by STOW-RS; returns ((uid, time accepted) per instance, start time, seconds spent
    in the requests)."""
    sent: list[tuple[str, float]] = []
    in_requests = 0.0
    before = watch.count()
    started = time.monotonic()
    with httpx.Client(timeout=600.0) as client:
        for i in range(0, len(instances), per_request):
            chunk = instances[i : i + per_request]
            body, content_type = stow_body([data for _, data in chunk])
            t0 = time.monotonic()
            response = client.post(
                f"{base}/dicomweb/studies", content=body, headers={"content-type": content_type}
            )
            t1 = time.monotonic()
            if response.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:500]}")
            in_requests += t1 - t0
            sent += [(uid, t1) for uid, _ in chunk]
    watch.wait_for(before + len(instances), 1800.0, service)
    return sent, started, in_requests


def storescu_phase(
    storescu: str,
    port: int,
    instances: list[tuple[str, bytes]],
    folder: Path,
    watch: ArchiveWatch,
    service: Service,
) -> tuple[list[tuple[str, float]], float, float]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (_, data) in enumerate(instances):
        path = folder / f"{index:05d}.dcm"
        path.write_bytes(data)
        files.append(str(path))
    before = watch.count()
    accepted: list[float] = []
    started = time.monotonic()
    # -v: one "Received Store Response" line per instance, answered after the intake spooled it
    process = subprocess.Popen(
        [storescu, "-v", "-aet", DIMSE_CALLER, "-aec", "MEDSERVE", "127.0.0.1", str(port), *files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        if "Received Store Response (Success)" in line:
            accepted.append(time.monotonic())
        tail = [*tail, line][-20:]
    done = time.monotonic()
    if process.wait() != 0 or len(accepted) != len(instances):
        raise RuntimeError(f"storescu failed ({process.returncode}, {len(accepted)} stored): {''.join(tail)}")
    watch.wait_for(before + len(instances), 1800.0, service)
    return [(uid, t) for (uid, _), t in zip(instances, accepted, strict=True)], started, done - started


def big_requests(
    base: str, maker: Instances, repeats: int, watch: ArchiveWatch, service: Service
) -> dict[str, Any]:
    """A 50-instance STOW-RS request of about 10 MB, ``repeats`` times, each after the previous jobs drained."""
    rows = []
    with httpx.Client(timeout=600.0) as client:
        for _ in range(repeats):
            chunk = maker.make(50)
            body, content_type = stow_body([data for _, data in chunk])
            before = watch.count()
            t0 = time.monotonic()
            response = client.post(
                f"{base}/dicomweb/studies", content=body, headers={"content-type": content_type}
            )
            elapsed = time.monotonic() - t0
            if response.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:500]}")
            rows.append({"bytes": len(body), "seconds": elapsed, "s_per_10mb": elapsed * MB10 / len(body)})
            watch.wait_for(before + 50, 1800.0, service)
    return {
        "instances_per_request": 50,
        "pixels": f"{maker.size}x{maker.size} int16",
        "request_mb": statistics.mean(r["bytes"] for r in rows) / 1e6,
        "median_seconds": statistics.median(r["seconds"] for r in rows),
        "median_s_per_10mb": statistics.median(r["s_per_10mb"] for r in rows),
        "max_s_per_10mb": max(r["s_per_10mb"] for r in rows),
        "repeats": rows,
    }


# ---- report -------------------------------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\nPACS throughput ({report['instances']} instances of {report['size']}x{report['size']}, model {report['model']})"
    )
    print(f"runtime chosen at load: {report['runtime']['chosen']}; largest batch: {report['max_batch']}")
    print(
        f"{'path':<28}{'in/s':>9}{'jobs/s':>9}{'p50 s':>9}{'p95 s':>9}{'cpu ms':>9}{'in kids':>9}{'orthanc':>9}{'batch':>7}"
    )
    for row in report["http"]:
        print(
            f"{row['endpoint']:<28}{row['images_per_s']:>9.2f}{'':>9}{row['latency_p50_s']:>9.3f}"
            f"{row['latency_p95_s']:>9.3f}{row['service_cpu_ms_per_instance']:>9.1f}"
            f"{row['service_children_cpu_ms_per_instance']:>9.1f}"
            f"{row['orthanc_cpu_ms_per_instance']:>9.1f}{row['mean_batch_size']:>7.1f}"
        )
    for row in report["jobs"]:
        print(
            f"{row['path'] + ' -> Orthanc':<28}{row['accepted_per_s']:>9.2f}{row['jobs_per_s']:>9.2f}"
            f"{row['latency_p50_s']:>9.3f}{row['latency_p95_s']:>9.3f}{row['service_cpu_ms_per_instance']:>9.1f}"
            f"{row['service_children_cpu_ms_per_instance']:>9.1f}"
            f"{row['orthanc_cpu_ms_per_instance']:>9.1f}{row['mean_batch_size']:>7.1f}"
        )
    big = report["stow_50"]
    print(
        f"\n50-instance STOW-RS request ({big['request_mb']:.1f} MB): {big['median_seconds']:.3f} s median, "
        f"{big['median_s_per_10mb']:.3f} s per 10 MB (goal < {GOAL_ACCEPT_S_PER_10MB:g})"
    )
    goals = report["goals"]
    print(
        f"jobs drain / HTTP path writing the same SEG: {goals['drain_ratio']:.2f} (goal >= {GOAL_DRAIN_RATIO}); "
        f"/ the PNG answer: {goals['drain_ratio_png']:.2f}; met: drain {goals['drain_met']}, "
        f"acceptance {goals['accept_met']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=100, help="instances per path (default 100)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument(
        "--per-request", type=int, default=25, help="instances per STOW-RS request (default 25)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent /segment requests (default 8)")
    parser.add_argument("--channels", default="8,16,32", help="U-Net channels (default 8,16,32)")
    parser.add_argument("--tile", type=int, default=64, help="U-Net tile (default 64)")
    parser.add_argument(
        "--big-size", type=int, default=316, help="side of the 10 MB request's images (316: 0.2 MB)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the 10 MB request (default 3)")
    parser.add_argument("--torch-threads", type=int, default=0, help="MEDSERVE_TORCH_THREADS (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_pacs.json")
    args = parser.parse_args(argv)

    orthanc_program = find_program("Orthanc")
    storescu = find_program("storescu")
    if orthanc_program is None or not DICOMWEB_PLUGIN.is_file() or storescu is None:
        print("needs Orthanc, its DICOMweb plugin and dcmtk (apt-get install orthanc orthanc-dicomweb dcmtk)")
        return 2
    channels = [int(c) for c in args.channels.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    orthanc = Orthanc(orthanc_program, workdir / "orthanc")
    service: Service | None = None
    try:
        orthanc.start()
        model_dir = build_model(workdir / "models", channels, args.tile)
        dimse_port = free_port()
        env = {
            "MEDSERVE_PACS_URL": orthanc.dicomweb_url,
            "MEDSERVE_JOBS_DB": f"sqlite:///{workdir / 'jobs.sqlite'}",
            "MEDSERVE_SPOOL_DIR": str(workdir / "spool"),
            "MEDSERVE_DIMSE_PORT": str(dimse_port),
            "MEDSERVE_DIMSE_HOST": "127.0.0.1",
            "MEDSERVE_DIMSE_ALLOWED": f"{DIMSE_CALLER}@127.0.0.1",
            "MEDSERVE_LOG_LEVEL": "warning",
            "MEDSERVE_ACCESS_LOG": "false",
            "MEDSERVE_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
        }
        if args.torch_threads:
            env["MEDSERVE_TORCH_THREADS"] = str(args.torch_threads)
        service = Service(model_dir, workdir / "medserve.log", env)
        asyncio.run(service.wait_ready())
        runtime, max_batch = model_choices(service.base)
        maker = Instances(args.size)
        http_bodies = [data for _, data in maker.make(args.instances)]
        http = []
        for query in ("", "?format=dicom-seg"):
            meter = CpuMeter(service, orthanc).start()
            row = http_throughput(service.base, http_bodies, args.concurrency, query)
            http.append({**row, **meter.per_instance(args.instances)})
        watch = ArchiveWatch(orthanc).start()
        try:
            # As the HTTP path's first request: one job first pays for lazy set-up (the result writers' spawn)
            stow_phase(service.base, maker.make(1), 1, watch, service)
            stow_instances = maker.make(args.instances)
            meter = CpuMeter(service, orthanc).start()
            sent, started, accept_s = stow_phase(
                service.base, stow_instances, args.per_request, watch, service
            )
            cpu = meter.per_instance(args.instances)
            version = model_version(service.base)
            jobs = [{**drained("STOW-RS", sent, started, accept_s, watch, version), **cpu}]
            dimse_instances = maker.make(args.instances)
            meter = CpuMeter(service, orthanc).start()
            sent, started, accept_s = storescu_phase(
                storescu, dimse_port, dimse_instances, workdir / "files", watch, service
            )
            cpu = meter.per_instance(args.instances)
            jobs.append({**drained("storescu (C-STORE)", sent, started, accept_s, watch, version), **cpu})
            big = big_requests(service.base, Instances(args.big_size, seed=1), args.repeats, watch, service)
        finally:
            watch.stop()
        slowest_jobs = min(row["jobs_per_s"] for row in jobs)
        # the HTTP path that writes the same object as a job (a DICOM SEG), and the PNG answer
        drain_ratio = slowest_jobs / http[1]["images_per_s"]
        drain_ratio_png = slowest_jobs / http[0]["images_per_s"]
        report: dict[str, Any] = {
            **environment(torch.device("cpu")),
            "cpus": os.cpu_count(),
            "model": f"unet {args.channels} tile {args.tile}",
            "runtime": runtime,
            "max_batch": max_batch,
            "instances": args.instances,
            "size": args.size,
            "per_request": args.per_request,
            "http": http,
            "jobs": jobs,
            "stow_50": big,
            "goals": {
                "drain_ratio": drain_ratio,
                "drain_compared_with": "/segment?format=dicom-seg",
                "drain_ratio_png": drain_ratio_png,
                "drain_goal": GOAL_DRAIN_RATIO,
                "drain_met": drain_ratio >= GOAL_DRAIN_RATIO,
                "accept_s_per_10mb": big["median_s_per_10mb"],
                "accept_goal_s_per_10mb": GOAL_ACCEPT_S_PER_10MB,
                "accept_met": big["median_s_per_10mb"] < GOAL_ACCEPT_S_PER_10MB,
            },
            "orthanc": orthanc.get_json("/system")["Version"],
        }
    finally:
        if service is not None:
            service.stop()
        orthanc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
