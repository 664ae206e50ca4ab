"""Service settings: one pydantic-settings class read from ``MEDSERVE_*`` environment variables.

Every field maps to an environment variable with the ``MEDSERVE_`` prefix (``max_batch_size`` ->
``MEDSERVE_MAX_BATCH_SIZE``). Keyword arguments to ``Settings(...)`` (used by the CLI and by tests) take
precedence over the environment. ``load_settings`` turns pydantic's validation errors into one
``SettingsError`` whose message names the environment variables at fault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MEDSERVE_"
MIB = 1024 * 1024


class SettingsError(ValueError):
    """Invalid service configuration; the message names each offending ``MEDSERVE_*`` variable."""


class Settings(BaseSettings):
    """Configuration of the inference service (environment variables ``MEDSERVE_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    model_dir: Path = Field(
        default=Path("checkpoints"), description="directory whose *.pt checkpoints are served (name = stem)"
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="fp16/bf16 autocast on CUDA only; the CPU always runs fp32"
    )
    max_batch_size: int = Field(default=16, ge=1, le=1024, description="most requests in one model batch")
    max_batch_delay_ms: float = Field(
        default=10.0,
        ge=0.0,
        le=10_000.0,
        description="longest wait for a batch to fill after its first request",
    )
    max_queue: int = Field(
        default=256, ge=1, description="requests waiting per model (queued + being decoded); beyond: 503"
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0.0, description="a request not started within this many seconds gets 504"
    )
    max_upload_bytes: int = Field(default=32 * MIB, ge=1024, description="largest request body in bytes")
    max_pixels: int = Field(
        default=25_000_000, ge=1, description="largest image (width x height), checked from the header"
    )
    max_files: int = Field(default=16, ge=1, le=1024, description="most images in one /classify request")
    decode_workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        le=64,
        description="threads decoding uploads and encoding results (default: min(4, CPU count))",
    )
    torch_threads: int = Field(
        default=0, ge=0, le=256, description="intra-op threads of PyTorch on the CPU; 0 keeps its default"
    )
    warmup: bool = Field(default=True, description="run warm-up batches per model before reporting ready")
    batch_autotune: bool = Field(
        default=True,
        description="at warm-up, time batches of 1, 2, 4, ... MAX_BATCH_SIZE and cap each model's batches at "
        "the size with the best throughput (needs WARMUP)",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each model at load (compiled during warm-up; worth it on CUDA, slow to start)",
    )
    # -- access, logs, shutdown, workers (production hardening) --
    api_keys: SecretStr | None = Field(
        default=None,
        description="comma-separated API keys; with none (and no API_KEYS_FILE) the service is open",
    )
    api_keys_file: Path | None = Field(
        default=None, description="file with one API key per line (# comments)"
    )
    metrics_auth: bool = Field(default=True, description="GET /metrics needs an API key (when keys are set)")
    docs_auth: bool = Field(
        default=False,
        description="/docs, /redoc, /openapi.json and /problems/* need an API key (when keys are set)",
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="json (one object per line) or text"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(default="info")
    access_log: bool = Field(
        default=True, description="one log line per request (no query, client or headers)"
    )
    shutdown_timeout_s: float = Field(
        default=25.0,
        gt=0.0,
        le=3600.0,
        description="on SIGTERM, longest wait for accepted requests to finish (medserve serve); keep below the "
        "orchestrator's grace period",
    )
    workers: int = Field(
        default=1, ge=1, le=64, description="worker processes of medserve serve, each with its own models"
    )
    # -- models replaced without downtime (hot reload, versions) --
    model_poll_s: float = Field(
        default=10.0,
        ge=0.0,
        le=86_400.0,
        description="seconds between scans of MODEL_DIR for new, replaced and removed checkpoints; 0 turns the "
        "watcher off (POST /admin/models/reload still rescans)",
    )
    keep_versions: int = Field(
        default=1,
        ge=0,
        le=16,
        description="previous versions of each model kept loaded after a replacement (chosen with ?version=)",
    )

    # -- PACS jobs: job store, spool, routing, pull and delivery retries (app/pacs, docs/pacs.md) --
    jobs_enabled: bool = Field(
        default=True, description="the job system (STOW-RS, /jobs, the worker); false turns it off"
    )
    jobs_db: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job store (postgresql://... is run with psycopg 3); default: "
        "sqlite:///MODEL_DIR/.medserve/jobs.sqlite",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="received instances and results waiting for delivery (default: beside JOBS_DB)",
    )
    spool_max_bytes: int = Field(
        default=0,
        ge=0,
        description="most bytes of received instances in the spool; 0: as much as the disk takes",
    )
    spool_retention_s: float = Field(
        default=0.0, ge=0.0, description="keep a spooled instance this long after all its jobs finished"
    )
    routes: Path | None = Field(
        default=None, description="YAML or JSON routing rules; default: every image to every ready model"
    )
    jobs_concurrency: int = Field(default=32, ge=1, le=4096, description="jobs in flight per service process")
    jobs_writers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="processes writing the jobs' DICOM results beside the service (app.pacs.writers); 0: in "
        "the service's threads",
    )
    jobs_lease_s: float = Field(
        default=30.0,
        gt=0.0,
        description="a running job whose process stopped renewing it is reclaimed after this",
    )
    results_dir: Path | None = Field(
        default=None,
        description="write results into this folder, not the archive (with neither: SPOOL_DIR/results-out)",
    )
    pacs_url: str | None = Field(
        default=None, description="the archive's DICOMweb root, e.g. http://orthanc:8042/dicom-web"
    )
    pacs_username: str | None = Field(default=None, description="HTTP basic user name for the archive")
    pacs_password: SecretStr | None = Field(default=None, description="HTTP basic password for the archive")
    delivery_max_attempts: int = Field(
        default=8, ge=1, le=1000, description="delivery attempts of a result before its job fails"
    )
    delivery_backoff_s: float = Field(
        default=1.0, gt=0.0, description="wait after the first failed delivery attempt (doubles, with jitter)"
    )
    delivery_backoff_max_s: float = Field(
        default=300.0, gt=0.0, description="longest wait between delivery attempts"
    )

    # -- PACS delivery transports and DICOM networking (app/pacs/delivery.py, app/pacs/dimse.py) --
    dimse_destination: str | None = Field(
        default=None,
        pattern=r"^[^@]{1,16}@[^:@]+:\d{1,5}$",
        description="AE@host:port of a DIMSE-only archive: results go there by C-STORE instead of STOW-RS",
    )
    delivery_timeout_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="network time-out of one delivery (STOW-RS or C-STORE)"
    )
    dimse_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="with a port, MedServe is a DICOM node (C-ECHO, C-STORE SCP)",
    )
    dimse_ae_title: str = Field(
        default="MEDSERVE",
        min_length=1,
        max_length=16,
        description="MedServe's AE title (called and calling)",
    )
    dimse_allowed: str = Field(
        default="",
        description="comma-separated AE@host entries allowed to associate; empty refuses every caller",
    )
    dimse_host: str = Field(default="0.0.0.0", description="address the DICOM port listens on")
    # -- explanations (POST /classify?explain=gradcam, app.explain) --
    explain_max_queue: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="explanation requests waiting per model (queued or being decoded; the one being explained not "
        "counted); beyond: 503",
    )
    explain_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="PyTorch threads of each model's explanation worker (it runs at a lower CPU priority than "
        "inference)",
    )

    # -- inference runtimes: the fastest verified runtime per model (app/runtimes.py, docs/runtimes.md) --
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        default="auto",
        description="auto: at load, build PyTorch eager (both memory layouts), ONNX Runtime and OpenVINO (when "
        "installed; CUDA: PyTorch at PRECISION and ONNX Runtime's CUDA/TensorRT providers), verify each against "
        "fp32 PyTorch and serve the fastest per batch size; torch: PyTorch eager only; onnxruntime/openvino: "
        "that runtime only (a model it cannot serve fails to load)",
    )
    runtime_cache: Path | None = Field(
        default=None,
        description="directory of built runtime artefacts (ONNX exports, OpenVINO blobs), by model version; "
        "unset: MODEL_DIR/.medserve-cache, or $XDG_CACHE_HOME/medserve/runtimes when the model directory is "
        "read-only",
    )

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0


def env_name(field: str) -> str:
    """The environment variable of a settings field, e.g. ``max_queue`` -> ``MEDSERVE_MAX_QUEUE``."""
    return ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Reads the settings from the environment (``overrides`` win) and validates them.

    Raises:
        SettingsError: one line per invalid variable, e.g.
            ``MEDSERVE_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1``.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "?"
            value = error.get("input")
            shown = f"={value!r}" if isinstance(value, str | int | float) else ""
            lines.append(f"{env_name(field)}{shown}: {error['msg']}")
        raise SettingsError("invalid MedServe settings:\n  " + "\n  ".join(lines)) from exc


def check_runtime(settings: Settings) -> None:
    """Checks what the field validators cannot: that the model directory exists.

    Raises:
        SettingsError: naming ``MEDSERVE_MODEL_DIR`` and the path.
    """
    if not settings.model_dir.is_dir():
        raise SettingsError(
            f"{env_name('model_dir')}={str(settings.model_dir)!r}: no such directory "
            "(create it, or build demo checkpoints with `medserve demo --model-dir DIR`)"
        )
