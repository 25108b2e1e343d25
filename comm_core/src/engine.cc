#include "engine.h"

#include <chrono>
#include <algorithm>
#include <stdexcept>

#include "join.h"
#include "mpi_util.h"

namespace pipedap {
namespace {

std::unique_ptr<Engine> g_engine;
std::mutex g_engine_mu;
int64_t g_generation = 0;  // engines this process started ([Note: departure notices] in status.h)
constexpr int64_t kDepartureGraceNs = 1'000'000'000;  // see Engine::await_agreement
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

// The lowest rank within the set that is not in `joined` (ascending): who leads a join round.
int lowest_not_in(const std::vector<int>& joined) {
  int r = 0;
  for (int j : joined) {
    if (j != r) break;
    ++r;
  }
  return r;
}

// A send's or receive's peer and tag (the rest is checked as for a collective).
void validate_p2p(const OpSpec& op, const ProcessSet& set, const std::function<std::string()>& what) {
  const int size = static_cast<int>(set.ranks.size());
  if (size == 1) throw std::invalid_argument(what() + set.label() + " has one rank: there is no peer");
  if (op.root == set.rank) {
    throw std::invalid_argument(what() + "the peer is this rank itself: a rank cannot send to or receive from itself");
  }
  if (op.root < 0 || op.root >= size) {
    throw std::invalid_argument(what() + "peer rank " + std::to_string(op.root) + " is not in [0, " +
                                std::to_string(size) + ")" + (set.id == 0 ? "" : " (peers are ranks within the set)"));
  }
  if (op.tag < 0 || op.tag > kMaxTag) {
    throw std::invalid_argument(what() + "tag " + std::to_string(op.tag) + " is not in [0, " + std::to_string(kMaxTag) +
                                "]: point-to-point tags are MPI tags, and every MPI allows up to " +
                                std::to_string(kMaxTag));
  }
}

void validate_join(const std::vector<OpSpec>& ops, const ProcessSet& set, const std::function<std::string()>& what) {
  if (ops.size() != 1) throw std::invalid_argument(what() + "join is submitted alone, not in a group");
  if (set.id != 0) {
    throw std::invalid_argument(what() + "join runs on the world (process set 0): it covers the world's collectives");
  }
  if (ops.front().device >= 0) throw std::invalid_argument(what() + "join is a host operation (device=-1)");
}

}  // namespace

Engine::Engine(const EngineConfig& config) : config_(config) {
  ensure_mpi_initialized(&thread_level_);
  world_ = duplicate(MPI_COMM_WORLD, "data");
  side_ = duplicate(MPI_COMM_WORLD, "side channel");
  sets_ = std::make_unique<ProcessSetTable>(world_, duplicate(MPI_COMM_WORLD, "agreement"), side_,
                                            duplicate(MPI_COMM_WORLD, "point-to-point"), monotonic_ns());
  MPI_Comm local;
  check_mpi(MPI_Comm_split_type(world_.comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local), "MPI_Comm_split_type",
            world_.rank);
  MPI_Comm_rank(local, &local_rank_);
  MPI_Comm_size(local, &local_size_);
  MPI_Comm_free(&local);
  create_user_ops();
  status_ = std::make_unique<StatusChannel>(side_, ++g_generation);
  p2p_ = std::make_unique<PointToPoint>(
      world_.rank, message_segment_bytes(config_.host),
      [this]() -> DeviceBackend& {
        std::lock_guard<std::mutex> lock(mu_);
        return device_backend();
      },
      [this](const std::string& why) { broken_ = why; });
  config_.host.poll.on_idle = [this] { service(); };
  config_.host.poll.progress = [this] { p2p_->progress(); };
  thread_ = std::thread(&Engine::run_loop, this);
  watchdog_ = std::thread(&Engine::watchdog_loop, this);
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();  // after every submission finished, point-to-point ones included
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;  // the watchdog watched the drain too
  }
  watchdog_cv_.notify_all();
  watchdog_.join();
  status_->announce_departure();  // a rank still waiting for this one fails at once instead of timing out
  p2p_.reset();
  device_.reset();
  status_.reset();
  // An agreement whose request still pends keeps its buffers: MPI may write them.
  for (auto& a : abandoned_) {
    if (!a->complete()) a.release();
  }
  sets_.reset();  // frees every set's communicators, the world's included
}

