// What each rank's engine is doing, told to the other ranks on request.
//
// [Note: a stall report asks the other ranks]
// A rank waiting for an operation cannot tell from its own requests which rank
// is missing. When the watchdog finds an operation stalled, the engine thread
// asks every other rank, on a communicator of its own, what it is doing; each
// engine thread answers from its polling loop, busy or idle, like Horovod's
// stall inspector. The report then names every rank that has not submitted the
// operation and what that rank did last. Only the engine thread makes these MPI
// calls (MPI_THREAD_SERIALIZED is enough). One channel on the world serves
// every process set: a question names the set of the stalled operation and
// goes to its members only; each answers with its progress on that set and
// with what it is running, on whichever set (which shows a cycle of
// overlapping sets, see process_set.h). A stalled point-to-point transfer
// asks its peers only; each answers with its own oldest outstanding transfer.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <string>
#include <vector>

#include "host_collectives.h"
#include "process_set.h"

namespace pipedap {

enum class Phase : int32_t { kIdle = 0, kAgreeing = 1, kMovingData = 2 };

// A rank's answer about one process set (the one the question named).
struct RankStatus {
  int64_t submitted = 0;  // operations this rank has submitted on the set so far
  int64_t running = -1;   // the operation it is running (on any set), -1: none
  int32_t phase = 0;      // Phase
  int32_t running_set = 0;  // the set of the running operation
  double running_s = 0;    // since the running operation started
  double submitted_s = 0;  // since its last submission
  char running_what[160] = {};
  char last_what[160] = {};  // its last submission on the set
  int32_t p2p_outstanding = 0;  // point-to-point submissions not finished (on any set)
  int32_t reserved = 0;
  double p2p_s = 0;  // since the oldest of them was posted
  char p2p_what[160] = {};
};

// How long a stall report waits for the other ranks' answers.
constexpr double kAnswerSeconds = 5.0;

// [Note: departure notices]
// A rank whose engine shuts down (pipedap.shutdown(), or the end of its
// script) will submit nothing more. If another rank still waits for it in an
// operation it never submitted (the ranks ran different numbers of
// collectives: uneven data without join(), a rank that left a loop early), that
// rank would wait for PIPEDAP_TIMEOUT_SECONDS. So a departing engine tells
// every other rank, and their engines fail such operations at once, naming the
// departed rank. A notice carries the engine's generation (how many engines
// this process started), so a stale one, sent to an engine that has since been
// restarted on communicators that MPI may have numbered alike, is ignored.
class StatusChannel {
 public:
  StatusChannel(const Communicator& side, int64_t generation)
      : side_(side), generation_(generation), departed_(side.size, false) {}
  ~StatusChannel();  // gives up its pending requests (no buffer outlives them)
  StatusChannel(const StatusChannel&) = delete;
  StatusChannel& operator=(const StatusChannel&) = delete;

  // Answers the other ranks' questions with `me(set)` (called only when one
  // came); progresses our own inquiry.
  void serve(const std::function<RankStatus(int64_t set)>& me);
  // Asks the other `ranks` (world ranks) what they are doing, and about
  // process set `set` (nothing if an inquiry is under way).
  void ask(int64_t set, const std::vector<int>& ranks);
  bool asking() const { return asking_; }
  // Once every asked rank answered or kAnswerSeconds passed: each world
  // rank's answer (nullopt: none came, or not asked) and the inquiry ends.
  std::optional<std::vector<std::optional<RankStatus>>> answers();
  // Tells every other rank that this engine shuts down (waits at most kAnswerSeconds for the sends).
  void announce_departure();
  // Per world rank: its engine announced its departure (as far as serve() has seen).
  const std::vector<bool>& departed() const { return departed_; }

 private:
  Communicator side_;
  int64_t generation_;
  std::vector<bool> departed_;
  struct Answer {
    RankStatus status;
    MPI_Request request = MPI_REQUEST_NULL;
  };
  void progress_inquiry();

  std::list<Answer> outgoing_;  // answers being sent, and questions left unsent (a list: addresses stay put)
  bool asking_ = false;
  int64_t deadline_ns_ = 0;
  int64_t question_ = 0;             // the buffer our questions are sent from: the set
  std::vector<MPI_Request> asked_;   // per rank: [2r] the question's send, [2r+1] the answer's receive
  std::vector<RankStatus> received_;
  std::vector<bool> expected_;  // per rank: asked
  std::vector<bool> answered_;
};

// The stall report of `me`, waiting for operation #seq of `set`, from the
// members' answers; `label(id)` names the set of a member's running operation.
std::string describe_ranks(int me, const ProcessSet& set, int64_t seq,
                           const std::vector<std::optional<RankStatus>>& answers,
                           const std::function<std::string(int)>& label);
// The same for a barrier, from the answers of the members that have not called it.
std::string describe_absent(const std::vector<int>& ranks, const std::vector<std::optional<RankStatus>>& answers,
                            const std::function<std::string(int)>& label);
// The same for a stalled point-to-point submission, from its `peers`' answers.
std::string describe_peers(const std::vector<int>& peers, const std::vector<std::optional<RankStatus>>& answers,
                           const std::function<std::string(int)>& label);

}  // namespace pipedap
