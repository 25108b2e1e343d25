"""The emulated network: a bridge, one namespace per host, veth pairs, and tc rate limits.

Everything here is a thin, checked wrapper around ``ip`` and ``tc``; every name
this module creates starts with :data:`PREFIX` followed by the run id, so
:func:`teardown` can find a run's objects again, also after a crash.

Naming (interface names have at most 15 characters, hence the short forms):
``pdtb<run>br`` the bridge, ``pdtb<run>h<k>`` host k's namespace (and hostname),
``pdtb<run>v<k>`` the bridge side of host k's veth pair (``eth0`` inside the host).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

from pipedap.units import format_duration, parse_duration, parse_rate_bps

PREFIX = "pdtb"
NETWORK = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
_NAME = re.compile(rf"^{PREFIX}(\d+)(br|h\d+|v\d+)$")
_COMMAND_TIMEOUT_S = 30


class TestbedError(RuntimeError):
    """A testbed operation failed; the message names the command, its output and a fix."""

    __test__ = False  # not a pytest test class despite the name


def run(args: list[str], fix: str = "", timeout: float = _COMMAND_TIMEOUT_S) -> str:
    """Run a command, return its stdout; raise TestbedError with its stderr and ``fix`` on failure."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TestbedError(f"{args[0]} not found: apt-get install iproute2 (needs `ip` and `tc`)") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{' '.join(args)}` did not finish in {timeout} s") from None
    if done.returncode != 0:
        hint = f"\nfix: {fix}" if fix else ""
        raise TestbedError(f"`{' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}{hint}")
    return done.stdout


def check_prerequisites() -> None:
    """Raise TestbedError unless namespaces can be created here (root, iproute2)."""
    if os.geteuid() != 0:
        raise TestbedError("network namespaces need root: run as root (or with sudo)")
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            raise TestbedError(f"`{tool}` not found: apt-get update && apt-get install iproute2 util-linux")