size_t Engine::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size() + (running_ ? 1 : 0) + p2p_->oldest().outstanding;
}

std::string Engine::describe(const std::vector<OpSpec>& ops, const ProcessSet& set) const {
  // A peer by its world rank (validated: it is a member).
  auto one = [&](const OpSpec& op) { return op.describe(is_p2p_op(op.kind) ? set.ranks.at(op.root) : -1); };
  if (ops.size() == 1) return one(ops.front());
  std::string d = "group [";
  for (size_t i = 0; i < ops.size(); ++i) d += (i ? ", " : "") + one(ops[i]);
  return d + "]";
}

std::string Engine::describe_unsized(const std::vector<OpSpec>& ops) {
  std::string d;
  for (const OpSpec& op : ops) {
    d += (d.empty() ? "" : ", ") + std::string(op_kind_name(op.kind)) + " '" + op.name + "' (" + dtype_name(op.dtype) +
         ", sized when it comes up)";
  }
  return ops.size() == 1 ? d : "group [" + d + "]";
}

DeviceBackend& Engine::device_backend() {
  if (!device_) device_ = make_device_backend(world_.rank, config_.host.poll);
  return *device_;
}

void Engine::validate(const std::vector<OpSpec>& ops, const ProcessSet& set) const {
  // Words for an error only (built on every submission they would cost a small operation microseconds).
  auto where = [&] { return " (rank " + std::to_string(world_.rank) + (set.id == 0 ? "" : ", " + set.label()) + ")"; };
  const int size = static_cast<int>(set.ranks.size());
  if (ops.empty()) throw std::invalid_argument("submit: empty group of operations" + where());
  const bool p2p = is_p2p_op(ops.front().kind);
  for (const OpSpec& op : ops) {
    const std::function<std::string()> what = [&] { return op.describe() + where() + ": "; };
    if (is_process_set_op(op.kind)) {
      throw std::invalid_argument(what() + "an internal operation kind: call add_process_set / remove_process_set");
    }
    if (is_p2p_op(op.kind) != p2p) {
      throw std::invalid_argument(what() + "a submission cannot mix point-to-point operations (send, recv) with "
                                  "collectives: submit them separately");
    }
    if (p2p) validate_p2p(op, set, what);
    if (op.kind == OpKind::kJoin) validate_join(ops, set, what);
    const bool per_rank = op.kind == OpKind::kReduceScatter || op.kind == OpKind::kAllGather;
    const bool matrix = op.kind == OpKind::kAllToAll;
    const size_t want = per_rank ? static_cast<size_t>(size)
                        : matrix ? static_cast<size_t>(size) * size
                        : op.kind == OpKind::kBarrier || op.kind == OpKind::kJoin ? 0 : 1;
    if (op.counts.size() != want) {
      throw std::invalid_argument(what() + "needs " + std::to_string(want) + " count(s), got " +
                                  std::to_string(op.counts.size()) +
                                  (per_rank ? " (one per member of the set)"
                                   : matrix ? " (a members x members matrix: what each sends to each)" : ""));
    }
    for (int64_t n : op.counts) {
      if (n < 0) throw std::invalid_argument(what() + "negative element count " + std::to_string(n));
    }
    if (op.kind == OpKind::kBroadcast && (op.root < 0 || op.root >= size)) {
      throw std::invalid_argument(what() + "root rank " + std::to_string(op.root) + " is not in [0, " +
                                  std::to_string(size) + ")" + (set.id == 0 ? "" : " (roots are ranks within the set)"));
    }
    // Each buffer must exist if it holds elements (this rank's block may be empty).
    const int64_t total = op.total_count();
    const int64_t mine = per_rank ? op.counts[set.rank] : total;
    int64_t in_count = op.kind == OpKind::kAllGather ? mine : op.kind == OpKind::kRecv ? 0 : total;
    int64_t out_count = op.kind == OpKind::kReduceScatter ? mine : op.kind == OpKind::kSend ? 0 : total;
    if (matrix) {  // row set.rank is sent, column set.rank received
      in_count = out_count = 0;
      for (int j = 0; j < size; ++j) {
        in_count += op.counts[static_cast<size_t>(set.rank) * size + j];
        out_count += op.counts[static_cast<size_t>(j) * size + set.rank];
      }
    }
    if (op.kind == OpKind::kJoin) out_count = 1;
    if ((in_count > 0 && op.input == 0) || (out_count > 0 && op.output == 0)) {
      throw std::invalid_argument(what() + "null buffer address");
    }
    if ((op.device >= 0) != (ops.front().device >= 0) || (op.device >= 0 && op.device != ops.front().device)) {
      throw std::invalid_argument(what() + "a group must be all host memory or all on one CUDA device");
    }
    if (op.algorithm != Algorithm::kAuto && !has_algorithm_choice(op)) {
      throw std::invalid_argument(what() + "algorithm='" + algorithm_name(op.algorithm) +
                                  "' applies to host reducescatter, allgather and allreduce only");
    }
    if (op.device >= 0 && op.kind == OpKind::kBarrier) {
      throw std::invalid_argument(what() + "a barrier is a host operation (device=-1)");
    }
  }
}

