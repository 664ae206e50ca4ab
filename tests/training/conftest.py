from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Runs the test with one torch thread (restored after): for tiny tensors, handing work to other threads
    costs more than it saves, badly so on a busy shared CPU. Opt in with
    ``pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
