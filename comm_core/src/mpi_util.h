// The one MPI return-code checker, dtype -> MPI mapping, and the polling wait.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dtype.h"

namespace pipedap {

// Throws CommError("<what> failed on rank R: <MPI error string>") unless rc == MPI_SUCCESS.
void check_mpi(int rc, const std::string& what, int rank);

// The MPI datatype that carries `t`, and the MPI operator that reduces it
// (Average: the sum). float16 / bfloat16 travel as 16-bit integers and are
// reduced by user-defined operators (MPI's own operators do not know them).
MPI_Datatype mpi_datatype(DType t);
MPI_Op mpi_reduce_op(ReduceOp op, DType t);
void create_user_ops();  // once, after MPI_Init
void free_user_ops();    // before MPI_Finalize

// [Note: polling instead of MPI_Waitall]
// MPI_Wait* spins on a core until the request completes. During training that
// core is the one computing the next layer, so a blocking wait in the
// communication thread slows compute down. wait_all spins briefly (short
// operations finish there at full speed), then sleeps with exponential
// back-off up to PIPEDAP_POLL_MAX_SLEEP_US between MPI_Testsome calls.
// Kernel socket buffers keep the link busy while the thread sleeps.
// While it waits, wait_all calls on_idle every idle_interval_us (the engine
// answers other ranks' status questions there, see status.h), and `progress`
// on every round (the engine advances its outstanding point-to-point
// transfers there, see p2p.h: a collective's wait must not hold them up).
//
// [Note: patient waits]
// Waiting for other ranks to submit (an agreement, a barrier) with nothing of
// this rank's on the wire needs no progress calls to keep a link busy, only
// to notice the others' arrival. There a sleep may grow beyond max_sleep_us
// to `patience` times the time waited so far (at most kPatientMaxSleepUs), so
// a rank that waits 20 ms for a slower peer wakes 500 times a second instead
// of 5000, and notices the peer at most 10% of its wait later.
constexpr int kPatientMaxSleepUs = 2000;
struct PollPolicy {
  int spin_us = 500;  // covers a small collective's round trips over TCP
  int max_sleep_us = 200;  // 0: busy-poll (never sleep)
  double patience = 0.1;  // PIPEDAP_POLL_PATIENCE ([Note: patient waits]); 0: never beyond max_sleep_us
  std::function<void()> on_idle;
  int idle_interval_us = 20000;
  std::function<void()> progress;  // must never wait
};

// The rhythm of a polling wait: poll at once for spin_us after the last
// progress, then sleep 1, 2, 4, ... up to max_sleep_us microseconds between polls.
class Backoff {
 public:
  explicit Backoff(const PollPolicy& policy) : policy_(policy) { progressed(); }
  void progressed();  // something completed: spin again
  // How long to sleep before the next poll (0: none); advances the back-off.
  // `patient`: nothing of this rank's is in flight ([Note: patient waits]).
  int next_sleep_us(bool patient = false);

 private:
  const PollPolicy& policy_;
  int64_t progressed_us_ = 0;
  int64_t spin_until_us_ = 0;
  int sleep_us_ = 1;
};
void sleep_us(int us);  // nothing for us <= 0

// Waits for every request; on_complete(i) runs (in this thread) as request i
// completes. If a request fails, the others are given up (see
// abandon_requests) before the error is thrown: no request outlives this call,
// so the caller may release every buffer the requests pointed at.
// `cancellable`: the requests are point-to-point (MPI_Cancel applies); a
// nonblocking collective cannot be cancelled, only waited for.
void wait_all(std::vector<MPI_Request>& requests, const PollPolicy& policy, int rank, bool cancellable,
              const std::function<void(int)>& on_complete = nullptr);

// [Note: no request outlives its buffers]
// After an error, cancels what can be cancelled and waits (up to
// kAbandonSeconds) until every request is complete or cancelled. A request
// that still pends then may yet write into memory its owner is about to
// release: rather than risk heap corruption, the job is aborted.
constexpr double kAbandonSeconds = 10.0;
void abandon_requests(std::vector<MPI_Request>& requests, bool cancellable, int rank, const std::string& why);

// Declared right after a request vector (so destroyed before it and before the
// buffers declared earlier): on an exception, abandons whatever still pends.
class AbandonOnUnwind {
 public:
  AbandonOnUnwind(std::vector<MPI_Request>& requests, bool cancellable, int rank)
      : requests_(requests), cancellable_(cancellable), rank_(rank) {}
  ~AbandonOnUnwind();
  AbandonOnUnwind(const AbandonOnUnwind&) = delete;
  AbandonOnUnwind& operator=(const AbandonOnUnwind&) = delete;

 private:
  std::vector<MPI_Request>& requests_;
  bool cancellable_;
  int rank_;
};

// Aborts every rank of the job with `message` (MPI_Abort), from any thread.
[[noreturn]] void abort_job(const std::string& message, int code);

// "600", "0.5", "1e+03": numbers in messages without std::to_string's six decimals.
std::string format_number(double x);

}  // namespace pipedap