std::shared_ptr<Handle> Engine::submit(std::vector<OpSpec> ops, int process_set, Resolver resolve) {
  const std::shared_ptr<ProcessSet> set = sets_->member_set(process_set, world_.rank);
  validate(ops, *set);
  for (const OpSpec& op : ops) {
    if (resolve && (op.device >= 0 || is_p2p_op(op.kind) || op.total_count() != 0)) {
      throw std::invalid_argument("submit: " + op.describe() +
                                  ": deferred submissions are host collectives whose counts are all zero until resolved");
    }
  }
  std::shared_ptr<Handle> handle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    handle = enqueue(set, std::move(ops), std::move(resolve));
  }
  cv_.notify_one();
  return handle;
}

std::string Engine::resolve_ops(Submission& sub) {
  try {
    std::vector<OpSpec> ops = sub.resolve();
    validate(ops, *sub.set);
    if (ops.size() != sub.ops.size()) throw std::invalid_argument("the resolver returned another number of operations");
    for (size_t i = 0; i < ops.size(); ++i) {
      if (ops[i].kind != sub.ops[i].kind || ops[i].name != sub.ops[i].name || ops[i].device >= 0) {
        throw std::invalid_argument("the resolver returned " + ops[i].describe() + " for " + sub.ops[i].describe());
      }
    }
    for (OpSpec& op : ops) op.algorithm = choose_algorithm(op, config_.host, sub.table.get());
    sub.ops = std::move(ops);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

std::shared_ptr<Handle> Engine::enqueue(const std::shared_ptr<ProcessSet>& set, std::vector<OpSpec> ops,
                                        Resolver resolve) {
  if (stopping_) throw CommError("submit: pipedap is shutting down; call pipedap.init() again");
  if (joining_) {
    throw CommError("submit: " + describe(ops, *set) + " on rank " + std::to_string(world_.rank) +
                    ": this rank is in join() and submits nothing until it returns");
  }
  const bool p2p = is_p2p_op(ops.front().kind);
  std::vector<std::string> held;  // [Note: names in flight]
  if (!p2p) {
    release_observed_names();
    for (const OpSpec& op : ops) {
      if (op.kind == OpKind::kBarrier || op.kind == OpKind::kJoin || is_process_set_op(op.kind)) continue;
      if (set->names_in_flight.count(op.name) || std::find(held.begin(), held.end(), op.name) != held.end()) {
        throw std::invalid_argument(op.describe() + " on rank " + std::to_string(world_.rank) +
                                    ": an operation named '" + op.name + "' is still in flight" +
                                    (set->id == 0 ? "" : " on " + set->label()) +
                                    "; names must be unique among operations not yet synchronized (synchronize "
                                    "the first one, or give them different names)");
      }
      held.push_back(op.name);
    }
  }
  if (ops.front().device >= 0) {
    for (OpSpec& op : ops) device_backend().prepare(op);
  }
  if (p2p) {  // not agreed: numbered apart, and names are free (p2p.h)
    auto handle = std::make_shared<Handle>(set->next_p2p_seq++, describe(ops, *set));
    handle->set_enqueue_ns(monotonic_ns());
    queue_.push_back(Submission{set, std::move(ops), handle, Fingerprint{}, nullptr, {}, nullptr});
    return handle;
  }
  const int64_t seq = set->next_seq++;
  auto handle = std::make_shared<Handle>(seq, resolve ? describe_unsized(ops) : describe(ops, *set));
  handle->set_enqueue_ns(monotonic_ns());
  for (const std::string& name : held) set->names_in_flight.insert(name);
  held_.push_back(Held{handle, set, std::move(held)});
  last_collective_ = handle;
  set->last_submitted = handle->description();
  set->last_submit_ns = monotonic_ns();
  const bool join = ops.front().kind == OpKind::kJoin;
  joining_ = join;
  if (!resolve) {  // a deferred submission's sizes, and so its algorithms, are known in resolve_ops
    for (OpSpec& op : ops) op.algorithm = choose_algorithm(op, config_.host, algorithm_table_.get());
  }
  Fingerprint fingerprint = join ? join_fingerprint(seq, seq) : fingerprint_of(seq, ops);
  queue_.push_back(Submission{set, std::move(ops), handle, fingerprint, nullptr, std::move(resolve), algorithm_table_});
  return handle;
}

void Engine::set_algorithm_table(std::shared_ptr<const AlgorithmTable> table) {
  if (table) validate_table(*table);
  std::lock_guard<std::mutex> lock(mu_);
  algorithm_table_ = std::move(table);
}

std::shared_ptr<const AlgorithmTable> Engine::algorithm_table() const {
  std::lock_guard<std::mutex> lock(mu_);
  return algorithm_table_;
}

Algorithm Engine::algorithm_for(OpKind kind, size_t bytes) const {
  OpSpec op;
  op.kind = kind;
  op.dtype = DType::kUInt8;
  op.counts = {static_cast<int64_t>(bytes)};
  std::lock_guard<std::mutex> lock(mu_);
  return choose_algorithm(op, config_.host, algorithm_table_.get());
}

void Engine::run_on_world(OpSpec op) {
  std::shared_ptr<Handle> handle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    handle = enqueue(sets_->find(0), {std::move(op)});
  }
  cv_.notify_one();
  handle->wait(-1);  // throws CommError if refused
}

int Engine::add_process_set(const std::vector<int>& ranks) {
  OpSpec op;
  op.kind = OpKind::kAddProcessSet;
  op.counts.assign(ranks.begin(), ranks.end());
  run_on_world(std::move(op));
  return sets_->id_of(ranks);
}

void Engine::remove_process_set(int id) {
  OpSpec op;
  op.kind = OpKind::kRemoveProcessSet;
  op.counts = {id};
  run_on_world(std::move(op));
}

void Engine::finish(Submission& sub, const std::string& error, bool ran) {
  if (!ran && sub.ops.front().device >= 0) device_->discard(sub.ops);
  if (sub.ops.front().kind == OpKind::kJoin) {
    std::lock_guard<std::mutex> lock(mu_);
    joining_ = false;
  }
  if (error.empty()) {
    sub.handle->complete();
  } else {
    sub.handle->fail(error);
  }
}

void Engine::release_observed_names() {
  // Everything submitted before a submission its caller saw finish has finished too: one thread runs them in
  // order. (Not after a failed barrier, which may not have waited for them: only what finished is freed.)
  size_t n = held_.size();
  while (n > 0 && !held_[n - 1].handle->observed()) --n;
  n = static_cast<size_t>(std::find_if(held_.begin(), held_.begin() + static_cast<std::ptrdiff_t>(n),
                                       [](const Held& h) { return !h.handle->done(); }) -
                          held_.begin());
  for (size_t i = 0; i < n; ++i) {
    for (const std::string& name : held_[i].names) {
      auto& names = held_[i].set->names_in_flight;
      names.erase(names.find(name));
    }
  }
  held_.erase(held_.begin(), held_.begin() + static_cast<std::ptrdiff_t>(n));
}

std::shared_ptr<Handle> Engine::meet(int process_set) {
  const std::shared_ptr<ProcessSet> set = sets_->member_set(process_set, world_.rank);
  std::shared_ptr<Handle> handle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) throw CommError("barrier: pipedap is shutting down; call pipedap.init() again");
    if (joining_) {
      throw CommError("barrier on rank " + std::to_string(world_.rank) +
                      ": this rank is in join() and submits nothing until it returns");
    }
    handle = std::make_shared<Handle>(set->next_meeting++, "barrier");
    handle->set_enqueue_ns(monotonic_ns());
    handle->mark_started();
    meetings_.push_back(Meeting{set, handle, last_collective_, nullptr, 0});
    held_.push_back(Held{handle, set, {}});
    new_meeting_ = true;
  }
  cv_.notify_one();
  return handle;
}

