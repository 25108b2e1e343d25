// Collectives on host memory over MPI.
//
// [Note: why our own ring]
// Open MPI's default reduce-scatter / all-gather algorithms reached 32% / 47%
// of the link rate on the emulated cluster (docs/testbed.md); NCCL
// does not use MPI's algorithms either. Large operations therefore run a ring
// over point-to-point messages: each of the p-1 (all-reduce: 2(p-1)) steps
// sends one block to the right neighbour and receives one from the left, so
// every link carries exactly (p-1)/p of the data. Blocks are cut into segments
// and each received segment is reduced at once, overlapping arithmetic with
// the transfer. The ring of a *grouped* submission advances all of its ops
// step by step together: their messages of one step travel back to back, so
// the group pays one start-up per step instead of one per op (the PipeDAP
// merge of an all-gather with a reduce-scatter).
// Small operations use MPI's nonblocking collectives, whose log(p) algorithms
// have lower latency than a ring, unless a measured table says otherwise.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>
#include <vector>

#include "mpi_util.h"
#include "op.h"

namespace pipedap {

struct Communicator {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
};

// [Note: the measured choice of algorithm]
// Which algorithm is faster depends on the transport, kind and size (on 2
// ranks the ring's reduce-scatter won 2-6x, the all-gathers tied; more ranks
// favour MPI's log(p) algorithms at small sizes). pipedap.algorithms times both
// inside the engine on the cluster at hand and installs, per kind, the sizes
// from which each one runs; without such a table kAuto means "ring from
// ring_min_bytes". The choice is made when an op is submitted (program order),
// so every rank that installs the same table at the same point of its
// submissions makes the same choice; the algorithm is also agreed (hashed).
struct AlgorithmTable {
  struct From {
    size_t min_bytes;  // this algorithm runs from this many bytes up to the next entry's
    Algorithm algorithm;
  };
  std::vector<From> reducescatter, allgather, allreduce;  // each sorted by min_bytes, the first from 0
  const std::vector<From>* of(OpKind kind) const;  // null for other kinds
};

struct HostCollectiveConfig {
  Algorithm algorithm = Algorithm::kAuto;  // PIPEDAP_ALGORITHM: kRing / kMpi override any table
  size_t ring_min_bytes = 64 * 1024;  // kAuto without a table: ring from this many bytes per op
  size_t segment_bytes = 1 << 20;     // reduce-scatter message size (reduction overlaps the next receive)
  size_t message_bytes = 2 << 20;     // other ring messages: kept under the TCP eager limit (see comm.py)
  PollPolicy poll;
};

// Runs a group of host-memory ops as one unit, in a single thread.
// Throws CommError naming the op and the rank on any MPI failure.
// Scratch memory of the ring reduce-scatters, kept from one operation to the
// next. Allocating it per operation cost more than the transfer itself: a fresh
// 32 MB block is mmapped and page-faulted in every time (bench_comm, 64 MB
// reduce-scatter on 2 ranks: 40-55 ms with fresh blocks, 16-19 ms without).
// A block is only replaced (by a larger one) when an operation starts, when no
// request points into it (see AbandonOnUnwind).
class ScratchArena {
 public:
  void rewind() { next_ = 0; }
  // The next block of at least `bytes` (valid until the arena is destroyed).
  char* take(size_t bytes);

 private:
  std::vector<std::unique_ptr<char[]>> blocks_;
  std::vector<size_t> sizes_;
  size_t next_ = 0;
};

// `progress`, if set, is the submission's handle: ring all-gathers report on it what has arrived
// ([Note: all-gather progress] in op.h).
void run_host_group(const Communicator& c, const std::vector<OpSpec>& ops, const HostCollectiveConfig& cfg,
                    ScratchArena& scratch, Handle* progress = nullptr);

// The size that messages other than reducing ring segments are cut into:
// PIPEDAP_MESSAGE_BYTES in whole 8-byte units (any dtype's elements), at most
// 1 GiB (an int count of bytes). Point-to-point data uses it too (p2p.h).
size_t message_segment_bytes(const HostCollectiveConfig& cfg);

// Whether `op` has a choice of algorithm: a reduce-scatter, all-gather or all-reduce on host memory.
bool has_algorithm_choice(const OpSpec& op);

// The algorithm of a host rs / ag / ar: its own if set, else PIPEDAP_ALGORITHM if
// not auto, else `table`'s for its size (null or empty: ring from ring_min_bytes).
// Other kinds: kAuto (they have one algorithm).
Algorithm choose_algorithm(const OpSpec& op, const HostCollectiveConfig& cfg, const AlgorithmTable* table);

// The same check for a table from Python: sorted, starting at 0, ring or MPI only (std::invalid_argument).
void validate_table(const AlgorithmTable& table);

}  // namespace pipedap
