// The engine: one background thread per process owns every MPI/NCCL call and
// executes submissions in submission order.
//
// [Note: why one ordered thread]
// Collectives match across ranks by order, not by name. If Python threads or
// autograd hooks issued them directly, two ranks could issue them in different
// orders and deadlock. Here Python only enqueues (never waiting on the
// network); the single engine thread issues them in the order they were
// enqueued, which the caller (the optimizer, from its plan) makes identical on
// every rank. PIPEDAP_CHECK_ORDER=1 verifies that at run time.
#pragma once

#include <mpi.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "device_backend.h"
#include "host_collectives.h"
#include "op.h"

namespace pipedap {

struct EngineConfig {
  HostCollectiveConfig host;
  bool check_order = false;     // PIPEDAP_CHECK_ORDER
  double stall_seconds = 60.0;  // PIPEDAP_STALL_SECONDS; <= 0 disables the report
  double timeout_seconds = 0;   // PIPEDAP_TIMEOUT_SECONDS; <= 0: never abort

  static EngineConfig from_environment();
};

class Engine {
 public:
  // Initialises MPI if needed (MPI_THREAD_MULTIPLE requested) and starts the thread.
  explicit Engine(const EngineConfig& config);
  ~Engine();  // drains the queue, stops the threads; does not finalize MPI
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Enqueues ops to run as one unit and returns immediately.
  std::shared_ptr<Handle> submit(std::vector<OpSpec> ops);

  int rank() const { return world_.rank; }
  int size() const { return world_.size; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int thread_level() const { return thread_level_; }
  const EngineConfig& config() const { return config_; }
  // Operations submitted and not yet finished (for diagnostics).
  size_t pending() const;

 private:
  struct Submission {
    std::vector<OpSpec> ops;
    std::shared_ptr<Handle> handle;
  };

  void run_loop();
  void execute(Submission& sub);
  void verify_order(const Submission& sub);
  void watchdog_loop();
  std::string describe(const std::vector<OpSpec>& ops) const;
  void validate(const std::vector<OpSpec>& ops) const;

  EngineConfig config_;
  Communicator world_;  // a duplicate of MPI_COMM_WORLD: our traffic never matches the user's
  int local_rank_ = 0;
  int local_size_ = 1;
  int thread_level_ = 0;
  std::unique_ptr<DeviceBackend> device_;  // created on the first CUDA op

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Submission> queue_;
  std::shared_ptr<Handle> running_;  // the submission the engine thread is executing
  int64_t next_seq_ = 0;
  bool stopping_ = false;
  std::string broken_;  // set after a failed collective: later ops fail fast with this reason

  std::thread thread_;
  std::thread watchdog_;
  std::condition_variable watchdog_cv_;
};

// The process-wide engine (created by init, destroyed by shutdown).
Engine* engine_or_null();
Engine& engine();  // throws CommError("not initialized: call pipedap.init() first")
void init_engine();
void shutdown_engine();
// Finalizes MPI if this library initialized it (registered with atexit by the binding).
void finalize_mpi_if_owned();
// Aborts every rank of the job with `message` (used for unhandled exceptions and timeouts).
[[noreturn]] void abort_job(const std::string& message, int code);

}  // namespace pipedap
