#include "p2p.h"

#include <algorithm>
#include <cstring>

#include "mpi_util.h"

namespace pipedap {
namespace {

// A transfer's first message (see the note in p2p.h).
struct Header {
  int64_t count = 0;
  int64_t segment = 0;  // the data's message size (the sender's PIPEDAP_MESSAGE_BYTES): the receiver cuts alike
  int32_t dtype = 0;
  int32_t device = -1;  // the sender's CUDA device (the data travels over NCCL), -1: host memory
  char name[96] = {};   // the sender's, for messages (cut to 95 bytes)
  DeviceLink link;      // CUDA data only
};

size_t bytes_of(int64_t count, DType dtype) { return static_cast<size_t>(count) * dtype_size(dtype); }

// "'x' 500 float32" (" on CUDA"): one side of a mismatch.
std::string tensor_words(const std::string& name, int64_t count, DType dtype, int device) {
  return "'" + name + "' " + std::to_string(count) + " " + dtype_name(dtype) + (device >= 0 ? " on CUDA" : "");
}

// Tests `requests` in order; false at the first unfinished one. CommError if one failed.
bool test_all(std::vector<MPI_Request>& requests, int rank, const std::string& what) {
  for (MPI_Request& r : requests) {
    if (r == MPI_REQUEST_NULL) continue;
    int done = 0;
    check_mpi(MPI_Test(&r, &done, MPI_STATUS_IGNORE), what, rank);
    if (!done) return false;
  }
  return true;
}

}  // namespace

struct PointToPoint::Group {
  std::shared_ptr<ProcessSet> set;
  std::shared_ptr<Handle> handle;
  std::string what;  // "pipedap: <submission> (point-to-point #N) on rank R": its errors start so
  std::vector<std::unique_ptr<Transfer>> transfers;
  std::string error;  // the first transfer's
};

struct PointToPoint::Transfer {
  enum State { kQueued, kHeader, kDraining, kMoving, kDone };
  Group* group = nullptr;
  OpSpec op;
  int peer = 0;  // world rank of op.root
  State state = kQueued;
  Header header;  // a send's own; a receive's from the sender, once it arrived
  std::vector<MPI_Request> requests;  // the header's, then the host data's segments
  int64_t token = -1;  // CUDA data in flight (DeviceBackend::p2p_finished)
  std::unique_ptr<char[]> scratch;  // draining: one segment of the sender's data at a time
  size_t drained = 0;               // draining: bytes whose receive was posted

