"""Compiled (C++/OpenMP, CUDA) and Triton kernels.

Importing this package never fails because the extension is missing: a
source checkout without a build still imports, :func:`build_info` says why
the extension is unavailable, and only calling a compiled kernel raises
(see :func:`load_extension`).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import torch

try:
    # Not `from dropflat import _C`: while dropflat/__init__ is still running
    # that reports a missing module as a "circular import".
    # dropflat._C links the system OpenMP runtime beside torch's own; two pools of spinning
    # threads on few cores stall each other for milliseconds. Passive waiting avoids that
    # (read once, when the runtime loads; a user's own setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import dropflat._C as _C
    _C_IMPORT_ERROR = None
except ImportError as exc:  # not built, or built for another Python
    _C = None
    _C_IMPORT_ERROR = exc

__all__ = ["MIN_TRITON", "build_info", "check_triton_version", "load_extension", "triton_supported"]

# Oldest Triton the Triton kernels support: the one torch 2.6 pins, and the
# oldest whose interpreter runs their tests here (3.0's interpreter writes
# nothing back to CPU tensors under current torch, so 3.0/3.1 stay untested).
# Older Triton (pinned by torch 2.4/2.5) is not used by default: CUDA tensors
# then take the compiled CUDA kernels or the torch reference.
MIN_TRITON = (3, 2)


def load_extension():
    """Return the compiled module ``dropflat._C`` or raise a clear ImportError."""
    if _C is None:
        raise ImportError(
            "dropflat's compiled extension dropflat._C is not available "
            f"({_C_IMPORT_ERROR}); build it with `pip install .` or, in a "
            "source checkout, `pip install -e . --no-build-isolation`"
        ) from _C_IMPORT_ERROR
    return _C


def _triton_version():
    # Look the package up rather than importing it: importing triton is slow
    # and this report must stay cheap enough for `import dropflat`.
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parse_version(text):
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def triton_supported(version: str | None = None) -> bool:
    """Whether Triton ``version`` (default: the installed one) can run dropflat's Triton kernels.

    False when triton is not installed or older than :data:`MIN_TRITON`; an
    unparsable version (a source build) is given the benefit of the doubt.
    """
    version = _triton_version() if version is None else version
    if version is None:
        return False
    parsed = _parse_version(version)
    return parsed is None or parsed >= MIN_TRITON


def check_triton_version(version: str) -> None:
    """Raise ImportError naming the fix when ``version`` cannot run the Triton kernels."""
    if not triton_supported(version):
        raise ImportError(
            f"dropflat's Triton kernels need triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]}, found {version}; "
            "upgrade triton (or torch, which pins it), build the CUDA extension with nvcc, or pass "
            "backend='torch'"
        )


def build_info() -> dict:
    """Describe what this install can run.

    Keys: ``extension`` (is ``dropflat._C`` importable) and
    ``extension_error``; ``cpu_kernels``; ``openmp`` and
    ``openmp_max_threads``; ``compiler``; ``cuda_compiled``,
    ``cuda_arch_list`` (CMake CUDA_ARCHITECTURES entries), ``cuda_version``
    (nvcc's) and ``cuda_runtime_error`` (why the module's CUDA runtime cannot
    start, e.g. no driver; None when it can or CUDA was not compiled);
    ``triton`` (installed), ``triton_version`` and ``triton_supported``
    (:func:`triton_supported`); ``torch``;
    ``cuda_device`` (torch sees a CUDA device) and ``cuda_device_count``.
    """
    triton_version = _triton_version()
    info = {
        "extension": _C is not None,
        "extension_error": None if _C is not None else str(_C_IMPORT_ERROR),
        "cpu_kernels": [],
        "openmp": False,
        "openmp_max_threads": 1,
        "compiler": None,
        "cuda_compiled": False,
        "cuda_arch_list": [],
        "cuda_version": None,
        "cuda_runtime_error": None,
        "triton": triton_version is not None,
        "triton_version": triton_version,
        "triton_supported": triton_supported(triton_version) if triton_version else False,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.is_available(),
        "cuda_device_count": torch.cuda.device_count(),
    }
    if _C is None:
        return info
    info.update(
        cpu_kernels=sorted(name[: -len("_cpu")] for name in dir(_C) if name.endswith("_cpu")),
        openmp=bool(_C.openmp),
        openmp_max_threads=_C.openmp_max_threads(),
        compiler=_C.compiler,
        cuda_compiled=bool(_C.has_cuda),
        cuda_arch_list=[a for a in _C.cuda_arch_list.split(",") if a],
        cuda_version=_C.cuda_version or None,
    )
    if _C.has_cuda:
        try:
            _C.cuda_device_count()
        except RuntimeError as exc:
            info["cuda_runtime_error"] = str(exc)
    return info
