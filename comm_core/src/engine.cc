#include "engine.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "mpi_util.h"

namespace pipedap {
namespace {

std::unique_ptr<Engine> g_engine;
std::mutex g_engine_mu;
bool g_owns_mpi = false;  // this library called MPI_Init, so it finalizes

void ensure_mpi_initialized(int* thread_level) {
  int initialized = 0;
  check_mpi(MPI_Initialized(&initialized), "MPI_Initialized", -1);
  if (!initialized) {
    check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, thread_level), "MPI_Init_thread", -1);
    g_owns_mpi = true;
  } else {
    check_mpi(MPI_Query_thread(thread_level), "MPI_Query_thread", -1);
  }
  // The engine thread makes MPI calls while the main thread runs Python, which
  // only calls MPI itself (init, finalize, abort) when the engine is idle.
  if (*thread_level < MPI_THREAD_SERIALIZED) {
    throw CommError("MPI provides thread level " + std::to_string(*thread_level) +
                    " but pipedap needs at least MPI_THREAD_SERIALIZED: if mpi4py initialized MPI, do not set "
                    "mpi4py.rc.thread_level below 'serialized'; otherwise use an MPI built with thread support");
  }
}

// A duplicate of `parent` whose errors are returned, not fatal.
Communicator duplicate(MPI_Comm parent, const char* what) {
  Communicator c;
  int rank = -1;
  MPI_Comm_rank(parent, &rank);
  check_mpi(MPI_Comm_dup(parent, &c.comm), std::string("MPI_Comm_dup (") + what + ")", rank);
  check_mpi(MPI_Comm_set_errhandler(c.comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler", rank);
  MPI_Comm_rank(c.comm, &c.rank);
  MPI_Comm_size(c.comm, &c.size);
  return c;
}

}  // namespace

Engine::Engine(const EngineConfig& config) : config_(config) {
  ensure_mpi_initialized(&thread_level_);
  world_ = duplicate(MPI_COMM_WORLD, "data");
  agree_ = duplicate(MPI_COMM_WORLD, "agreement");
  side_ = duplicate(MPI_COMM_WORLD, "side channel");
  MPI_Comm local;
  check_mpi(MPI_Comm_split_type(world_.comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local), "MPI_Comm_split_type",
            world_.rank);
  MPI_Comm_rank(local, &local_rank_);
  MPI_Comm_size(local, &local_size_);
  MPI_Comm_free(&local);
  create_user_ops();
  status_ = std::make_unique<StatusChannel>(side_);
  config_.host.poll.on_idle = [this] { service(); };
  last_submit_ns_ = monotonic_ns();
  thread_ = std::thread(&Engine::run_loop, this);
  watchdog_ = std::thread(&Engine::watchdog_loop, this);
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  watchdog_cv_.notify_all();
  thread_.join();
  watchdog_.join();
  device_.reset();
  status_.reset();
  // An agreement whose request still pends keeps its buffers: MPI may write them.
  for (auto& a : abandoned_) {
    if (!a->complete()) a.release();
  }
  for (Communicator* c : {&world_, &agree_, &side_}) MPI_Comm_free(&c->comm);
}

size_t Engine::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size() + (running_ ? 1 : 0);
}

std::string Engine::describe(const std::vector<OpSpec>& ops) const {
  if (ops.size() == 1) return ops.front().describe();
  std::string d = "group [";
  for (size_t i = 0; i < ops.size(); ++i) d += (i ? ", " : "") + ops[i].describe();
  return d + "]";
}

