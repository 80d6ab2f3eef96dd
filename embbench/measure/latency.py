"""Inference latency of embedding modules and models, measured with ``torch.utils.benchmark``.

Each measurement is a ``Timer.blocked_autorange`` over batches of real IDs (the split's users and items, so
caches and hash paths see realistic inputs), after a warm-up call; the result records the median, the
inter-quartile range, the number of timed runs, the thread count and the device. On CUDA the timer
synchronises the device itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils import benchmark

from embbench.tasks import pool_batch

DEFAULT_BATCH_SIZES = (1, 128, 4096)
#: seconds of timed runs per measurement (blocked_autorange runs at least this long)
DEFAULT_MIN_RUN_SECONDS = 0.2


@dataclass(frozen=True)
class Latency:
    """One timed operation at one batch size (milliseconds per call)."""

    batch_size: int
    median_ms: float
    iqr_ms: float
    runs: int
    threads: int
    device: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_call(call: Callable[[], Any], batch_size: int, device: torch.device, min_run_seconds: float) -> Latency:
    call()  # warm-up: lazy initialisation, allocator, caches
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_seconds)
    return Latency(
        batch_size=batch_size,
        median_ms=measurement.median * 1e3,
        iqr_ms=measurement.iqr * 1e3,
        runs=len(measurement.times),
        threads=torch.get_num_threads(),
        device=str(device),
    )


@torch.no_grad()
def embedding_latency(
    module: torch.nn.Module,
    ids: torch.Tensor,
    device: torch.device,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    min_run_seconds: float = DEFAULT_MIN_RUN_SECONDS,
) -> list[Latency]:
    """Latency of ``module(ids)`` in eval mode at each batch size, IDs drawn from ``ids``."""
    was_training = module.training
    module.eval()
    try:
        latencies = []
        for size in batch_sizes:
            batch = pool_batch(ids, size, device)
            latencies.append(time_call(lambda batch=batch: module(batch), size, device, min_run_seconds))
        return latencies
    finally:
        module.train(was_training)


@torch.no_grad()
def model_latency(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    min_run_seconds: float = DEFAULT_MIN_RUN_SECONDS,
) -> Latency:
    """Latency of scoring one batch (``model(*inputs)``, all inputs [B, ...] on ``device``) in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return time_call(lambda: model(*inputs), len(inputs[0]), device, min_run_seconds)
    finally:
        model.train(was_training)


def measure_cell_latency(
    embeddings: Mapping[str, tuple[torch.nn.Module, torch.Tensor]],
    model: torch.nn.Module,
    model_inputs: Sequence[torch.Tensor],
    device: torch.device,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    min_run_seconds: float = DEFAULT_MIN_RUN_SECONDS,
) -> dict[str, Any]:
    """Embedding-only latency of each feature (its module and a pool of real IDs) at each batch size, and the
    full model's latency on one batch of ``model_inputs``."""
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(device)}
    for feature, (module, pool) in embeddings.items():
        result[f"{feature}_embedding"] = [
            latency.as_dict() for latency in embedding_latency(module, pool, device, batch_sizes, min_run_seconds)
        ]
    result["model"] = model_latency(model, model_inputs, device, min_run_seconds).as_dict()
    return result


def embedding_latency_ms(latency: Mapping[str, Any], features: Sequence[str]) -> float:
    """Milliseconds to embed one batch (the largest measured) of every feature: the sum over features."""
    return sum(latency[f"{feature}_embedding"][-1]["median_ms"] for feature in features)
