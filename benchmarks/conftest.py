"""Shared setup for the benchmark suites (pytest-benchmark).

Run from the repository root::

    pytest benchmarks/ --benchmark-only

The suites import :mod:`models` from this directory (pytest puts the
directory of a test module without ``__init__.py`` on ``sys.path``; the line
below makes that explicit so ``--import-mode=importlib`` works too).
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

torch = pytest.importorskip("torch")
dropflat = pytest.importorskip("dropflat")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the figures depend on beside pytest-benchmark's own machine info."""
    import numpy
    import scipy

    machine_info["torch"] = torch.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["cuda_available"] = torch.cuda.is_available()
    machine_info["numpy"] = numpy.__version__
    machine_info["scipy"] = scipy.__version__
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["platform"] = platform.platform()
    try:
        machine_info["dropflat_build"] = {k: v for k, v in dropflat.build_info().items()
                                          if isinstance(v, (str, int, float, bool, list, type(None)))}
    except Exception as exc:  # pragma: no cover - informational only
        machine_info["dropflat_build"] = f"unavailable: {exc}"
    # Which dropflat source was measured (the tree may have no commit to name).
    import hashlib

    src = Path(dropflat.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(src.rglob("*.py")):
        digest.update(str(f.relative_to(src)).encode())
        digest.update(f.read_bytes())
    machine_info["dropflat_source_sha256"] = digest.hexdigest()[:16]
    machine_info["dropflat_path"] = str(src)
    machine_info["loadavg_at_start"] = os.getloadavg()
    peers = {}
    for dist in ("pyhessian", "curvlinops-for-pytorch", "hessian-eigenthings", "backpack-for-pytorch"):
        try:
            from importlib.metadata import version

            peers[dist] = version(dist)
        except Exception:
            peers[dist] = None
    machine_info["peers"] = peers


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every benchmark starts from the same global RNG state (peers draw start vectors from it)."""
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # torch's forward-AD decompositions still go through torch.jit.script on first use;
    # the deprecation warning is torch's own and says nothing about the code measured.
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script` is deprecated:DeprecationWarning")
