"""PipeDream's driver: start every rank of a ``main_with_runtime.py`` job from one YAML file, and log it.

    python driver.py --config_file driver_configs/resnet50_single_machine.yml
    python -m pipedap.pipeline.driver --config_file ... [--log_directory DIR] [--timeout S]

The YAML keys are PipeDream's (``log_directory``, ``module``, ``data_dir``, ``config_file``,
``container``, ``machines``, ``batch_size``, ``learning_rate``, ...; :data:`KEYS` lists them
with their flags) plus a few of PipeDAP's (``num_minibatches``, ``image_size``, ``schedule``,
``testbed``, ...). ``machines`` has one ``host:device`` entry per rank, rank 0 first. The job runs

* on this machine when every host is local: one process per rank over gloo (PipeDream's
  per-rank command lines), or one ``mpirun`` for ``distributed_backend: mpi``/``nccl``;
* on emulated hosts (``testbed: {rate: 125mbit}``): one network namespace per host of
  ``machines`` with rate-limited links (``pipedap.tools.testbed``), ranks started by ``mpirun``;
* on other hosts: one ``mpirun --host`` (PipeDAP's engine; MPI must reach the hosts);
* inside ``container`` (an image) through ``docker run`` on this machine, when docker works.

Every run gets a folder ``log_directory/<YYYYmmdd-HHMMSS>/`` with ``settings.yml`` (the
settings and the command lines) and each rank's output (``output.log.<rank>``, or
``output.log`` of mpirun). When one rank fails, the driver ends the others and names it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROGRAM = Path(__file__).resolve().parents[2] / "main_with_runtime.py"


@dataclass(frozen=True)
class Key:
    """A driver key: its type, the flag of main_with_runtime.py it becomes, and whether it must be given."""

    kind: type | tuple[type, ...]
    flag: str | None = None
    required: bool = False
    help: str = ""


KEYS: dict[str, Key] = {
    "log_directory": Key(str, None, True, "where each run's folder goes"),
    "module": Key(str, "--module", True, "the stage package, e.g. models.resnet50.gpus=2"),
    "machines": Key(list, None, True, "one host:device per rank, rank 0 first"),
    "batch_size": Key(int, "--batch-size", True),
    "config_file": Key(str, "--config_path", False, "mp_conf.json, dp_conf.json or hybrid_conf.json"),
    "data_dir": Key(str, "--data_dir", False, "an image folder; none: synthetic images"),
    "container": Key(str, None, False, "a docker image to run every rank in"),
    "learning_rate": Key((int, float), "--lr"),
    "weight_decay": Key((int, float), "--weight-decay"),
    "epochs": Key(int, "--epochs"),
    "print_frequency": Key(int, "--print-freq"),
    "verbose_frequency": Key(int, "--verbose_frequency"),
    "learning_rate_policy": Key(str, "--lr_policy"),
    "distributed_backend": Key(str, "--distributed_backend", False, "gloo, mpi or nccl"),
    "model_type": Key(str, None, False, "image_classification (the only one)"),
    "compress_activations": Key(bool, None, False, "False (True is refused)"),
    "compress_in_gpu": Key(bool, None, False, "False (True is refused)"),
    "translation_model": Key(bool, None, False, "False (True is refused)"),
    # PipeDAP's
    "num_minibatches": Key(int, "--num_minibatches"),
    "image_size": Key(int, "--image-size"),
    "num_classes": Key(int, "--num-classes"),
    "workers": Key(int, "--workers", False, "data-loading processes"),
    "schedule": Key(str, "--schedule", False, "1f1b, no_pipelining or flush"),
    "micro_batches": Key(int, "--micro-batches"),
    "extra_in_flight": Key(int, "--extra-in-flight", False, "1f1b: minibatches admitted per later stage beyond PipeDream's count"),
    "dp_schedule": Key(str, "--dp-schedule", False, "wfbp, dear or pipedap"),
    "no_input_pipelining": Key(bool, "--no_input_pipelining"),
    "synthetic_data": Key(bool, "--synthetic_data"),
    "testbed": Key(dict, None, False, "emulated hosts: {rate: 125mbit, qdisc: tbf}"),
    "timeout": Key((int, float), None, False, "seconds before the driver ends the job (default 3600)"),
}
LOCAL_HOSTS = ("localhost", "127.0.0.1", socket.gethostname())
DEFAULT_TIMEOUT = 3600.0


class DriverConfigError(ValueError):
    """A driver YAML that cannot run, with the file, the line and the key."""


@dataclass
class Settings:
    """A checked driver config."""

    values: dict
    machines: list[tuple[str, int]]
    where: str
    lines: dict[str, int] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return len(self.machines)

    @property
    def hosts(self) -> list[str]:
        """The distinct hosts, in order of first appearance."""
        return list(dict.fromkeys(host for host, _ in self.machines))

    @property
    def ranks_per_host(self) -> dict[str, int]:
        return {host: sum(1 for h, _ in self.machines if h == host) for host in self.hosts}

    def flags(self) -> list[str]:
        """main_with_runtime.py's flags for these settings (rank and rendezvous flags come per launch)."""
        out = []
        for key, spec in KEYS.items():
            if spec.flag is None or key not in self.values:
                continue
            value = self.values[key]
            if isinstance(value, bool):
                out += [spec.flag] if value else []
            else:
                out += [spec.flag, str(value)]
        return out


