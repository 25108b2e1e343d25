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

// --- environment ---------------------------------------------------------------

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? v : nullptr;
}

double env_double(const char* name, double fallback, double min) {
  const char* v = env(name);
  if (v == nullptr) return fallback;
  char* end = nullptr;
  const double x = std::strtod(v, &end);
  if (*end != '\0' || x < min) {
    throw std::invalid_argument(std::string(name) + "='" + v + "' is not a number >= " + std::to_string(min));
  }
  return x;
}

bool env_flag(const char* name) {
  const char* v = env(name);
  if (v == nullptr || std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  throw std::invalid_argument(std::string(name) + "='" + v + "': use 1 to enable or 0 to disable");
}

Algorithm env_algorithm() {
  const char* v = env("PIPEDAP_ALGORITHM");
  if (v == nullptr || std::strcmp(v, "auto") == 0) return Algorithm::kAuto;
  if (std::strcmp(v, "ring") == 0) return Algorithm::kRing;
  if (std::strcmp(v, "mpi") == 0) return Algorithm::kMpi;
  throw std::invalid_argument(std::string("PIPEDAP_ALGORITHM='") + v + "': use auto, ring or mpi");
}

// --- order check ---------------------------------------------------------------

// What each rank says it is about to run; compared across ranks with PIPEDAP_CHECK_ORDER=1.
struct Signature {
  int64_t seq;
  uint64_t hash;  // of every op in the submission
  int64_t count;  // of the first op
  int32_t nops;
  int32_t kind;
  int32_t dtype;
  int32_t device;
  char name[64];
};

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

Signature signature_of(int64_t seq, const std::vector<OpSpec>& ops) {
  Signature s{};
  s.seq = seq;
  s.nops = static_cast<int32_t>(ops.size());
  uint64_t h = 1469598103934665603ULL;
  for (const OpSpec& op : ops) {
    const int32_t fields[5] = {static_cast<int32_t>(op.kind), static_cast<int32_t>(op.dtype),
                               static_cast<int32_t>(op.reduce), op.root, op.device >= 0 ? 1 : 0};
    h = fnv1a(h, fields, sizeof fields);
    h = fnv1a(h, op.counts.data(), op.counts.size() * sizeof(int64_t));
    h = fnv1a(h, op.name.data(), op.name.size());
  }
  s.hash = h;
  const OpSpec& first = ops.front();
  s.count = first.total_count();
  s.kind = static_cast<int32_t>(first.kind);
  s.dtype = static_cast<int32_t>(first.dtype);
  s.device = first.device;
  std::strncpy(s.name, first.name.c_str(), sizeof s.name - 1);
  return s;
}

std::string describe_signature(const Signature& s) {
  std::string d = std::string(op_kind_name(static_cast<OpKind>(s.kind))) + " '" + s.name + "' (" +
                  std::to_string(s.count) + " " + dtype_name(static_cast<DType>(s.dtype)) + ")";
  if (s.nops > 1) d += " in a group of " + std::to_string(s.nops) + " ops";
  return d;
}

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

}  // namespace

EngineConfig EngineConfig::from_environment() {
  EngineConfig c;
  c.host.algorithm = env_algorithm();
  c.host.ring_min_bytes = static_cast<size_t>(env_double("PIPEDAP_RING_MIN_BYTES", 64 * 1024, 0));
  c.host.segment_bytes = static_cast<size_t>(env_double("PIPEDAP_SEGMENT_BYTES", 1 << 20, 8));
  c.host.message_bytes = static_cast<size_t>(env_double("PIPEDAP_MESSAGE_BYTES", 2 << 20, 8));
  c.host.poll.spin_us = static_cast<int>(env_double("PIPEDAP_POLL_SPIN_US", 500, 0));
  c.host.poll.max_sleep_us = static_cast<int>(env_double("PIPEDAP_POLL_MAX_SLEEP_US", 200, 0));
  c.check_order = env_flag("PIPEDAP_CHECK_ORDER");
  c.stall_seconds = env_double("PIPEDAP_STALL_SECONDS", 60, 0);
  c.timeout_seconds = env_double("PIPEDAP_TIMEOUT_SECONDS", 0, 0);
  return c;
}

