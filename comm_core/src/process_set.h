// Process sets: subsets of the world's ranks that run collectives among
// themselves (Horovod's hvd.add_process_set), all on the one engine thread.
//
// [Note: process sets]
// Every rank creates and removes every set, in the same order, as an ordered
// submission on the world that is agreed like any other (its fingerprint
// covers the rank list), so the ids are the same on every rank: 0 is the
// world, then 1, 2, ... in creation order, never reused. A set's members get
// four communicators split from the world's four (data, agreement, mismatch
// descriptions, point-to-point), so a set's traffic never matches another
// set's, and its sends and receives never match its collectives. Submissions
// on a set are agreed among its members only, with sequence numbers of its
// own. Counts and broadcast roots are relative to the set: rank i of the set
// is its i-th smallest world rank. A list equal to an existing set's is
// refused, as Horovod refuses a duplicate process set.
//
// [Note: overlapping process sets and order]
// One engine thread runs every set's submissions in this rank's submission
// order, so a submission waits for everything this rank submitted before it,
// on any set. Overlapping sets therefore cannot deadlock as long as there is
// one global order of all submissions that every rank's own order follows
// (e.g. every rank submits to set A before set B, or each rank's submissions
// are a subsequence of one common list). A cycle -- rank 0 submits on {0,1}
// then {0,2}, rank 1 on {1,2} then {0,1}, rank 2 on {0,2} then {1,2} -- waits
// forever: it is a user error, and the stall report says, for each member the
// stalled submission waits for, which operation of which set (and its ranks)
// that member is still running.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "host_collectives.h"

namespace pipedap {

// "rank 2" / "ranks 0, 1, 3": how messages name world ranks.
std::string rank_list(const std::vector<int>& ranks);

struct ProcessSet {
  int id = 0;
  std::vector<int> ranks;  // world ranks, ascending
  int rank = -1;           // this process's rank within the set, -1: not a member
  // Only members have them (MPI_COMM_NULL elsewhere). Engine thread only:
  // ProcessSetTable::remove frees them there.
  Communicator data, agree, side, p2p;
  bool removed = false;  // engine thread only

  // Submission bookkeeping, guarded by the engine's mutex.
  int64_t next_seq = 0;      // of its collectives (agreed: the same on every member)
  int64_t next_p2p_seq = 0;  // of this rank's point-to-point submissions on it (numbered apart: not agreed)
  std::string last_submitted;  // description of its last submission
  int64_t last_submit_ns = 0;
  std::unordered_multiset<std::string> names_in_flight;  // [Note: names in flight] in engine.h
  int64_t next_meeting = 0;  // barriers on it this rank called (engine.h, [Note: barriers meet apart from the order])

  bool member() const { return rank >= 0; }
  // "the world" / "process set 2 (ranks 1, 2)".
  std::string label() const;
  // "operation #4" on the world, "operation #4 of process set 2 (ranks 1, 2)" elsewhere.
  std::string operation(int64_t seq) const;
  // The same for point-to-point submission #seq: "point-to-point #4".
  std::string p2p_operation(int64_t seq) const;
  // The same for its barrier #seq (engine.h, [Note: barriers meet apart from the order]): "barrier #2".
  std::string barrier(int64_t seq) const;
};

// Every process set of this rank, by id. Lookups may come from any thread;
// add and remove run on the engine thread only, on every rank in the same order.
class ProcessSetTable {
 public:
  // Set 0 from the world's four communicators (the table frees them).
  ProcessSetTable(const Communicator& data, const Communicator& agree, const Communicator& side, const Communicator& p2p,
                  int64_t now_ns);
  ~ProcessSetTable();  // frees every set's communicators
  ProcessSetTable(const ProcessSetTable&) = delete;
  ProcessSetTable& operator=(const ProcessSetTable&) = delete;

  std::shared_ptr<ProcessSet> find(int id) const;  // nullptr if there is none (any more)
  // Set `id`; CommError, from world rank `rank`, if there is none.
  std::shared_ptr<ProcessSet> existing(int id, int rank) const;
  // The same, and CommError if this process is not a member (it wants to submit on it).
  std::shared_ptr<ProcessSet> member_set(int id, int rank) const;
  std::vector<int> ids() const;
  // The set with exactly these ranks, or -1.
  int id_of(const std::vector<int>& ranks) const;
  std::string describe(int id) const;  // label() of set `id`, or "process set N" if it is gone

  // Why `ranks` cannot become a set ("" if it can): the same answer on every rank.
  std::string refuse_to_add(const std::vector<int>& ranks) const;
  // Collective over the world (MPI_Comm_split of its four communicators).
  void add(const std::vector<int>& ranks, int64_t now_ns);
  std::string refuse_to_remove(int id) const;
  void remove(int id);

 private:
  mutable std::mutex mu_;
  std::map<int, std::shared_ptr<ProcessSet>> sets_;
  int next_id_ = 1;
};

}  // namespace pipedap
