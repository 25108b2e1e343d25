// The one MPI return-code checker, dtype -> MPI mapping, and the polling wait.
#pragma once

#include <mpi.h>

#include <functional>
#include <string>
#include <vector>

#include "dtype.h"

namespace pipedap {

// Throws CommError("<what> failed on rank R: <MPI error string>") unless rc == MPI_SUCCESS.
void check_mpi(int rc, const std::string& what, int rank);

// The MPI datatype that carries `t`, and the MPI operator that sums it.
// float16 / bfloat16 travel as 16-bit integers and are summed by a
// user-defined operator (MPI's own operators do not know them).
MPI_Datatype mpi_datatype(DType t);
MPI_Op mpi_sum_op(DType t);
void create_user_ops();  // once, after MPI_Init
void free_user_ops();    // before MPI_Finalize

// [Note: polling instead of MPI_Waitall]
// MPI_Wait* spins on a core until the request completes. During training that
// core is the one computing the next layer, so a blocking wait in the
// communication thread slows compute down. wait_all spins briefly (short
// operations finish there at full speed), then sleeps with exponential
// back-off up to PIPEDAP_POLL_MAX_SLEEP_US between MPI_Testsome calls.
// Kernel socket buffers keep the link busy while the thread sleeps.
struct PollPolicy {
  int spin_us = 500;  // covers a small collective's round trips over TCP
  int max_sleep_us = 200;  // 0: busy-poll (never sleep)
};

// Waits for every request; on_complete(i) runs (in this thread) as request i completes.
void wait_all(std::vector<MPI_Request>& requests, const PollPolicy& policy, int rank,
              const std::function<void(int)>& on_complete = nullptr);

}  // namespace pipedap
