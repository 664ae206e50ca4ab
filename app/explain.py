"""Explanation maps of ``POST /classify?explain=gradcam``: one bounded worker per model, beside its batcher.

Gradients cannot run inside the inference batch (it runs under ``torch.inference_mode()`` and must not wait for
backward passes), so each classifier that is asked for an explanation gets a ``ModelExplainer``:

* its own worker: an ``app.batching.Batcher`` of batch size 1 with its own thread and queue limit
  (``MEDSERVE_EXPLAIN_MAX_QUEUE`` requests, counted per request whatever its number of images; beyond it a 503
  ``/problems/queue-full`` with ``Retry-After`` at once, before the body is read);
* its own copy of the network (``models.explain.GradCam``, deep-copied in that thread on the first explanation),
  so the module the batch thread runs is never hooked, never locked and never waits for an explanation;
* a thread with ``MEDSERVE_EXPLAIN_THREADS`` PyTorch threads (default 1) at a lower CPU priority than inference
  (Linux per-thread niceness ``EXPLAIN_THREAD_NICENESS``): on a busy CPU explanations fill the gaps the model's
  threads leave instead of slowing plain ``/classify`` requests.

A request with ``explain`` takes one place in the explainer (first) and its usual places in the model's batcher;
the images are decoded once (keeping their pixels, for the overlay), classified in the batch, then explained in
the explainer, which also renders the maps (PNG, base64), so explanations never occupy the decode pool.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from app.batching import Batcher, QueueFullError, Reservation
from app.contract import ModelInput, ResponseOptions, Runner
from app.errors import InvalidRequest, QueueFull, retry_after
from app.outputs import png_bytes
from app.runners import ClassificationRunner
from app.settings import Settings
from models.explain import GRADCAM, GradCam, TargetLayer, cam_to_original, heat_overlay, heat_to_uint8

ExplainMethod = Literal["gradcam"]

# Scheduling priority of the explanation threads relative to the model's (Linux niceness, 0 = the default).
EXPLAIN_THREAD_NICENESS = 10


@dataclass(frozen=True)
class ExplanationJob:
    """The images of one request and the class index to explain in each."""

    items: Sequence[ModelInput]
    targets: Sequence[int]


def encode_png_base64(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


class ModelExplainer:
    """Explains one classifier's answers in its own worker thread, on its own copy of the network.

    Args:
        runner: the model's runner (its network is copied, never used directly).
        layer: where Grad-CAM explains it.
        settings: ``explain_max_queue``, ``explain_threads`` and ``request_timeout_s``.
    """

    def __init__(self, runner: ClassificationRunner, layer: TargetLayer, settings: Settings) -> None:
        self.runner = runner
        self.layer = layer
        self.threads = settings.explain_threads
        self.batcher: Batcher[ExplanationJob, list[dict[str, Any]]] = Batcher(
            f"{runner.name}-explain",
            self.run_jobs,
            max_batch_size=1,
            max_delay_s=0.0,
            max_queue=settings.explain_max_queue,
            timeout_s=settings.request_timeout_s,
        )
        self.cam: GradCam | None = None  # built in the worker thread on the first job
        self.explained = 0  # images explained (read on the event loop, written in the worker thread)

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def reserve(self) -> Reservation[ExplanationJob, list[dict[str, Any]]]:
        """A place for one request's explanations.

        Raises:
            app.errors.QueueFull: the explainer's queue is full (503 with Retry-After).
        """
        try:
            return self.batcher.reserve()
        except QueueFullError as exc:
            raise QueueFull(
                f"model {self.runner.name!r} has {self.batcher.max_queue} explanation requests waiting; retry "
                "later, or classify without explain",
                headers=retry_after(exc.retry_after_s),
            ) from exc

    def _start_thread(self) -> None:
        torch.set_num_threads(self.threads)
        if hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), EXPLAIN_THREAD_NICENESS)

    def run_jobs(self, jobs: list[ExplanationJob]) -> list[list[dict[str, Any]]]:
        """The worker thread's work: each job's images explained and rendered, in order."""
        if self.cam is None:
            self._start_thread()
            self.cam = GradCam(self.runner.model, self.layer)
        results = []
        for job in jobs:
            results.append(
                [self.render(item, target) for item, target in zip(job.items, job.targets, strict=True)]
            )
        return results

    def render(self, item: ModelInput, target: int) -> dict[str, Any]:
        """One image's ``explanation`` object: the Grad-CAM map of class ``target`` at the image's original size,
        as an 8-bit gray PNG and drawn over the image."""
        assert self.cam is not None
        if item.pixels is None:
            raise ValueError("an explanation needs the decoded pixels (decode with keep_pixels=True)")
        cam = self.cam.explain(item.image, target)
        heat = cam_to_original(cam, item.height, item.width, self.runner.spec)
        self.explained += 1
        return {
            "method": GRADCAM,
            "target": self.runner.classes[target],
            "heatmap_png": encode_png_base64(heat_to_uint8(heat)),
            "overlay_png": encode_png_base64(heat_overlay(item.pixels, heat)),
        }

    def snapshot(self) -> dict[str, Any]:
        return {**self.batcher.snapshot(), "images_explained": self.explained}


class Explanations:
    """The explainers of one app (``app.state.explanations``), made when a model is first asked to explain."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.explainers: dict[str, ModelExplainer] = {}

    def explainer(self, runner: ClassificationRunner, layer: TargetLayer) -> ModelExplainer:
        """The model's explainer (made and started now if new); call on the event loop."""
        found = self.explainers.get(runner.name)
        if found is None:
            found = self.explainers[runner.name] = ModelExplainer(runner, layer, self.settings)
            found.start()
        return found

    async def close(self) -> None:
        """Stops every explainer after it has run what it accepted."""
        for explainer in list(self.explainers.values()):
            await explainer.stop()


