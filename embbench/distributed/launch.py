"""Process launch and process-group set-up for multi-process runs on one machine.

``launch(nproc, argv)`` starts ``nproc`` copies of a program with ``python -m torch.distributed.run --standalone``
(torchrun: a free rendezvous port on this host, RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set in
each child). Each child calls ``init_from_env(device)``, which joins the process group: gloo on CPU, nccl on
CUDA (each rank on ``cuda:LOCAL_RANK``). Outside torchrun, ``init_from_env`` does nothing and reports rank 0 of 1,
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

import torch
import torch.distributed as dist

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


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command line ``launch`` runs: ``python -m torch.distributed.run --standalone ... <argv>``.

    ``argv`` is what torchrun takes after its own options: a script and its arguments, or ``-m module args``.
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive number of processes, got {nproc!r}")
    if not argv:
        raise ValueError("argv must name the program to launch (a script, or '-m module'), got nothing")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *argv]


def launch(nproc: int, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run ``argv`` in ``nproc`` processes on this machine under torchrun and return its exit code.

    The children inherit this process's environment (plus ``env``); their output goes to this process's
    stdout/stderr. On failure one line saying so goes to stderr, after torchrun's own report.
    """
    command = torchrun_command(nproc, argv)
    child_env = {**os.environ, **(env or {})}
    try:
        code = subprocess.run(command, env=child_env, check=False).returncode
    except OSError as error:
        print(f"embbench: could not start torchrun ({' '.join(command[:3])}): {error}", file=sys.stderr)
        return 127
    if code != 0:
        print(
            f"embbench: torchrun with {nproc} process(es) failed with exit code {code}: {' '.join(argv)}",
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
