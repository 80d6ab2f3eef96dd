"""Sharded training (embbench.distributed): 2 gloo processes against 1 process on the same global batches.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every sharding case in turn (spawning costs seconds,
each case a fraction of one) and saves rank 0's results; the test then trains the unsharded model on the same
global batches in this process and compares losses, predictions and final weights.
"""

from __future__ import annotations

import logging
import socket
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from embbench import FeatureEmbeddings, TableTraining, registry
from embbench import distributed as sharding
from embbench.collection import torchrec_available
from embbench.distributed import launch as launch_module
from embbench.distributed.wrap import embedding_collections
from embbench.optimizers import torch_optimizer
from embbench.schemes import FeatureSpec, build_embedding

WORLD = 2
DIM = 8
NUM_USERS, NUM_ITEMS = 120, 80
BATCH = 15  # not a multiple of WORLD: ranks hold 8 and 7 real rows, the second padded
STEPS = 4
EVAL_ROWS = 11
#: agreement of 2 processes with 1, for losses, predictions and weights (measured: at most 2.4e-7)
ATOL = 1e-6
#: and of the weight updates (trained - initial), relative to the largest update; a W-fold error would be 1.0
UPDATE_RTOL = 1e-3


class Case(NamedTuple):
    name: str
    scheme: str
    params: dict[str, Any]
    budget: int  # bytes per feature
    sharding_type: str
    embedding_optimizer: str
    dense_optimizer: str
    lr: float  # of the tables
    dense_lr: float


HASHED = 40 * DIM * 4 + 8  # 40 rows per table
CASES = [
    Case("tw-sgd", "hashing-trick", {}, HASHED, "table-wise", "sgd", "sgd", 2.0, 2.0),
    Case("rw-sgd-adam", "hashing-trick", {}, HASHED, "row-wise", "sgd", "adam", 2.0, 0.01),
    Case("cw-sgd", "hashing-trick", {}, HASHED, "column-wise", "sgd", "sgd", 2.0, 2.0),
    Case("dp-sgd", "hashing-trick", {}, HASHED, "data-parallel", "sgd", "sgd", 2.0, 2.0),
    Case("rw-adagrad-full", "full", {}, 10**6, "row-wise", "adagrad", "sgd", 0.1, 0.1),
    Case("twcw-adagrad-2-tables", "double-hashing", {}, 2 * HASHED, "table-column-wise", "adagrad", "sgd", 0.1, 0.1),
    Case("tw-rowwise-adagrad", "hashing-trick", {}, HASHED, "table-wise", "rowwise-adagrad", "sgd", 0.1, 0.1),
    Case("ddp-dhe", "dhe", {"num_hashes": 16, "hidden_layers": 2, "width": 16, "batch_norm": False}, 10**6,
         "table-wise", "sgd", "sgd", 0.1, 0.1),
]  # fmt: skip
#: row-wise Adagrad keeps one accumulator per row *shard*: split by columns, it is not the unsharded optimizer
DIVERGING = Case("cw-rowwise-adagrad", "hashing-trick", {}, HASHED, "column-wise", "rowwise-adagrad", "sgd", 0.1, 0.1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(
    scheme_name: str, params: dict[str, Any], budget: int, optimizer: str = "sgd", lr: float = 0.1, seed: int = 3
) -> nn.Module:
    """GMF with the scheme's tables in one collection kept for DMP to shard (as a sharded cell builds it)."""
    scheme = registry.create("schemes", scheme_name, **params)
    modules = {}
    for offset, (name, num_ids) in enumerate([("user", NUM_USERS), ("item", NUM_ITEMS)]):
        feature = FeatureSpec.from_vocabulary(name, num_ids, DIM)
        modules[name], _ = build_embedding(scheme, scheme_name, feature, budget, seed=seed * 1000 + offset + 1)
    embeddings = FeatureEmbeddings(modules, TableTraining("torchrec", optimizer, lr, sharded=True))
    torch.manual_seed(seed)
    return registry.get_plugin("models", "gmf")(embeddings, DIM)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randint(0, NUM_USERS, (BATCH,), generator=g),
            torch.randint(0, NUM_ITEMS, (BATCH,), generator=g),
            torch.randint(0, 2, (BATCH,), generator=g).float(),
        )
        for _ in range(STEPS)
    ]


