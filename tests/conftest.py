"""Test set-up shared by every test file.

Tests run on the CPU by default. Without a CUDA device, Triton kernels run through Triton's interpreter,
which must be switched on before triton is first imported — hence the environment variable is set here,
at conftest import time, before any test module imports triton_ops.
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def one_thread():
    """Run the test with one torch CPU thread: at tiny shapes it is faster, and far faster while other
    processes share the cores (use through ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs on every run; a failure report names the seed so MINITRAIN_SEED=<n> replays it.
    seed = int(os.environ.get("MINITRAIN_SEED", int.from_bytes(os.urandom(4), "little")))
    request.node._minitrain_seed = seed
    torch.manual_seed(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = getattr(item, "_minitrain_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"MINITRAIN_SEED={seed}"))
    return report
