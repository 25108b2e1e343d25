// Built instead of nccl_backend.cc when CUDA or NCCL was not found at build time.
#include "device_backend.h"

namespace pipedap {

bool nccl_built() { return false; }

std::unique_ptr<DeviceBackend> make_device_backend(int rank, const PollPolicy&) {
  throw CommError("rank " + std::to_string(rank) +
                  ": this build of pipedap's comm_core has no CUDA/NCCL support, so CUDA tensors cannot be "
                  "communicated. Install the CUDA toolkit (nvcc) and NCCL (pip install nvidia-nccl-cu13), "
                  "then reinstall pipedap (pip install -e .); setup.py prints whether it found them.");
}

}  // namespace pipedap
