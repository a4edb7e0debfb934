// Philox4x32-10 counter-based PRNG (Salmon et al., "Parallel Random Numbers:
// As Easy as 1, 2, 3", SC'11), shared by the host (C++/OpenMP) and device
// (CUDA) kernels so both backends compile the *same* arithmetic.
//
// Stream convention (identical to Triton's tl.randint4x(seed, offset)):
//   key     = (k0, k1) = (seed & 0xffffffff, seed >> 32)
//   counter = (c0, c1, c2, c3) = (offset & 0xffffffff, offset >> 32, 0, 0)
// where seed and offset are 64-bit unsigned.  One counter yields 4 words.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DROPFLAT_HD __host__ __device__ __forceinline__
#else
#define DROPFLAT_HD inline
#endif

namespace dropflat {
namespace philox {

// Round multipliers and Weyl key increments from the Random123 reference.
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Block {
  uint32_t x[4];
};

DROPFLAT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);  // single instruction; avoids a 64-bit multiply
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Full 10-round Philox4x32 on one counter block.  The key bump after the last
// round is skipped since its result is unused (Random123 does the same).
DROPFLAT_HD Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo(kM1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Block{{c0, c1, c2, c3}};
}

// The 4 words for absolute 64-bit counter `ctr` under the 64-bit `seed`.
DROPFLAT_HD Block randint4x(uint64_t seed, uint64_t ctr) {
  return philox4x32_10(static_cast<uint32_t>(ctr),
                       static_cast<uint32_t>(ctr >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Exact uint32 -> float in [0, 1): keep the top 24 bits (a float32 mantissa
// holds them exactly) and scale by 2^-24, so every backend yields the same
// float for the same word; the maximum is 1 - 2^-24 < 1.
DROPFLAT_HD float uint_to_unit_float(uint32_t x) {
  return static_cast<float>(x >> 8) * 5.9604644775390625e-08f;
}

}  // namespace philox
}  // namespace dropflat
