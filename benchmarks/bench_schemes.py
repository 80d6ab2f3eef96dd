"""Speed, memory and size of every registered scheme at a fixed budget of a 10^6 x 32 table."""

from __future__ import annotations

import torch

from embbench import registry
from embbench.optimizers import make_optimizers
from embbench.schemes import Budget, build_embedding, state_size_bytes

from .common import (
    BATCH_SIZES,
    BUDGETS,
    DIM,
    SCHEMES,
    Embedded,
    batch_ids,
    build,
    plan_embedding,
    reference_feature,
    train_step,
    use_benchmark_threads,
)


class EmbeddingForward:
    """Inference: IDs -> embeddings through the table collection, eval mode, no autograd."""

    params = [SCHEMES, BUDGETS, BATCH_SIZES]
    param_names = ["scheme", "budget", "batch_size"]

    def setup(self, scheme: str, budget: str, batch_size: int) -> None:
        use_benchmark_threads()
        self.module = Embedded(build(scheme, budget)).eval()
        self.ids = batch_ids(batch_size)
        with torch.no_grad():
            self.module(self.ids)  # first-call allocations stay out of the timing

    def time_forward(self, scheme: str, budget: str, batch_size: int) -> None:
        with torch.no_grad():
            self.module(self.ids)


class EmbeddingTrainStep:
    """Training: forward, backward and an optimizer step of one feature's embeddings, held as a model holds them
    (the table collection, row-sparse Adam for tables, Adam for the rest: the runner's default on a CPU)."""

    params = [SCHEMES, BUDGETS, BATCH_SIZES]
    param_names = ["scheme", "budget", "batch_size"]

    def setup(self, scheme: str, budget: str, batch_size: int) -> None:
        use_benchmark_threads()
        self.module = Embedded(build(scheme, budget)).train()
        self.optimizer = make_optimizers(self.module, 1e-3)
        self.ids = batch_ids(batch_size)
        self.target = torch.randn(batch_size, DIM, generator=torch.Generator().manual_seed(1))
        train_step(self.module, self.optimizer, self.ids, self.target)  # Adam allocates its state here

    def time_forward_backward_step(self, scheme: str, budget: str, batch_size: int) -> None:
        train_step(self.module, self.optimizer, self.ids, self.target)


class EmbeddingMemory:
    """Peak resident memory of the benchmark process (torch and the suite imported, plus the work below)."""

    params = [SCHEMES, BUDGETS]
    param_names = ["scheme", "budget"]

    def setup(self, scheme: str, budget: str) -> None:
        use_benchmark_threads()
        plan_embedding(scheme, budget)  # skip cells outside the grid before measuring anything

    def peakmem_build(self, scheme: str, budget: str) -> None:
        build(scheme, budget)

    def peakmem_train(self, scheme: str, budget: str) -> None:
        """Build, then one training step at batch 4096 (gradients and the optimizers' state all allocated)."""
        module = Embedded(build(scheme, budget)).train()
        optimizer = make_optimizers(module, 1e-3)
        ids = batch_ids(BATCH_SIZES[0])
        target = torch.randn(BATCH_SIZES[0], DIM, generator=torch.Generator().manual_seed(1))
        train_step(module, optimizer, ids, target)


class EmbeddingSize:
    """Bytes the built module stores (parameters and persistent buffers), at the budget."""

    params = [SCHEMES, BUDGETS]
    param_names = ["scheme", "budget"]
    unit = "bytes"

    def setup(self, scheme: str, budget: str) -> None:
        use_benchmark_threads()
        plan_embedding(scheme, budget)

    def track_size_bytes(self, scheme: str, budget: str) -> int:
        return state_size_bytes(build(scheme, budget))


class DHEEncoding:
    """DHE's dense hash encoding alone (the scheme's defaults: k = 1024 hashes into 10^6 buckets), without
    the decoder MLP; the encoder is taken from the module the ``dhe`` plugin builds, so it follows the plugin."""

    params = [["uniform", "gaussian"], BATCH_SIZES]
    param_names = ["encoding", "batch_size"]

    def setup(self, encoding: str, batch_size: int) -> None:
        use_benchmark_threads()
        if "dhe" not in SCHEMES:
            raise NotImplementedError("the dhe scheme is not registered (see `embbench list schemes`)")
        feature = reference_feature()
        budget_bytes = Budget.parse("1/4").resolve(feature.num_ids, feature.dim)
        module, _ = build_embedding(registry.create_scheme("dhe", encoding=encoding), "dhe", feature, budget_bytes, 1)
        self.encoder = module.encoder
        self.ids = batch_ids(batch_size)
        self.encoder(self.ids)

    def time_encode(self, encoding: str, batch_size: int) -> None:
        self.encoder(self.ids)
