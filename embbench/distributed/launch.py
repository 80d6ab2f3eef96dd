"""Process launch and process-group set-up for multi-process runs, on one machine or several.

``launch(nproc, argv)`` starts ``nproc`` copies of a program with ``python -m torch.distributed.run --standalone``
(torchrun: a free rendezvous port on this host, RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set in
each child); ``launch(nproc, argv, nodes)`` starts this node's share of a run over several machines instead (one
``launch`` per node, all meeting at ``nodes.endpoint``; see :func:`resolve_nodes`). Each child calls
``init_from_env(device)``, which joins the process group: gloo on CPU, nccl on CUDA (each rank on
``cuda:LOCAL_RANK``). Outside torchrun, ``init_from_env`` does nothing and reports rank 0 of 1,
and ``rank()``, ``world_size()``, ``barrier()`` and ``destroy()`` behave as for a single process, so the same
code runs with and without a launcher.

Collectives wait at most ``EMBBENCH_DIST_TIMEOUT_S`` seconds (default 1800) for the other ranks before failing.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from embbench.errors import ConfigError

#: seconds a collective waits for the other ranks (EMBBENCH_DIST_TIMEOUT_S overrides)
DEFAULT_TIMEOUT_S = 1800.0

#: the environment variables torchrun sets in every child; all present means "launched by torchrun"
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks."""
    raw = os.environ.get("EMBBENCH_DIST_TIMEOUT_S", "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"EMBBENCH_DIST_TIMEOUT_S must be a number of seconds, got '{raw}'") from None
    if seconds <= 0:
        raise ValueError(f"EMBBENCH_DIST_TIMEOUT_S must be positive, got {seconds}")
    return datetime.timedelta(seconds=seconds)


#: torchrun rendezvous backends a run over several nodes may use: ``static`` numbers the nodes by --node-rank
#: (node 0 hosts global rank 0, the process that writes the database); ``c10d`` numbers them itself
RDZV_BACKENDS = ("static", "c10d")
#: the port torchrun's documentation uses for a rendezvous
DEFAULT_RDZV_PORT = 29500


@dataclass(frozen=True)
class Nodes:
    """The machines one run spans, as torchrun's rendezvous sees them: ``count`` nodes meeting at ``endpoint``
    (``host:port``; with ``static``, node 0's address and a free port there) under ``run_id``, this one
    numbered ``rank`` (``static``; None under ``c10d``, which numbers nodes in the order they join)."""

    count: int = 1
    rank: int | None = 0
    endpoint: str | None = None
    run_id: str = "embbench"
    backend: str = "static"

    @property
    def several(self) -> bool:
        return self.count > 1

    @property
    def may_hold_rank_zero(self) -> bool:
        """Whether global rank 0, the one process that opens and writes the results database, may run here."""
        return not self.several or self.backend == "c10d" or self.rank == 0

    def torchrun_options(self) -> list[str]:
        if not self.several:
            return ["--standalone"]
        options = ["--nnodes", str(self.count), "--rdzv-backend", self.backend, "--rdzv-endpoint", str(self.endpoint),
                   "--rdzv-id", self.run_id]
        return options + (["--node-rank", str(self.rank)] if self.backend == "static" else [])

    def describe(self) -> str:
        where = f"node {self.rank} of {self.count}" if self.rank is not None else f"one of {self.count} nodes"
        return f"{where} (rendezvous {self.backend} at {self.endpoint}, id {self.run_id})"


def resolve_nodes(
    count: int = 1, rank: int | None = None, endpoint: str | None = None, run_id: str | None = None,
    backend: str | None = None,
) -> Nodes:
    """The options ``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``, ``--rdzv-id``, ``--rdzv-backend`` (None:
    not given) checked together; each mistake is a ConfigError naming the option and the fix."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"--nnodes must be a positive number of machines, got {count!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < count):
        raise ConfigError(
            f"--node-rank {rank} is out of range for --nnodes {count}: nodes are numbered 0 to {count - 1}"
        )
    if count == 1:
        given = [name for name, value in (("--rdzv-endpoint", endpoint), ("--rdzv-id", run_id),
                                          ("--rdzv-backend", backend)) if value is not None]
        if given:
            raise ConfigError(
                f"{' and '.join(given)}: only for a run over several machines; add --nnodes N (N > 1), or drop it"
            )
        return Nodes()
    backend = "static" if backend is None else backend
    if backend not in RDZV_BACKENDS:
        raise ConfigError(
            f"--rdzv-backend '{backend}' is not supported; use static (nodes numbered by --node-rank, the default) "
            "or c10d (nodes numbered as they join)"
        )
    example = f"e.g. --rdzv-endpoint node0:{DEFAULT_RDZV_PORT}"
    if not endpoint:
        raise ConfigError(
            f"--nnodes {count} needs --rdzv-endpoint HOST:PORT, the address of node 0 and a free port there "
            f"({example}), the same on every node"
        )
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--rdzv-endpoint '{endpoint}' must be HOST:PORT with a port from 1 to 65535 ({example})")
    if backend == "static":
        if rank is None:
            raise ConfigError(
                f"--nnodes {count} needs --node-rank: 0 on the machine at --rdzv-endpoint {endpoint} (it writes "
                f"the results database), 1 to {count - 1} on the others (under Slurm: --node-rank $SLURM_NODEID)"
            )
    elif rank is not None:
        raise ConfigError(
            "--node-rank is not used by --rdzv-backend c10d, which numbers the nodes as they join; drop it, or use "
            "--rdzv-backend static"
        )
    run_id = "embbench" if run_id is None else run_id
    if not run_id.strip() or any(character.isspace() for character in run_id):
        raise ConfigError(f"--rdzv-id '{run_id}' must be a word without spaces, the same on every node of the run")
    return Nodes(count, rank, endpoint, run_id, backend)


def torchrun_command(nproc: int, argv: Sequence[str], nodes: Nodes | None = None) -> list[str]:
    """The command line ``launch`` runs: ``python -m torch.distributed.run --standalone ... <argv>``, or with
    ``nodes`` spanning several machines, this node's share: ``... --nnodes N --rdzv-endpoint HOST:PORT ...``.

    ``argv`` is what torchrun takes after its own options: a script and its arguments, or ``-m module args``.
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive number of processes, got {nproc!r}")
    if not argv:
        raise ValueError("argv must name the program to launch (a script, or '-m module'), got nothing")
    options = (nodes or Nodes()).torchrun_options()
    return [sys.executable, "-m", "torch.distributed.run", *options, "--nproc-per-node", str(nproc), *argv]


def launch(nproc: int, argv: Sequence[str], env: dict[str, str] | None = None, nodes: Nodes | None = None) -> int:
    """Run ``argv`` in ``nproc`` processes on this machine under torchrun and return its exit code; with
    ``nodes``, as this node's share of a run over several machines (every node runs its own ``launch``).

    The children inherit this process's environment (plus ``env``); their output goes to this process's
    stdout/stderr. On failure one line saying so goes to stderr, after torchrun's own report.
    """
    nodes = nodes or Nodes()
    command = torchrun_command(nproc, argv, nodes)
    child_env = {**os.environ, **(env or {})}
    try:
        code = subprocess.run(command, env=child_env, check=False).returncode
    except OSError as error:
        print(f"embbench: could not start torchrun ({' '.join(command[:3])}): {error}", file=sys.stderr)
        return 127
    if code != 0:
        print(
            f"embbench: torchrun with {nproc} process(es){' on ' + nodes.describe() if nodes.several else ''} failed "
            f"with exit code {code}: {' '.join(argv)}",
            file=sys.stderr,
        )
    return code


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_from_env(device: torch.device | str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; return (rank, world size).

    Backend: nccl for a CUDA device (and this rank's GPU becomes ``cuda:LOCAL_RANK``), gloo otherwise.
    Not launched by torchrun: nothing happens and (0, 1) is returned. Already initialised: the existing
    group's (rank, world size).
    """
    device = torch.device(device)
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    if not launched_by_torchrun():
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout())
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes results and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (no-op if none)."""
    if is_distributed():
        dist.destroy_process_group()
