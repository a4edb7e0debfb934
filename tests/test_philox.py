"""Philox4x32-10: known answers, and every backend bit-identical.

Random cases are drawn fresh each run (from os.urandom) and printed in the
assertion message, so a failure can be replayed.
"""
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from triton_installs import CHILD_PRELUDE, interpreter_env, triton_installs

import dropflat.kernels
from dropflat.kernels.philox import (
    philox4x32_10_numpy,
    philox_randint4x,
    philox_reference_numpy,
    philox_reference_torch,
    philox_uniform,
)

_C = dropflat.kernels.load_extension()
_rng = random.SystemRandom()

# Random123's published known-answer vectors for Philox4x32-10:
# (counter c0..c3, key k0..k1) -> output words.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def as_uint32(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().view(np.uint32)


def uniform_from_words(words: np.ndarray) -> np.ndarray:
    return (words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def fresh_cases():
    """(seed, offset, n) triples covering the counter's and key's edges."""
    r = _rng
    return [
        (r.getrandbits(32), r.getrandbits(20), r.randrange(1, 5000)),
        # A seed above 2**63 exercises the high key word and the sign bit.
        (r.getrandbits(64) | 1 << 63, r.getrandbits(40), r.randrange(1, 5000)),
        # Offsets crossing 2**32: the carry into counter word c1.
        (r.getrandbits(64), 2**32 - r.randrange(1, 1000), 2000),
        (r.getrandbits(64), (r.getrandbits(31) << 33) - r.randrange(1, 1000), 2000),
        # Crossing 2**64: the counter wraps to 0.
        (r.getrandbits(64), 2**64 - r.randrange(1, 1000), 2000),
        # Above the OpenMP threshold, so the parallel loop is checked too.
        (r.getrandbits(64), r.getrandbits(64) - (1 << 17), 1 << 17),
    ]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers(counter, key, expected):
    assert tuple(philox4x32_10_numpy(counter, key)) == expected
    assert _C.philox4x32_10(*counter, *key) == expected


def test_known_answer_through_stream_api():
    # seed 0, counter 0 is the first KAT vector in every backend.
    expected = np.array([KAT[0][2]], dtype=np.uint32)
    for backend in ("cpp", "torch"):
        assert (as_uint32(philox_randint4x(0, 0, 1, backend=backend)) == expected).all()
    assert (philox_reference_numpy(0, 0, 1) == expected).all()


def test_convention_key_and_counter_words():
    # Pins the documented mapping seed -> (lo, hi) key, offset -> (lo, hi, 0, 0).
    seed, offset = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    expected = philox4x32_10_numpy(
        (0x76543210, 0xFEDCBA98, 0, 0), (0x89ABCDEF, 0x01234567))
    assert (as_uint32(philox_randint4x(seed, offset, 1))[0] == expected).all()


def test_cpp_matches_numpy_and_torch_references():
    for seed, offset, n in fresh_cases():
        msg = f"seed={seed} offset={offset} n={n}"
        ref = philox_reference_numpy(seed, offset, n)
        out = philox_randint4x(seed, offset, n)
        assert out.dtype == torch.int32 and out.shape == (n, 4), msg
        assert np.array_equal(as_uint32(out), ref), msg
        assert np.array_equal(as_uint32(philox_reference_torch(seed, offset, n)), ref), msg


def test_uniform_is_exact_conversion():
    for seed, offset, n in fresh_cases():
        msg = f"seed={seed} offset={offset} n={n}"
        expected = uniform_from_words(philox_reference_numpy(seed, offset, n))
        for backend in ("cpp", "torch"):
            u = philox_uniform(seed, offset, n, backend=backend)
            assert u.dtype == torch.float32 and u.shape == (n, 4), msg
            assert np.array_equal(u.numpy(), expected), (backend, msg)
            assert 0.0 <= u.min().item() and u.max().item() < 1.0, msg


def test_uniform_extremes():
    words = np.array([0, 0xFF, 0x100, 0xFFFFFFFF], dtype=np.uint32)
    assert uniform_from_words(words).tolist() == [0.0, 0.0, 2.0**-24, 1.0 - 2.0**-24]


def test_deterministic_and_splittable():
    seed, offset, n = _rng.getrandbits(64), _rng.getrandbits(63), 50_000
    msg = f"seed={seed} offset={offset}"
    whole = philox_randint4x(seed, offset, n)
    assert torch.equal(whole, philox_randint4x(seed, offset, n)), msg
    # Counter-based: any slice of the stream can be generated on its own.
    k = _rng.randrange(1, n)
    parts = torch.cat([philox_randint4x(seed, offset, k), philox_randint4x(seed, offset + k, n - k)])
    assert torch.equal(whole, parts), f"{msg} k={k}"
    assert not torch.equal(whole, philox_randint4x(seed ^ 1, offset, n)), msg


def test_empty_and_invalid_arguments():
    assert philox_randint4x(1, 2, 0).shape == (0, 4)
    assert philox_uniform(1, 2, 0, backend="torch").shape == (0, 4)
    with pytest.raises(ValueError, match="seed"):
        philox_randint4x(-1, 0, 1)
    with pytest.raises(ValueError, match="seed"):
        philox_randint4x(2**64, 0, 1)
    with pytest.raises(ValueError, match="offset"):
        philox_uniform(0, 2**64, 1)
    with pytest.raises(ValueError, match="n must be"):
        philox_randint4x(0, 0, -3)
    with pytest.raises(ValueError, match="unknown backend"):
        philox_randint4x(0, 0, 1, backend="numpy")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        philox_randint4x(0, 0, 1, backend="cuda")


def test_cpp_kernel_releases_the_gil():
    # While a worker thread sits in a long C++ call, this thread keeps
    # running Python only if the binding dropped the GIL; holding it, this
    # thread would stall for the whole call.
    n = 1 << 22
    out = torch.zeros((n, 4))  # allocated and touched outside the timing
    call = {}

    def work():
        call["start"] = time.perf_counter()
        _C.philox_uniform_cpu(1, 2, n, out.data_ptr())
        call["end"] = time.perf_counter()

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    start, end = call["start"], call["end"]
    during = [start] + [t for t in ticks if start < t < end] + [end]
    longest_stall = max(b - a for a, b in zip(during, during[1:]))
    assert longest_stall < 0.5 * (end - start), (longest_stall, end - start)


# --- Triton -----------------------------------------------------------------

_HAS_TRITON = importlib.util.find_spec("triton") is not None

# Runs in a child process: TRITON_INTERPRET must be set before triton.jit runs,
# and must not leak into the other tests.
_TRITON_INTERPRETER_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from dropflat.kernels import triton_philox
    from dropflat.kernels.philox import philox_randint4x, philox_uniform, philox_reference_numpy
    assert triton_philox.INTERPRET
    failures = []
    for seed, offset, n in json.loads(sys.argv[1]):
        ref = philox_reference_numpy(seed, offset, n)
        tri = philox_randint4x(seed, offset, n, backend="triton").numpy().view(np.uint32)
        cpp = philox_randint4x(seed, offset, n, backend="cpp").numpy().view(np.uint32)
        uni_tri = philox_uniform(seed, offset, n, backend="triton").numpy()
        uni_cpp = philox_uniform(seed, offset, n, backend="cpp").numpy()
        if not (np.array_equal(tri, ref) and np.array_equal(cpp, ref)
                and np.array_equal(uni_tri, uni_cpp)):
            failures.append([seed, offset, n])
    print(json.dumps(failures))
""")


@pytest.mark.parametrize("site", triton_installs())
def test_triton_interpreter_matches_cpp_and_numpy(tmp_path, site):
    # 70_000 counters spans two 2**16-counter interpreter programs with a
    # masked tail.  Seeds and offsets on both sides of 2**31, 2**32 and 2**63
    # take every Triton typing of a Python int (the kernels must not care).
    cases = [(0, 0, 3), (2**31 - 1, 2**31, 5), (2**32 - 1, 2**63, 5), (2**64 - 1, 2**64 - 3, 9)]
    cases += fresh_cases()[:5] + [(_rng.getrandbits(64), 2**32 - 5, 70_000)]
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + _TRITON_INTERPRETER_CHECK, json.dumps(cases)],
                          env=interpreter_env(site), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if site is not None:
        assert f" {site}" in proc.stderr, f"the child did not run the Triton in {site}: {proc.stderr[:500]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], f"mismatching cases; all: {cases}"


def test_triton_version_gate(monkeypatch):
    assert not dropflat.kernels.triton_supported("3.1.0")  # pinned by torch 2.5: Philox4x64 randint4x
    assert dropflat.kernels.triton_supported("3.2.0")
    assert dropflat.kernels.triton_supported("3.10.1")  # compared as numbers, not strings
    assert dropflat.kernels.triton_supported("3.3.1+git1234")
    with pytest.raises(ImportError, match=r"need triton >= 3\.2, found 3\.1\.0"):
        dropflat.kernels.check_triton_version("3.1.0")
    # Without compiled CUDA kernels, CUDA tensors default to Triton only when it is supported.
    from dropflat.kernels import dropout, philox
    monkeypatch.setattr(dropflat.kernels, "_C", None)
    for version, expected in (("3.1.0", "torch"), ("3.2.0", "triton"), (None, "torch")):
        monkeypatch.setattr(dropflat.kernels, "_triton_version", lambda v=version: v)
        assert philox._default_backend(torch.device("cuda")) == expected, version
        assert dropout._cuda_default() == expected, version


def test_supported_triton_range_is_stated():
    """pyproject's triton requirement and the README state MIN_TRITON."""
    root = Path(__file__).resolve().parents[1]
    low = ".".join(map(str, dropflat.kernels.MIN_TRITON))
    pyproject = (root / "pyproject.toml").read_text()
    extras = [line for line in pyproject.splitlines() if '"triton' in line]
    assert extras and all(f"triton>={low}" in line for line in extras), extras
    assert f"Triton ≥ {low}" in (root / "README.md").read_text()


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter enabled")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_triton_backend_needs_cuda_or_interpreter():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        philox_randint4x(0, 0, 4, backend="triton")


# --- CUDA -------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_gpu_backends_match_cpp(backend):
    if backend == "cuda" and not _C.has_cuda:
        pytest.skip("CUDA kernels not compiled")
    if backend == "triton" and not _HAS_TRITON:
        pytest.skip("triton is not installed")
    # Over 2**16 blocks of 256 counters: the CUDA kernel's grid-stride loop wraps.
    big = (_rng.getrandbits(64), 2**32 - 7, (1 << 24) + 4099)
    for seed, offset, n in fresh_cases() + [big]:
        msg = f"backend={backend} seed={seed} offset={offset} n={n}"
        words = philox_randint4x(seed, offset, n, device="cuda", backend=backend)
        assert words.is_cuda and words.dtype == torch.int32, msg
        assert torch.equal(words.cpu(), philox_randint4x(seed, offset, n)), msg
        uni = philox_uniform(seed, offset, n, device="cuda", backend=backend)
        assert torch.equal(uni.cpu(), philox_uniform(seed, offset, n)), msg


@pytest.mark.gpu
@gpu
def test_gpu_default_backend_and_side_stream():
    seed, offset, n = _rng.getrandbits(64), _rng.getrandbits(64) >> 1, 1 << 20
    expected = philox_uniform(seed, offset, n)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # Enqueued on the side stream: reading it there is ordered after it.
        out = philox_uniform(seed, offset, n, device="cuda") * 1.0
    stream.synchronize()
    assert torch.equal(out.cpu(), expected), f"seed={seed} offset={offset}"
