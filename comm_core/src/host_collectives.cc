#include "host_collectives.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <map>
#include <memory>

namespace pipedap {
namespace {

int mod(int a, int p) { return ((a % p) + p) % p; }

// Element counts and offsets of the p blocks of a buffer.
struct Blocks {
  std::vector<int64_t> counts;
  std::vector<int64_t> displs;
  size_t elem = 1;

  Blocks(std::vector<int64_t> c, size_t elem_size) : counts(std::move(c)), displs(counts.size()), elem(elem_size) {
    int64_t off = 0;
    for (size_t i = 0; i < counts.size(); ++i) {
      displs[i] = off;
      off += counts[i];
    }
  }
  size_t bytes(int i) const { return static_cast<size_t>(counts[i]) * elem; }
  size_t offset(int i) const { return static_cast<size_t>(displs[i]) * elem; }
  size_t max_bytes() const { return *std::max_element(counts.begin(), counts.end()) * elem; }
};

// Even split of n elements over p ranks, the first n % p ranks one larger.
std::vector<int64_t> even_split(int64_t n, int p) {
  std::vector<int64_t> c(p, n / p);
  for (int i = 0; i < n % p; ++i) ++c[i];
  return c;
}

// What one op moves in one ring step. After `recv` arrives, if `addend` is
// set: reduce_dst[i] = recv[i] (the op's reduction) addend[i].
struct Transfer {
  const char* send = nullptr;
  size_t send_bytes = 0;
  char* recv = nullptr;
  size_t recv_bytes = 0;
  char* reduce_dst = nullptr;
  const char* addend = nullptr;
};

class RingOp {
 public:
  virtual ~RingOp() = default;
  virtual int num_steps() const = 0;
  virtual Transfer step(int s) = 0;
  virtual void while_in_flight(int /*s*/) {}  // local work that overlaps step s's messages
  virtual void finish() {}
};

// Block b of the input is reduced along the ring ending at rank b: at step s
// rank r sends its partial sum of block r-s-1 and receives block r-s-2, adding
// its own contribution; the last step receives block r itself.
class RingReduceScatter : public RingOp {
 public:
  RingReduceScatter(const Communicator& c, const OpSpec& op, const char* in, char* out, std::vector<int64_t> counts,
                    ScratchArena& scratch)
      : r_(c.rank), p_(c.size), in_(in), out_(out), dtype_(op.dtype), reduce_(op.reduce),
        blocks_(std::move(counts), dtype_size(op.dtype)) {
    if (p_ > 1) {  // every byte is received before it is read
      scratch_[0] = scratch.take(blocks_.max_bytes());
      scratch_[1] = scratch.take(blocks_.max_bytes());
    }
  }
  int num_steps() const override { return p_ - 1; }
  Transfer step(int s) override {
    const int sb = mod(r_ - s - 1, p_);
    const int rb = mod(r_ - s - 2, p_);
    Transfer t;
    t.send = s == 0 ? in_ + blocks_.offset(sb) : scratch_[(s - 1) % 2];
    t.send_bytes = blocks_.bytes(sb);
    t.recv = scratch_[s % 2];
    t.recv_bytes = blocks_.bytes(rb);
    t.reduce_dst = rb == r_ ? out_ : scratch_[s % 2];
    t.addend = in_ + blocks_.offset(rb);
    return t;
  }
  void finish() override {
    const size_t mine = blocks_.bytes(r_);
    if (p_ == 1 && out_ != in_ + blocks_.offset(r_)) std::memmove(out_, in_ + blocks_.offset(r_), mine);
    if (reduce_ == ReduceOp::kAverage) divide_inplace(dtype_, out_, blocks_.counts[r_], p_);
  }