  bool send() const { return op.kind == OpKind::kSend; }
  const Communicator& comm() const { return group->set->p2p; }
  Channel channel() const { return Channel{group->set->id, op.root, op.tag}; }
  size_t bytes() const { return bytes_of(op.counts[0], op.dtype); }
  size_t sent_bytes() const { return bytes_of(header.count, static_cast<DType>(header.dtype)); }
  std::string describe() const { return op.describe(peer); }
};

PointToPoint::PointToPoint(int rank, size_t segment_bytes, std::function<DeviceBackend&()> device,
                           std::function<void(const std::string&)> broken)
    : rank_(rank), segment_bytes_(segment_bytes), device_(std::move(device)), broken_(std::move(broken)) {}

// The engine thread stops only when nothing is outstanding (engine.cc), and
// give_up empties the list: no request can outlive its buffers.
PointToPoint::~PointToPoint() = default;

void PointToPoint::post(const std::shared_ptr<ProcessSet>& set, std::vector<OpSpec> ops,
                        const std::shared_ptr<Handle>& handle, const std::string& what) {
  auto group = std::make_unique<Group>();
  Group& g = *group;
  g.set = set;
  g.handle = handle;
  g.what = what;
  for (OpSpec& op : ops) {
    auto t = std::make_unique<Transfer>();
    t->group = &g;
    t->peer = set->ranks.at(op.root);
    t->op = std::move(op);
    g.transfers.push_back(std::move(t));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    groups_.push_back(std::move(group));
  }
  try {
    for (auto& t : g.transfers) {
      if (t->send()) {
        start_send(*t);
        continue;
      }
      std::deque<Transfer*>& queue = channels_[t->channel()];
      queue.push_back(t.get());
      if (queue.size() == 1) post_header_receive(*t);
    }
  } catch (const std::exception& e) {
    give_up(e.what());
  }
}

void PointToPoint::start_send(Transfer& t) {
  Header& h = t.header;
  h.count = t.op.counts[0];
  h.segment = static_cast<int64_t>(segment_bytes_);
  h.dtype = static_cast<int32_t>(t.op.dtype);
  h.device = t.op.device;
  std::strncpy(h.name, t.op.name.c_str(), sizeof h.name - 1);
  if (t.op.device >= 0) t.token = device_().start_send(t.group->set->id, t.op, h.link);  // fills the link
  t.requests.emplace_back();
  check_mpi(MPI_Isend(&h, sizeof h, MPI_BYTE, t.op.root, t.op.tag, t.comm().comm, &t.requests.back()),
            "MPI_Isend of the header of " + t.describe(), rank_);
  if (t.op.device < 0) post_segments(t, reinterpret_cast<char*>(t.op.input), t.bytes());
  t.state = Transfer::kMoving;
}

void PointToPoint::post_header_receive(Transfer& t) {
  t.requests.emplace_back();
  check_mpi(MPI_Irecv(&t.header, sizeof t.header, MPI_BYTE, t.op.root, t.op.tag, t.comm().comm, &t.requests.back()),
            "MPI_Irecv of the header of " + t.describe(), rank_);
  t.state = Transfer::kHeader;
}

void PointToPoint::post_segments(Transfer& t, char* buffer, size_t bytes) {
  const size_t segment = static_cast<size_t>(t.header.segment);
  for (size_t off = 0; off < bytes; off += segment) {
    const int n = static_cast<int>(std::min(segment, bytes - off));
    t.requests.emplace_back();
    const int rc = t.send() ? MPI_Isend(buffer + off, n, MPI_BYTE, t.op.root, t.op.tag, t.comm().comm, &t.requests.back())
                            : MPI_Irecv(buffer + off, n, MPI_BYTE, t.op.root, t.op.tag, t.comm().comm, &t.requests.back());
    check_mpi(rc, std::string(t.send() ? "MPI_Isend in " : "MPI_Irecv in ") + t.describe(), rank_);
  }
}

bool PointToPoint::advance(Transfer& t) {
  const std::string what = "a message of " + t.describe();
  switch (t.state) {
    case Transfer::kQueued:
    case Transfer::kDone:
      return false;
    case Transfer::kHeader:
      if (!test_all(t.requests, rank_, what)) return false;
      t.requests.clear();
      on_header(t);
      return true;
    case Transfer::kDraining:
      if (!test_all(t.requests, rank_, what)) return false;
      t.requests.clear();
      drain(t);
      return true;
    case Transfer::kMoving:
      if (t.token >= 0 && device_().p2p_finished(t.token)) t.token = -1;
      if (t.token >= 0 || !test_all(t.requests, rank_, what)) return false;
      t.requests.clear();
      t.state = Transfer::kDone;
      return true;
  }
  return false;
}

void PointToPoint::on_header(Transfer& t) {
  const Header& h = t.header;
  const DType sent = static_cast<DType>(h.dtype);
  const int set = t.group->set->id;
  if (h.count == t.op.counts[0] && sent == t.op.dtype && (h.device >= 0) == (t.op.device >= 0)) {
    if (t.op.device >= 0) {
      t.token = device_().start_recv(set, t.op.root, h.link, t.bytes(), &t.op);
    } else {
      post_segments(t, reinterpret_cast<char*>(t.op.output), t.bytes());
    }
    t.state = Transfer::kMoving;
    release_channel(t);
    return;
  }
  std::string& error = t.group->error;
  if (error.empty()) {
    const std::string peer = "rank " + std::to_string(t.peer);
    error = "rank " + std::to_string(rank_) + " expected " +
            tensor_words(t.op.name, t.op.counts[0], t.op.dtype, t.op.device) + " from " + peer + " with tag " +
            std::to_string(t.op.tag) + "; " + peer + " sent " + tensor_words(h.name, h.count, sent, h.device) +
            ". Nothing was written into the receive buffer and the sent data was discarded (the send completed on " +
            peer + "). Give the receive the sender's element count, dtype and device kind, or check the tags and the "
            "order of the transfers between these ranks.";
  }
  if (t.op.device >= 0) device_().discard({t.op});  // its ready event: this receive writes nothing
  if (h.device >= 0) {  // the data comes over NCCL: into temporary device memory
    t.token = device_().start_recv(set, t.op.root, h.link, t.sent_bytes(), nullptr);
    t.state = Transfer::kMoving;
    release_channel(t);
  } else if (t.sent_bytes() == 0) {
    t.state = Transfer::kDone;
    release_channel(t);
  } else {
    t.scratch.reset(new char[std::min(static_cast<size_t>(h.segment), t.sent_bytes())]);
    t.state = Transfer::kDraining;
    drain(t);
  }
}

void PointToPoint::drain(Transfer& t) {
  const size_t total = t.sent_bytes();
  if (t.drained == total) {  // the last segment arrived
    t.scratch.reset();
    t.state = Transfer::kDone;
    return;
  }
  const int n = static_cast<int>(std::min(static_cast<size_t>(t.header.segment), total - t.drained));
  t.requests.emplace_back();
  check_mpi(MPI_Irecv(t.scratch.get(), n, MPI_BYTE, t.op.root, t.op.tag, t.comm().comm, &t.requests.back()),
            "MPI_Irecv draining " + t.describe(), rank_);
  t.drained += n;
  if (t.drained == total) release_channel(t);
}

void PointToPoint::release_channel(const Transfer& t) {
  auto it = channels_.find(t.channel());
  it->second.pop_front();  // `t` itself: only the first receive of a channel has posted anything
  if (it->second.empty()) {
    channels_.erase(it);
  } else {
    post_header_receive(*it->second.front());
  }
}

bool PointToPoint::progress() {
  bool moved = false;
  for (auto it = groups_.begin(); it != groups_.end();) {
    Group& g = **it;
    bool done = true;
    try {
      for (auto& t : g.transfers) {
        moved = advance(*t) || moved;
        done = done && t->state == Transfer::kDone;
      }
    } catch (const std::exception& e) {
      give_up(e.what());
      return true;
    }
    if (!done) {
      ++it;
      continue;
    }
    if (g.error.empty()) {
      g.handle->complete();
    } else {
      g.handle->fail(g.what + ": " + g.error);
    }
    std::lock_guard<std::mutex> lock(mu_);
    it = groups_.erase(it);
    moved = true;
  }
  return moved;
}

void PointToPoint::give_up(const std::string& reason) {
  std::vector<MPI_Request> pending;
  for (const auto& g : groups_) {
    for (const auto& t : g->transfers) {
      if (t->token >= 0) {
        abort_job(reason + "; CUDA point-to-point transfers were in flight, and NCCL cannot cancel them", 1);
      }
      pending.insert(pending.end(), t->requests.begin(), t->requests.end());
      // A CUDA receive that never got its header still holds its ready event.
      if (!t->send() && t->op.device >= 0 && t->state <= Transfer::kHeader) device_().discard({t->op});
    }
  }
  abandon_requests(pending, /*cancellable=*/true, rank_, reason);
  std::list<std::unique_ptr<Group>> failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed.swap(groups_);
  }
  channels_.clear();
  for (const auto& g : failed) g->handle->fail(g->what + " was given up: " + reason);
  broken_(reason);
}

