"""What the service's child processes (the DICOM node, the result writers) share: they die with the service."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Linux: asks the kernel to SIGKILL this process when its parent dies (a service killed with SIGKILL runs
    no clean-up, and its children would otherwise live on, orphaned). False when the parent is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent
