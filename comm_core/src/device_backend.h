// Collectives on CUDA memory. The NCCL implementation (nccl_backend.cc) is
// compiled only when setup.py finds CUDA and NCCL (PIPEDAP_WITH_NCCL);
// otherwise make_device_backend throws an error that says how to get it.
#pragma once

#include <memory>
#include <vector>

#include "host_collectives.h"
#include "op.h"

namespace pipedap {

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
  // On the engine thread, when process set `set` is removed: release its communicator.
  virtual void forget(int set) = 0;
};

bool nccl_built();
// `rank`: this process's world rank, for messages.
std::unique_ptr<DeviceBackend> make_device_backend(int rank, const PollPolicy& poll);

}  // namespace pipedap
