// NCCL collectives on CUDA buffers. Compiled only when PIPEDAP_WITH_NCCL is defined.
//
// The communicator is created on the first CUDA operation, inside the engine
// thread (so at the same position in the operation order on every rank):
// rank 0 creates the NCCL unique id and broadcasts it over MPI.
// Every op waits on an event recorded on its producer stream at submission,
// runs on a dedicated communication stream, and completes when an event
// recorded after it has fired (polled with the same back-off as MPI requests).
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>
#include <time.h>

#include <algorithm>
#include <string>

#include "device_backend.h"
#include "mpi_util.h"

namespace pipedap {
namespace {

void check_cuda(cudaError_t rc, const std::string& what, int rank) {
  if (rc == cudaSuccess) return;
  throw CommError(what + " failed on rank " + std::to_string(rank) + ": " + cudaGetErrorString(rc));
}

void check_nccl(ncclResult_t rc, const std::string& what, int rank) {
  if (rc == ncclSuccess) return;
  throw CommError(what + " failed on rank " + std::to_string(rank) + ": " + ncclGetErrorString(rc));
}

ncclDataType_t nccl_dtype(DType t) {
  switch (t) {
    case DType::kFloat32: return ncclFloat32;
    case DType::kFloat64: return ncclFloat64;
    case DType::kFloat16: return ncclFloat16;
    case DType::kBFloat16: return ncclBfloat16;
    case DType::kInt32: return ncclInt32;
    case DType::kInt64: return ncclInt64;
    case DType::kUInt8: return ncclUint8;
    case DType::kInt8: return ncclInt8;
  }
  throw CommError("nccl: unknown dtype");
}

class NcclBackend : public DeviceBackend {
 public:
  NcclBackend(const Communicator& world, const PollPolicy& poll) : world_(world), poll_(poll) {
    int devices = 0;
    const cudaError_t rc = cudaGetDeviceCount(&devices);
    if (rc != cudaSuccess || devices == 0) {
      throw CommError("no CUDA device is visible on rank " + std::to_string(world.rank) + " (cudaGetDeviceCount: " +
                      (rc == cudaSuccess ? std::string("0 devices") : std::string(cudaGetErrorString(rc))) +
                      "): CUDA tensors need a GPU; move the tensor to the CPU or run on a GPU node");
    }
  }

