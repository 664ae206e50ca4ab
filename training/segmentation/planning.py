"""From a data set's fingerprint to a training plan, in the manner of nnU-Net's experiment planner.

``fingerprint`` measures what matters for the choice of scale: the images' sizes and their spread, and how wide
the labelled structures are (per class, also relative to the image). ``plan`` turns it, the device and the
command line into one readable decision: the scale (``native``: keep every pixel, train on crops, infer by
tiling; ``fit``: resize every image, aspect kept and padded, to a working size), the working size, the patch
and batch size, whether inference tiles at the working size, and the samples and steps per epoch, with the
reasons as sentences. The plan is logged, stored in the checkpoint as ``extra["plan"]`` (``Plan.as_json``) and
printed by ``medserve info --plan``.

The rules (thresholds are the constants below):

* ``auto`` chooses ``fit`` when the images are large for the patch (median long side over ``LARGE_IMAGE_FACTOR``
  patches) or of mixed resolution (long sides spread by over ``SPREAD_FACTOR``), and the smallest labelled
  structure keeps at least ``MIN_STRUCTURE_PX`` pixels at the working size; otherwise ``native``. ISBI 2012
  (512 x 512, membranes about 5 px wide) and the dental phantoms (192 x 192) stay native; chest X-rays of
  255-3,670 px go to ``fit``.
* The working long side is ``WORKING_LONG_SIDE`` for the device (256 on a CPU, 512 on CUDA), or
  ``--target-size``; it grows (up to ``MAX_WORKING_LONG_SIDE``) when the structures would otherwise shrink below
  ``MIN_STRUCTURE_PX``, and never exceeds the median image. Its aspect ratio is the median image's.
* The patch is the whole working image when it has at most ``PATCH_PIXELS`` pixels for the device (inference is
  then one window, no tiling), else ``--img-size`` (default 256) tiles it.
* Samples per epoch: ``fit`` draws ``FIT_SAMPLES_PER_IMAGE`` augmented samples per training image; ``native``
  covers the training pixels once with crops but at most ``data.MAX_CROPS_PER_IMAGE`` per image, so that
  ``--epochs`` means about the same on small and large images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from training.segmentation.data import default_samples_per_epoch

Scale = Literal["native", "fit", "auto"]
SCALES: tuple[Scale, ...] = ("native", "fit", "auto")

DEFAULT_PATCH = (256, 256)  # --img-size when native: the crop and inference window
DEFAULT_BATCH_SIZE = 4  # --batch-size when not given
LARGE_IMAGE_FACTOR = 2.0  # fit when the median long side exceeds this many patch long sides
SPREAD_FACTOR = 1.5  # ... or when the largest long side exceeds the smallest by this factor
MIN_STRUCTURE_PX = 8.0  # the smallest structure's width at the working size, in pixels
WORKING_LONG_SIDE = {"cpu": 256, "cuda": 512}  # the working long side by device type
MAX_WORKING_LONG_SIDE = {"cpu": 512, "cuda": 1024}  # how far it may grow to keep the structures
PATCH_PIXELS = {"cpu": 256 * 256, "cuda": 512 * 512}  # the largest patch trained whole, by device type
FIT_SAMPLES_PER_IMAGE = 1  # augmented samples per training image and epoch with fit
SIZE_MULTIPLE = 16  # working and patch sides are multiples of this (the U-Net halves the size 4 times)
STRUCTURE_PERCENTILE = 5  # which percentile over images describes a class's smallest structures


@dataclass(frozen=True)
class StructureSize:
    """How wide the regions of one class are: twice the area over the boundary length (a band's width; half a
    disc's diameter), per image; ``width_px`` is the median over images, ``relative_width`` the
    ``STRUCTURE_PERCENTILE``-th percentile of the width over the image's long side."""

    name: str
    width_px: float
    relative_width: float


@dataclass(frozen=True)
class Fingerprint:
    """What the planner knows about a data set (no pixel data)."""

    n_images: int
    channels: int
    median_size: tuple[int, int]
    min_long_side: int
    median_long_side: int
    max_long_side: int
    structures: list[StructureSize]

    @property
    def spread(self) -> float:
        """Largest over smallest long side."""
        return self.max_long_side / max(1, self.min_long_side)

    @property
    def smallest_structure(self) -> StructureSize | None:
        """The class whose structures are narrowest relative to the image."""
        return min(self.structures, key=lambda s: s.relative_width, default=None)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "spread": round(self.spread, 3)}


@dataclass
class Plan:
    """How a data set is trained and served; ``as_json`` is ``CheckpointMetadata.extra["plan"]``."""

    scale: Literal["native", "fit"]
    working_size: tuple[int, int] | None
    patch_size: tuple[int, int]
    batch_size: int
    tiles: bool
    samples_per_epoch: int
    steps_per_epoch: int
    reasons: list[str]
    fingerprint: Fingerprint
    requested: str = "auto"
    device: str = "cpu"

    def as_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "requested": self.requested,
            "device": self.device,
            "working_size": list(self.working_size) if self.working_size else None,
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "tiles": self.tiles,
            "samples_per_epoch": self.samples_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "reasons": self.reasons,
            "fingerprint": self.fingerprint.as_json(),
        }


