"""The Triton installs that the interpreter tests run under.

Always the installed one; besides it, every directory named in
``$DROPFLAT_EXTRA_TRITON`` (``os.pathsep``-separated), each holding another
Triton, e.g. the oldest supported one::

    pip install --no-deps --target /tmp/triton32 triton==3.2.0
    DROPFLAT_EXTRA_TRITON=/tmp/triton32 pytest tests/test_philox.py -k triton

The Triton kernels' results must not depend on the Triton version (the
stream once did: ``tl.randint4x`` changed between 3.3 and 3.4), so each
interpreter test is parametrised over these, in child processes whose
``PYTHONPATH`` puts the extra directory first.
"""
import importlib.util
import os
from pathlib import Path

import pytest

import dropflat.kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_installs():
    """pytest params: ``None`` for the installed Triton, else a directory holding another."""
    params = [pytest.param(None, id="triton-installed",
                           marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))]
    for site in filter(None, os.environ.get("DROPFLAT_EXTRA_TRITON", "").split(os.pathsep)):
        params.append(pytest.param(site, id=f"triton-{Path(site).name}"))
    return params


def interpreter_env(site):
    """Environment of a child that runs the Triton kernels under the interpreter, from ``site`` if given.

    The child imports this very dropflat (built extension included): PYTHONPATH
    points at it (run the child from a scratch directory, so a source checkout
    cannot shadow it through ``sys.path[0]``).
    """
    package_root = Path(dropflat.kernels.__file__).resolve().parents[2]
    path = [str(package_root), os.environ.get("PYTHONPATH", "")]
    if site is not None:
        if not (Path(site) / "triton" / "__init__.py").is_file():
            pytest.fail(f"$DROPFLAT_EXTRA_TRITON names {site}, which holds no triton package")
        path.insert(0, site)
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))


# Prepended to each child's script: which Triton it runs is part of its report.
CHILD_PRELUDE = """
import sys, triton
print("triton", triton.__version__, triton.__file__, file=sys.stderr)
"""
