"""``medserve serve`` with one test architecture registered, for the real-process shutdown test.

``test-file-gated`` is ``PixelNet`` (a 1x1 convolution, see ``tests.app.helpers``) whose forward waits until its
gate file exists: the test holds requests in flight across a process boundary, deterministically. Run as
``python -m tests.reliability.gated_server serve --model-dir DIR ...`` (the arguments of ``medserve``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from models.registry import register_architecture
from tests.app.helpers import PixelNet

POLL_S = 0.005
SAFETY_S = 120.0  # a gate never opened (a failed test) must not keep the server alive forever


class FileGatedNet(PixelNet):
    """``PixelNet((-1, 1))``: class 1 where the 8-bit pixel is >= 128; forward waits for ``gate_file``."""

    def __init__(self, gate_file: str, weights: Sequence[float] = (-1.0, 1.0), **kwargs: Any) -> None:
        super().__init__(weights=weights, **kwargs)
        self.gate_file = gate_file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        waited = 0.0
        while not os.path.exists(self.gate_file) and waited < SAFETY_S:
            time.sleep(POLL_S)
            waited += POLL_S
        return super().forward(x)


register_architecture("test-file-gated", lambda **kw: FileGatedNet(**kw))

if __name__ == "__main__":
    from training.cli import main

    sys.exit(main(sys.argv[1:]))