void Engine::validate(const std::vector<OpSpec>& ops) const {
  const std::string where = " (rank " + std::to_string(world_.rank) + ")";
  if (ops.empty()) throw std::invalid_argument("submit: empty group of operations" + where);
  for (const OpSpec& op : ops) {
    const std::string what = op.describe() + where + ": ";
    size_t want = 0;
    switch (op.kind) {
      case OpKind::kReduceScatter:
      case OpKind::kAllGather: want = static_cast<size_t>(world_.size); break;
      case OpKind::kAllReduce:
      case OpKind::kBroadcast: want = 1; break;
      case OpKind::kBarrier: want = 0; break;
    }
    if (op.counts.size() != want) {
      throw std::invalid_argument(what + "needs " + std::to_string(want) + " count(s), got " +
                                  std::to_string(op.counts.size()));
    }
    for (int64_t n : op.counts) {
      if (n < 0) throw std::invalid_argument(what + "negative element count " + std::to_string(n));
    }
    if (op.kind == OpKind::kBroadcast && (op.root < 0 || op.root >= world_.size)) {
      throw std::invalid_argument(what + "root rank " + std::to_string(op.root) + " is not in [0, " +
                                  std::to_string(world_.size) + ")");
    }
    if (op.comm != 0) {
      throw std::invalid_argument(what + "communicator " + std::to_string(op.comm) +
                                  " does not exist (only 0, the world, is available)");
    }
    // Each buffer must exist if it holds elements (this rank's block may be empty).
    const int64_t total = op.total_count();
    const int64_t mine = want == static_cast<size_t>(world_.size) ? op.counts[world_.rank] : total;
    const int64_t in_count = op.kind == OpKind::kAllGather ? mine : total;
    const int64_t out_count = op.kind == OpKind::kReduceScatter ? mine : total;
    if ((in_count > 0 && op.input == 0) || (out_count > 0 && op.output == 0)) {
      throw std::invalid_argument(what + "null buffer address");
    }
    if ((op.device >= 0) != (ops.front().device >= 0) || (op.device >= 0 && op.device != ops.front().device)) {
      throw std::invalid_argument(what + "a group must be all host memory or all on one CUDA device");
    }
    if (op.device >= 0 && op.kind == OpKind::kBarrier) {
      throw std::invalid_argument(what + "a barrier is a host operation (device=-1)");
    }
  }
}

std::shared_ptr<Handle> Engine::submit(std::vector<OpSpec> ops) {
  validate(ops);
  std::shared_ptr<Handle> handle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) throw CommError("submit: pipedap is shutting down; call pipedap.init() again");
    if (ops.front().device >= 0) {
      if (!device_) device_ = make_device_backend(world_, config_.host.poll);
      for (OpSpec& op : ops) device_->prepare(op);
    }
    // Horovod's rule: a name may not be reused while an operation of that name is unfinished.
    int32_t flags = 0;
    for (const OpSpec& op : ops) {
      if (op.kind != OpKind::kBarrier && names_in_flight_.count(op.name)) flags |= kNameInFlight;
      names_in_flight_.insert(op.name);
    }
    const int64_t seq = next_seq_++;
    handle = std::make_shared<Handle>(seq, describe(ops));
    handle->set_enqueue_ns(monotonic_ns());
    last_submitted_ = handle->description();
    last_submit_ns_ = monotonic_ns();
    Fingerprint fingerprint = fingerprint_of(seq, ops, flags);
    queue_.push_back(Submission{std::move(ops), handle, fingerprint, nullptr});
  }
  cv_.notify_one();
  return handle;
}

void Engine::finish(Submission& sub, const std::string& error, bool ran) {
  if (!ran && sub.ops.front().device >= 0) device_->discard(sub.ops);
  {
    // Before the handle completes: the caller may reuse the names right after.
    std::lock_guard<std::mutex> lock(mu_);
    forget_names(sub.ops);
  }
  if (error.empty()) {
    sub.handle->complete();
  } else {
    sub.handle->fail(error);
  }
}

void Engine::forget_names(const std::vector<OpSpec>& ops) {
  for (const OpSpec& op : ops) {
    auto it = names_in_flight_.find(op.name);
    if (it != names_in_flight_.end()) names_in_flight_.erase(it);
  }
}

