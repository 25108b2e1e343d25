#include "join.h"

#include "mpi_util.h"

namespace pipedap {
namespace {

constexpr int kJoinTag = 4;  // on the side communicator (status.cc uses 1 and 2, agreement.cc 3)

// An op's spec as int64 words: kind, dtype, reduce, root, device, algorithm, then counts, shape and name, each
// length-prefixed. The algorithm is the leader's choice: the joined ranks run the ops the same way.
void append_spec(std::vector<int64_t>& words, const OpSpec& op) {
  words.insert(words.end(), {static_cast<int64_t>(op.kind), static_cast<int64_t>(op.dtype),
                             static_cast<int64_t>(op.reduce), op.root, op.device,
                             static_cast<int64_t>(op.algorithm)});
  for (const std::vector<int64_t>* v : {&op.counts, &op.shape}) {
    words.push_back(static_cast<int64_t>(v->size()));
    words.insert(words.end(), v->begin(), v->end());
  }
  words.push_back(static_cast<int64_t>(op.name.size()));
  words.insert(words.end(), op.name.begin(), op.name.end());
}

std::vector<OpSpec> parse_specs(const std::vector<int64_t>& words) {
  size_t at = 0;
  auto next = [&]() -> int64_t {
    if (at >= words.size()) throw CommError("join: a truncated list of operations arrived from the leader");
    return words[at++];
  };
  auto vector = [&]() {
    std::vector<int64_t> v(static_cast<size_t>(next()));
    for (int64_t& x : v) x = next();
    return v;
  };
  std::vector<OpSpec> ops(static_cast<size_t>(next()));
  for (OpSpec& op : ops) {
    op.kind = static_cast<OpKind>(next());
    op.dtype = static_cast<DType>(next());
    op.reduce = static_cast<ReduceOp>(next());
    op.root = static_cast<int>(next());
    op.device = static_cast<int>(next());
    op.algorithm = static_cast<Algorithm>(next());
    op.counts = vector();
    op.shape = vector();
    for (int64_t c : vector()) op.name.push_back(static_cast<char>(c));
  }
  return ops;
}

}  // namespace

void send_join_ops(const ProcessSet& set, const std::vector<OpSpec>& ops, const std::vector<int>& joined,
                   const PollPolicy& poll) {
  std::vector<int64_t> words{static_cast<int64_t>(ops.size())};
  for (const OpSpec& op : ops) append_spec(words, op);
  const int64_t length = static_cast<int64_t>(words.size());
  std::vector<MPI_Request> requests;
  AbandonOnUnwind guard(requests, /*cancellable=*/false, set.side.rank);
  for (int r : joined) {
    requests.emplace_back();
    check_mpi(MPI_Isend(&length, 1, MPI_INT64_T, r, kJoinTag, set.side.comm, &requests.back()), "join (MPI_Isend)",
              set.side.rank);
    requests.emplace_back();
    check_mpi(MPI_Isend(words.data(), static_cast<int>(length), MPI_INT64_T, r, kJoinTag, set.side.comm,
                        &requests.back()),
              "join (MPI_Isend)", set.side.rank);
  }
  wait_all(requests, poll, set.side.rank, /*cancellable=*/false);
}

std::vector<OpSpec> receive_join_ops(const ProcessSet& set, int leader, const PollPolicy& poll) {
  int64_t length = 0;
  std::vector<MPI_Request> requests(1);
  AbandonOnUnwind guard(requests, /*cancellable=*/false, set.side.rank);
  check_mpi(MPI_Irecv(&length, 1, MPI_INT64_T, leader, kJoinTag, set.side.comm, &requests[0]), "join (MPI_Irecv)",
            set.side.rank);
  wait_all(requests, poll, set.side.rank, /*cancellable=*/false);
  std::vector<int64_t> words(static_cast<size_t>(length));
  check_mpi(MPI_Irecv(words.data(), static_cast<int>(length), MPI_INT64_T, leader, kJoinTag, set.side.comm,
                      &requests[0]),
            "join (MPI_Irecv)", set.side.rank);
  wait_all(requests, poll, set.side.rank, /*cancellable=*/false);
  return parse_specs(words);
}

std::string join_refusal(const std::vector<OpSpec>& ops, const ProcessSet& set, const std::vector<int>& joined) {
  for (const OpSpec& op : ops) {
    const bool additive = op.reduce == ReduceOp::kSum || op.reduce == ReduceOp::kAverage;
    if (op.kind == OpKind::kAllReduce && additive && op.device < 0) continue;
    std::vector<int> world;
    for (int r : joined) world.push_back(set.ranks[r]);
    return op.describe() + " cannot run while " + rank_list(world) + (world.size() == 1 ? " has" : " have") +
           " joined (called join(): out of data). Only an all-reduce with Sum or Average on host memory can, the "
           "joined ranks adding zeros. Call join() on every rank before other collectives, or stop them first.";
  }
  return "";
}

void run_with_zeros(const Communicator& data, std::vector<OpSpec> ops, const HostCollectiveConfig& cfg,
                    ScratchArena& scratch) {
  std::vector<std::vector<char>> zeros;
  zeros.reserve(ops.size());
  for (OpSpec& op : ops) {
    zeros.emplace_back(static_cast<size_t>(op.total_count()) * dtype_size(op.dtype), '\0');
    op.input = op.output = reinterpret_cast<uintptr_t>(zeros.back().data());  // in place: the sum lands there
  }
  run_host_group(data, ops, cfg, scratch);
}

}  // namespace pipedap
