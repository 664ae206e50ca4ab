"""Pulling a study from the archive: QIDO-RS lists its instances, WADO-RS retrieves each (``dicomweb-client``).

``MEDSERVE_PACS_URL`` is the archive's DICOMweb root (e.g. Orthanc's ``http://orthanc:8042/dicom-web``);
``MEDSERVE_PACS_USERNAME`` / ``MEDSERVE_PACS_PASSWORD`` add HTTP basic authentication. Every retrieved
instance goes through the intake (source ``pull``) exactly as a STOW-RS part would, one after the other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from app.errors import NotReady, retry_after
from app.pacs.intake import OUT_OF_RESOURCES, AcceptResult, IntakeUnavailable
from app.pacs.problems import ArchiveError, PacsNotConfigured, SpoolFullProblem, StudyNotFound
from app.pacs.service import PacsService
from app.settings import Settings

logger = logging.getLogger("medserve.pacs.pull")

SOP_INSTANCE_UID = "00080018"
SERIES_INSTANCE_UID = "0020000E"


def archive_client(settings: Settings) -> DICOMwebClient:
    """A DICOMweb client of ``MEDSERVE_PACS_URL`` with its credentials.

    Raises:
        PacsNotConfigured: no URL is set.
    """
    if not settings.pacs_url:
        raise PacsNotConfigured("no archive is configured: set MEDSERVE_PACS_URL to its DICOMweb root")
    if settings.pacs_username is not None and settings.pacs_password is not None:
        session = create_session_from_user_pass(
            settings.pacs_username, settings.pacs_password.get_secret_value()
        )
    else:
        session = create_session()
    return DICOMwebClient(url=settings.pacs_url.rstrip("/"), session=session)


def _first(attributes: dict[str, Any], tag: str) -> str | None:
    values = attributes.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def _archive_error(exc: Exception, what: str) -> ArchiveError | StudyNotFound:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 404:
            return StudyNotFound(f"the archive has no {what}")
        return ArchiveError(f"the archive answered {status} to {what}")
    return ArchiveError(f"the archive cannot be reached for {what} ({type(exc).__name__})")


def pull_blocking(pacs: PacsService, study: str, series: str | None) -> list[AcceptResult]:
    """Lists and retrieves the instances and accepts each (blocking; run it in a thread).

    Raises:
        PacsNotConfigured, StudyNotFound, ArchiveError: as their names say.
        IntakeUnavailable: models are still loading.
    """
    client = archive_client(pacs.settings)
    what = f"series {series} of study {study}" if series else f"study {study}"
    try:
        found = client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series, get_remaining=True
        )
    except Exception as exc:
        raise _archive_error(exc, f"the search for {what}") from exc
    if not found:
        raise StudyNotFound(f"the archive has no instance of {what}")
    results = []
    for attributes in found:
        sop = _first(attributes, SOP_INSTANCE_UID)
        series_uid = series or _first(attributes, SERIES_INSTANCE_UID)
        if sop is None or series_uid is None:
            results.append(
                AcceptResult(
                    False, failure_reason=0xC000, detail="the archive listed an instance without UIDs"
                )
            )
            continue
        try:
            dataset = client.retrieve_instance(study, series_uid, sop)
        except Exception as exc:
            raise _archive_error(exc, f"the retrieval of an instance of {what}") from exc
        results.append(pacs.intake.accept_dataset(dataset, "pull"))
    logger.info(
        "pulled %d instance(s) from the archive: %d accepted",
        len(results),
        sum(1 for r in results if r.accepted),
    )
    return results


async def pull_study(pacs: PacsService, study: str, series: str | None) -> list[AcceptResult]:
    """``pull_blocking`` in a thread; a spool with no room for any of it answers 507."""
    try:
        results = await asyncio.to_thread(pull_blocking, pacs, study, series)
    except IntakeUnavailable as exc:
        raise NotReady(str(exc), headers=retry_after(5)) from exc
    if (
        results
        and not any(r.accepted for r in results)
        and any(r.failure_reason == OUT_OF_RESOURCES for r in results)
    ):
        raise SpoolFullProblem(
            "the spool has no room for the study's instances; nothing was kept: retry later"
        )
    return results
