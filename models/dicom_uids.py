"""Deterministic UIDs for result objects, so that delivering the same result twice replaces instead of duplicating.

A result's SOP Instance UID is an OID under ``2.25.`` (a UUID as a decimal integer, PS3.5 B.2) derived from the
source SOP Instance UID, the model version and the output kind (``seg``, ``sr``); its series UID from the source
series, the model and its version and the kind, so that every result of one model for one source series lands in
one new series. The UUID is a name-based (version 5) UUID of the parts, in a namespace of MedServe's own.
"""

from __future__ import annotations

import uuid

RESULT_KINDS = ("seg", "sr")
# Fixed for ever: changing it would give every result a new UID, and archives would hold duplicates.
MEDSERVE_NAMESPACE = uuid.UUID("5b0c3a9e-7f1d-5e2a-9c4b-6d8e0f1a2b3c")


def _derived_uid(*parts: str) -> str:
    return "2.25." + str(uuid.uuid5(MEDSERVE_NAMESPACE, "\x1f".join(parts)).int)


def _check_kind(kind: str) -> None:
    if kind not in RESULT_KINDS:
        raise ValueError(f"result kind must be one of {RESULT_KINDS}, got {kind!r}")


def result_instance_uid(source_sop_instance_uid: str, model_version: str, kind: str) -> str:
    """The SOP Instance UID of the ``kind`` result of model ``model_version`` for one source instance.

    Raises:
        ValueError: an unknown kind or an empty source UID or version.
    """
    _check_kind(kind)
    if not source_sop_instance_uid or not model_version:
        raise ValueError("a result UID needs the source SOP Instance UID and the model version")
    return _derived_uid("instance", source_sop_instance_uid, model_version, kind)


def result_series_uid(source_series_instance_uid: str, model_name: str, model_version: str, kind: str) -> str:
    """The Series Instance UID of the series that holds a model's ``kind`` results for one source series.

    Raises:
        ValueError: an unknown kind or an empty source series UID, model name or version.
    """
    _check_kind(kind)
    if not source_series_instance_uid or not model_name or not model_version:
        raise ValueError("a result series UID needs the source series UID, the model name and its version")
    return _derived_uid("series", source_series_instance_uid, model_name, model_version, kind)