std::vector<int> Engine::absent(const Meeting& m) const {
  std::vector<int> ranks;
  if (m.tokens) {
    for (int r : m.tokens->missing()) ranks.push_back(m.set->ranks[r]);
  } else {
    for (int r : m.set->ranks) {
      if (r != world_.rank) ranks.push_back(r);
    }
  }
  return ranks;
}

std::string Engine::meeting_failure(const Meeting& m, const std::string& why) const {
  return "pipedap: " + m.set->barrier(m.handle->seq()) + " on rank " + std::to_string(world_.rank) + " failed: " + why;
}

std::string Engine::meeting_refused(Meeting& m, bool& met) {
  met = false;  // (polled often: the words are built only for a refusal)
  if (m.set->removed) return meeting_failure(m, m.set->label() + " was removed");
  if (m.set->agree.size < 2) {  // alone: nobody to meet
    met = true;
    return "";
  }
  try {
    if (!m.tokens) {
      Fingerprint token;
      token.seq = m.handle->seq();
      m.tokens = std::make_unique<Agreement>(m.set->agree, token, kMeetingTag);
    }
    if (m.tokens->complete()) {
      met = m.tokens->verdict() == Verdict::kAgreed;
      return met ? "" : meeting_failure(m, "the members' barrier counts differ");
    }
  } catch (const std::exception& e) {
    return meeting_failure(m, e.what());
  }
  // As in await_agreement: a departure notice may overtake the token of a member that called it and left.
  std::vector<int> gone;
  for (int r : absent(m)) {
    if (status_->departed()[r]) gone.push_back(r);
  }
  if (gone.empty()) {
    m.gone_since_ns = 0;
  } else if (m.gone_since_ns == 0) {
    m.gone_since_ns = monotonic_ns();
  } else if (monotonic_ns() - m.gone_since_ns >= kDepartureGraceNs) {
    return meeting_failure(m, rank_list(gone) + (gone.size() == 1 ? " has" : " have") +
                                  " shut down (pipedap.shutdown() or the end of the script) without calling it");
  }
  return "";
}

