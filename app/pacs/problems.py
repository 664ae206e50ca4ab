"""The problem types of the job system (``application/problem+json``, see ``app.errors``).

They are added to ``app.errors.PROBLEM_TYPES`` when this module is imported (``app.main`` imports the PACS
routes), so ``/problems/<slug>`` explains them and OpenAPI lists them like the others.
"""

from __future__ import annotations

from app.errors import PROBLEM_TYPES, Problem


class JobNotFound(Problem):
    status, slug, title = 404, "job-not-found", "Unknown job"
    description = "No job has this id; GET /jobs lists them."


class StudyNotFound(Problem):
    status, slug, title = 404, "study-not-found", "Study not in the archive"
    description = "The archive (MEDSERVE_PACS_URL) has no instance of this study (or series)."


class JobConflict(Problem):
    status, slug, title = 409, "job-conflict", "Not possible in the job's state"
    description = (
        "The job's state does not allow this: only failed or cancelled jobs are retried, only unfinished jobs "
        "are cancelled, and a retry needs the instance still in the spool."
    )


class PacsNotConfigured(Problem):
    status, slug, title = 409, "pacs-not-configured", "No archive configured"
    description = "Pulling a study needs the archive's DICOMweb root in MEDSERVE_PACS_URL."


class ArchiveError(Problem):
    status, slug, title = 502, "archive-error", "The archive failed"
    description = "The archive (MEDSERVE_PACS_URL) could not be reached or answered with an error."


class JobsDisabled(Problem):
    status, slug, title = 503, "jobs-disabled", "Job system off"
    description = (
        "The job system is off (MEDSERVE_JOBS_ENABLED=false, or the default job store beside the model "
        "directory cannot be written: set MEDSERVE_JOBS_DB and MEDSERVE_SPOOL_DIR)."
    )


class SpoolFullProblem(Problem):
    status, slug, title = 507, "spool-full", "No room to store instances"
    description = (
        "The spool (MEDSERVE_SPOOL_DIR) is full or over MEDSERVE_SPOOL_MAX_BYTES; nothing of the request was "
        "kept. Retry once jobs have drained."
    )


PACS_PROBLEMS: tuple[type[Problem], ...] = (
    JobNotFound,
    StudyNotFound,
    JobConflict,
    PacsNotConfigured,
    ArchiveError,
    JobsDisabled,
    SpoolFullProblem,
)
PROBLEM_TYPES.update({cls.slug: cls for cls in PACS_PROBLEMS})
