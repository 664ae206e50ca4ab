"""The intake's share of an instance another process spooled (``Intake.accept_spooled``, ``Spool.receive`` /
``adopt``) and the DICOM node's bridge messages (``app.pacs.dimse_node``), in process: a real SQLite store and
spool, the child's side of the bridge talking to ``answer_message`` directly."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from app.pacs.dimse_node import BYTES, BridgedIntake, answer_message
from app.pacs.intake import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Intake,
    IntakeUnavailable,
    ModelChoice,
    SpooledInstance,
    inspect_instance,
)
from app.pacs.routing import Router
from app.pacs.spool import Spool, SpoolFull
from app.pacs.store import JobStore
from tests.pacs.sources import dx_dataset, part10


class Catalog:
    def __init__(self) -> None:
        self.ready = True

    def loaded(self) -> bool:
        return self.ready

    def choices(self) -> list[ModelChoice]:
        return [ModelChoice("lungs", "v1", "segmentation", ready=True, has_result=True)]


@dataclasses.dataclass
class Parts:
    intake: Intake
    spool: Spool
    store: JobStore
    catalog: Catalog
    observed: list[tuple[str, str]]


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    spool = Spool(tmp_path / "spool")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    catalog = Catalog()
    observed: list[tuple[str, str]] = []
    intake = Intake(store, spool, Router(), catalog, on_accept=lambda s, o: observed.append((s, o)))
    try:
        yield Parts(intake, spool, store, catalog, observed)
    finally:
        store.close()
        spool.close()


def instance(seed: int = 0) -> bytes:
    return part10(dx_dataset(32, seed=seed))


def spooled_by_helper(spool_root: Path, data: bytes) -> SpooledInstance:
    """What the DICOM node does: check, write with a spool of its own (``owner=False``)."""
    found = inspect_instance(data)
    path, previous = Spool(spool_root, owner=False).receive(found.sop_instance_uid, data)
    return SpooledInstance(found, str(path), len(data), previous)


class DirectBridge(BridgedIntake):
    """The child's side of the bridge with the socket left out: each message goes to ``answer_message``."""

    def __init__(self, intake: Any, spool: Spool | None) -> None:
        super().__init__("", b"", spool)
        self.target = intake
        self.sent: list[bytes] = []

    def _ask(self, message: bytes) -> dict[str, Any]:
        self.sent.append(message[:1])
        return answer_message(self.target, message)


# ---- the spool ------------------------------------------------------------------------------------------------


