"""The served models: discovery in the model directory, loading, warm-up, one batcher each, and lookup.

Every ``*.pt`` file in ``MEDSERVE_MODEL_DIR`` is one model, named by its file stem. A checkpoint that fails to
load or warm up is kept in the registry with status ``failed`` and its error (shown by ``GET /models`` and
logged); the other models still serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch

from app.batching import Batcher
from app.errors import ModelNotFound, ModelRequired, ModelUnavailable, NotReady, retry_after
from app.logs import note_model
from app.runners import Runner, load_runner
from app.runtimes import RuntimeSelection, RuntimeSelectionError, select_runtime
from app.settings import Settings
from models.checkpoint import SUFFIX, CheckpointError
from models.inference import Precision

logger = logging.getLogger("medserve.registry")

Status = Literal["loading", "ready", "failed"]

# Batch-size tuning at warm-up: a larger batch is chosen only if it beats the best so far by this factor (a
# noise guard; smaller batches also mean lower latency), and doubling stops once a size is clearly slower.
AUTOTUNE_MARGIN = 1.02
AUTOTUNE_STOP = 0.9


def candidate_batch_sizes(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, then ``limit`` itself (e.g. 12 -> [1, 2, 4, 8, 12])."""
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    if limit > 1:
        sizes.append(limit)
    return sizes


def _timed(fn: Callable[[list[Any]], Any], inputs: list[Any]) -> float:
    started = time.perf_counter()
    fn(inputs)
    return time.perf_counter() - started


@dataclass
class ModelHandle:
    """One checkpoint of the model directory and, once loaded, its runner and batcher."""

    name: str
    path: Path
    status: Status = "loading"
    error: str | None = None
    runner: Runner[Any] | None = None
    batcher: Batcher[Any, Any] | None = None
    load_seconds: float | None = None
    batch_rates: dict[int, float] | None = None
    runtime: RuntimeSelection | None = None

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
        if self.batch_rates:
            info["batch_autotune"] = {
                "chosen": self.batcher.max_batch_size if self.batcher is not None else None,
                "images_per_second": {str(k): round(v, 3) for k, v in self.batch_rates.items()},
            }
        if self.runtime is not None:
            info["runtime"] = self.runtime.describe()
        if self.batcher is not None:
            info["stats"] = self.batcher.snapshot()
        return info


def _load_error(exc: Exception, path: Path) -> str:
    """The error shown in /models: the file name instead of the server's path, the cause in words."""
    message = str(exc).replace(str(path), path.name)
    if isinstance(exc, CheckpointError | RuntimeSelectionError):
        return message
    return f"{path.name}: cannot be served ({type(exc).__name__}: {message})"


class ModelRegistry:
    """Loads and holds the models of one model directory.

    Args:
        settings: the service settings (model directory, batching policy, precision).
        device: where the models run (already resolved from ``settings.device``).
        model_threads: PyTorch intra-op threads of each model's worker thread (None: leave as inherited).
    """

    def __init__(
        self,
        settings: Settings,
        device: torch.device,
        model_threads: int | None = None,
        on_batch: Callable[[str, Sequence[float], float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.model_threads = model_threads
        self.on_batch = on_batch
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
                on_batch=self.on_batch,
            )
            if settings.compile:
                # Compiled on its first forward passes: the warm-up, in the model's own thread.
                runner.model = cast(torch.nn.Module, torch.compile(runner.model))
            if self.model_threads:
                # The thread count is per OS thread with OpenMP: set it in the model's own worker thread.
                await batcher.call(torch.set_num_threads, self.model_threads)
            handle.runtime = await select_runtime(
                runner, batcher.call, settings, self.device, self._warm_up_sizes(), source=handle.path
            )
            if settings.warmup:
                handle.batch_rates = await self._warm_up(runner, batcher)
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
            if isinstance(exc, RuntimeSelectionError):
                handle.runtime = exc.selection  # the candidates tried, and why none can serve
            # A refused checkpoint is expected operation; anything else gets its traceback in the log.
            trace = None if isinstance(exc, CheckpointError | RuntimeSelectionError) else exc
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

    def _warm_up_sizes(self) -> list[int]:
        """The batch sizes the warm-up runs (and the runtimes are timed at)."""
        limit = self.settings.max_batch_size
        return candidate_batch_sizes(limit) if self.settings.batch_autotune else sorted({1, limit})

    async def _warm_up(self, runner: Runner[Any], batcher: Batcher[Any, Any]) -> dict[int, float] | None:
        """Runs warm-up batches in the model's thread; with ``batch_autotune``, also picks the batch size.

        Without tuning: one batch of 1 and one of ``MAX_BATCH_SIZE`` (the shapes seen most). With tuning:
        batches of 1, 2, 4, ... up to ``MAX_BATCH_SIZE``, each run once to build its kernels and once timed;
        the model's batches are then capped at the size with the best throughput. On a CPU a large network can
        be slower per image in big batches (memory-bound), on a GPU the largest batch usually wins.

        Returns:
            images per second by batch size when tuning, else None.
        """
        settings = self.settings
        if not settings.batch_autotune:
            for size in sorted({1, settings.max_batch_size}):
                await batcher.call(runner.run_batch, [runner.warmup_input() for _ in range(size)])
            return None
        rates: dict[int, float] = {}
        best = 1
        for size in candidate_batch_sizes(settings.max_batch_size):
            inputs = [runner.warmup_input() for _ in range(size)]
            await batcher.call(runner.run_batch, inputs)
            rates[size] = size / max(await batcher.call(_timed, runner.run_batch, inputs), 1e-9)
            if rates[size] > rates[best] * AUTOTUNE_MARGIN:
                best = size
            elif rates[size] < rates[best] * AUTOTUNE_STOP:
                break
        batcher.max_batch_size = best
        runner.forward_batch_size = best
        logger.info(
            "model %s: batch size %d (of %d) has the best throughput: %s images/s",
            runner.name,
            best,
            settings.max_batch_size,
            {k: round(v, 2) for k, v in rates.items()},
        )
        return rates

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
            if handle is not None:
                note_model(handle.name)  # a served checkpoint's name: safe as a log field and metric label
            if handle is not None and handle.status == "failed":
                raise ModelUnavailable(f"model {name!r} failed to load; GET /models shows the error")
            if handle is None or handle.task != task:
                raise ModelNotFound(
                    f"no {task} model named {name!r}; available: {self.names(task) or 'none'}"
                )
            return handle
        candidates = [h for h in self.models.values() if h.status == "ready" and h.task == task]
        if len(candidates) == 1:
            note_model(candidates[0].name)
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
