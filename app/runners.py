"""The runners of each task (the contract is ``app.contract.Runner``) and the table that picks one for a checkpoint.

Batching policy for images of different sizes:
    * segmentation with ``resize="tile"`` (the U-Net's policy): each image keeps its native pixel scale and is
      cut into windows of the training size (``models.inference.split_tiles``, with the checkpoint's
      overlap); windows of all requests in a batch are pooled into forward passes of up to
      ``forward_batch_size`` windows and blended back per image, so the mask has exactly the input's size.
      Images smaller than a window are padded and cropped back.
    * ``resize="fit"`` (segmentation of large or mixed-resolution images): each image is fitted into the
      checkpoint's working size (aspect kept, padded) by ``prepare``, then windowed like ``tile`` (a single
      window when the working size is the training size); the scores are mapped back to the original size by
      ``models.preprocessing.to_original_size`` before the arg-max.
    * ``resize="resize"`` (classification, and segmentation models trained that way): each image is resized to
      the model's input size, so any sizes stack into one batch; segmentation probabilities are resized back
      to the original size (bilinear) before the arg-max.

A new task subclasses ``Runner`` and is made known with ``register_runner``; its answers are the output
formats registered for its task in ``app.outputs``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.contract import ImageUpload, ModelInput, Runner, RunnerT, ServingOptions
from models.checkpoint import CheckpointError, load_model
from models.classifier import probabilities
from models.explain import TargetLayer, gradcam_layer
from models.inference import Precision, merge_tiles, split_tiles
from models.ood import window_count
from models.preprocessing import prepare, to_original_size

__all__ = [
    "RUNNERS",
    "ClassificationRunner",
    "ImageUpload",
    "SegmentationRunner",
    "argmax_classes",
    "load_runner",
    "register_runner",
]


class SegmentationRunner(Runner[torch.Tensor]):
    """Serves a segmentation model (logits (B, K, H, W)); outputs are class scores (K, H', W') per image."""

    task = "segmentation"

    def check_metadata(self) -> None:
        if len(self.metadata.classes) < 2:
            raise CheckpointError(
                f"{self.name}: a segmentation model needs at least 2 classes (background included), "
                f"got {self.metadata.classes}"
            )

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        return prepare(pixels, self.spec)

    def predict(self, inputs: list[ModelInput]) -> list[torch.Tensor]:
        """Per image, class scores (K, H, W) whose arg-max is the mask (see ``_predict_tiled``)."""
        images = [item.image for item in inputs]
        if self.spec.resize in ("tile", "fit"):
            return self._predict_tiled(images)
        outputs: list[torch.Tensor] = []
        for start in range(0, len(images), self.forward_batch_size):
            chunk = torch.stack(images[start : start + self.forward_batch_size])
            logits = self.forward_logits(chunk)
            outputs.extend(torch.softmax(logits, dim=1).unbind(0))
        return outputs

    def _predict_tiled(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sliding-window prediction with the windows of all images pooled into shared forward passes.

        The same windows and blending as ``models.inference.segment_probabilities`` (which evaluation uses),
        with one shortcut for the common case of an image covered by a single window (its size is at most the
        training size): blending one window is the identity and the arg-max of logits equals that of
        probabilities, so its cropped logits are returned as scores, saving a softmax and a blend per request.
        Images with several windows get blended probabilities (K, H, W).
        """
        tilings = []
        windows = []
        for image in images:
            tiles, tiling = split_tiles(image, self.spec.img_size, self.spec.tile_overlap)
            windows.append(tiles)
            tilings.append(tiling)
        stacked = torch.cat(windows) if len(windows) > 1 else windows[0]
        logits = torch.cat([self.forward_logits(chunk) for chunk in stacked.split(self.forward_batch_size)])
        outputs = []
        offset = 0
        for tiling in tilings:
            n = len(tiling.positions)
            window_logits = logits[offset : offset + n]
            offset += n
            if n == 1:  # as ``returns_logits`` says
                outputs.append(window_logits[0, :, : tiling.height, : tiling.width])
            else:
                outputs.append(merge_tiles(torch.softmax(window_logits, dim=1), tiling))
        return outputs

    def feature_rows(self, item: ModelInput) -> int:
        """Tiled prediction runs every window of an image through the model: one feature row each."""
        if self.spec.resize in ("tile", "fit"):
            return window_count(item.image, self.spec.img_size, self.spec.tile_overlap)
        return 1

    def mask(self, item: ModelInput, scores: torch.Tensor) -> np.ndarray:
        """Class index per pixel (H, W) at the input's original size, from scores (K, H', W')."""
        return argmax_classes(to_original_size(scores, item.height, item.width, self.spec).numpy())

    def returns_logits(self, item: ModelInput) -> bool:
        """Whether ``predict``'s scores for ``item`` are logits (one window covers it), not probabilities."""
        height, width = item.image.shape[-2:]
        tile_height, tile_width = self.spec.img_size
        return self.spec.resize in ("tile", "fit") and height <= tile_height and width <= tile_width

    def probabilities(self, item: ModelInput, scores: torch.Tensor) -> np.ndarray:
        """Class probabilities (K, H, W) at the input's original size, from ``predict``'s scores (K, H', W')."""
        if self.returns_logits(item):
            scores = torch.softmax(scores, dim=0)
        return to_original_size(scores, item.height, item.width, self.spec).numpy()


