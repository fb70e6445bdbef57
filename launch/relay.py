"""The per-node agent wrapper: torchrun under a process that takes the job's signals and relays them.

    python -m launch.relay --nnodes N --nproc-per-node P [--rdzv-endpoint HOST:PORT --rdzv-id ID] \\
        -- CONFIG [key=value ...]
    python -m launch.relay --pick-port JOB_ID      # prints a free rendezvous port for this job

launch/slurm.sh starts this as the srun task on every node (one per node). Standard library only: it starts
in milliseconds, so its handlers are in place before Slurm can signal it.

Why a relay: Slurm signals a job step differently by process tracking. Under `proctrack/linuxproc`, a signal
for the step (srun's forwarding, the time limit's SIGTERM) goes to every process descended from the task,
the trainers included; under `proctrack/cgroup` (most sites) it goes only to the task itself, the direct
child of slurmstepd, so torchrun's workers would never see it. This process is that task: on SIGUSR1 or
SIGTERM it sends the same signal to the trainer workers (torchrun's children), each request once per worker,
and keeps doing so for later signals. A worker that is still starting (Python and torch imports, before
`pretrain.train` has installed its handler) is not signalled yet: its request stays pending until the worker
catches the signal (read from /proc/PID/status, SigCgt), so a preemption during start-up is not lost.

torchrun itself runs with SIGUSR1, SIGUSR2 and SIGTERM ignored and without its own SIGTERM handler
(`--signals-to-handle`, TORCHELASTIC_SIGNALS_TO_HANDLE: SIGINT, SIGHUP, SIGQUIT only): its handler would
SIGTERM the workers and SIGKILL them 30 s later, whatever the site's grace time. Under linuxproc a worker
can get a signal twice (from Slurm and from here) within milliseconds; the trainer counts one request.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

RELAYED = (signal.SIGUSR1, signal.SIGTERM)
IGNORED_IN_TORCHRUN = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
# Set on every node unless already in the environment (docs/DISTRIBUTED.md, "NCCL settings").
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
# Rendezvous ports: below Linux's default ephemeral range (32768-60999), above the common services.
PORT_BASE, PORT_SPAN = 20000, 12000
POLL_S = 0.1


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's workers), read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses; fields after the last ')' are fixed
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (the SigCgt mask of /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


class WorkerSignals:
    """Signal requests for the workers of agent `agent_pid`: each delivered once to each worker, in order,
    as soon as the worker has a handler for it (a starting worker keeps its requests pending)."""

    def __init__(self, agent_pid: int, say=None) -> None:
        self.agent_pid = agent_pid
        self.requests: list[int] = []
        self.delivered: dict[int, int] = {}
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))

    def request(self, sig: int) -> None:
        self.requests.append(sig)

    def deliver(self) -> int:
        """Send what is pending and deliverable now; returns how many workers were signalled."""
        sent = 0
        for pid in child_pids(self.agent_pid):
            done = self.delivered.get(pid, 0)
            while done < len(self.requests) and catches(pid, self.requests[done]):
                try:
                    os.kill(pid, self.requests[done])
                except ProcessLookupError:
                    break
                self.say(f"relay: {signal.Signals(self.requests[done]).name} -> trainer pid {pid}")
                done += 1
                sent += 1
            self.delivered[pid] = done
        return sent


def ignore_checkpoint_signals() -> None:
    """preexec_fn for torchrun: the signals meant for the trainers must not kill (or reach) the agent."""
    for sig in IGNORED_IN_TORCHRUN:
        signal.signal(sig, signal.SIG_IGN)


def local_route(address: str) -> tuple[str, str] | None:
    """(interface name, this machine's address on it) of the route to `address`; no packet is sent."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(address), 9))
            local = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(
                        s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15])
                    )  # SIOCGIFADDR
                except OSError:
                    continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name, local
    except OSError:
        return None
    return None