void Engine::run_loop() {
  const auto idle_wait = std::chrono::microseconds(config_.host.poll.idle_interval_us);
  for (;;) {
    Submission sub;
    Submission* next = nullptr;  // stays valid: only this thread pops, and push_back keeps references
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (!stopping_ && queue_.empty()) {
        if (!cv_.wait_for(lock, idle_wait, [this] { return stopping_ || !queue_.empty(); })) {
          lock.unlock();
          service();  // idle ranks answer status questions too
          lock.lock();
        }
      }
      if (queue_.empty()) return;  // stopping and drained
      sub = std::move(queue_.front());
      queue_.pop_front();
      if (!queue_.empty()) next = &queue_.front();
      running_ = sub.handle;
      running_->mark_started();  // under the lock: the watchdog never sees an unstarted handle
      phase_ = Phase::kAgreeing;
    }
    execute(sub, next);
    std::lock_guard<std::mutex> lock(mu_);
    running_.reset();
    phase_ = Phase::kIdle;
  }
}

void Engine::agree(Submission& sub) {
  if (!sub.agreement) sub.agreement = std::make_unique<Agreement>(agree_, sub.fingerprint);
}

void Engine::abandon_agreement(Submission& sub) {
  if (sub.agreement && !sub.agreement->complete()) abandoned_.push_back(std::move(sub.agreement));
}

void Engine::execute(Submission& sub, Submission* next) {
  Handle& h = *sub.handle;
  const std::string what = "pipedap: " + h.description() + " (operation #" + std::to_string(h.seq()) + ") on rank " +
                           std::to_string(world_.rank);
  if (!broken_.empty()) {
    abandon_agreement(sub);
    finish(sub, what + " was not run because an earlier operation failed: " + broken_, /*ran=*/false);
    return;
  }
  bool ran = false;  // whether the data phase started (a device group's events are then its own)
  try {
    if (world_.size > 1) {
      agree(sub);
      if (next != nullptr) agree(*next);  // its latency hides behind this submission's data
      sub.agreement->wait(config_.host.poll, world_.rank);
      if (!sub.agreement->agreed()) {
        finish(sub, what + " was not run: " + sub.agreement->explain(side_, h.description(), config_.host.poll),
               /*ran=*/false);
        return;  // every rank failed this same submission: the next ones can still run
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      phase_ = Phase::kMovingData;
    }
    ran = true;
    if (sub.ops.front().device >= 0) {
      device_->run_group(sub.ops);
    } else {
      run_host_group(world_, sub.ops, config_.host, scratch_);
    }
    finish(sub, "", /*ran=*/true);
  } catch (const std::exception& e) {
    // After a failed data phase the ranks may disagree on what ran: stop here
    // rather than risk silently wrong results or a hang later.
    broken_ = what + ": " + e.what();
    finish(sub, broken_, ran);
  }
}

RankStatus Engine::status_snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  RankStatus s;
  const int64_t now = monotonic_ns();
  s.submitted = next_seq_;
  s.submitted_s = (now - last_submit_ns_) * 1e-9;
  std::strncpy(s.last_what, last_submitted_.c_str(), sizeof s.last_what - 1);
  if (running_) {
    s.running = running_->seq();
    s.phase = static_cast<int32_t>(phase_);
    s.running_s = (now - running_->start_ns()) * 1e-9;
    std::strncpy(s.running_what, running_->description().c_str(), sizeof s.running_what - 1);
  }
  return s;
}

std::string Engine::stall_message(const Inquiry& inquiry) const {
  std::lock_guard<std::mutex> lock(mu_);
  const double stalled = running_ ? (monotonic_ns() - running_->start_ns()) * 1e-9 : 0;
  return "pipedap: rank " + std::to_string(world_.rank) + ": " + (running_ ? running_->description() : "?") +
         " (operation #" + std::to_string(inquiry.seq) + ") has not finished after " +
         format_number(static_cast<double>(static_cast<int64_t>(stalled))) + " s (" +
         std::to_string(queue_.size()) + " more queued behind it).";
}

