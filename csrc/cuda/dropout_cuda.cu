// Fused replayable dropout on CUDA (contracts in kernels.h; the CPU kernel
// dropout_cpu.cpp documents the layout).  Raw device pointers and the
// caller's stream, static cudart, no libtorch: the pattern of philox_cuda.cu.
//
// Two fused kernels: the common case, one per-sample elementwise stream
// (rows == 1, inner == 1), runs one thread per Philox counter, which yields
// the flags of 4 consecutive elements at once; every other layout (shared
// masks repeated over rows, channel masks broadcast over `inner`) runs one
// thread per element and regenerates its counter's block (4x the Philox work
// of the minimum, still far below the cost of the memory traffic it saves).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "kernels.h"
#include "philox.h"

namespace dropflat {
namespace {

using cuda::check;
using cuda::DeviceGuard;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond this

__device__ __forceinline__ bool keep_of(uint64_t key, uint64_t e, uint32_t threshold) {
  const philox::Block b = philox::randint4x(key, e >> 2);
  return (b.x[e & 3u] >> 8) >= threshold;
}

// rows == 1, inner == 1: thread t owns the counter (e0 >> 2) + t, i.e. the
// elements j = 4 * counter + k - e0 that fall in [0, n).
template <typename T>
__global__ void fused_stream_kernel(const T* __restrict__ x, T* __restrict__ y,
                                    int64_t n, uint64_t key, uint64_t e0,
                                    uint32_t threshold, T scale) {
  const uint64_t first = e0 >> 2;
  const int64_t skip = static_cast<int64_t>(e0 & 3u);
  const int64_t counters = (skip + n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < counters; t += stride) {
    const philox::Block b = philox::randint4x(key, first + static_cast<uint64_t>(t));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = 4 * t + k - skip;
      if (j >= 0 && j < n) y[j] = x[j] * ((b.x[k] >> 8) >= threshold ? scale : T(0));
    }
  }
}

// Index: int32_t when n < 2^31, since 64-bit division is emulated on GPUs.
template <typename T, typename Index>
__global__ void fused_general_kernel(const T* __restrict__ x, T* __restrict__ y,
                                     Index n, Index cols, Index inner,
                                     uint64_t key, uint64_t e0, uint32_t threshold,
                                     T scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const Index j = (static_cast<Index>(i) / inner) % cols;
    const bool keep = keep_of(key, e0 + static_cast<uint64_t>(j), threshold);
    y[i] = x[i] * (keep ? scale : T(0));
  }
}

// blockIdx.y (grid-strided) picks the key, x the element of [rows, cols].
// Index: int32_t when rows * cols < 2^31 (the per-element `% cols` then is a
// 32-bit remainder, not an emulated 64-bit one).
template <typename Index>
__global__ void keep_masks_kernel(const uint64_t* __restrict__ keys, int64_t num_keys,
                                  Index per_key, Index cols, uint64_t e0,
                                  uint32_t threshold, uint8_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = blockIdx.y; m < num_keys; m += gridDim.y) {
    const uint64_t key = keys[m];
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
         i < per_key; i += stride) {
      const Index j = static_cast<Index>(i) % cols;
      out[m * per_key + i] = keep_of(key, e0 + static_cast<uint64_t>(j), threshold);
    }
  }
}

unsigned blocks_for(int64_t work) {
  return static_cast<unsigned>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
}

template <typename T>
void launch_fused(const T* x, T* y, int64_t rows, int64_t cols, int64_t inner,
                  uint64_t key, uint64_t e0, uint32_t threshold, double scale,
                  cudaStream_t stream) {
  const int64_t n = rows * cols * inner;
  const T s = static_cast<T>(scale);  // rounded like torch rounds a scalar
  if (rows == 1 && inner == 1) {
    const int64_t counters = ((static_cast<int64_t>(e0 & 3u)) + n + 3) / 4;
    fused_stream_kernel<T><<<blocks_for(counters), kThreads, 0, stream>>>(
        x, y, n, key, e0, threshold, s);
    cuda::check_launch("fused_stream_kernel (dropout)");
  } else if (n < (int64_t{1} << 31)) {
    fused_general_kernel<T, int32_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x, y, static_cast<int32_t>(n), static_cast<int32_t>(cols),
        static_cast<int32_t>(inner), key, e0, threshold, s);
    cuda::check_launch("fused_general_kernel<int32> (dropout)");
  } else {
    fused_general_kernel<T, int64_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x, y, n, cols, inner, key, e0, threshold, s);
    cuda::check_launch("fused_general_kernel<int64> (dropout)");
  }
}

}  // namespace

void fused_dropout_cuda(const void* x, void* y, bool is_double, int64_t rows,
                        int64_t cols, int64_t inner, uint64_t key, uint64_t e0,
                        uint32_t threshold, double scale, int device, void* stream) {
  if (rows <= 0 || cols <= 0 || inner <= 0) return;  // no zero-block launches
  DeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  if (is_double) {
    launch_fused(static_cast<const double*>(x), static_cast<double*>(y), rows, cols,
                 inner, key, e0, threshold, scale, s);
  } else {
    launch_fused(static_cast<const float*>(x), static_cast<float*>(y), rows, cols,
                 inner, key, e0, threshold, scale, s);
  }
}

void keep_masks_cuda(const uint64_t* keys, int64_t num_keys, int64_t rows,
                     int64_t cols, uint64_t e0, uint32_t threshold, uint8_t* out,
                     int device, void* stream) {
  if (num_keys <= 0 || rows <= 0 || cols <= 0) return;
  DeviceGuard guard(device);
  const int64_t per_key = rows * cols;
  const dim3 grid(blocks_for(per_key),
                  static_cast<unsigned>(std::min<int64_t>(num_keys, 65535)));
  auto s = static_cast<cudaStream_t>(stream);
  if (per_key < (int64_t{1} << 31)) {
    keep_masks_kernel<int32_t><<<grid, kThreads, 0, s>>>(
        keys, num_keys, static_cast<int32_t>(per_key), static_cast<int32_t>(cols),
        e0, threshold, out);
    cuda::check_launch("keep_masks_kernel<int32>");
  } else {
    keep_masks_kernel<int64_t><<<grid, kThreads, 0, s>>>(keys, num_keys, per_key, cols,
                                                         e0, threshold, out);
    cuda::check_launch("keep_masks_kernel<int64>");
  }
}

}  // namespace dropflat
