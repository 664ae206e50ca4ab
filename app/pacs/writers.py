"""The job system's result writers: processes that write its DICOM results (SEG, SR) beside the service.

Writing a DICOM object with highdicom is pure Python: about a third of a job's CPU time, and the largest share of
the time a job holds the service's interpreter lock (``py-spy --gil``), which the HTTP requests, the intake and
the model's thread need too. With ``MEDSERVE_JOBS_WRITERS`` > 0 (default 1), a job's result is written in one of
that many processes (a ``ProcessPoolExecutor``, spawned: nothing of the service's threads is inherited): the
service sends the result's ``models.dicom_results.ResultRequest`` (the mask or the probabilities, the classes,
the model and the UIDs; no patient data) and the spooled instance's path, the writer reads the instance and
returns the Part 10 bytes. The writers start with the worker's first jobs. The object is the one
``/segment?format=dicom-seg`` (or ``/classify?format=dicom-sr``) writes for the same instance. Writers run at a lower scheduling priority, so that on a busy CPU interactive
requests go first. 0 writes results in the service's threads, as interactive requests do.

A writer process that dies takes its results with it (``BrokenProcessPool``): the pool is started again and
those results are written in the service's threads instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from app.pacs.children import die_with_parent
from models.dicom_results import ResultRequest, build_result_from_file

logger = logging.getLogger("medserve.pacs.writers")

WRITER_NICENESS = 5  # as the service's decoding threads (app.main.IO_THREAD_NICENESS)


def _init_writer(parent: int) -> None:
    if not die_with_parent(parent):
        os._exit(1)  # the service is gone already
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(WRITER_NICENESS)


def _warm_up() -> None:
    """Imports what the writers use (highdicom's import alone takes 0.3 s), before the first result needs it."""
    import highdicom  # noqa: F401


class WriterUnavailable(Exception):
    """The writer processes failed on this result (one died); write it otherwise."""


class ResultWriters:
    """``processes`` writer processes: ``start`` spawns and warms them up in the background (else the first
    result does), ``close`` stops them."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise WriterUnavailable("the result writers are shut down")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_writer,
                    initargs=(os.getpid(),),
                )
            return self._pool

    @property
    def started(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        """Spawns the writers and warms them up, once (the worker calls it when it takes its first jobs: a
        service that never gets any spends no process on them)."""
        with self._lock:
            if self._pool is not None or self._closed:
                return
        pool = self._executor()
        for _ in range(self.processes):
            pool.submit(_warm_up)

    async def write(self, request: ResultRequest, source_path: str) -> bytes:
        """The result's Part 10 bytes, written in a writer process from the DICOM file at ``source_path``.

        Raises:
            WriterUnavailable: the pool broke (a writer died) or is shut down.
            models.dicom_seg.DicomSegError / models.dicom_sr.DicomSrError: the writer's refusal.
            OSError: the source file cannot be read.
        """
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, build_result_from_file, request, source_path
            )
        except BrokenProcessPool as exc:
            logger.error("a result writer process died; starting them again")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise WriterUnavailable("a result writer process died") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