Engine::Engine(const EngineConfig& config) : config_(config) {
  ensure_mpi_initialized(&thread_level_);
  int world_rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &world_.comm), "MPI_Comm_dup", world_rank);
  check_mpi(MPI_Comm_set_errhandler(world_.comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler", world_rank);
  MPI_Comm_rank(world_.comm, &world_.rank);
  MPI_Comm_size(world_.comm, &world_.size);
  MPI_Comm local;
  check_mpi(MPI_Comm_split_type(world_.comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local), "MPI_Comm_split_type",
            world_.rank);
  MPI_Comm_rank(local, &local_rank_);
  MPI_Comm_size(local, &local_size_);
  MPI_Comm_free(&local);
  create_user_ops();
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
  MPI_Comm_free(&world_.comm);
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
    handle = std::make_shared<Handle>(next_seq_++, describe(ops));
    handle->set_enqueue_ns(monotonic_ns());
    queue_.push_back(Submission{std::move(ops), handle});
  }
  cv_.notify_one();
  return handle;
}

void Engine::run_loop() {
  for (;;) {
    Submission sub;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      sub = std::move(queue_.front());
      queue_.pop_front();
      running_ = sub.handle;
      running_->mark_started();  // under the lock: the watchdog never sees an unstarted handle
    }
    execute(sub);
    std::lock_guard<std::mutex> lock(mu_);
    running_.reset();
  }
}

void Engine::execute(Submission& sub) {
  Handle& h = *sub.handle;
  const std::string what = "pipedap: " + h.description() + " (operation #" + std::to_string(h.seq()) + ") on rank " +
                           std::to_string(world_.rank);
  if (!broken_.empty()) {
    h.fail(what + " was not run because an earlier operation failed: " + broken_);
    return;
  }
  try {
    if (config_.check_order) verify_order(sub);
    if (sub.ops.front().device >= 0) {
      device_->run_group(sub.ops);
    } else {
      run_host_group(world_, sub.ops, config_.host);
    }
    h.complete();
  } catch (const std::exception& e) {
    // After a failed collective the ranks may disagree on what ran: stop here
    // rather than risk silently wrong results or a hang later.
    broken_ = what + ": " + e.what();
    h.fail(broken_);
  }
}

void Engine::verify_order(const Submission& sub) {
  const Signature mine = signature_of(sub.handle->seq(), sub.ops);
  std::vector<Signature> all(world_.size);
  std::vector<MPI_Request> req(1);
  check_mpi(MPI_Iallgather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE, world_.comm, &req[0]),
            "order check (MPI_Iallgather)", world_.rank);
  wait_all(req, config_.host.poll, world_.rank);
  for (int r = 1; r < world_.size; ++r) {
    if (all[r].hash == all[0].hash && all[r].seq == all[0].seq) continue;
    throw CommError("operation order differs between ranks at operation #" + std::to_string(all[0].seq) +
                    ": rank 0 submitted " + describe_signature(all[0]) + " but rank " + std::to_string(r) +
                    " submitted " + describe_signature(all[r]) +
                    " (operation #" + std::to_string(all[r].seq) +
                    "). Every rank must submit the same collectives (kind, name, counts, dtype) in the same order.");
  }
}

void Engine::watchdog_loop() {
  int64_t reported_seq = -1;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    watchdog_cv_.wait_for(lock, std::chrono::milliseconds(200));
    if (!running_) continue;
    const double stalled = (monotonic_ns() - running_->timings().start_ns) * 1e-9;
    const std::string what = "pipedap: rank " + std::to_string(world_.rank) + ": " + running_->description() +
                             " (operation #" + std::to_string(running_->seq()) + ") has not finished after " +
                             std::to_string(static_cast<int>(stalled)) + " s";
    const std::string why =
        "Likely causes: another rank did not submit this operation (it skipped a step, raised an error, or "
        "submitted a different operation at this position: run with PIPEDAP_CHECK_ORDER=1 to find the first "
        "mismatch), or another rank is stuck or dead.";
    if (config_.timeout_seconds > 0 && stalled >= config_.timeout_seconds) {
      lock.unlock();
      abort_job(what + ", past PIPEDAP_TIMEOUT_SECONDS=" + std::to_string(config_.timeout_seconds) +
                    "; aborting the job. " + why,
                1);
    }
    if (config_.stall_seconds > 0 && stalled >= config_.stall_seconds && running_->seq() != reported_seq) {
      reported_seq = running_->seq();
      std::fprintf(stderr, "%s (%zu more queued behind it). %s Set PIPEDAP_TIMEOUT_SECONDS to abort instead.\n",
                   what.c_str(), queue_.size(), why.c_str());
      std::fflush(stderr);
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

void init_engine() {
  std::lock_guard<std::mutex> lock(g_engine_mu);
  if (!g_engine) g_engine = std::make_unique<Engine>(EngineConfig::from_environment());
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

void abort_job(const std::string& message, int code) {
  int rank = -1, initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "[pipedap rank %d] aborting the job: %s\n", rank, message.c_str());
  std::fflush(stderr);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace pipedap