 private:
  int r_, p_;
  const char* in_;
  char* out_;
  DType dtype_;
  ReduceOp reduce_;
  Blocks blocks_;
  char* scratch_[2] = {nullptr, nullptr};
};

// At step s rank r forwards block r-s (its own at s = 0) and receives block r-s-1.
// Out of place, the own block is sent from the input at step 0 and copied into
// the output while that step's messages travel (a 2 MB copy took as long as half
// the transfer on shared memory); an input that overlaps the output is copied first.
class RingAllGather : public RingOp {
 public:
  RingAllGather(const Communicator& c, const OpSpec& op, const char* in, char* out, std::vector<int64_t> counts)
      : r_(c.rank), p_(c.size), in_(in), out_(out), blocks_(std::move(counts), dtype_size(op.dtype)) {
    const size_t mine = blocks_.bytes(r_);
    const char* out_end = out_ + blocks_.offset(p_ - 1) + blocks_.bytes(p_ - 1);
    const bool overlaps = in_ < out_end && out_ < in_ + mine;
    if (own_block() == in_) return;
    if (overlaps || p_ == 1) {
      std::memmove(own_block(), in_, mine);
    } else {
      copy_pending_ = true;
    }
  }
  int num_steps() const override { return p_ - 1; }
  Transfer step(int s) override {
    const int sb = mod(r_ - s, p_);
    const int rb = mod(r_ - s - 1, p_);
    Transfer t;
    t.send = s == 0 && copy_pending_ ? in_ : out_ + blocks_.offset(sb);
    t.send_bytes = blocks_.bytes(sb);
    t.recv = out_ + blocks_.offset(rb);
    t.recv_bytes = blocks_.bytes(rb);
    return t;
  }
  void while_in_flight(int s) override {
    if (s == 0 && copy_pending_) std::memcpy(own_block(), in_, blocks_.bytes(r_));  // no receive writes there
    copy_pending_ = false;
  }

 private:
  char* own_block() const { return out_ + blocks_.offset(r_); }
  int r_, p_;
  const char* in_;
  char* out_;
  Blocks blocks_;
  bool copy_pending_ = false;
};

// Reduce-scatter into this rank's block of the output, then all-gather in place.
// In place (in == out) is safe: every input block is read before the gather writes it.
class RingAllReduce : public RingOp {
 public:
  RingAllReduce(const Communicator& c, const OpSpec& op, const char* in, char* out, ScratchArena& scratch)
      : RingAllReduce(c, op, in, out, Blocks(even_split(op.counts[0], c.size), dtype_size(op.dtype)), scratch) {}
  int num_steps() const override { return 2 * (p_ - 1); }
  Transfer step(int s) override {
    if (s < p_ - 1) return rs_.step(s);
    if (s == p_ - 1) rs_.finish();  // average this rank's block before sharing it
    return ag_.step(s - (p_ - 1));
  }
  void finish() override {
    if (p_ == 1) rs_.finish();
  }