def namespaces_unavailable(probe_index: int = 99) -> str | None:
    """Why network namespaces cannot be created here (not root, no ip/tc, ...), or None when they can.

    ``probe_index`` keeps concurrent probes of one process apart.
    """
    probe = host_name(os.getpid(), probe_index)
    try:
        check_prerequisites()
        run(["ip", "netns", "add", probe])
        run(["ip", "netns", "del", probe])
    except TestbedError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class Shaping:
    """A host link's rate limit, applied to egress on both ends of its veth pair.

    ``qdisc`` is ``tbf`` (token bucket) or ``htb`` (one class); ``netem`` is not
    available in this kernel, so latency comes from queueing only: ``latency`` is
    the longest a packet may wait in the tbf queue (its limit), the emulated buffer.
    """

    rate: str = "500mbit"
    qdisc: str = "tbf"
    burst: str = "256kb"
    latency: str = "20ms"

    def __post_init__(self) -> None:
        parse_rate_bps(self.rate), parse_duration(self.latency)  # ValueError naming the bad value
        if self.qdisc not in ("tbf", "htb"):
            raise ValueError(f"unknown qdisc {self.qdisc!r}: use tbf or htb (netem is not in this kernel)")

    @property
    def rate_bps(self) -> float:
        """The nominal rate in bits per second."""
        return parse_rate_bps(self.rate)

    def tc_args(self, dev: str) -> list[list[str]]:
        """The ``tc`` commands (without ``tc``) that install this shaping on ``dev``."""
        rate = f"{int(self.rate_bps)}bit"
        if self.qdisc == "tbf":
            return [["qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", self.burst,
                     "latency", format_duration(parse_duration(self.latency))]]
        return [["qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
                ["class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                 "rate", rate, "ceil", rate, "burst", self.burst, "cburst", self.burst]]

    def describe(self) -> str:
        extra = f" latency {self.latency}" if self.qdisc == "tbf" else ""
        return f"{self.qdisc} rate {self.rate} burst {self.burst}{extra}"


def bridge_name(run_id: int) -> str:
    return f"{PREFIX}{run_id}br"


def host_name(run_id: int, k: int) -> str:
    return f"{PREFIX}{run_id}h{k}"


def veth_name(run_id: int, k: int) -> str:
    return f"{PREFIX}{run_id}v{k}"


def free_subnet(first: int = 0) -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no interface on this machine uses yet (one per run).

    The search starts at the ``first``-th /24 (mod 512): runs started at the same
    moment with different ids then rarely pick the same one.
    """
    used = set()
    for line in run(["ip", "-o", "-4", "addr", "show"]).splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            used.add(ipaddress.ip_interface(match.group(1)).network)
    subnets = list(NETWORK.subnets(new_prefix=24))
    start = first % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise TestbedError(f"every /24 of {NETWORK} is in use: remove stale testbeds with "
                       "`python -m pipedap.tools.testbed down`")


def create(run_id: int, hosts: int, subnet: ipaddress.IPv4Network, shaping: Shaping) -> None:
    """Create the bridge (address .254) and ``hosts`` namespaces (addresses .1, .2, ...), shaped."""
    addresses = list(subnet.hosts())
    bridge = bridge_name(run_id)
    run(["ip", "link", "add", bridge, "type", "bridge"], fix="is the bridge kernel module available?")
    run(["ip", "addr", "add", f"{addresses[-1]}/{subnet.prefixlen}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])
    for k in range(hosts):
        host, veth = host_name(run_id, k), veth_name(run_id, k)
        run(["ip", "netns", "add", host], fix="network namespaces need root and a kernel with CONFIG_NET_NS")
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host])
        run(["ip", "link", "set", veth, "master", bridge, "up"])
        run(["ip", "-n", host, "addr", "add", f"{addresses[k]}/{subnet.prefixlen}", "dev", "eth0"])
        run(["ip", "-n", host, "link", "set", "eth0", "up"])
        run(["ip", "-n", host, "link", "set", "lo", "up"])
        shape(run_id, k, shaping)


def shape(run_id: int, k: int, shaping: Shaping) -> None:
    """(Re)install host k's rate limit: egress of its eth0 (sending) and of its bridge port (receiving)."""
    fix = "tbf and htb need the sch_tbf / sch_htb kernel modules"
    for args in shaping.tc_args("eth0"):
        run(["ip", "netns", "exec", host_name(run_id, k), "tc", *args], fix=fix)
    for args in shaping.tc_args(veth_name(run_id, k)):
        run(["tc", *args], fix=fix)


def leftovers(run_id: int | None = None) -> tuple[list[str], list[str]]:
    """The namespaces and links that testbeds created (only run ``run_id``'s if given)."""
    def ours(name: str) -> bool:
        match = _NAME.match(name)
        return bool(match) and (run_id is None or int(match.group(1)) == run_id)

    namespaces = [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]
    links = [re.split(r"[:@]", line.split(": ", 1)[1])[0]
             for line in run(["ip", "-o", "link", "show"]).splitlines()]
    return [n for n in namespaces if ours(n)], [link for link in links if ours(link)]


def kill_processes_in(namespace: str) -> list[int]:
    """SIGKILL what still runs in ``namespace`` (an MPI daemon that lost its link outlives its job,
    and deleting the namespace's name would leave it running); the pids it killed."""
    try:
        pids = [int(pid) for pid in run(["ip", "netns", "pids", namespace]).split()]
    except TestbedError:  # gone meanwhile
        return []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def teardown(run_id: int | None = None) -> list[str]:
    """Delete the links and namespaces of run ``run_id`` (of every run if None); return what was removed.

    Links go first: deleting a bridge port deletes its peer inside the namespace
    at once (deleting the namespace first would remove the pair only later).
    Objects that vanish meanwhile (another teardown of the same run) are not errors,
    so this is idempotent and safe to call concurrently.
    """
    removed = []
    namespaces, links = leftovers(run_id)
    for name in namespaces:
        kill_processes_in(name)
    bridge_ports_first = sorted(links, key=lambda name: name.endswith("br"))
    for kind, name in [("link", n) for n in bridge_ports_first] + [("netns", n) for n in namespaces]:
        try:
            run(["ip", kind, "del", name])
        except TestbedError:
            still_there = leftovers(run_id)[1 if kind == "link" else 0]
            if name in still_there:
                raise
        removed.append(name)
    return removed
