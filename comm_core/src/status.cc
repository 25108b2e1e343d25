#include "status.h"

#include <algorithm>

#include "op.h"

namespace pipedap {
namespace {

constexpr int kQuestionTag = 1;
constexpr int kAnswerTag = 2;

std::string seconds(double s) { return format_number(static_cast<double>(static_cast<int64_t>(s))) + " s"; }

const char* phase_name(int32_t phase) {
  switch (static_cast<Phase>(phase)) {
    case Phase::kIdle: return "idle";
    case Phase::kAgreeing: return "waiting for every rank to submit it";
    case Phase::kMovingData: return "moving its data";
  }
  return "?";
}

}  // namespace

StatusChannel::~StatusChannel() {
  std::vector<MPI_Request> pending;
  for (Answer& a : outgoing_) pending.push_back(a.request);
  abandon_requests(pending, /*cancellable=*/true, side_.rank, "stopping the status channel");
  abandon_requests(asked_, /*cancellable=*/true, side_.rank, "stopping the status channel");
}

void StatusChannel::serve(const std::function<RankStatus()>& me) {
  // Errors here are ignored: the status channel only serves diagnostics.
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kQuestionTag, side_.comm, &flag, &st) != MPI_SUCCESS || !flag) break;
    int64_t question = 0;
    MPI_Recv(&question, 1, MPI_INT64_T, st.MPI_SOURCE, kQuestionTag, side_.comm, MPI_STATUS_IGNORE);
    outgoing_.push_back(Answer{me(), MPI_REQUEST_NULL});
    MPI_Isend(&outgoing_.back().status, sizeof(RankStatus), MPI_BYTE, st.MPI_SOURCE, kAnswerTag, side_.comm,
              &outgoing_.back().request);
  }
  for (auto it = outgoing_.begin(); it != outgoing_.end();) {
    int done = 1;
    if (it->request != MPI_REQUEST_NULL) MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
    it = done ? outgoing_.erase(it) : std::next(it);
  }
  progress_inquiry();
}

void StatusChannel::ask() {
  if (asking_ || side_.size < 2) return;
  asking_ = true;
  deadline_ns_ = monotonic_ns() + static_cast<int64_t>(kAnswerSeconds * 1e9);
  asked_.assign(2 * side_.size, MPI_REQUEST_NULL);
  received_.assign(side_.size, RankStatus{});
  answered_.assign(side_.size, false);
  for (int r = 0; r < side_.size; ++r) {
    if (r == side_.rank) continue;
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
  for (int r = 0; r < side_.size; ++r) all = all && (r == side_.rank || answered_[r]);
  if (!all && monotonic_ns() < deadline_ns_) return std::nullopt;
  abandon_requests(asked_, /*cancellable=*/true, side_.rank, "ending a status inquiry");
  std::vector<std::optional<RankStatus>> result(side_.size);
  for (int r = 0; r < side_.size; ++r) {
    if (r != side_.rank && answered_[r]) result[r] = received_[r];
  }
  asking_ = false;
  return result;
}

std::string describe_ranks(int me, int64_t seq, const std::vector<std::optional<RankStatus>>& answers) {
  const std::string op = "operation #" + std::to_string(seq);
  std::string report;
  for (int r = 0; r < static_cast<int>(answers.size()); ++r) {
    if (r == me) continue;
    std::string line = "\n  rank " + std::to_string(r) + ": ";
    const std::optional<RankStatus>& s = answers[r];
    if (!s) {
      line += "did not answer within " + format_number(kAnswerSeconds) +
              " s (dead, stuck outside pipedap's polling, or its engine already shut down)";
    } else if (s->submitted <= seq) {
      line += "has NOT submitted " + op + "; it submitted " + std::to_string(s->submitted) + " operation(s), ";
      line += s->submitted > 0 ? "the last #" + std::to_string(s->submitted - 1) + " " + s->last_what + " " +
                                     seconds(s->submitted_s) + " ago"
                               : "none yet";
      if (s->running >= 0) {
        line += "; it is running #" + std::to_string(s->running) + " " + s->running_what + " (" +
                phase_name(s->phase) + ", for " + seconds(s->running_s) + ")";
      }
    } else if (s->running == seq) {
      line += "is in " + op + " too (" + std::string(phase_name(s->phase)) + ", for " + seconds(s->running_s) + ")";
    } else {
      line += "has submitted " + op + "; it is " +
              (s->running >= 0 ? "running #" + std::to_string(s->running) + " " + s->running_what + " (" +
                                     phase_name(s->phase) + ", for " + seconds(s->running_s) + ")"
                               : std::string("idle"));
    }
    report += line;
  }
  return report;
}

}  // namespace pipedap
