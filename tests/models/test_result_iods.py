"""dicom3tools' ``dciodvfy`` finds no error in the SEG and SR results for CT, DX and CR sources (warnings allowed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.dicom_seg import build_dicom_seg
from models.dicom_sr import build_dicom_sr
from tests.models.dicom_sources import SOURCE_KINDS, dciodvfy, part10, source_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom")


def square_mask(rows: int, columns: int) -> np.ndarray:
    mask = np.zeros((rows, columns), dtype=np.int64)
    mask[rows // 4 : rows // 2, columns // 4 : columns // 2] = 1
    mask[rows // 2 :, columns // 2 :] = 2
    return mask


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_the_sources_themselves_are_valid(kind: str, tmp_path: Path) -> None:
    errors, _ = dciodvfy(part10(source_dataset(kind)), tmp_path)
    assert errors == []


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_seg_of_each_source_kind_has_no_iod_error(kind: str, tmp_path: Path) -> None:
    source = source_dataset(kind)
    seg = build_dicom_seg(
        source,
        square_mask(source.Rows, source.Columns),
        ["background", "lung", "heart"],
        algorithm_name="chest",
    )
    errors, _ = dciodvfy(seg, tmp_path)
    assert errors == []


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_sr_of_each_source_kind_has_no_iod_error(kind: str, tmp_path: Path) -> None:
    sr = build_dicom_sr(
        source_dataset(kind),
        {"normal": 0.125, "pneumonia": 0.75, "effusion": 0.125},
        model_name="chest-xray",
        model_version="0a1b2c3d",
    )
    errors, _ = dciodvfy(sr, tmp_path)
    assert errors == []


def test_dciodvfy_does_report_the_projection_seg_error_it_is_used_to_catch(tmp_path: Path) -> None:
    """The check can fail: a DX SEG without Patient Orientation is what dciodvfy reported before the fix."""
    source = source_dataset("DX")
    mask = square_mask(source.Rows, source.Columns) % 2
    seg = pydicom.dcmread(io.BytesIO(build_dicom_seg(source, mask, ["background", "lung"])))
    assert list(seg.PatientOrientation) == ["L", "F"]
    del seg.PatientOrientation
    errors, _ = dciodvfy(part10(seg), tmp_path)
    assert any("PatientOrientation" in line for line in errors), errors
