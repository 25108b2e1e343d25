// What Python submits (OpSpec) and what it gets back (Handle).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dtype.h"

namespace pipedap {

// Numeric values are part of the Python binding: never renumber.
// kAddProcessSet and kRemoveProcessSet are the engine's own (Python cannot
// submit them): world submissions whose counts hold the new set's ranks or the
// removed set's id, so that the agreement covers them (see process_set.h).
// kSend and kRecv are point-to-point (see below and p2p.h).
enum class OpKind : int {
  kReduceScatter = 0,
  kAllGather = 1,
  kAllReduce = 2,
  kBroadcast = 3,
  kBarrier = 4,
  kAddProcessSet = 5,
  kRemoveProcessSet = 6,
  kSend = 7,
  kRecv = 8,
};

const char* op_kind_name(OpKind k);
inline bool is_process_set_op(OpKind k) { return k == OpKind::kAddProcessSet || k == OpKind::kRemoveProcessSet; }
inline bool is_p2p_op(OpKind k) { return k == OpKind::kSend || k == OpKind::kRecv; }

// Point-to-point tags run from 0 to kMaxTag: the smallest MPI_TAG_UB the MPI
// standard allows, so a tag is an MPI tag on every implementation.
constexpr int kMaxTag = 32767;

// One collective, or one point-to-point transfer, on raw buffers.
//
// counts: reduce-scatter: elements each rank *receives* (input holds their sum);
//         all-gather: elements each rank *contributes* (output holds their sum);
//         all-reduce / broadcast / send / recv: one entry, the element count;
//         barrier: empty.
// Counts and the broadcast root are relative to the process set the op is
// submitted on (rank i of the set, not world rank i).
// The same OpSpec (kind, counts, dtype, reduce, root) must be submitted on
// every member; only the buffer addresses differ.
//
// [Note: point-to-point semantics]
// kSend sends `input` to `root`, the peer (a rank within the set); kRecv
// receives into `output` from it; `tag` (0..kMaxTag) tells transfers between
// the same two ranks apart. They involve two ranks, not the set, so they are
// not agreed (no fingerprint) and do not count in the set's sequence numbers.
// The engine thread posts them in submission order and goes on without
// waiting: transfers between the same two ranks with the same tag match in
// posting order, whatever collectives lie between them on either rank, and a
// receive posted before a collective never holds that collective up. A
// submission may group several sends and receives (an exchange) but never
// mixes them with collectives. The receiver checks the sender's element count
// and dtype before any data is written: a mismatch fails the receive with a
// CommError naming both sides, and the sender's data is discarded (the send
// itself completes). See p2p.h for how.
struct OpSpec {
  OpKind kind = OpKind::kBarrier;
  std::string name;
  uintptr_t input = 0;
  uintptr_t output = 0;
  std::vector<int64_t> counts;
  DType dtype = DType::kFloat32;
  ReduceOp reduce = ReduceOp::kSum;
  int root = 0;          // broadcast: the root; send / recv: the peer
  int tag = 0;           // send / recv only
  int device = -1;       // -1: host memory; >= 0: CUDA device ordinal
  uintptr_t stream = 0;  // CUDA stream that produced the input (device ops)
  void* ready_event = nullptr;  // set by DeviceBackend::prepare, owned by the backend

  int64_t total_count() const;
  // "allreduce 'grad.3' (1000 float32)", "send 'act.3' (1000 float32 to rank 2, tag 5)": used in
  // every error message. `peer_rank`: the peer's world rank, for send / recv (default: `root`).
  std::string describe(int peer_rank = -1) const;
};

struct Timings {
  int64_t enqueue_ns = 0;  // CLOCK_MONOTONIC, same clock as Python's time.monotonic_ns()
  int64_t start_ns = 0;
  int64_t end_ns = 0;
};

int64_t monotonic_ns();

// The completion state of one submission (one op, or a group of ops issued as one unit).
class Handle {
 public:
  Handle(int64_t seq, std::string description);

  int64_t seq() const { return seq_; }
  const std::string& description() const { return description_; }

  bool done() const { return state_.load(std::memory_order_acquire) != kPending; }
  // Waits up to timeout_s (< 0: forever). Returns false on timeout; throws
  // CommError if the operation failed.
  bool wait(double timeout_s);
  Timings timings() const;

  // Engine side.
  void mark_started();
  void complete();
  void fail(const std::string& message);
  void set_enqueue_ns(int64_t ns) { timings_.enqueue_ns = ns; }
  int64_t start_ns() const { return timings_.start_ns; }

 private:
  enum State : int { kPending = 0, kOk = 1, kFailed = 2 };
  const int64_t seq_;
  const std::string description_;
  std::atomic<int> state_{kPending};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::string error_;
  Timings timings_;
};

// An error raised to Python as pipedap.CommError.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace pipedap
