// Philox4x32-10 on the CPU.  Every counter is independent: OpenMP threads
// take contiguous tiles of the output, and within a tile the compiler
// vectorizes the loop across counters (the 32x32->64-bit multiplies map to
// pmuludq-style SIMD instructions).
#include <algorithm>
#include <cstdint>

#include "clones.h"
#include "kernels.h"
#include "philox.h"


namespace dropflat {
namespace {

// Counters per tile: big enough to amortize a dispatch, small enough for
// load balance.  Below kParallelThreshold counters waking the OpenMP team
// (microseconds) costs more than it saves (~10 ns per counter).
constexpr int64_t kTile = 1 << 12;
constexpr int64_t kParallelThreshold = 1 << 14;

DROPFLAT_CLONES("arch=x86-64-v4")
void randint4x_tile(uint64_t seed, uint64_t offset, int64_t begin, int64_t end,
                    uint32_t* out) {
  for (int64_t i = begin; i < end; ++i) {
    const philox::Block b = philox::randint4x(seed, offset + static_cast<uint64_t>(i));
    for (int j = 0; j < 4; ++j) out[4 * i + j] = b.x[j];
  }
}

DROPFLAT_CLONES("arch=x86-64-v4")
void uniform_tile(uint64_t seed, uint64_t offset, int64_t begin, int64_t end,
                  float* out) {
  for (int64_t i = begin; i < end; ++i) {
    const philox::Block b = philox::randint4x(seed, offset + static_cast<uint64_t>(i));
    for (int j = 0; j < 4; ++j) out[4 * i + j] = philox::uint_to_unit_float(b.x[j]);
  }
}

template <typename T>
void fill_tiles(void (*tile)(uint64_t, uint64_t, int64_t, int64_t, T*),
                uint64_t seed, uint64_t offset, int64_t n, T* out) {
  const int64_t tiles = (n + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) if (n >= kParallelThreshold)
  for (int64_t t = 0; t < tiles; ++t) {
    tile(seed, offset, t * kTile, std::min(n, (t + 1) * kTile), out);
  }
}

}  // namespace

void philox_randint4x_cpu(uint64_t seed, uint64_t offset, int64_t n,
                          uint32_t* out) {
  fill_tiles(randint4x_tile, seed, offset, n, out);
}

void philox_uniform_cpu(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  fill_tiles(uniform_tile, seed, offset, n, out);
}

}  // namespace dropflat
