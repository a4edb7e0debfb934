// Function multi-versioning for the CPU kernels.  On x86-64 Linux with GCC,
// DROPFLAT_CLONES(arch) gives a function an extra clone for `arch`, chosen at
// load time from the CPU's features: the loops run 4-8 lanes per instruction
// where AVX2/AVX-512 exist, while the binary still runs on any x86-64, which a
// global -march flag would not allow.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DROPFLAT_CLONES(arch) __attribute__((target_clones(arch, "default")))
#else
#define DROPFLAT_CLONES(arch)
#endif