void Engine::service() {
  if (world_.size < 2) return;
  status_->serve([this] { return status_snapshot(); });  // a snapshot only when asked
  Inquiry inquiry;
  {
    std::lock_guard<std::mutex> lock(mu_);
    inquiry = inquiry_;
  }
  if (inquiry.seq < 0) return;
  status_->ask();
  const auto answers = status_->answers();
  if (!answers) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    inquiry = inquiry_;  // a stall report may have turned into a timeout meanwhile
    inquiry_ = Inquiry{};
    if (!running_ || running_->seq() != inquiry.seq) return;  // it finished meanwhile: nothing to report
  }
  const std::string timeout = format_number(config_.timeout_seconds);
  std::string report = stall_message(inquiry) + describe_ranks(world_.rank, inquiry.seq, *answers) +
                       "\n  A rank that has not submitted it skipped it (a rank-dependent branch), is still "
                       "computing, or is stuck outside pipedap (look at its stack: py-spy dump --pid PID).";
  if (inquiry.timeout) {
    abort_job(report + "\n  Past PIPEDAP_TIMEOUT_SECONDS=" + timeout + ": aborting the job.", 1);
  }
  report += config_.timeout_seconds > 0
                ? "\n  The job aborts after PIPEDAP_TIMEOUT_SECONDS=" + timeout + " (0: never)."
                : "\n  PIPEDAP_TIMEOUT_SECONDS=0: pipedap waits forever.";
  std::fprintf(stderr, "%s\n", report.c_str());
  std::fflush(stderr);
}

void Engine::watchdog_loop() {
  int64_t reported_seq = -1;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    watchdog_cv_.wait_for(lock, std::chrono::milliseconds(200));
    if (!running_) continue;
    const int64_t now = monotonic_ns();
    const double stalled = (now - running_->start_ns()) * 1e-9;
    const int64_t seq = running_->seq();
    if (config_.timeout_seconds > 0 && stalled >= config_.timeout_seconds) {
      if (!(inquiry_.seq == seq && inquiry_.timeout)) {
        inquiry_ = Inquiry{seq, true, now};  // the engine thread asks the others, reports, aborts
      } else if ((now - inquiry_.asked_ns) * 1e-9 > kAnswerSeconds + 10) {
        const std::string what = "rank " + std::to_string(world_.rank) + ": " + running_->description() +
                                 " (operation #" + std::to_string(seq) + ") has not finished after " +
                                 format_number(static_cast<double>(static_cast<int64_t>(stalled))) + " s";
        lock.unlock();
        abort_job(what + ", past PIPEDAP_TIMEOUT_SECONDS=" + format_number(config_.timeout_seconds) +
                      " (the engine thread did not finish the stall report: it is stuck outside its polling loop)",
                  1);
      }
    } else if (config_.stall_seconds > 0 && stalled >= config_.stall_seconds && seq != reported_seq &&
               inquiry_.seq < 0) {
      reported_seq = seq;
      inquiry_ = Inquiry{seq, false, now};
    }
  }
}

Engine* engine_or_null() {
  std::lock_guard<std::mutex> lock(g_engine_mu);
  return g_engine.get();
}

Engine& engine() {
  Engine* e = engine_or_null();
  if (e == nullptr) throw CommError("pipedap is not initialized: call pipedap.init() first");
  return *e;
}

void init_engine(const EngineConfig& config) {
  std::lock_guard<std::mutex> lock(g_engine_mu);
  if (!g_engine) g_engine = std::make_unique<Engine>(config);
}

void shutdown_engine() {
  std::unique_ptr<Engine> e;
  {
    std::lock_guard<std::mutex> lock(g_engine_mu);
    e = std::move(g_engine);
  }
  e.reset();  // joins the threads outside the lock
}

void finalize_mpi_if_owned() {
  shutdown_engine();
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (g_owns_mpi && initialized && !finalized) {
    free_user_ops();
    MPI_Finalize();
  }
}

}  // namespace pipedap
