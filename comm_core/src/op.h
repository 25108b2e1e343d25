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
enum class OpKind : int {
  kReduceScatter = 0,
  kAllGather = 1,
  kAllReduce = 2,
  kBroadcast = 3,
  kBarrier = 4,
  kAddProcessSet = 5,
  kRemoveProcessSet = 6,
};

const char* op_kind_name(OpKind k);
inline bool is_process_set_op(OpKind k) { return k == OpKind::kAddProcessSet || k == OpKind::kRemoveProcessSet; }

// One collective on raw buffers.
//
// counts: reduce-scatter: elements each rank *receives* (input holds their sum);
//         all-gather: elements each rank *contributes* (output holds their sum);
//         all-reduce / broadcast: one entry, the element count; barrier: empty.
// Counts and the broadcast root are relative to the process set the op is
// submitted on (rank i of the set, not world rank i).
// The same OpSpec (kind, counts, dtype, reduce, root) must be submitted on
// every member; only the buffer addresses differ.
struct OpSpec {
  OpKind kind = OpKind::kBarrier;
  std::string name;
  uintptr_t input = 0;
  uintptr_t output = 0;
  std::vector<int64_t> counts;
  DType dtype = DType::kFloat32;
  ReduceOp reduce = ReduceOp::kSum;
  int root = 0;
  int device = -1;       // -1: host memory; >= 0: CUDA device ordinal
  uintptr_t stream = 0;  // CUDA stream that produced the input (device ops)
  void* ready_event = nullptr;  // set by DeviceBackend::prepare, owned by the backend

  int64_t total_count() const;
  // "allreduce 'grad.3' (1000 float32)": used in every error message.
  std::string describe() const;
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
