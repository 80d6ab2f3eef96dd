"""The table path against the kernels it wraps: embbench's ``full`` scheme (and a 6-table compositional model)
trained and looked up through :class:`embbench.FeatureEmbeddings`, beside fbgemm's table-batched kernel (TBE)
and ``nn.EmbeddingBag(sparse=True)`` fed row indices directly.

Run it as a script from the repository root; every path is timed in one process, interleaved, on one thread
by default::

    python -m benchmarks.table_path                      # 10^6 x 32, batch 4096, 1 thread
    python -m benchmarks.table_path --json out.json      # also write the figures

The asv suite (``bench_table_path``) times the same paths one by one.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from embbench import FeatureEmbeddings, FeatureSpec, TableTraining, registry
from embbench.collection import torchrec_available
from embbench.optimizers import make_optimizers
from embbench.run.resolve import plan_features
from embbench.schemes import Budget, build_planned

VOCAB = 10**6
DIM = 32
BATCH = 4096
#: fused optimizers compared with raw TBE; the sparse torch path uses Adam (SparseAdam), the default
FUSED = ("rowwise-adagrad", "sgd", "adagrad")
LEARNING_RATE = 0.01


def feature(name: str = "item", vocab: int = VOCAB, scattered: bool = False) -> FeatureSpec:
    """``vocab`` training IDs: 0..vocab-1, or (``scattered``) distinct IDs spread over 40 bits, as hashed IDs
    are (the full scheme's dictionary then maps them by binary search)."""
    if not scattered:
        return FeatureSpec.from_vocabulary(name, vocab, DIM)
    rng = np.random.default_rng(7)
    ids = np.unique(rng.integers(0, 2**40, size=int(vocab * 1.01)))[:vocab]
    return FeatureSpec(name, ids.astype(np.int64), np.ones(len(ids), dtype=np.int64), DIM)


def scheme_module(name: str, spec: FeatureSpec, budget: str, **params: Any) -> nn.Module:
    scheme = registry.create_scheme(name, **params)
    plan = plan_features(scheme, {spec.name: spec}, Budget.parse(budget))[spec.name]
    return build_planned(scheme, name, spec, plan, seed=1)


class Embedded(nn.Module):
    """The smallest model around a FeatureEmbeddings: every feature's embeddings, as they are."""

    def __init__(self, embeddings: FeatureEmbeddings) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.embeddings(ids)


@dataclass
class Path:
    """One way of training and looking up tables: ``step()`` (forward, backward, update) and ``forward()``."""

    name: str
    step: Callable[[], None]
    forward: Callable[[], None]
    note: str = ""


def embbench_path(name: str, modules: dict[str, nn.Module], ids: dict[str, torch.Tensor], training: TableTraining,
                  note: str = "") -> Path:
    model = Embedded(FeatureEmbeddings(copy.deepcopy(modules), training))
    optimizers = make_optimizers(model, LEARNING_RATE)

    def step() -> None:
        loss = sum(vectors.sum() for vectors in model(ids).values())  # the raw paths' loss: the sum of the output
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()

    @torch.no_grad()
    def forward() -> None:
        model(ids)

    assert model.embeddings.tables is not None
    calls = model.embeddings.tables.describe()["kernel_calls_per_batch"]
    return Path(name, step, forward, note or f"{model.embeddings.kernel}, {calls} kernel call(s) per batch")


def raw_tbe_path(optimizer: str, rows: list[int], rows_per_batch: list[torch.Tensor], tag: str = "") -> Path:
    """fbgemm's SplitTableBatchedEmbeddingBagsCodegen over ``rows`` tables, fed row indices."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    kind = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "rowwise-adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}[optimizer]
    kernel = SplitTableBatchedEmbeddingBagsCodegen(
        [(count, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for count in rows],
        optimizer=kind, learning_rate=LEARNING_RATE, device="cpu",
    )
    # Rows of the same scale embbench's tables start from: a kernel left at its allocation would read
    # never-written (zero) pages, which cost no memory traffic, and flatter the raw path.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for weight in kernel.split_embedding_weights():
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)
    indices = torch.cat(rows_per_batch)
    offsets = torch.arange(len(indices) + 1)

    def step() -> None:
        kernel(indices, offsets).sum().backward()

    @torch.no_grad()
    def forward() -> None:
        kernel(indices, offsets)

    return Path(f"raw TBE{tag}, {optimizer}", step, forward, f"{len(rows)} table(s), row indices given")


def plain_bag_path(rows: int, indices: torch.Tensor, tag: str = "") -> Path:
    """``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SparseAdam``, fed row indices."""
    bag = nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True)
    optimizer = torch.optim.SparseAdam(bag.parameters(), lr=LEARNING_RATE)
    column = indices.unsqueeze(1)

    def step() -> None:
        optimizer.zero_grad()
        bag(column).sum().backward()
        optimizer.step()

    @torch.no_grad()
    def forward() -> None:
        bag(column)

    return Path(f"nn.EmbeddingBag(sparse){tag} + SparseAdam", step, forward, "row indices given")


def interleaved(calls: dict[str, Callable[[], None]], repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds of each call, timed round-robin so that every call sees the same machine state."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def full_paths(
    scattered: bool, optimizers: tuple[str, ...] = FUSED
) -> tuple[list[Path], list[tuple[str, str, str, float]]]:
    """The full scheme at VOCAB x DIM and its baselines (fused ``optimizers`` against raw TBE, then row-sparse
    Adam against nn.EmbeddingBag); the (what, ours, baseline, target) comparisons."""
    spec = feature(scattered=scattered)
    module = scheme_module("full", spec, "1")
    draws = torch.randint(0, spec.num_ids, (BATCH,), generator=torch.Generator().manual_seed(0))
    ids = torch.as_tensor(spec.ids)[draws]
    rows = module.rows(ids)  # the row indices the raw kernels are fed
    tag = " (scattered IDs)" if scattered else ""
    paths, comparisons = [], []
    if torchrec_available():
        for optimizer in optimizers:
            ours = embbench_path(f"embbench full{tag}, fused {optimizer}", {"item": module}, {"item": ids},
                                 TableTraining("torchrec", optimizer, LEARNING_RATE))
            raw = raw_tbe_path(optimizer, [spec.num_ids + 1], [rows], tag)
            paths += [ours, raw]
            comparisons.append(("train step", ours.name, raw.name, 0.5))
            if optimizer == optimizers[0]:
                comparisons.append(("forward", ours.name, raw.name, 0.7))
    ours = embbench_path(f"embbench full{tag}, torch sparse adam", {"item": module}, {"item": ids},
                         TableTraining("torch", "adam", LEARNING_RATE))
    plain = plain_bag_path(spec.num_ids + 1, rows, tag)
    paths += [ours, plain]
    comparisons += [("train step", ours.name, plain.name, 0.7), ("forward", ours.name, plain.name, 0.0)]
    return paths, comparisons


def multi_table_paths() -> tuple[list[Path], list[tuple[str, str, str, float]]]:
    """compositional with 3 partitions on two features of VOCAB IDs: 6 tables, one fused kernel call."""
    modules, ids, rows, sizes = {}, {}, [], []
    for index, name in enumerate(("user", "item")):
        spec = feature(name)
        module = scheme_module("compositional", spec, "1/16", num_partitions=3, operation="mult")
        modules[name] = module
        ids[name] = torch.randint(0, spec.num_ids, (BATCH,), generator=torch.Generator().manual_seed(index))
        digits = module.index_tuples(ids[name])
        rows += [digits[:, p] for p in range(3)]
        sizes += [table.num_rows for table in module.embedding_tables()]
    paths, comparisons = [], []
    if torchrec_available():
        ours = embbench_path("embbench compositional x2 (6 tables), fused rowwise-adagrad", modules, ids,
                             TableTraining("torchrec", "rowwise-adagrad", LEARNING_RATE))
        raw = raw_tbe_path("rowwise-adagrad", sizes, rows, " (6 tables)")
        paths += [ours, raw]
        comparisons += [("train step", ours.name, raw.name, 0.5), ("forward", ours.name, raw.name, 0.0)]
    return paths, comparisons


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    groups = [full_paths(False), full_paths(True), multi_table_paths()]
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(), "vocab": VOCAB, "dim": DIM, "batch": BATCH,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "paths": {},
        "comparisons": [],
    }
    for paths, comparisons in groups:
        steps = interleaved({p.name: p.step for p in paths}, args.repeats)
        forwards = interleaved({p.name: p.forward for p in paths}, args.repeats)
        for path in paths:
            results["paths"][path.name] = {"train_step_ms": steps[path.name], "forward_ms": forwards[path.name],
                                           "note": path.note}
        for what, ours, baseline, target in comparisons:
            timed = steps if what == "train step" else forwards
            ratio = timed[baseline] / timed[ours]  # throughput of ours relative to the baseline
            results["comparisons"].append(
                {"what": what, "ours": ours, "baseline": baseline, "throughput_ratio": ratio, "target": target}
            )
    print(f"threads={results['threads']}  {VOCAB:,} x {DIM} table(s), batch {BATCH}, medians of {args.repeats}")
    print(f"{'path':<66} {'train step ms':>14} {'forward ms':>11}  note")
    for name, figures in results["paths"].items():
        print(f"{name:<66} {figures['train_step_ms']:>14.3f} {figures['forward_ms']:>11.3f}  {figures['note']}")
    print()
    print(f"{'comparison':<96} {'ratio':>6} {'target':>7}")
    for item in results["comparisons"]:
        target = f">={item['target']:.1f}" if item["target"] else "-"
        text = f"{item['what']}: {item['ours']} vs {item['baseline']}"
        print(f"{text:<96} {item['throughput_ratio']:>6.2f} {target:>7}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
