"""The compiled extension imports, and reports what it was built with."""
import pytest
import torch

import dropflat._C as _C
from dropflat.kernels import build_info, load_extension


def test_extension_imports():
    assert load_extension() is _C
    for name in ("philox_randint4x_cpu", "philox_uniform_cpu",
                 "philox_randint4x_cuda", "philox_uniform_cuda", "philox4x32_10"):
        assert callable(getattr(_C, name))


def test_build_info_fields():
    info = build_info()
    assert info["extension"] and info["extension_error"] is None
    assert {"philox_randint4x", "philox_uniform"} <= set(info["cpu_kernels"])
    assert isinstance(info["openmp"], bool)
    assert info["openmp_max_threads"] >= 1
    if not info["openmp"]:
        assert info["openmp_max_threads"] == 1
    assert info["compiler"]
    assert info["cuda_compiled"] == bool(_C.has_cuda)
    if info["cuda_compiled"]:
        assert info["cuda_arch_list"] and info["cuda_version"]
        # CMake CUDA_ARCHITECTURES entries, e.g. "90", "90-real", "native".
        assert all(a.split("-")[0].isdigit() or a.startswith(("all", "native"))
                   for a in info["cuda_arch_list"])
    else:
        assert info["cuda_arch_list"] == [] and info["cuda_version"] is None
        assert info["cuda_runtime_error"] is None
    assert info["torch"] == torch.__version__
    assert info["cuda_device"] == torch.cuda.is_available()
    assert isinstance(info["triton"], bool)
    assert (info["triton_version"] is None) == (not info["triton"])


def test_top_level_reexport():
    import dropflat

    assert dropflat.build_info()["extension"]


@pytest.mark.skipif(_C.has_cuda, reason="CUDA kernels were compiled")
@pytest.mark.parametrize("name", ["philox_randint4x_cuda", "philox_uniform_cuda"])
def test_cuda_entry_points_without_cuda_build(name):
    with pytest.raises(RuntimeError, match="built without CUDA; rebuild with DROPFLAT_CUDA=ON"):
        getattr(_C, name)(0, 0, 4, 16, 0, 0)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.cuda_device_count()


def _cuda_runtime_usable():
    try:
        return _C.cuda_device_count() > 0
    except RuntimeError:
        return False


@pytest.mark.skipif(not _C.has_cuda or _cuda_runtime_usable(),
                    reason="needs a CUDA build on a machine without a usable GPU")
@pytest.mark.parametrize("name", ["philox_randint4x_cuda", "philox_uniform_cuda"])
def test_cuda_entry_points_without_gpu(name):
    # The static CUDA runtime only looks for the driver on first use: the
    # import above worked, and a call fails as a Python error, not a crash.
    with pytest.raises(RuntimeError, match="dropflat CUDA error"):
        getattr(_C, name)(0, 0, 4, 16, 0, 0)
    assert build_info()["cuda_runtime_error"]


def test_argument_validation():
    with pytest.raises(ValueError, match="n must be >= 0"):
        _C.philox_randint4x_cpu(0, 0, -1, 16)
    with pytest.raises(ValueError, match="null output pointer"):
        _C.philox_uniform_cpu(0, 0, 4, 0)
    with pytest.raises(TypeError):  # seed does not fit uint64
        _C.philox_randint4x_cpu(2**64, 0, 1, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not _C.has_cuda, reason="CUDA kernels not compiled")
def test_cuda_runtime_sees_torch_devices():
    # Fails with the CUDA error (e.g. driver older than the nvcc used to
    # build) when the module's static runtime cannot use the GPU torch uses.
    assert _C.cuda_device_count() == torch.cuda.device_count()
    assert build_info()["cuda_runtime_error"] is None
