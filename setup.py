"""Build PipeDAP: the Python package and the comm_core extension (C++17, pybind11, MPI [+ NCCL]).

How MPI, CUDA and NCCL are found is described in comm_core/buildconfig.py.
"""

from __future__ import annotations

import os
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "comm_core"))
from buildconfig import CORE_SOURCES, find_mpicxx, log, mpi_flags, nccl_settings  # noqa: E402


def comm_core_extension() -> Pybind11Extension:
    mpicxx = find_mpicxx()
    compile_flags, link_flags = mpi_flags(mpicxx)
    log(f"MPI from {mpicxx}")
    nccl = nccl_settings()
    backend = "nccl_backend.cc" if nccl else "no_device_backend.cc"
    ext = Pybind11Extension(
        "pipedap._comm_core",
        sources=[os.path.join("comm_core", "src", s) for s in CORE_SOURCES + [backend]],
        cxx_std=17,
        extra_compile_args=compile_flags + ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        extra_link_args=link_flags,
    )
    for key, value in (nccl or {}).items():
        getattr(ext, key).extend(value)
    return ext


# compile the core's sources in parallel, one per core (PIPEDAP_BUILD_JOBS=N to choose): on the
# 2-core CI machines this halves each build, and the suite builds the core three times
ParallelCompile("PIPEDAP_BUILD_JOBS", default=0).install()


def requirements() -> list[str]:
    """Runtime requirements: loose (torch>=2.1), unlike requirements.txt which pins the CPU build."""
    return ["torch>=2.1", "numpy", "mpi4py>=3.1", "pybind11>=2.10", "tqdm", "matplotlib"]


setup(
    name="pipedap",
    version="0.1.0",
    description="Decoupled all-reduce scheduling (PipeDAP, DeAR, WFBP) for data-parallel PyTorch on MPI/NCCL",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pipedap", "pipedap.*", "models", "models.*"]),
    ext_modules=[comm_core_extension()],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=requirements(),
)
