#include "agreement.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "mpi_util.h"

namespace pipedap {
namespace {

constexpr size_t kDescriptionBytes = 240;
constexpr int kDescriptionTag = 3;  // on the side communicator (status.cc uses 1 and 2)

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

// Posts this rank's `bytes` at `mine` to every other rank, and a receive of
// theirs into `all` (rank r's at all + r * bytes; ours is not copied there).
void post_exchange(const Communicator& c, int tag, const void* mine, size_t bytes, void* all,
                   std::vector<MPI_Request>& requests, const std::string& what) {
  requests.reserve(requests.size() + 2 * c.size);
  for (int r = 0; r < c.size; ++r) {
    if (r == c.rank) continue;
    requests.emplace_back();
    check_mpi(MPI_Irecv(static_cast<char*>(all) + r * bytes, static_cast<int>(bytes), MPI_BYTE, r, tag, c.comm,
                        &requests.back()),
              what + " (MPI_Irecv)", c.rank);
    requests.emplace_back();
    check_mpi(MPI_Isend(mine, static_cast<int>(bytes), MPI_BYTE, r, tag, c.comm, &requests.back()),
              what + " (MPI_Isend)", c.rank);
  }
}

}  // namespace

Fingerprint fingerprint_of(int64_t seq, const std::vector<OpSpec>& ops) {
  Fingerprint f;
  f.seq = seq;
  f.nops = static_cast<int32_t>(ops.size());
  uint64_t h = 1469598103934665603ULL;
  for (const OpSpec& op : ops) {
    const int32_t fields[6] = {static_cast<int32_t>(op.kind), static_cast<int32_t>(op.dtype),
                               static_cast<int32_t>(op.reduce), op.root, op.device >= 0 ? 1 : 0,
                               static_cast<int32_t>(op.algorithm)};
    h = fnv1a(h, fields, sizeof fields);
    const int64_t ncounts = static_cast<int64_t>(op.counts.size());
    h = fnv1a(h, &ncounts, sizeof ncounts);
    h = fnv1a(h, op.counts.data(), op.counts.size() * sizeof(int64_t));
    const int64_t nshape = static_cast<int64_t>(op.shape.size());
    h = fnv1a(h, &nshape, sizeof nshape);
    h = fnv1a(h, op.shape.data(), op.shape.size() * sizeof(int64_t));
    if (op.name_agreed) {
      const int64_t nname = static_cast<int64_t>(op.name.size());
      h = fnv1a(h, &nname, sizeof nname);
      h = fnv1a(h, op.name.data(), op.name.size());
    }
  }
  f.hash = h;
  return f;
}

Fingerprint join_fingerprint(int64_t seq, int64_t joined_at) {
  Fingerprint f;
  f.seq = seq;
  f.hash = static_cast<uint64_t>(joined_at);
  f.flags = kJoined;
  return f;
}

Agreement::Agreement(const Communicator& agree, const Fingerprint& mine, int tag)
    : rank_(agree.rank), mine_(mine), all_(agree.size) {
  all_[agree.rank] = mine_;
  try {
    post_exchange(agree, tag, &mine_, sizeof(Fingerprint), all_.data(), requests_,
                  "agreement on operation #" + std::to_string(mine.seq));
  } catch (const CommError&) {  // what was posted must finish before all_ and mine_ go
    abandon_requests(requests_, /*cancellable=*/false, agree.rank, "starting an agreement");
    throw;
  }
}

bool Agreement::complete() {
  bool done = true;
  for (MPI_Request& r : requests_) {  // one at a time: a completed request becomes MPI_REQUEST_NULL (see missing())
    int flag = 1;
    if (r != MPI_REQUEST_NULL) MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
    done = done && flag;
  }
  return done;
}

std::vector<int> Agreement::missing() const {
  std::vector<int> ranks;
  // post_exchange posted, for each other rank in order, a receive and then a send
  for (size_t r = 0, k = 0; r < all_.size(); ++r) {
    if (static_cast<int>(r) == rank_) continue;
    if (requests_[k] != MPI_REQUEST_NULL) ranks.push_back(static_cast<int>(r));
    k += 2;
  }
  return ranks;
}

Verdict Agreement::verdict() const {
  const auto first_active = std::find_if(all_.begin(), all_.end(), [](const Fingerprint& f) { return !(f.flags & kJoined); });
  if (first_active == all_.end()) return Verdict::kAllJoined;
  bool same = true;
  for (const Fingerprint& f : all_) {
    if (f.seq != all_[0].seq) return Verdict::kDiffer;
    if (!(f.flags & kJoined) && f.hash != first_active->hash) same = false;
  }
  if (!same) return Verdict::kDiffer;
  return joined().empty() ? Verdict::kAgreed : Verdict::kJoinRound;
}

std::vector<int> Agreement::joined() const {
  std::vector<int> ranks;
  for (size_t r = 0; r < all_.size(); ++r) {
    if (all_[r].flags & kJoined) ranks.push_back(static_cast<int>(r));
  }
  return ranks;
}

int Agreement::last_joined() const {
  int last = 0;
  for (size_t r = 1; r < all_.size(); ++r) {
    if (all_[r].hash >= all_[last].hash) last = static_cast<int>(r);
  }
  return last;
}

std::string Agreement::explain(const ProcessSet& set, const std::string& my_description,
                               const PollPolicy& poll) const {
  const Communicator& side = set.side;
  std::vector<char> mine(kDescriptionBytes, '\0');
  std::memcpy(mine.data(), my_description.data(), std::min(my_description.size(), kDescriptionBytes - 1));
  std::vector<char> all(kDescriptionBytes * side.size);
  std::copy(mine.begin(), mine.end(), all.begin() + side.rank * kDescriptionBytes);
  std::vector<MPI_Request> requests;
  AbandonOnUnwind guard(requests, /*cancellable=*/false, side.rank);
  post_exchange(side, kDescriptionTag, mine.data(), kDescriptionBytes, all.data(), requests, "describing a mismatch");
  wait_all(requests, poll, side.rank, /*cancellable=*/false);

  // Ranks that submitted the same thing are named together, in rank order.
  std::map<std::pair<uint64_t, std::string>, std::vector<int>> groups;
  std::vector<std::pair<uint64_t, std::string>> order;
  for (int r = 0; r < side.size; ++r) {
    const std::string what(all.data() + r * kDescriptionBytes);
    const auto key = std::make_pair(all_[r].hash, what);
    if (groups.find(key) == groups.end()) order.push_back(key);
    groups[key].push_back(set.ranks[r]);
  }
  std::string message;
  if (order.size() > 1) {
    message = "operations differ between ranks at " + set.operation(all_[0].seq) + ":";
    for (size_t i = 0; i < order.size(); ++i) {
      message += std::string(i ? ";" : "") + " " + rank_list(groups[order[i]]) + " submitted " + order[i].second;
    }
    std::set<std::string> worded;
    for (const auto& key : order) worded.insert(key.second);
    if (worded.size() < order.size()) {
      message += " (alike in these words, they differ in what the words leave out: the reduction, sum or "
                 "average, the algorithm, ring or MPI (PIPEDAP_ALGORITHM or a measured choice that differs between "
                 "ranks), or the tail of a long group)";
    }
    message += ". Every rank must submit the same collectives (kind, name, element count, shape, dtype, root) in the same "
               "order: look for a rank-dependent branch or an extra collective on some ranks.";
  } else {
    message = set.operation(all_[0].seq) + " was refused.";
  }
  return message + " It ran on no rank (no buffer was touched).";
}

}  // namespace pipedap
