// Point-to-point transfers (send / recv) between two members of a process set.
//
// [Note: posted in order, never waited for]
// A collective involves every member of its set, so the engine agrees on it
// and runs it in submission order, one at a time. A send or a receive involves
// two ranks, so it is not agreed, and the engine thread does not wait for it:
// it *posts* the transfer when its submission comes up (in submission order)
// and goes on with the next submission. The transfers outstanding advance in
// progress(), which the engine calls between submissions and from every
// polling wait (PollPolicy::progress), also while a collective's agreement or
// data phase waits. Waiting instead would deadlock: rank 0 receives from rank
// 1 and then all-reduces, rank 1 all-reduces and then sends. Sends and
// receives between two ranks match by tag; those of one tag match in posting
// order (MPI's non-overtaking rule), whatever collectives lie between them.
//
// [Note: the header, and a mismatched receive]
// Each transfer's first message, on its tag, is a header: the sender's element
// count, dtype, device kind and name. A receive first posts only the header's
// receive. If the header matches its buffer (count, dtype, host or CUDA), it
// posts the data's receives into the buffer. If not, nothing is written into
// the buffer: the receive fails with a CommError naming both sides, and the
// sender's data is received into scratch memory and discarded (drained), so
// the next transfer of that (peer, tag) still begins with its header. The send
// completes normally: the error is raised on the receiving rank only (an
// acknowledgement would cost every send a round trip). Because a transfer's
// data carries its tag too, the next receive of a (peer, tag) posts its header
// receive only after the previous one posted every data receive.
//
// Host data travels in segments of PIPEDAP_MESSAGE_BYTES, like the ring's, on
// the set's point-to-point communicator (never matched by collective traffic);
// CUDA data over NCCL (device_backend.h). An MPI error while transfers are
// outstanding gives up every one of them (cancelled and drained, see
// mpi_util.h) and the engine fails later submissions, as after a failed
// collective.
#pragma once

#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "device_backend.h"
#include "host_collectives.h"
#include "op.h"
#include "process_set.h"

namespace pipedap {

class PointToPoint {
 public:
  // `segment_bytes`: host data's message size (message_segment_bytes). `device()`: the
  // device backend (created if needed). `broken(reason)`: every outstanding
  // transfer was given up after an error.
  PointToPoint(int rank, size_t segment_bytes, std::function<DeviceBackend&()> device,
               std::function<void(const std::string&)> broken);
  ~PointToPoint();
  PointToPoint(const PointToPoint&) = delete;
  PointToPoint& operator=(const PointToPoint&) = delete;

  // Engine thread. Posts the transfers of one submission on `set` (validated:
  // sends and receives only); `handle` completes when every one finished, or
  // fails with the first error, which starts with `what`.
  void post(const std::shared_ptr<ProcessSet>& set, std::vector<OpSpec> ops, const std::shared_ptr<Handle>& handle,
            const std::string& what);
  // Engine thread: advances every outstanding transfer, never waiting; true if one made progress.
  bool progress();
  // Engine thread: nothing is outstanding on process set `set` (-1: on any).
  bool idle(int set = -1) const;
  // Engine thread: what the unfinished transfers of `handle` wait for ("" if none).
  std::string waiting_for(const Handle& handle) const;

  // Any thread: the oldest outstanding submission (null handle: none).
  struct Oldest {
    std::shared_ptr<Handle> handle;
    std::shared_ptr<ProcessSet> set;
    std::vector<int> peers;  // world ranks
    size_t outstanding = 0;  // submissions, this one included
  };
  Oldest oldest() const;

 private:
  struct Transfer;
  struct Group;  // the transfers of one submission
  using Channel = std::tuple<int, int, int>;  // (set, peer, tag): receives that match in order

  void start_send(Transfer& t);
  void post_header_receive(Transfer& t);
  bool advance(Transfer& t);
  void on_header(Transfer& t);
  void drain(Transfer& t);
  void post_segments(Transfer& t, char* buffer, size_t bytes);
  void release_channel(const Transfer& t);  // its receives are all posted: post the next one's header receive
  void give_up(const std::string& reason);

  int rank_;
  size_t segment_bytes_;
  std::function<DeviceBackend&()> device_;
  std::function<void(const std::string&)> broken_;
  std::map<Channel, std::deque<Transfer*>> channels_;  // receives in posting order; the first one's header is posted
  mutable std::mutex mu_;  // guards the list itself (the watchdog reads oldest()); transfers are the engine thread's
  std::list<std::unique_ptr<Group>> groups_;  // in posting order
};

}  // namespace pipedap
