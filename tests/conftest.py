"""Test setup: without a GPU, Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at conftest import,
when no CUDA device is present (the Makefile sets it too).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import helpers` from any test module

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests' tensors are small: one thread avoids thread spin-up/oversubscription, which made the CPU
# search ~8x slower on a loaded 2-core machine. Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
