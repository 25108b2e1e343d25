// The engine's watchdog thread and the stall reports it asks the engine thread
// for (members of Engine, see engine.h; the status channel: status.h).
//
// The watchdog watches the running collective, the oldest outstanding
// point-to-point submission and the oldest barrier some member has not
// called. After PIPEDAP_STALL_SECONDS it asks the engine thread for a report:
// the engine thread asks the ranks concerned (a collective's set members, a
// transfer's peers, a barrier's absent members) what they are doing and prints
// what they answered. After PIPEDAP_TIMEOUT_SECONDS it asks again, and the
// report ends the job.
#include <chrono>
#include <cstdio>
#include <cstring>

#include "engine.h"
#include "mpi_util.h"

namespace pipedap {

RankStatus Engine::status_snapshot(int64_t set_id) const {
  const std::shared_ptr<ProcessSet> set = sets_->find(static_cast<int>(set_id));
  std::lock_guard<std::mutex> lock(mu_);
  RankStatus s;
  const int64_t now = monotonic_ns();
  if (set && set->member()) {
    s.submitted = set->next_seq;
    s.submitted_s = (now - set->last_submit_ns) * 1e-9;
    std::strncpy(s.last_what, set->last_submitted.c_str(), sizeof s.last_what - 1);
  }
  if (running_) {
    s.running = running_->seq();
    s.running_set = running_set_->id;
    s.phase = static_cast<int32_t>(phase_);
    s.running_s = (now - running_->start_ns()) * 1e-9;
    std::strncpy(s.running_what, running_->description().c_str(), sizeof s.running_what - 1);
  }
  const PointToPoint::Oldest transfer = p2p_->oldest();
  s.p2p_outstanding = static_cast<int32_t>(transfer.outstanding);
  if (transfer.handle) {
    s.p2p_s = (now - transfer.handle->start_ns()) * 1e-9;
    std::strncpy(s.p2p_what, transfer.handle->description().c_str(), sizeof s.p2p_what - 1);
  }
  return s;
}

std::string Engine::Inquiry::operation() const {
  switch (what) {
    case Watched::kTransfer: return set->p2p_operation(handle->seq());
    case Watched::kMeeting: return set->barrier(handle->seq());
    default: return set->operation(handle->seq());
  }
}

std::string Engine::stall_message(const Inquiry& inquiry) const {
  const Handle& h = *inquiry.handle;
  const double stalled = (monotonic_ns() - h.start_ns()) * 1e-9;
  const std::string message =
      "pipedap: rank " + std::to_string(world_.rank) + ": " + h.description() + " (" + inquiry.operation() +
      ") has not finished after " + format_number(static_cast<double>(static_cast<int64_t>(stalled))) + " s";
  if (inquiry.what == Watched::kTransfer) return message + ": " + p2p_->waiting_for(h) + ".";
  if (inquiry.what == Watched::kMeeting) {
    return message + ": " + rank_list(inquiry.ranks) + (inquiry.ranks.size() == 1 ? " has" : " have") +
           " not called it.";
  }
  std::lock_guard<std::mutex> lock(mu_);
  return message + " (" + std::to_string(queue_.size()) + " more queued behind it).";
}

void Engine::service() {
  progress_meetings();
  if (world_.size < 2) return;
  status_->serve([this](int64_t set) { return status_snapshot(set); });  // a snapshot only when asked
  Inquiry inquiry;
  {
    std::lock_guard<std::mutex> lock(mu_);
    inquiry = inquiry_;
  }
  if (!inquiry.handle) return;
  status_->ask(inquiry.set->id, inquiry.ranks);  // the members of the stalled collective's set, or the peers
  const auto answers = status_->answers();
  if (!answers) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (inquiry_.handle != inquiry.handle) return;  // another submission's report replaced it: ask again for that
    inquiry = inquiry_;  // a stall report may have turned into a timeout meanwhile
    inquiry_ = Inquiry{};
  }
  if (inquiry.handle->done()) return;  // it finished meanwhile: nothing to report
  auto label = [this](int id) { return sets_->describe(id); };
  std::string report = stall_message(inquiry);
  if (inquiry.what == Watched::kTransfer) {
    report += describe_peers(inquiry.ranks, *answers, label) +
              "\n  A transfer waits for its peer to submit the matching one (the same tag, sender and receiver "
              "swapped) and to get to it: look for a tag or peer that differs between the two sides, or a "
              "rank-dependent branch that skips it.";
  } else if (inquiry.what == Watched::kMeeting) {
    report += describe_absent(inquiry.ranks, *answers, label) +
              "\n  A barrier waits for every member of its set to call it: a rank that has not called it took "
              "a rank-dependent branch, is still computing, or is stuck outside pipedap (look at its stack: "
              "py-spy dump --pid PID).";
  } else {
    report += describe_ranks(world_.rank, *inquiry.set, inquiry.handle->seq(), *answers, label) +
              "\n  A rank that has not submitted it skipped it (a rank-dependent branch), is still computing, or is "
              "stuck outside pipedap (look at its stack: py-spy dump --pid PID).";
  }
  const std::string timeout = format_number(config_.timeout_seconds);
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
  // The last collective, point-to-point submission and barrier a stall report was made for.
  constexpr int kWatched = 3;
  std::shared_ptr<Handle> reported[kWatched];
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopped_) {
    watchdog_cv_.wait_for(lock, std::chrono::milliseconds(200));
    const PointToPoint::Oldest transfer = p2p_->oldest();
    Inquiry watched[kWatched];  // the running collective, the oldest transfer, the oldest barrier still missing members
    if (running_) watched[0] = Inquiry{running_, running_set_, Watched::kCollective, running_set_->ranks};
    if (transfer.handle) watched[1] = Inquiry{transfer.handle, transfer.set, Watched::kTransfer, transfer.peers};
    for (const Meeting& m : meetings_) {
      std::vector<int> ranks = absent(m);
      if (ranks.empty()) continue;  // met: it waits for this rank's own operations, watched above
      watched[2] = Inquiry{m.handle, m.set, Watched::kMeeting, std::move(ranks)};
      break;
    }
    for (int k = 0; k < kWatched; ++k) {
      Inquiry& w = watched[k];
      if (!w.handle) continue;
      const int64_t now = monotonic_ns();
      const double stalled = (now - w.handle->start_ns()) * 1e-9;
      const bool asked = inquiry_.handle == w.handle;
      if (config_.timeout_seconds > 0 && stalled >= config_.timeout_seconds) {
        if (!(asked && inquiry_.timeout)) {
          w.timeout = true;  // the engine thread asks the others, reports, aborts
          w.asked_ns = now;
          inquiry_ = w;
        } else if ((now - inquiry_.asked_ns) * 1e-9 > kAnswerSeconds + 10) {
          const std::string what = "rank " + std::to_string(world_.rank) + ": " + w.handle->description() + " (" +
                                   w.operation() + ") has not finished after " +
                                   format_number(static_cast<double>(static_cast<int64_t>(stalled))) + " s";
          lock.unlock();
          abort_job(what + ", past PIPEDAP_TIMEOUT_SECONDS=" + format_number(config_.timeout_seconds) +
                        " (the engine thread did not finish the stall report: it is stuck outside its polling loop)",
                    1);
        }
      } else if (config_.stall_seconds > 0 && stalled >= config_.stall_seconds && reported[k] != w.handle &&
                 !inquiry_.handle) {
        reported[k] = w.handle;
        w.asked_ns = now;
        inquiry_ = w;
      }
    }
  }
}

}  // namespace pipedap
