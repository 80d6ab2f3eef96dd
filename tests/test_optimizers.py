"""The optimizers of an unsharded model (embbench.optimizers): which optimizer steps which parameters, the bytes
of optimizer state each table optimizer keeps (``optimizer_memory``), and ``SparseRowWiseAdagrad`` computing
fbgemm's exact row-wise Adagrad."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from embbench_plugins.schemes.compositional import CompositionalLookup
from embbench_plugins.schemes.full import FullLookup
from torch import nn

from embbench import FeatureEmbeddings, TableTraining
from embbench.collection import torchrec_available
from embbench.optimizers import SparseRowWiseAdagrad, make_optimizers, optimizer_memory
from embbench.registry import get_plugin
from embbench.training import PlainStep, TrainConfig

needs_torchrec = pytest.mark.skipif(not torchrec_available(), reason="the fused kernel needs torchrec and fbgemm")

# torch's Adagrad builds its sparse update without invariant checks, and warns so
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

CPU = torch.device("cpu")
DIM = 8
USERS, ITEMS = 40, 60
FLOAT = 4  # bytes of an fp32 value
#: the table optimizer torch steps row-sparse tables with, by name
TABLE_OPTIMIZER_CLASS = {
    "adam": torch.optim.SparseAdam,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise-adagrad": SparseRowWiseAdagrad,
}


def gmf_model(backend: str, optimizer: str, narrow_items: bool = False, table_lr: float = 0.1) -> nn.Module:
    """GMF over a full user table (41 rows of 8) and a full item table (61 rows of 8), or, with ``narrow_items``,
    items embedded by three concatenated partitions of 4 rows of width 4, 2 and 2 (a fused training keeps the
    narrow ones in its sparse fallback)."""
    torch.manual_seed(0)
    if narrow_items:
        items = CompositionalLookup(np.arange(ITEMS), [4, 4, 4], [4, 2, 2], "concat", seed=2)
    else:
        items = FullLookup(torch.arange(ITEMS), DIM, seed=2)
    modules = {"user": FullLookup(torch.arange(USERS), DIM, seed=1), "item": items}
    return get_plugin("models", "gmf")(FeatureEmbeddings(modules, TableTraining(backend, optimizer, table_lr)), DIM)


def one_step(model: nn.Module, dense_lr: float = 0.01) -> PlainStep:
    step = PlainStep(model, TrainConfig(learning_rate=dense_lr), CPU)
    users, items = torch.tensor([0, 1, 1, 7, 39]), torch.tensor([3, 3, 2, 59, 60])
    step((users, items), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    return step


# -- which optimizer steps which parameters ------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adagrad", "rowwise-adagrad"])
def test_sparse_tables_get_the_table_optimizer_and_everything_else_adam(optimizer):
    model = gmf_model("torch", optimizer, table_lr=0.2)
    optimizers = make_optimizers(model, 0.01)
    store = model.embeddings.tables.stores[0]
    assert type(optimizers.tables) is TABLE_OPTIMIZER_CLASS[optimizer]
    assert [p for group in optimizers.tables.param_groups for p in group["params"]] == store.table_parameters()
    assert all(group["lr"] == 0.2 for group in optimizers.tables.param_groups)
    assert type(optimizers.dense) is torch.optim.Adam
    dense = [p for group in optimizers.dense.param_groups for p in group["params"]]
    assert dense == list(model.output.parameters())
    assert all(group["lr"] == 0.01 for group in optimizers.dense.param_groups)


@needs_torchrec
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise-adagrad"])
def test_fused_tables_need_no_torch_optimizer(optimizer):
    model = gmf_model("torchrec", optimizer)
    assert model.embeddings.kernel == "fused" and model.embeddings.tables.table_parameters() == []
    optimizers = make_optimizers(model, 0.01)
    assert optimizers.tables is None
    assert [p for group in optimizers.dense.param_groups for p in group["params"]] == list(model.output.parameters())


def test_dense_adam_is_one_adam_with_the_tables_at_the_table_rate():
    model = gmf_model("torch", "dense-adam", table_lr=0.2)
    optimizers = make_optimizers(model, 0.01)
    assert optimizers.tables is None and type(optimizers.dense) is torch.optim.Adam
    dense_group, table_group = optimizers.dense.param_groups
    assert dense_group["lr"] == 0.01 and dense_group["params"] == list(model.output.parameters())
    assert table_group["lr"] == 0.2 and table_group["params"] == model.embeddings.tables.table_parameters()


# -- bytes of optimizer state ---------------------------------------------------------------------------------
#
# What torch 2.x and fbgemm keep per table of R rows of width D, after one step (fp32 throughout):
#   dense Adam (dense-adam)    exp_avg and exp_avg_sq, dense: 2 * 4 * R * D, plus its step counter, a 0-d fp32
#                              tensor per parameter: + 4 per stacked weight (the torch kernel stacks the tables
#                              of one row width in one parameter)
#   SparseAdam (adam, torch)   exp_avg and exp_avg_sq, allocated dense though only read rows change:
#                              2 * 4 * R * D; its step counter is a Python int, not a tensor: + 0
#   SGD (sgd), torch or fused  nothing (no momentum)
#   Adagrad (adagrad), torch   the sum of squared gradients, per element: 4 * R * D, plus a 0-d fp32 step: + 4
#                              per stacked weight
#   Adagrad, fused             the sum per element: 4 * R * D
#   row-wise Adagrad           one accumulator per row: 4 * R (SparseRowWiseAdagrad and fbgemm alike)
# The dense parameters (GMF's output layer, 8 weights and a bias) under Adam: 2 * 4 * 9 + 2 * 4 (two steps).


def table_state_bytes(kind: str, rows: int, dim: int) -> int:
    """Bytes of optimizer state of one table of ``rows`` x ``dim`` (the table above), step counters aside; ``kind``
    is 'fused-<optimizer>', 'torch-<optimizer>' or 'dense-adam'."""
    elements = rows * dim
    return {
        "dense-adam": 2 * FLOAT * elements,
        "torch-adam": 2 * FLOAT * elements,
        "torch-sgd": 0,
        "fused-sgd": 0,
        "torch-adagrad": FLOAT * elements,
        "fused-adagrad": FLOAT * elements,
        "torch-rowwise-adagrad": FLOAT * rows,
        "fused-rowwise-adagrad": FLOAT * rows,
    }[kind]


GMF_DENSE_BYTES = 2 * FLOAT * (DIM + 1) + 2 * FLOAT


@pytest.mark.parametrize(
    "backend, optimizer",
    [
        ("torch", "dense-adam"),
        ("torch", "adam"),
        ("torch", "sgd"),
        ("torch", "adagrad"),
        ("torch", "rowwise-adagrad"),
        ("torchrec", "adam"),  # no fused Adam on a CPU: SparseAdam
        pytest.param("torchrec", "sgd", marks=needs_torchrec),
        pytest.param("torchrec", "adagrad", marks=needs_torchrec),
        pytest.param("torchrec", "rowwise-adagrad", marks=needs_torchrec),
    ],
)
@pytest.mark.parametrize("narrow_items", [False, True], ids=["full-tables", "with-narrow-tables"])
def test_optimizer_memory_counts_the_state_each_table_optimizer_keeps(backend, optimizer, narrow_items):
    model = gmf_model(backend, optimizer, narrow_items)
    memory = optimizer_memory(model, one_step(model).optimizers)
    kernel = TableTraining(backend, optimizer).kernel
    expected = 0
    for spec in model.embeddings.tables.specs:
        table = spec.table
        if optimizer == "dense-adam":
            kind = "dense-adam"
        elif kernel == "fused" and table.dim % 4 == 0:
            kind = f"fused-{optimizer}"
        else:
            kind = f"torch-{optimizer}"  # the sparse kernel, or the fused kernel's fallback
        expected += table_state_bytes(kind, table.num_rows, table.dim)
    if optimizer in ("dense-adam", "adagrad"):  # torch's step counter: one per stacked weight it steps
        expected += FLOAT * len(model.embeddings.table_parameters())
    assert memory.table_bytes == expected
    assert memory.dense_bytes == GMF_DENSE_BYTES


def test_the_byte_formulas_in_numbers():
    """The full-table GMF (41 + 61 rows of 8 = 816 values in 2 tables, one stacked weight), spelled out."""
    values, rows, weights = (USERS + 1 + ITEMS + 1) * DIM, USERS + 1 + ITEMS + 1, 1  # both of width 8: stacked
    assert values == 816 and rows == 102
    cases = {
        ("torch", "dense-adam"): 2 * 4 * values + 4 * weights,
        ("torch", "adam"): 2 * 4 * values,
        ("torch", "adagrad"): 4 * values + 4 * weights,
        ("torch", "rowwise-adagrad"): 4 * rows,
        ("torch", "sgd"): 0,
    }
    for (backend, optimizer), expected in cases.items():
        model = gmf_model(backend, optimizer)
        assert optimizer_memory(model, one_step(model).optimizers).table_bytes == expected, optimizer


@needs_torchrec
def test_fused_kernels_state_in_numbers():
    values, rows = (USERS + 1 + ITEMS + 1) * DIM, USERS + 1 + ITEMS + 1
    for optimizer, expected in {"sgd": 0, "adagrad": 4 * values, "rowwise-adagrad": 4 * rows}.items():
        model = gmf_model("torchrec", optimizer)
        assert optimizer_memory(model, one_step(model).optimizers).table_bytes == expected, optimizer


# -- SparseRowWiseAdagrad is fbgemm's row-wise Adagrad -------------------------------------------------------


def test_sparse_row_wise_adagrad_applies_the_row_wise_update_to_the_rows_of_a_sparse_gradient():
    weight = nn.Parameter(torch.arange(15, dtype=torch.float32).reshape(5, 3) / 10)
    start = weight.detach().clone()
    optimizer = SparseRowWiseAdagrad([weight], lr=0.5)
    # rows 1 and 3, row 1 twice (uncoalesced: the optimizer must sum the two)
    indices = torch.tensor([[1, 3, 1]])
    values = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -0.5], [1.0, 0.0, -1.0]])
    weight.grad = torch.sparse_coo_tensor(indices, values, (5, 3))
    optimizer.step()
    grad = {1: torch.tensor([2.0, 2.0, 2.0]), 3: torch.tensor([0.5, 0.0, -0.5])}
    accumulator = torch.zeros(5)
    expected = start.clone()
    for row, g in grad.items():
        accumulator[row] = g.pow(2).mean()
        expected[row] -= 0.5 * g / (math.sqrt(accumulator[row]) + 1e-8)
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(optimizer.state[weight]["sum"], accumulator, rtol=0, atol=0)
    assert torch.equal(weight.detach()[[0, 2, 4]], start[[0, 2, 4]])
    # a second step accumulates: row 3's accumulator grows, its step shrinks
    before = weight.detach().clone()
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.tensor([[0.5, 0.0, -0.5]]), (5, 3))
    optimizer.step()
    second = 0.5 * torch.tensor([0.5, 0.0, -0.5]) / (math.sqrt(2 * accumulator[3]) + 1e-8)
    torch.testing.assert_close(weight.detach()[3], before[3] - second, rtol=0, atol=1e-7)


def test_sparse_row_wise_adagrad_takes_dense_gradients_as_every_row_read():
    weight = nn.Parameter(torch.ones(3, 2))
    optimizer = SparseRowWiseAdagrad([weight], lr=0.1)
    weight.grad = torch.tensor([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    optimizer.step()
    expected = torch.tensor([[1.0 - 0.1 * 2 / math.sqrt(2.0), 1.0], [1.0, 1.0], [1.1, 1.1]])
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(optimizer.state[weight]["sum"], torch.tensor([2.0, 0.0, 1.0]), rtol=0, atol=0)


@needs_torchrec
def test_sparse_row_wise_adagrad_trains_as_fbgemms_fused_row_wise_adagrad():
    users = CompositionalLookup(np.arange(USERS), [7, 6, 2], [DIM, DIM, DIM], "mult", 1)
    items = FullLookup(torch.arange(ITEMS), DIM, seed=2)
    gmf = get_plugin("models", "gmf")
    models = {}
    for backend in ("torch", "torchrec"):
        modules = {"user": copy.deepcopy(users), "item": copy.deepcopy(items)}
        torch.manual_seed(0)
        models[backend] = gmf(FeatureEmbeddings(modules, TableTraining(backend, "rowwise-adagrad", 0.1)), DIM)
    assert models["torch"].embeddings.kernel == "sparse" and models["torchrec"].embeddings.kernel == "fused"
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        users_batch = torch.randint(0, USERS, (24,), generator=generator)
        items_batch = torch.randint(0, ITEMS, (24,), generator=generator)
        batches.append(((users_batch, items_batch), torch.randint(0, 2, (24,), generator=generator).float()))
    torch_tables, fused_tables = models["torch"].embeddings.tables, models["torchrec"].embeddings.tables
    assert torch_tables.table_keys == fused_tables.table_keys
    initial = {key: torch_tables.weight(key).detach().clone() for key in torch_tables.table_keys}
    config = TrainConfig(learning_rate=0.01)
    steps = {backend: PlainStep(model, config, CPU) for backend, model in models.items()}
    for _ in range(3):  # the same batches again: accumulators of rows read before grow
        for inputs, labels in batches:
            for step in steps.values():
                step(inputs, labels)
    (fused_store,) = fused_tables.stores
    sums = steps["torch"].optimizers.tables.state
    for index, key in enumerate(torch_tables.table_keys):
        trained, fused = torch_tables.weight(key).detach(), fused_tables.weight(key).detach()
        assert not torch.equal(trained, initial[key]), f"{key}: training moved nothing"
        torch.testing.assert_close(trained, fused, rtol=0, atol=1e-5, msg=key)
        (accumulator,) = fused_store.kernel_module.split_optimizer_states()[index]
        stacked, rows = torch_tables.store_of(key).parameter_rows(key)
        torch.testing.assert_close(sums[stacked]["sum"][rows], accumulator, rtol=1e-5, atol=1e-9, msg=key)


@pytest.mark.parametrize("table_optimizer", ["adam", "dense-adam"])
def test_weight_decay_makes_the_dense_optimizer_adamw_and_never_decays_tables(table_optimizer):
    model = gmf_model("torch", table_optimizer)
    dense = make_optimizers(model, 0.001, weight_decay=0.1).dense
    assert isinstance(dense, torch.optim.AdamW)
    decays = {id(p): group["weight_decay"] for group in dense.param_groups for p in group["params"]}
    assert decays[id(model.output.weight)] == 0.1
    tables = model.embeddings.table_parameters()
    assert tables and all(decays.get(id(p), 0.0) == 0.0 for p in tables)  # not decayed, or not in this optimizer
    plain = make_optimizers(model, 0.001).dense
    assert isinstance(plain, torch.optim.Adam) and not isinstance(plain, torch.optim.AdamW)  # no decay: plain Adam