def test_a_helper_spool_leaves_the_service_files_and_counts_nothing(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    owner = Spool(root, max_bytes=1000)
    partial = owner.instances / ".1.2.3.dcm.someone.0.partial"  # a write of the service in progress
    partial.write_bytes(b"x")
    helper = Spool(root, owner=False)
    path, previous = helper.receive("1.2.3", b"y" * 600)
    assert partial.exists() and path.read_bytes() == b"y" * 600 and previous is None
    assert owner.used_bytes == 0  # the owner counts it only when told
    owner.adopt(600, previous)
    assert owner.used_bytes == 600
    with pytest.raises(SpoolFull):
        owner.adopt(500, None)  # 1100 > 1000: refused, nothing counted
    assert owner.used_bytes == 600
    _, previous = helper.receive("1.2.3", b"z" * 700)  # a new copy replaces the old one
    assert previous == 600
    owner.adopt(700, previous)
    assert owner.used_bytes == 700
    owner.delete_uncounted(path)
    assert not path.exists() and owner.used_bytes == 700
    assert Spool(root).used_bytes == 0 and not partial.exists()  # a new owner cleans up and counts the disk


def test_the_service_own_writes_still_count_and_refuse(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    path, existed = spool.put_instance("1.2.3", b"a" * 800)
    assert not existed and spool.used_bytes == 800
    with pytest.raises(SpoolFull):
        spool.put_instance("1.2.4", b"b" * 300)
    assert not spool.instance_path("1.2.4").exists() and spool.used_bytes == 800
    _, existed = spool.put_instance("1.2.3", b"c" * 900)  # replacing: only the difference counts
    assert existed and spool.used_bytes == 900
    spool.delete(path)
    assert spool.used_bytes == 0


# ---- Intake.accept_spooled -----------------------------------------------------------------------------------


def test_a_spooled_instance_is_counted_recorded_and_routed(parts: Parts) -> None:
    data = instance()
    spooled = spooled_by_helper(parts.spool.root, data)
    result = parts.intake.accept_spooled(spooled, "dimse")
    assert result.accepted and not result.duplicate and len(result.job_ids) == 1
    job = parts.store.get(result.job_ids[0])
    assert job is not None and job["state"] == "queued" and job["model"] == "lungs"
    assert parts.spool.used_bytes == len(data)
    again = parts.intake.accept_spooled(spooled_by_helper(parts.spool.root, data), "dimse")
    assert again.accepted and again.duplicate and again.job_ids == result.job_ids
    assert parts.spool.used_bytes == len(data)  # the same bytes replaced
    assert parts.observed == [("dimse", "accepted"), ("dimse", "duplicate")]
    # and it round-trips through the bridge's JSON
    assert SpooledInstance.from_json(spooled.to_json()) == spooled


def test_over_the_spool_limit_a_spooled_instance_is_refused_and_deleted(parts: Parts) -> None:
    data = instance()
    parts.spool.max_bytes = len(data) - 1
    spooled = spooled_by_helper(parts.spool.root, data)
    result = parts.intake.accept_spooled(spooled, "dimse")
    assert not result.accepted and result.failure_reason == OUT_OF_RESOURCES
    assert "MEDSERVE_SPOOL_MAX_BYTES" in result.detail
    assert not Path(spooled.path).exists() and parts.spool.used_bytes == 0
    assert parts.store.counts().get("queued", 0) == 0
    assert parts.observed == [("dimse", "refused")]


def test_a_refused_copy_of_a_known_instance_keeps_the_file(parts: Parts) -> None:
    source = dx_dataset(32)
    data = part10(source)
    first = parts.intake.accept_spooled(spooled_by_helper(parts.spool.root, data), "dimse")
    assert first.accepted
    parts.spool.max_bytes = len(data)
    larger = dx_dataset(48)  # the same instance with more pixels: over the limit
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(larger, keyword, getattr(source, keyword))
    larger.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    bigger = part10(larger)
    spooled = spooled_by_helper(parts.spool.root, bigger)
    assert spooled.previous == len(data)
    refused = parts.intake.accept_spooled(spooled, "dimse")
    assert not refused.accepted and refused.failure_reason == OUT_OF_RESOURCES
    assert Path(spooled.path).exists()  # its job still needs it


def test_a_spooled_instance_is_not_taken_while_models_load_or_from_elsewhere(
    parts: Parts, tmp_path: Path
) -> None:
    spooled = spooled_by_helper(parts.spool.root, instance())
    parts.catalog.ready = False
    with pytest.raises(IntakeUnavailable):
        parts.intake.accept_spooled(spooled, "dimse")
    parts.catalog.ready = True
    elsewhere = spooled_by_helper(tmp_path / "other", instance())
    with pytest.raises(ValueError, match="elsewhere"):
        parts.intake.accept_spooled(elsewhere, "dimse")
    with pytest.raises(ValueError, match="source"):
        parts.intake.accept_spooled(spooled, "fax")
    assert parts.store.counts().get("queued", 0) == 0


# ---- the bridge: the child's side and the service's answers ---------------------------------------------------


def test_the_child_spools_and_the_service_records(parts: Parts) -> None:
    bridge = DirectBridge(parts.intake, Spool(parts.spool.root, owner=False))
    data = instance()
    result = bridge.accept_bytes(data, "dimse")
    assert result.accepted and bridge.sent == [b"S"]
    uid = str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID)
    assert parts.spool.instance_path(uid).read_bytes() == data
    assert parts.store.counts()["queued"] == 1
    assert parts.spool.used_bytes == len(data)


def test_an_instance_the_child_refuses_is_counted_by_the_service(parts: Parts) -> None:
    bridge = DirectBridge(parts.intake, Spool(parts.spool.root, owner=False))
    result = bridge.accept_bytes(instance()[:200], "dimse")  # truncated
    assert not result.accepted and result.failure_reason == CANNOT_UNDERSTAND
    assert bridge.sent == [b"R"] and parts.observed == [("dimse", "refused")]
    assert list(parts.spool.instances.iterdir()) == []


def test_what_the_service_cannot_take_is_deleted_by_the_child(parts: Parts) -> None:
    bridge = DirectBridge(parts.intake, Spool(parts.spool.root, owner=False))
    parts.catalog.ready = False
    with pytest.raises(IntakeUnavailable):
        bridge.accept_bytes(instance(), "dimse")
    bridge.target = None  # no job system at all
    with pytest.raises(IntakeUnavailable):
        bridge.accept_bytes(instance(seed=1), "dimse")
    assert list(parts.spool.instances.iterdir()) == []
    assert parts.store.counts().get("queued", 0) == 0


def test_without_a_spool_the_bytes_cross(parts: Parts) -> None:
    bridge = DirectBridge(parts.intake, None)
    assert bridge.accept_bytes(instance(), "dimse").accepted
    assert bridge.sent == [BYTES]
    assert parts.store.counts()["queued"] == 1


def test_an_unknown_message_is_an_error() -> None:
    assert answer_message(None, b"Xjunk") == {"error": "the intake failed"}
