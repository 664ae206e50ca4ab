from __future__ import annotations

import pytest
from pydicom.uid import UID

from models.dicom_uids import result_instance_uid, result_series_uid

SOURCE = "1.2.826.0.1.3680043.8.498.1"


def test_the_same_inputs_give_the_same_valid_2_25_uid() -> None:
    first = result_instance_uid(SOURCE, "abc123", "seg")
    assert first == result_instance_uid(SOURCE, "abc123", "seg")
    assert first.startswith("2.25.")
    assert UID(first).is_valid


def test_source_version_and_kind_each_change_the_uid() -> None:
    uids = {
        result_instance_uid(SOURCE, "abc123", "seg"),
        result_instance_uid(SOURCE + "1", "abc123", "seg"),
        result_instance_uid(SOURCE, "abc124", "seg"),
        result_instance_uid(SOURCE, "abc123", "sr"),
        result_series_uid(SOURCE, "dental", "abc123", "seg"),
        result_series_uid(SOURCE, "chest", "abc123", "seg"),
    }
    assert len(uids) == 6


@pytest.mark.parametrize("kind", ["png", ""])
def test_unknown_kind_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="kind"):
        result_instance_uid(SOURCE, "v", kind)


def test_missing_parts_are_refused() -> None:
    with pytest.raises(ValueError):
        result_instance_uid("", "v", "seg")
    with pytest.raises(ValueError):
        result_series_uid(SOURCE, "", "v", "sr")
