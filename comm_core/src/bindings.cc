// pybind11 module pipedap._comm_core: the raw-buffer API that pipedap/comm.py wraps.
// Every call that may wait releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>

#include "engine.h"

namespace py = pybind11;
using namespace pipedap;

namespace {

py::tuple timings_tuple(const Handle& h) {
  const Timings t = h.timings();
  return py::make_tuple(t.enqueue_ns, t.start_ns, t.end_ns);
}

Algorithm parse_algorithm(const std::string& name, const std::string& what) {
  for (Algorithm a : {Algorithm::kAuto, Algorithm::kRing, Algorithm::kMpi}) {
    if (name == algorithm_name(a)) return a;
  }
  throw std::invalid_argument(what + "='" + name + "': use auto, ring or mpi");
}

struct ChoiceKind {
  const char* name;
  OpKind kind;
  std::vector<AlgorithmTable::From> AlgorithmTable::*entries;
};
const ChoiceKind kChoiceKinds[] = {{"reducescatter", OpKind::kReduceScatter, &AlgorithmTable::reducescatter},
                                   {"allgather", OpKind::kAllGather, &AlgorithmTable::allgather},
                                   {"allreduce", OpKind::kAllReduce, &AlgorithmTable::allreduce}};

// {"reducescatter": [(0, "mpi"), (65536, "ring")], ...} <-> AlgorithmTable (missing kinds: ring_min_bytes).
std::shared_ptr<const AlgorithmTable> table_from_dict(const py::dict& doc) {
  auto table = std::make_shared<AlgorithmTable>();
  for (const auto& item : doc) {
    const std::string kind = py::str(item.first);
    const auto it = std::find_if(std::begin(kChoiceKinds), std::end(kChoiceKinds),
                                 [&](const ChoiceKind& k) { return kind == k.name; });
    if (it == std::end(kChoiceKinds)) {
      throw std::invalid_argument("algorithm table: unknown kind '" + kind + "'; use reducescatter, allgather, allreduce");
    }
    auto& entries = (*table).*(it->entries);
    for (const auto& entry : item.second.cast<std::vector<std::pair<size_t, std::string>>>()) {
      entries.push_back({entry.first, parse_algorithm(entry.second, "algorithm table, " + kind)});
    }
  }
  validate_table(*table);
  return table;
}

py::object table_to_dict(const std::shared_ptr<const AlgorithmTable>& table) {
  if (!table) return py::none();
  py::dict doc;
  for (const ChoiceKind& k : kChoiceKinds) {
    py::list entries;
    for (const auto& from : (*table).*(k.entries)) entries.append(py::make_tuple(from.min_bytes, algorithm_name(from.algorithm)));
    doc[k.name] = entries;
  }
  return doc;
}

// The engine's settings from the dict pipedap.settings.engine_config() builds
// (it validated every value and names the PIPEDAP_* variable in its errors).
EngineConfig engine_config(const py::dict& values) {
  EngineConfig c;
  for (const auto& item : values) {
    const std::string key = py::str(item.first);
    const py::handle v = item.second;
    if (key == "algorithm") {
      c.host.algorithm = parse_algorithm(py::str(v), "engine setting algorithm");
    } else if (key == "ring_min_bytes") {
      c.host.ring_min_bytes = v.cast<size_t>();
    } else if (key == "segment_bytes") {
      c.host.segment_bytes = v.cast<size_t>();
    } else if (key == "message_bytes") {
      c.host.message_bytes = v.cast<size_t>();
    } else if (key == "poll_spin_us") {
      c.host.poll.spin_us = v.cast<int>();
    } else if (key == "poll_max_sleep_us") {
      c.host.poll.max_sleep_us = v.cast<int>();
    } else if (key == "poll_patience") {
      c.host.poll.patience = v.cast<double>();
    } else if (key == "stall_seconds") {
      c.stall_seconds = v.cast<double>();
    } else if (key == "timeout_seconds") {
      c.timeout_seconds = v.cast<double>();
    } else {
      throw std::invalid_argument("unknown engine setting '" + key + "'");
    }
  }
  return c;
}

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(text, &len);
  return std::string(text, len);
}

}  // namespace

