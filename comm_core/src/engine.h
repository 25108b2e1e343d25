// The engine: one background thread per process owns every MPI/NCCL call and
// executes submissions in submission order.
//
// [Note: why one ordered thread]
// Collectives match across ranks by order, not by name. If Python threads or
// autograd hooks issued them directly, two ranks could issue them in different
// orders and deadlock. Here Python only enqueues (never waiting on the
// network); the single engine thread issues them in the order they were
// enqueued, which the caller (the optimizer, from its plan) makes identical on
// every rank. Every submission is agreed across ranks before its data moves
// (agreement.h), so a rank that submits something else gets an error, never
// a wrong match. A submission runs on a process set (process_set.h; 0, the
// world, by default); every set's submissions share this one thread and its
// order. Point-to-point submissions (sends and receives) are posted in that
// order but neither agreed nor waited for (p2p.h): they advance while the
// thread goes on with later submissions.
//
// [Note: barriers meet apart from the order]
// barrier() is not an ordered submission. A rank may submit a collective
// that another rank submits only after a barrier (rank 0: allreduce 'x',
// barrier; rank 1: barrier, allreduce 'x'), as Horovod and MPI allow: there
// the barrier must not queue behind rank 0's allreduce, which waits for rank
// 1. So meet() exchanges a token with every member of the set (an Agreement
// on the set's agreement communicator, with a tag of its own: the n-th
// barrier on a set meets the n-th on every member), progressed by the engine
// thread whatever it is doing (it services meetings wherever it answers
// status questions). A barrier returns once every member called it and
// everything this rank submitted before it finished. The watchdog reports a
// barrier that waits, naming the members that have not called it.
//
// [Note: names in flight]
// Horovod's rule: a name may not be reused while an operation of that name is
// in flight. Here an operation counts as in flight until its caller saw it
// finish: it waited for it or polled it done, or for something it submitted
// later (the thread runs submissions in order, so that finished after it),
// or passed a barrier. Releasing names when the engine finishes would make
// the rule a race: a fast operation is sometimes over before the same
// Python line submits its name again.
#pragma once

#include <mpi.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "agreement.h"
#include "device_backend.h"
#include "host_collectives.h"
#include "op.h"
#include "p2p.h"
#include "process_set.h"
#include "status.h"

