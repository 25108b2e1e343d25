#include "status.h"

#include <algorithm>

#include "mpi_util.h"
#include "op.h"

namespace pipedap {
namespace {

constexpr int kQuestionTag = 1;
constexpr int kAnswerTag = 2;
constexpr int kDepartureTag = 5;  // (agreement.cc uses 3, join.cc 4)

std::string seconds(double s) { return format_number(static_cast<double>(static_cast<int64_t>(s))) + " s"; }

const char* phase_name(int32_t phase) {
  switch (static_cast<Phase>(phase)) {
    case Phase::kIdle: return "idle";
    case Phase::kAgreeing: return "waiting for every rank to submit it";
    case Phase::kMovingData: return "moving its data";
  }
  return "?";
}

// "#3 allreduce 'x' (...) (moving its data, for 2 s)", or "#3 of <set>: ..." when `s` runs it on another set than `set`.
std::string running_words(const RankStatus& s, int set, const std::function<std::string(int)>& label) {
  return "#" + std::to_string(s.running) + (s.running_set == set ? "" : " of " + label(s.running_set) + ":") + " " +
         s.running_what + " (" + phase_name(s.phase) + ", for " + seconds(s.running_s) + ")";
}

std::string no_answer() {
  return "did not answer within " + format_number(kAnswerSeconds) +
         " s (dead, its link slow or down: the answer waits behind the data, stuck outside pipedap's polling, "
         "or its engine already shut down)";
}

}  // namespace

StatusChannel::~StatusChannel() {
  std::vector<MPI_Request> pending;
  for (Answer& a : outgoing_) pending.push_back(a.request);
  abandon_requests(pending, /*cancellable=*/true, side_.rank, "stopping the status channel");
  abandon_requests(asked_, /*cancellable=*/true, side_.rank, "stopping the status channel");
}

void StatusChannel::serve(const std::function<RankStatus(int64_t set)>& me) {
  // Errors here are ignored: the status channel only serves diagnostics.
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kQuestionTag, side_.comm, &flag, &st) != MPI_SUCCESS || !flag) break;
    int64_t question = 0;
    MPI_Recv(&question, 1, MPI_INT64_T, st.MPI_SOURCE, kQuestionTag, side_.comm, MPI_STATUS_IGNORE);
    outgoing_.push_back(Answer{me(question), MPI_REQUEST_NULL});
    MPI_Isend(&outgoing_.back().status, sizeof(RankStatus), MPI_BYTE, st.MPI_SOURCE, kAnswerTag, side_.comm,
              &outgoing_.back().request);
  }
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kDepartureTag, side_.comm, &flag, &st) != MPI_SUCCESS || !flag) break;
    int64_t generation = -1;
    MPI_Recv(&generation, 1, MPI_INT64_T, st.MPI_SOURCE, kDepartureTag, side_.comm, MPI_STATUS_IGNORE);
    if (generation == generation_) departed_[st.MPI_SOURCE] = true;
  }
  for (auto it = outgoing_.begin(); it != outgoing_.end();) {
    int done = 1;
    if (it->request != MPI_REQUEST_NULL) MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
    it = done ? outgoing_.erase(it) : std::next(it);
  }
  progress_inquiry();
}

void StatusChannel::ask(int64_t set, const std::vector<int>& ranks) {
  if (asking_) return;
  asking_ = true;
  deadline_ns_ = monotonic_ns() + static_cast<int64_t>(kAnswerSeconds * 1e9);
  question_ = set;
  asked_.assign(2 * side_.size, MPI_REQUEST_NULL);
  received_.assign(side_.size, RankStatus{});
  expected_.assign(side_.size, false);
  answered_.assign(side_.size, false);
  for (int r : ranks) {
    if (r == side_.rank) continue;
    expected_[r] = true;
    MPI_Irecv(&received_[r], sizeof(RankStatus), MPI_BYTE, r, kAnswerTag, side_.comm, &asked_[2 * r + 1]);
    MPI_Isend(&question_, 1, MPI_INT64_T, r, kQuestionTag, side_.comm, &asked_[2 * r]);
  }
}

void StatusChannel::progress_inquiry() {
  if (!asking_) return;
  for (int r = 0; r < side_.size; ++r) {
    for (int k : {2 * r, 2 * r + 1}) {
      if (asked_[k] == MPI_REQUEST_NULL) continue;
      int done = 0;
      MPI_Test(&asked_[k], &done, MPI_STATUS_IGNORE);
      if (done && k == 2 * r + 1) answered_[r] = true;
    }
  }
}

