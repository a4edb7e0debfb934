// Fused replayable dropout on the CPU: y = x * keep * 1/(1-q) in one pass,
// with the keep flags regenerated from Philox inside the kernel (nothing but
// a tile-sized scratch buffer is ever stored), and keep_masks: the boolean
// masks of M keys in one call.
//
// Layout (see kernels.h): x is a contiguous [rows, cols, inner] array; the
// element (r, j, s) is kept iff mask element e = e0 + j is kept, i.e. iff
// (word_e >> 8) >= threshold, where word_e is word e % 4 of the Philox block
// of counter e / 4 under `key`.  keep_mask's regimes map onto this as
//   per_sample: rows = 1, cols = batch * F, e0 = sample_offset * F
//   shared:     rows = batch, cols = F,    e0 = 0
// and inner > 1 broadcasts one mask element over a channel's spatial block
// (dropout1d/2d/3d).
#include <algorithm>
#include <array>
#include <cstdint>

#include "clones.h"
#include "kernels.h"
#include "philox.h"


namespace dropflat {
namespace {

// Mask elements per task (a multiple of 4), and the work below which waking
// the OpenMP team costs more than it saves.
constexpr int64_t kTile = 1 << 12;
constexpr int64_t kParallelThreshold = 1 << 15;

// flags[k] = keep flag of mask element e0 + k, k < len <= kTile.  Whole
// Philox blocks are generated into `buf` (a loop the compiler vectorizes
// across counters); the returned pointer skips the first block's unused words.
DROPFLAT_CLONES("arch=x86-64-v4")
const uint8_t* keep_flags(uint64_t key, uint64_t e0, int64_t len, uint32_t threshold,
                          std::array<uint8_t, kTile + 8>& buf) {
  const uint64_t first = e0 >> 2;
  const int64_t skip = static_cast<int64_t>(e0 & 3u);
  const int64_t blocks = (skip + len + 3) / 4;
  for (int64_t b = 0; b < blocks; ++b) {
    const philox::Block w = philox::randint4x(key, first + static_cast<uint64_t>(b));
    for (int j = 0; j < 4; ++j) buf[4 * b + j] = (w.x[j] >> 8) >= threshold;
  }
  return buf.data() + skip;
}

template <typename T>
DROPFLAT_CLONES("arch=x86-64-v4") void scale_rows(const T* x, T* y, const uint8_t* flags, int64_t len,
                                        int64_t inner, int64_t row_stride, int64_t rows,
                                        T scale) {
  const T zero = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * row_stride;
    T* yr = y + r * row_stride;
    if (inner == 1) {
      // x * (keep ? scale : 0) is bit-identical to torch's x * keep * scale
      // (signed zeros and NaN included), and vectorizes as a select.
      for (int64_t k = 0; k < len; ++k) yr[k] = xr[k] * (flags[k] ? scale : zero);
    } else {
      for (int64_t k = 0; k < len; ++k) {
        const T f = flags[k] ? scale : zero;
        for (int64_t s = 0; s < inner; ++s) yr[k * inner + s] = xr[k * inner + s] * f;
      }
    }
  }
}

// Tasks: tiles of columns x chunks of rows, each touching about kTile
// elements, so that both a long per-sample stream and a shared mask reused
// over many rows split across threads.  A task regenerates its columns'
// flags (cols_per_tile Philox words for >= kTile elements: cheap).
struct Tiling {
  int64_t cols_per_tile, rows_per_chunk, col_tiles, row_chunks;
};

Tiling tiling(int64_t rows, int64_t cols, int64_t inner) {
  Tiling t;
  t.cols_per_tile = std::max<int64_t>(1, std::min(cols, kTile / std::max<int64_t>(inner, 1)));
  t.rows_per_chunk = std::max<int64_t>(1, std::min(rows, kTile / (t.cols_per_tile * inner)));
  t.col_tiles = (cols + t.cols_per_tile - 1) / t.cols_per_tile;
  t.row_chunks = (rows + t.rows_per_chunk - 1) / t.rows_per_chunk;
  return t;
}

template <typename T>
void fused(const T* x, T* y, int64_t rows, int64_t cols, int64_t inner, uint64_t key,
           uint64_t e0, uint32_t threshold, double scale) {
  if (rows <= 0 || cols <= 0 || inner <= 0) return;
  const Tiling t = tiling(rows, cols, inner);
  const int64_t tasks = t.col_tiles * t.row_chunks;
  const T s = static_cast<T>(scale);  // torch rounds the scalar to x's dtype too
  const bool parallel = rows * cols * inner >= kParallelThreshold;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t c = task % t.col_tiles, rc = task / t.col_tiles;
    const int64_t j0 = c * t.cols_per_tile, len = std::min(cols, j0 + t.cols_per_tile) - j0;
    const int64_t r0 = rc * t.rows_per_chunk, nr = std::min(rows, r0 + t.rows_per_chunk) - r0;
    std::array<uint8_t, kTile + 8> buf;
    const uint8_t* flags = keep_flags(key, e0 + static_cast<uint64_t>(j0), len, threshold, buf);
    const int64_t at = (r0 * cols + j0) * inner;
    scale_rows(x + at, y + at, flags, len, inner, cols * inner, nr, s);
  }
}

}  // namespace

void fused_dropout_cpu_f32(const float* x, float* y, int64_t rows, int64_t cols,
                           int64_t inner, uint64_t key, uint64_t e0,
                           uint32_t threshold, double scale) {
  fused(x, y, rows, cols, inner, key, e0, threshold, scale);
}

void fused_dropout_cpu_f64(const double* x, double* y, int64_t rows, int64_t cols,
                           int64_t inner, uint64_t key, uint64_t e0,
                           uint32_t threshold, double scale) {
  fused(x, y, rows, cols, inner, key, e0, threshold, scale);
}

void keep_masks_cpu(const uint64_t* keys, int64_t num_keys, int64_t rows, int64_t cols,
                    uint64_t e0, uint32_t threshold, uint8_t* out) {
  if (num_keys <= 0 || rows <= 0 || cols <= 0) return;
  const Tiling t = tiling(rows, cols, 1);
  const int64_t per_key = t.col_tiles * t.row_chunks;
  const int64_t tasks = num_keys * per_key;
  const bool parallel = num_keys * rows * cols >= kParallelThreshold;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t m = task / per_key, rest = task % per_key;
    const int64_t c = rest % t.col_tiles, rc = rest / t.col_tiles;
    const int64_t j0 = c * t.cols_per_tile, len = std::min(cols, j0 + t.cols_per_tile) - j0;
    const int64_t r0 = rc * t.rows_per_chunk, nr = std::min(rows, r0 + t.rows_per_chunk) - r0;
    std::array<uint8_t, kTile + 8> buf;
    const uint8_t* flags = keep_flags(keys[m], e0 + static_cast<uint64_t>(j0), len, threshold, buf);
    uint8_t* dst = out + m * rows * cols + r0 * cols + j0;
    for (int64_t r = 0; r < nr; ++r) std::copy(flags, flags + len, dst + r * cols);
  }
}

}  // namespace dropflat
