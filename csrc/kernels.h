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

// --- fused replayable dropout (dropout_cpu.cpp / dropout_cuda.cu) ----------
// x, y: contiguous [rows, cols, inner]; y = x * (keep ? scale : 0) where
// element (r, j, s) is kept iff (w >> 8) >= threshold, w the Philox word of
// mask element e0 + j (word (e0 + j) % 4 of counter (e0 + j) / 4 under key).
// scale is rounded to the element type first, as torch rounds a scalar.
void fused_dropout_cpu_f32(const float* x, float* y, int64_t rows, int64_t cols,
                           int64_t inner, uint64_t key, uint64_t e0,
                           uint32_t threshold, double scale);
void fused_dropout_cpu_f64(const double* x, double* y, int64_t rows, int64_t cols,
                           int64_t inner, uint64_t key, uint64_t e0,
                           uint32_t threshold, double scale);
// out: uint8 [num_keys, rows, cols], the keep flags of key m at (r, j).
void keep_masks_cpu(const uint64_t* keys, int64_t num_keys, int64_t rows,
                    int64_t cols, uint64_t e0, uint32_t threshold, uint8_t* out);
#if DROPFLAT_WITH_CUDA
// Same contracts on device memory (keys too), enqueued on `stream`.
void fused_dropout_cuda(const void* x, void* y, bool is_double, int64_t rows,
                        int64_t cols, int64_t inner, uint64_t key, uint64_t e0,
                        uint32_t threshold, double scale, int device, void* stream);
void keep_masks_cuda(const uint64_t* keys, int64_t num_keys, int64_t rows,
                     int64_t cols, uint64_t e0, uint32_t threshold, uint8_t* out,
                     int device, void* stream);
#endif
// --- end fused replayable dropout ------------------------------------------

// --- per-sample gradient ghost Gram (gram_cpu.cpp) --------------------------
// a: contiguous [N, T, din], d: [N, T, dout]; out: [N, N] with
// out[i, j] = sum_{t,s} (a_it . a_js) (d_it . d_js) (symmetric).
void ghost_gram_cpu_f32(int64_t N, int64_t T, int64_t din, int64_t dout,
                        const float* a, const float* d, float* out);
void ghost_gram_cpu_f64(int64_t N, int64_t T, int64_t din, int64_t dout,
                        const double* a, const double* d, double* out);
// --- end per-sample gradient ghost Gram ------------------------------------

}  // namespace dropflat
