// pybind11 module dropflat._C.
//
// Tensors cross this boundary as (data_ptr, sizes[, device, stream])
// integers rather than torch::Tensor, so the module does not link libtorch
// and builds against any torch version.  The Python wrappers in
// dropflat/kernels/ own allocation, dtype and contiguity; the functions here
// only validate what they cannot trust blindly, then release the GIL for the
// compute.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "kernels.h"
#include "philox.h"

namespace py = pybind11;

namespace {

constexpr const char* kNoCuda =
    "dropflat was built without CUDA; rebuild with DROPFLAT_CUDA=ON";

template <typename T>
T* checked_out(int64_t n, uintptr_t out) {
  if (n < 0) throw std::invalid_argument("dropflat: n must be >= 0");
  if (n > 0 && out == 0) throw std::invalid_argument("dropflat: null output pointer");
  return reinterpret_cast<T*>(out);
}

// The CUDA entry points exist in every build so callers get this error
// message instead of an AttributeError when CUDA was not compiled.
template <typename T>
void cuda_fill([[maybe_unused]] uint64_t seed, [[maybe_unused]] uint64_t offset,
               [[maybe_unused]] int64_t n, [[maybe_unused]] uintptr_t out,
               [[maybe_unused]] int device, [[maybe_unused]] uintptr_t stream) {
#if DROPFLAT_WITH_CUDA
  T* dst = checked_out<T>(n, out);
  void* s = reinterpret_cast<void*>(stream);
  if constexpr (std::is_same_v<T, float>) {
    dropflat::philox_uniform_cuda(seed, offset, n, dst, device, s);
  } else {
    dropflat::philox_randint4x_cuda(seed, offset, n, dst, device, s);
  }
#else
  throw std::runtime_error(kNoCuda);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dropflat compiled kernels (C++/OpenMP and, if built, CUDA)";

  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
         uint32_t k1) {
        const auto b = dropflat::philox::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(b.x[0], b.x[1], b.x[2], b.x[3]);
      },
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"),
      py::arg("k1"),
      "One raw Philox4x32-10 block (for known-answer tests of philox.h).");

  m.def(
      "philox_randint4x_cpu",
      [](uint64_t seed, uint64_t offset, int64_t n, uintptr_t out) {
        dropflat::philox_randint4x_cpu(seed, offset, n,
                                       checked_out<uint32_t>(n, out));
      },
      py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>(),
      "Fill out (uint32[n, 4] at address `out`) with Philox words for "
      "counters offset..offset+n-1.");
  m.def(
      "philox_uniform_cpu",
      [](uint64_t seed, uint64_t offset, int64_t n, uintptr_t out) {
        dropflat::philox_uniform_cpu(seed, offset, n, checked_out<float>(n, out));
      },
      py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>(),
      "Fill out (float32[n, 4]) with (word >> 8) * 2**-24.");

  m.def("philox_randint4x_cuda", &cuda_fill<uint32_t>, py::arg("seed"),
        py::arg("offset"), py::arg("n"), py::arg("out"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "CUDA version of philox_randint4x_cpu; `out` is device memory on "
        "`device`, the work is enqueued on `stream` (a cudaStream_t).");
  m.def("philox_uniform_cuda", &cuda_fill<float>, py::arg("seed"),
        py::arg("offset"), py::arg("n"), py::arg("out"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "CUDA version of philox_uniform_cpu.");
  m.def(
      "cuda_device_count",
      []() -> int {
#if DROPFLAT_WITH_CUDA
        return dropflat::cuda_device_count();
#else
        throw std::runtime_error(kNoCuda);
#endif
      },
      "Devices seen by the module's own (static) CUDA runtime; raises with "
      "the runtime's reason when it cannot start (e.g. no driver).");

  // --- fused replayable dropout (csrc/cpu/dropout_cpu.cpp, csrc/cuda/dropout_cuda.cu);
  // dropflat/kernels/dropout.py checks shapes, dtypes and contiguity.
  m.def(
      "fused_dropout_cpu",
      [](uintptr_t x, uintptr_t y, bool is_double, int64_t rows, int64_t cols,
         int64_t inner, uint64_t key, uint64_t e0, uint32_t threshold, double scale) {
        const int64_t n = rows * cols * inner;
        if (n > 0 && x == 0) throw std::invalid_argument("dropflat: null input pointer");
        if (is_double) {
          dropflat::fused_dropout_cpu_f64(reinterpret_cast<const double*>(x),
                                          checked_out<double>(n, y), rows, cols,
                                          inner, key, e0, threshold, scale);
        } else {
          dropflat::fused_dropout_cpu_f32(reinterpret_cast<const float*>(x),
                                          checked_out<float>(n, y), rows, cols,
                                          inner, key, e0, threshold, scale);
        }
      },
      py::arg("x"), py::arg("y"), py::arg("is_double"), py::arg("rows"),
      py::arg("cols"), py::arg("inner"), py::arg("key"), py::arg("e0"),
      py::arg("threshold"), py::arg("scale"),
      py::call_guard<py::gil_scoped_release>(),
      "y = x * keep * scale over contiguous [rows, cols, inner] float32/64 "
      "arrays, keep regenerated from Philox (see kernels.h).");
  m.def(
      "keep_masks_cpu",
      [](uintptr_t keys, int64_t num_keys, int64_t rows, int64_t cols, uint64_t e0,
         uint32_t threshold, uintptr_t out) {
        if (num_keys > 0 && keys == 0) throw std::invalid_argument("dropflat: null keys pointer");
        dropflat::keep_masks_cpu(reinterpret_cast<const uint64_t*>(keys), num_keys,
                                 rows, cols, e0, threshold,
                                 checked_out<uint8_t>(num_keys * rows * cols, out));
      },
      py::arg("keys"), py::arg("num_keys"), py::arg("rows"), py::arg("cols"),
      py::arg("e0"), py::arg("threshold"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>(),
      "Keep flags (uint8 [num_keys, rows, cols]) of num_keys uint64 keys.");
  m.def(
      "fused_dropout_cuda",
      []([[maybe_unused]] uintptr_t x, [[maybe_unused]] uintptr_t y,
         [[maybe_unused]] bool is_double, [[maybe_unused]] int64_t rows,
         [[maybe_unused]] int64_t cols, [[maybe_unused]] int64_t inner,
         [[maybe_unused]] uint64_t key, [[maybe_unused]] uint64_t e0,
         [[maybe_unused]] uint32_t threshold, [[maybe_unused]] double scale,
         [[maybe_unused]] int device, [[maybe_unused]] uintptr_t stream) {
#if DROPFLAT_WITH_CUDA
        dropflat::fused_dropout_cuda(reinterpret_cast<const void*>(x),
                                     reinterpret_cast<void*>(y), is_double, rows,
                                     cols, inner, key, e0, threshold, scale, device,
                                     reinterpret_cast<void*>(stream));
#else
        throw std::runtime_error(kNoCuda);
#endif
      },
      py::arg("x"), py::arg("y"), py::arg("is_double"), py::arg("rows"),
      py::arg("cols"), py::arg("inner"), py::arg("key"), py::arg("e0"),
      py::arg("threshold"), py::arg("scale"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "CUDA version of fused_dropout_cpu (device memory, enqueued on `stream`).");
  m.def(
      "keep_masks_cuda",
      []([[maybe_unused]] uintptr_t keys, [[maybe_unused]] int64_t num_keys,
         [[maybe_unused]] int64_t rows, [[maybe_unused]] int64_t cols,
         [[maybe_unused]] uint64_t e0, [[maybe_unused]] uint32_t threshold,
         [[maybe_unused]] uintptr_t out, [[maybe_unused]] int device,
         [[maybe_unused]] uintptr_t stream) {
#if DROPFLAT_WITH_CUDA
        dropflat::keep_masks_cuda(reinterpret_cast<const uint64_t*>(keys), num_keys,
                                  rows, cols, e0, threshold,
                                  reinterpret_cast<uint8_t*>(out), device,
                                  reinterpret_cast<void*>(stream));
#else
        throw std::runtime_error(kNoCuda);
#endif
      },
      py::arg("keys"), py::arg("num_keys"), py::arg("rows"), py::arg("cols"),
      py::arg("e0"), py::arg("threshold"), py::arg("out"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "CUDA version of keep_masks_cpu (keys and out in device memory).");
  // --- end fused replayable dropout

  // --- per-sample gradient ghost Gram (csrc/cpu/gram_cpu.cpp);
  // dropflat/kernels/gram.py checks shapes, dtypes and contiguity.
  m.def(
      "ghost_gram_cpu",
      [](int64_t N, int64_t T, int64_t din, int64_t dout, uintptr_t a,
         uintptr_t d, uintptr_t out, bool is_double) {
        if (N < 0 || T < 0 || din < 0 || dout < 0)
          throw std::invalid_argument("dropflat: ghost_gram sizes must be >= 0");
        if (N > 0 && (a == 0 || d == 0 || out == 0))
          throw std::invalid_argument("dropflat: null pointer");
        if (is_double) {
          dropflat::ghost_gram_cpu_f64(N, T, din, dout, reinterpret_cast<const double*>(a),
                                       reinterpret_cast<const double*>(d),
                                       reinterpret_cast<double*>(out));
        } else {
          dropflat::ghost_gram_cpu_f32(N, T, din, dout, reinterpret_cast<const float*>(a),
                                       reinterpret_cast<const float*>(d),
                                       reinterpret_cast<float*>(out));
        }
      },
      py::arg("N"), py::arg("T"), py::arg("din"), py::arg("dout"), py::arg("a"),
      py::arg("d"), py::arg("out"), py::arg("is_double"),
      py::call_guard<py::gil_scoped_release>(),
      "out[N, N] = sum_{t,s} (a_it . a_js)(d_it . d_js) for a [N, T, din], "
      "d [N, T, dout] (float32, or float64 with is_double).");
  // --- end per-sample gradient ghost Gram

  m.def(
      "openmp_max_threads",
      []() -> int {
#if defined(_OPENMP)
        return omp_get_max_threads();
#else
        return 1;
#endif
      },
      "Threads an OpenMP parallel region would use now (1 without OpenMP).");

  // What this binary was built with; dropflat.kernels.build_info() reports it.
  m.attr("has_cuda") = py::bool_(DROPFLAT_WITH_CUDA);
  m.attr("cuda_arch_list") = DROPFLAT_CUDA_ARCHS;  // comma-separated, "" if none
  m.attr("cuda_version") = DROPFLAT_CUDA_VERSION;  // nvcc version, "" if none
#if defined(_OPENMP)
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("compiler") = DROPFLAT_CXX_COMPILER;
}