@dataclass(frozen=True)
class ExplanationPlan:
    """A request's explanations: which explainer, and which class (None: each image's predicted label)."""

    explainer: ModelExplainer
    target: int | None

    def reserve(self) -> Reservation[ExplanationJob, list[dict[str, Any]]]:
        """A place in the explainer, taken before the request's body is read (503 at once when full)."""
        return self.explainer.reserve()

    async def run(
        self,
        place: Reservation[ExplanationJob, list[dict[str, Any]]],
        items: Sequence[ModelInput],
        probabilities: Sequence[np.ndarray],
    ) -> list[dict[str, Any]]:
        """The ``explanation`` of each image, in order, explaining ``target`` or the image's predicted label."""
        targets = [self.target if self.target is not None else int(np.argmax(p)) for p in probabilities]
        return await place.submit(ExplanationJob(list(items), targets))


def _parameter_error(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(
        f"invalid parameter(s): {name} ({message})",
        extra={"errors": [{"loc": ["query", name], "msg": message}]},
    )


def plan_explanations(
    explanations: Explanations, runner: Runner[Any], options: ResponseOptions
) -> ExplanationPlan | None:
    """What the request's ``explain`` and ``target`` ask of ``runner``; None without ``explain``.

    Raises:
        app.errors.InvalidRequest: (422) an unknown method, a model that cannot be explained, or a ``target``
            that is not one of the model's classes.
    """
    if options.explain is None:
        return None
    if options.explain != GRADCAM:
        raise _parameter_error("explain", f"explain must be {GRADCAM!r}, not {options.explain!r}")
    layer = runner.explain_layer if isinstance(runner, ClassificationRunner) else None
    if not isinstance(runner, ClassificationRunner) or layer is None:
        raise _parameter_error(
            "explain", f"model {runner.name!r} has no convolutional layer Grad-CAM could explain"
        )
    target: int | None = None
    if options.explain_target is not None:
        if options.explain_target not in runner.classes:
            raise _parameter_error(
                "target",
                f"target must be one of the model's classes {runner.classes}, not {options.explain_target!r}",
            )
        target = runner.classes.index(options.explain_target)
    return ExplanationPlan(explanations.explainer(runner, layer), target)


def with_explainer_stats(models: list[dict[str, Any]], explanations: Explanations) -> list[dict[str, Any]]:
    """``GET /models``'s entries, each classifier's ``explain`` with its explainer's counters once it has one."""
    for info in models:
        explainer = explanations.explainers.get(info["name"])
        if explainer is not None and info.get("explain") is not None:
            info["explain"] = {**info["explain"], "stats": explainer.snapshot()}
    return models


def check_explain_options(explain: str | None, target: str | None) -> None:
    """``target`` only means something with ``explain``.

    Raises:
        app.errors.InvalidRequest: ``target`` without ``explain``.
    """
    if target is not None and explain is None:
        raise _parameter_error(
            "target", "target chooses the class an explanation shows: it needs explain=gradcam"
        )