bool Engine::progress_meetings() {
  std::vector<std::pair<std::shared_ptr<Handle>, std::string>> finished;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = meetings_.begin(); it != meetings_.end();) {
      bool met = false;
      const std::string refused = meeting_refused(*it, met);
      if (refused.empty() && !(met && (!it->after || it->after->done()))) {
        ++it;
        continue;
      }
      if (it->tokens && !it->tokens->complete()) abandoned_.push_back(std::move(it->tokens));
      finished.emplace_back(it->handle, refused);
      it = meetings_.erase(it);
    }
  }
  for (auto& [handle, refused] : finished) {
    if (refused.empty()) {
      handle->complete();
    } else {
      handle->fail(refused);
    }
  }
  return !finished.empty();
}

void Engine::fail_meetings(const std::string& why) {
  std::deque<Meeting> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(meetings_);
  }
  for (Meeting& m : left) {
    if (m.tokens && !m.tokens->complete()) abandoned_.push_back(std::move(m.tokens));
    m.handle->fail(meeting_failure(m, why));
  }
}

void Engine::run_loop() {
  const int64_t service_interval_ns = config_.host.poll.idle_interval_us * 1000LL;
  int64_t next_service_ns = 0;
  int64_t last_ran_ns = 0;  // when the last submission finished
  Backoff backoff(config_.host.poll);
  for (;;) {
    Submission sub;
    Submission* next = nullptr;  // stays valid: only this thread pops, and push_back keeps references
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (queue_.empty()) {
        const bool transfers = !p2p_->idle();
        if (stopping_ && !transfers) {  // drained
          lock.unlock();
          fail_meetings("pipedap shut down before every member called it");
          return;
        }
        // The next submission often follows within microseconds (a loop of small collectives, a step's
        // buckets): look for it a little while before sleeping, which saves a condition variable's wake-up.
        if (monotonic_ns() - last_ran_ns < Handle::kWaitSpinNs) {
          lock.unlock();
          std::this_thread::yield();
          lock.lock();
          continue;
        }
        // Wait for a submission; with transfers or barriers outstanding, poll them meanwhile.
        const auto wait = std::chrono::microseconds(transfers || !meetings_.empty()
                                                        ? backoff.next_sleep_us(/*patient=*/!transfers)
                                                        : config_.host.poll.idle_interval_us);
        cv_.wait_for(lock, wait, [this] { return !queue_.empty() || new_meeting_; });
        if (!queue_.empty()) break;
        new_meeting_ = false;
        lock.unlock();
        if (p2p_->progress()) backoff.progressed();
        if (progress_meetings()) backoff.progressed();
        if (monotonic_ns() >= next_service_ns) {
          service();  // idle ranks answer status questions too
          next_service_ns = monotonic_ns() + service_interval_ns;
        }
        lock.lock();
      }
      sub = std::move(queue_.front());
      queue_.pop_front();
      if (!queue_.empty()) next = &queue_.front();
      running_ = sub.handle;
      running_set_ = sub.set;
      running_->mark_started();  // under the lock: the watchdog never sees an unstarted handle
      phase_ = Phase::kAgreeing;
    }
    execute(sub, next);
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_.reset();
      running_set_.reset();
      phase_ = Phase::kIdle;
    }
    if (p2p_->progress()) backoff.progressed();  // also between submissions that never wait (posting transfers)
    progress_meetings();  // a barrier may have waited for that submission
    last_ran_ns = monotonic_ns();
  }
}