def load(path: str | os.PathLike) -> Settings:
    """The driver config in ``path``, checked: every error names the file, the line and the key."""
    where = str(path)
    try:
        text = Path(path).read_text()
        root = yaml.compose(text)
    except (OSError, yaml.YAMLError) as err:
        raise DriverConfigError(f"{where}: cannot read the driver config: {err}") from None
    if not isinstance(root, yaml.MappingNode):
        raise DriverConfigError(f"{where}: expected keys like `module: models.resnet50.gpus=2`, one per line")
    lines = {key.value: key.start_mark.line + 1 for key, _ in root.value}
    values = yaml.safe_load(text)
    for key, line in lines.items():
        if key not in KEYS:
            raise DriverConfigError(f"{where}:{line}: unknown key {key!r}; the keys are {', '.join(KEYS)}")
    for key, spec in KEYS.items():
        if spec.required and key not in values:
            raise DriverConfigError(f"{where}: missing key {key!r} ({spec.help or spec.kind.__name__})")
    for key, value in values.items():
        kinds = KEYS[key].kind if isinstance(KEYS[key].kind, tuple) else (KEYS[key].kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise DriverConfigError(f"{where}:{lines[key]}: {key}: expected {' or '.join(k.__name__ for k in kinds)}"
                                    f", got {value!r}")
    _refuse(values, lines, where)
    machines = _machines(values["machines"], lines["machines"], root, where)
    return Settings(values, machines, where, lines)


def _refuse(values: dict, lines: dict, where: str) -> None:
    """What PipeDream's driver accepts and pipedap does not run, named with its line."""
    if values.get("model_type", "image_classification") != "image_classification":
        raise DriverConfigError(f"{where}:{lines['model_type']}: model_type {values['model_type']!r}: "
                                "main_with_runtime.py trains image classifiers only (image_classification)")
    for key, why in (("compress_activations", "the runtime sends activations at full precision; remove the key "
                                              "or set it to False"),
                     ("compress_in_gpu", "activations are not compressed; set it to False"),
                     ("translation_model", "only image classification runs; set it to False")):
        if values.get(key):
            raise DriverConfigError(f"{where}:{lines[key]}: {key}: True is not implemented: {why}")


def _machines(entries: list, line: int, root: yaml.MappingNode, where: str) -> list[tuple[str, int]]:
    """``host:device`` entries as (host, device); errors name the entry's line."""
    node = next(v for k, v in root.value if k.value == "machines")
    entry_lines = [n.start_mark.line + 1 for n in node.value] if isinstance(node, yaml.SequenceNode) else []
    if not entries:
        raise DriverConfigError(f"{where}:{line}: machines is empty; list one host:device per rank")
    seen: dict[str, int] = {}
    out = []
    for i, entry in enumerate(entries):
        at = entry_lines[i] if i < len(entry_lines) else line
        host, sep, device = str(entry).rpartition(":")
        if not sep or not host or not device.isdigit():
            raise DriverConfigError(f"{where}:{at}: machines entry {i} is {entry!r}; expected host:device, e.g. "
                                    "localhost:0")
        if entry in seen:
            raise DriverConfigError(f"{where}:{at}: machines: {entry!r} is listed twice (entries {seen[entry]} and "
                                    f"{i}); each rank needs its own host:device")
        seen[entry] = i
        out.append((host, int(device)))
    return out


# --- command lines -------------------------------------------------------------------------------------------


def is_local(settings: Settings) -> bool:
    return all(host in LOCAL_HOSTS for host in settings.hosts)


def mode(settings: Settings) -> str:
    """How the ranks start: ``testbed``, ``local`` (gloo: one process per rank), ``mpirun`` or ``hosts``."""
    if "testbed" in settings.values:
        return "testbed"
    backend = settings.values.get("distributed_backend", "gloo")
    if is_local(settings):
        return "local" if backend == "gloo" else "mpirun"
    if backend == "gloo":
        raise DriverConfigError(
            f"{settings.where}:{settings.lines['machines']}: machines on other hosts ({', '.join(settings.hosts)}) "
            "start through mpirun, which runs PipeDAP's engine: set distributed_backend: mpi (or nccl)")
    return "hosts"


def rank_command(settings: Settings, rank: int, port: int, program: Path = PROGRAM) -> list[str]:
    """One rank's command line for a local gloo launch: PipeDream's per-rank flags."""
    _, device = settings.machines[rank]
    return [sys.executable, str(program), *settings.flags(), "--rank", str(rank), "--local_rank", str(device),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def mpirun_command(settings: Settings, program: Path = PROGRAM) -> list[str]:
    """The mpirun line for local or remote hosts (``--host h1:n1,h2:n2``)."""
    from pipedap.tools.processes import mpirun_path

    counts = settings.ranks_per_host
    return [mpirun_path(), "-np", str(settings.world), "--host", ",".join(f"{h}:{n}" for h, n in counts.items()),
            "--oversubscribe", "--bind-to", "none", sys.executable, str(program), *settings.flags()]


def in_container(settings: Settings, command: list[str]) -> list[str]:
    """``command`` inside ``container``: docker run on the host network, the repository mounted where it is."""
    repo = str(PROGRAM.parent)
    return ["docker", "run", "--rm", "--net=host", "--ipc=host", "-v", f"{repo}:{repo}", "-w", repo,
            settings.values["container"], "python", *command[1:]]


def check_docker(settings: Settings) -> None:
    """DriverConfigError naming ``container`` unless docker can run containers here."""
    line = settings.lines["container"]
    if shutil.which("docker") is None:
        raise DriverConfigError(f"{settings.where}:{line}: container {settings.values['container']!r} needs docker, "
                                "which is not on this machine; remove the key to run without containers")
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["docker info failed"])[-1]
        raise DriverConfigError(f"{settings.where}:{line}: container {settings.values['container']!r}: docker cannot "
                                f"run containers here ({why}); start the docker daemon, or remove the key to run "
                                "without containers")


# --- running --------------------------------------------------------------------------------------------------


class Job:
    """The ranks' processes: their output to log files and, prefixed, to this terminal; ended together."""

    def __init__(self, folder: Path):
        self.folder, self.procs, self.names, self.threads = folder, [], [], []

    def start(self, command: list[str], log_name: str, label: str, env: dict | None = None) -> None:
        log = open(self.folder / log_name, "w")  # noqa: SIM115 (closed by the pump thread)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, bufsize=1)
        thread = threading.Thread(target=_pump, args=(proc, log, label), daemon=True)
        thread.start()
        self.procs.append(proc)
        self.names.append(label)
        self.threads.append(thread)

    def wait(self, timeout: float) -> int:
        """0 when every process ended well; else end the rest, name the first failure, and return its code."""
        deadline = time.monotonic() + timeout
        failed = None
        while failed is None and any(p.poll() is None for p in self.procs):
            if time.monotonic() > deadline:
                self.end()
                print(f"driver: the job ran past its timeout of {timeout:.0f} s; ended every rank", flush=True)
                return 124
            failed = next((i for i, p in enumerate(self.procs) if p.poll() not in (None, 0)), None)
            time.sleep(0.2)
        if failed is None:
            failed = next((i for i, p in enumerate(self.procs) if p.returncode != 0), None)
        if failed is not None:
            code = self.procs[failed].returncode
            self.end()
            print(f"driver: {self.names[failed]} failed (exit code {code}); ended the other ranks. Its output: "
                  f"{self.folder}", flush=True)
        for thread in self.threads:
            thread.join(timeout=10)
        return 0 if failed is None else (self.procs[failed].returncode or 1)

    def end(self) -> None:
        """SIGTERM to every process group still running, SIGKILL after 10 s."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _pump(proc: subprocess.Popen, log, label: str) -> None:
    with log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            print(f"[{label}] {line}", end="", flush=True)


def run(settings: Settings, *, log_directory: str | None = None, timeout: float | None = None,
        program: Path = PROGRAM) -> int:
    """Start the job, wait for it, return its exit code (0: every rank finished)."""
    how = mode(settings)
    if "container" in settings.values:
        if how != "local":
            raise DriverConfigError(f"{settings.where}:{settings.lines['container']}: container: ranks run in "
                                    "containers when they start on this machine over gloo; with mpirun "
                                    f"({how}), remove the key and install pipedap on the hosts")
        check_docker(settings)
    folder = Path(log_directory or settings.values["log_directory"]) / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    timeout = timeout or float(settings.values.get("timeout", DEFAULT_TIMEOUT))
    job = Job(folder)
    commands: list[str] = []
    testbed = None
    try:
        if how == "local":
            port = free_port()
            for rank in range(settings.world):
                command = rank_command(settings, rank, port, program)
                if "container" in settings.values:
                    command = in_container(settings, command)
                commands.append(shlex.join(command))
                job.start(command, f"output.log.{rank}", f"rank {rank}", env=_environment())
        else:
            env = dict(_environment(), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            if how == "testbed":
                command, env, testbed = _on_testbed(settings, program)
            else:
                command = mpirun_command(settings, program)
            commands.append(shlex.join(command))
            job.start(command, "output.log", "mpirun", env=env)
        _write_settings(folder, settings, how, commands)
        print(f"driver: {settings.world} rank(s) of {settings.values['module']} ({how}); logs in {folder}, "
              f"timeout {timeout:.0f} s", flush=True)
        code = job.wait(timeout)
    finally:
        job.end()
        if testbed is not None:
            testbed.stop()
    print(f"driver: {'finished' if code == 0 else f'failed (exit code {code})'}; logs in {folder}", flush=True)
    return code


def _on_testbed(settings: Settings, program: Path):
    """mpirun over one emulated host per distinct host of ``machines`` (ranks per host as listed)."""
    from pipedap.tools.testbed import Testbed

    options = dict(settings.values["testbed"])
    unknown = set(options) - {"rate", "qdisc", "burst", "latency"}
    if unknown:
        raise DriverConfigError(f"{settings.where}:{settings.lines['testbed']}: testbed: unknown key(s) "
                                f"{', '.join(sorted(unknown))}; it takes rate, qdisc, burst, latency")
    per_host = settings.ranks_per_host
    if len(set(per_host.values())) != 1:
        raise DriverConfigError(f"{settings.where}:{settings.lines['machines']}: the emulated hosts take the same "
                                f"number of ranks each; machines gives {per_host}")
    testbed = Testbed(hosts=len(per_host), slots=next(iter(per_host.values())), **options).start()
    print(f"driver: emulated cluster: {testbed.describe()}", flush=True)
    command = testbed.mpirun([sys.executable, str(program), *settings.flags()], np=settings.world)
    return command, testbed.env(), testbed


def _environment() -> dict:
    """This environment with the repository importable and unbuffered output, without a launcher's variables."""
    repo = str(PROGRAM.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_"))}
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path, settings: Settings, how: str, commands: list[str]) -> None:
    record = {"config_file": settings.where, "settings": settings.values, "launch": how, "commands": commands,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / "settings.yml").write_text(yaml.safe_dump(record, sort_keys=False))


def build_parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {k:<22}{'(required) ' if s.required else ''}{s.help or s.flag or ''}" for k, s in KEYS.items())
    parser = argparse.ArgumentParser(prog="driver.py", description=__doc__.split("\n\n")[0],
                                     epilog=f"driver config keys:\n{keys}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", required=True, help="the driver YAML (see driver_configs/)")
    parser.add_argument("--log_directory", help="override the config's log_directory")
    parser.add_argument("--timeout", type=float, help=f"seconds before every rank is ended (default: the config's "
                                                      f"timeout, else {DEFAULT_TIMEOUT:.0f})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load(args.config_file)
        return run(settings, log_directory=args.log_directory, timeout=args.timeout)
    except (DriverConfigError, RuntimeError, OSError) as err:  # RuntimeError: the testbed's TestbedError
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
