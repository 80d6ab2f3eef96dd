"""Protocol controls and training regimes: how a budget is split over features, Adam's L2 versus AdamW's
decoupled weight decay, a learning rate that drops on a plateau, training without early stopping, the one-epoch
and time-to-target columns, the per-epoch history in `results --json`, and one log line per cell without a
progress bar."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sqlite3

import pytest
import torch
from cli_checks import assert_one_line_error, invoke
from torch import nn

from embbench import registry
from embbench.collection import FeatureEmbeddings, TableTraining, torchrec_available
from embbench.optimizers import dense_adam, fused_kernels, make_optimizers
from embbench.run.record import RESULT_FIELDS
from embbench.run.resolve import allocate, plan_features
from embbench.run.suites import parse_suite
from embbench.run.sweep import prepare
from embbench.schemes import Budget, FeatureSpec, full_table_bytes
from embbench.training import PlainStep, TargetReached, TrainConfig, fit, time_to_target

CPU = torch.device("cpu")
DATA = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 150, num_items = 90, interactions_per_user = 6 }\n'
ENTRIES = DATA + '[[models]]\nname = "gmf"\n[[schemes]]\nname = "hashing-trick"\n'
#: the run most tests below read: three epochs without early stopping, a schedule, a target, two precisions
REGIME_SUITE = """
epochs = 3
budgets = ["1/4"]
early_stopping = "none"
lr_schedule = "reduce-on-plateau"
target_val_metric = 0.55
precisions = ["fp32", "fp16"]
latency_batch_sizes = []
""" + ENTRIES


# -- budget_split ------------------------------------------------------------------------------------------------

FEATURES = {
    "small": FeatureSpec.from_vocabulary("small", 1_000, 16),
    "large": FeatureSpec.from_vocabulary("large", 50_000, 16),
}


def test_an_equal_split_gives_features_of_very_different_vocabularies_the_same_bytes():
    budget = Budget.parse("64KB")
    equal = plan_features(registry.create_scheme("hashing-trick"), FEATURES, budget, "equal")
    assert equal["small"].budget_bytes == equal["large"].budget_bytes == 64_000 // 2
    proportional = plan_features(registry.create_scheme("hashing-trick"), FEATURES, budget)
    full = {name: full_table_bytes(f.vocabulary, f.dim) for name, f in FEATURES.items()}
    assert proportional["small"].budget_bytes == 64_000 * full["small"] // sum(full.values())
    assert proportional["large"].budget_bytes == 64_000 * full["large"] // sum(full.values())
    for plans in (equal, proportional):
        assert sum(plan.size_bytes for plan in plans.values()) <= 64_000


def test_an_equal_fraction_splits_that_fraction_of_all_full_tables_and_caps_a_feature_at_its_full_table():
    full = {name: full_table_bytes(f.vocabulary, f.dim) for name, f in FEATURES.items()}
    quarter = allocate(Budget.parse("1/4"), FEATURES, "equal")
    assert quarter["small"] == full["small"]  # an equal share would be more than its whole table
    assert quarter["large"] == math.floor(sum(full.values()) / 4) // 2
    eighth = allocate(Budget.parse("1/64"), FEATURES, "equal")
    assert eighth["small"] == eighth["large"] == math.floor(sum(full.values()) / 64) // 2
    assert allocate(Budget.parse("1/4"), FEATURES) == {name: size // 4 for name, size in full.items()}


def test_a_suite_with_an_equal_split_plans_equal_budgets_and_keys_its_cells_apart(tmp_path):
    proportional_path, equal_path = tmp_path / "p.toml", tmp_path / "e.toml"
    proportional_path.write_text('budgets = ["8KB"]\n' + ENTRIES)
    equal_path.write_text('budgets = ["8KB"]\nbudget_split = "equal"\n' + ENTRIES)
    (proportional,), (equal,) = prepare(proportional_path).runs, prepare(equal_path).runs
    assert equal.plans["user"].budget_bytes == equal.plans["item"].budget_bytes == 4_000
    assert proportional.plans["user"].budget_bytes > proportional.plans["item"].budget_bytes
    assert equal.trained.key != proportional.trained.key
    assert "budget_split" not in proportional.trained.identity()  # the default keeps finished cells' keys


# -- optimizer: adam (L2) and adamw (decoupled) ------------------------------------------------------------------

def _one_step(optimizer: torch.optim.Optimizer, weight: nn.Parameter) -> None:
    optimizer.zero_grad()
    (0.0 * weight.sum()).backward()  # a zero loss gradient: only the weight decay moves the weight
    optimizer.step()


def test_adam_adds_l2_decay_to_the_gradient_and_adamw_decays_the_weight_apart_from_it():
    lr, decay = 0.01, 0.1
    l2, decoupled = nn.Parameter(torch.tensor([2.0, -3.0])), nn.Parameter(torch.tensor([2.0, -3.0]))
    _one_step(dense_adam([{"params": [l2], "lr": lr}], decay, "adam"), l2)
    _one_step(dense_adam([{"params": [decoupled], "lr": lr}], decay, "adamw"), decoupled)
    # Adam normalises the L2 gradient (decay * w): the first step moves each weight by lr towards 0
    assert torch.allclose(l2.detach(), torch.tensor([2.0 - lr, -3.0 + lr]))
    # AdamW shrinks the weight by lr * decay and Adam's step of a zero gradient is zero
    assert torch.allclose(decoupled.detach(), torch.tensor([2.0, -3.0]) * (1 - lr * decay))


def test_the_default_optimizer_trains_what_weight_decay_trained_before_the_choice():
    model = nn.Sequential(nn.Linear(3, 1))
    assert TrainConfig().optimizer == "adamw"
    assert type(make_optimizers(model, 1e-3, 0.1).dense) is torch.optim.AdamW  # weight_decay > 0: AdamW
    assert type(make_optimizers(model, 1e-3, 0.0).dense) is torch.optim.Adam  # none: plain Adam, as before
    adam = make_optimizers(model, 1e-3, 0.1, "adam").dense
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 0.1


def test_tables_never_decay_even_under_dense_adam():
    model = _scorer("dense-adam")
    table_ids = {id(p) for p in model.embeddings.table_parameters()}
    for name in ("adam", "adamw"):
        groups = make_optimizers(model, 1e-3, 0.1, name).dense.param_groups
        decay = {g["weight_decay"] for g in groups if {id(p) for p in g["params"]} & table_ids}
        assert decay == {0.0} and {g["weight_decay"] for g in groups} == {0.0, 0.1}


# -- a tiny model for fit --------------------------------------------------------------------------------------

def _full_module() -> nn.Module:
    scheme = registry.create_scheme("full")
    feature = FeatureSpec.from_vocabulary("item", 10, 4)
    return scheme.build(feature, scheme.plan(feature, full_table_bytes(10, 4)), 0)


class _Scorer(nn.Module):
    """One feature's embedding and a linear layer: logits for IDs."""

    def __init__(self, embeddings: FeatureEmbeddings) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.out = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embeddings({"item": ids})["item"]).squeeze(-1)


