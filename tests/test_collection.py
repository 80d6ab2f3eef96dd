"""The core table path (embbench.tables, embbench.collection): which kernel a TableTraining names, one collection
per model looked up in one kernel call per store, the sparse fallback beside the fused kernel, steps equal to
plain torch optimizers on standalone modules, state (state_dict, deepcopy, .to), bound tables' weights as views
of the kernel, the errors of a broken ``lookups``, third-party modules that read their tables themselves, and a
model plugin training under every kernel. Scheme-specific checks live in the test_scheme_* files; optimizer state
bytes and row-wise Adagrad in test_optimizers.py.

Every test works on small tables (tens of rows) and builds its modules afresh: building a collection takes the
tables of the modules it is given (``EmbeddingTable.bind``), so a reference is always a deep copy made before.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest
import torch
from collection_checks import assert_same_embeddings_in_collection, assert_sgd_step_matches_dense, count_pool_calls
from embbench_plugins.schemes.compositional import CompositionalLookup
from embbench_plugins.schemes.full import FullLookup
from torch import nn

import embbench.collection
from embbench import EmbeddingTable, FeatureEmbeddings, Lookup, TableBackedEmbedding, TableTraining
from embbench.collection import TABLE_BACKENDS, TABLE_OPTIMIZERS, TableCollection
from embbench.optimizers import SparseRowWiseAdagrad, make_optimizers
from embbench.registry import get_plugin
from embbench.training import PlainStep, TrainConfig

TORCHREC = embbench.collection.torchrec_available()
needs_torchrec = pytest.mark.skipif(not TORCHREC, reason="the fused and sharded kernels need torchrec and fbgemm")

# torch's Adagrad builds its sparse update without invariant checks, and warns so
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

CPU = torch.device("cpu")
DIM = 8
USERS, ITEMS = 40, 60
#: rows of a kernel and of the reference that should be equal (fp32 sums in another order)
ATOL = 1e-6

#: the kernel each (backend, table optimizer) uses on a CPU, unsharded: the specification, written out
KERNEL_ON_CPU = {
    ("torchrec", "adam"): "sparse",  # fbgemm fuses Adam on CUDA only
    ("torchrec", "sgd"): "fused",
    ("torchrec", "adagrad"): "fused",
    ("torchrec", "rowwise-adagrad"): "fused",
    ("torchrec", "dense-adam"): "dense",
    ("torch", "adam"): "sparse",
    ("torch", "sgd"): "sparse",
    ("torch", "adagrad"): "sparse",
    ("torch", "rowwise-adagrad"): "sparse",
    ("torch", "dense-adam"): "dense",
}
#: (backend, optimizer) of every training that steps only the rows a batch read
ROW_SPARSE = [pair for pair, kernel in KERNEL_ON_CPU.items() if kernel in ("fused", "sparse")]
#: one training per kernel, and the two optimizers whose state matters (row-wise Adagrad) or does not (SGD)
EVERY_KERNEL = [
    ("torchrec", "sgd"),
    ("torchrec", "rowwise-adagrad"),
    ("torch", "adam"),
    ("torch", "rowwise-adagrad"),
    ("torch", "dense-adam"),
]
#: one training per kernel: fused (with its sparse fallback), sparse, dense
ONE_PER_KERNEL = [("torchrec", "sgd"), ("torch", "adam"), ("torch", "dense-adam")]
#: the table optimizer torch steps each row-sparse table with
TABLE_OPTIMIZER_CLASS = {
    "adam": torch.optim.SparseAdam,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise-adagrad": SparseRowWiseAdagrad,
}


def params(pairs: Sequence[tuple[str, str]]) -> list:
    """(backend, optimizer) pairs as pytest params; those whose kernel is fbgemm's skipped where it cannot load."""
    return [
        pytest.param(
            backend, optimizer, id=f"{backend}-{optimizer}",
            marks=needs_torchrec if TableTraining(backend, optimizer).kernel == "fused" else (),
        )
        for backend, optimizer in pairs
    ]  # fmt: skip


# -- modules --------------------------------------------------------------------------------------------------


def users_full(seed: int = 1) -> FullLookup:
    return FullLookup(torch.arange(USERS), DIM, seed=seed)


def items_full(seed: int = 2) -> FullLookup:
    return FullLookup(torch.arange(ITEMS), DIM, seed=seed)


def users_compositional(seed: int = 1) -> CompositionalLookup:
    """Two partitions of 7 and 6 rows (42 >= 41 indices), combined by product."""
    return CompositionalLookup(np.arange(USERS), [7, 6], [DIM, DIM], "mult", seed)


def three_partitions(seed: int = 1) -> CompositionalLookup:
    """Three partitions (4 * 4 * 4 >= 61 indices) of full-width rows, combined by product."""
    return CompositionalLookup(np.arange(ITEMS), [4, 4, 4], [DIM, DIM, DIM], "mult", seed)


