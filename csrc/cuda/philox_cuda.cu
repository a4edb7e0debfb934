// Philox4x32-10 on CUDA.  The launchers take raw device pointers and the
// caller's stream (torch's current stream, passed as an integer) so the
// module never links libtorch; it links the static CUDA runtime instead,
// which only contacts the driver on the first CUDA call, keeping
// `import dropflat._C` working on machines without a GPU or driver.
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
// A grid-stride loop over at most this many blocks: enough threads to fill
// any current GPU, and launch sizes stay valid for any n.
constexpr int64_t kMaxBlocks = 1 << 16;

// One 16-byte vector store per counter: both outputs are [n, 4] rows of
// 4-byte words, so a row is exactly one uint4 / float4.
__global__ void randint4x_kernel(uint64_t seed, uint64_t offset, int64_t n,
                                 uint4* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const philox::Block b =
        philox::randint4x(seed, offset + static_cast<uint64_t>(i));
    out[i] = make_uint4(b.x[0], b.x[1], b.x[2], b.x[3]);
  }
}

__global__ void uniform_kernel(uint64_t seed, uint64_t offset, int64_t n,
                               float4* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const philox::Block b =
        philox::randint4x(seed, offset + static_cast<uint64_t>(i));
    out[i] = make_float4(philox::uint_to_unit_float(b.x[0]),
                         philox::uint_to_unit_float(b.x[1]),
                         philox::uint_to_unit_float(b.x[2]),
                         philox::uint_to_unit_float(b.x[3]));
  }
}

template <typename Vec, typename Kernel>
void launch(Kernel kernel, const char* name, uint64_t seed, uint64_t offset,
            int64_t n, void* out, int device, void* stream) {
  if (n == 0) return;  // a zero-block grid is an invalid launch
  if (reinterpret_cast<uintptr_t>(out) % alignof(Vec) != 0) {
    throw std::invalid_argument(
        "dropflat: CUDA philox output must be 16-byte aligned");
  }
  DeviceGuard guard(device);
  const int64_t blocks = std::min((n + kThreads - 1) / kThreads, kMaxBlocks);
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
           static_cast<cudaStream_t>(stream)>>>(seed, offset, n,
                                                static_cast<Vec*>(out));
  cuda::check_launch(name);
}

}  // namespace

void philox_randint4x_cuda(uint64_t seed, uint64_t offset, int64_t n,
                           uint32_t* out, int device, void* stream) {
  launch<uint4>(randint4x_kernel, "philox randint4x_kernel", seed, offset, n, out, device, stream);
}

void philox_uniform_cuda(uint64_t seed, uint64_t offset, int64_t n, float* out,
                         int device, void* stream) {
  launch<float4>(uniform_kernel, "philox uniform_kernel", seed, offset, n, out, device, stream);
}

int cuda_device_count() {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

}  // namespace dropflat
