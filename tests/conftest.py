import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The small real data sets beside the repository (../shared/data), or $DROPFLAT_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("DROPFLAT_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def fresh_seed():
    """A seed drawn fresh each run (printed on failure through the test id's captured output)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"fresh seed: {seed}")
    return seed


@pytest.fixture
def one_thread():
    """For files of tiny products (``pytestmark = pytest.mark.usefixtures("one_thread")``): waking a second
    OpenMP thread per op costs more than these ops, and on a shared, loaded 2-core machine it made such files
    up to 50x slower (a descheduled thread stalls every product)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def users_tf32():
    """The user's flags: TF32 on for matmuls and cuDNN (torch's legacy setters), undone after the test."""
    import torch

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]
