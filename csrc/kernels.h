// Host-side entry points of the compiled kernels.  Kept free of CUDA and
// pybind11 types so bindings.cpp compiles with the plain host compiler even
// when the CUDA sources are built, and not at all when they are not.
#pragma once

#include <cstdint>

namespace dropflat {

// out: n*4 uint32 words, row-major [n, 4]; counters offset .. offset+n-1
// (mod 2^64).
void philox_randint4x_cpu(uint64_t seed, uint64_t offset, int64_t n,
                          uint32_t* out);
// out: n*4 floats in [0, 1), the exact conversion of philox_randint4x_cpu.
void philox_uniform_cpu(uint64_t seed, uint64_t offset, int64_t n, float* out);

#if DROPFLAT_WITH_CUDA
// Same contracts on device memory of CUDA device `device`, enqueued on
// `stream` (a cudaStream_t, e.g. torch.cuda.current_stream().cuda_stream).
// Errors are thrown as std::runtime_error carrying the CUDA error string.
void philox_randint4x_cuda(uint64_t seed, uint64_t offset, int64_t n,
                           uint32_t* out, int device, void* stream);
void philox_uniform_cuda(uint64_t seed, uint64_t offset, int64_t n, float* out,
                         int device, void* stream);
// Devices visible to the CUDA runtime linked into the module; throws with the
// runtime's reason (no driver, driver too old, ...) when it cannot start.
int cuda_device_count();
#endif

}  // namespace dropflat