 private:
  RingAllReduce(const Communicator& c, const OpSpec& op, const char* in, char* out, const Blocks& b,
                ScratchArena& scratch)
      : p_(c.size),
        rs_(c, op, in, out + b.offset(c.rank), b.counts, scratch),
        ag_(c, op, out + b.offset(c.rank), out, b.counts) {}
  int p_;
  RingReduceScatter rs_;
  RingAllGather ag_;
};

std::unique_ptr<RingOp> make_ring_op(const Communicator& c, const OpSpec& op, ScratchArena& scratch) {
  const char* in = reinterpret_cast<const char*>(op.input);
  char* out = reinterpret_cast<char*>(op.output);
  switch (op.kind) {
    case OpKind::kReduceScatter: return std::make_unique<RingReduceScatter>(c, op, in, out, op.counts, scratch);
    case OpKind::kAllGather: return std::make_unique<RingAllGather>(c, op, in, out, op.counts);
    case OpKind::kAllReduce: return std::make_unique<RingAllReduce>(c, op, in, out, scratch);
    default: throw CommError("internal: no ring algorithm for " + op.describe());
  }
}

// A received message segment of a reducing op: reduce_dst = recv (op) addend, once it arrived.
struct PendingReduce {
  ReduceOp op;
  DType dtype;
  char* reduce_dst;
  const char* recv;
  const char* addend;
  size_t count;
};

// A received segment of an all-gather that reports progress: op `index` in the submission.
struct Arrival {
  int index = -1;  // -1: nothing to report
  size_t bytes = 0;
};

// Reports each ring all-gather's received segments on `progress` in order: a segment counts once it
// and every segment before it in the same step have arrived (segments may complete out of order).
class ArrivalReporter {
 public:
  explicit ArrivalReporter(Handle* progress) : progress_(progress) {}
  bool active() const { return progress_ != nullptr; }
  void new_step() {
    arrivals_.clear();
    arrived_.clear();
    next_.clear();
  }
  void expect(const Arrival& a) {  // one per request, in posting order
    if (progress_ == nullptr) return;
    arrivals_.push_back(a);
    arrived_.push_back(false);
  }
  void arrived(int k) {
    if (arrivals_[k].index < 0) return;
    arrived_[k] = true;
    size_t& next = next_.try_emplace(arrivals_[k].index, first_of(arrivals_[k].index)).first->second;
    size_t bytes = 0;
    for (; next < arrivals_.size() && arrivals_[next].index == arrivals_[k].index && arrived_[next]; ++next) {
      bytes += arrivals_[next].bytes;
    }
    if (bytes > 0) progress_->add_delivered(arrivals_[k].index, static_cast<int64_t>(bytes));
  }

