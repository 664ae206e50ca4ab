"""The checkpoint format: the contract between training and serving.

A checkpoint is one file written with ``torch.save`` holding only plain containers, strings and tensors::

    {
        "medserve_format": "medserve.checkpoint",
        "format_version": 2,
        "metadata": "<JSON text of CheckpointMetadata>",
        "state_dict": {name: tensor, ...},
    }

It is read with ``torch.load(..., weights_only=True)``, which refuses any pickle that would import or call
code, so a crafted file cannot execute anything. The metadata is stored as JSON text (not pickled objects) and
validated with pydantic on load. ``version`` is a SHA-256 over the weights and the metadata (minus the version
itself): the same model always has the same version, and any change to either gives a new one.

Out-of-distribution statistics (``models.ood.OODStatistics``, optional): their plain fields are the metadata's
``ood`` object, their two tensors (the group means and the precision matrix) the payload's optional ``"ood"``
dict ``{"means": tensor, "precision": tensor}``. Both enter the version hash; a checkpoint without them hashes as
before they existed (``ood`` absent, not null). Readers that predate them ignore both (no format version change).

Format history: version 2 added the U-Net's ``upsample`` argument with a new default (``deconv``). Version 1
files are still read: their U-Nets were all built with nearest up-sampling, so ``upsample = "nearest"`` is
filled in when the file does not say.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError
from torch import nn

from models import __version__
from models.inference import FLIPS
from models.ood import TENSOR_FIELDS, OODStatistics
from models.preprocessing import Preprocessing
from models.registry import build_architecture

FORMAT_NAME = "medserve.checkpoint"
FORMAT_VERSION = 2
SUFFIX = ".pt"


class CheckpointError(Exception):
    """A file that cannot be used as a MedServe checkpoint; the message names the file."""


class Architecture(BaseModel):
    """Which network to build and with which constructor arguments."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class CheckpointMetadata(BaseModel):
    """Everything needed to rebuild, preprocess for, and describe a trained model."""

    task: Literal["segmentation", "classification"]
    architecture: Architecture
    classes: list[str] = Field(min_length=1)
    preprocessing: Preprocessing
    training: dict[str, Any] = Field(default_factory=dict, description="training arguments")
    metrics: dict[str, Any] = Field(default_factory=dict, description="validation metrics of this checkpoint")
    data_fingerprint: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    versions: dict[str, str] = Field(default_factory=dict, description="library versions used to train")
    extra: dict[str, Any] = Field(default_factory=dict, description="task-specific data, e.g. calibration")
    ood: OODStatistics | None = Field(
        default=None, description="out-of-distribution statistics and threshold (models.ood); None: none"
    )
    version: str = Field(default="", description="content hash of weights + metadata; the model's version")

    @property
    def tta_flips(self) -> list[str]:
        """The flips the model was trained with, which test-time augmentation may average over.

        Recorded in ``extra["tta_flips"]`` since vertical flips became optional; segmentation checkpoints
        written before that were trained with both flips.
        """
        stored = self.extra.get("tta_flips")
        if stored is None:
            return list(FLIPS)
        return [str(f) for f in stored]


