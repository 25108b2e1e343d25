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
//
// Point-to-point transfers do not involve the whole set, so they cannot use
// its communicator (created collectively). Each direction of a pair of members
// gets a communicator of two ranks (sender 0, receiver 1) and a stream: the
// first send creates it without blocking (NCCL's nonblocking initialisation),
// its unique id travelling in the transfer's header (DeviceLink), and the
// receiver joins when that header arrives. One direction per communicator and
// stream means a pending receive never holds up a send the other way, nor the
// collectives. NCCL matches a pair's transfers in issue order, so each is
// issued when its turn in the sender's order (DeviceLink::seq) comes.
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <tuple>

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
    case DType::kInt16:
      throw CommError("NCCL has no 16-bit integer type: move int16 tensors to the CPU, or cast them to int32");
  }
  throw CommError("nccl: unknown dtype");
}

ncclRedOp_t nccl_reduce_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAverage: return ncclAvg;
    case ReduceOp::kMin: return ncclMin;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kProduct: return ncclProd;
  }
  throw CommError("nccl: unknown reduction");
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
    for (auto& entry : pairs_) close(entry.second);
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

  void forget(int set) override {  // the engine waited for the set's transfers
    auto it = comms_.find(set);
    if (it != comms_.end()) {
      ncclCommDestroy(it->second);
      comms_.erase(it);
    }
    for (auto p = pairs_.begin(); p != pairs_.end();) {
      if (std::get<0>(p->first) != set) {
        ++p;
        continue;
      }
      close(p->second);
      p = pairs_.erase(p);
    }
  }

  int64_t start_send(int set, const OpSpec& op, DeviceLink& link) override {
    use_device(op.device);
    Pair& pair = pairs_[PairKey{set, op.root, true}];
    if (pair.comm == nullptr) {
      ncclUniqueId id;
      check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId for " + op.describe(), rank_);
      static_assert(sizeof id == sizeof link.id, "DeviceLink::id holds an ncclUniqueId");
      std::memcpy(link.id, &id, sizeof id);
      link.new_comm = 1;
      open(pair, id, 0, op.describe());
    }
    link.seq = pair.next_seq++;
    return hold(Transfer{&pair, true, link.seq, reinterpret_cast<void*>(op.input), dtype_size(op.dtype) * op.counts[0],
                         static_cast<cudaEvent_t>(op.ready_event), op.describe(), false});
  }

  int64_t start_recv(int set, int peer, const DeviceLink& link, size_t bytes, const OpSpec* op) override {
    int device = op != nullptr ? op->device : device_;
    if (device < 0) check_cuda(cudaGetDevice(&device), "cudaGetDevice", rank_);  // draining into a host receive
    use_device(device);
    const std::string what = op != nullptr ? op->describe() : "a discarded receive from rank " + std::to_string(peer);
    Pair& pair = pairs_[PairKey{set, peer, false}];
    if (link.new_comm) {
      ncclUniqueId id;
      std::memcpy(&id, link.id, sizeof id);
      open(pair, id, 1, what);
    }
    return hold(Transfer{&pair, false, link.seq, op != nullptr ? reinterpret_cast<void*>(op->output) : nullptr, bytes,
                         op != nullptr ? static_cast<cudaEvent_t>(op->ready_event) : nullptr, what, op == nullptr});
  }

  bool p2p_finished(int64_t token) override {
    issue_due();
    auto it = transfers_.find(token);
    Transfer& t = it->second;
    if (!t.issued) return false;
    const cudaError_t rc = cudaEventQuery(t.done);
    if (rc == cudaErrorNotReady) {
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(t.pair->comm, &async);
      check_nccl(async, "NCCL " + t.what, rank_);
      return false;
    }
    check_cuda(rc, "CUDA stream of " + t.what, rank_);
    cudaEventDestroy(t.done);
    transfers_.erase(it);
    return true;
  }

  void run_group(int set, const Communicator& c, const std::vector<OpSpec>& ops) override {
    use_device(ops.front().device);
    ncclComm_t comm = communicator(set, c);
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
  // A point-to-point communicator of one direction of a pair, and its stream.
  struct Pair {
    ncclComm_t comm = nullptr;
    cudaStream_t stream = nullptr;
    bool ready = false;      // its nonblocking initialisation finished
    int64_t next_seq = 0;    // sender: the seq of its next send
    int64_t next_issue = 0;  // the seq of the next transfer to issue
  };
  using PairKey = std::tuple<int, int, bool>;  // (set, peer within it, this rank sends)
  struct Transfer {
    Pair* pair;  // std::map keeps it in place
    bool send;
    int64_t seq;
    void* buffer;
    size_t bytes;
    cudaEvent_t ready;  // the op's producer-stream event (null for a discarded receive)
    std::string what;
    bool discard;  // receive into temporary device memory, freed after it (a mismatched send)
    bool issued = false;
    cudaEvent_t done = nullptr;
  };

  // Every transfer runs on the one device this process drives.
  void use_device(int device) {
    if (device_ < 0) {
      device_ = device;
      check_cuda(cudaSetDevice(device), "cudaSetDevice", rank_);
      check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate", rank_);
      check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreate", rank_);
    } else if (device != device_) {
      throw CommError("rank " + std::to_string(rank_) + " used cuda:" + std::to_string(device_) + " and now cuda:" +
                      std::to_string(device) + "; one process drives one GPU (set the device by local rank)");
    }
  }

  void open(Pair& pair, const ncclUniqueId& id, int rank, const std::string& what) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // the engine thread never waits for the peer to join (p2p.h)
    const ncclResult_t rc = ncclCommInitRankConfig(&pair.comm, 2, id, rank, &config);
    if (rc != ncclInProgress) check_nccl(rc, "ncclCommInitRankConfig for " + what, rank_);
    check_cuda(cudaStreamCreateWithFlags(&pair.stream, cudaStreamNonBlocking), "cudaStreamCreate", rank_);
  }

  void close(Pair& pair) {
    if (pair.comm != nullptr) ncclCommDestroy(pair.comm);
    if (pair.stream != nullptr) cudaStreamDestroy(pair.stream);
  }

  int64_t hold(Transfer t) {
    transfers_.emplace(next_token_, std::move(t));
    issue_due();
    return next_token_++;
  }

  // Issues every held transfer whose turn came on a ready communicator.
  void issue_due() {
    for (bool issued = true; issued;) {
      issued = false;
      for (auto& entry : transfers_) {
        Transfer& t = entry.second;
        if (t.issued || t.seq != t.pair->next_issue || !ready(*t.pair, t.what)) continue;
        issue(t);
        issued = true;
      }
    }
  }

  bool ready(Pair& pair, const std::string& what) {
    if (pair.ready || pair.comm == nullptr) return pair.ready;  // no communicator: the first send has not come
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(pair.comm, &state);
    if (state == ncclInProgress) return false;
    check_nccl(state, "NCCL communicator of " + what, rank_);
    pair.ready = true;
    return true;
  }

  void issue(Transfer& t) {
    Pair& pair = *t.pair;
    if (t.ready != nullptr) {
      check_cuda(cudaStreamWaitEvent(pair.stream, t.ready, 0), "cudaStreamWaitEvent for " + t.what, rank_);
      cudaEventDestroy(t.ready);
      t.ready = nullptr;
    }
    void* buffer = t.buffer;
    if (t.discard) check_cuda(cudaMallocAsync(&buffer, t.bytes, pair.stream), "cudaMallocAsync", rank_);
    const ncclResult_t rc = t.send ? ncclSend(buffer, t.bytes, ncclUint8, 1, pair.comm, pair.stream)
                                   : ncclRecv(buffer, t.bytes, ncclUint8, 0, pair.comm, pair.stream);
    ncclResult_t state = rc;
    while (state == ncclInProgress) ncclCommGetAsyncError(pair.comm, &state);  // a nonblocking enqueue
    check_nccl(state, "NCCL " + t.what, rank_);
    if (t.discard) check_cuda(cudaFreeAsync(buffer, pair.stream), "cudaFreeAsync", rank_);
    check_cuda(cudaEventCreateWithFlags(&t.done, cudaEventDisableTiming), "cudaEventCreate", rank_);
    check_cuda(cudaEventRecord(t.done, pair.stream), "cudaEventRecord", rank_);
    t.issued = true;
    ++pair.next_issue;
  }

  // Set `set`'s NCCL communicator (created on its first use: a collective over `c`).
  ncclComm_t communicator(int set, const Communicator& c) {
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
    const ncclRedOp_t red = nccl_reduce_op(op.reduce);
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
      case OpKind::kAllToAll: {  // a send and a receive per peer (inside the caller's group)
        size_t sent = 0, received = 0;
        for (int j = 0; j < c.size; ++j) {
          const size_t send_count = op.counts[static_cast<size_t>(c.rank) * c.size + j];
          const size_t recv_count = op.counts[static_cast<size_t>(j) * c.size + c.rank];
          if (send_count > 0) check_nccl(ncclSend(in + sent * esize, send_count, type, j, comm, stream_), what, rank_);
          if (recv_count > 0) {
            check_nccl(ncclRecv(out + received * esize, recv_count, type, j, comm, stream_), what, rank_);
          }
          sent += send_count;
          received += recv_count;
        }
        return;
      }
      default:
        throw CommError("internal: " + op.describe() + " is not a device operation");
    }
  }

  void wait_for_stream(const OpSpec& first, ncclComm_t comm) {
    Backoff backoff(poll_);
    int64_t next_idle = monotonic_ns() + poll_.idle_interval_us * 1000LL;
    for (;;) {
      if (poll_.on_idle && monotonic_ns() >= next_idle) {  // answer other ranks' status questions
        poll_.on_idle();
        next_idle = monotonic_ns() + poll_.idle_interval_us * 1000LL;
      }
      if (poll_.progress) poll_.progress();  // the engine's outstanding transfers (p2p.h)
      const cudaError_t rc = cudaEventQuery(done_);
      if (rc == cudaSuccess) break;
      if (rc != cudaErrorNotReady) check_cuda(rc, "CUDA stream of " + first.describe(), rank_);
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm, &async);
      check_nccl(async, "NCCL " + first.describe(), rank_);
      sleep_us(backoff.next_sleep_us());
    }
  }

  int rank_;
  PollPolicy poll_;
  std::map<int, ncclComm_t> comms_;  // by process set
  std::map<PairKey, Pair> pairs_;
  std::map<int64_t, Transfer> transfers_;  // by token, in posting order
  int64_t next_token_ = 0;
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
