"""Command-line pieces shared by the commands: size parsing, --device, --intensity, arguments as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from models.imageio import DEFAULT_INTENSITY, INTENSITY_POLICIES
from training.common.options import add_device_argument, add_intensity_argument, json_args, parse_size


@pytest.mark.parametrize(
    ("text", "size"), [("256", (256, 256)), ("256x320", (256, 320)), ("64X48", (64, 48)), ("32,16", (32, 16))]
)
def test_sizes_are_n_or_height_by_width(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "12", "64x8", "1x2x3", "64x"])
def test_bad_sizes_are_argument_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="N or HxW"):
        parse_size(text)


def test_device_and_intensity_options() -> None:
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("data")
    add_intensity_argument(group)
    add_device_argument(parser)
    defaults = parser.parse_args([])
    assert defaults.device == "auto" and defaults.intensity == DEFAULT_INTENSITY
    other = next(p for p in sorted(INTENSITY_POLICIES) if p != DEFAULT_INTENSITY)
    chosen = parser.parse_args(["--device", "cuda", "--intensity", other])
    assert chosen.device == "cuda" and chosen.intensity == other
    with pytest.raises(SystemExit):
        parser.parse_args(["--intensity", "brightest"])


def test_arguments_become_json_values() -> None:
    args = argparse.Namespace(
        data=Path("/data/x"), img_size=(32, 48), lr=1e-3, hidden=[1, 2], _module="m", func=print, name=None
    )
    assert json_args(args) == {
        "data": "/data/x",
        "img_size": [32, 48],
        "lr": 1e-3,
        "hidden": [1, 2],
        "name": None,
    }
