// Collectives on CUDA memory. The NCCL implementation (nccl_backend.cc) is
// compiled only when setup.py finds CUDA and NCCL (PIPEDAP_WITH_NCCL);
// otherwise make_device_backend throws an error that says how to get it.
#pragma once

#include <memory>
#include <vector>

#include "host_collectives.h"
#include "op.h"

namespace pipedap {

// What a CUDA send tells its receiver in the transfer's header (p2p.h). NCCL
// has no tags: it matches a pair's sends and receives in issue order, so the
// receiver issues its receives in the order of the sender's `seq`, whatever
// order their tags were posted in.
struct DeviceLink {
  int64_t seq = -1;      // this send is the sender's seq-th CUDA send to this receiver on the set
  int32_t new_comm = 0;  // 1: the first one; `id` holds the NCCL unique id of the pair's communicator
  int32_t reserved = 0;
  char id[128] = {};     // ncclUniqueId (NCCL_UNIQUE_ID_BYTES)
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  // On the submitting thread: record that `op` must wait for the work already
  // queued on its producer stream (an event on op.stream). Sets op.ready_event.
  virtual void prepare(OpSpec& op) = 0;
  // On the engine thread: issue the ops as one NCCL group among the members
  // of process set `set`, whose MPI communicator is `comm` (counts and roots
  // are relative to it), on the communication stream after their ready
  // events, and wait until they finished.
  virtual void run_group(int set, const Communicator& comm, const std::vector<OpSpec>& ops) = 0;
  // On the engine thread, for a group that will not run (refused by the
  // agreement, or after an earlier failure): release what prepare() made.
  virtual void discard(const std::vector<OpSpec>& ops) = 0;
  // On the engine thread, when process set `set` is removed: release its communicators.
  virtual void forget(int set) = 0;

  // Point-to-point (p2p.h), on the engine thread, never waiting. Each
  // direction of each pair of members of a set gets its own NCCL communicator
  // (of 2 ranks, created by the first send, whose id travels in `link`) and
  // stream, apart from the collectives' stream: a pending receive never holds
  // up a collective, nor a transfer the other way. A transfer returns a token
  // polled with p2p_finished.
  // Starts sending `op` (a kSend prepared by prepare()) to member op.root of `set`; fills `link`.
  virtual int64_t start_send(int set, const OpSpec& op, DeviceLink& link) = 0;
  // Starts receiving `bytes` sent with `link` by member `peer` of `set` into op.output (`op` a prepared
  // kRecv), or, with op == nullptr, into temporary device memory that is then freed (a mismatched send).
  virtual int64_t start_recv(int set, int peer, const DeviceLink& link, size_t bytes, const OpSpec* op) = 0;
  // Whether transfer `token` finished (then the token is spent); CommError if it failed.
  virtual bool p2p_finished(int64_t token) = 0;
};

bool nccl_built();
// `rank`: this process's world rank, for messages.
std::unique_ptr<DeviceBackend> make_device_backend(int rank, const PollPolicy& poll);

}  // namespace pipedap