def _scorer(optimizer: str = "adam", backend: str = "torch") -> _Scorer:
    return _Scorer(FeatureEmbeddings({"item": _full_module()}, TableTraining(backend, optimizer, 0.01)))


def _rows(generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    ids = torch.arange(10).repeat(4)
    return (ids,), (ids % 2).float()


class _Recording:
    """A PlainStep that counts its steps and records restores and learning-rate scales."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.inner = PlainStep(model, config, CPU)
        self.device, self.steps, self.restored, self.scales = CPU, 0, [], []

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        self.steps += 1
        return self.inner(inputs, labels)

    def state(self) -> dict:
        return {"steps": self.steps, "weights": self.inner.state()}

    def restore(self, state: dict) -> None:
        self.restored.append(state["steps"])
        self.inner.restore(state["weights"])

    def set_learning_rate_scale(self, scale: float) -> None:
        self.scales.append(scale)
        self.inner.set_learning_rate_scale(scale)


def _fit(config: TrainConfig, val_auc: list[float]):
    """fit with scripted validation AUCs; each test result's auc is the number of steps trained when tested."""
    model = _scorer()
    step = _Recording(model, config)
    epochs_seen: list[int] = []

    def evaluate(split: str) -> dict[str, float]:
        if split == "validation":
            epochs_seen.append(len(epochs_seen) + 1)
            return {"auc": val_auc[len(epochs_seen) - 1]}
        return {"auc": step.steps / 1000}

    return fit(model, _rows, evaluate, config, 0, step), step


# -- lr_schedule -------------------------------------------------------------------------------------------------

def test_reduce_on_plateau_lowers_every_learning_rate_after_patience_epochs_without_improvement():
    config = TrainConfig(epochs=6, batch_size=8, early_stopping="none", lr_schedule="reduce-on-plateau",
                         lr_plateau_factor=0.5, lr_plateau_patience=1, learning_rate=0.004)
    result, step = _fit(config, [0.6, 0.7, 0.7, 0.65, 0.8, 0.8])
    # no improvement at epochs 3, 4 and 6: the rate of the epoch after each is halved
    assert [r["learning_rate"] for r in result.history] == [0.004, 0.004, 0.004, 0.002, 0.001, 0.001]
    assert step.scales == [0.5, 0.25, 0.125]
    dense, tables = step.inner.optimizers.dense, step.inner.optimizers.tables
    assert dense.param_groups[0]["lr"] == pytest.approx(0.004 * 0.125)
    assert tables.param_groups[0]["lr"] == pytest.approx(0.01 * 0.125)  # the table optimizer's too


def test_without_a_schedule_the_learning_rate_never_changes():
    config = TrainConfig(epochs=4, batch_size=8, early_stopping="none")
    result, step = _fit(config, [0.6, 0.5, 0.5, 0.5])
    assert {r["learning_rate"] for r in result.history} == {config.learning_rate} and step.scales == []


@pytest.mark.skipif(not torchrec_available(), reason="needs fbgemm")
def test_the_schedule_sets_the_learning_rate_of_a_fused_fbgemm_kernel():
    model = _scorer("rowwise-adagrad", "torchrec")
    (kernel,) = fused_kernels(model)
    step = PlainStep(model, TrainConfig(), CPU)
    step.set_learning_rate_scale(0.25)
    assert kernel.get_learning_rate() == pytest.approx(0.01 * 0.25)


@pytest.mark.skipif(not torchrec_available(), reason="needs torchrec and fbgemm")
def test_the_schedule_sets_the_learning_rates_of_a_sharded_step_and_its_fused_tables(tmp_path):
    import torch.distributed as dist

    from embbench.distributed import ShardedStep
    from embbench.run.execute import build_model
    from embbench.run.sweep import _single_process_group

    path = tmp_path / "sharded.toml"
    path.write_text('shardings = ["table-wise"]\nembedding_optimizers = ["rowwise-adagrad"]\nlearning_rate = 0.002\n'
                    'budgets = ["1/4"]\n' + ENTRIES)
    prepared = prepare(path)
    (run,) = prepared.runs
    _single_process_group()
    try:
        model = build_model(run, prepared.task, prepared.data[run.trained.dataset.label])
        step = ShardedStep(model, run.training, run.placement)
        step.set_learning_rate_scale(0.25)

        def kernels(optimizer):
            if hasattr(optimizer, "_emb_module"):
                yield optimizer._emb_module
            for _, inner in getattr(optimizer, "_optims", []):
                yield from kernels(inner)

        rates = [kernel.get_learning_rate() for kernel in kernels(step.optimizers.fused)]
        assert rates and rates == pytest.approx([0.01 * 0.25] * len(rates))  # in the kernels already
        assert step.optimizers.dense.param_groups[0]["lr"] == pytest.approx(0.002 * 0.25)
    finally:
        dist.destroy_process_group()


# -- early_stopping = "none", the one-epoch regime ---------------------------------------------------------------

def test_early_stopping_none_trains_every_epoch_and_tests_the_last_weights():
    falling = [0.8, 0.7, 0.6, 0.5, 0.4]
    stopped, stopped_step = _fit(TrainConfig(epochs=5, batch_size=8, patience=2), falling)
    assert (len(stopped.history), stopped.best_epoch, stopped_step.restored) == (3, 1, [5])
    result, step = _fit(TrainConfig(epochs=5, batch_size=8, early_stopping="none"), falling)
    assert len(result.history) == 5 and result.best_epoch == 5 and step.restored == []
    assert result.test["auc"] == step.steps / 1000 == 25 / 1000  # tested after all 25 steps
    assert result.validation == {"auc": 0.4}


def test_the_one_epoch_model_is_tested_right_after_epoch_1_whatever_epoch_is_chosen():
    result, _ = _fit(TrainConfig(epochs=4, batch_size=8, early_stopping="none"), [0.5, 0.6, 0.7, 0.8])
    assert result.one_epoch_test == {"auc": 5 / 1000} and result.one_epoch_validation == {"auc": 0.5}
    assert result.test == {"auc": 20 / 1000}
    only_one, _ = _fit(TrainConfig(epochs=1, batch_size=8), [0.5])
    assert only_one.test == only_one.one_epoch_test  # the same weights: tested once


# -- time to a target --------------------------------------------------------------------------------------------

HISTORY = [
    {"epoch": 1, "train_seconds": 2.0, "steps": 10, "val_auc": 0.70, "val_logloss": 0.60},
    {"epoch": 2, "train_seconds": 3.0, "steps": 10, "val_auc": 0.75, "val_logloss": 0.50},
    {"epoch": 3, "train_seconds": 4.0, "steps": 12, "val_auc": 0.74, "val_logloss": 0.45},
]


@pytest.mark.parametrize(
    "metric, target, expected",
    [
        ("auc", 0.70, TargetReached(1, 2.0, 10)),
        ("auc", 0.74, TargetReached(2, 5.0, 20)),
        ("auc", 0.76, None),
        ("logloss", 0.47, TargetReached(3, 9.0, 32)),  # lower is better: at most the target
        ("logloss", 0.60, TargetReached(1, 2.0, 10)),
        ("auc", None, None),
    ],
)
def test_time_to_target_is_the_first_epoch_whose_validation_metric_reaches_it(metric, target, expected):
    assert time_to_target(HISTORY, metric, target) == expected


# -- a suite run: the columns, `results --json`, --no-progress ---------------------------------------------------

@pytest.fixture(scope="module")
def regime_run(tmp_path_factory):
    """REGIME_SUITE run through the CLI with --no-progress: (the CLI result, the database)."""
    folder = tmp_path_factory.mktemp("regime")
    path = folder / "regime.toml"
    path.write_text(REGIME_SUITE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBBENCH_CACHE_DIR", str(folder / "cache"))
        result = invoke("run", "suite", str(path), "--db", str(folder / "r.sqlite"), "--no-progress")
    assert result.exit_code == 0, result.output
    return result, folder / "r.sqlite"


def _rows_of(db) -> dict[str, dict]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    rows = {row["precision"]: dict(row) for row in connection.execute("SELECT * FROM cells")}
    connection.close()
    return rows


def test_no_progress_logs_one_line_per_finished_cell_on_stderr(regime_run):
    result, _ = regime_run
    pattern = re.compile(r"^\[(\d)/2\] ok synthetic/gmf/hashing-trick( \(fp16\))?@1/4/cpu/seed0 "
                         r"val_auc \d\.\d{4} test_auc \d\.\d{4} \d+\.\d s$")
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and all(pattern.match(line) for line in lines), result.stderr
    assert [pattern.match(line).group(1) for line in lines] == ["1", "2"]


def test_the_regime_columns_hold_the_one_epoch_model_and_the_last_epoch_without_early_stopping(regime_run):
    rows = _rows_of(regime_run[1])
    fp32, fp16 = rows["fp32"], rows["fp16"]
    history = json.loads(fp32["history_json"])
    assert fp32["early_stopping"] == "none" and fp32["epochs_run"] == fp32["best_epoch"] == 3 == len(history)
    assert fp32["val_auc"] == pytest.approx(history[-1]["val_auc"])  # the last epoch, not the best
    assert fp32["one_epoch_val_auc"] == pytest.approx(history[0]["val_auc"])
    assert 0 < fp32["one_epoch_test_auc"] < 1 and fp32["one_epoch_test_logloss"] is None  # ranking has no log-loss
    shared = ["early_stopping", "one_epoch_test_auc", "one_epoch_val_auc", "epochs_to_target", "steps_to_target",
              "seconds_to_target", "target_val_metric", "history_json"]
    assert [fp16[name] for name in shared] == [fp32[name] for name in shared]  # the fp16 row's training run's


def test_the_target_columns_equal_a_brute_force_reading_of_the_stored_history(regime_run):
    fp32 = _rows_of(regime_run[1])["fp32"]
    history = json.loads(fp32["history_json"])
    reached = [record for record in history if record["val_auc"] >= 0.55]
    assert fp32["target_val_metric"] == 0.55
    if not reached:
        assert fp32["epochs_to_target"] is fp32["seconds_to_target"] is fp32["steps_to_target"] is None
        return
    first = reached[0]["epoch"]
    before = [record for record in history if record["epoch"] <= first]
    assert fp32["epochs_to_target"] == first
    assert fp32["steps_to_target"] == sum(record["steps"] for record in before)
    assert fp32["seconds_to_target"] == pytest.approx(sum(record["train_seconds"] for record in before))


def test_results_json_has_each_epochs_metrics_seconds_and_learning_rate(regime_run):
    db = regime_run[1]
    (row, _) = json.loads(invoke("results", "--db", str(db), "--json").stdout)
    assert list(row) == RESULT_FIELDS and RESULT_FIELDS.index("plan_json") < RESULT_FIELDS.index("history")
    assert [epoch["epoch"] for epoch in row["history"]] == [1, 2, 3]
    for epoch in row["history"]:
        assert {"loss", "train_seconds", "steps", "learning_rate", "val_auc", "val_hr@10"} <= set(epoch)
        assert epoch["train_seconds"] > 0 and epoch["steps"] > 0
    (csv_row, _) = csv.DictReader(io.StringIO(invoke("results", "--db", str(db), "--csv").stdout))
    assert json.loads(csv_row["history"]) == row["history"]  # CSV: the same history as JSON text


def test_with_a_progress_bar_no_cell_lines_are_logged(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('epochs = 1\nbudgets = ["1/4"]\nlatency_batch_sizes = []\n' + ENTRIES)
    result = invoke("run", "suite", str(path), "--db", str(tmp_path / "r.sqlite"))
    assert result.exit_code == 0 and not re.search(r"^\[\d+/\d+\] ", result.stderr, re.MULTILINE)


# -- settings ------------------------------------------------------------------------------------------------------

def test_the_new_settings_at_their_defaults_keep_the_keys_of_finished_cells(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    plain, explicit = tmp_path / "a" / "s.toml", tmp_path / "b" / "s.toml"  # one suite name
    plain.write_text(ENTRIES)
    explicit.write_text('optimizer = "adamw"\nlr_schedule = "none"\nlr_plateau_factor = 0.5\n'
                        'lr_plateau_patience = 1\nbudget_split = "proportional"\n' + ENTRIES)
    (cell,), (same,) = parse_suite(plain).cells(), parse_suite(explicit).cells()
    assert cell.key == same.key
    assert not {"optimizer", "lr_schedule", "target_val_metric", "budget_split"} & set(cell.identity())
    l2 = tmp_path / "c" / "s.toml"
    l2.write_text('optimizer = "adam"\n' + ENTRIES)
    (other,) = parse_suite(l2).cells()
    assert other.key != cell.key and other.training_config().optimizer == "adam"


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('lr_schedule = "cosine"', "unknown lr_schedule 'cosine'"),
        ('optimizer = "sgd"', "unknown optimizer 'sgd'"),
        ('budget_split = "equals"', "unknown budget_split 'equals' (did you mean 'equal'?)"),
        ("lr_plateau_factor = 1.5", "'lr_plateau_factor': must be in"),
        ("lr_plateau_patience = 0", "'lr_plateau_patience': must be in"),
        ("target_val_metric = nan", "'target_val_metric': must be a finite number"),
        ('early_stopping = "never"', "unknown early_stopping 'never'"),
    ],
)
def test_bad_protocol_settings_are_one_error_line_and_nothing_written(tmp_path, line, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n" + ENTRIES)
    result = invoke("run", "suite", str(path), "--db", str(tmp_path / "r.sqlite"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "r.sqlite").exists()