def _eval_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    users = torch.randint(0, NUM_USERS, (EVAL_ROWS,), generator=g)
    return users, torch.randint(0, NUM_ITEMS, (EVAL_ROWS,), generator=g)


def _train_sharded(case: Case) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sharding.shard_model(
            _build(case.scheme, case.params, case.budget, case.embedding_optimizer, case.lr),
            case.sharding_type,
            case.embedding_optimizer,
            case.lr,
            torch.device("cpu"),
        )
    optimizers = sharding.make_optimizers(model, case.dense_optimizer, case.dense_lr)
    losses = [sharding.train_step(model, optimizers, (u, i), y) for u, i, y in _batches()]
    model.eval()
    users, items = _eval_inputs()
    return {
        "info": sharding.sharding_info(model),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
        "losses": losses,
        "predictions": sharding.distributed_forward(model, (users, items), "cpu", chunk_size=4),
        "item_vectors": sharding.distributed_forward(sharding.unwrap(model).item_embedding, (items,), "cpu"),
        "state": sharding.full_state_dict(model),
    }


def _one_step_without_gradient_division(case: Case) -> dict[str, Any]:
    """With torchrec's gradient division switched off, train_step refuses; one step by hand shows why."""
    from torchrec.distributed.comm_ops import set_gradient_division

    model = sharding.shard_model(
        _build(case.scheme, case.params, case.budget, case.embedding_optimizer, case.lr),
        case.sharding_type, case.embedding_optimizer, case.lr, "cpu",
    )
    optimizers = sharding.make_optimizers(model, case.dense_optimizer, case.dense_lr)
    users, items, labels = _batches()[0]
    set_gradient_division(False)
    try:
        try:
            sharding.train_step(model, optimizers, (users, items), labels)
            error = ""
        except RuntimeError as raised:
            error = str(raised)
        indices, weights = sharding.local_indices(BATCH, torch.distributed.get_rank(), WORLD)
        losses = nn.functional.binary_cross_entropy_with_logits(
            model(users[indices], items[indices]), labels[indices], reduction="none"
        )
        optimizers.zero_grad()
        ((losses * weights).sum() * WORLD / BATCH).backward()
        optimizers.step()
    finally:
        set_gradient_division(True)
    return {"error": error, "state": sharding.full_state_dict(model)}