def argmax_classes(scores: np.ndarray) -> np.ndarray:
    """Arg-max over the class axis of (K, H, W) scores -> (H, W) uint8 (uint16 beyond 256 classes).

    A running maximum over the K planes, each pass contiguous: measured 2x faster than numpy's arg-max across
    planes and 25x faster than torch's on the CPU. Ties go to the lower class index, as with argmax.
    """
    labels = np.zeros(scores.shape[1:], dtype=np.uint8 if scores.shape[0] <= 256 else np.uint16)
    best = scores[0]
    for k in range(1, scores.shape[0]):
        better = scores[k] > best
        labels[better] = k
        best = np.maximum(best, scores[k])
    return labels


class ClassificationRunner(Runner[np.ndarray]):
    """Serves a classifier (logits (B, K)); outputs are probabilities (K,) = softmax(logits / temperature).

    The temperature is the checkpoint's ``extra["temperature"]`` (1.0 when absent), e.g. fitted to calibrate
    an SVM head's margins.
    """

    task = "classification"
    temperature: float  # set by check_metadata
    # Where Grad-CAM explains the network (``models.explain.gradcam_layer``); None: it cannot be explained.
    explain_layer: TargetLayer | None

    def check_metadata(self) -> None:
        self.explain_layer = gradcam_layer(self.model, self.spec.img_size)
        temperature = self.metadata.extra.get("temperature", 1.0)
        if (
            not isinstance(temperature, int | float)
            or not math.isfinite(float(temperature))
            or float(temperature) <= 0
        ):
            raise CheckpointError(
                f"{self.name}: extra.temperature must be a positive number, got {temperature!r}"
            )
        self.temperature = float(temperature)

    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        image = prepare(pixels, self.spec)
        if tuple(image.shape[-2:]) != tuple(self.spec.img_size):
            # A classifier trained with tiles still gets one whole image: resize to its input size.
            image = F.interpolate(
                image[None], size=self.spec.img_size, mode="bilinear", align_corners=False, antialias=True
            )[0]
        return image

    def predict(self, inputs: list[ModelInput]) -> list[np.ndarray]:
        outputs: list[np.ndarray] = []
        for start in range(0, len(inputs), self.forward_batch_size):
            chunk = torch.stack([item.image for item in inputs[start : start + self.forward_batch_size]])
            logits = self.forward_logits(chunk)
            if logits.ndim != 2 or logits.shape[1] != len(self.classes):
                raise RuntimeError(
                    f"classifier returned shape {tuple(logits.shape)}, expected (B, {len(self.classes)})"
                )
            probs = probabilities(logits, self.temperature)
            outputs.extend(p.numpy() for p in probs.unbind(0))
        return outputs

    def describe(self) -> dict[str, Any]:
        """``Runner.describe`` plus ``explain``: the explanation methods and the layer they explain (or None)."""
        layer = self.explain_layer
        return {**super().describe(), "explain": layer.describe() if layer is not None else None}


# The runner class of each task a checkpoint's metadata can name.
RUNNERS: dict[str, type[Runner[Any]]] = {}


def register_runner(runner_class: type[RunnerT]) -> type[RunnerT]:
    """Serves checkpoints of ``runner_class.task`` with ``runner_class``; usable as a class decorator.

    Raises:
        ValueError: the task has a runner already.
    """
    task = runner_class.task
    if task in RUNNERS:
        raise ValueError(f"task {task!r} is served by {RUNNERS[task].__name__} already")
    RUNNERS[task] = runner_class
    return runner_class


register_runner(SegmentationRunner)
register_runner(ClassificationRunner)


def load_runner(
    name: str, path: str | Path, *, device: torch.device, precision: Precision, forward_batch_size: int
) -> Runner[Any]:
    """Reads the checkpoint at ``path`` onto ``device`` and sets up the runner of its task (``Runner.setup``).

    Raises:
        CheckpointError: unreadable, unsafe or inconsistent checkpoint, or one of a task no runner serves (the
            message names the file).
    """
    model, metadata = load_model(path, device)
    runner_class = RUNNERS.get(metadata.task)
    if runner_class is None:
        raise CheckpointError(f"{path}: no runner for task {metadata.task!r}")
    return runner_class.setup(name, model, metadata, ServingOptions(device, precision, forward_batch_size))
