"""Plain TCP streams between emulated hosts: the rate a link delivers without MPI in the way.

:func:`measure` starts a receiver on each destination host and a sender on each
source host (all at once, e.g. both directions of a link, as a ring exchange
uses it) and returns each stream's received rate. The receiver times from its
first byte to the sender's close, so connection setup is not counted.
The same module is the per-host program: ``python -m pipedap.tools.testbed.tcpstream
serve|send ...`` (run inside a namespace by :func:`measure`).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

CHUNK = 1 << 20


def serve(port: int, timeout: float) -> dict:
    """Accept one connection on ``port``, read until EOF; bytes and seconds from first byte to EOF."""
    with socket.create_server(("0.0.0.0", port)) as server:
        server.settimeout(timeout)
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            buffer = bytearray(CHUNK)
            received, first = 0, None
            while (n := conn.recv_into(buffer)) > 0:  # bounded: the sender stops, or recv times out
                first = first or time.perf_counter()
                received += n
            return {"bytes": received, "seconds": time.perf_counter() - first if first else 0.0}


def send(address: str, port: int, seconds: float, connect_timeout: float = 10) -> None:
    """Send to ``address:port`` for ``seconds``, then close."""
    conn = socket.create_connection((address, port), timeout=connect_timeout)
    with conn:
        conn.settimeout(seconds + 30)
        data = bytes(CHUNK)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            conn.sendall(data)


def measure(streams: list[tuple[str, str, str]], seconds: float = 2.0, port: int = 5201) -> list[float]:
    """Run the streams ``(source namespace, destination namespace, destination address)`` at once.

    Returns the achieved rate of each stream in bits per second.
    """
    python = [sys.executable, "-m", "pipedap.tools.testbed.tcpstream"]
    timeout = seconds + 30
    receivers = [subprocess.Popen(["ip", "netns", "exec", dst, *python, "serve", "--port", str(port),
                                   "--timeout", str(timeout)], stdout=subprocess.PIPE, text=True)
                 for _, dst, _ in streams]
    senders = []
    try:
        for receiver in receivers:  # wait until each listens (its first line), so no connect races
            if receiver.stdout.readline().strip() != "ready":
                raise RuntimeError("a tcpstream receiver did not start (see its stderr above)")
        senders = [subprocess.Popen(["ip", "netns", "exec", src, *python, "send", "--to", address,
                                     "--port", str(port), "--seconds", str(seconds)])
                   for src, _, address in streams]
        for sender in senders:
            if sender.wait(timeout=timeout) != 0:
                raise RuntimeError(f"tcpstream sender failed: {' '.join(map(str, sender.args))}")
        rates = []
        for receiver in receivers:
            out, _ = receiver.communicate(timeout=timeout)
            result = json.loads(out)
            rates.append(result["bytes"] * 8 / result["seconds"])
        return rates
    finally:
        for proc in receivers + senders:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipedap.tools.testbed.tcpstream", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("serve", help="receive one stream, print its bytes and seconds as JSON")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("send", help="send one stream for --seconds")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.role == "serve":
        print(json.dumps(serve(args.port, args.timeout)), flush=True)
    else:
        send(args.to, args.port, args.seconds)


if __name__ == "__main__":
    main()
