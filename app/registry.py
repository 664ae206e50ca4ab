"""The served models: discovery in the model directory, loading, warm-up, one batcher each, and lookup.

Every ``*.pt`` file in ``MEDSERVE_MODEL_DIR`` is one model, named by its file stem. A checkpoint that fails to
load or warm up is kept in the registry with status ``failed`` and its error (shown by ``GET /models`` and
logged); the other models still serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from app.batching import Batcher
from app.errors import ModelNotFound, ModelRequired, ModelUnavailable, NotReady, retry_after
from app.runners import Runner, load_runner
from app.settings import Settings
from models.checkpoint import SUFFIX, CheckpointError
from models.inference import Precision

logger = logging.getLogger("medserve.registry")

Status = Literal["loading", "ready", "failed"]


@dataclass
class ModelHandle:
    """One checkpoint of the model directory and, once loaded, its runner and batcher."""

    name: str
    path: Path
    status: Status = "loading"
    error: str | None = None
    runner: Runner[Any, Any] | None = None
    batcher: Batcher[Any, Any] | None = None
    load_seconds: float | None = None

    @property
    def task(self) -> str | None:
        return self.runner.task if self.runner is not None else None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "file": self.path.name, "status": self.status}
        if self.error is not None:
            info["error"] = self.error
        if self.runner is not None:
            info.update(self.runner.describe())
        info["load_seconds"] = self.load_seconds
        if self.batcher is not None:
            info["stats"] = self.batcher.snapshot()
        return info


def _load_error(exc: Exception, path: Path) -> str:
    """The error shown in /models: the file name instead of the server's path, the cause in words."""
    message = str(exc).replace(str(path), path.name)
    if isinstance(exc, CheckpointError):
        return message
    return f"{path.name}: cannot be served ({type(exc).__name__}: {message})"


class ModelRegistry:
    """Loads and holds the models of one model directory.

    Args:
        settings: the service settings (model directory, batching policy, precision).
        device: where the models run (already resolved from ``settings.device``).
        model_threads: PyTorch intra-op threads of each model's worker thread (None: leave as inherited).
    """

    def __init__(self, settings: Settings, device: torch.device, model_threads: int | None = None) -> None:
        self.settings = settings
        self.device = device
        self.model_threads = model_threads
        self.models: dict[str, ModelHandle] = {
            path.stem: ModelHandle(path.stem, path)
            for path in sorted(settings.model_dir.glob(f"*{SUFFIX}"))
            if path.is_file()
        }
        self.loaded = asyncio.Event()

    @property
    def ready(self) -> bool:
        """All checkpoints were tried and at least one model serves."""
        return self.loaded.is_set() and any(h.status == "ready" for h in self.models.values())

    async def load_all(self) -> None:
        """Loads, warms up and starts every model, one after the other; failures are recorded, not raised."""
        try:
            for handle in self.models.values():
                await self._load(handle)
        finally:
            self.loaded.set()
        ready = [h.name for h in self.models.values() if h.status == "ready"]
        failed = [h.name for h in self.models.values() if h.status == "failed"]
        if not self.models:
            logger.warning("no checkpoints (*%s) in %s: nothing to serve", SUFFIX, self.settings.model_dir)
        logger.info("models ready: %s; failed: %s", ready or "none", failed or "none")

    async def _load(self, handle: ModelHandle) -> None:
        settings = self.settings
        started = time.perf_counter()
        batcher: Batcher[Any, Any] | None = None
        try:
            precision: Precision = settings.precision
            runner = await asyncio.to_thread(
                load_runner,
                handle.name,
                handle.path,
                device=self.device,
                precision=precision,
                forward_batch_size=settings.max_batch_size,
            )
            batcher = Batcher(
                handle.name,
                runner.run_batch,
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_batch_delay_s,
                max_queue=settings.max_queue,
                timeout_s=settings.request_timeout_s,
            )
            if self.model_threads:
                # The thread count is per OS thread with OpenMP: set it in the model's own worker thread.
                await batcher.call(torch.set_num_threads, self.model_threads)
            if settings.warmup:
                # In the model's own thread, at batch 1 and at the largest batch: the shapes it will see most.
                sizes = sorted({1, settings.max_batch_size})
                for size in sizes:
                    await batcher.call(runner.run_batch, [runner.warmup_input() for _ in range(size)])
            batcher.start()
        except asyncio.CancelledError:
            if batcher is not None:
                await batcher.stop()
            raise
        except Exception as exc:
            if batcher is not None:
                await batcher.stop()
            handle.status = "failed"
            handle.error = _load_error(exc, handle.path)
            # A refused checkpoint is expected operation; anything else gets its traceback in the log.
            trace = None if isinstance(exc, CheckpointError) else exc
            logger.error("model %s failed to load: %s", handle.name, handle.error, exc_info=trace)
        else:
            handle.runner, handle.batcher, handle.status = runner, batcher, "ready"
            logger.info(
                "model %s ready: %s, version %s, on %s",
                handle.name,
                runner.task,
                runner.version,
                self.device,
            )
        handle.load_seconds = round(time.perf_counter() - started, 3)

    def resolve(self, task: str, name: str | None) -> ModelHandle:
        """The ready model of ``task`` named ``name`` (or the only one when ``name`` is None).

        Raises:
            NotReady: models are still loading.
            ModelNotFound: no model of this task has that name (or none is served at all).
            ModelUnavailable: the model (or every model) failed to load.
            ModelRequired: several models of the task are served and none was named.
        """
        if not self.loaded.is_set():
            raise NotReady("models are still loading; retry shortly", headers=retry_after(5))
        if name is not None:
            handle = self.models.get(name)
            if handle is not None and handle.status == "failed":
                raise ModelUnavailable(f"model {name!r} failed to load; GET /models shows the error")
            if handle is None or handle.task != task:
                raise ModelNotFound(
                    f"no {task} model named {name!r}; available: {self.names(task) or 'none'}"
                )
            return handle
        candidates = [h for h in self.models.values() if h.status == "ready" and h.task == task]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ModelRequired(
                f"several {task} models are served; choose one with ?model=NAME: {self.names(task)}"
            )
        if any(h.status == "failed" for h in self.models.values()):
            raise ModelUnavailable(
                f"no {task} model is available; some checkpoints failed to load (GET /models)"
            )
        raise ModelNotFound(f"no {task} model is served")

    def names(self, task: str) -> list[str]:
        return [h.name for h in self.models.values() if h.status == "ready" and h.task == task]

    def describe(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self.models.values()]

    async def close(self) -> None:
        """Stops every batcher after it has run what it accepted."""
        await asyncio.gather(*(h.batcher.stop() for h in self.models.values() if h.batcher is not None))
