#include "mpi_util.h"

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "op.h"

namespace pipedap {
namespace {

constexpr int kReduceOps = 5;  // ReduceOp's values
// MPI's built-in operators do not know float16 and bfloat16: ours, one per
// reduction and type ([reduction][0: float16, 1: bfloat16]).
MPI_Op g_16bit_ops[kReduceOps][2];
bool g_user_ops_created = false;

template <ReduceOp Op, DType T>
void user_reduce(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce(Op, T, inout, inout, in, static_cast<size_t>(*len));
}

template <ReduceOp Op>
void create_16bit(int index) {
  check_mpi(MPI_Op_create(&user_reduce<Op, DType::kFloat16>, 1, &g_16bit_ops[index][0]), "MPI_Op_create", -1);
  check_mpi(MPI_Op_create(&user_reduce<Op, DType::kBFloat16>, 1, &g_16bit_ops[index][1]), "MPI_Op_create", -1);
}

int64_t now_us() { return monotonic_ns() / 1000; }

}  // namespace

void sleep_us(int us) {
  if (us <= 0) return;
  timespec ts{us / 1000000, (us % 1000000) * 1000L};
  nanosleep(&ts, nullptr);
}

void Backoff::progressed() {
  progressed_us_ = now_us();
  spin_until_us_ = progressed_us_ + policy_.spin_us;
  sleep_us_ = 1;
}

int Backoff::next_sleep_us(bool patient) {
  const int64_t now = now_us();
  if (policy_.max_sleep_us <= 0 || now < spin_until_us_) return 0;
  int cap = policy_.max_sleep_us;
  if (patient && policy_.patience > 0) {
    const double waited_us = static_cast<double>(now - progressed_us_);
    cap = std::max(cap, static_cast<int>(std::min<double>(kPatientMaxSleepUs, policy_.patience * waited_us)));
  }
  const int us = std::min(sleep_us_, cap);
  sleep_us_ = std::min(sleep_us_ * 2, cap);
  return us;
}

void check_mpi(int rc, const std::string& what, int rank) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  throw CommError(what + " failed on rank " + std::to_string(rank) + ": " + std::string(text, len) +
                  " (MPI error code " + std::to_string(rc) + ")");
}

MPI_Datatype mpi_datatype(DType t) {
  switch (t) {
    case DType::kFloat32: return MPI_FLOAT;
    case DType::kFloat64: return MPI_DOUBLE;
    case DType::kFloat16:
    case DType::kBFloat16: return MPI_UINT16_T;
    case DType::kInt32: return MPI_INT32_T;
    case DType::kInt64: return MPI_INT64_T;
    case DType::kUInt8: return MPI_UINT8_T;
    case DType::kInt8: return MPI_INT8_T;
    case DType::kInt16: return MPI_INT16_T;
  }
  throw std::invalid_argument("mpi_datatype: unknown dtype");
}

MPI_Op mpi_reduce_op(ReduceOp op, DType t) {
  const int index = static_cast<int>(op);
  if (t == DType::kFloat16) return g_16bit_ops[index][0];
  if (t == DType::kBFloat16) return g_16bit_ops[index][1];
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAverage: return MPI_SUM;
    case ReduceOp::kMin: return MPI_MIN;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kProduct: return MPI_PROD;
  }
  throw std::invalid_argument("mpi_reduce_op: unknown reduction");
}

void create_user_ops() {
  if (g_user_ops_created) return;
  create_16bit<ReduceOp::kSum>(0);
  create_16bit<ReduceOp::kAverage>(1);
  create_16bit<ReduceOp::kMin>(2);
  create_16bit<ReduceOp::kMax>(3);
  create_16bit<ReduceOp::kProduct>(4);
  g_user_ops_created = true;
}

void free_user_ops() {
  if (!g_user_ops_created) return;
  for (auto& pair : g_16bit_ops) {
    for (MPI_Op& op : pair) MPI_Op_free(&op);
  }
  g_user_ops_created = false;
}

void wait_all(std::vector<MPI_Request>& requests, const PollPolicy& policy, int rank, bool cancellable,
              const std::function<void(int)>& on_complete) {
  AbandonOnUnwind guard(requests, cancellable, rank);
  const int n = static_cast<int>(requests.size());
  std::vector<int> indices(n);
  std::vector<MPI_Status> statuses(n);
  int remaining = static_cast<int>(std::count_if(requests.begin(), requests.end(),
                                                 [](MPI_Request r) { return r != MPI_REQUEST_NULL; }));
  Backoff backoff(policy);
  int64_t next_idle = now_us() + policy.idle_interval_us;
  while (remaining > 0) {
    int completed = 0;
    const int rc = MPI_Testsome(n, requests.data(), &completed, indices.data(), statuses.data());
    if (rc == MPI_ERR_IN_STATUS) {  // the real error is in the failed request's status
      for (int i = 0; i < completed; ++i) {
        check_mpi(statuses[i].MPI_ERROR, "a request (message from rank " + std::to_string(statuses[i].MPI_SOURCE) + ")",
                  rank);
      }
    }
    check_mpi(rc, "MPI_Testsome", rank);
    if (completed == MPI_UNDEFINED) break;  // every request is already null
    remaining -= completed;
    for (int i = 0; i < completed; ++i) {
      if (on_complete) on_complete(indices[i]);
    }
    if (policy.progress) policy.progress();
    if (completed > 0) {
      backoff.progressed();
      continue;
    }
    if (policy.on_idle && now_us() >= next_idle) {
      policy.on_idle();
      next_idle = now_us() + policy.idle_interval_us;
    }
    sleep_us(backoff.next_sleep_us());
  }
}

void abandon_requests(std::vector<MPI_Request>& requests, bool cancellable, int rank, const std::string& why) {
  for (MPI_Request& r : requests) {
    if (r != MPI_REQUEST_NULL && cancellable) MPI_Cancel(&r);
  }
  const int64_t deadline = now_us() + static_cast<int64_t>(kAbandonSeconds * 1e6);
  size_t pending = 0;
  do {
    pending = 0;
    for (MPI_Request& r : requests) {
      if (r == MPI_REQUEST_NULL) continue;
      int done = 0;
      // A request that completed with an error is complete too: MPI_Test's code is not needed here.
      MPI_Test(&r, &done, MPI_STATUS_IGNORE);
      if (done) {
        r = MPI_REQUEST_NULL;
      } else {
        ++pending;
      }
    }
    if (pending > 0) sleep_us(1000);
  } while (pending > 0 && now_us() < deadline);
  if (pending > 0) {
    abort_job("rank " + std::to_string(rank) + ": " + std::to_string(pending) +
                  " MPI request(s) could neither complete nor be cancelled within " + format_number(kAbandonSeconds) +
                  " s after an error (" + why + "); aborting rather than releasing buffers MPI may still write",
              1);
  }
}

AbandonOnUnwind::~AbandonOnUnwind() {
  if (std::any_of(requests_.begin(), requests_.end(), [](MPI_Request r) { return r != MPI_REQUEST_NULL; })) {
    abandon_requests(requests_, cancellable_, rank_, "an operation failed");
  }
}

void abort_job(const std::string& message, int code) {
  int rank = -1, initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "[pipedap rank %d] aborting the job: %s\n", rank, message.c_str());
  std::fflush(stderr);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

std::string format_number(double x) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", x);
  return text;
}

}  // namespace pipedap