def describe(plan: dict[str, Any]) -> str:
    """A stored plan (``Plan.as_json``) as readable lines, for logs and ``medserve info --plan``."""
    fp = plan["fingerprint"]
    working = plan.get("working_size")
    patch = plan["patch_size"]
    lines = [
        f"scale {plan['scale']} (asked: {plan.get('requested', 'auto')}, device {plan.get('device', '?')}): "
        + (f"working size {working[0]}x{working[1]}, " if working else "native pixels, ")
        + f"patch {patch[0]}x{patch[1]}, batch {plan['batch_size']}, "
        + ("inference tiles" if plan["tiles"] else "inference in one window")
        + f"; {plan['samples_per_epoch']} samples = {plan['steps_per_epoch']} steps per epoch",
        f"fingerprint: {fp['n_images']} images, long side {fp['min_long_side']}-{fp['max_long_side']} px "
        f"(median {fp['median_long_side']}, spread {fp['spread']:.2f}x), {fp['channels']} channel(s)",
    ]
    lines += [f"- {reason}" for reason in plan["reasons"]]
    return "\n".join(lines)


def structure_width(mask: np.ndarray, label: int) -> float | None:
    """Twice the area over the boundary length of class ``label`` in ``mask`` (pixels), or None when it is
    absent or fills the image. Boundary pixels are those with a 4-neighbour of another class."""
    region = mask == label
    area = int(region.sum())
    if area == 0:
        return None
    boundary = np.zeros_like(region)
    vertical = region[1:] != region[:-1]
    horizontal = region[:, 1:] != region[:, :-1]
    boundary[1:] |= vertical & region[1:]
    boundary[:-1] |= vertical & region[:-1]
    boundary[:, 1:] |= horizontal & region[:, 1:]
    boundary[:, :-1] |= horizontal & region[:, :-1]
    edge = int(boundary.sum())
    return 2.0 * area / edge if edge else None


def fingerprint(
    images: Sequence[np.ndarray], targets: Sequence[np.ndarray], classes: Sequence[str], channels: int
) -> Fingerprint:
    """The fingerprint of images (H, W, C) and their class-index masks (H, W)."""
    heights = np.array([im.shape[0] for im in images])
    widths = np.array([im.shape[1] for im in images])
    long_sides = np.maximum(heights, widths)
    structures = []
    for label, name in enumerate(classes):
        widths_px, relative = [], []
        for target in targets:
            width = structure_width(target, label)
            if width is not None:
                widths_px.append(width)
                relative.append(width / max(target.shape))
        if widths_px:
            structures.append(
                StructureSize(
                    name,
                    round(float(np.median(widths_px)), 2),
                    round(float(np.percentile(relative, STRUCTURE_PERCENTILE)), 5),
                )
            )
    return Fingerprint(
        n_images=len(images),
        channels=channels,
        median_size=(int(np.median(heights)), int(np.median(widths))),
        min_long_side=int(long_sides.min()),
        median_long_side=int(np.median(long_sides)),
        max_long_side=int(long_sides.max()),
        structures=structures,
    )


def round_size(value: float) -> int:
    """``value`` rounded to a multiple of ``SIZE_MULTIPLE`` (at least one)."""
    return max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(value / SIZE_MULTIPLE))


def working_shape(long_side: int, median_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) with the given long side and the median image's aspect ratio."""
    h, w = median_size
    if h >= w:
        return round_size(long_side), round_size(long_side * w / h)
    return round_size(long_side * h / w), round_size(long_side)


