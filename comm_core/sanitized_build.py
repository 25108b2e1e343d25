"""A build of comm_core with AddressSanitizer and UBSan, for the safety tests.

    python comm_core/sanitized_build.py            # builds (cached) and prints how to run with it

The extension is compiled with -fsanitize=address,undefined into
build/sanitized/<hash>/pipedap/, beside links to the package's Python files, so
that putting that folder first on PYTHONPATH makes `import pipedap` load the
sanitized core. Python itself is not instrumented: the ASan runtime is
preloaded (LD_PRELOAD), which also makes every malloc/free in the process,
torch's included, checked for double and invalid frees. UB is fatal.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from buildconfig import CORE_SOURCES, find_mpicxx, mpi_flags  # noqa: E402

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
RUNTIME_OPTIONS = {
    # Python and torch keep memory until exit on purpose: leaks are not the question here.
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def _compiler_library(name: str) -> str:
    path = subprocess.check_output(["g++", f"-print-file-name={name}"], text=True).strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"the sanitizer runtime {name} was not found (g++ -print-file-name): install gcc's "
                           "libasan/libubsan (Debian: apt-get install libasan8 libubsan1)")
    return path


def build(root: Path = REPO / "build" / "sanitized") -> Path:
    """Builds (or reuses) the sanitized package; returns the folder to put first on PYTHONPATH."""
    import pybind11

    sources = [HERE / "src" / s for s in CORE_SOURCES + ["no_device_backend.cc"]]
    mpicxx = find_mpicxx()
    compile_flags, link_flags = mpi_flags(mpicxx)
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-Wall", *SANITIZE, *compile_flags,
             f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    digest = hashlib.sha256(" ".join(flags + link_flags).encode())
    for header in sorted((HERE / "src").glob("*")):
        digest.update(header.read_bytes())
    folder = root / digest.hexdigest()[:16]
    package = folder / "pipedap"
    extension = package / ("_comm_core" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not extension.exists():
        for stale in root.glob("*"):  # builds of older sources
            shutil.rmtree(stale, ignore_errors=True)
        objects = folder / "obj"
        objects.mkdir(parents=True, exist_ok=True)

        def compile_one(source: Path) -> Path:
            target = objects / (source.stem + ".o")
            subprocess.run(["g++", *flags, "-c", str(source), "-o", str(target)], check=True)
            return target

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            built = list(pool.map(compile_one, sources))
        package.mkdir(exist_ok=True)
        subprocess.run(["g++", "-shared", *SANITIZE, *map(str, built), *link_flags, "-o", str(extension)], check=True)
    for entry in (REPO / "pipedap").iterdir():  # the Python side is the working tree's own
        link = package / entry.name
        if not entry.name.startswith("_comm_core") and entry.name != "__pycache__" and not link.is_symlink():
            link.symlink_to(entry)
    return folder


def environment(folder: Path) -> dict:
    """Variables that run Python with the sanitized core (merge into os.environ)."""
    preload = ":".join(_compiler_library(n) for n in ("libasan.so", "libubsan.so"))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"LD_PRELOAD": preload, "PYTHONPATH": path, **RUNTIME_OPTIONS}


if __name__ == "__main__":
    built = build()
    print(" ".join(f"{k}={v}" for k, v in environment(built).items()) + " mpirun -np 2 python ...")
