"""The work behind ``POST /segment/interactive``: decoding, hints, the graph cut and its answer.

The route (``app.routes.answer_interactive``) runs these in the thread pool; the algorithm is
``models.interactive``. Without a model the graph cut segments from the hints alone and answers as the model
``graph-cut`` (classes background, foreground). With ``?model=NAME`` it refines that U-Net's probabilities of one
foreground class (``?class=NAME``, default the first class after the background): pixels the cut takes get that
class, every other pixel the U-Net's most probable other class, so the answer has the model's classes.

The answers use the segmentation output formats of ``app.outputs`` unchanged: ``MaskAnswerer`` gives them what
they read of a runner (name, version, classes, the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from app.contract import ImageUpload, ModelInput, model_input, read_upload
from app.errors import InvalidRequest
from app.runners import SegmentationRunner, argmax_classes
from models.imageio import DEFAULT_INTENSITY
from models.interactive import (
    GRAPH_CUT_CLASSES,
    GRAPH_CUT_NAME,
    GRAPH_CUT_VERSION,
    HintError,
    check_hints,
    graph_cut,
    gray,
    parse_hints,
)

HINTS_FIELD = "hints"


@dataclass(frozen=True)
class MaskAnswerer:
    """Stands in for the runner when a segmentation output format renders an answer whose mask is made
    already: the output of each ``Prediction`` is the (H, W) label mask at the input's size."""

    name: str
    version: str
    classes: list[str]

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def mask(self, item: ModelInput, output: np.ndarray) -> np.ndarray:
        return output


GRAPH_CUT_ANSWERER = MaskAnswerer(GRAPH_CUT_NAME, GRAPH_CUT_VERSION, list(GRAPH_CUT_CLASSES))


def decode_for_graph_cut(upload: ImageUpload, *, max_pixels: int | None, keep_source: bool) -> ModelInput:
    """An upload decoded for the graph cut alone (the default intensity policy; ``image`` is the gray
    (1, H, W) image the cut sees); the pixels are always kept.

    Raises:
        models.imageio.ImageError: (or a subclass) for bad images.
    """
    decoded = read_upload(upload, max_pixels=max_pixels, intensity=DEFAULT_INTENSITY)
    image = torch.from_numpy(gray(decoded.pixels))[None]
    return model_input(upload, decoded, image, keep_pixels=True, keep_source=keep_source)


def read_hints(hints: str | bytes | None, item: ModelInput, *, need_foreground: bool) -> np.ndarray:
    """The hint map (H, W) of the request's ``hints`` field for ``item``.

    Raises:
        models.interactive.HintError: no ``hints`` field, or unusable hints.
    """
    if not hints:
        raise HintError(
            f"no hints: send the image as multipart field 'file' and the hints as field '{HINTS_FIELD}' "
            "(JSON points or a scribble PNG)"
        )
    hint_map = parse_hints(hints, item.height, item.width)
    check_hints(hint_map, need_foreground=need_foreground)
    return hint_map


def foreground_class_index(classes: list[str], name: str | None) -> int:
    """The index of the class a correction segments: ``name``, or the first class after the background.

    Raises:
        app.errors.InvalidRequest: ``name`` is the background or no class of the model.
    """
    if name is None:
        return 1
    if name in classes[1:]:
        return classes.index(name, 1)
    message = f"class must be one of the model's foreground classes {classes[1:]}, not {name!r}"
    raise InvalidRequest(
        f"invalid parameter(s): class ({message})", extra={"errors": [_class_error(message)]}
    )


def refuse_class_without_model(name: str | None) -> None:
    """The graph cut alone has one foreground: a ``class`` needs a model.

    Raises:
        app.errors.InvalidRequest: ``name`` is given.
    """
    if name is not None:
        message = "class chooses a model's class to correct: it needs ?model=NAME"
        raise InvalidRequest(
            f"invalid parameter(s): class ({message})", extra={"errors": [_class_error(message)]}
        )


def _class_error(message: str) -> dict[str, object]:
    return {"loc": ["query", "class"], "msg": message}


def cut_from_hints(item: ModelInput, hints: np.ndarray) -> np.ndarray:
    """The graph cut from the hints alone: the (H, W) mask, 1 foreground, 0 background."""
    # ``image`` is the gray image decode_for_graph_cut made: the cut need not convert the pixels again.
    return graph_cut(item.image[0].numpy(), hints).astype(np.uint8)


def refine_prediction(
    runner: SegmentationRunner, item: ModelInput, scores: torch.Tensor, hints: np.ndarray, class_index: int
) -> np.ndarray:
    """The U-Net's prediction refined by the graph cut: the (H, W) label mask with the model's classes.

    The cut's foreground gets ``class_index``; every other pixel the most probable of the other classes.
    """
    if item.pixels is None:
        raise ValueError("the refinement needs the decoded pixels (decode with keep_pixels=True)")
    probabilities = runner.probabilities(item, scores)
    foreground = graph_cut(item.pixels, hints, probabilities[class_index])
    probabilities[class_index] = -np.inf
    labels = argmax_classes(probabilities)
    labels[foreground] = class_index
    return labels