def plan(
    fp: Fingerprint,
    train_sizes: Sequence[tuple[int, int]],
    *,
    device: str,
    scale: Scale = "auto",
    target_size: Sequence[int] | None = None,
    img_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
    samples_per_epoch: int = 0,
    world: int = 1,
) -> Plan:
    """The plan for a data set of fingerprint ``fp`` whose training split has images of ``train_sizes`` (H, W).

    Args:
        device: device type, ``cpu`` or ``cuda`` (others plan as ``cpu``).
        scale: ``native``, ``fit`` or ``auto`` (decide from the fingerprint).
        target_size: ``--target-size``: (long side,) or (H, W) of the working size; None = planned.
        img_size / batch_size: ``--img-size`` / ``--batch-size`` when given (None = planned).
        samples_per_epoch: ``--samples-per-epoch`` (0 = planned).
        world: processes; a step takes ``batch_size`` samples on each.
    """
    kind = device if device in WORKING_LONG_SIDE else "cpu"
    reasons: list[str] = []
    patch = tuple(img_size) if img_size else DEFAULT_PATCH
    spread = fp.spread
    sizes = (
        f"images are {fp.min_long_side}-{fp.max_long_side} px on the long side "
        f"(median {fp.median_size[0]}x{fp.median_size[1]}, spread {spread:.2f}x)"
    )
    smallest = fp.smallest_structure
    needed = math.ceil(MIN_STRUCTURE_PX / smallest.relative_width) if smallest else 0
    if target_size:
        long_side = max(target_size)
    else:
        # The device's working long side, enlarged to keep the narrowest structures visible, but within the
        # device's limit and never beyond the median image.
        long_side = min(
            max(WORKING_LONG_SIDE[kind], needed),
            MAX_WORKING_LONG_SIDE[kind],
            max(fp.median_long_side, SIZE_MULTIPLE),
        )
    structure_px = smallest.relative_width * long_side if smallest else math.inf
    keeps_structures = structure_px >= MIN_STRUCTURE_PX
    structure_text = (
        f"the narrowest structures (class '{smallest.name}', {smallest.width_px:.1f} px wide at native scale) "
        f"would be {structure_px:.1f} px wide at a {long_side} px working size"
        if smallest
        else "no labelled structure was found"
    )
    large = fp.median_long_side > LARGE_IMAGE_FACTOR * max(patch)
    mixed = spread > SPREAD_FACTOR
    if scale == "auto":
        if (large or mixed) and keeps_structures:
            chosen: Literal["native", "fit"] = "fit"
            why = []
            if large:
                why.append(f"the median long side is over {LARGE_IMAGE_FACTOR:g}x the {max(patch)} px patch")
            if mixed:
                why.append(f"the sizes spread by more than {SPREAD_FACTOR:g}x")
            reasons.append(
                f"{sizes}: {' and '.join(why)}, so crops at native scale would see little of an image and "
                f"one resolution would not suit all; fit resizes every image to one working size"
            )
            reasons.append(f"{structure_text}, at least {MIN_STRUCTURE_PX:g} px: fitting keeps them")
        else:
            chosen = "native"
            if not (large or mixed):
                reasons.append(
                    f"{sizes}: at most {LARGE_IMAGE_FACTOR:g}x the {max(patch)} px patch and spread at most "
                    f"{SPREAD_FACTOR:g}x, so native scale keeps every pixel and crops see enough context"
                )
            else:
                reasons.append(
                    f"{sizes}, but {structure_text}, under {MIN_STRUCTURE_PX:g} px: downscaling would destroy "
                    "them, so native scale keeps every pixel"
                )
    else:
        chosen = scale
        reasons.append(f"--scale {scale} was asked for; {sizes}")
        if scale == "fit" and not keeps_structures:
            reasons.append(f"warning: {structure_text}, under {MIN_STRUCTURE_PX:g} px")

    batch = batch_size or DEFAULT_BATCH_SIZE
    working: tuple[int, int] | None = None
    if chosen == "fit":
        if target_size and len(target_size) == 2:
            working = (int(target_size[0]), int(target_size[1]))
        else:
            working = working_shape(long_side, fp.median_size)
        if img_size:
            reasons.append(f"the patch is --img-size {patch[0]}x{patch[1]}")
        elif working[0] * working[1] <= PATCH_PIXELS[kind]:
            patch = working
            reasons.append(
                f"the working size {working[0]}x{working[1]} fits a {kind} patch "
                f"(at most {PATCH_PIXELS[kind]} px): training sees whole images and inference is one window"
            )
        else:
            reasons.append(
                f"the working size {working[0]}x{working[1]} is over a {kind} patch of {PATCH_PIXELS[kind]} px: "
                f"training takes {patch[0]}x{patch[1]} crops and inference tiles the working image"
            )
        samples = samples_per_epoch or FIT_SAMPLES_PER_IMAGE * len(train_sizes)
        if not samples_per_epoch:
            reasons.append(
                f"an epoch is {FIT_SAMPLES_PER_IMAGE} augmented sample(s) per training image ({samples})"
            )
        tiles = working[0] > patch[0] or working[1] > patch[1]
    else:
        samples = samples_per_epoch or default_samples_per_epoch(train_sizes, patch)
        if not samples_per_epoch:
            reasons.append(
                f"an epoch covers the training pixels once with {patch[0]}x{patch[1]} crops, at most a few per "
                f"image ({samples} crops)"
            )
        tiles = True
    samples = max(samples, batch * world)
    return Plan(
        scale=chosen,
        working_size=working,
        patch_size=(int(patch[0]), int(patch[1])),
        batch_size=batch,
        tiles=tiles,
        samples_per_epoch=samples,
        steps_per_epoch=samples // (batch * world),
        reasons=reasons,
        fingerprint=fp,
        requested=scale,
        device=kind,
    )
