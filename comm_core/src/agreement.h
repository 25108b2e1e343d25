// Cross-rank agreement on each submission before any of its data moves.
//
// [Note: every submission is agreed before it runs]
// Collectives match across ranks by order. If one rank submits something the
// others do not (an extra operation, another size, dtype or root), MPI would
// match the wrong messages: truncation errors at best, heap corruption at
// worst (a message written into a buffer that was already released). So before
// a submission's data moves, every rank sends a 24-byte fingerprint of it
// (kind, name, counts, shape, dtype, reduce, root, device) to every other rank, on a
// communicator of its own. On a process set (process_set.h) "every rank" means
// every member, on the set's own agreement communicator, with the set's own
// sequence numbers. Equal fingerprints: the data phase runs. Different
// ones: every rank sees the same table, so every rank fails that submission
// (nothing ran, no buffer is touched), after a second exchange on another
// communicator that tells each rank what the others submitted. The engine then
// goes on with the next submission, as Horovod does after a mismatch.
//
// The agreement of the next queued submission starts before the current one's
// data phase, so its latency hides behind the transfer. Fingerprints travel as
// point-to-point messages of one tag: MPI keeps messages of one (source, tag)
// in order, and every rank starts agreements in submission order, so they
// match. P - 1 tiny messages each way are cheap at the rank counts this library
// targets; a tree would suit thousands.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "host_collectives.h"
#include "op.h"
#include "process_set.h"

namespace pipedap {

constexpr int kSubmissionTag = 0;
constexpr int kMeetingTag = 1;

// Bits of Fingerprint::flags.
enum FingerprintFlag : int32_t {
  kJoined = 1,  // the rank waits in join() (engine.h, [Note: join]); `hash` holds the sequence number it joined at
};

struct Fingerprint {
  int64_t seq = 0;
  uint64_t hash = 0;  // of every op's kind, name, counts, shape, dtype, reduce, root and device kind
  int32_t flags = 0;
  int32_t nops = 0;
};

Fingerprint fingerprint_of(int64_t seq, const std::vector<OpSpec>& ops);
// The fingerprint of a rank in join() at round `seq`, having joined at `joined_at`.
Fingerprint join_fingerprint(int64_t seq, int64_t joined_at);

// What the fingerprints of one round say.
enum class Verdict {
  kAgreed,     // every rank submitted the same thing: it runs
  kDiffer,     // they differ: it runs nowhere (explain says why)
  kJoinRound,  // the ranks that have not joined agree; the joined ones take part (engine.h, [Note: join])
  kAllJoined,  // every rank is in join(): it returns
};

// One submission's fingerprint exchange. Its buffers must outlive the request:
// the engine never destroys a pending Agreement (see Engine::abandoned_).
class Agreement {
 public:
  // Starts the exchange. Tags on the agreement communicator: kSubmissionTag for the ordered submissions,
  // kMeetingTag for barriers (engine.h, [Note: barriers meet apart from the order]).
  Agreement(const Communicator& agree, const Fingerprint& mine, int tag = kSubmissionTag);
  Agreement(const Agreement&) = delete;
  Agreement& operator=(const Agreement&) = delete;

  bool complete();  // progresses it; true once every rank's fingerprint arrived
  // The ranks (within the set) whose fingerprint has not arrived yet, as of the last complete().
  std::vector<int> missing() const;
  // After completion.
  Verdict verdict() const;
  // After completion: the ranks within the set that are in join(), ascending.
  std::vector<int> joined() const;
  // kAllJoined: the rank within the set that joined last (the highest of those that joined together).
  int last_joined() const;
  // After completion, when not agreed: a collective on the set's side
  // communicator (every member calls it for the same submission) that returns
  // the message this rank raises, naming the members by world rank.
  std::string explain(const ProcessSet& set, const std::string& my_description, const PollPolicy& poll) const;

 private:
  int rank_;  // this rank within the set
  Fingerprint mine_;
  std::vector<Fingerprint> all_;
  std::vector<MPI_Request> requests_;  // a receive from and a send to every other rank
};

}  // namespace pipedap
