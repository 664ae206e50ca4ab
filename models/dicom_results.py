"""DICOM result objects (SEG, SR) described apart from their source image, so that another process can write them.

A ``ResultRequest`` holds everything a writer needs but the source image: the kind and the writer's other
arguments (a label mask or the probabilities, the classes, the model, the UIDs): small, picklable, and free of
patient data. ``build_result`` writes it for a source ``Dataset`` (or ``DicomRef``) in hand;
``build_result_from_file`` reads the source from a DICOM file first, which is how the job system's writer
processes (``app.pacs.writers``) write the result of a spooled instance without the service's interpreter lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pydicom
from pydicom.dataset import Dataset

from models.dicom_seg import build_dicom_seg
from models.dicom_sr import build_dicom_sr
from models.image_base import DicomRef

ResultKind = Literal["seg", "sr"]


@dataclass(frozen=True)
class ResultRequest:
    """A result to write: ``kind`` picks the writer (``seg``: ``build_dicom_seg``, ``sr``: ``build_dicom_sr``),
    ``args`` and ``kwargs`` are its arguments after the source image."""

    kind: ResultKind
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def build_result(request: ResultRequest, source: DicomRef | Dataset) -> bytes:
    """The result as DICOM Part 10 bytes.

    Raises:
        models.dicom_seg.DicomSegError / models.dicom_sr.DicomSrError: a source the result cannot reference.
    """
    writer = build_dicom_seg if request.kind == "seg" else build_dicom_sr
    return writer(source, *request.args, **request.kwargs)


def build_result_from_file(request: ResultRequest, path: str) -> bytes:
    """``build_result`` for the source image stored at ``path`` (a DICOM Part 10 file)."""
    return build_result(request, pydicom.dcmread(path))
