#include "process_set.h"

#include <algorithm>

#include "mpi_util.h"
#include "op.h"

namespace pipedap {
namespace {

// This rank's part of `parent` for the members of `ranks` (MPI_COMM_NULL elsewhere).
Communicator split(const Communicator& parent, bool member, const char* what) {
  Communicator c;
  check_mpi(MPI_Comm_split(parent.comm, member ? 0 : MPI_UNDEFINED, parent.rank, &c.comm),
            std::string("MPI_Comm_split (") + what + ")", parent.rank);
  if (c.comm == MPI_COMM_NULL) return c;
  check_mpi(MPI_Comm_set_errhandler(c.comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler", parent.rank);
  MPI_Comm_rank(c.comm, &c.rank);
  MPI_Comm_size(c.comm, &c.size);
  return c;
}

void free_communicators(ProcessSet& set) {
  for (Communicator* c : {&set.data, &set.agree, &set.side, &set.p2p}) {
    if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
  }
}

}  // namespace

std::string rank_list(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

std::string ProcessSet::label() const {
  return id == 0 ? "the world" : "process set " + std::to_string(id) + " (" + rank_list(ranks) + ")";
}

std::string ProcessSet::operation(int64_t seq) const {
  return "operation #" + std::to_string(seq) + (id == 0 ? "" : " of " + label());
}

std::string ProcessSet::p2p_operation(int64_t seq) const {
  return "point-to-point #" + std::to_string(seq) + (id == 0 ? "" : " of " + label());
}

std::string ProcessSet::barrier(int64_t seq) const {
  return "barrier #" + std::to_string(seq) + (id == 0 ? "" : " of " + label());
}

ProcessSetTable::ProcessSetTable(const Communicator& data, const Communicator& agree, const Communicator& side,
                                 const Communicator& p2p, int64_t now_ns) {
  auto world = std::make_shared<ProcessSet>();
  for (int r = 0; r < data.size; ++r) world->ranks.push_back(r);
  world->rank = data.rank;
  world->data = data;
  world->agree = agree;
  world->side = side;
  world->p2p = p2p;
  world->last_submit_ns = now_ns;
  sets_[0] = std::move(world);
}

ProcessSetTable::~ProcessSetTable() {
  for (auto& entry : sets_) free_communicators(*entry.second);
}

std::shared_ptr<ProcessSet> ProcessSetTable::find(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sets_.find(id);
  return it == sets_.end() ? nullptr : it->second;
}

std::shared_ptr<ProcessSet> ProcessSetTable::existing(int id, int rank) const {
  std::shared_ptr<ProcessSet> set = find(id);
  if (set) return set;
  std::string known;
  for (int i : ids()) known += (known.empty() ? "" : ", ") + std::to_string(i);
  throw CommError("rank " + std::to_string(rank) + ": process set " + std::to_string(id) + " does not exist (existing: " +
                  known + "); create it with add_process_set on every rank, and do not use it after remove_process_set");
}

std::shared_ptr<ProcessSet> ProcessSetTable::member_set(int id, int rank) const {
  std::shared_ptr<ProcessSet> set = existing(id, rank);
  if (!set->member()) {
    throw CommError("rank " + std::to_string(rank) + " is not a member of " + set->label() +
                    ": only its members may submit operations on it");
  }
  return set;
}

std::vector<int> ProcessSetTable::ids() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int> ids;
  for (const auto& entry : sets_) ids.push_back(entry.first);
  return ids;
}

int ProcessSetTable::id_of(const std::vector<int>& ranks) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& entry : sets_) {
    if (entry.second->ranks == ranks) return entry.first;
  }
  return -1;
}

std::string ProcessSetTable::describe(int id) const {
  std::shared_ptr<ProcessSet> set = find(id);
  return set ? set->label() : "process set " + std::to_string(id);
}

std::string ProcessSetTable::refuse_to_add(const std::vector<int>& ranks) const {
  const int world = static_cast<int>(find(0)->ranks.size());
  if (ranks.empty()) return "a process set needs at least one rank";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i] < 0 || ranks[i] >= world) {
      return "rank " + std::to_string(ranks[i]) + " is not in [0, " + std::to_string(world) + ")";
    }
    if (i > 0 && ranks[i] <= ranks[i - 1]) {
      return "the ranks must be unique and in ascending order (pipedap.process_sets sorts them)";
    }
  }
  const int existing = id_of(ranks);
  if (existing >= 0) {
    return "these ranks already form " + describe(existing) + ": use it (as Horovod, duplicate sets are refused)";
  }
  return "";
}

void ProcessSetTable::add(const std::vector<int>& ranks, int64_t now_ns) {
  std::shared_ptr<ProcessSet> world = find(0);
  const bool member = std::binary_search(ranks.begin(), ranks.end(), world->data.rank);
  auto set = std::make_shared<ProcessSet>();
  set->ranks = ranks;
  set->last_submit_ns = now_ns;
  set->data = split(world->data, member, "process set data");
  set->agree = split(world->agree, member, "process set agreement");
  set->side = split(world->side, member, "process set side channel");
  set->p2p = split(world->p2p, member, "process set point-to-point");
  set->rank = member ? set->data.rank : -1;
  std::lock_guard<std::mutex> lock(mu_);
  set->id = next_id_++;
  sets_[set->id] = std::move(set);
}

std::string ProcessSetTable::refuse_to_remove(int id) const {
  if (id == 0) return "process set 0 is the world: it cannot be removed";
  if (!find(id)) return "process set " + std::to_string(id) + " does not exist";
  return "";
}

void ProcessSetTable::remove(int id) {
  std::shared_ptr<ProcessSet> set;
  {
    std::lock_guard<std::mutex> lock(mu_);
    set = sets_.at(id);
    sets_.erase(id);
  }
  // Submissions on it still queued (from other threads) fail when they come up;
  // its fields other than the communicators stay valid for them.
  set->removed = true;
  free_communicators(*set);
}

}  // namespace pipedap
