"""The "ssh" agent that mpirun uses to start its daemon on an emulated host.

mpirun (PRRTE) runs ``AGENT [-options] HOST COMMAND...`` as it would run ssh.
Instead of logging in to a remote machine, this enters HOST's network
namespace and a fresh UTS namespace whose hostname is HOST (namespaces share
the machine's hostname otherwise, and the launcher would take all hosts for
one)::

    ip netns exec HOST unshare --uts bash -c "hostname HOST; COMMAND"

:func:`write_agent` generates the executable into a run's temporary folder.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path


def parse(argv: list[str]) -> tuple[str, str]:
    """(host, command) from ssh-style arguments: leading ``-options`` skipped, then host, then command.

    ssh options that take a value (``-o Opt``, ``-p 22``, ...) are skipped with their value.
    """
    with_value = {"-o", "-p", "-l", "-i", "-F", "-E", "-c", "-m", "-b", "-J"}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in with_value else 1
    if i >= len(argv):
        raise ValueError(f"no host name in ssh agent arguments {argv!r}")
    host, rest = argv[i], argv[i + 1:]
    if not rest:
        raise ValueError(f"no command for host {host!r} in ssh agent arguments {argv!r}")
    return host, " ".join(rest)  # ssh joins its command words with spaces, for a shell to split


def exec_args(host: str, command: str) -> list[str]:
    """The command line that runs ``command`` on emulated host ``host``."""
    return ["ip", "netns", "exec", host, "unshare", "--uts", "bash", "-c",
            f"hostname {shlex.quote(host)}; {command}"]


def write_agent(folder: Path) -> Path:
    """Write an executable agent into ``folder`` (it runs this module with this Python); return its path."""
    path = folder / "ssh_agent"
    package_root = Path(__file__).resolve().parents[2]
    path.write_text("#!/bin/sh\n"
                    f"PYTHONPATH={shlex.quote(str(package_root))}${{PYTHONPATH:+:$PYTHONPATH}} "
                    f"exec {shlex.quote(sys.executable)} -m pipedap.tools.testbed.agent \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def main(argv: list[str]) -> None:
    try:
        host, command = parse(argv)
    except ValueError as err:
        sys.exit(f"pipedap.tools.testbed.agent: {err}")
    args = exec_args(host, command)
    os.execvp(args[0], args)


if __name__ == "__main__":
    main(sys.argv[1:])
