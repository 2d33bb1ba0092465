"""Starting the processes of a distributed command: one node or several, with or without SLURM.

``mmfm train|sample --nproc P [--nnodes M ...]`` runs this module's launcher instead of the command:

- **One node** (``M = 1``): this process becomes torch's elastic agent (what ``torchrun --standalone``
  runs) and starts ``P`` workers, each the same ``mmfm`` command line with ``RANK`` / ``LOCAL_RANK`` /
  ``WORLD_SIZE`` set.
- **Several nodes**: one agent per node, meeting at a rendezvous, as torchrun's flags do:
  ``--rdzv-endpoint HOST:PORT`` (required) with ``--node-rank R`` uses the static rendezvous (the node
  of rank 0 hosts it at the endpoint); without ``--node-rank`` the c10d rendezvous assigns the node
  ranks (the agent whose host is the endpoint's hosts it), under ``--rdzv-id`` (the same on every
  node). Agents that do not all arrive within ``--rdzv-timeout`` seconds stop with an error that names
  the endpoint; nothing has been written by then.
- **Inside a SLURM allocation** (``--srun``): one agent per node is started with
  ``srun --ntasks=M`` (c10d rendezvous at this host, the batch host, the allocation's first node;
  id = the job id), and this process waits for srun.

**Stop signals.** The agent handles SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1: it forwards the signal
to every worker (each runs in its own session, so only the agent reaches them), waits up to
``stop_timeout`` seconds while they finish their step and rank 0 writes the checkpoint, then kills
what is left, and the command exits with ``128 + signum``. Workers also ask the kernel for SIGTERM if
their agent dies (even of SIGKILL), so no worker trains on without one. With ``--srun`` the signal is
passed to srun, which passes it to the agents.

**Threads.** Each worker gets ``threads // P`` CPU threads (:func:`mmfm.devices.thread_env`), where
``threads`` is ``--threads`` or, by default, the ``OMP_NUM_THREADS`` Snakemake sets to the rule's threads.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass

from mmfm.devices import check_nproc, thread_env

#: Signals the agent forwards to its workers (then exits 128 + signum).
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
#: What the launcher sets in a worker's environment so it knows it was started by us.
WORKER_ENV = "MMFM_WORKER"


class LaunchError(ValueError):
    """A launch setting is wrong or the nodes did not meet; the message names the setting."""


@dataclass(frozen=True)
class Launch:
    """How many processes, on how many nodes, meeting where.

    ``nproc``: processes on each node (one per GPU). ``nnodes``: nodes (one agent each). ``node_rank``:
    this node's rank for the static rendezvous (``None``: c10d assigns it). ``rdzv_endpoint``:
    ``HOST:PORT`` where the nodes meet. ``rdzv_id``: the run's rendezvous id (c10d). ``rdzv_timeout``:
    seconds for all nodes to arrive. ``stop_timeout``: seconds the agent waits for workers after a stop
    signal. ``threads``: CPU threads of this node's job (split over the ``nproc`` processes). ``srun``:
    start the ``nnodes`` agents with srun inside this SLURM allocation.
    """

    nproc: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_timeout: int = 600
    stop_timeout: int = 3600
    threads: int | None = None
    srun: bool = False

    def __post_init__(self):
        for key, value, low in (("--nproc", self.nproc, 1), ("--nnodes", self.nnodes, 1),
                                ("--rdzv-timeout", self.rdzv_timeout, 1), ("--stop-timeout", self.stop_timeout, 1)):
            if not (isinstance(value, int) and value >= low):
                raise LaunchError(f"{key}: expected an integer >= {low}, got {value!r}")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise LaunchError(f"--threads: expected a positive integer, got {self.threads!r}")
        if self.node_rank is not None and not (isinstance(self.node_rank, int) and 0 <= self.node_rank < self.nnodes):
            raise LaunchError(f"--node-rank {self.node_rank}: out of range for --nnodes {self.nnodes} "
                              f"(expected 0 .. {self.nnodes - 1})")
        if self.nnodes > 1 and not self.srun:
            if not self.rdzv_endpoint:
                raise LaunchError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (where the nodes "
                                  "meet: the first node's address and a free port), or --srun inside a SLURM "
                                  "allocation")
            endpoint(self.rdzv_endpoint)
        if self.srun and self.nnodes > 1 and not os.environ.get("SLURM_JOB_ID"):
            raise LaunchError("--srun: not inside a SLURM allocation (no SLURM_JOB_ID); run it in an sbatch "
                              "script or salloc, or give --rdzv-endpoint on each node instead")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def endpoint(value: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (checked)."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--rdzv-endpoint: expected HOST:PORT with a port in 1..65535, got {value!r}")
    return host.strip("[]"), int(port)


def is_worker() -> bool:
    """Whether this process is a worker started by a launcher (torchrun's or ours)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port that is free on this host now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run(spec: Launch, argv: list[str], env: dict[str, str] | None = None, gpus: bool = False) -> int:
    """Run ``python -m mmfm.cli *argv`` as ``spec`` says; returns the command's exit code.

    ``env``: more variables for the workers (e.g. the run-folder lock of the launcher); ``gpus``: the
    command runs on CUDA (srun then asks each node's GPUs for its step)."""
    if spec.srun and spec.nnodes > 1:
        return _srun_agents(spec, argv, gpus)
    return _agent(spec, argv, env or {})


def _agent(spec: Launch, argv: list[str], env: dict[str, str]) -> int:
    """This node's elastic agent: ``spec.nproc`` workers, the rendezvous, the stop signals."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if spec.nnodes == 1:
        backend, where, run_id, configs = "c10d", "localhost:0", uuid.uuid4().hex, {}
    elif spec.node_rank is not None:
        backend, where, run_id = "static", spec.rdzv_endpoint, spec.rdzv_id or "mmfm"
        configs = {"rank": spec.node_rank}
    else:
        backend, where, run_id = "c10d", spec.rdzv_endpoint, spec.rdzv_id or "mmfm"
        configs = {"join_timeout": spec.rdzv_timeout, "read_timeout": spec.rdzv_timeout}
    config = LaunchConfig(min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=spec.nproc, run_id=run_id,
                          rdzv_endpoint=where, rdzv_backend=backend, rdzv_configs=configs,
                          rdzv_timeout=spec.rdzv_timeout, max_restarts=0, monitor_interval=0.2,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(), signals_to_handle=",".join(FORWARDED),
                          shutdown_timeout=spec.stop_timeout)
    workers = {**thread_env(spec.threads, spec.nproc), **env, WORKER_ENV: str(os.getpid())}
    try:
        with _worker_environment(workers), _restored_handlers():
            elastic_launch(config, entrypoint=sys.executable)("-m", "mmfm.cli", *argv)
    except SignalException as stop:
        print(f"mmfm: {signal.Signals(stop.sigval).name} received: the workers were told and have stopped",
              file=sys.stderr)
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        rank, first = failed.get_first_failure()
        code = first.exitcode
        print(f"mmfm: rank {rank} (PID {first.pid}) exited with {code}"
              + (f" (killed by {signal.Signals(-code).name})" if code < 0 else ""), file=sys.stderr)
        return 128 - code if code < 0 else code
    except (RendezvousError, DistError, TimeoutError, ConnectionError) as err:  # the agents did not meet
        if spec.nnodes == 1:
            raise
        what = "static" if spec.node_rank is not None else f"c10d, id {run_id!r}"
        raise LaunchError(f"--rdzv-endpoint {spec.rdzv_endpoint}: the {spec.nnodes} nodes did not meet within "
                          f"--rdzv-timeout {spec.rdzv_timeout} s ({what} rendezvous: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}); check that "
                          "every node runs the same command with the same endpoint and that the first node's "
                          "port is reachable") from None
    return 0


@contextlib.contextmanager
def _worker_environment(variables: dict[str, str]):
    """``variables`` in ``os.environ`` while the agent starts the workers (they copy it), restored after."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _restored_handlers():
    """The agent installs its own signal handlers and leaves them; put back what was there."""
    saved = {s: signal.getsignal(getattr(signal, s)) for s in FORWARDED}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(getattr(signal, s), h)


def srun_command(spec: Launch, argv: list[str], gpus: bool, host: str | None = None,
                 port: int | None = None) -> list[str]:
    """The srun line that starts one agent per node of this allocation: the same command with
    ``--rdzv-endpoint THIS_HOST:PORT --rdzv-id mmfm-$SLURM_JOB_ID`` and without ``--srun``.

    srun is given the task count, each agent's CPUs (``--threads``) and, when the command runs on CUDA,
    ``--gres=gpu:NPROC`` per node: a step inside a Snakemake job does not see the allocation's
    ``SLURM_*`` settings (the executor removes them), so everything it needs is said on its line. The
    agents spread over the allocation's nodes because each takes all the CPUs one node was given."""
    host = host or socket.gethostname()
    port = port or free_port()
    job = os.environ.get("SLURM_JOB_ID", "local")
    cmd = ["srun", f"--ntasks={spec.nnodes}", "--kill-on-bad-exit=1", f"--job-name=mmfm-agents-{job}"]
    if spec.threads:
        cmd.append(f"--cpus-per-task={spec.threads}")
    if gpus:
        cmd.append(f"--gres=gpu:{spec.nproc}")
    agent = [a for a in argv if a != "--srun"]
    agent += ["--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", f"mmfm-{job}"]
    return cmd + [sys.executable, "-m", "mmfm.cli", *agent]


def _srun_agents(spec: Launch, argv: list[str], gpus: bool) -> int:
    """Start the agents with srun and wait; a stop signal to this process is passed on to srun."""
    cmd = srun_command(spec, argv, gpus)
    print("mmfm: " + shlex.join(cmd), file=sys.stderr, flush=True)
    try:
        proc = subprocess.Popen(cmd)
    except FileNotFoundError:
        raise LaunchError("--srun: no srun on PATH; is this a SLURM node?") from None
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(getattr(signal, s), forward) for s in FORWARDED}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(getattr(signal, s), h)
    if received:
        return 128 + received[0]
    return 128 - code if code < 0 else code


def check_devices(spec: Launch, device_type: str) -> None:
    """Refuse more CUDA processes on this node than it has devices (before any worker starts); with
    ``--srun`` each agent checks its own node."""
    if not (spec.srun and spec.nnodes > 1):
        check_nproc(spec.nproc, device_type)