namespace pipedap {

// Built by Python from the PIPEDAP_* settings (pipedap/settings.py).
struct EngineConfig {
  HostCollectiveConfig host;
  double stall_seconds = 60.0;     // PIPEDAP_STALL_SECONDS; <= 0 disables the report
  double timeout_seconds = 600.0;  // PIPEDAP_TIMEOUT_SECONDS; <= 0: never abort
};

using Resolver = std::function<std::vector<OpSpec>()>;

class Engine {
 public:
  // Initialises MPI if needed (MPI_THREAD_MULTIPLE requested) and starts the thread.
  explicit Engine(const EngineConfig& config);
  ~Engine();  // drains the queue, stops the threads; does not finalize MPI
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Every member of set `process_set` calls it (the n-th on every member
  // meets the n-th); the handle finishes when every member called it and
  // everything this rank submitted before it finished.
  std::shared_ptr<Handle> meet(int process_set = 0);
  // Enqueues ops to run as one unit on process set `process_set` and returns
  // immediately. CommError at once if the set does not exist or this rank is
  // not a member.
  // With `resolve`: host collectives whose sizes are known only once the submissions before them ran (an
  // all-gather sized by a shape exchange). `ops` are agreed as they are (their counts all zero), and when
  // the submission comes up the engine thread calls `resolve` for the ops to run (checked as submit
  // checks; an exception from it fails the submission on this rank, before any data moves).
  std::shared_ptr<Handle> submit(std::vector<OpSpec> ops, int process_set = 0, Resolver resolve = {});
  // Collective over the world, in the same order on every rank; they wait
  // until done and raise CommError on every rank if refused.
  int add_process_set(const std::vector<int>& ranks);  // returns the new set's id
  void remove_process_set(int id);
  // Set `id` (CommError if there is none).
  std::shared_ptr<const ProcessSet> process_set(int id) const { return sets_->existing(id, world_.rank); }
  std::vector<int> process_set_ids() const { return sets_->ids(); }

  int rank() const { return world_.rank; }
  int size() const { return world_.size; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int thread_level() const { return thread_level_; }
  const EngineConfig& config() const { return config_; }
  // Installs the measured choice of algorithm ([Note: the measured choice of
  // algorithm] in host_collectives.h) for the ops this rank submits from now
  // on; null: back to PIPEDAP_RING_MIN_BYTES. Every rank must install the same
  // table between the same two of its submissions (pipedap.algorithms does).
  void set_algorithm_table(std::shared_ptr<const AlgorithmTable> table);
  std::shared_ptr<const AlgorithmTable> algorithm_table() const;
  // What an op of `kind` and `bytes` on host memory submitted now would run as.
  Algorithm algorithm_for(OpKind kind, size_t bytes) const;
  // Submissions not yet finished, point-to-point ones included (for diagnostics).
  size_t pending() const;

 private:
  struct Submission {
    std::shared_ptr<ProcessSet> set;
    std::vector<OpSpec> ops;
    std::shared_ptr<Handle> handle;
    Fingerprint fingerprint;
    std::unique_ptr<Agreement> agreement;  // started by the engine thread, at most one submission ahead
    Resolver resolve;  // submit's, for a deferred submission
    std::shared_ptr<const AlgorithmTable> table;  // a deferred submission's: the table at submission
  };
  // A barrier ([Note: barriers meet apart from the order]).
  struct Meeting {
    std::shared_ptr<ProcessSet> set;
    std::shared_ptr<Handle> handle;  // its seq: the set's barrier count
    std::shared_ptr<Handle> after;   // this rank's last collective submitted before it; null: none
    std::unique_ptr<Agreement> tokens;  // started by the engine thread
    int64_t gone_since_ns = 0;  // when a member that has not come was first seen departed
  };
  // Submissions whose names are held ([Note: names in flight]), in submission order.
  struct Held {
    std::shared_ptr<Handle> handle;
    std::shared_ptr<ProcessSet> set;
    std::vector<std::string> names;
  };
  // A stall report the watchdog asked the engine thread for.
  enum class Watched { kCollective, kTransfer, kMeeting };
  struct Inquiry {
    std::shared_ptr<Handle> handle;  // the stalled submission; null: none
    std::shared_ptr<ProcessSet> set;
    Watched what = Watched::kCollective;
    std::vector<int> ranks;  // whom to ask (world ranks): the set's members, the transfers' peers, or the absent
    bool timeout = false;
    int64_t asked_ns = 0;
    // "operation #4 of process set 2 (ranks 1, 2)", "point-to-point #3", "barrier #2 on the world".
    std::string operation() const;
  };

  // Under mu_: queues `ops` on `set` (validated, and prepared if on a device).
  std::shared_ptr<Handle> enqueue(const std::shared_ptr<ProcessSet>& set, std::vector<OpSpec> ops,
                                  Resolver resolve = {});
  // Engine thread: replaces a deferred submission's ops by what its resolver returns; why it cannot ("": done).
  std::string resolve_ops(Submission& sub);
  void run_loop();
  void execute(Submission& sub, Submission* next);
  // Engine thread: advances the transfers (and answers status questions) until none is outstanding on `set`.
  void wait_for_transfers(int set);
  DeviceBackend& device_backend();  // under mu_: created on first use
  // Queues a process-set change on the world and waits for it.
  void run_on_world(OpSpec op);
  // Engine thread: a join() ([Note: join] in join.h), until every rank joined.
  void run_join(Submission& sub, const std::string& what);
  // Engine thread: adds or removes a process set; returns why it was refused ("": done).
  std::string change_process_sets(const OpSpec& op);
  void agree(Submission& sub);
  // Engine thread: waits until `agreement` completes (""), or returns why it never will: a member of
  // `set` shut down ([Note: departure notices] in status.h).
  std::string await_agreement(Agreement& agreement, const ProcessSet& set);
  void abandon_agreement(Submission& sub);
  // The watchdog and stall reports (watchdog.cc).
  void service();  // engine thread: answer status questions, finish a stall report
  RankStatus status_snapshot(int64_t set) const;
  std::string stall_message(const Inquiry& inquiry) const;
  void watchdog_loop();
  std::string describe(const std::vector<OpSpec>& ops, const ProcessSet& set) const;
  // A deferred submission's, before its counts are known.
  static std::string describe_unsized(const std::vector<OpSpec>& ops);
  void validate(const std::vector<OpSpec>& ops, const ProcessSet& set) const;
  // Under mu_: frees the names of every held submission up to the last one its caller saw finish.
  void release_observed_names();
  // Engine thread: starts and finishes barriers ([Note: barriers meet apart from the order]).
  bool progress_meetings();  // true if one finished
  void fail_meetings(const std::string& why);
  // Engine thread: why `m` can never finish ("": it still may); `met` says whether every member called it.
  std::string meeting_refused(Meeting& m, bool& met);
  // "pipedap: barrier #N on rank R failed: <why>", the words of every failed barrier.
  std::string meeting_failure(const Meeting& m, const std::string& why) const;
  // The world ranks of `m`'s set that have not called it yet.
  std::vector<int> absent(const Meeting& m) const;
  // Completes (error empty) or fails the submission's handle, after forgetting its names.
  // `ran`: its data phase started (else the device backend releases what it prepared).
  void finish(Submission& sub, const std::string& error, bool ran);

  EngineConfig config_;
  std::shared_ptr<const AlgorithmTable> algorithm_table_;  // under mu_; null: none measured
  // Four duplicates of MPI_COMM_WORLD: our traffic never matches the user's,
  // and agreements, data, stall reports and point-to-point transfers never
  // match each other's. They are process set 0's data, agree, side and p2p
  // communicators; `sets_` frees them.
  Communicator world_;  // data
  Communicator side_;   // status questions (status.h); set 0's mismatch descriptions
  std::unique_ptr<ProcessSetTable> sets_;
  std::unique_ptr<StatusChannel> status_;
  ScratchArena scratch_;  // the ring's, reused (engine thread only)
  int local_rank_ = 0;
  int local_size_ = 1;
  int thread_level_ = 0;
  std::unique_ptr<DeviceBackend> device_;  // created on the first CUDA op
  std::unique_ptr<PointToPoint> p2p_;  // engine thread only, but for oldest()

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Submission> queue_;
  std::deque<Meeting> meetings_;  // pending barriers, in call order
  std::deque<Held> held_;
  std::shared_ptr<Handle> last_collective_;  // this rank's last collective submission
  bool new_meeting_ = false;  // wakes the idle engine thread
  std::shared_ptr<Handle> running_;  // the submission the engine thread is executing
  std::shared_ptr<ProcessSet> running_set_;  // and its set
  Phase phase_ = Phase::kIdle;
  Inquiry inquiry_;
  bool joining_ = false;   // a join() is queued or running: nothing more may be submitted until it returns
  bool stopping_ = false;  // no more submissions; the engine thread stops once everything submitted finished
  bool stopped_ = false;   // the engine thread stopped: so does the watchdog
  std::string broken_;  // set after a failed data phase: later ops fail fast with this reason
  std::vector<std::unique_ptr<Agreement>> abandoned_;  // pending agreements of failed submissions (never freed early)

  std::thread thread_;
  std::thread watchdog_;
  std::condition_variable watchdog_cv_;
};

// The process-wide engine (created by init, destroyed by shutdown).
Engine* engine_or_null();
Engine& engine();  // throws CommError("not initialized: call pipedap.init() first")
void init_engine(const EngineConfig& config);
void shutdown_engine();
// Finalizes MPI if this library initialized it (registered with atexit by the binding).
void finalize_mpi_if_owned();

}  // namespace pipedap
