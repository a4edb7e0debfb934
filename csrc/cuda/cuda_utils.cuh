// Shared by the CUDA launchers: error checks and a device guard.  Launchers
// take raw device pointers and the caller's stream and never link libtorch.
#pragma once

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

// Makes `device` current for the launch and restores the caller's device,
// so torch's notion of the current device is left untouched.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cuda
}  // namespace dropflat