def library_versions() -> dict[str, str]:
    import torchvision  # only its version is needed, and only when saving: serving a U-Net never imports it

    return {
        "medserve": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _hash_tensors(digest: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update((prefix + name).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # 0-dim tensors (e.g. BatchNorm num_batches_tracked) must be flattened before a byte view.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def metadata_json(metadata: CheckpointMetadata, *, exclude_version: bool = False) -> dict[str, Any]:
    """The metadata as stored (JSON types); ``ood`` left out when there is none, as before it existed."""
    meta = metadata.model_dump(mode="json", exclude={"version"} if exclude_version else None)
    if meta.get("ood") is None:
        meta.pop("ood", None)
    return meta


def content_hash(state_dict: dict[str, torch.Tensor], metadata: CheckpointMetadata) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes), the OOD statistics' tensors when there are
    some, and the metadata without its version field."""
    digest = hashlib.sha256()
    _hash_tensors(digest, state_dict)
    if metadata.ood is not None:
        _hash_tensors(digest, metadata.ood.tensors(), prefix="ood.")
    digest.update(json.dumps(metadata_json(metadata, exclude_version=True), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def save_checkpoint(
    path: str | Path, model: nn.Module | dict[str, torch.Tensor], metadata: CheckpointMetadata
) -> CheckpointMetadata:
    """Writes weights + metadata atomically and returns the metadata with ``version`` and ``versions`` set."""
    path = Path(path)
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    module = getattr(module, "_orig_mod", module)  # unwrap torch.compile
    state = module.state_dict() if isinstance(module, nn.Module) else module
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    metadata = metadata.model_copy(
        update={"versions": metadata.versions or library_versions(), "version": ""}
    )
    metadata = metadata.model_copy(update={"version": content_hash(state, metadata)})
    payload: dict[str, Any] = {
        "medserve_format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metadata": metadata.model_dump_json(exclude={"ood"} if metadata.ood is None else None),
        "state_dict": state,
    }
    if metadata.ood is not None:
        payload["ood"] = metadata.ood.tensors()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return metadata


def load_checkpoint(path: str | Path) -> tuple[CheckpointMetadata, dict[str, torch.Tensor]]:
    """Reads a checkpoint without executing code from it.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, unsafe (contains code), of a newer format
            version, or its metadata is invalid. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects other than plain data and tensors "
            "(a pickle that could run code); only MedServe checkpoints are accepted"
        ) from exc
    except Exception as exc:
        # Arbitrary bytes make the (legacy) unpickler fail in many ways (RuntimeError, EOFError, IndexError,
        # BadZipFile, ...); any of them means the same thing to the user.
        raise CheckpointError(
            f"{path}: not a MedServe checkpoint (unreadable: {type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("medserve_format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a MedServe checkpoint (no '{FORMAT_NAME}' header)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid checkpoint format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this MedServe supports "
            f"({FORMAT_VERSION}); upgrade MedServe to load it"
        )
    try:
        metadata = CheckpointMetadata.model_validate(_metadata_with_tensors(payload))
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise CheckpointError(f"{path}: invalid checkpoint metadata: {exc}") from exc
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: checkpoint has no valid state_dict")
    return _upgrade(metadata, version), state


def _metadata_with_tensors(payload: dict[str, Any]) -> dict[str, Any]:
    """The stored metadata JSON as a dict, its ``ood`` object joined with the payload's OOD tensors."""
    meta = json.loads(payload["metadata"])
    if not isinstance(meta, dict):
        raise TypeError("the metadata is not a JSON object")
    ood = meta.get("ood")
    if ood is not None:
        tensors = payload.get("ood")
        if not isinstance(tensors, dict) or not all(
            isinstance(tensors.get(name), torch.Tensor) for name in TENSOR_FIELDS
        ):
            raise ValueError(
                f"the metadata has ood statistics but the file lacks their tensors {TENSOR_FIELDS}"
            )
        if not isinstance(ood, dict):
            raise TypeError("ood is not a JSON object")
        meta["ood"] = {**ood, **{name: tensors[name] for name in TENSOR_FIELDS}}
    return meta


def _upgrade(metadata: CheckpointMetadata, version: int) -> CheckpointMetadata:
    """Fills in what older format versions left implicit, so they build the network they were saved from."""
    if version < 2 and metadata.architecture.name == "unet":
        args = {"upsample": "nearest", **metadata.architecture.args}
        metadata = metadata.model_copy(
            update={"architecture": metadata.architecture.model_copy(update={"args": args})}
        )
    return metadata


def build_model(metadata: CheckpointMetadata) -> nn.Module:
    """Constructs the (untrained) network the metadata describes."""
    try:
        return build_architecture(metadata.architecture.name, metadata.architecture.args)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot build architecture {metadata.architecture.name!r}: {exc}") from exc


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMetadata]:
    """Loads a checkpoint and returns the model in eval mode on ``device`` with its metadata."""
    metadata, state = load_checkpoint(path)
    model = build_model(metadata)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture: {exc}") from exc
    return model.to(device).eval(), metadata
