"""``Testbed``: N emulated hosts on this machine, with a hostfile and the mpirun flags to use them.

::

    with Testbed(hosts=2, rate="500mbit") as tb:
        subprocess.run(tb.mpirun(["python", "train.py"]), env=tb.env(), check=True)

Setup follows ``docs/testbed.md``: a bridge with a /24 of
198.18.0.0/15 (a free one per run, so parallel runs do not clash), one network
namespace per host, rate limits with tbf or htb, and an "ssh" agent that starts
mpirun's daemons inside the namespaces. Everything is torn down on exit, on an
exception, on SIGINT/SIGTERM/SIGHUP and at interpreter exit.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipedap.tools.processes import mpirun_path, signals_as_exceptions
from pipedap.tools.testbed import agent, network
from pipedap.tools.testbed.network import Shaping, TestbedError
from pipedap.tools.testbed.pin import core_for


def temp_dirs(run_id: int | None = None) -> list[Path]:
    """The temporary folders of run ``run_id`` (of every run if None)."""
    pattern = f"{network.PREFIX}{run_id if run_id is not None else ''}*-*"
    return [p for p in Path(tempfile.gettempdir()).glob(pattern)
            if p.is_dir() and (run_id is None or p.name.split("-")[0] == f"{network.PREFIX}{run_id}")]


def teardown(run_id: int | None = None) -> list[str]:
    """Remove the namespaces, links and temporary folders of run ``run_id`` (every run if None)."""
    folders = temp_dirs(run_id)
    try:
        removed = network.teardown(run_id)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return removed + [str(folder) for folder in folders]


class Testbed:
    """``hosts`` emulated hosts, each with one rank slot per ``slots``, linked at ``rate``.

    ``run_id`` names everything this testbed creates (default: this process id).
    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, hosts: int = 2, rate: str = "500mbit", *, slots: int = 1, qdisc: str = "tbf",
                 burst: str = "256kb", latency: str = "20ms", run_id: int | None = None):
        if not 1 <= hosts <= 253:
            raise ValueError(f"hosts={hosts}: a testbed has 1 to 253 hosts (one /24)")
        self.hosts = hosts
        self.slots = slots
        self.shaping = Shaping(rate=rate, qdisc=qdisc, burst=burst, latency=latency)
        self.run_id = os.getpid() if run_id is None else run_id
        self.names = [network.host_name(self.run_id, k) for k in range(hosts)]
        self.subnet: ipaddress.IPv4Network | None = None  # set by start(), like the paths below
        self.folder: Path | None = None
        self.agent: Path | None = None
        self.hostfile: Path | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Testbed:
        """Create the hosts (after removing leftovers of an earlier run with this id); idempotent."""
        network.check_prerequisites()
        teardown(self.run_id)
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=f"{network.PREFIX}{self.run_id}-"))
            self.subnet = network.free_subnet(first=self.run_id)
            network.create(self.run_id, self.hosts, self.subnet, self.shaping)
            self.agent = agent.write_agent(self.folder)
            self.hostfile = self.folder / "hostfile"
            self.hostfile.write_text("".join(f"{name} slots={self.slots}\n" for name in self.names))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[str]:
        """Remove everything this testbed created; safe to call more than once."""
        return teardown(self.run_id)

    def __enter__(self) -> Testbed:
        self._signals = signals_as_exceptions()
        self._signals.__enter__()
        atexit.register(self.stop)
        try:
            return self.start()
        except BaseException:
            self._signals.__exit__(None, None, None)
            atexit.unregister(self.stop)
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            atexit.unregister(self.stop)
            self._signals.__exit__(None, None, None)

    def reshape(self, shaping: Shaping) -> None:
        """Replace every host's rate limit (calibration tries several without rebuilding)."""
        for k in range(self.hosts):
            network.shape(self.run_id, k, shaping)
        self.shaping = shaping

    # -- using the hosts -----------------------------------------------------------------------

    def address(self, k: int) -> str:
        """Host k's IP address."""
        return str(list(self._started_subnet().hosts())[k])

    def mpirun_args(self, np: int | None = None) -> list[str]:
        """mpirun's flags (not mpirun itself) for ``np`` ranks (default: every slot) on these hosts."""
        subnet = str(self._started_subnet())
        return ["-np", str(np or self.hosts * self.slots), "--hostfile", str(self.hostfile),
                "--prtemca", "plm_ssh_agent", str(self.agent),
                "--prtemca", "oob_tcp_if_include", subnet,
                "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", subnet,
                "--bind-to", "none"]

    @staticmethod
    def pin_prefix() -> list[str]:
        """The wrapper that pins each rank to core ``rank mod cores`` before it runs the command."""
        return [sys.executable, "-m", "pipedap.tools.testbed.pin", "--"]

    def mpirun(self, command: list[str], np: int | None = None) -> list[str]:
        """The full command line: mpirun, its flags, the pinning wrapper, ``command``."""
        return [mpirun_path(), *self.mpirun_args(np), *self.pin_prefix(), *command]

    def env(self) -> dict[str, str]:
        """The environment for mpirun: this one, plus root permission and mpirun's folder first on PATH.

        The agent passes the environment into the namespaces, so the daemons find
        ``prted`` and the ranks find the same Python packages.
        """
        bin_dir = str(Path(mpirun_path()).parent)
        return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")

    def affinity(self) -> dict[int, int]:
        """rank -> the core the pinning wrapper gives it (a rank pins on its host, all on this machine)."""
        cores = list(os.sched_getaffinity(0))
        return {rank: core_for(rank, cores) for rank in range(self.hosts * self.slots)}

    def describe(self) -> str:
        """One line: hosts, addresses, shaping."""
        return (f"{self.hosts} hosts {', '.join(self.names)} on {self._started_subnet()}, "
                f"{self.shaping.describe()} each way, ranks pinned to cores "
                f"{self.affinity()} (rank: core)")

    def _started_subnet(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise TestbedError("the testbed is not up: use `with Testbed(...) as tb:` or call start()")
        return self.subnet


