// What the ranks that ran out of data do while the others go on (Horovod's join).
//
// [Note: join]
// A rank that calls join() submits a kJoin op on the world. When the engine
// thread reaches it, the rank takes part in every later agreement round with
// a "joined" fingerprint (agreement.h) instead of a submission of its own,
// until every rank has joined:
//   * the ranks that have not joined agree among themselves (Verdict::
//     kJoinRound): the lowest of them sends their submission's ops to the
//     joined ranks (side communicator, tag kJoinTag). An all-reduce with Sum
//     or Average on host memory runs on every rank, the joined ones adding
//     zeros (an average still divides by the world's size, as Horovod's
//     does). Anything else is refused on the ranks that submitted it (a
//     CommError naming the joined ranks) and skipped by the joined ones;
//   * they differ (Verdict::kDiffer): the joined ranks take part in the
//     explanation, which fails the submission on the others as always;
//   * every rank has joined (Verdict::kAllJoined): join returns on every rank
//     the world rank that joined last (by round; among ranks that joined in
//     the same round, the highest).
// Every round takes the next sequence number of the world, as a submission
// would, so the joined rank's fingerprints line up with the others'. A rank in
// join() accepts no submission of its own until it returns; collectives on
// other process sets wait behind it (join covers the world's collectives).
#pragma once

#include <string>
#include <vector>

#include "host_collectives.h"
#include "op.h"
#include "process_set.h"

namespace pipedap {

// Leader: sends `ops` (their specs, not their data) to each rank within `set` in `joined`.
void send_join_ops(const ProcessSet& set, const std::vector<OpSpec>& ops, const std::vector<int>& joined,
                   const PollPolicy& poll);
// A joined rank: receives the ops the leader (a rank within `set`) sent; their buffers are unset.
std::vector<OpSpec> receive_join_ops(const ProcessSet& set, int leader, const PollPolicy& poll);
// "" if `ops` can run with the joined ranks (ranks within `set`) adding zeros; else why not.
std::string join_refusal(const std::vector<OpSpec>& ops, const ProcessSet& set, const std::vector<int>& joined);
// A joined rank's part in `ops` (allowed by join_refusal): zeros in, the result discarded.
void run_with_zeros(const Communicator& data, std::vector<OpSpec> ops, const HostCollectiveConfig& cfg,
                    ScratchArena& scratch);

}  // namespace pipedap
