"""The out-of-distribution flag in answers (the scoring itself is ``models.ood``; runners set ``ModelInput.ood``).

* JSON answers: ``"ood": {"score": float, "threshold": float, "flagged": bool}`` per prediction of ``/classify``
  and per image of ``/segment?format=json``; ``"ood": null`` when the model has no statistics.
* Answers about one image (every ``/segment`` format, ``/segment/interactive`` with a model, ``/classify`` with one
  file): header ``X-MedServe-OOD`` = ``ok`` or ``flagged`` and ``X-MedServe-OOD-Score`` (the score); for a model
  without statistics ``X-MedServe-OOD: unknown`` and no score header.
* ``/metrics``: ``medserve_ood_scored_total{model}`` (images answered with a score) and
  ``medserve_ood_flagged_total{model}`` (those flagged), counted when the answer is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.contract import ModelInput, Prediction

OOD_HEADER = "X-MedServe-OOD"
OOD_SCORE_HEADER = "X-MedServe-OOD-Score"
UNKNOWN = "unknown"


def ood_json(item: ModelInput) -> dict[str, Any] | None:
    """The ``ood`` object of an answer about ``item`` (None: the model has no OOD statistics)."""
    return None if item.ood is None else item.ood.model_dump()


def ood_headers(predictions: Sequence[Prediction[Any]]) -> dict[str, str]:
    """The OOD headers of an answer about one image; none for an answer about several."""
    if len(predictions) != 1:
        return {}
    assessment = predictions[0].input.ood
    if assessment is None:
        return {OOD_HEADER: UNKNOWN}
    return {
        OOD_HEADER: "flagged" if assessment.flagged else "ok",
        OOD_SCORE_HEADER: f"{assessment.score:.6g}",
    }


def ood_counts(predictions: Sequence[Prediction[Any]]) -> tuple[int, int]:
    """(images scored, images flagged) of an answer."""
    assessed = [p.input.ood for p in predictions if p.input.ood is not None]
    return len(assessed), sum(1 for a in assessed if a is not None and a.flagged)


HEADERS_OPENAPI: dict[str, Any] = {
    OOD_HEADER: {
        "description": "answers about one image: ok or flagged (the image is unlike the training data), "
        "unknown when the model has no out-of-distribution statistics",
        "schema": {"type": "string", "enum": ["ok", "flagged", UNKNOWN]},
    },
    OOD_SCORE_HEADER: {
        "description": "the out-of-distribution score (Mahalanobis distance); absent when unknown",
        "schema": {"type": "number"},
    },
}
