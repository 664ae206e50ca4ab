"""Instances, STOW-RS bodies and a served app with the job system, for the in-process PACS tests."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom.dataset import Dataset

from tests.app.helpers import SAFETY_S, random_image
from tests.models.test_dicom import make_dataset

STOW_TYPE = 'multipart/related; type="application/dicom"'


def instance(
    seed: int = 0,
    *,
    study: str | None = None,
    size: tuple[int, int] = (24, 32),
    **attributes: Any,
) -> Dataset:
    """A single-frame 8-bit secondary-capture instance of random pixels (patient data included)."""
    ds = make_dataset(random_image(*size, seed=seed).astype(np.int64), bits_stored=8, **attributes)
    if study is not None:
        ds.StudyInstanceUID = study
    return ds


def stow_body(parts: Sequence[bytes | tuple[bytes, str]], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/related body of ``parts`` (bytes as application/dicom, or (bytes, content type)) and its
    content type."""
    boundary = boundary or uuid.uuid4().hex
    chunks = []
    for part in parts:
        data, content_type = part if isinstance(part, tuple) else (part, "application/dicom")
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'{STOW_TYPE}; boundary="{boundary}"'


async def stow(
    client: httpx.AsyncClient,
    parts: Sequence[bytes | tuple[bytes, str]],
    url: str = "/dicomweb/studies",
    **kw: Any,
) -> httpx.Response:
    body, content_type = stow_body(parts)
    headers = {"content-type": content_type, **kw.pop("headers", {})}
    return await client.post(url, content=body, headers=headers, **kw)


def sequence_uids(body: dict[str, Any], tag: str) -> list[str]:
    """The ReferencedSOPInstanceUIDs of a STOW-RS response's sequence (``00081199`` or ``00081198``)."""
    items = body.get(tag, {}).get("Value", [])
    return [item.get("00081155", {}).get("Value", [""])[0] for item in items]


def failure_reasons(body: dict[str, Any]) -> list[int]:
    return [item["00081197"]["Value"][0] for item in body.get("00081198", {}).get("Value", [])]


async def wait_for_jobs(
    client: httpx.AsyncClient, states: set[str], count: int, **query: str
) -> list[dict[str, Any]]:
    """Polls GET /jobs until ``count`` jobs (matching ``query``) are all in ``states``."""
    for _ in range(int(SAFETY_S / 0.02)):
        listed = (await client.get("/jobs", params={"limit": 1000, **query})).json()["jobs"]
        if len(listed) >= count and all(job["state"] in states for job in listed):
            return listed
        await asyncio.sleep(0.02)
    raise AssertionError(f"jobs never reached {states}: {listed}")


def pacs_settings(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """Job-system settings inside ``tmp``: store, spool and results folder."""
    values: dict[str, Any] = {
        "jobs_db": f"sqlite:///{tmp / 'jobs.sqlite'}",
        "spool_dir": tmp / "spool",
        "results_dir": tmp / "results",
        "delivery_backoff_s": 0.01,
        "delivery_backoff_max_s": 0.05,
    }
    values.update(overrides)
    return values


async def spool_files(folder: Path, expected: int = 0) -> list[str]:
    """The files of a spool folder once there are ``expected`` of them (clean-up runs after a job finishes)."""
    for _ in range(int(SAFETY_S / 0.02)):
        names = sorted(os.listdir(folder))
        if len(names) == expected:
            return names
        await asyncio.sleep(0.02)
    raise AssertionError(f"{folder} holds {names}, not {expected} file(s)")