void Engine::wait_for_transfers(int set) {
  Backoff backoff(config_.host.poll);
  while (!p2p_->idle(set)) {
    if (p2p_->progress()) {
      backoff.progressed();
      continue;
    }
    service();
    sleep_us(backoff.next_sleep_us());
  }
}

std::string Engine::await_agreement(Agreement& agreement, const ProcessSet& set) {
  const int64_t service_interval_ns = config_.host.poll.idle_interval_us * 1000LL;
  int64_t next_service_ns = 0;
  int64_t gone_since_ns = 0;  // when a rank missing from the agreement was first seen departed
  Backoff backoff(config_.host.poll);
  while (!agreement.complete()) {
    if (p2p_->progress()) backoff.progressed();
    if (monotonic_ns() >= next_service_ns) {
      service();  // answers status questions, and receives departure notices
      next_service_ns = monotonic_ns() + service_interval_ns;
    }
    if (agreement.complete()) break;  // service() may have let a last fingerprint in
    std::vector<int> gone;  // departed without submitting it (one that did may have left after it failed)
    for (int r : agreement.missing()) {
      if (status_->departed()[set.ranks[r]]) gone.push_back(set.ranks[r]);
    }
    // A rank that submitted this operation, saw it agreed and then shut down sent its fingerprint before its
    // departure notice, but on another communicator: MPI does not order the two, so the notice can come
    // first. Only a fingerprint still missing kDepartureGraceNs after the notice means it never submitted.
    if (gone.empty()) {
      gone_since_ns = 0;
    } else if (gone_since_ns == 0) {
      gone_since_ns = monotonic_ns();
    } else if (monotonic_ns() - gone_since_ns >= kDepartureGraceNs) {
      return rank_list(gone) + (gone.size() == 1 ? " has" : " have") +
             " shut down (pipedap.shutdown() or the end of the script) without submitting it: the ranks ran "
             "different numbers of collectives (with uneven data, let ranks that run out call join())";
    }
    sleep_us(backoff.next_sleep_us(/*patient=*/p2p_->idle()));  // only the others' fingerprints are awaited
  }
  return "";
}

