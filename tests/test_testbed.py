"""Tests for the emulated cluster (pipedap.tools.testbed).

The unit tests run anywhere. The others create real network namespaces: they
are skipped, with the reason, where that is impossible (not root, no ip/tc, or
``ip netns add`` refused). Hosts are limited to 200 Mbit/s, far below what the
veth pair carries unshaped (about 2 Gb/s), so a broken rate limit fails the
rate test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipedap.tools.testbed import agent, network, tcpstream
from pipedap.tools.testbed.network import Shaping
from pipedap.tools.testbed.pin import core_for
from pipedap.tools.testbed.testbed import Testbed, temp_dirs

RATE = "200mbit"
NOMINAL_BPS = 200e6


# -- unit tests: no namespaces -------------------------------------------------------------------

@pytest.mark.parametrize("argv, host, command", [
    (["pdtb1h0", "prted", "--x", "1"], "pdtb1h0", "prted --x 1"),
    (["-x", "pdtb1h1", "PATH=/a:$PATH ; export PATH ; prted"], "pdtb1h1", "PATH=/a:$PATH ; export PATH ; prted"),
    (["-x", "-T", "-o", "StrictHostKeyChecking=no", "-p", "22", "h", "cmd", "-a"], "h", "cmd -a"),
])
def test_agent_parses_ssh_style_arguments(argv: list[str], host: str, command: str) -> None:
    assert agent.parse(argv) == (host, command)


@pytest.mark.parametrize("argv", [[], ["-x"], ["-x", "host-without-command"]])
def test_agent_rejects_missing_host_or_command(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="no (host|command)"):
        agent.parse(argv)


def test_agent_enters_namespace_with_its_own_hostname() -> None:
    assert agent.exec_args("pdtb7h1", "prted --a 'b c'") == [
        "ip", "netns", "exec", "pdtb7h1", "unshare", "--uts", "bash", "-c",
        "hostname pdtb7h1; prted --a 'b c'"]


def test_generated_agent_prints_usage_error_for_bad_arguments(tmp_path: Path) -> None:
    path = agent.write_agent(tmp_path)
    done = subprocess.run([str(path), "-x"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no host name" in done.stderr


def test_core_is_rank_mod_cores() -> None:
    assert [core_for(r, [3, 1]) for r in range(5)] == [1, 3, 1, 3, 1]


def test_shaping_commands() -> None:
    tbf = Shaping(rate="250mbit", burst="64kb", latency="20ms").tc_args("eth0")
    assert tbf == [["qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "250000000bit",
                    "burst", "64kb", "latency", "20ms"]]
    htb = Shaping(rate="1gbit", qdisc="htb").tc_args("v0")
    assert htb[1][-8:] == ["rate", "1000000000bit", "ceil", "1000000000bit", "burst", "256kb", "cburst", "256kb"]
    with pytest.raises(ValueError, match="netem"):
        Shaping(qdisc="netem")
    with pytest.raises(ValueError, match="bandwidth"):
        Shaping(rate="fast")


# -- with namespaces ------------------------------------------------------------------------------

_REASON = network.namespaces_unavailable(99)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"cannot create network namespaces: {_REASON}")


@pytest.fixture(scope="module")
def testbed():
    with Testbed(hosts=2, rate=RATE) as tb:
        yield tb


@needs_netns
def test_hostfile_lists_each_host_once(testbed: Testbed) -> None:
    run_id = os.getpid()
    assert testbed.hostfile.read_text() == f"pdtb{run_id}h0 slots=1\npdtb{run_id}h1 slots=1\n"
    namespaces, links = network.leftovers(run_id)
    assert sorted(namespaces) == testbed.names
    assert sorted(links) == [f"pdtb{run_id}br", f"pdtb{run_id}v0", f"pdtb{run_id}v1"]


ALLREDUCE_SCRIPT = textwrap.dedent("""
    import json, os, socket, time
    import torch
    import pipedap as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    small = hvd.allreduce(torch.arange(4, dtype=torch.float64) + rank, op=hvd.Sum)
    big = torch.ones(4 << 20)  # 16 MB
    hvd.allreduce(big, op=hvd.Sum)  # warm-up: connections, buffers
    start = time.perf_counter()
    out = hvd.allreduce(big, op=hvd.Sum)
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "rank": rank, "size": size, "host": socket.gethostname(), "small": small.tolist(),
        "big_ok": bool((out == size).all()), "link_bps": 2 * (size - 1) / size * big.numel() * 4 * 8 / seconds,
        "core": os.environ.get("PIPEDAP_TESTBED_CORE"), "affinity": sorted(os.sched_getaffinity(0))}), flush=True)
""")


@needs_netns
@pytest.mark.mpi
def test_mpirun_allreduce_on_two_hosts_is_correct_and_rate_limited(testbed: Testbed, tmp_path: Path) -> None:
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE_SCRIPT)
    done = subprocess.run(testbed.mpirun([sys.executable, str(script)], np=2), env=testbed.env(),
                          capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    results = sorted((json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], output
    for r in results:
        assert r["small"] == [sum(i + k for k in range(2)) for i in range(4)]  # [1, 3, 5, 7]
        assert r["big_ok"]
        assert r["link_bps"] < 1.5 * NOMINAL_BPS, f"rank {r['rank']}: {r['link_bps'] / 1e6:.0f} Mbit/s"
        assert r["affinity"] == [int(r["core"])] == [core_for(r["rank"], list(os.sched_getaffinity(0)))]
    assert [r["host"] for r in results] == testbed.names  # each rank on its own emulated host


@needs_netns
def test_tcp_stream_is_rate_limited(testbed: Testbed) -> None:
    (rate,) = tcpstream.measure([(testbed.names[0], testbed.names[1], testbed.address(1))], seconds=1.5)
    assert 0 < rate < 1.5 * NOMINAL_BPS, f"{rate / 1e6:.0f} Mbit/s through a {RATE} link"


CHILD_SCRIPT = textwrap.dedent("""
    import json, signal, sys, time
    # Ctrl-C as in a terminal: a test run started in the background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pipedap.tools.testbed import Testbed
    from pipedap.tools.testbed.network import leftovers

    with Testbed(hosts=2, rate="200mbit") as tb:
        namespaces, links = leftovers(tb.run_id)
        print(json.dumps({"run_id": tb.run_id, "namespaces": namespaces, "links": links,
                          "folder": str(tb.folder)}), flush=True)
        if sys.argv[1] == "raise":
            raise RuntimeError("body failed")
        if sys.argv[1] == "wait":
            time.sleep(60)
""")


@needs_netns
@pytest.mark.parametrize("ending", ["ok", "raise", "sigterm", "sigint"])
def test_teardown_removes_everything_the_run_created(ending: str, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), "wait" if ending.startswith("sig") else ending],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        up = json.loads(proc.stdout.readline() or "{}")
        if ending.startswith("sig"):
            proc.send_signal(signal.SIGTERM if ending == "sigterm" else signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert up, f"the child did not bring its testbed up: {stderr}"
    assert len(up["namespaces"]) == 2 and len(up["links"]) == 3, up
    assert (proc.returncode == 0) == (ending == "ok"), stderr
    assert network.leftovers(up["run_id"]) == ([], []), f"left behind after {ending}"
    assert not Path(up["folder"]).exists() and temp_dirs(up["run_id"]) == []
