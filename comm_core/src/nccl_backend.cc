// NCCL collectives on CUDA buffers. Compiled only when PIPEDAP_WITH_NCCL is defined.
//
// A process set's NCCL communicator is created on its first CUDA operation,
// inside the engine thread (so at the same position in the operation order on
// every member): the set's rank 0 creates the NCCL unique id and broadcasts it
// over the set's MPI communicator. One process drives one GPU, so every set's
// communicator lives on that device and shares one communication stream.
// Every op waits on an event recorded on its producer stream at submission,
// runs on a dedicated communication stream, and completes when an event
// recorded after it has fired (polled with the same back-off as MPI requests).
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>
#include <time.h>

#include <algorithm>
#include <map>
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
  NcclBackend(int rank, const PollPolicy& poll) : rank_(rank), poll_(poll) {
    int devices = 0;
    const cudaError_t rc = cudaGetDeviceCount(&devices);
    if (rc != cudaSuccess || devices == 0) {
      throw CommError("no CUDA device is visible on rank " + std::to_string(rank) + " (cudaGetDeviceCount: " +
                      (rc == cudaSuccess ? std::string("0 devices") : std::string(cudaGetErrorString(rc))) +
                      "): CUDA tensors need a GPU; move the tensor to the CPU or run on a GPU node");
    }
  }

  ~NcclBackend() override {
    for (auto& entry : comms_) ncclCommDestroy(entry.second);
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  void prepare(OpSpec& op) override {
    check_cuda(cudaSetDevice(op.device), "cudaSetDevice for " + op.describe(), rank_);
    cudaEvent_t ready;
    check_cuda(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate", rank_);
    check_cuda(cudaEventRecord(ready, reinterpret_cast<cudaStream_t>(op.stream)), "cudaEventRecord", rank_);
    op.ready_event = ready;
  }

  void discard(const std::vector<OpSpec>& ops) override {
    for (const OpSpec& op : ops) cudaEventDestroy(static_cast<cudaEvent_t>(op.ready_event));
  }

  void forget(int set) override {
    auto it = comms_.find(set);
    if (it == comms_.end()) return;
    ncclCommDestroy(it->second);
    comms_.erase(it);
  }

  void run_group(int set, const Communicator& c, const std::vector<OpSpec>& ops) override {
    ncclComm_t comm = communicator(set, c, ops.front().device);
    for (const OpSpec& op : ops) {
      auto ready = static_cast<cudaEvent_t>(op.ready_event);
      check_cuda(cudaStreamWaitEvent(stream_, ready, 0), "cudaStreamWaitEvent for " + op.describe(), rank_);
      cudaEventDestroy(ready);
    }
    check_nccl(ncclGroupStart(), "ncclGroupStart", rank_);
    for (const OpSpec& op : ops) issue(op, comm, c);
    check_nccl(ncclGroupEnd(), "ncclGroupEnd for " + ops.front().describe(), rank_);
    check_cuda(cudaEventRecord(done_, stream_), "cudaEventRecord", rank_);
    wait_for_stream(ops.front(), comm);
  }

 private:
  // Set `set`'s NCCL communicator (created on its first use: a collective over `c`).
  ncclComm_t communicator(int set, const Communicator& c, int device) {
    if (device_ < 0) {
      device_ = device;
      check_cuda(cudaSetDevice(device), "cudaSetDevice", rank_);
      check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate", rank_);
      check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreate", rank_);
    } else if (device != device_) {
      throw CommError("rank " + std::to_string(rank_) + " used cuda:" + std::to_string(device_) + " and now cuda:" +
                      std::to_string(device) + "; one process drives one GPU (set the device by local rank)");
    }
    auto it = comms_.find(set);
    if (it != comms_.end()) return it->second;
    ncclUniqueId id;
    if (c.rank == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", rank_);
    check_mpi(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, c.comm), "MPI_Bcast of the NCCL unique id", rank_);
    ncclComm_t comm = nullptr;
    check_nccl(ncclCommInitRank(&comm, c.size, id, c.rank), "ncclCommInitRank", rank_);
    comms_[set] = comm;
    return comm;
  }

  void issue(const OpSpec& op, ncclComm_t comm, const Communicator& c) {
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
        check_nccl(ncclAllReduce(in, out, op.counts[0], type, red, comm, stream_), what, rank_);
        return;
      case OpKind::kBroadcast:
        check_nccl(ncclBroadcast(in, out, op.counts[0], type, op.root, comm, stream_), what, rank_);
        return;
      case OpKind::kReduceScatter:
        if (even) {
          check_nccl(ncclReduceScatter(in, out, op.counts[0], type, red, comm, stream_), what, rank_);
        } else {  // uneven blocks: one reduce per block, rooted at its owner (inside the caller's group)
          size_t off = 0;
          for (int r = 0; r < c.size; ++r) {
            char* dst = r == c.rank ? out : nullptr;
            check_nccl(ncclReduce(in + off, dst, op.counts[r], type, red, r, comm, stream_), what, rank_);
            off += op.counts[r] * esize;
          }
        }
        return;
      case OpKind::kAllGather:
        if (even) {
          check_nccl(ncclAllGather(in, out, op.counts[0], type, comm, stream_), what, rank_);
        } else {  // uneven blocks: one broadcast per block from its owner
          size_t off = 0;
          for (int r = 0; r < c.size; ++r) {
            const char* src = r == c.rank ? in : out + off;
            check_nccl(ncclBroadcast(src, out + off, op.counts[r], type, r, comm, stream_), what, rank_);
            off += op.counts[r] * esize;
          }
        }
        return;
      default:
        throw CommError("internal: " + op.describe() + " is not a device operation");
    }
  }

  void wait_for_stream(const OpSpec& first, ncclComm_t comm) {
    int sleep = 1;
    int64_t next_idle = monotonic_ns() + poll_.idle_interval_us * 1000LL;
    for (;;) {
      if (poll_.on_idle && monotonic_ns() >= next_idle) {  // answer other ranks' status questions
        poll_.on_idle();
        next_idle = monotonic_ns() + poll_.idle_interval_us * 1000LL;
      }
      const cudaError_t rc = cudaEventQuery(done_);
      if (rc == cudaSuccess) break;
      if (rc != cudaErrorNotReady) check_cuda(rc, "CUDA stream of " + first.describe(), rank_);
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm, &async);
      check_nccl(async, "NCCL " + first.describe(), rank_);
      if (poll_.max_sleep_us > 0) {
        timespec ts{0, sleep * 1000L};
        nanosleep(&ts, nullptr);
        sleep = std::min(sleep * 2, poll_.max_sleep_us);
      }
    }
  }

  int rank_;
  PollPolicy poll_;
  std::map<int, ncclComm_t> comms_;  // by process set
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  int device_ = -1;
};

}  // namespace

bool nccl_built() { return true; }

std::unique_ptr<DeviceBackend> make_device_backend(int rank, const PollPolicy& poll) {
  return std::make_unique<NcclBackend>(rank, poll);
}

}  // namespace pipedap
