"""The per-model contract every task implements, in the manner of LitServe's ``LitAPI``.

A runner serves one checkpoint; its four steps have the same signatures for every task, so the routes and the
registry never need to know which task they hold:

    * ``setup`` (classmethod): once at startup, in a worker thread: wraps a loaded checkpoint's network and
      metadata, moved onto the device, in the runner.
    * ``decode``: per request, in the service's decode thread pool: ``ImageUpload`` -> ``ModelInput`` (the
      decoded image run through ``models.preprocessing.prepare``, the same path training used, plus what an
      output format may need: the decoded pixels, the source DICOM).
    * ``predict``: per batch, in the model's own worker thread (``app.batching``), under
      ``torch.inference_mode()``: inputs of several requests -> one output per input.
    * ``encode``: per request, in the decode thread pool: the request's ``Prediction`` objects -> the response
      body, rendered by an ``OutputFormat`` (see ``app.outputs``, which holds the formats of each task).

Images are read with the checkpoint's intensity policy (``Preprocessing.intensity``), so a DICOM window or a
16-bit PNG maps to the same [0, 1] values as in training. Inputs keep only the DICOM identifiers
``models.dicom_seg.safe_identifiers`` allows (Study/Series/SOP Instance UID) for answers to echo, never
patient data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
import torch
from torch import nn

from models.checkpoint import CheckpointError, CheckpointMetadata
from models.dicom_results import ResultRequest
from models.dicom_seg import safe_identifiers
from models.imageio import DecodedImage, DicomRef, ImageError, read_image, resolve_intensity
from models.inference import Precision, forward, prepare_for_device
from models.ood import FeatureSource, FeatureTap, OODAssessment, OODStatistics, feature_source, per_image

OutputT = TypeVar("OutputT")
RunnerT = TypeVar("RunnerT", bound="Runner[Any]")


@dataclass(frozen=True)
class ServingOptions:
    """Where and how a runner runs its network.

    Attributes:
        device: where the model runs.
        precision: ``fp32``, or ``fp16``/``bf16`` autocast on CUDA.
        forward_batch_size: most images (or windows) per forward pass.
    """

    device: torch.device
    precision: Precision
    forward_batch_size: int


@dataclass(frozen=True)
class ImageUpload:
    """One uploaded image as it arrived: bytes, declared content type and (client) file name.

    ``checked``: a DICOM instance the job system's intake accepted (``app.pacs.intake.inspect_instance``:
    complete, no value of a length its VR cannot have), so decoding does not convert every element again to
    find damage (that was most of a job's decoding time, holding the interpreter lock).
    """

    data: bytes
    content_type: str | None = None
    filename: str | None = None
    checked: bool = False


@dataclass
class ModelInput:
    """A decoded request, the same for every task.

    Attributes:
        image: normalised model input (C, H', W').
        height / width: the input's original size.
        filename: the upload's (client) file name, None for a raw body.
        pixels: decoded (H, W, C) pixels in [0, 1], kept only for formats that draw on the image.
        dicom_uids: the identifiers answers may echo (``safe_identifiers``) when the input was DICOM, else None.
        source: the source DICOM, kept only for formats that reference it (it holds patient data: never log it).
        source_format: the input's format (``png``, ``dicom``, ...).
        raw: ``image`` is a network input given as such (the Open Inference Protocol): the model's output for
            it is the network's raw output (logits), not the task's answer.
        ood: set by ``Runner.run_batch``: the input's out-of-distribution score, from the prediction's own
            forward pass (``models.ood``); None when the model has no OOD statistics.
    """

    image: torch.Tensor
    height: int
    width: int
    filename: str | None = None
    pixels: np.ndarray | None = None
    dicom_uids: dict[str, str] | None = None
    source: DicomRef | None = None
    source_format: str = ""
    ood: OODAssessment | None = None
    raw: bool = False

    @classmethod
    def network_input(cls, tensor: torch.Tensor) -> ModelInput:
        """A normalised (C, H, W) tensor to run through the network as it is (``raw``)."""
        return cls(tensor, int(tensor.shape[-2]), int(tensor.shape[-1]), source_format="tensor", raw=True)


@dataclass(frozen=True)
class Prediction(Generic[OutputT]):
    """One image of a request: its decoded input, the model's output for it and, when the request asked for
    one (``/classify?explain=gradcam``), its explanation (the JSON object ``app.explain`` rendered)."""

    input: ModelInput
    output: OutputT
    explanation: dict[str, Any] | None = None


@dataclass(frozen=True)
class ResponseOptions:
    """Request parameters that shape the answer rather than the inference.

    Attributes:
        top_k: list only the K most probable classes (classification); None lists all.
        foreground_class: the class an interactive correction segments (``POST /segment/interactive``), or
            whose probability ``/segment?format=probability`` draws; None: the first class after the background.
        explain: ``gradcam``: each classification gains an explanation map (``app.explain``); None: none.
        explain_target: the class explained; None: each image's predicted label.
        series_instance_uid / sop_instance_uid: the UIDs a DICOM result (``dicom-seg``, ``dicom-sr``) gets; None:
            new random ones (the HTTP endpoints). PACS jobs pass their deterministic ones (``models.dicom_uids``).
    """

    top_k: int | None = None
    foreground_class: str | None = None
    explain: str | None = None
    explain_target: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None


@dataclass
class Encoded:
    """A response payload produced off the event loop."""

    body: bytes
    media_type: str


@dataclass(frozen=True)
class OutputFormat(Generic[RunnerT]):
    """One way to answer a request of a task: what ``?format=NAME`` returns.

    Attributes:
        task: the task whose runner ``encoder`` takes (``Runner.task``).
        name: the value of the ``format`` query parameter.
        media_type: the response's content type.
        encoder: (runner, the request's predictions, options) -> response body; runs in the thread pool.
            Raises ``models.imageio.ImageError`` subclasses for an input it cannot render (mapped to 4xx).
        description: Markdown, one sentence or two, shown in the endpoint's OpenAPI description.
        needs_pixels: decode keeps the decoded pixels (``ModelInput.pixels``).
        needs_source: decode keeps the source DICOM (``ModelInput.source``); other input is refused with 415
            before inference.
        check: refuses an input before inference (raises an ``ImageError`` subclass), e.g. a DICOM that a
            DICOM SEG cannot reference.
        openapi: the OpenAPI media-type object of the answer (schema, example); None: a binary string.
        cheap: encodes in microseconds (a few numbers per image): small answers are encoded on the event loop
            instead of paying a thread round trip.
        one_image: the answer covers one image (e.g. one DICOM object per source instance): an endpoint that
            takes several files refuses a request with more than one for this format (422, before decoding).
        needs_scores: renders the model's class scores, not only the mask; endpoints whose answers are masks
            made otherwise (``POST /segment/interactive``) do not offer it.
        check_options: refuses, before inference, request options the format cannot honour for this model
            (``(runner, options) -> None``, raising an ``app.errors.Problem``), e.g. an unknown class.
        result_request: for a DICOM result, the encoder's first half: (runner, predictions, options) ->
            ``models.dicom_results.ResultRequest``, everything but the source image, so that the object can be
            written in another process that reads the source itself (the job system's writer processes);
            ``encoder`` must equal writing that request for the input's source.
    """

    task: str
    name: str
    media_type: str
    encoder: Callable[[RunnerT, Sequence[Prediction[Any]], ResponseOptions], bytes]
    description: str
    needs_pixels: bool = False
    needs_source: bool = False
    check: Callable[[ModelInput], None] | None = None
    openapi: dict[str, Any] | None = None
    cheap: bool = False
    one_image: bool = False
    needs_scores: bool = False
    check_options: Callable[[RunnerT, ResponseOptions], None] | None = None
    result_request: Callable[[RunnerT, Sequence[Prediction[Any]], ResponseOptions], ResultRequest] | None = (
        None
    )


def read_upload(upload: ImageUpload, *, max_pixels: int | None, intensity: str) -> DecodedImage:
    """Decodes an upload's bytes with the intensity policy ``intensity``; unexpected decoder failures on client
    data are reported as unreadable images.

    Raises:
        models.imageio.ImageError: (or a subclass) for bad images.
    """
    try:
        return read_image(
            upload.data,
            content_type=upload.content_type,
            filename=upload.filename,
            max_pixels=max_pixels,
            intensity=intensity,
            check_elements=not upload.checked,
        )
    except ImageError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:
        # Bad bytes can break a decoder in ways it does not type; still the client's data, still a 400.
        raise ImageError("the data is not a readable image") from exc


def model_input(
    upload: ImageUpload,
    decoded: DecodedImage,
    image: torch.Tensor,
    *,
    keep_pixels: bool,
    keep_source: bool,
) -> ModelInput:
    """The ``ModelInput`` of a decoded upload whose model input is ``image``; the pixels and the source DICOM
    only when kept, and of the DICOM only the identifiers answers may echo."""
    return ModelInput(
        image=image,
        height=decoded.height,
        width=decoded.width,
        filename=upload.filename,
        pixels=decoded.pixels if keep_pixels else None,
        dicom_uids=safe_identifiers(decoded.dicom) if decoded.dicom is not None else None,
        source=decoded.dicom if keep_source else None,
        source_format=decoded.format,
    )


class Runner(ABC, Generic[OutputT]):
    """Runs one model: ``setup`` (startup), ``decode`` (thread pool), ``predict`` (model thread, batched),
    ``encode`` (thread pool). A task subclasses it, sets ``task`` and implements ``preprocess`` and
    ``predict``.

    Args:
        name: the model's name (checkpoint file stem).
        model: the network in eval mode on ``serving.device``.
        metadata: the checkpoint's metadata.
        serving: device, precision and forward batch size.

    Raises:
        CheckpointError: a checkpoint of another task, or one the runner cannot serve (``check_metadata``).
    """

    task: ClassVar[str]

    def __init__(
        self, name: str, model: nn.Module, metadata: CheckpointMetadata, serving: ServingOptions
    ) -> None:
        if metadata.task != self.task:
            raise ValueError(f"{type(self).__name__} serves {self.task} models, not {metadata.task}")
        if serving.forward_batch_size < 1:
            raise ValueError(f"forward_batch_size must be >= 1, got {serving.forward_batch_size}")
        self.name = name
        self.model = model
        self.metadata = metadata
        self.spec = metadata.preprocessing
        try:
            self.intensity = resolve_intensity(self.spec.intensity)
        except ValueError as exc:  # reading differently from training would give silently wrong answers
            raise CheckpointError(f"{name}: {exc}; the checkpoint needs a newer MedServe") from exc
        self.device = serving.device
        self.precision = serving.precision
        self.forward_batch_size = serving.forward_batch_size  # the batch-size tuning may lower it
        self.ood: OODStatistics | None = metadata.ood
        self.ood_source: FeatureSource | None = None
        if self.ood is not None:
            try:
                self.ood_source = feature_source(model, self.ood)
            except ValueError as exc:
                raise CheckpointError(
                    f"{name}: the checkpoint has out-of-distribution statistics but {exc}"
                ) from exc
        # The runtime chosen at load (``app.runtimes``): (B, C, H, W) -> logits; None: PyTorch eager.
        self.engine: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.check_metadata()

    @classmethod
    def setup(
        cls, name: str, model: nn.Module, metadata: CheckpointMetadata, serving: ServingOptions
    ) -> Self:
        """Builds the runner of a loaded checkpoint: the network moves onto the device (eval mode, channels_last).

        Raises:
            CheckpointError: a checkpoint the runner cannot serve.
        """
        return cls(name, prepare_for_device(model, serving.device), metadata, serving)

    def check_metadata(self) -> None:
        """Task-specific checks of the checkpoint (and settings read from it), run at the end of ``__init__``.

        Raises ``models.checkpoint.CheckpointError`` for a checkpoint the runner cannot serve.
        """

    @property
    def classes(self) -> list[str]:
        return self.metadata.classes

    @property
    def version(self) -> str:
        return self.metadata.version

    def read(self, upload: ImageUpload, *, max_pixels: int | None) -> DecodedImage:
        """Decodes the bytes with the checkpoint's intensity policy (``read_upload``)."""
        return read_upload(upload, max_pixels=max_pixels, intensity=self.intensity)

    def decode(
        self,
        upload: ImageUpload,
        *,
        max_pixels: int | None,
        keep_pixels: bool = False,
        keep_source: bool = False,
    ) -> ModelInput:
        """Bytes -> model input; ``keep_pixels`` and ``keep_source`` (the DICOM) as the output format needs.

        Raises:
            models.imageio.ImageError: (or a subclass) for bad images.
        """
        decoded = self.read(upload, max_pixels=max_pixels)
        return model_input(
            upload, decoded, self.preprocess(decoded.pixels), keep_pixels=keep_pixels, keep_source=keep_source
        )

    def forward_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's logits (float32, CPU) for a normalised batch (B, C, H, W): on the runtime chosen at load
        (``engine``), else PyTorch eager (``models.inference.forward``)."""
        if self.engine is not None:
            return self.engine(batch)
        return forward(self.model, batch, self.device, self.precision)

    @abstractmethod
    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        """Decoded (H, W, C) pixels in [0, 1] -> the model's normalised input (C, H', W')."""

    @abstractmethod
    def predict(self, inputs: list[ModelInput]) -> list[OutputT]:
        """Runs the model on a batch of decoded inputs; one output per input, in order."""

    def encode(
        self,
        predictions: Sequence[Prediction[OutputT]],
        output_format: OutputFormat[Self],
        options: ResponseOptions,
    ) -> Encoded:
        """The response to one request (all its images, in upload order) in ``output_format``.

        Raises:
            models.imageio.ImageError: (a subclass) the format cannot render this input.
        """
        if output_format.task != self.task:
            raise ValueError(f"format {output_format.name!r} is for {output_format.task}, not {self.task}")
        return Encoded(output_format.encoder(self, predictions, options), output_format.media_type)

    def warmup_input(self) -> ModelInput:
        """A neutral input of the size the model sees (the working size under ``fit``), used to warm it up."""
        h, w = self.spec.working_size or self.spec.img_size
        return ModelInput(torch.zeros(self.spec.in_channels, h, w), h, w)

    def network_outputs(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """The network's raw outputs (float32 numpy, one per image) for same-sized normalised inputs, on the
        runtime chosen at load (``forward_logits``)."""
        outputs: list[np.ndarray] = []
        for start in range(0, len(images), self.forward_batch_size):
            chunk = torch.stack(images[start : start + self.forward_batch_size])
            outputs.extend(row.numpy() for row in self.forward_logits(chunk))
        return outputs

    def predict_assessed(self, inputs: list[ModelInput]) -> list[OutputT]:
        """``predict``; with OOD statistics, the feature layer's output is collected during its forward passes
        (no second pass) and each input's ``ood`` is set."""
        if self.ood_source is None:
            return self.predict(inputs)
        with FeatureTap(self.ood_source.modules, self.ood_source.pooling) as tap:
            outputs = self.predict(inputs)
        self.assess_ood(inputs, tap.features())
        return outputs

    def run_batch(self, inputs: list[ModelInput]) -> list[Any]:
        """What the batcher calls in the model's thread, under ``torch.inference_mode()``:
        ``predict_assessed`` for the task's inputs, ``network_outputs`` for ``raw`` ones (the Open Inference
        Protocol; no OOD score), in one batch and in the inputs' order."""
        with torch.inference_mode():
            if not any(item.raw for item in inputs):
                return list(self.predict_assessed(inputs))
            answers: list[Any] = [None] * len(inputs)
            task_items = [i for i, item in enumerate(inputs) if not item.raw]
            raw_items = [i for i, item in enumerate(inputs) if item.raw]
            if task_items:
                task_outputs = self.predict_assessed([inputs[i] for i in task_items])
                for i, output in zip(task_items, task_outputs, strict=True):
                    answers[i] = output
            raw_outputs = self.network_outputs([inputs[i].image for i in raw_items])
            for i, raw_output in zip(raw_items, raw_outputs, strict=True):
                answers[i] = raw_output
            return answers

    def feature_rows(self, item: ModelInput) -> int:
        """How many rows of OOD features ``predict``'s forward passes produce for ``item`` (its windows)."""
        return 1

    def assess_ood(self, inputs: list[ModelInput], features: torch.Tensor) -> None:
        """Sets each input's ``ood`` from the features of one ``predict`` call (rows in input order)."""
        assert self.ood is not None
        counts = [self.feature_rows(item) for item in inputs]
        if features.shape[0] != sum(counts):
            raise RuntimeError(
                f"{self.name}: {features.shape[0]} OOD feature rows for {sum(counts)} expected from "
                f"{len(inputs)} inputs"
            )
        per_input = features if all(c == 1 for c in counts) else per_image(features, counts)
        for item, score in zip(inputs, self.ood.scores(per_input), strict=True):
            item.ood = self.ood.assess(float(score))

    def describe(self) -> dict[str, Any]:
        """What ``GET /models`` shows about the model."""
        meta = self.metadata
        return {
            "task": meta.task,
            "version": meta.version,
            "architecture": meta.architecture.name,
            "classes": meta.classes,
            "input_size": list(self.spec.img_size),
            "in_channels": self.spec.in_channels,
            "resize": self.spec.resize,
            "working_size": list(self.spec.working_size) if self.spec.working_size else None,
            # How training planned the working resolution (segmentation; absent from older checkpoints).
            "plan": meta.extra.get("plan"),
            "intensity": self.intensity,
            "metrics": meta.metrics,
            "created_at": meta.created_at,
            "device": str(self.device),
            "precision": self.precision if self.device.type == "cuda" else "fp32",
            # Out-of-distribution statistics (models.ood): threshold, percentile, features; None without.
            "ood": self.ood.summary() if self.ood is not None else None,
        }