 private:
  size_t first_of(int index) const {  // an op's segments are posted one after another
    size_t k = 0;
    while (arrivals_[k].index != index) ++k;
    return k;
  }
  Handle* progress_;
  std::vector<Arrival> arrivals_;
  std::vector<bool> arrived_;
  std::map<int, size_t> next_;  // per op: its first segment not yet reported
};

void run_ring(const Communicator& c, const std::vector<const OpSpec*>& ops, const HostCollectiveConfig& cfg,
              ScratchArena& scratch, const OpSpec* first_op, Handle* progress) {
  std::vector<std::unique_ptr<RingOp>> rings;
  int steps = 0;
  scratch.rewind();
  for (const OpSpec* op : ops) {
    rings.push_back(make_ring_op(c, *op, scratch));
    steps = std::max(steps, rings.back()->num_steps());
  }
  const int left = mod(c.rank - 1, c.size);
  const int right = mod(c.rank + 1, c.size);
  // Reducing receives are cut into segments so arithmetic overlaps the transfer.
  // Other messages are cut at message_bytes: over TCP, a message above the eager
  // limit needs a rendezvous handshake whose control messages queue behind bulk
  // data on a shaped link, which halved throughput on the emulated cluster.
  const size_t reduce_seg = std::max<size_t>(8, cfg.segment_bytes / 8 * 8);  // whole elements of any dtype
  const size_t whole = message_segment_bytes(cfg);
  std::vector<MPI_Request> requests;
  AbandonOnUnwind guard(requests, /*cancellable=*/true, c.rank);  // before the scratch buffers in `rings` go
  std::vector<PendingReduce> reduces;  // one entry per request; count 0: nothing to reduce
  ArrivalReporter reporter(progress);
  for (int s = 0; s < steps; ++s) {
    std::vector<Transfer> transfers(rings.size());
    for (size_t i = 0; i < rings.size(); ++i) {
      if (s < rings[i]->num_steps()) transfers[i] = rings[i]->step(s);
    }
    requests.clear();
    reduces.clear();
    reporter.new_step();
    // Receives first (all ops), then sends. Empty blocks are skipped on both
    // sides (the counts are the same on every rank). One tag per op: MPI keeps
    // messages of one (source, tag) in order, so segments match in order.
    for (size_t i = 0; i < rings.size(); ++i) {
      const Transfer& t = transfers[i];
      const size_t esize = dtype_size(ops[i]->dtype);
      const size_t seg = t.addend != nullptr ? reduce_seg : whole;
      for (size_t off = 0; off < t.recv_bytes; off += seg) {
        const size_t n = std::min(seg, t.recv_bytes - off);
        requests.emplace_back();
        check_mpi(MPI_Irecv(t.recv + off, static_cast<int>(n), MPI_BYTE, left, static_cast<int>(i), c.comm, &requests.back()),
                  "MPI_Irecv in " + ops[i]->describe(), c.rank);
        reduces.push_back(t.addend == nullptr ? PendingReduce{}
                                              : PendingReduce{ops[i]->reduce, ops[i]->dtype, t.reduce_dst + off, t.recv + off, t.addend + off, n / esize});
        reporter.expect(ops[i]->kind == OpKind::kAllGather ? Arrival{static_cast<int>(ops[i] - first_op), n} : Arrival{});
      }
    }
    for (size_t i = 0; i < rings.size(); ++i) {
      const Transfer& t = transfers[i];
      const size_t seg = t.addend != nullptr ? reduce_seg : whole;  // the receiver cuts it the same way
      for (size_t off = 0; off < t.send_bytes; off += seg) {
        const size_t n = std::min(seg, t.send_bytes - off);
        requests.emplace_back();
        check_mpi(MPI_Isend(t.send + off, static_cast<int>(n), MPI_BYTE, right, static_cast<int>(i), c.comm, &requests.back()),
                  "MPI_Isend in " + ops[i]->describe(), c.rank);
        reduces.push_back(PendingReduce{});
        reporter.expect(Arrival{});
      }
    }
    for (size_t i = 0; i < rings.size(); ++i) {
      if (s < rings[i]->num_steps()) rings[i]->while_in_flight(s);
    }
    wait_all(requests, cfg.poll, c.rank, /*cancellable=*/true, [&](int k) {
      const PendingReduce& r = reduces[k];
      if (r.count > 0) reduce(r.op, r.dtype, r.reduce_dst, r.recv, r.addend, r.count);
      if (reporter.active()) reporter.arrived(k);
    });
  }
  for (auto& ring : rings) ring->finish();
}

int to_int_count(int64_t n, const OpSpec& op, int rank) {
  if (n > INT_MAX) {
    throw CommError(op.describe() + " on rank " + std::to_string(rank) +
                    ": more than 2^31-1 elements in one MPI collective; use PIPEDAP_ALGORITHM=ring or auto");
  }
  return static_cast<int>(n);
}

// Argument arrays of a nonblocking MPI collective: they must live until it completes.
struct NativeCall {
  explicit NativeCall(const OpSpec* o) : op(o) {}
  const OpSpec* op;
  std::vector<int> counts;
  std::vector<int> displs;
  std::vector<char> staging;  // reduce-scatter output when it lies inside the input (MPI forbids aliasing)
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;  // all-to-all
};

void start_native(const Communicator& c, NativeCall& call, MPI_Request* req) {
  const OpSpec& op = *call.op;
  const std::string what = "MPI " + op.describe();
  const MPI_Datatype type = mpi_datatype(op.dtype);
  void* in = reinterpret_cast<void*>(op.input);
  void* out = reinterpret_cast<void*>(op.output);
  const size_t esize = dtype_size(op.dtype);
  for (int64_t n : op.counts) call.counts.push_back(to_int_count(n, op, c.rank));
  switch (op.kind) {
    case OpKind::kReduceScatter: {
      const char* in_begin = static_cast<const char*>(in);
      const char* out_begin = static_cast<const char*>(out);
      const size_t in_bytes = op.total_count() * esize;
      const size_t out_bytes = op.counts[c.rank] * esize;
      if (out_bytes > 0 && out_begin < in_begin + in_bytes && in_begin < out_begin + out_bytes) {
        call.staging.resize(out_bytes);
        out = call.staging.data();
      }
      check_mpi(MPI_Ireduce_scatter(in, out, call.counts.data(), type, mpi_reduce_op(op.reduce, op.dtype), c.comm, req), what, c.rank);
      return;
    }
    case OpKind::kAllGather: {
      int off = 0;
      for (int n : call.counts) {
        call.displs.push_back(off);
        off += n;
      }
      char* own = static_cast<char*>(out) + call.displs[c.rank] * esize;
      const size_t own_bytes = static_cast<size_t>(call.counts[c.rank]) * esize;
      const char* in_begin = static_cast<const char*>(in);
      const char* out_end = static_cast<char*>(out) + static_cast<size_t>(off) * esize;
      if (own != in && in_begin < out_end && static_cast<char*>(out) < in_begin + own_bytes) {
        std::memmove(own, in, own_bytes);  // an input inside the output: MPI forbids the aliasing
        in = own;
      }
      const bool in_place = own == in;
      check_mpi(MPI_Iallgatherv(in_place ? MPI_IN_PLACE : in, call.counts[c.rank], type, out, call.counts.data(),
                                call.displs.data(), type, c.comm, req),
                what, c.rank);
      return;
    }
    case OpKind::kAllReduce:
      check_mpi(MPI_Iallreduce(in == out ? MPI_IN_PLACE : in, out, call.counts[0], type, mpi_reduce_op(op.reduce, op.dtype), c.comm, req),
                what, c.rank);
      return;
    case OpKind::kBroadcast:
      if (c.rank == op.root && in != out) std::memcpy(out, in, op.counts[0] * esize);
      check_mpi(MPI_Ibcast(out, call.counts[0], type, op.root, c.comm, req), what, c.rank);
      return;
    case OpKind::kBarrier:
      check_mpi(MPI_Ibarrier(c.comm, req), what, c.rank);
      return;
    case OpKind::kAllToAll: {  // row c.rank of the matrix is sent, column c.rank received
      int64_t sent = 0, received = 0;
      for (int j = 0; j < c.size; ++j) {
        call.send_counts.push_back(call.counts[c.rank * c.size + j]);
        call.send_displs.push_back(to_int_count(sent, op, c.rank));
        sent += call.send_counts.back();
        call.recv_counts.push_back(call.counts[j * c.size + c.rank]);
        call.recv_displs.push_back(to_int_count(received, op, c.rank));
        received += call.recv_counts.back();
      }
      check_mpi(MPI_Ialltoallv(in, call.send_counts.data(), call.send_displs.data(), type, out,
                               call.recv_counts.data(), call.recv_displs.data(), type, c.comm, req),
                what, c.rank);
      return;
    }
    default:
      break;
  }
  throw CommError("internal: " + op.describe() + " is not a host collective");
}

void finish_native(const Communicator& c, const NativeCall& call) {
  const OpSpec& op = *call.op;
  if (!call.staging.empty()) std::memcpy(reinterpret_cast<void*>(op.output), call.staging.data(), call.staging.size());
  if (op.reduce != ReduceOp::kAverage) return;
  if (op.kind == OpKind::kReduceScatter) {
    divide_inplace(op.dtype, reinterpret_cast<void*>(op.output), op.counts[c.rank], c.size);
  } else if (op.kind == OpKind::kAllReduce) {
    divide_inplace(op.dtype, reinterpret_cast<void*>(op.output), op.counts[0], c.size);
  }
}

}  // namespace

size_t message_segment_bytes(const HostCollectiveConfig& cfg) {
  return std::max<size_t>(8, std::min<size_t>(cfg.message_bytes, size_t{1} << 30) / 8 * 8);
}

const std::vector<AlgorithmTable::From>* AlgorithmTable::of(OpKind kind) const {
  switch (kind) {
    case OpKind::kReduceScatter: return &reducescatter;
    case OpKind::kAllGather: return &allgather;
    case OpKind::kAllReduce: return &allreduce;
    default: return nullptr;
  }
}

bool has_algorithm_choice(const OpSpec& op) {
  return op.device < 0 &&
         (op.kind == OpKind::kReduceScatter || op.kind == OpKind::kAllGather || op.kind == OpKind::kAllReduce);
}

Algorithm choose_algorithm(const OpSpec& op, const HostCollectiveConfig& cfg, const AlgorithmTable* table) {
  if (!has_algorithm_choice(op)) return Algorithm::kAuto;
  if (op.algorithm != Algorithm::kAuto) return op.algorithm;
  if (cfg.algorithm != Algorithm::kAuto) return cfg.algorithm;
  const size_t bytes = static_cast<size_t>(op.total_count()) * dtype_size(op.dtype);
  if (table == nullptr || table->of(op.kind)->empty()) {
    return bytes >= cfg.ring_min_bytes ? Algorithm::kRing : Algorithm::kMpi;
  }
  Algorithm chosen = Algorithm::kAuto;
  for (const auto& from : *table->of(op.kind)) {
    if (bytes >= from.min_bytes) chosen = from.algorithm;  // the first entry starts at 0 (validate_table)
  }
  return chosen;
}

void validate_table(const AlgorithmTable& table) {
  for (OpKind kind : {OpKind::kReduceScatter, OpKind::kAllGather, OpKind::kAllReduce}) {
    const auto& entries = *table.of(kind);
    const std::string where = std::string("algorithm table, ") + op_kind_name(kind);
    if (!entries.empty() && entries.front().min_bytes != 0) {
      throw std::invalid_argument(where + ": the first entry must start at 0 bytes");
    }
    for (size_t i = 0; i < entries.size(); ++i) {
      if (entries[i].algorithm != Algorithm::kRing && entries[i].algorithm != Algorithm::kMpi) {
        throw std::invalid_argument(where + ": every entry must name ring or mpi");
      }
      if (i > 0 && entries[i].min_bytes <= entries[i - 1].min_bytes) {
        throw std::invalid_argument(where + ": sizes must increase");
      }
    }
  }
}

char* ScratchArena::take(size_t bytes) {
  if (next_ == blocks_.size()) {
    blocks_.emplace_back();
    sizes_.push_back(0);
  }
  if (sizes_[next_] < bytes) {
    blocks_[next_].reset();  // only between operations: no request points into it
    blocks_[next_].reset(new char[bytes]);
    sizes_[next_] = bytes;
  }
  return blocks_[next_++].get();
}

void run_host_group(const Communicator& c, const std::vector<OpSpec>& ops, const HostCollectiveConfig& cfg,
                    ScratchArena& scratch, Handle* progress) {
  std::vector<const OpSpec*> ring_ops;
  std::vector<NativeCall> native;
  native.reserve(ops.size());
  for (const OpSpec& op : ops) {
    if (has_algorithm_choice(op) && op.algorithm == Algorithm::kAuto) {  // Engine::submit resolves it
      throw CommError("internal: " + op.describe() + " reached the engine thread without an algorithm");
    }
    if (op.algorithm == Algorithm::kRing) {
      ring_ops.push_back(&op);
    } else {
      native.emplace_back(&op);
    }
  }
  // Nonblocking MPI collectives start in submission order on every rank and
  // progress while the ring polls.
  std::vector<MPI_Request> requests(native.size(), MPI_REQUEST_NULL);
  AbandonOnUnwind guard(requests, /*cancellable=*/false, c.rank);  // before `native`'s argument arrays go
  for (size_t i = 0; i < native.size(); ++i) start_native(c, native[i], &requests[i]);
  if (!ring_ops.empty()) run_ring(c, ring_ops, cfg, scratch, ops.data(), progress);
  wait_all(requests, cfg.poll, c.rank, /*cancellable=*/false);
  for (const NativeCall& call : native) finish_native(c, call);
}

}  // namespace pipedap
