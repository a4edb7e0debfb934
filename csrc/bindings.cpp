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
