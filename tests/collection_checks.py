"""Shared checks that a table-backed scheme module gives the same embeddings, and learns the same from an SGD step,
inside a :class:`~embbench.collection.FeatureEmbeddings` collection (every table read of a batch pooled in one
call per store) as standalone. Imported by the scheme tests; not a test module itself.

Building a collection takes the tables of the modules it is given, so every check works on deep copies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from embbench import EmbeddingTable, TableBackedEmbedding
from embbench.collection import FeatureEmbeddings, TableCollection, TableTraining, torchrec_available
from embbench.optimizers import make_optimizers

#: (backend, table optimizer) of the kernels a collection may use: fused fbgemm, torch sparse, torch dense
KERNELS = (("torchrec", "sgd"), ("torch", "adam"), ("torch", "dense-adam"))
#: backends whose SGD step must equal a dense SGD step on the standalone module
SGD_BACKENDS = ("torchrec", "torch")
FUSED_DIM_MULTIPLE = 4
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

_NO_FBGEMM = pytest.mark.skipif(not torchrec_available(), reason="the fused kernel needs fbgemm")


def kernel_params(kernels: Sequence[tuple[str, str]] = KERNELS) -> list[Any]:
    """``kernels`` as pytest params (backend, optimizer), the fused one skipped where fbgemm cannot load."""
    return [
        pytest.param(backend, optimizer, id=f"{backend}-{optimizer}", marks=_NO_FBGEMM if backend == "torchrec" else ())
        for backend, optimizer in kernels
    ]


def backend_params(backends: Sequence[str] = SGD_BACKENDS) -> list[Any]:
    """``backends`` as pytest params, torchrec skipped where fbgemm cannot load."""
    return [
        pytest.param(backend, id=backend, marks=_NO_FBGEMM if backend == "torchrec" else ()) for backend in backends
    ]


def collection_of(
    modules: dict[str, nn.Module], backend: str, optimizer: str, learning_rate: float = 0.1
) -> FeatureEmbeddings:
    """Deep copies of ``modules`` (one per feature, even of one module) in a FeatureEmbeddings whose tables the
    given kernel holds."""
    copies = {name: copy.deepcopy(module) for name, module in modules.items()}
    return FeatureEmbeddings(copies, TableTraining(backend, optimizer, learning_rate))


def expected_stores(module: nn.Module, backend: str, optimizer: str) -> int:
    """Stores (kernel calls per batch) a collection of ``module`` has: the fused kernel leaves tables whose
    width is not a multiple of 4 to a sparse store beside it; torch kernels keep every table in one store."""
    tables = [table for table in module.modules() if isinstance(table, EmbeddingTable)]
    if TableTraining(backend, optimizer).kernel != "fused":
        return 1
    widths = {table.dim % FUSED_DIM_MULTIPLE == 0 for table in tables}
    return len(widths)


def assert_same_embeddings_in_collection(
    module: nn.Module, batches: Sequence[torch.Tensor], backend: str, optimizer: str
) -> None:
    """The module inside a collection embeds every batch as the standalone module does, in training mode
    (batch after batch, so that schemes learning from training IDs see the same ones) and in evaluation mode."""
    assert isinstance(module, TableBackedEmbedding)
    standalone = copy.deepcopy(module)
    embeddings = collection_of({"f": module}, backend, optimizer)
    assert embeddings.tables is not None and embeddings.kernel != "none"
    inside = embeddings["f"]
    assert all(table.bound for table in inside.modules() if isinstance(table, EmbeddingTable))
    standalone.train()
    embeddings.train()
    for ids in batches:
        torch.testing.assert_close(embeddings.embed("f", ids), standalone(ids), **TOLERANCE)
    standalone.eval()
    embeddings.eval()
    with torch.no_grad():
        for ids in batches:
            torch.testing.assert_close(embeddings.embed("f", ids), standalone(ids), **TOLERANCE)
            torch.testing.assert_close(inside(ids), standalone(ids), **TOLERANCE)  # the module called alone


def count_pool_calls(embeddings: FeatureEmbeddings, ids: dict[str, torch.Tensor]) -> list[int]:
    """Pool calls of each store of the collection while it embeds one batch; fails on any table read outside
    the batched path (a scheme calling a table in forward)."""
    collection = embeddings.tables
    assert isinstance(collection, TableCollection)
    calls = [0] * len(collection.stores)

    def counting(index: int, pool: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[index] += 1
            return pool(*args, **kwargs)

        return wrapped

    def read_outside(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a table was read outside the collection's batched lookup")

    originals = [store.pool for store in collection.stores]
    for index, store in enumerate(collection.stores):
        object.__setattr__(store, "pool", counting(index, originals[index]))
    object.__setattr__(collection, "pool_one", read_outside)
    try:
        embeddings(ids)
    finally:
        for store in collection.stores:
            object.__delattr__(store, "pool")
        object.__delattr__(collection, "pool_one")
    return calls


def assert_one_pool_call_per_store(module: nn.Module, ids: torch.Tensor, backend: str, optimizer: str) -> None:
    """Two features of ``module`` embedded together cost one pool call per store, and the collection says so."""
    embeddings = collection_of({"user": module, "item": module}, backend, optimizer)
    described = embeddings.tables.describe()
    stores = expected_stores(module, backend, optimizer)
    assert described["kernel_calls_per_batch"] == len(embeddings.tables.stores) == stores
    tables = len([table for table in module.modules() if isinstance(table, EmbeddingTable)])
    reads = sum(table.lookups for table in module.modules() if isinstance(table, EmbeddingTable))
    assert described["tables"] == 2 * tables and described["slots"] == 2 * reads
    for mode in (True, False):
        embeddings.train(mode)
        calls = count_pool_calls(embeddings, {"user": ids, "item": ids.flip(0)})
        assert calls == [1] * stores


class _Tiny(nn.Module):
    """A one-feature model: a linear read-out of the embedding plus its squared norm."""

    def __init__(self, embeddings: FeatureEmbeddings, dim: int) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.out = nn.Linear(dim, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = self.embeddings({"f": ids})["f"]
        return self.out(vectors).squeeze(1) + vectors.pow(2).sum(1)


def assert_sgd_step_matches_dense(
    module: nn.Module,
    ids: torch.Tensor,
    probe: torch.Tensor,
    backend: str,
    learning_rate: float = 0.5,
    after_step: Callable[[nn.Module], None] | None = None,
) -> None:
    """One SGD step through the collection (table optimizer "sgd" on ``backend``, the dense parameters with
    ``torch.optim.SGD`` at the same rate) leaves the embeddings of ``probe`` as one dense SGD step on the
    standalone module does; ``after_step`` (e.g. an epoch-end hook) is then applied to both modules and they
    must still agree."""
    with torch.no_grad():
        dim = int(copy.deepcopy(module).eval()(probe[:1]).shape[1])  # a copy: training mode may record IDs
    labels = torch.rand(len(ids), generator=torch.Generator().manual_seed(0)).round()

    torch.manual_seed(0)
    reference = _Tiny(FeatureEmbeddings({"f": copy.deepcopy(module)}), dim)
    torch.manual_seed(0)
    model = _Tiny(collection_of({"f": module}, backend, "sgd", learning_rate), dim)
    assert model.embeddings.tables is not None

    reference.eval()
    with torch.no_grad():
        before = reference.embeddings.embed("f", probe)
    reference.train()
    model.train()

    dense_sgd = torch.optim.SGD(reference.parameters(), lr=learning_rate)
    loss = nn.functional.binary_cross_entropy_with_logits(reference(ids), labels)
    dense_sgd.zero_grad()
    loss.backward()
    dense_sgd.step()

    optimizers = make_optimizers(model, learning_rate)
    if optimizers.dense is not None:
        optimizers.dense = torch.optim.SGD(optimizers.dense.param_groups[0]["params"], lr=learning_rate)
    loss = nn.functional.binary_cross_entropy_with_logits(model(ids), labels)
    optimizers.zero_grad()
    loss.backward()
    optimizers.step()

    reference.eval()
    model.eval()
    with torch.no_grad():
        want = reference.embeddings.embed("f", probe)
        assert not torch.allclose(want, before, rtol=0, atol=1e-6), "the step moved no embedding"
        torch.testing.assert_close(model.embeddings.embed("f", probe), want, **TOLERANCE)
    if after_step is not None:
        after_step(reference.embeddings["f"])
        after_step(model.embeddings["f"])
        with torch.no_grad():
            torch.testing.assert_close(model.embeddings.embed("f", probe), reference.embeddings.embed("f", probe))
