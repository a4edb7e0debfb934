// Shared by the CUDA launchers: error checks and a device guard.  Launchers
// take raw device pointers and the caller's stream and never link libtorch.
#pragma once

#include <cuda.h>  // driver types only (CUresult, CUdevice): libcuda is not linked
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace dropflat {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dropflat CUDA error in ") + what +
                             ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// After a <<<...>>> launch: a bad configuration (grid too large, too many
// registers or too much shared memory for the card) is reported here, not at
// the launch itself, so name the kernel that failed.
inline void check_launch(const char* kernel) {
  check(cudaGetLastError(), (std::string("launch of ") + kernel).c_str());
}

// The driver's current-context calls, looked up through the runtime so the
// module still never links libcuda (and imports on machines without a
// driver).  Null when the lookup fails.
struct DriverContextApi {
  using Get = CUresult (*)(CUcontext*);
  using Set = CUresult (*)(CUcontext);
  Get get = nullptr;
  Set set = nullptr;
};

inline void* driver_entry_point(const char* symbol) {
  void* fn = nullptr;
#if CUDART_VERSION >= 12000
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050  // the unversioned lookup is deprecated from 12.5 on
  const cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &fn, 12000,
                                                           cudaEnableDefault, &found);
#else
  const cudaError_t err = cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault, &found);
#endif
  return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? fn : nullptr;
#else  // CUDA 11.3 - 11.8: no query result
  return cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault) == cudaSuccess ? fn : nullptr;
#endif
}

inline const DriverContextApi& driver_context_api() {
  static const DriverContextApi api = [] {
    DriverContextApi a;
    a.get = reinterpret_cast<DriverContextApi::Get>(driver_entry_point("cuCtxGetCurrent"));
    a.set = reinterpret_cast<DriverContextApi::Set>(driver_entry_point("cuCtxSetCurrent"));
    if (a.get == nullptr || a.set == nullptr) a.get = nullptr, a.set = nullptr;
    return a;
  }();
  return api;
}

// Makes the tensor's `device` current for a launch, then puts back exactly
// what was current before, so the caller's (torch's) current device is left
// untouched.
//
// Not "cudaGetDevice, then cudaSetDevice back": on a thread with no current
// context cudaGetDevice reports device 0, and setting that back creates a
// primary context on GPU 0 in every process (each DDP rank holding memory
// there; exclusive-process GPUs failing).  The driver's current context is
// saved and restored instead, a null one included, which creates nothing.
// Nothing is switched when the device is already current.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int current = 0;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (device == current) return;
    const DriverContextApi& api = driver_context_api();
    if (api.get != nullptr && api.get(&saved_context_) == CUDA_SUCCESS) {
      restore_context_ = true;
    } else {  // no driver entry points: the runtime-only restore
      previous_device_ = current;
      restore_device_ = true;
    }
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  // Destructors must not throw; a failed restore leaves the launch device
  // current, which the caller's next device guard corrects.
  ~DeviceGuard() {
    if (restore_context_) {
      driver_context_api().set(saved_context_);
    } else if (restore_device_) {
      cudaSetDevice(previous_device_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  CUcontext saved_context_ = nullptr;
  int previous_device_ = 0;
  bool restore_context_ = false;
  bool restore_device_ = false;
};

}  // namespace cuda
}  // namespace dropflat