void Engine::agree(Submission& sub) {
  // Not on a single-rank set, nor on a removed one (it fails when it comes up), nor point-to-point.
  if (!sub.agreement && !sub.set->removed && sub.set->agree.size > 1 && !is_p2p_op(sub.ops.front().kind)) {
    sub.agreement = std::make_unique<Agreement>(sub.set->agree, sub.fingerprint);
  }
}

void Engine::abandon_agreement(Submission& sub) {
  if (sub.agreement && !sub.agreement->complete()) abandoned_.push_back(std::move(sub.agreement));
}

void Engine::execute(Submission& sub, Submission* next) {
  Handle& h = *sub.handle;
  const ProcessSet& set = *sub.set;
  const bool p2p = is_p2p_op(sub.ops.front().kind);
  const std::string what = "pipedap: " + h.description() + " (" +
                           (p2p ? set.p2p_operation(h.seq()) : set.operation(h.seq())) + ") on rank " +
                           std::to_string(world_.rank);
  if (!broken_.empty()) {
    abandon_agreement(sub);
    finish(sub, what + " was not run because an earlier operation failed: " + broken_, /*ran=*/false);
    return;
  }
  if (set.removed) {
    finish(sub, what + " was not run: " + set.label() + " was removed before it came up", /*ran=*/false);
    return;
  }
  if (p2p) {
    p2p_->post(sub.set, std::move(sub.ops), sub.handle, what);  // and on with the next submission
    return;
  }
  if (sub.ops.front().kind == OpKind::kJoin) {
    run_join(sub, what);
    return;
  }
  const bool changes_sets = is_process_set_op(sub.ops.front().kind);
  bool ran = false;  // whether the data phase started (a device group's events are then its own)
  try {
    agree(sub);
    // The next agreement's latency hides behind this submission's data. Not
    // behind a set change: it might remove the set the next one runs on.
    if (next != nullptr && !changes_sets) agree(*next);
    if (sub.agreement) {
      const std::string gone = await_agreement(*sub.agreement, set);
      if (!gone.empty()) {
        abandon_agreement(sub);
        finish(sub, what + " was not run: " + gone, /*ran=*/false);
        return;
      }
      const Verdict verdict = sub.agreement->verdict();
      if (verdict == Verdict::kJoinRound) {  // [Note: join] in join.h
        const std::vector<int> joined = sub.agreement->joined();
        if (set.rank == lowest_not_in(joined)) send_join_ops(set, sub.ops, joined, config_.host.poll);
        const std::string refused = join_refusal(sub.ops, set, joined);
        if (!refused.empty()) {
          finish(sub, what + " was not run: " + refused, /*ran=*/false);
          return;
        }
      } else if (verdict != Verdict::kAgreed) {
        finish(sub, what + " was not run: " + sub.agreement->explain(set, h.description(), config_.host.poll),
               /*ran=*/false);
        return;  // every member failed this same submission: the next ones can still run
      }
    }
    if (sub.resolve) {
      const std::string refused = resolve_ops(sub);
      if (!refused.empty()) {  // the others fail it too when their resolver refuses for the same reason
        finish(sub, what + " was not run: " + refused, /*ran=*/false);
        return;
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      phase_ = Phase::kMovingData;
    }
    ran = true;
    if (changes_sets) {
      const std::string refused = change_process_sets(sub.ops.front());
      finish(sub, refused.empty() ? "" : what + " was refused on every rank: " + refused, /*ran=*/true);
      return;
    }
    if (sub.ops.front().device >= 0) {
      device_->run_group(set.id, set.data, sub.ops);
    } else {
      run_host_group(set.data, sub.ops, config_.host, scratch_, sub.handle.get());
    }
    finish(sub, "", /*ran=*/true);
  } catch (const std::exception& e) {
    // After a failed data phase the ranks may disagree on what ran: stop here
    // rather than risk silently wrong results or a hang later.
    broken_ = what + ": " + e.what();
    finish(sub, broken_, ran);
  }
}

void Engine::run_join(Submission& sub, const std::string& what) {
  ProcessSet& set = *sub.set;
  const int64_t joined_at = sub.handle->seq();
  int last = 0;  // within the set: alone, this rank
  try {
    agree(sub);  // the first round (it may have started behind the previous submission)
    while (sub.agreement) {
      const std::string gone = await_agreement(*sub.agreement, set);
      if (!gone.empty()) {
        abandon_agreement(sub);
        finish(sub, what + " failed: " + gone, /*ran=*/true);
        return;
      }
      const Verdict verdict = sub.agreement->verdict();
      if (verdict == Verdict::kAllJoined) {
        last = sub.agreement->last_joined();
        break;
      }
      if (verdict == Verdict::kJoinRound) {
        const std::vector<int> joined = sub.agreement->joined();
        std::vector<OpSpec> ops = receive_join_ops(set, lowest_not_in(joined), config_.host.poll);
        if (join_refusal(ops, set, joined).empty()) run_with_zeros(set.data, std::move(ops), config_.host, scratch_);
      } else {
        sub.agreement->explain(set, "join", config_.host.poll);  // the others' error; this rank goes on waiting
      }
      sub.handle->mark_started();  // the watchdog measures the wait since the last round
      int64_t seq;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seq = set.next_seq++;
      }
      sub.agreement = std::make_unique<Agreement>(set.agree, join_fingerprint(seq, joined_at));
    }
    *reinterpret_cast<int64_t*>(sub.ops.front().output) = set.ranks[last];
    finish(sub, "", /*ran=*/true);
  } catch (const std::exception& e) {
    broken_ = what + ": " + e.what();
    finish(sub, broken_, /*ran=*/true);
  }
}

std::string Engine::change_process_sets(const OpSpec& op) {
  if (op.kind == OpKind::kAddProcessSet) {
    const std::vector<int> ranks(op.counts.begin(), op.counts.end());
    std::string refused = sets_->refuse_to_add(ranks);
    if (refused.empty()) sets_->add(ranks, monotonic_ns());
    return refused;
  }
  const int id = static_cast<int>(op.counts.at(0));
  std::string refused = sets_->refuse_to_remove(id);
  if (refused.empty()) {
    // Every earlier collective on it has finished (this thread ran them in
    // order); its transfers finish first. Every rank posted them before this
    // removal, so only a transfer that was never matched holds it up, and the
    // watchdog reports that.
    wait_for_transfers(id);
    if (device_) device_->forget(id);
    sets_->remove(id);
  }
  return refused;
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