def items_narrow(seed: int = 2) -> CompositionalLookup:
    """Three partitions concatenated, rows of width 4, 2 and 2: only the first fits fbgemm's kernel."""
    return CompositionalLookup(np.arange(ITEMS), [4, 4, 4], [4, 2, 2], "concat", seed)


class ModuloToy(nn.Module):
    """A third-party style scheme: a plain module that reads its table in forward (no lookups/combine)."""

    def __init__(self, rows: int, dim: int, seed: int) -> None:
        super().__init__()
        self.rows = rows
        self.table = EmbeddingTable(rows, dim, seed=seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(torch.remainder(ids, self.rows))


class ReadsTwice(TableBackedEmbedding):
    """Reads ``source()`` (default: its own table, declared with ``lookups=declared``) twice and sums."""

    def __init__(self, declared: int = 2, source: Callable[[], EmbeddingTable] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.table = EmbeddingTable(20, 4, seed=seed, lookups=declared)
        self._source = source

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        table = self._source() if self._source is not None else self.table
        return [table.lookup(ids), table.lookup(ids)]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0] + pooled[1]


class Holder(nn.Module):
    """The least a model is for make_optimizers: its FeatureEmbeddings as ``embeddings``."""

    def __init__(self, embeddings: FeatureEmbeddings) -> None:
        super().__init__()
        self.embeddings = embeddings


def collected(modules: Mapping[str, nn.Module], backend: str, optimizer: str, lr: float = 0.1) -> FeatureEmbeddings:
    """Deep copies of ``modules`` in a FeatureEmbeddings whose collection the given training holds."""
    return FeatureEmbeddings(copy.deepcopy(dict(modules)), TableTraining(backend, optimizer, lr))


def standalone(modules: Mapping[str, nn.Module]) -> FeatureEmbeddings:
    """Deep copies of ``modules``, each reading its own tables (dense gradients)."""
    return FeatureEmbeddings(copy.deepcopy(dict(modules)))


def table_keys(embeddings: FeatureEmbeddings) -> dict[int, str]:
    """id(table) -> its collection key (``feature__path``), for collected and standalone modules alike."""
    return {
        id(table): f"{feature}__{path.replace('.', '_')}"
        for feature, module in embeddings.features.items()
        for path, table in module.named_modules()
        if isinstance(table, EmbeddingTable)
    }


def rows_of(embeddings: FeatureEmbeddings) -> dict[str, torch.Tensor]:
    """A copy of every table's rows, by collection key."""
    tables = {
        id(table): table for module in embeddings.features.values() for table in module.modules()
        if isinstance(table, EmbeddingTable)
    }  # fmt: skip
    return {key: tables[ident].weight.detach().clone() for ident, key in table_keys(embeddings).items()}


def rows_read(embeddings: FeatureEmbeddings, ids: Mapping[str, torch.Tensor]) -> dict[str, set[int]]:
    """The rows of each table that embedding ``ids`` reads (table-backed modules only)."""
    keys = table_keys(embeddings)
    read: dict[str, set[int]] = {key: set() for key in keys.values()}
    for feature, batch in ids.items():
        for lookup in embeddings[feature].lookups(batch):
            read[keys[id(lookup.table)]].update(lookup.bags()[0].tolist())
    return read


def feature_loss(vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A loss whose gradient differs per column and per row: sum over IDs of ((v . c) - 1)^2, c in [-1, 1]."""
    total = torch.zeros(())
    for v in vectors.values():
        columns = torch.linspace(-1.0, 1.0, v.shape[1])
        total = total + ((v * columns).sum(1) - 1.0).pow(2).sum()
    return total


def count_kernel_calls(embeddings: FeatureEmbeddings, run: Callable[[], object]) -> list[int]:
    """Forward calls of each store's fbgemm module while ``run`` runs (-1 for stores that are not fused)."""
    assert embeddings.tables is not None
    calls = [0 if store.kernel == "fused" else -1 for store in embeddings.tables.stores]
    handles = []
    for index, store in enumerate(embeddings.tables.stores):
        if store.kernel == "fused":

            def hook(module: nn.Module, args: tuple, index: int = index) -> None:
                calls[index] += 1

            handles.append(store.kernel_module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def embed_all(embeddings: FeatureEmbeddings) -> dict[str, torch.Tensor]:
    """Every user's and item's embedding, in evaluation mode."""
    mode = embeddings.training
    embeddings.eval()
    with torch.no_grad():
        out = {
            "user": embeddings.embed("user", torch.arange(USERS)),
            "item": embeddings.embed("item", torch.arange(ITEMS)),
        }
    embeddings.train(mode)
    return out


# -- 1. TableTraining.kernel ----------------------------------------------------------------------------------


def test_the_kernel_table_covers_every_backend_and_optimizer():
    assert set(KERNEL_ON_CPU) == set(itertools.product(TABLE_BACKENDS, TABLE_OPTIMIZERS))


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
@pytest.mark.parametrize("backend, optimizer", list(KERNEL_ON_CPU), ids=[f"{b}-{o}" for b, o in KERNEL_ON_CPU])
def test_kernel_of_every_training_on_cpu(backend, optimizer, sharded):
    training = TableTraining(backend, optimizer, 0.1, "cpu", sharded)
    assert training.device == CPU
    assert training.kernel == ("sharded" if sharded else KERNEL_ON_CPU[backend, optimizer])


def test_on_cuda_fbgemm_fuses_adam_too():
    # (naming a CUDA device needs no GPU: the kernel is a property of the configuration)
    assert TableTraining("torchrec", "adam", device="cuda").kernel == "fused"
    assert TableTraining("torch", "adam", device="cuda").kernel == "sparse"
    assert TableTraining("torchrec", "dense-adam", device="cuda").kernel == "dense"


def test_an_unknown_backend_is_refused_naming_the_backends():
    with pytest.raises(ValueError, match="backend") as raised:
        TableTraining("tensorflow", "adam")
    assert "tensorflow" in str(raised.value)
    assert all(backend in str(raised.value) for backend in TABLE_BACKENDS)


def test_an_unknown_table_optimizer_is_refused_naming_the_optimizers():
    with pytest.raises(ValueError, match="optimizer") as raised:
        TableTraining("torch", "lamb")
    assert "lamb" in str(raised.value)
    assert all(optimizer in str(raised.value) for optimizer in TABLE_OPTIMIZERS)


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
@pytest.mark.parametrize("backend, optimizer", list(KERNEL_ON_CPU), ids=[f"{b}-{o}" for b, o in KERNEL_ON_CPU])
def test_a_collection_runs_the_kernel_its_training_names_and_embeds_as_standalone(backend, optimizer, sharded):
    training = TableTraining(backend, optimizer, 0.1, "cpu", sharded)
    if training.kernel in ("fused", "sharded") and not TORCHREC:
        pytest.skip("the fused and sharded kernels need torchrec and fbgemm")
    modules = {"user": users_full(), "item": three_partitions()}
    reference = standalone(modules)
    embeddings = FeatureEmbeddings(copy.deepcopy(modules), training)
    assert embeddings.kernel == embeddings.tables.kernel == training.kernel
    ids = {"user": torch.tensor([0, 3, 3, 39]), "item": torch.tensor([59, 1, 2, 2])}
    got, want = embeddings(ids), reference(ids)
    for feature in ids:
        torch.testing.assert_close(got[feature], want[feature], rtol=0, atol=ATOL)


# -- 2. one collection per model ------------------------------------------------------------------------------


@needs_torchrec
def test_two_features_of_three_partitions_are_one_fused_store_called_once_per_batch():
    module = three_partitions()
    embeddings = FeatureEmbeddings(
        {"user": copy.deepcopy(module), "item": copy.deepcopy(module)}, TableTraining("torchrec", "rowwise-adagrad")
    )
    collection = embeddings.tables
    keys = [f"{feature}__tables_{i}" for feature in ("user", "item") for i in range(3)]
    assert collection.table_keys == keys
    assert len(collection.stores) == 1
    store = collection.stores[0]
    assert store.kernel == "fused" and store.keys == keys
    assert all(table.bound for feature in ("user", "item") for table in embeddings[feature].tables)

    offsets_seen = []
    hook = store.kernel_module.register_forward_pre_hook(lambda module, args: offsets_seen.append(args[1].numel()))
    try:
        ids = {"user": torch.tensor([0, 5, 5, 60, 17]), "item": torch.tensor([1, 2, 3, 4, 59])}
        for training in (True, False):
            embeddings.train(training)
            with torch.set_grad_enabled(training):
                embeddings(ids)
    finally:
        hook.remove()
    # one call per batch, pooling every table of both features: 6 tables x 5 IDs bags (offsets: one more)
    assert offsets_seen == [6 * 5 + 1, 6 * 5 + 1]
    assert collection.describe() == {
        "kernel": "fused", "tables": 6, "slots": 6, "kernel_calls_per_batch": 1, "tables_per_kernel": {"fused": 6}
    }  # fmt: skip
    state_keys = {name for name in embeddings.state_dict() if name.startswith("tables.")}
    assert state_keys == {f"tables.stores.0.embedding_bags.{key}.weight" for key in keys}


@needs_torchrec
def test_the_fused_collection_embeds_both_features_as_the_standalone_modules():
    modules = {"user": three_partitions(seed=3), "item": three_partitions(seed=7)}
    reference = standalone(modules)
    embeddings = collected(modules, "torchrec", "rowwise-adagrad")
    ids = {"user": torch.tensor([0, 5, 5, 60, 17]), "item": torch.tensor([1, 2, 3, 4, 59])}
    got, want = embeddings(ids), reference(ids)
    for feature in ids:
        torch.testing.assert_close(got[feature], want[feature], rtol=0, atol=ATOL)


# -- 3. the sparse fallback beside the fused kernel ----------------------------------------------------------


@needs_torchrec
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise-adagrad"])
def test_tables_narrower_than_fbgemm_takes_go_to_a_sparse_store_beside_the_fused_one(optimizer):
    embeddings = collected({"f": items_narrow()}, "torchrec", optimizer)
    collection = embeddings.tables
    fused, rest = collection.stores
    assert (fused.kernel, fused.keys) == ("fused", ["f__tables_0"])  # width 4
    assert (rest.kernel, rest.keys) == ("sparse", ["f__tables_1", "f__tables_2"])  # width 2
    assert rest.sparse and len(rest.table_parameters()) == 1  # the two width-2 tables: one stacked weight
    assert collection.kernel == embeddings.kernel == "fused+sparse"
    described = collection.describe()
    assert described["kernel_calls_per_batch"] == 2 and described["tables_per_kernel"] == {"fused": 1, "sparse": 2}
    ids = torch.tensor([0, 1, 1, 59, 60, 33])
    assert count_pool_calls(embeddings, {"f": ids}) == [1, 1]
    assert count_kernel_calls(embeddings, lambda: embeddings({"f": ids})) == [1, -1]
    # the fallback is stepped by the same optimizer, through torch; the fused rows by the kernel itself
    optimizers = make_optimizers(Holder(embeddings), 0.01)
    assert type(optimizers.tables) is TABLE_OPTIMIZER_CLASS[optimizer]
    stepped = [p for group in optimizers.tables.param_groups for p in group["params"]]
    assert [id(p) for p in stepped] == [id(p) for p in rest.table_parameters()]


@needs_torchrec
def test_a_fused_and_sparse_collection_embeds_and_learns_as_the_standalone_module():
    batches = [torch.tensor([0, 1, 1, 59, 60, 33]), torch.tensor([7, 7, 8, 100, -1])]
    assert_same_embeddings_in_collection(items_narrow(), batches, "torchrec", "sgd")
    assert_sgd_step_matches_dense(items_narrow(), batches[0], torch.arange(61), "torchrec")


# -- 4. a step of each kernel against plain torch optimizers on standalone modules ----------------------------

SGD_LR = 0.05
#: the backends of SGD, and the kernel each runs
SGD_KERNELS = [pytest.param("torchrec", "fused", marks=needs_torchrec), ("torch", "sparse")]


def two_features() -> dict[str, nn.Module]:
    return {"user": users_compositional(), "item": items_full()}


def sgd_steps(
    modules: Mapping[str, nn.Module], backend: str, batches: Sequence[Mapping[str, torch.Tensor]]
) -> tuple[FeatureEmbeddings, FeatureEmbeddings]:
    """The modules stepped on ``batches`` by SGD: standalone with dense torch SGD, and in a collection."""
    reference, embeddings = standalone(modules), collected(modules, backend, "sgd", SGD_LR)
    dense_sgd = torch.optim.SGD(reference.parameters(), lr=SGD_LR)
    optimizers = make_optimizers(Holder(embeddings), 1.0)
    for ids in batches:
        for model, optimizer in ((reference, dense_sgd), (embeddings, optimizers)):
            optimizer.zero_grad()
            feature_loss(model(ids)).backward()
            optimizer.step()
    return reference, embeddings


@pytest.mark.parametrize("backend, kernel", SGD_KERNELS)
def test_an_sgd_step_of_the_kernel_equals_dense_sgd_on_the_standalone_modules(backend, kernel):
    modules = two_features()
    ids = {"user": torch.tensor([0, 3, 3, 9, 40, 12]), "item": torch.tensor([5, 5, 5, 0, 59, 31])}
    initial = rows_of(standalone(modules))
    reference, embeddings = sgd_steps(modules, backend, [ids])
    assert embeddings.kernel == kernel
    want, got = rows_of(reference), rows_of(embeddings)
    read = rows_read(reference, ids)
    for key, rows in got.items():
        torch.testing.assert_close(rows, want[key], rtol=0, atol=ATOL, msg=key)
        unread = sorted(set(range(rows.shape[0])) - read[key])
        assert torch.equal(rows[unread], initial[key][unread]), f"{key}: a row no batch read moved"
        moved = (rows - initial[key]).abs().amax(dim=1)
        assert bool((moved[sorted(read[key])] > 1e-4).all()), f"{key}: a row the batch read did not move"


def test_dense_adam_equals_torch_adam_over_every_parameter_of_a_standalone_copy():
    gmf = get_plugin("models", "gmf")
    table_lr, dense_lr = 0.05, 0.01
    modules = two_features()
    torch.manual_seed(0)
    reference = gmf(standalone(modules), DIM)
    torch.manual_seed(0)
    model = gmf(collected(modules, "torch", "dense-adam", table_lr), DIM)
    assert model.embeddings.kernel == "dense"
    tables = [p for name, p in reference.named_parameters() if name.startswith("embeddings.")]
    dense = [p for name, p in reference.named_parameters() if not name.startswith("embeddings.")]
    adam = torch.optim.Adam([{"params": dense, "lr": dense_lr}, {"params": tables, "lr": table_lr}])
    step = PlainStep(model, TrainConfig(learning_rate=dense_lr), CPU)
    batches = [
        (torch.tensor([0, 3, 3, 9, 12]), torch.tensor([5, 5, 0, 59, 31])),
        (torch.tensor([20, 21, 3, 30, 39]), torch.tensor([1, 2, 5, 40, 41])),
    ]
    for users, items in batches:
        labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
        step((users, items), labels)
        loss = nn.functional.binary_cross_entropy_with_logits(reference(users, items), labels)
        adam.zero_grad()
        loss.backward()
        adam.step()
    want, got = rows_of(reference.embeddings), rows_of(model.embeddings)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=ATOL, msg=key)
    torch.testing.assert_close(model.output.weight, reference.output.weight, rtol=0, atol=ATOL)


def two_disjoint_steps(backend: str, optimizer: str) -> tuple[dict, dict, dict]:
    """Rows of full user and item tables at the start and after each of two steps; step 1 reads IDs 0-7,
    step 2 IDs 8-15 (row = ID), no step rows 16 and up."""
    embeddings = collected({"user": users_full(), "item": items_full()}, backend, optimizer, 0.05)
    optimizers = make_optimizers(Holder(embeddings), 0.05)
    snapshots = [rows_of(embeddings)]
    for first in (0, 8):
        ids = torch.arange(first, first + 8)
        optimizers.zero_grad()
        feature_loss(embeddings({"user": ids, "item": ids.flip(0)})).backward()
        optimizers.step()
        snapshots.append(rows_of(embeddings))
    return tuple(snapshots)  # type: ignore[return-value]


@pytest.mark.parametrize("backend, optimizer", params(ROW_SPARSE))
def test_a_row_sparse_step_moves_only_the_rows_its_batch_read(backend, optimizer):
    start, after_first, after_second = two_disjoint_steps(backend, optimizer)
    for key in start:
        assert not torch.equal(after_first[key][:8], start[key][:8]), f"{key}: step 1 moved nothing"
        assert torch.equal(after_second[key][:8], after_first[key][:8]), f"{key}: step 2 moved rows only step 1 read"
        assert not torch.equal(after_second[key][8:16], after_first[key][8:16]), f"{key}: step 2 moved nothing"
        assert torch.equal(after_second[key][16:], start[key][16:]), f"{key}: rows no step read moved"


def test_dense_adam_moves_a_row_read_only_in_the_first_step_again_in_the_second():
    start, after_first, after_second = two_disjoint_steps("torch", "dense-adam")
    for key in start:
        # after step 1 an unread row has zero moments and stays; in step 2 the momentum of step 1 moves it
        assert torch.equal(after_first[key][8:], start[key][8:]), key
        moved = (after_second[key][:8] - after_first[key][:8]).abs().amax(dim=1)
        assert bool((moved > 0).all()), f"{key}: dense Adam's momentum should move rows of step 1 in step 2"
        assert torch.equal(after_second[key][16:], start[key][16:]), f"{key}: rows no step read moved"


# -- 7. state: state_dict, deepcopy, .to --------------------------------------------------------------------


def gmf_model(backend: str, optimizer: str, seed: int = 0, table_lr: float = 0.05) -> nn.Module:
    """GMF over a full user table (width 8) and a concatenated item scheme (widths 4, 2, 2: a fused training
    keeps the narrow tables in its sparse fallback)."""
    gmf = get_plugin("models", "gmf")
    torch.manual_seed(seed)
    modules = {"user": users_full(seed + 1), "item": items_narrow(seed + 2)}
    return gmf(FeatureEmbeddings(modules, TableTraining(backend, optimizer, table_lr)), DIM)


Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def toy_batches(count: int, size: int = 32, seed: int = 0) -> list[Batch]:
    """Batches of a learnable task: a pair is positive when the user's and the item's IDs have one parity."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        users = torch.randint(0, USERS, (size,), generator=generator)
        items = torch.randint(0, ITEMS, (size,), generator=generator)
        batches.append(((users, items), (users % 2 == items % 2).float()))
    return batches


def train(step: PlainStep, batches: Sequence) -> list[float]:
    return [step(inputs, labels) for inputs, labels in batches]


def assert_same_embeddings(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    for feature in want:
        assert torch.equal(got[feature], want[feature]), feature


def assert_all_changed(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    for feature in want:
        assert not torch.equal(got[feature], want[feature]), f"{feature}: training moved nothing"


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_the_best_epochs_state_restores_the_embeddings(backend, optimizer):
    model = gmf_model(backend, optimizer)
    step = PlainStep(model, TrainConfig(learning_rate=0.01), CPU)
    batches = toy_batches(4)
    train(step, batches[:2])
    best, best_embeddings = step.state(), embed_all(model.embeddings)
    train(step, batches[2:])
    assert_all_changed(embed_all(model.embeddings), best_embeddings)
    step.restore(best)
    assert_same_embeddings(embed_all(model.embeddings), best_embeddings)


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_a_freshly_built_model_loads_the_state_dict_and_embeds_the_same(backend, optimizer):
    model = gmf_model(backend, optimizer)
    train(PlainStep(model, TrainConfig(learning_rate=0.01), CPU), toy_batches(2))
    state = model.state_dict()
    for key in ("user__table", "item__tables_0", "item__tables_1", "item__tables_2"):
        assert any(name.endswith(f"embedding_bags.{key}.weight") for name in state), key
    fresh = gmf_model(backend, optimizer, seed=5)
    assert_all_changed(embed_all(fresh.embeddings), embed_all(model.embeddings))
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_embeddings(embed_all(fresh.embeddings), embed_all(model.embeddings))


@needs_torchrec
def test_a_deep_copy_of_a_fused_model_is_independent_and_carries_the_optimizer_state():
    model = gmf_model("torchrec", "rowwise-adagrad")
    assert model.embeddings.kernel == "fused+sparse"
    batches = toy_batches(4)
    # the row-wise accumulators are not zero any more
    train(PlainStep(model, TrainConfig(learning_rate=0.01), CPU), batches[:2])
    clone = copy.deepcopy(model)
    before = embed_all(model.embeddings)
    assert_same_embeddings(embed_all(clone.embeddings), before)
    assert clone.embeddings["user"].table._collection is clone.embeddings.tables
    assert clone.embeddings["user"].table.weight.data_ptr() != model.embeddings["user"].table.weight.data_ptr()

    train(PlainStep(clone, TrainConfig(learning_rate=0.01), CPU), batches[2:])
    assert_all_changed(embed_all(clone.embeddings), before)
    assert_same_embeddings(embed_all(model.embeddings), before)  # training the copy left the original alone
    # the original, trained on the same batches, ends where the copy did: the copy had its optimizer state
    torch.manual_seed(0)  # (nothing random in a step; for certainty)
    train(PlainStep(model, TrainConfig(learning_rate=0.01), CPU), batches[2:])
    got, want = embed_all(model.embeddings), embed_all(clone.embeddings)
    for feature in want:
        torch.testing.assert_close(got[feature], want[feature], rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_moving_the_model_to_the_cpu_keeps_it_working(backend, optimizer):
    model = gmf_model(backend, optimizer)
    before = embed_all(model.embeddings)
    assert model.to("cpu") is model
    model.to(CPU)
    assert_same_embeddings(embed_all(model.embeddings), before)
    train(PlainStep(model, TrainConfig(learning_rate=0.01), CPU), toy_batches(2))
    after = embed_all(model.embeddings)
    assert_all_changed(after, before)
    table = model.embeddings["user"].table
    assert torch.equal(table.weight, model.embeddings.tables.weight("user__table"))
    assert torch.equal(after["user"], table.weight[:USERS].detach())


# -- 8. a bound table's weight is a view of the kernel --------------------------------------------------------


@pytest.mark.parametrize("backend, optimizer", params(ONE_PER_KERNEL))
def test_writing_a_bound_tables_weight_changes_what_the_model_embeds(backend, optimizer):
    embeddings = collected({"f": items_narrow()}, backend, optimizer)
    module = embeddings["f"]
    for position, table in enumerate(module.tables):
        key = f"f__tables_{position}"
        assert table.bound
        assert table.weight.data_ptr() == embeddings.tables.weight(key).data_ptr()
    ids = torch.tensor([0, 21, 42])  # digits (0, 0, 0), (1, 1, 1), (2, 2, 2): no row written twice
    digits = module.index_tuples(ids)
    written = []
    with torch.no_grad():
        for position, table in enumerate(module.tables):
            values = torch.full((len(ids), table.dim), float(position + 1)) + torch.arange(len(ids)).unsqueeze(1)
            table.weight[digits[:, position]] = values
            written.append(values)
    for mode in (True, False):
        embeddings.train(mode)
        torch.testing.assert_close(embeddings.embed("f", ids), torch.cat(written, dim=1), rtol=0, atol=0)


# -- 9. errors, and features of different batch sizes ---------------------------------------------------------


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_lookups_reading_a_table_more_often_than_it_declares_are_refused(backend, optimizer):
    embeddings = collected({"f": ReadsTwice(declared=1)}, backend, optimizer)
    with pytest.raises(ValueError, match=r"ReadsTwice\.lookups read a table more often than its lookups=1"):
        embeddings.embed("f", torch.arange(3))


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_a_table_read_as_often_as_it_declares_pools_each_read(backend, optimizer):
    module = ReadsTwice(declared=2)
    embeddings = collected({"f": module}, backend, optimizer)
    assert embeddings.tables.describe()["slots"] == 2
    ids = torch.tensor([0, 4, 4, 19])
    torch.testing.assert_close(embeddings.embed("f", ids), 2 * module.table.weight[ids].detach(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_lookups_reading_a_table_outside_the_collection_are_refused(backend, optimizer):
    outside = EmbeddingTable(20, 4, seed=1, lookups=2)
    embeddings = collected({"f": ReadsTwice(source=lambda: outside)}, backend, optimizer)
    with pytest.raises(ValueError, match=r"ReadsTwice\.lookups read a table that is not one of its own"):
        embeddings.embed("f", torch.arange(3))


@pytest.mark.parametrize("backend, optimizer", params([("torchrec", "sgd"), ("torch", "adam")]))
def test_lookups_reading_another_features_table_are_refused(backend, optimizer):
    embeddings = FeatureEmbeddings(
        {"f": ReadsTwice(source=lambda: embeddings["g"].table, seed=1), "g": ReadsTwice(seed=2)},
        TableTraining(backend, optimizer),
    )
    with pytest.raises(ValueError, match="not one of its own"):
        embeddings({"f": torch.arange(3), "g": torch.arange(3) + 5})


@pytest.mark.parametrize("backend, optimizer", params([("torchrec", "sgd"), ("torch", "adam")]))
def test_one_module_given_for_two_features_embeds_each_features_ids_or_is_refused(backend, optimizer):
    module = users_full()
    reference = copy.deepcopy(module)
    users, items = torch.arange(3), torch.arange(3) + 10
    try:
        embeddings = FeatureEmbeddings({"user": module, "item": module}, TableTraining(backend, optimizer))
        got = embeddings({"user": users, "item": items})
    except ValueError:
        return  # refusing a shared module is as good as embedding it correctly
    torch.testing.assert_close(got["user"], reference(users), rtol=0, atol=ATOL)
    torch.testing.assert_close(got["item"], reference(items), rtol=0, atol=ATOL)


class WrongBags(TableBackedEmbedding):
    """A broken scheme: one bag fewer than IDs."""

    def __init__(self) -> None:
        super().__init__()
        self.table = EmbeddingTable(20, 4, seed=0)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        return [self.table.lookup(ids[1:])]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0]


def test_a_lookup_with_a_bag_count_other_than_the_ids_is_refused():
    embeddings = collected({"f": WrongBags()}, "torch", "adam")
    with pytest.raises(ValueError, match="WrongBags has 4 bags for 5 IDs"):
        embeddings.embed("f", torch.arange(5))


def test_features_embedded_together_must_have_one_batch_size():
    embeddings = collected({"user": users_full(), "item": items_full()}, "torch", "adam")
    calls = [(embeddings["user"], torch.arange(5)), (embeddings["item"], torch.arange(7))]
    with pytest.raises(ValueError, match="one batch size, got 5 and 7"):
        embeddings.tables.embed_modules(calls)


@pytest.mark.parametrize("backend, kernel", SGD_KERNELS)
def test_features_of_different_batch_sizes_are_looked_up_by_size_and_learn_as_standalone(backend, kernel):
    modules = two_features()
    ids = {"user": torch.tensor([0, 3, 3, 9, 40]), "item": torch.tensor([5, 5, 0, 59, 31, 17, 2])}
    reference, embeddings = standalone(modules), collected(modules, backend, "sgd", SGD_LR)
    assert embeddings.kernel == kernel
    got, want = embeddings(ids), reference(ids)
    assert got["user"].shape == (5, DIM) and got["item"].shape == (7, DIM)
    for feature in ids:
        torch.testing.assert_close(got[feature], want[feature], rtol=0, atol=ATOL)
    assert count_pool_calls(embeddings, ids) == [2]  # one call per batch size
    reference, embeddings = sgd_steps(modules, backend, [ids])
    want = rows_of(reference)
    for key, rows in rows_of(embeddings).items():
        torch.testing.assert_close(rows, want[key], rtol=0, atol=ATOL, msg=key)


# -- 10. modules that read their tables themselves ----------------------------------------------------------


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_a_module_reading_its_table_in_forward_embeds_as_standalone(backend, optimizer):
    modules = {"user": users_full(), "item": ModuloToy(17, DIM, seed=4)}
    reference = standalone(modules)
    embeddings = collected(modules, backend, optimizer)
    assert embeddings.tables.table_keys == ["user__table"]  # the toy keeps its own table
    assert not embeddings["item"].table.bound
    # the toy's table is read with sparse gradients, or dense ones under dense Adam
    assert (
        embeddings.kernel
        == {"fused": "fused+sparse", "sparse": "sparse", "dense": "dense"}[KERNEL_ON_CPU[backend, optimizer]]
    )
    ids = {"user": torch.tensor([1, 2, 2]), "item": torch.tensor([0, 16, 17, 1000])}
    for mode in (True, False):
        embeddings.train(mode)
        reference.train(mode)
        got, want = embeddings(ids), reference(ids)
        for feature in ids:
            torch.testing.assert_close(got[feature], want[feature], rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_a_loose_table_gets_row_sparse_gradients_unless_the_optimizer_is_dense_adam(backend, optimizer):
    embeddings = collected({"user": users_full(), "item": ModuloToy(17, DIM, seed=4)}, backend, optimizer)
    feature_loss(embeddings({"user": torch.arange(4), "item": torch.tensor([1, 18, 3, 3])})).backward()
    grad = embeddings["item"].table.weight.grad
    assert grad is not None
    assert grad.is_sparse == (optimizer != "dense-adam")
    dense = grad.to_dense() if grad.is_sparse else grad
    assert set(dense.abs().sum(1).nonzero().flatten().tolist()) == {1, 3}


@pytest.mark.parametrize("backend, optimizer", params(EVERY_KERNEL))
def test_make_optimizers_steps_a_loose_table_with_the_table_optimizer(backend, optimizer):
    table_lr = 0.05
    embeddings = collected({"user": users_full(), "item": ModuloToy(17, DIM, seed=4)}, backend, optimizer, table_lr)
    loose = embeddings["item"].table.weight
    optimizers = make_optimizers(Holder(embeddings), 0.01)
    if optimizer == "dense-adam":
        assert optimizers.tables is None and type(optimizers.dense) is torch.optim.Adam
        groups = [group for group in optimizers.dense.param_groups if any(p is loose for p in group["params"])]
    else:
        assert type(optimizers.tables) is TABLE_OPTIMIZER_CLASS[optimizer]
        groups = [group for group in optimizers.tables.param_groups if any(p is loose for p in group["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == table_lr
    before = loose.detach().clone()
    optimizers.zero_grad()
    feature_loss(embeddings({"user": torch.arange(4), "item": torch.tensor([1, 18, 3, 3])})).backward()
    optimizers.step()
    moved = sorted((loose.detach() - before).abs().sum(1).nonzero().flatten().tolist())
    assert moved == [1, 3]


def test_a_loose_tables_sgd_step_equals_dense_sgd_on_the_standalone_module():
    toy = ModuloToy(17, DIM, seed=4)
    reference = copy.deepcopy(toy)
    embeddings = collected({"item": toy}, "torch", "sgd", SGD_LR)
    assert embeddings.tables is None and embeddings.kernel == "sparse"
    optimizers = make_optimizers(Holder(embeddings), 1.0)
    dense_sgd = torch.optim.SGD(reference.parameters(), lr=SGD_LR)
    ids = torch.tensor([1, 18, 3, 3, 16])
    optimizers.zero_grad()
    feature_loss(embeddings({"item": ids})).backward()
    optimizers.step()
    dense_sgd.zero_grad()
    feature_loss({"item": reference(ids)}).backward()
    dense_sgd.step()
    torch.testing.assert_close(embeddings["item"].table.weight, reference.table.weight, rtol=0, atol=ATOL)


# -- 11. a model plugin trains under every kernel -------------------------------------------------------------

#: table learning rates at which GMF learns the toy task in a few steps (SGD needs a large one: the rows start
#: at N(0, 0.01^2), and GMF's gradient on a row is another row times the output weights)
TRAINING_RATES = {"sgd": 100.0, "adam": 0.05, "adagrad": 0.1, "rowwise-adagrad": 0.1, "dense-adam": 0.05}


@pytest.mark.parametrize("backend, optimizer", params(list(KERNEL_ON_CPU)))
def test_gmf_learns_a_toy_task_with_plain_step_under_every_kernel(backend, optimizer):
    model = gmf_model(backend, optimizer, table_lr=TRAINING_RATES[optimizer])
    kernel = KERNEL_ON_CPU[backend, optimizer]
    assert model.embeddings.kernel == ("fused+sparse" if kernel == "fused" else kernel)
    before = embed_all(model.embeddings)
    step = PlainStep(model, TrainConfig(learning_rate=0.05), CPU)
    batches = toy_batches(4, size=64)
    losses = [train(step, batches) for _ in range(5)]
    first, last = np.mean(losses[0]), np.mean(losses[-1])
    assert last < 0.5 * first, f"mean loss {first:.3f} in the first pass, {last:.3f} in the last"
    assert_all_changed(embed_all(model.embeddings), before)


def test_table_collection_is_what_feature_embeddings_builds():
    embeddings = collected({"user": users_full()}, "torch", "adam")
    assert isinstance(embeddings.tables, TableCollection)
    assert FeatureEmbeddings({"user": users_full()}).tables is None  # standalone without a training
