"""What an answer can be: the output formats of each task, one registry entry each, and their rendering.

An ``app.contract.OutputFormat`` names a format (the ``format`` query value), its media type, what decoding
must keep for it (the pixels, the source DICOM), its encoder and its description. The image routes derive
everything format-specific from this registry: the accepted ``format`` values, their OpenAPI enum and
description, the media types of the 200 answer, and the decode flags. ``register_output_format`` adds one.

Built in:
    * segmentation: ``png`` (the mask), ``overlay`` (the mask drawn over the image), ``json`` (per-class
      summary), ``dicom-seg`` (a DICOM Segmentation referencing the source DICOM), ``probability`` (one class's
      probability as an 8-bit PNG, the class chosen by ``?class=``);
    * classification: ``json`` (label and class probabilities per image, and explanations when asked for),
      ``dicom-sr`` (a DICOM Structured Report of one DICOM image's classification).

JSON answers carry only the DICOM identifiers ``models.dicom_seg.safe_identifiers`` allows, never patient data.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pydicom.uid import UID
from scipy import ndimage

from app.contract import ModelInput, OutputFormat, Prediction, ResponseOptions, RunnerT
from app.errors import InvalidRequest
from app.ood import ood_json
from app.runners import RUNNERS, ClassificationRunner, SegmentationRunner
from app.schemas import SegmentSummary
from models.dicom_results import ResultRequest, build_result
from models.dicom_seg import SAFE_UID_KEYWORDS, SEG_MEDIA_TYPE, DicomSegError
from models.dicom_sr import SR_MEDIA_TYPE, DicomSrError
from models.imageio import UnprocessableImageError, UnsupportedImageError

# Overlay colours (RGB) for classes 1, 2, ...; background (0) is left uncoloured.
OVERLAY_COLOURS = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (255, 225, 25),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
    ],
    dtype=np.float32,
)
OVERLAY_ALPHA = 0.45

# Connected components are counted with 8-connectivity (diagonal neighbours touch).
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# -- the registry ---------------------------------------------------------------------------------------

# task -> format name -> entry, in registration order (the order the API description lists them).
OUTPUT_FORMATS: dict[str, dict[str, OutputFormat[Any]]] = {}


def register_output_format(output_format: OutputFormat[RunnerT]) -> OutputFormat[RunnerT]:
    """Makes ``output_format`` an answer of its task's endpoint (apps created from now on document it).

    Raises:
        ValueError: no runner serves the task, or the task has a format of that name already.
    """
    task, name = output_format.task, output_format.name
    if task not in RUNNERS:
        raise ValueError(f"no runner serves task {task!r} (register_runner first)")
    formats = OUTPUT_FORMATS.setdefault(task, {})
    if not name or name in formats:
        raise ValueError(
            f"{task} has an output format named {name!r} already" if name else "a name is needed"
        )
    formats[name] = output_format
    return output_format


def unregister_output_format(task: str, name: str) -> None:
    """Removes a format (e.g. one a test registered); apps created before keep documenting it."""
    del OUTPUT_FORMATS[task][name]


def output_formats(task: str) -> dict[str, OutputFormat[Any]]:
    """The formats of ``task`` by name, in registration order (a copy)."""
    return dict(OUTPUT_FORMATS.get(task, {}))


def spoken_list(words: Sequence[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(filter(None, (", ".join(words[:-1]), words[-1]))) if words else ""


def check_input(output_format: OutputFormat[Any], item: ModelInput) -> None:
    """Refuses, before the model runs, an input ``output_format`` cannot render.

    Raises:
        models.imageio.UnsupportedImageError: the format needs a DICOM source and the input is not DICOM (415).
        models.imageio.ImageError: what the format's own ``check`` raises (e.g. 422 for an unusable DICOM).
    """
    if output_format.needs_source and item.source is None:
        others = [f.name for f in output_formats(output_format.task).values() if not f.needs_source]
        raise UnsupportedImageError(
            f"format={output_format.name} must reference a DICOM source image; this request sent a "
            f"{item.source_format or 'non-DICOM'} image. Send DICOM (application/dicom or a .dcm file)"
            + (f" or use format={spoken_list(others)}" if others else "")
        )
    if output_format.check is not None:
        output_format.check(item)


def check_image_count(output_format: OutputFormat[Any], count: int) -> None:
    """Refuses, before decoding, several images for a format whose answer covers one (``one_image``).

    Raises:
        app.errors.InvalidRequest: ``count`` > 1 for a ``one_image`` format (422, ``loc`` query.format).
    """
    if not output_format.one_image or count <= 1:
        return
    others = [f.name for f in output_formats(output_format.task).values() if not f.one_image]
    message = (
        f"format={output_format.name} answers one image per request (one DICOM object per source instance); "
        f"this request sent {count} files. Send one file per request"
        + (f", or use format={spoken_list(others)} for several" if others else "")
    )
    raise InvalidRequest(
        f"invalid parameter(s): format ({message})",
        extra={"errors": [{"loc": ["query", "format"], "msg": message}]},
    )


# -- rendering ------------------------------------------------------------------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W) uint8/uint16 or (H, W, 3) uint8 -> PNG (fast compression: masks compress well anyway)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def overlay(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image (H, W, C) in [0, 1] as RGB with each foreground class blended in its colour -> (H, W, 3) uint8."""
    rgb = pixels[:, :, :3] if pixels.shape[2] >= 3 else np.repeat(pixels[:, :, :1], 3, axis=2)
    out = rgb.astype(np.float32) * 255.0
    for label in np.unique(mask):
        if label == 0:
            continue
        colour = OVERLAY_COLOURS[(int(label) - 1) % len(OVERLAY_COLOURS)]
        where = mask == label
        out[where] = (1 - OVERLAY_ALPHA) * out[where] + OVERLAY_ALPHA * colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def summarize(mask: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class area (pixels, fraction), bounding box and connected components of a (H, W) label mask."""
    h, w = mask.shape
    total = h * w
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    entries = []
    for index, name in enumerate(classes):
        pixels = int(counts[index]) if index < len(counts) else 0
        bbox = None
        components = 0
        if pixels:
            binary = mask == index
            rows = np.flatnonzero(binary.any(axis=1))
            cols = np.flatnonzero(binary.any(axis=0))
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
            bbox = {"x": x0, "y": y0, "width": x1 - x0 + 1, "height": y1 - y0 + 1}
            components = int(ndimage.label(binary, structure=EIGHT_CONNECTED)[1])
        entries.append(
            {
                "index": index,
                "name": name,
                "pixels": pixels,
                "fraction": pixels / total,
                "bbox": bbox,
                "components": components,
            }
        )
    return {"width": w, "height": h, "classes": entries}


def only_mask(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]]
) -> tuple[ModelInput, np.ndarray]:
    """The one image of a segmentation request and its mask (H, W) at the image's original size."""
    if len(predictions) != 1:
        raise ValueError(f"a segmentation answer covers one image, got {len(predictions)}")
    item = predictions[0].input
    return item, runner.mask(item, predictions[0].output)


def encode_mask_png(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    """8-bit mask: 0/255 for a binary model, else the class index."""
    _, mask = only_mask(runner, predictions)
    return png_bytes(mask * 255 if runner.binary else mask)


def encode_overlay(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    item, mask = only_mask(runner, predictions)
    if item.pixels is None:
        raise ValueError("overlay needs the decoded pixels (decode with keep_pixels=True)")
    return png_bytes(overlay(item.pixels, mask))


def encode_summary(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    item, mask = only_mask(runner, predictions)
    summary = {"model": runner.name, "version": runner.version, **summarize(mask, runner.classes)}
    summary["ood"] = ood_json(item)
    if item.dicom_uids is not None:  # DICOM input; {} when it carried no valid UID
        summary["dicom"] = item.dicom_uids
    return json.dumps(summary).encode()


def probability_class_index(classes: Sequence[str], name: str | None) -> int:
    """The class whose probability ``format=probability`` draws: ``name``, or the first after the background.

    Raises:
        app.errors.InvalidRequest: (422) ``name`` is not one of the model's classes.
    """
    if name is None:
        return 1
    if name in classes:
        return list(classes).index(name)
    message = f"class must be one of the model's classes {list(classes)}, not {name!r}"
    raise InvalidRequest(
        f"invalid parameter(s): class ({message})",
        extra={"errors": [{"loc": ["query", "class"], "msg": message}]},
    )


def check_probability_class(runner: SegmentationRunner, options: ResponseOptions) -> None:
    """Refuses an unknown ``class`` before the model runs (``probability_class_index``)."""
    probability_class_index(runner.classes, options.foreground_class)


def probability_png(probability: np.ndarray) -> np.ndarray:
    """(H, W) probabilities in [0, 1] -> 8-bit gray: round(255 * p)."""
    return np.clip(np.rint(probability * 255.0), 0, 255).astype(np.uint8)


def encode_probability(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    """One class's probability at the image's original size, 8-bit (value / 255 is the probability)."""
    if len(predictions) != 1:
        raise ValueError(f"a segmentation answer covers one image, got {len(predictions)}")
    index = probability_class_index(runner.classes, options.foreground_class)
    prediction = predictions[0]
    probabilities = runner.probabilities(prediction.input, prediction.output)
    return png_bytes(probability_png(probabilities[index]))


def check_dicom_reference(item: ModelInput, result: str) -> None:
    """Whether a DICOM ``result`` object (``"DICOM SEG"``, ``"DICOM SR"``) can reference this input.

    A result must reference its source by Study, Series and SOP Instance UID, so each must be a valid UID;
    values that are not UIDs are refused rather than passed on (and perhaps logged) by the writer.

    Raises:
        models.imageio.UnsupportedImageError: the input is not DICOM.
        models.imageio.UnprocessableImageError: it lacks a valid UID (named, value not quoted).
    """
    if item.source is None:
        raise UnsupportedImageError(f"a {result} needs DICOM input (decode with keep_source=True)")
    missing = [keyword for keyword in SAFE_UID_KEYWORDS if keyword not in (item.dicom_uids or {})]
    # The SOP class is quoted when highdicom does not know it, so it too must be a UID.
    if not UID(str(item.source.dataset.get("SOPClassUID", "")).strip()).is_valid:
        missing.append("SOPClassUID")
    if missing:
        raise UnprocessableImageError(
            f"cannot write a {result}: the source's {', '.join(missing)} is missing or not a valid UID"
        )


def check_seg_source(item: ModelInput) -> None:
    """Whether a DICOM SEG can be written for this input (checked before the model runs); see
    ``check_dicom_reference``."""
    check_dicom_reference(item, "DICOM SEG")


def check_sr_source(item: ModelInput) -> None:
    """Whether a DICOM SR can be written for this input (checked before the model runs); see
    ``check_dicom_reference``."""
    check_dicom_reference(item, "DICOM SR")


def dicom_seg_request(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> ResultRequest:
    """What the DICOM SEG of one prediction needs but its source (``models.dicom_results``).

    Raises:
        models.imageio.UnprocessableImageError: a source a SEG cannot reference (e.g. an unknown SOP class).
    """
    item, mask = only_mask(runner, predictions)
    check_seg_source(item)  # the route checked before inference; encoding must not rely on it
    # The smallest integer type: the request may cross to another process (a 2048 x 2048 mask is 4 MB, not 32)
    mask = np.asarray(mask).astype(np.uint8 if len(runner.classes) <= 256 else np.uint16, copy=False)
    return ResultRequest(
        "seg",
        (mask, list(runner.classes)),
        {
            "algorithm_name": runner.name,
            "algorithm_version": runner.version,
            "series_description": f"MedServe {runner.name} segmentation",
            "series_instance_uid": options.series_instance_uid,
            "sop_instance_uid": options.sop_instance_uid,
        },
    )


def encode_dicom_seg(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    """A DICOM Segmentation referencing the source DICOM.

    Raises:
        models.imageio.UnprocessableImageError: a source a SEG cannot reference (e.g. an unknown SOP class).
    """
    request = dicom_seg_request(runner, predictions, options)
    return write_result(request, predictions[0].input)


def write_result(request: ResultRequest, item: ModelInput) -> bytes:
    """``request`` written for the source DICOM of ``item``; a writer's refusal as ``UnprocessableImageError``."""
    assert item.source is not None
    try:
        return build_result(request, item.source)
    except (DicomSegError, DicomSrError) as exc:
        raise UnprocessableImageError(str(exc)) from exc


def classification_prediction(
    classes: Sequence[str],
    probs: np.ndarray,
    item: ModelInput,
    top_k: int | None,
    explanation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One image's prediction: the most probable label and the probabilities of the ``top_k`` best classes,
    plus the input's DICOM identifiers when it was DICOM and its ``explanation`` when one was made."""
    order = np.argsort(-probs, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    prediction: dict[str, Any] = {
        "filename": item.filename,
        "label": classes[int(order[0])],
        "probabilities": {classes[int(i)]: float(probs[int(i)]) for i in order},
        "ood": ood_json(item),
    }
    if item.dicom_uids is not None:
        prediction["dicom"] = item.dicom_uids
    if explanation is not None:
        prediction["explanation"] = explanation
    return prediction


def encode_predictions(
    runner: ClassificationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    answers = [
        classification_prediction(runner.classes, p.output, p.input, options.top_k, p.explanation)
        for p in predictions
    ]
    return json.dumps({"model": runner.name, "version": runner.version, "predictions": answers}).encode()


def dicom_sr_request(
    runner: ClassificationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> ResultRequest:
    """What the DICOM SR of one prediction needs but its source (``models.dicom_results``).

    Raises:
        models.imageio.UnprocessableImageError: a source an SR cannot reference (e.g. an unknown SOP class).
    """
    if len(predictions) != 1:
        raise ValueError(f"a DICOM SR answer covers one image, got {len(predictions)}")
    item, probs = predictions[0].input, np.clip(np.asarray(predictions[0].output, dtype=np.float64), 0.0, 1.0)
    check_sr_source(item)  # the route checked before inference; encoding must not rely on it
    classes = list(runner.classes)
    order = np.argsort(-probs, kind="stable")
    reported = order[: options.top_k] if options.top_k is not None else np.arange(len(classes))
    return ResultRequest(
        "sr",
        ({classes[int(i)]: float(probs[int(i)]) for i in reported}, classes[int(order[0])]),
        {
            "classes": classes,
            "model_name": runner.name,
            "model_version": runner.version,
            "series_description": f"MedServe {runner.name} classification",
            "series_instance_uid": options.series_instance_uid,
            "sop_instance_uid": options.sop_instance_uid,
        },
    )


def encode_dicom_sr(
    runner: ClassificationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    """A DICOM Comprehensive 3D SR (TID 1500) of one DICOM image's classification: the predicted label and the
    class probabilities (all classes in class order, or the ``top_k`` best, most probable first).

    Raises:
        models.imageio.UnprocessableImageError: a source an SR cannot reference (e.g. an unknown SOP class).
    """
    return write_result(dicom_sr_request(runner, predictions, options), predictions[0].input)


# -- the built-in formats -------------------------------------------------------------------------------

SEGMENT_SUMMARY_EXAMPLE = {
    "model": "unet",
    "version": "3f2a9c0d1e4b5a67",
    "width": 512,
    "height": 480,
    "classes": [
        {
            "index": 0,
            "name": "background",
            "pixels": 239104,
            "fraction": 0.973,
            "bbox": {"x": 0, "y": 0, "width": 512, "height": 480},
            "components": 1,
        },
        {
            "index": 1,
            "name": "lesion",
            "pixels": 6656,
            "fraction": 0.027,
            "bbox": {"x": 200, "y": 180, "width": 90, "height": 84},
            "components": 1,
        },
    ],
    "ood": {"score": 41.7, "threshold": 58.2, "flagged": False},
}
CLASSIFY_EXAMPLE = {
    "model": "classifier",
    "version": "9d1e0f2a3b4c5d6e",
    "predictions": [
        {
            "filename": "lesion-17.png",
            "label": "malignant",
            "probabilities": {"malignant": 0.91, "benign": 0.09},
            "ood": {"score": 12.3, "threshold": 17.9, "flagged": False},
        }
    ],
}

BUILT_IN_FORMATS: tuple[OutputFormat[Any], ...] = (
    OutputFormat(
        task=SegmentationRunner.task,
        name="png",
        media_type="image/png",
        encoder=encode_mask_png,
        description="single-channel 8-bit PNG: 0/255 for a binary model, the class index otherwise.",
    ),
    OutputFormat(
        task=SegmentationRunner.task,
        name="overlay",
        media_type="image/png",
        encoder=encode_overlay,
        description="RGB PNG of the image with the mask drawn over it in colour.",
        needs_pixels=True,
    ),
    OutputFormat(
        task=SegmentationRunner.task,
        name="json",
        media_type="application/json",
        encoder=encode_summary,
        description="per-class area, bounding box and connected components; for DICOM input also `dicom`, "
        "the request's Study/Series/SOP Instance UIDs (never patient data).",
        openapi={"schema": SegmentSummary.model_json_schema(), "example": SEGMENT_SUMMARY_EXAMPLE},
    ),
    OutputFormat(
        task=SegmentationRunner.task,
        name="dicom-seg",
        media_type=SEG_MEDIA_TYPE,
        encoder=encode_dicom_seg,
        result_request=dicom_seg_request,
        description="a DICOM Segmentation object (`application/dicom`) in the source's study, referencing the "
        "source series and instance, one segment per foreground class named after it.",
        needs_source=True,
        check=check_seg_source,
    ),
    OutputFormat(
        task=SegmentationRunner.task,
        name="probability",
        media_type="image/png",
        encoder=encode_probability,
        description="8-bit gray PNG of the model's probability of one class (`class=NAME`, default the first "
        "class after the background) at the image's size: the value / 255 is the probability.",
        needs_scores=True,
        check_options=check_probability_class,
    ),
    OutputFormat(
        task=ClassificationRunner.task,
        name="json",
        media_type="application/json",
        encoder=encode_predictions,
        description="per image, in upload order, the most probable label and the class probabilities.",
        openapi={"example": CLASSIFY_EXAMPLE},
        cheap=True,
    ),
    OutputFormat(
        task=ClassificationRunner.task,
        name="dicom-sr",
        media_type=SR_MEDIA_TYPE,
        encoder=encode_dicom_sr,
        result_request=dicom_sr_request,
        description="a DICOM Structured Report (`application/dicom`; Comprehensive 3D SR, TID 1500 measurement "
        "report) in the source's study, referencing the source image: the predicted label as a qualitative "
        "evaluation, each class probability (or the `top_k` best) as a numeric one, the model as contributing "
        "equipment, VerificationFlag UNVERIFIED. One image per request (several files: 422).",
        needs_source=True,
        check=check_sr_source,
        one_image=True,
    ),
)
for built_in in BUILT_IN_FORMATS:
    register_output_format(built_in)
