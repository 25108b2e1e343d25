#include "op.h"

#include <time.h>

#include <algorithm>
#include <chrono>
#include <numeric>
#include <thread>

namespace pipedap {

const char* op_kind_name(OpKind k) {
  switch (k) {
    case OpKind::kReduceScatter: return "reducescatter";
    case OpKind::kAllGather: return "allgather";
    case OpKind::kAllReduce: return "allreduce";
    case OpKind::kBroadcast: return "broadcast";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kAddProcessSet: return "add_process_set";
    case OpKind::kRemoveProcessSet: return "remove_process_set";
    case OpKind::kSend: return "send";
    case OpKind::kRecv: return "recv";
    case OpKind::kAllToAll: return "alltoall";
    case OpKind::kJoin: return "join";
  }
  return "unknown";
}

const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::kAuto: return "auto";
    case Algorithm::kRing: return "ring";
    case Algorithm::kMpi: return "mpi";
  }
  return "unknown";
}

int64_t OpSpec::total_count() const { return std::accumulate(counts.begin(), counts.end(), int64_t{0}); }

std::string OpSpec::describe(int peer_rank) const {
  if (kind == OpKind::kAddProcessSet) {  // "add_process_set [0, 2]": each rank's list in a mismatch error
    std::string s = "add_process_set [";
    for (size_t i = 0; i < counts.size(); ++i) s += (i ? ", " : "") + std::to_string(counts[i]);
    return s + "]";
  }
  if (kind == OpKind::kRemoveProcessSet) return "remove_process_set " + std::to_string(counts.at(0));
  std::string s = std::string(op_kind_name(kind)) + " '" + name + "'";
  if (kind == OpKind::kJoin) return "join";
  if (kind != OpKind::kBarrier) {
    s += " (" + std::to_string(total_count()) + " " + dtype_name(dtype);
    if (shape.size() > 1) {  // a 1-D shape says no more than the count
      s += ", shape [";
      for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
      s += "]";
    }
    if (reduce != ReduceOp::kSum && reduce != ReduceOp::kAverage &&
        (kind == OpKind::kAllReduce || kind == OpKind::kReduceScatter)) {
      s += std::string(", ") + reduce_op_name(reduce);
    }
    if (device >= 0) s += " on cuda:" + std::to_string(device);
    if (kind == OpKind::kBroadcast) s += " from rank " + std::to_string(root);
    if (is_p2p_op(kind)) {
      s += std::string(kind == OpKind::kSend ? " to" : " from") + " rank " +
           std::to_string(peer_rank >= 0 ? peer_rank : root) + ", tag " + std::to_string(tag);
    }
    s += ")";
  }
  return s;
}

int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

Handle::Handle(int64_t seq, std::string description) : seq_(seq), description_(std::move(description)) {}

bool Handle::wait(double timeout_s) {
  // A small operation finishes within microseconds of the wait: look a little while before sleeping, since a
  // condition variable's wake-up costs about as much as the operation itself.
  const int64_t spin_ns = timeout_s < 0 ? kWaitSpinNs : std::min<int64_t>(kWaitSpinNs, timeout_s * 1e9);
  const int64_t spin_until = monotonic_ns() + spin_ns;
  while (!done() && monotonic_ns() < spin_until) std::this_thread::yield();
  std::unique_lock<std::mutex> lock(mu_);
  auto finished = [this] { return state_.load(std::memory_order_acquire) != kPending; };
  if (timeout_s < 0) {
    cv_.wait(lock, finished);
  } else if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), finished)) {
    return false;
  }
  observed_.store(true, std::memory_order_release);
  if (state_.load() == kFailed) throw CommError(error_);
  return true;
}

bool Handle::poll() {
  if (!done()) return false;
  observed_.store(true, std::memory_order_release);
  return true;
}

Timings Handle::timings() const {
  std::lock_guard<std::mutex> lock(mu_);
  return timings_;
}

void Handle::mark_started() {
  std::lock_guard<std::mutex> lock(mu_);
  timings_.start_ns = monotonic_ns();
}

int64_t Handle::delivered(int op) const {
  std::lock_guard<std::mutex> lock(mu_);
  return op < static_cast<int>(delivered_.size()) ? delivered_[op] : 0;
}

bool Handle::wait_delivered(int op, int64_t bytes, double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  auto reached = [&] {
    return state_.load(std::memory_order_acquire) != kPending ||
           (op < static_cast<int>(delivered_.size()) && delivered_[op] >= bytes);
  };
  if (timeout_s < 0) {
    delivered_cv_.wait(lock, reached);
  } else if (!delivered_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), reached)) {
    return false;
  }
  if (state_.load() == kFailed) throw CommError(error_);
  return true;
}

void Handle::add_delivered(int op, int64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (op >= static_cast<int>(delivered_.size())) delivered_.resize(op + 1, 0);
    delivered_[op] += bytes;
  }
  delivered_cv_.notify_all();
}

void Handle::complete() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    timings_.end_ns = monotonic_ns();
    state_.store(kOk, std::memory_order_release);
  }
  cv_.notify_all();
  delivered_cv_.notify_all();
}

void Handle::fail(const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    timings_.end_ns = monotonic_ns();
    error_ = message;
    state_.store(kFailed, std::memory_order_release);
  }
  cv_.notify_all();
  delivered_cv_.notify_all();
}

}  // namespace pipedap
