"""Every command a user runs answers ``--help`` (argparse's help strings are %-formatted: a bare
'%' in one made ``python -m pipedap.tools.plan --help`` crash)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                  for p in [*(ROOT / "pipedap" / "tools").glob("*.py"), *(ROOT / "pipedap").glob("*.py")]
                  if 'if __name__ == "__main__"' in p.read_text())


def test_the_commands_are_found():
    assert {"pipedap.tools.plan", "pipedap.tools.compare_report", "pipedap.tools.bench"} <= set(COMMANDS)


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout.lower() and "Traceback" not in done.stderr, (done.stdout[:500], done.stderr[-500:])