  ~NcclBackend() override {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  void prepare(OpSpec& op) override {
    check_cuda(cudaSetDevice(op.device), "cudaSetDevice for " + op.describe(), world_.rank);
    cudaEvent_t ready;
    check_cuda(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate", world_.rank);
    check_cuda(cudaEventRecord(ready, reinterpret_cast<cudaStream_t>(op.stream)), "cudaEventRecord", world_.rank);
    op.ready_event = ready;
  }

  void discard(const std::vector<OpSpec>& ops) override {
    for (const OpSpec& op : ops) cudaEventDestroy(static_cast<cudaEvent_t>(op.ready_event));
  }

  void run_group(const std::vector<OpSpec>& ops) override {
    const int device = ops.front().device;
    ensure_communicator(device);
    for (const OpSpec& op : ops) {
      auto ready = static_cast<cudaEvent_t>(op.ready_event);
      check_cuda(cudaStreamWaitEvent(stream_, ready, 0), "cudaStreamWaitEvent for " + op.describe(), world_.rank);
      cudaEventDestroy(ready);
    }
    check_nccl(ncclGroupStart(), "ncclGroupStart", world_.rank);
    for (const OpSpec& op : ops) issue(op);
    check_nccl(ncclGroupEnd(), "ncclGroupEnd for " + ops.front().describe(), world_.rank);
    check_cuda(cudaEventRecord(done_, stream_), "cudaEventRecord", world_.rank);
    wait_for_stream(ops.front());
  }

 private:
  void ensure_communicator(int device) {
    if (comm_ != nullptr) {
      if (device != device_) {
        throw CommError("rank " + std::to_string(world_.rank) + " used cuda:" + std::to_string(device_) +
                        " and now cuda:" + std::to_string(device) + "; one process drives one GPU (set the device by local rank)");
      }
      return;
    }
    device_ = device;
    check_cuda(cudaSetDevice(device), "cudaSetDevice", world_.rank);
    ncclUniqueId id;
    if (world_.rank == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", world_.rank);
    check_mpi(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, world_.comm), "MPI_Bcast of the NCCL unique id", world_.rank);
    check_nccl(ncclCommInitRank(&comm_, world_.size, id, world_.rank), "ncclCommInitRank", world_.rank);
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate", world_.rank);
    check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreate", world_.rank);
  }

  void issue(const OpSpec& op) {
    const std::string what = "NCCL " + op.describe();
    const ncclDataType_t type = nccl_dtype(op.dtype);
    const ncclRedOp_t red = op.reduce == ReduceOp::kAverage ? ncclAvg : ncclSum;
    if (op.reduce == ReduceOp::kAverage && dtype_is_integer(op.dtype)) {
      throw CommError(what + ": NCCL averages floating-point types only; use op=Sum for integers");
    }
    const auto* in = reinterpret_cast<const char*>(op.input);
    auto* out = reinterpret_cast<char*>(op.output);
    const size_t esize = dtype_size(op.dtype);
    const bool even = std::all_of(op.counts.begin(), op.counts.end(), [&](int64_t n) { return n == op.counts.front(); });
    switch (op.kind) {
      case OpKind::kAllReduce:
        check_nccl(ncclAllReduce(in, out, op.counts[0], type, red, comm_, stream_), what, world_.rank);
        return;
      case OpKind::kBroadcast:
        check_nccl(ncclBroadcast(in, out, op.counts[0], type, op.root, comm_, stream_), what, world_.rank);
        return;
      case OpKind::kReduceScatter:
        if (even) {
          check_nccl(ncclReduceScatter(in, out, op.counts[0], type, red, comm_, stream_), what, world_.rank);
        } else {  // uneven blocks: one reduce per block, rooted at its owner (inside the caller's group)
          size_t off = 0;
          for (int r = 0; r < world_.size; ++r) {
            char* dst = r == world_.rank ? out : nullptr;
            check_nccl(ncclReduce(in + off, dst, op.counts[r], type, red, r, comm_, stream_), what, world_.rank);
            off += op.counts[r] * esize;
          }
        }
        return;
      case OpKind::kAllGather:
        if (even) {
          check_nccl(ncclAllGather(in, out, op.counts[0], type, comm_, stream_), what, world_.rank);
        } else {  // uneven blocks: one broadcast per block from its owner
          size_t off = 0;
          for (int r = 0; r < world_.size; ++r) {
            const char* src = r == world_.rank ? in : out + off;
            check_nccl(ncclBroadcast(src, out + off, op.counts[r], type, r, comm_, stream_), what, world_.rank);
            off += op.counts[r] * esize;
          }
        }
        return;
      case OpKind::kBarrier:
        throw CommError("internal: a barrier is a host operation");
    }
  }

  void wait_for_stream(const OpSpec& first) {
    int sleep = 1;
    int64_t next_idle = monotonic_ns() + poll_.idle_interval_us * 1000LL;
    for (;;) {
      if (poll_.on_idle && monotonic_ns() >= next_idle) {  // answer other ranks' status questions
        poll_.on_idle();
        next_idle = monotonic_ns() + poll_.idle_interval_us * 1000LL;
      }
      const cudaError_t rc = cudaEventQuery(done_);
      if (rc == cudaSuccess) break;
      if (rc != cudaErrorNotReady) check_cuda(rc, "CUDA stream of " + first.describe(), world_.rank);
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      check_nccl(async, "NCCL " + first.describe(), world_.rank);
      if (poll_.max_sleep_us > 0) {
        timespec ts{0, sleep * 1000L};
        nanosleep(&ts, nullptr);
        sleep = std::min(sleep * 2, poll_.max_sleep_us);
      }
    }
  }

  Communicator world_;
  PollPolicy poll_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  int device_ = -1;
};

}  // namespace

bool nccl_built() { return true; }

std::unique_ptr<DeviceBackend> make_device_backend(const Communicator& world, const PollPolicy& poll) {
  return std::make_unique<NcclBackend>(world, poll);
}

}  // namespace pipedap