bool PointToPoint::idle(int set) const {
  return std::none_of(groups_.begin(), groups_.end(), [&](const auto& g) { return set < 0 || g->set->id == set; });
}

std::string PointToPoint::waiting_for(const Handle& handle) const {
  std::string text;
  for (const auto& g : groups_) {
    if (g->handle.get() != &handle) continue;
    for (const auto& t : g->transfers) {
      const std::string peer = "rank " + std::to_string(t->peer);
      const std::string tag = "tag " + std::to_string(t->op.tag);
      std::string state;
      switch (t->state) {
        case Transfer::kDone: continue;
        case Transfer::kQueued: state = "queued behind an earlier receive from " + peer + " with " + tag; break;
        case Transfer::kHeader: state = "no message with " + tag + " has come from " + peer + " yet"; break;
        case Transfer::kDraining:
        case Transfer::kMoving:
          state = t->send() ? peer + " has not received it all yet" : "its data is still arriving from " + peer;
          break;
      }
      if (g->transfers.size() > 1) state = t->describe() + ": " + state;  // else the handle's description says it
      text += (text.empty() ? "" : "; ") + state;
    }
  }
  return text;
}

PointToPoint::Oldest PointToPoint::oldest() const {
  std::lock_guard<std::mutex> lock(mu_);
  Oldest o;
  o.outstanding = groups_.size();
  if (groups_.empty()) return o;
  const Group& g = *groups_.front();  // its handle, set and peers never change
  o.handle = g.handle;
  o.set = g.set;
  for (const auto& t : g.transfers) {
    if (std::find(o.peers.begin(), o.peers.end(), t->peer) == o.peers.end()) o.peers.push_back(t->peer);
  }
  return o;
}

}  // namespace pipedap