PYBIND11_MODULE(_comm_core, m) {
  m.doc() = "PipeDAP communication core: an ordered background engine over MPI (and NCCL).";

  py::register_exception<CommError>(m, "CommError", PyExc_RuntimeError);

  py::enum_<OpKind>(m, "OpKind")
      .value("REDUCESCATTER", OpKind::kReduceScatter)
      .value("ALLGATHER", OpKind::kAllGather)
      .value("ALLREDUCE", OpKind::kAllReduce)
      .value("BROADCAST", OpKind::kBroadcast)
      .value("BARRIER", OpKind::kBarrier)
      .value("SEND", OpKind::kSend)
      .value("RECV", OpKind::kRecv)
      .value("ALLTOALL", OpKind::kAllToAll)
      .value("JOIN", OpKind::kJoin);
  py::enum_<DType>(m, "DType")
      .value("FLOAT32", DType::kFloat32)
      .value("FLOAT64", DType::kFloat64)
      .value("FLOAT16", DType::kFloat16)
      .value("BFLOAT16", DType::kBFloat16)
      .value("INT32", DType::kInt32)
      .value("INT64", DType::kInt64)
      .value("UINT8", DType::kUInt8)
      .value("INT8", DType::kInt8)
      .value("INT16", DType::kInt16);
  py::enum_<ReduceOp>(m, "ReduceOp")
      .value("SUM", ReduceOp::kSum)
      .value("AVERAGE", ReduceOp::kAverage)
      .value("MIN", ReduceOp::kMin)
      .value("MAX", ReduceOp::kMax)
      .value("PRODUCT", ReduceOp::kProduct);

  py::class_<OpSpec>(m, "OpSpec")
      .def(py::init([](OpKind kind, std::string name, uintptr_t input, uintptr_t output, std::vector<int64_t> counts,
                       DType dtype, ReduceOp reduce, int root, int device, uintptr_t stream, int tag,
                       std::vector<int64_t> shape, bool name_agreed) {
             OpSpec op;
             op.kind = kind;
             op.name = std::move(name);
             op.input = input;
             op.output = output;
             op.counts = std::move(counts);
             op.dtype = dtype;
             op.reduce = reduce;
             op.root = root;
             op.device = device;
             op.stream = stream;
             op.tag = tag;
             op.shape = std::move(shape);
             op.name_agreed = name_agreed;
             return op;
           }),
           py::arg("kind"), py::arg("name"), py::arg("input") = 0, py::arg("output") = 0,
           py::arg("counts") = std::vector<int64_t>{}, py::arg("dtype") = DType::kFloat32,
           py::arg("reduce") = ReduceOp::kSum, py::arg("root") = 0, py::arg("device") = -1, py::arg("stream") = 0,
           py::arg("tag") = 0, py::arg("shape") = std::vector<int64_t>{}, py::arg("name_agreed") = true,
           "One operation. SEND / RECV: `root` is the peer (a rank within the process set), `input` the "
           "send buffer, `output` the receive buffer, `tag` in [0, 32767]. ALLTOALL: `counts` is the "
           "members x members matrix (row-major) of elements each sends to each. JOIN: `output` holds one "
           "int64, the world rank that joined last. `shape`, where given, is agreed across ranks too; "
           "`name_agreed=False` leaves the name out of the agreement (names generated by a per-rank counter).")
      .def_readonly("kind", &OpSpec::kind)
      .def_readonly("name", &OpSpec::name)
      .def_readonly("counts", &OpSpec::counts)
      .def_readonly("shape", &OpSpec::shape)
      .def_readonly("root", &OpSpec::root)
      .def_readonly("tag", &OpSpec::tag)
      .def_property(
          "algorithm", [](const OpSpec& op) { return std::string(algorithm_name(op.algorithm)); },
          [](OpSpec& op, const std::string& name) { op.algorithm = parse_algorithm(name, "OpSpec.algorithm"); },
          "Host rs / ag / ar only: 'ring', 'mpi' or 'auto' (the engine's choice at submission).")
      .def("__repr__", [](const OpSpec& op) { return op.describe(); });

  py::class_<Handle, std::shared_ptr<Handle>>(m, "Handle")
      .def_property_readonly("seq", &Handle::seq)
      .def_property_readonly("description", &Handle::description)
      .def("done", &Handle::poll, "Whether it finished (without waiting).")
      .def("wait", &Handle::wait, py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>(),
           "Wait up to `timeout` seconds (< 0: forever). Returns False on timeout; raises CommError on failure.")
      .def("delivered", &Handle::delivered, py::arg("op"),
           "Op `op`'s bytes arrived so far, if a ring all-gather (see wait_delivered); else 0.")
      .def("wait_delivered", &Handle::wait_delivered, py::arg("op"), py::arg("bytes"), py::arg("timeout") = -1.0,
           py::call_guard<py::gil_scoped_release>(),
           "Wait up to `timeout` seconds (< 0: forever) until op `op` of this submission, a ring all-gather, has "
           "received `bytes` bytes of the other ranks' blocks (in the order they arrive: the blocks of ranks r-1, "
           "r-2, ...), or the submission finished. Returns False on timeout; raises CommError on failure.")
      .def("timings", &timings_tuple, "(enqueue_ns, start_ns, end_ns) on the CLOCK_MONOTONIC clock.");

  m.def(
      "init",
      [](const py::dict& config) {
        const EngineConfig c = engine_config(config);
        py::gil_scoped_release release;
        init_engine(c);
      },
      py::arg("config") = py::dict(),
      "Start the engine (and MPI if needed) with settings from pipedap.settings.engine_config(); missing keys "
      "take their defaults. Idempotent.");
  m.def("shutdown", &shutdown_engine, py::call_guard<py::gil_scoped_release>());
  m.def("finalize", &finalize_mpi_if_owned, py::call_guard<py::gil_scoped_release>());
  m.def("is_initialized", [] { return engine_or_null() != nullptr; });
  m.def("rank", [] { return engine().rank(); });
  m.def("size", [] { return engine().size(); });
  m.def("local_rank", [] { return engine().local_rank(); });
  m.def("local_size", [] { return engine().local_size(); });
  m.def("mpi_thread_level", [] { return engine().thread_level(); });
  m.def("pending", [] { return engine().pending(); });
  m.def("nccl_built", &nccl_built);
  m.def("mpi_library_version", &mpi_library_version);
  m.def("set_algorithm_table",
        [](const py::object& doc) { engine().set_algorithm_table(doc.is_none() ? nullptr : table_from_dict(doc)); },
        py::arg("table"),
        "Install {kind: [(min_bytes, 'ring' | 'mpi'), ...]} (kinds reducescatter, allgather, allreduce; each list "
        "sorted, the first from 0) for auto ops submitted from now on; None: ring from ring_min_bytes. Every rank "
        "must install the same table between the same two of its submissions.");
  m.def("algorithm_table", [] { return table_to_dict(engine().algorithm_table()); },
        "The installed table (None: none).");
  m.def("algorithm_for",
        [](OpKind kind, size_t bytes) { return std::string(algorithm_name(engine().algorithm_for(kind, bytes))); },
        py::arg("kind"), py::arg("bytes"),
        "What a host op of this kind and size submitted now runs as: 'ring' or 'mpi' ('auto' for kinds "
        "with one algorithm).");
  m.def("submit", [](std::vector<OpSpec> ops, int process_set) { return engine().submit(std::move(ops), process_set); },
        py::arg("ops"), py::arg("process_set") = 0, py::call_guard<py::gil_scoped_release>(),
        "Enqueue ops to run as one unit on a process set (0: the world), after everything submitted before; "
        "returns a Handle at once. Counts, broadcast roots and peers are relative to the set. CommError at once "
        "if the set does not exist or this rank is not a member. A submission of sends and receives (never "
        "mixed with collectives) is posted in that order and not waited for: later submissions run meanwhile.");
  m.def(
      "submit_deferred",
      [](std::vector<OpSpec> ops, const py::function& resolve, int process_set) {
        // The resolver runs on the engine thread: every touch of the Python object holds the GIL.
        std::shared_ptr<py::function> fn(new py::function(resolve), [](py::function* f) {
          py::gil_scoped_acquire gil;
          delete f;
        });
        Resolver resolver = [fn]() {
          py::gil_scoped_acquire gil;
          try {
            return (*fn)().cast<std::vector<OpSpec>>();
          } catch (py::error_already_set& e) {
            throw std::runtime_error(e.what());
          }
        };
        py::gil_scoped_release release;
        return engine().submit(std::move(ops), process_set, std::move(resolver));
      },
      py::arg("ops"), py::arg("resolve"), py::arg("process_set") = 0,
      "Like submit, for host collectives sized only once the submissions before them ran: `ops` (counts all "
      "zero) are agreed, and when the submission comes up the engine thread calls resolve() (holding the GIL) "
      "for the ops to run, of the same kinds and names. An exception from it fails the submission.");
  m.def("meet", [](int process_set) { return engine().meet(process_set); }, py::arg("process_set") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "A barrier on a process set, apart from the order of submissions: returns a Handle that finishes once "
        "every member called meet on the set (the n-th call meets the n-th) and everything this rank submitted "
        "before it finished.");
  m.def("add_process_set", [](const std::vector<int>& ranks) { return engine().add_process_set(ranks); },
        py::arg("ranks"), py::call_guard<py::gil_scoped_release>(),
        "Create a process set of these world ranks (ascending) and return its id. Collective: every rank calls "
        "it with the same list, in the same order; waits until done. CommError on every rank if the lists "
        "differ, a rank is out of range, or a set of these ranks exists.");
  m.def("remove_process_set", [](int id) { engine().remove_process_set(id); }, py::arg("id"),
        py::call_guard<py::gil_scoped_release>(),
        "Remove a process set after everything submitted on it. Collective over the world, like add_process_set. "
        "CommError on every rank for the world (0) or an unknown id.");
  m.def("process_set_ranks", [](int id) { return engine().process_set(id)->ranks; }, py::arg("id"),
        "The world ranks of a process set, ascending.");
  m.def("process_set_rank", [](int id) { return engine().process_set(id)->rank; }, py::arg("id"),
        "This process's rank within a process set, -1 if it is not a member.");
  m.def("process_set_size", [](int id) { return engine().process_set(id)->ranks.size(); }, py::arg("id"));
  m.def("process_set_ids", [] { return engine().process_set_ids(); }, "Ids of the existing process sets (0: the world).");
  m.def("abort", [](const std::string& message, int code) { abort_job(message, code); }, py::arg("message"),
        py::arg("code") = 1, "Print `message` and abort every rank of the job (MPI_Abort).");
}