def _worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torch's and torchrec's deprecation notices, twice per case and rank
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {case.name: _train_sharded(case) for case in [*CASES, DIVERGING]}
        results["gradient-division-off"] = _one_step_without_gradient_division(CASES[0])
        # A 1-row table cannot be split over 2 ranks by rows.
        try:
            sharding.shard_model(_build("hashing-trick", {}, DIM * 4 + 8), "row-wise", "sgd", 0.1, "cpu")
        except ValueError as error:
            results["row-wise-too-few-rows"] = str(error)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(
    case: Case, steps: int = STEPS
) -> tuple[dict[str, torch.Tensor], list[float], torch.Tensor, torch.Tensor, dict]:
    """The unsharded model trained in this process on the whole global batches."""
    model = _build(case.scheme, case.params, case.budget, case.embedding_optimizer, case.lr)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    tables = [p for _, ebc in embedding_collections(model) for p in ebc.parameters()]
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    optimizers = [torch_optimizer(case.dense_optimizer, dense, case.dense_lr, sparse_gradients=False)]
    if tables:
        optimizers.append(torch_optimizer(case.embedding_optimizer, tables, case.lr, sparse_gradients=False))
    losses = []
    for users, items, labels in _batches()[:steps]:
        loss = nn.functional.binary_cross_entropy_with_logits(model(users, items), labels)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
    model.eval()
    users, items = _eval_inputs()
    with torch.no_grad():
        predictions, item_vectors = model(users, items), model.item_embedding(items)
    return initial, losses, predictions, item_vectors, model.state_dict()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not torchrec_available():
        pytest.skip("torchrec cannot be imported: no tables to shard")
    out = tmp_path_factory.mktemp("sharded")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_two_processes_train_like_one(sharded_results: list[dict[str, Any]], case: Case) -> None:
    initial, losses, predictions, item_vectors, state = _reference(case)
    got = sharded_results[0][case.name]
    info: sharding.ShardingInfo = got["info"]
    assert info.world_size == WORLD
    if case.scheme == "dhe":
        assert (info.wrapped, info.sharding_type, info.embedding_optimizer, info.plan_summary) == (
            "ddp",
            "data-parallel",
            None,
            {},
        )
    else:
        expected = ("dmp", case.sharding_type, case.embedding_optimizer)
        assert (info.wrapped, info.sharding_type, info.embedding_optimizer) == expected
        assert len(info.plan_summary) == (4 if case.scheme == "double-hashing" else 2)
        summary = info.plan_summary
        assert all(s.startswith(f"{case.sharding_type} on ranks") for s in summary.values()), summary
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), atol=ATOL, rtol=0)
    torch.testing.assert_close(got["predictions"], predictions, atol=ATOL, rtol=0)
    torch.testing.assert_close(got["item_vectors"], item_vectors, atol=ATOL, rtol=0)
    assert set(got["state"]) == set(state)
    moved = 0.0
    for key, reference in state.items():
        torch.testing.assert_close(got["state"][key], reference, atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
        if reference.is_floating_point():
            update = reference - initial[key]
            scale = update.abs().max().item()
            error = (got["state"][key] - reference).abs().max().item()
            assert error <= UPDATE_RTOL * scale + 1e-9, f"{key}: update error {error:.2e} of an update of {scale:.2e}"
            moved = max(moved, scale)
    assert moved > 100 * ATOL, "training barely moved the weights: the comparison would not detect a wrong update"
    # every rank ends with the same predictions
    torch.testing.assert_close(sharded_results[1][case.name]["predictions"], got["predictions"], atol=0, rtol=0)


def test_row_wise_adagrad_on_column_shards_is_not_the_unsharded_optimizer(
    sharded_results: list[dict[str, Any]],
) -> None:
    got = sharded_results[0][DIVERGING.name]
    assert any("row-wise Adagrad on column-split tables" in w for w in got["warnings"])
    assert got["info"].plan_summary["embeddings.tables.stores.0.ebc.user__table"] == "column-wise on ranks [0, 1]"
    _, _, _, _, state = _reference(DIVERGING)
    key = "embeddings.tables.stores.0.ebc.embedding_bags.user__table.weight"
    assert (got["state"][key] - state[key]).abs().max().item() > 1e-3
    for case in CASES:  # and no case that should match warns
        assert sharded_results[0][case.name]["warnings"] == [], case.name


def test_without_gradient_division_table_updates_are_world_size_times_too_large(
    sharded_results: list[dict[str, Any]],
) -> None:
    got = sharded_results[0]["gradient-division-off"]
    assert got["error"].startswith("torchrec gradient division is off")
    initial, _, _, _, state = _reference(CASES[0], steps=1)
    for key in ("embeddings.tables.stores.0.ebc.embedding_bags.user__table.weight", "output.weight"):
        update = state[key] - initial[key]
        ratio = (got["state"][key] - initial[key]).norm() / update.norm()
        # tables: summed over ranks, W times the update; dense layers: still averaged by DDP
        assert ratio.item() == pytest.approx(WORLD if "embedding_bags" in key else 1.0, rel=1e-4), key


def test_table_wise_places_whole_tables(sharded_results: list[dict[str, Any]]) -> None:
    summary = sharded_results[0]["tw-sgd"]["info"].plan_summary
    collection = "embeddings.tables.stores.0.ebc"
    assert set(summary) == {f"{collection}.user__table", f"{collection}.item__table"}
    assert all(s in ("table-wise on ranks [0]", "table-wise on ranks [1]") for s in summary.values()), summary


def test_row_wise_splits_every_table_over_all_ranks(sharded_results: list[dict[str, Any]]) -> None:
    summary = sharded_results[0]["rw-sgd-adam"]["info"].plan_summary
    assert set(summary.values()) == {"row-wise on ranks [0, 1]"}


def test_row_wise_rejects_tables_with_fewer_rows_than_ranks(sharded_results: list[dict[str, Any]]) -> None:
    message = sharded_results[0]["row-wise-too-few-rows"]
    table = "embeddings.tables.stores.0.ebc.user__table"
    assert message.startswith(f"row-wise sharding of table '{table}' (1 rows) over 2 ranks")
    assert "leaves a rank without rows" in message


def test_unknown_sharding_type_and_optimizers_are_named() -> None:
    with pytest.raises(ValueError, match=r"^unknown sharding type 'diagonal'; expected one of: data-parallel, "):
        sharding.validate("diagonal", "sgd")
    with pytest.raises(ValueError, match=r"^unknown embedding optimizer 'adam'; expected one of: sgd, adagrad, "):
        sharding.validate("row-wise", "adam")
    with pytest.raises(ValueError, match="unknown sharding type 'grid'"):
        sharding.shard_model(nn.Linear(2, 2), "grid", "sgd", 0.1, "cpu")


def test_shard_model_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        sharding.shard_model(nn.Linear(2, 2), "table-wise", "sgd", 0.1, "cpu")


@pytest.mark.parametrize("batch, world", [(15, 2), (16, 2), (1, 2), (7, 3), (5, 1)])
def test_local_indices_cover_the_batch_once_in_order(batch: int, world: int) -> None:
    parts = [sharding.local_indices(batch, r, world) for r in range(world)]
    assert len({len(indices) for indices, _ in parts}) == 1  # equal local batches
    indices = torch.cat([i for i, _ in parts])
    weights = torch.cat([w for _, w in parts])
    assert torch.equal(indices[weights == 1], torch.arange(batch))
    assert bool((weights[:batch] == 1).all()) and bool((weights[batch:] == 0).all())


def test_init_from_env_outside_torchrun_is_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in launch_module.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launch_module.init_from_env("cpu") == (0, 1)
    assert not launch_module.is_distributed()
    assert (launch_module.rank(), launch_module.world_size()) == (0, 1)
    launch_module.barrier()
    launch_module.destroy()


def test_torchrun_command() -> None:
    command = launch_module.torchrun_command(3, ["-m", "embbench.cli", "run"])
    assert command == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "embbench.cli",
        "run",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="nproc must be a positive"):
        launch_module.torchrun_command(0, ["x.py"])


def test_launch_runs_ranks_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, torch, torch.distributed as dist
            from embbench.distributed import launch
            rank, world = launch.init_from_env("cpu")
            total = torch.tensor([rank + 1.0])
            dist.all_reduce(total)
            open(sys.argv[1] + f"/rank{rank}", "w").write(f"{world} {launch.is_distributed()} {int(total.item())}")
            launch.barrier()
            launch.destroy()
            """
        )
    )
    assert launch_module.launch(2, [str(script), str(tmp_path)], env={"OMP_NUM_THREADS": "1"}) == 0
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2 True 3", "2 True 3"]


def test_launch_reports_a_failing_rank(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(3)\n")
    assert launch_module.launch(1, [str(script)]) != 0  # torchrun exits 1 whatever the child's code
    assert f"embbench: torchrun with 1 process(es) failed with exit code 1: {script}" in capfd.readouterr().err