std::optional<std::vector<std::optional<RankStatus>>> StatusChannel::answers() {
  if (!asking_) return std::nullopt;
  progress_inquiry();
  bool all = true;
  for (int r = 0; r < side_.size; ++r) all = all && (!expected_[r] || answered_[r]);
  if (!all && monotonic_ns() < deadline_ns_) return std::nullopt;
  // A question still unsent (it waits behind bulk data to a peer whose link is slow or down) cannot be
  // cancelled in Open MPI, and waiting for it would end the job before the report names that peer. It is
  // left to complete among the outgoing messages (its buffer, question_, stays put); the unanswered
  // receives are cancelled.
  for (int r = 0; r < side_.size; ++r) {
    if (asked_[2 * r] != MPI_REQUEST_NULL) {
      outgoing_.push_back(Answer{RankStatus{}, asked_[2 * r]});
      asked_[2 * r] = MPI_REQUEST_NULL;
    }
  }
  abandon_requests(asked_, /*cancellable=*/true, side_.rank, "ending a status inquiry");
  std::vector<std::optional<RankStatus>> result(side_.size);
  for (int r = 0; r < side_.size; ++r) {
    if (answered_[r]) result[r] = received_[r];
  }
  asking_ = false;
  return result;
}

void StatusChannel::announce_departure() {
  // Eight bytes go eagerly, so the sends complete at once unless a peer is gone (and then nobody waits for
  // this rank). One that has not completed by the deadline is left to MPI: its buffer is static.
  static int64_t payload;
  payload = generation_;
  std::vector<MPI_Request> sends;
  for (int r = 0; r < side_.size; ++r) {
    if (r == side_.rank) continue;
    sends.emplace_back();
    if (MPI_Isend(&payload, 1, MPI_INT64_T, r, kDepartureTag, side_.comm, &sends.back()) != MPI_SUCCESS) {
      sends.pop_back();
    }
  }
  const int64_t deadline = monotonic_ns() + static_cast<int64_t>(kAnswerSeconds * 1e9);
  int done = sends.empty() ? 1 : 0;
  while (!done && monotonic_ns() < deadline) {
    MPI_Testall(static_cast<int>(sends.size()), sends.data(), &done, MPI_STATUSES_IGNORE);
    if (!done) sleep_us(1000);
  }
  for (MPI_Request& r : sends) {
    if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
  }
}

std::string describe_ranks(int me, const ProcessSet& set, int64_t seq,
                           const std::vector<std::optional<RankStatus>>& answers,
                           const std::function<std::string(int)>& label) {
  const std::string op = set.operation(seq);
  auto running = [&](const RankStatus& s) { return running_words(s, set.id, label); };
  std::string report;
  for (int r : set.ranks) {
    if (r == me) continue;
    std::string line = "\n  rank " + std::to_string(r) + ": ";
    const std::optional<RankStatus>& s = answers[r];
    if (!s) {
      line += no_answer();
    } else if (s->submitted <= seq) {
      line += "has NOT submitted " + op + "; it submitted " + std::to_string(s->submitted) + " operation(s)" +
              (set.id == 0 ? "" : " on that set") + ", ";
      line += s->submitted > 0 ? "the last #" + std::to_string(s->submitted - 1) + " " + s->last_what + " " +
                                     seconds(s->submitted_s) + " ago"
                               : "none yet";
      if (s->running >= 0) line += "; it is running " + running(*s);
    } else if (s->running == seq && s->running_set == set.id) {
      line += "is in " + op + " too (" + std::string(phase_name(s->phase)) + ", for " + seconds(s->running_s) + ")";
    } else {
      line += "has submitted " + op + "; it is " + (s->running >= 0 ? "running " + running(*s) : std::string("idle"));
      if (s->running >= 0 && s->running_set != set.id) {
        line += ", which it runs first (one thread runs a rank's submissions in order): if that waits for this "
                "rank, overlapping process sets were used in orders that form a cycle across ranks, which waits "
                "forever; every rank must submit to overlapping sets in one consistent order";
      }
    }
    report += line;
  }
  return report;
}

std::string describe_absent(const std::vector<int>& ranks, const std::vector<std::optional<RankStatus>>& answers,
                            const std::function<std::string(int)>& label) {
  std::string report;
  for (int r : ranks) {
    const std::optional<RankStatus>& s = answers[r];
    report += "\n  rank " + std::to_string(r) + ": " +
              (!s                ? no_answer()
               : s->running >= 0 ? "has not called it; it is running " + running_words(*s, -1, label)
                                 : "has not called it; its engine is idle");
  }
  return report;
}

std::string describe_peers(const std::vector<int>& peers, const std::vector<std::optional<RankStatus>>& answers,
                           const std::function<std::string(int)>& label) {
  std::string report;
  for (int r : peers) {
    report += "\n  rank " + std::to_string(r) + ": ";
    const std::optional<RankStatus>& s = answers[r];
    if (!s) {
      report += no_answer();
      continue;
    }
    report += s->p2p_outstanding == 0
                  ? std::string("has no point-to-point operation outstanding")
                  : "has " + std::to_string(s->p2p_outstanding) + " point-to-point submission(s) outstanding, the " +
                        "oldest " + s->p2p_what + " for " + seconds(s->p2p_s);
    report += s->running >= 0 ? "; it is running " + running_words(*s, -1, label) : "; its engine is idle";
  }
  return report;
}

}  // namespace pipedap
