"""Delivering result objects to a REAL Orthanc: STOW-RS to its DICOMweb root and C-STORE to its DICOM port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from app.pacs.delivery import (
    CStoreDelivery,
    DimseDestination,
    RetryPolicy,
    StowDelivery,
    deliver_with_retries,
)
from app.pacs.results import PermanentDeliveryError, ResultObject, TransientDeliveryError
from models.dicom_seg import build_dicom_seg
from tests.pacs.orthanc import Orthanc, orthanc_server
from tests.pacs.sources import SEG_STORAGE, ct_dataset, part10

USER = ("medserve", "delivery-secret")


def seg_result(source: Dataset, *, study: str | None = None) -> ResultObject:
    """A SEG of ``source`` (the pixels above their median as the lesion) as the worker would hand it over."""
    pixels = source.pixel_array
    mask = (pixels > np.median(pixels)).astype(np.uint8)
    data = build_dicom_seg(
        source, mask, ["background", "lesion"], algorithm_name="pixel", algorithm_version="v1"
    )
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    return ResultObject(
        part10=data,
        kind="seg",
        study_instance_uid=study or str(seg.StudyInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        sop_class_uid=str(seg.SOPClassUID),
        job_id=1,
        model="pixel",
    )


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc_server(tmp_path / "orthanc", user=USER) as server:
        yield server


def stow(orthanc: Orthanc, **overrides: str) -> StowDelivery:
    options = {"username": USER[0], "password": USER[1], **overrides}
    return StowDelivery(orthanc.dicomweb_url, timeout_s=10.0, **options)


def segs_in_study(orthanc: Orthanc, study_uid: str) -> list[dict[str, str]]:
    """The SEG instances Orthanc holds in the study ``study_uid`` (found through its REST API)."""
    with orthanc.client() as client:
        response = client.post(
            "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        )
        response.raise_for_status()
        ids = response.json()
    tags = [orthanc.instance_tags(i) for i in ids]
    return [t for t in tags if t.get("SOPClassUID") == SEG_STORAGE]


def test_a_seg_delivered_by_stow_rs_joins_the_source_study(orthanc: Orthanc) -> None:
    source = ct_dataset()
    orthanc.upload(part10(source))
    result = seg_result(source)
    stow(orthanc).deliver(result)
    assert len(orthanc.studies()) == 1  # no new study: the SEG is in the CT's study
    (study,) = orthanc.studies()
    study_info = orthanc.get_json(f"/studies/{study}")
    assert study_info["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID
    assert len(study_info["Series"]) == 2  # the CT series and the new SEG series
    (seg,) = segs_in_study(orthanc, str(source.StudyInstanceUID))
    assert seg["SOPInstanceUID"] == result.sop_instance_uid
    assert seg["SeriesInstanceUID"] == result.series_instance_uid != source.SeriesInstanceUID
    assert len(orthanc.instances()) == 2
    stored = next(i for i in orthanc.instances() if orthanc.instance_tags(i)["SOPClassUID"] == SEG_STORAGE)
    assert orthanc.instance_file(stored) == result.part10  # stored as sent


def test_delivering_the_same_result_twice_leaves_one_instance(orthanc: Orthanc) -> None:
    source = ct_dataset()
    orthanc.upload(part10(source))
    result = seg_result(source)
    delivery = stow(orthanc)
    delivery.deliver(result)
    delivery.deliver(result)
    assert len(segs_in_study(orthanc, str(source.StudyInstanceUID))) == 1
    assert len(orthanc.instances()) == 2


def test_a_stopped_archive_is_transient_and_delivery_works_when_it_is_back(orthanc: Orthanc) -> None:
    source = ct_dataset()
    orthanc.upload(part10(source))
    result = seg_result(source)
    delivery = stow(orthanc)
    orthanc.stop()
    with pytest.raises(TransientDeliveryError, match="cannot reach the archive"):
        delivery.deliver(result)
    waits: list[float] = []

    def wait_and_restart(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            orthanc.start()  # same ports, same storage

    orthanc_was_down = not orthanc.running
    attempts = deliver_with_retries(
        delivery, result.part10, RetryPolicy(max_attempts=5, base_s=0.01, cap_s=0.05), sleep=wait_and_restart
    )
    assert orthanc_was_down and attempts == 3 and len(waits) == 2
    assert len(segs_in_study(orthanc, str(source.StudyInstanceUID))) == 1
    assert len(orthanc.instances()) == 2  # the CT stored before the stop is still there


def test_a_bad_credential_is_permanent_with_the_archive_reason(orthanc: Orthanc) -> None:
    source = ct_dataset()
    with pytest.raises(PermanentDeliveryError, match="HTTP 401 Unauthorized") as caught:
        stow(orthanc, password="wrong").deliver(seg_result(source))
    assert caught.value.reason == str(caught.value)
    assert orthanc.instances() == []


def test_an_object_orthanc_refuses_is_permanent_with_its_reason(orthanc: Orthanc) -> None:
    source = ct_dataset()
    # STOW-RS to another study than the object's: Orthanc answers 409 with the failed instance
    with pytest.raises(PermanentDeliveryError, match="HTTP 409") as caught:
        stow(orthanc).deliver(seg_result(source, study="1.2.826.0.1.3680043.2.1125.1"))
    assert str(caught.value).startswith("STOW-RS answered HTTP 409")
    # an object without a SeriesInstanceUID: 400 with the failed SOP instance and its reason
    broken = ct_dataset()
    del broken.SeriesInstanceUID
    with pytest.raises(PermanentDeliveryError, match=r"HTTP 400.*0xC000: cannot understand"):
        stow(orthanc).deliver_bytes(part10(broken))
    assert orthanc.instances() == []


def test_c_store_delivery_to_orthanc(tmp_path: Path) -> None:
    with orthanc_server(tmp_path / "orthanc", extra={"DicomCheckCalledAet": True}) as orthanc:
        source = ct_dataset()
        orthanc.upload(part10(source))
        result = seg_result(source)
        delivery = CStoreDelivery(DimseDestination.parse(orthanc.dimse_destination), calling_ae="MEDSERVE")
        assert delivery.describe() == f"C-STORE ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        delivery.deliver(result)
        delivery.deliver(result)  # the same UID again: replaced, not duplicated
        (seg,) = segs_in_study(orthanc, str(source.StudyInstanceUID))
        assert seg["SOPInstanceUID"] == result.sop_instance_uid
        assert len(orthanc.studies()) == 1
        # Orthanc checks the called AE title: a wrong one is an association rejection (transient)
        wrong = CStoreDelivery(DimseDestination("NOT-ORTHANC", "127.0.0.1", orthanc.dicom_port))
        with pytest.raises(TransientDeliveryError, match="rejected the association"):
            wrong.deliver(result)
        orthanc.stop()
        with pytest.raises(TransientDeliveryError):
            delivery.deliver(result)


def test_c_store_to_an_archive_that_refuses_the_caller(tmp_path: Path) -> None:
    extra = {"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False}
    with orthanc_server(tmp_path / "orthanc", extra=extra) as orthanc:
        delivery = CStoreDelivery(DimseDestination.parse(orthanc.dimse_destination), calling_ae="UNKNOWN")
        with pytest.raises(
            TransientDeliveryError,
            match=r"ORTHANC@127\.0\.0\.1:\d+ rejected the association \(Rejected Permanent, Calling AE title not recognised\)",
        ):
            delivery.deliver(seg_result(ct_dataset()))
        assert orthanc.instances() == []


def test_several_results_go_in_one_request_and_a_refused_one_fails_alone(orthanc: Orthanc) -> None:
    sources = [ct_dataset() for _ in range(3)]
    study = str(sources[0].StudyInstanceUID)
    for n, source in enumerate(sources):
        source.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7{n}"
    good = [seg_result(source) for source in sources[:2]]
    # the third belongs to another study than the request's URL: Orthanc refuses that part only
    sources[2].StudyInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    broken = seg_result(sources[2], study=study)
    errors = stow(orthanc).deliver_many([*good, broken])
    assert errors[:2] == [None, None]
    assert isinstance(errors[2], PermanentDeliveryError)
    assert errors[2].reason.startswith("STOW-RS answered")
    assert broken.sop_instance_uid in errors[2].reason
    stored = {seg["SOPInstanceUID"] for seg in segs_in_study(orthanc, study)}
    assert stored == {result.sop_instance_uid for result in good}