def agent_env(rdzv_host: str | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """torchrun's environment: NCCL defaults, torchrun without its SIGTERM handler and, for several nodes,
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = the interface that reaches the rendezvous host (gloo would
    otherwise use the address the hostname resolves to: 127.0.1.1 in Debian's /etc/hosts). Values already
    in the environment win."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key, value in NCCL_DEFAULTS.items():
        env.setdefault(key, value)
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    env["PET_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    if rdzv_host is not None and not (env.get("GLOO_SOCKET_IFNAME") and env.get("NCCL_SOCKET_IFNAME")):
        route = local_route(rdzv_host)
        if route is not None:
            env.setdefault("GLOO_SOCKET_IFNAME", route[0])
            env.setdefault("NCCL_SOCKET_IFNAME", route[0])
    return env


def torchrun_argv(
    python: str,
    config: str,
    overrides: list[str],
    nnodes: int,
    nproc_per_node: int,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "based",
    is_host: bool | None = None,
    local_addr: str | None = None,
) -> list[str]:
    """torchrun running the trainer: `--standalone` on one node, else c10d rendezvous at `rdzv_endpoint`,
    hosted by the node with `is_host` (torchrun would guess from the hostname, which need not be the name
    the endpoint uses), with `local_addr` as this node's address for the workers' MASTER_ADDR (torchrun
    would use the hostname, which other nodes need not resolve)."""
    argv = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", "--max-restarts=0"]
    if rdzv_endpoint is None or nnodes == 1:
        argv += ["--standalone", "--nnodes=1"]
    else:
        argv += [
            f"--nnodes={nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
        if is_host is not None:
            argv.append(f"--rdzv-conf=is_host={str(is_host).lower()}")
        if local_addr is not None:
            argv.append(f"--local-addr={local_addr}")
    return argv + ["-m", "pretrain.train", str(config), *overrides]


def port_in_use(port: int) -> bool:
    """Whether something on this machine listens on (or holds) TCP `port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def pick_port(job_id: str) -> int:
    """A rendezvous port for the job: from the job id, below the ephemeral range, the first one free here."""
    digits = int("".join(c for c in str(job_id) if c.isdigit()) or 0)
    for attempt in range(PORT_SPAN):
        port = PORT_BASE + (digits + attempt) % PORT_SPAN
        if not port_in_use(port):
            return port
    raise RuntimeError(f"no free TCP port in {PORT_BASE}-{PORT_BASE + PORT_SPAN - 1}")


def run(argv: list[str], env: dict[str, str]) -> int:
    """Start torchrun (`argv`), relay SIGUSR1/SIGTERM to its workers until it exits; its exit status."""
    received: list[int] = []
    for sig in RELAYED:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # submitit's signal, meant for its own task process
    process = subprocess.Popen(argv, env=env, preexec_fn=ignore_checkpoint_signals)
    workers = WorkerSignals(process.pid)
    while True:
        while received:
            sig = received.pop(0)
            print(
                f"relay: {signal.Signals(sig).name} received on {socket.gethostname()}",
                file=sys.stderr,
                flush=True,
            )
            workers.request(sig)
        workers.deliver()
        try:
            return process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pick-port", metavar="JOB_ID", help="print a free rendezvous port and exit")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the first node (several nodes)")
    parser.add_argument("--rdzv-id", default="based")
    parser.add_argument(
        "--node-rank",
        type=int,
        default=int(os.environ.get("SLURM_NODEID", "0")),
        help="0 hosts the rendezvous store (default: $SLURM_NODEID)",
    )
    parser.add_argument("trainer_args", nargs="*", help="CONFIG [key=value ...] (after --)")
    args = parser.parse_args(argv)
    if args.pick_port is not None:
        print(pick_port(args.pick_port))
        return 0
    if not args.trainer_args:
        parser.error("give the config (and overrides) after --")
    host = args.rdzv_endpoint.rpartition(":")[0] if args.rdzv_endpoint and args.nnodes > 1 else None
    python = os.environ.get("PYTHON") or sys.executable
    route = local_route(host) if host is not None else None
    command = torchrun_argv(
        python,
        args.trainer_args[0],
        args.trainer_args[1:],
        args.nnodes,
        args.nproc_per_node,
        args.rdzv_endpoint,
        args.rdzv_id,
        is_host=args.node_rank == 0,
        local_addr=route[1] if route else None,
    )
    env = agent_env(host)
    shown = {k: env[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", *NCCL_DEFAULTS) if k in env}
    print(
        f"relay on {socket.gethostname()} (node {args.node_rank}): {' '.join(command)}; "
        + " ".join(f"{k}={v}" for k, v in shown.items()),
        file=sys.stderr,
        flush=True,
    )
    return run(command, env)


if __name__ == "__main__":
    sys.exit(main())
